"""Calibration data: one dataset per stream item, loaded with ``datasets`` and made into model inputs.

A data spec is, recognised in this order:

- a folder written by ``Dataset.save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` with ``@split``,
  default ``train``): ``path/to/folder[@split]``;
- data files, ``.csv``, ``.json``, ``.jsonl`` or ``.parquet``, globs allowed: ``data/*.jsonl[@split]``;
- a Hub dataset ``org/name[:config][@split]``, read through the Hub cache (offline, it must be there);
- in the Python API, a ``datasets.Dataset`` object (:meth:`DataSpec.memory`), recorded by its
  fingerprint and row count.

The column is the one given, else the first of :data:`COLUMNS` the dataset has. ``samples`` rows are
drawn without replacement by a permutation seeded with ``seed`` (all rows, in order, when the dataset
has no more). Labels are never read: the methods use the model's own predictions. Inputs are made
with the base's own tokenizer (text, padded per batch with an attention mask, truncated to
``max_length``) or image processor (PIL images, grey ones converted to RGB); token ids and pixel
arrays are taken as they are. Every failure is a :class:`ContMergeError` naming the spec.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import ContMergeError

COLUMNS = ("text", "sentence", "content", "image", "img", "pixel_values", "input_ids")
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
Modality = Literal["text", "image", "token_ids", "pixel_values"]


@dataclass(frozen=True)
class DataSpec:
    """A calibration data source as the user wrote it."""

    text: str
    kind: Literal["disk", "files", "hub", "memory"]
    location: str
    split: str | None = None
    config: str | None = None
    dataset: Any = field(default=None, compare=False, repr=False)  # kind "memory": the Dataset itself

    @classmethod
    def memory(cls, dataset: Any) -> DataSpec:
        """An in-memory ``datasets.Dataset`` (the API); its text, which the state records, names its
        fingerprint (``datasets``' hash of its content and history) and size."""
        import datasets

        if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            raise ContMergeError(f"data is a {type(dataset).__name__} with splits {sorted(dataset)}: pass one split, "
                                 "e.g. data=dataset['train'].")
        if not isinstance(dataset, datasets.Dataset):
            raise ContMergeError(f"data is a {type(dataset).__name__}; give a datasets.Dataset (an IterableDataset has no "
                                 "length to sample from: materialise it with Dataset.from_list), or a data spec string.")
        fingerprint = getattr(dataset, "_fingerprint", None) or "unknown"
        return cls(f"<in-memory Dataset {fingerprint}, {len(dataset)} rows>", "memory", fingerprint, dataset=dataset)

    @classmethod
    def parse(cls, text: str) -> DataSpec:
        location, _, split = text.rpartition("@") if "@" in text else (text, "", "")
        split = split or None
        expanded = os.path.expanduser(location)
        if os.path.isdir(expanded):
            return cls(text, "disk", expanded, split)
        if Path(expanded).suffix.lower() in FILE_BUILDERS:
            return cls(text, "files", expanded, split)
        name, _, config = location.partition(":")
        if name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/")):
            return cls(text, "hub", name, split, config or None)
        raise ContMergeError(
            f"--data {text!r} is neither a dataset folder (save_to_disk), data files (.csv, .json, .jsonl, .parquet) "
            "nor a Hub dataset org/name[:config][@split]. Check the path or the id."
        )

    def load(self):
        """The ``datasets.Dataset`` this spec names."""
        import datasets

        if self.kind == "memory":
            return self.dataset
        try:
            if self.kind == "disk":
                data = datasets.load_from_disk(self.location)
                if isinstance(data, datasets.DatasetDict):
                    split = self.split or "train"
                    if split not in data:
                        raise ContMergeError(f"--data {self.text!r} has no split {split!r} (it has {sorted(data)}); "
                                             "name one with @split.")
                    return data[split]
                if self.split:
                    raise ContMergeError(f"--data {self.text!r}: the folder holds one Dataset, not splits; drop @{self.split}.")
                return data
            if self.kind == "files":
                files = sorted(glob.glob(self.location)) if glob.has_magic(self.location) else [self.location]
                if not files or not all(os.path.isfile(f) for f in files):
                    raise ContMergeError(f"--data {self.text!r}: no such file{'s' if len(files) != 1 else ''}.")
                builder = FILE_BUILDERS[Path(files[0]).suffix.lower()]
                return datasets.load_dataset(builder, data_files=files, split=self.split or "train")
            return datasets.load_dataset(self.location, self.config, split=self.split or "train")
        except ContMergeError:
            raise
        except Exception as e:  # datasets raises many kinds: unreadable files, no network, unknown splits
            offline = " (offline: the dataset must be in the local datasets/Hub cache)" if self.kind == "hub" else ""
            raise ContMergeError(f"--data {self.text!r} could not be loaded{offline}: {e.__class__.__name__}: "
                                 f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None


def pick_column(dataset, column: str | None, spec: DataSpec) -> str:
    names = list(dataset.column_names)
    if column is not None:
        if column not in names:
            raise ContMergeError(f"--data {spec.text!r} has no column {column!r} (it has {names}). Pass --data-column.")
        return column
    for name in COLUMNS:
        if name in names:
            return name
    raise ContMergeError(f"--data {spec.text!r} has none of the columns {list(COLUMNS)} (it has {names}); name the input "
                         "column with --data-column.")


def sample_rows(dataset, samples: int, seed: int, spec: DataSpec) -> list[int]:
    """``samples`` row indices, drawn by a permutation seeded with ``seed`` (all rows when there are no more)."""
    n = len(dataset)
    if n == 0:
        raise ContMergeError(f"--data {spec.text!r} is empty: calibration needs at least one example.")
    if samples >= n:
        return list(range(n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples]
    return sorted(order.tolist())


def modality_of(values: Sequence[Any], column: str, spec: DataSpec) -> Modality:
    first = values[0]
    if isinstance(first, str):
        return "text"
    if _is_image(first):
        return "image"
    if column == "pixel_values":
        return "pixel_values"
    if isinstance(first, (list, tuple)) and first and all(isinstance(v, int) for v in first):
        return "token_ids"
    raise ContMergeError(f"--data {spec.text!r}: column {column!r} holds {type(first).__name__} values, which are neither "
                         "text, images, token ids nor pixel values. Name the input column with --data-column.")


def _is_image(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pillow is a dependency of the image path only
        return False
    return isinstance(value, Image.Image)


@dataclass
class CalibrationSet:
    """The batches one stream item is calibrated on, and where they came from (for the state and card)."""

    spec: DataSpec
    column: str
    modality: Modality
    rows: int
    batches: list[dict[str, torch.Tensor]]

    def describe(self) -> dict[str, Any]:
        return {"data": self.spec.text, "column": self.column, "samples": self.rows}


def load_calibration(spec: DataSpec, model_folder: Path, *, column: str | None, samples: int, seed: int,
                     batch_size: int, max_length: int, model_kind: str) -> CalibrationSet:
    """The spec's rows as batches of inputs for the model in ``model_folder`` (its tokenizer or processor)."""
    dataset = spec.load()
    column = pick_column(dataset, column, spec)
    rows = sample_rows(dataset, samples, seed, spec)
    values = dataset.select(rows)[column]
    modality = modality_of(values, column, spec)
    if modality in ("image", "pixel_values") and model_kind == "causal-lm":
        raise ContMergeError(f"--data {spec.text!r} holds images, and the model is a causal language model: give text.")
    if modality in ("text", "token_ids") and model_kind == "image":
        raise ContMergeError(f"--data {spec.text!r} holds text, and the model takes images: give an image column.")
    batches = []
    for start in range(0, len(values), batch_size):
        chunk = values[start : start + batch_size]
        batches.append(_encode(chunk, modality, model_folder, max_length, spec))
    return CalibrationSet(spec, column, modality, len(values), batches)


def _encode(chunk: list[Any], modality: Modality, folder: Path, max_length: int, spec: DataSpec) -> dict[str, torch.Tensor]:
    if modality == "text":
        tokenizer = _tokenizer(folder, spec)
        return dict(tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt"))
    if modality == "token_ids":
        longest = min(max(len(c) for c in chunk), max_length)
        ids = torch.zeros(len(chunk), longest, dtype=torch.long)
        mask = torch.zeros(len(chunk), longest, dtype=torch.long)
        for i, c in enumerate(chunk):
            c = list(c)[:longest]
            ids[i, : len(c)], mask[i, : len(c)] = torch.tensor(c, dtype=torch.long), 1
        return {"input_ids": ids, "attention_mask": mask}
    if modality == "pixel_values":
        return {"pixel_values": torch.tensor(chunk, dtype=torch.float32)}
    processor = _image_processor(folder, spec)
    return dict(processor(images=[im.convert("RGB") for im in chunk], return_tensors="pt"))


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(folder: Path, spec: DataSpec):
    key = str(folder)
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise ContMergeError(f"--data {spec.text!r} is text, and the base has no tokenizer to encode it ({e}). "
                                 "Put the tokenizer files in the base folder.") from None
        if tokenizer.pad_token is None:  # causal LMs often have none; padded positions are masked out anyway
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "right"  # left padding would shift a causal LM's positions: batch-mates would matter
        _TOKENIZERS[key] = tokenizer
    return _TOKENIZERS[key]


def _image_processor(folder: Path, spec: DataSpec):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ContMergeError(f"--data {spec.text!r} holds images, and the base has no image processor for them ({e}). "
                             "Put preprocessor_config.json in the base folder.") from None
