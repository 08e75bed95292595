"""A checkpoint as the engine sees it: names, shapes and dtypes from headers, tensors read on demand.

A :class:`TensorIndex` answers ``keys()``, ``info(key)`` (shape and dtype from the headers alone) and
``read(key, rows)``; it never holds a whole model. :class:`Checkpoint` is one folder's weights
(safetensors single or sharded; pickles only when the user opts in, since unpickling runs code).
Other implementations: tensors in memory (:class:`TensorDict`), a Hub checkpoint known from its
headers (``remote.py``), a LoRA adapter over its base (``sources/lora.py``).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import torch

from ..errors import ContMergeError
from . import fingerprints, schemas
from .safetensors import DTYPE_NAMES, SafetensorsFile, TensorInfo, itemsize, iter_row_chunks

# What a model folder holds, by transformers' and PEFT's conventions (``artifacts/layout.py`` lists
# these with every other file name the package uses).
WEIGHTS_PREFIX = "model"  # model.safetensors, model-0000i-of-0000N.safetensors
SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_SINGLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS_PREFIX = "adapter_model"  # adapter_model.safetensors
# Files a merged folder needs besides weights; fetched from the Hub and copied from the base.
# Never code (*.py): loading it would need trust_remote_code.
SIDE_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def refuse_outside_links(folder: Path, root: Path, label: str) -> None:
    """Refuse a source folder holding a symbolic link whose target lies outside ``root``.

    ``root`` is the folder itself for a local source, and the repo's folder of the Hub cache for a Hub
    snapshot (whose files are links into the repo's ``blobs/``). Whatever a step copies from a source
    (tokenizer and processor files, configs) ends up in every step and on the Hub, and its weights are
    read as the source's: a link out of the source would carry a file of the user's machine there.
    """
    root = Path(root).resolve()
    for dirpath, dirnames, filenames in os.walk(folder):  # links to folders are listed, not followed
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                raise ContMergeError(
                    f"{label}: {path.relative_to(folder)} is a symbolic link to {path.resolve()}, outside the source "
                    "folder. hf-contmerge reads and copies nothing from outside a source (it would end up in every "
                    "step and on the Hub): replace the link with the file itself, or remove it. Nothing was written."
                )


class TensorIndex:
    """Names, shapes and dtypes of a checkpoint's tensors, known before any is read.

    What the pre-flight and the engine ask of every kind of source (a folder, a Hub repo known from
    its headers, a LoRA adapter over its base); ``read`` gives a tensor or a dim-0 row range of it.
    """

    _info: dict[str, TensorInfo]

    def keys(self) -> list[str]:
        return list(self._info)

    def __contains__(self, key: str) -> bool:
        return key in self._info

    def info(self, key: str) -> TensorInfo:
        return self._info[key]

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def low_rank(self, key: str) -> int | None:
        """The rank of this source's task vector on ``key`` when it is known to be low-rank
        (a LoRA target: r; a tensor the source leaves at the base: 0), else None."""
        return None

    def low_rank_delta(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors ``(L, R)``, float32, with task vector ``L @ R`` on ``key`` (when ``low_rank`` is not None)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files; the default holds none."""


class TensorDict(TensorIndex):
    """Tensors held in memory, answering like a checkpoint (calibration statistics, a model being trained)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = dict(tensors)
        self._info = {k: TensorInfo(DTYPE_NAMES[t.dtype], tuple(t.shape), 0, t.numel() * t.element_size())
                      for k, t in self._tensors.items()}

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = self._tensors[key]
        return (t if rows is None or t.dim() == 0 else t[rows[0] : rows[1]]).clone()


class Checkpoint(TensorIndex):
    """The weights of one model folder: safetensors (single or sharded), or opted-in pickles."""

    def __init__(self, folder: Path, files: list[SafetensorsFile] | None = None, pickles: list[Path] | None = None):
        self.folder = folder
        self._files = files or []
        self._pickles = pickles or []
        self._pickle_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        self._where: dict[str, SafetensorsFile | Path] = {}
        self._info: dict[str, TensorInfo] = {}
        self.digest: ContentDigest | None = None  # a source's content fingerprint (fingerprinted()), fed by read()
        for f in self._files:
            for key, info in sorted(f.tensors.items(), key=lambda kv: kv[1].start):
                self._where[key], self._info[key] = f, info
        for p in self._pickles:
            for key, t in self._load_pickle(p).items():
                self._where[key] = p
                self._info[key] = TensorInfo(DTYPE_NAMES[t.dtype], tuple(t.shape), 0, t.numel() * t.element_size())
        self._identity: str | None = None

    @classmethod
    def open(cls, folder: Path, *, allow_pickle: bool = False, label: str = "", prefix: str = "model") -> Checkpoint:
        """Open ``{prefix}.safetensors`` or its sharded index in ``folder`` (pickles only if allowed)."""
        label = label or str(folder)
        single, index = f"{prefix}.safetensors", f"{prefix}.safetensors.index.json"
        if (folder / index).is_file():
            return cls(folder, files=[SafetensorsFile(folder / n) for n in _index_files(folder / index, label)])
        if (folder / single).is_file():
            return cls(folder, files=[SafetensorsFile(folder / single)])
        pickles = [folder / n for n in _index_files(folder / PICKLE_INDEX, label)] if (folder / PICKLE_INDEX).is_file() else (
            [folder / PICKLE_SINGLE] if (folder / PICKLE_SINGLE).is_file() else []
        )
        if pickles and not allow_pickle:
            raise ContMergeError(
                f"{label} holds only pickle weights ({pickles[0].name}). Unpickling can run arbitrary code, "
                "so it is refused by default. Convert the model to safetensors (load it and save_pretrained "
                "with safe_serialization=True), or pass --allow-pickle if you trust its author."
            )
        if pickles:
            return cls(folder, pickles=pickles)
        raise ContMergeError(
            f"{label} has no model weights: expected {SAFE_SINGLE} or {SAFE_INDEX} (or a PEFT adapter with "
            f"{ADAPTER_CONFIG}). Point the source at a folder written by save_pretrained."
        )

    @staticmethod
    def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
        return load_pickle(path)

    def file_of(self, key: str) -> Path:
        where = self._where[key]
        return where.path if isinstance(where, SafetensorsFile) else where

    def files(self) -> list[Path]:
        """The weight files, in name order."""
        return sorted({f.path for f in self._files} | set(self._pickles))

    def fingerprinted(self) -> Checkpoint:
        """Track this checkpoint's content fingerprint (a source's; carried state and statistics need none):
        known at once from the per-machine cache when these files were hashed before unchanged
        (``fingerprints.py``), else fed by the reads the merge makes. Returns the checkpoint."""
        self._identity = fingerprints.identity(self.files())  # the files as opened
        self.digest = ContentDigest(self)
        self.digest.known = fingerprints.lookup(self._identity)
        return self

    def fingerprint(self) -> str:
        """The content fingerprint (:class:`ContentDigest`; see :meth:`fingerprinted`), stored in the cache."""
        if self.digest is None:
            raise RuntimeError("internal: fingerprint() of a checkpoint opened without fingerprinted()")
        if self.digest.known is None:
            value = self.digest.hexdigest()
            fingerprints.remember(self._identity, self.files(), value)
            return value
        return self.digest.known

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        where = self._where[key]
        if isinstance(where, SafetensorsFile):
            t = where.read(key, rows)
        else:
            if self._pickle_cache is None or self._pickle_cache[0] != where:
                self._pickle_cache = (where, self._load_pickle(where))
            t = self._pickle_cache[1][key]
            t = (t if rows is None or t.dim() == 0 else t[rows[0] : rows[1]]).clone()
        if self.digest is not None:
            self.digest.feed(key, rows, t)
        return t

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._pickle_cache = None


def load_pickle(path: Path, mmap: bool = True) -> dict[str, torch.Tensor]:
    """An opted-in pickle checkpoint, read with torch's ``weights_only`` unpickler (tensors and plain
    containers only): one that asks for anything else is refused as unsafe, even with the opt-in."""
    import pickle

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ContMergeError(
            f"{path} is refused as unsafe even with --allow-pickle: it asks the unpickler for more than tensors "
            f"({first[:200]}). Such a file can run code when loaded. Get the model as safetensors from its author."
        ) from None
    except Exception as e:  # torch raises many types for a damaged file
        raise ContMergeError(f"{path} could not be read as a PyTorch checkpoint ({e.__class__.__name__}: "
                             f"{str(e)[:200]}). Re-save it, preferably as safetensors.") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise ContMergeError(f"{path} is not a state dict (a mapping of tensor names to tensors). Re-save it with "
                             "save_pretrained, preferably as safetensors.")
    return data


def _index_files(index: Path, label: str) -> list[str]:
    fix = "Re-download or re-save the model (save_pretrained writes it)."
    weight_map = schemas.load(schemas.ShardIndex, index, f"{label}: shard index", fix).weight_map
    names = sorted(set(weight_map.values()))
    for name in names:
        if Path(name).name != name or name in (".", ".."):
            raise ContMergeError(f"{index} in {label} names a shard outside its folder ({name!r}); refusing it.")
        if not (index.parent / name).is_file():
            raise ContMergeError(
                f"{label}: shard {name} listed in {index.name} is missing. The download is incomplete: fetch it again."
            )
    return names


FINGERPRINT_SCHEME = "sha256:"


class ContentDigest:
    """The fingerprint of a checkpoint's content: sha256 over every tensor's name, dtype, shape and bytes.

    Hashing 14 GB of a 7B model costs as much as reading it, so the digest is fed by the reads the
    engine makes anyway: a tensor read whole, or in consecutive row ranges from its first row on, is
    hashed as it arrives (in the reader thread, before any kernel can touch the buffer). Re-reads and
    reads out of order are not hashed again; :meth:`hexdigest` reads whatever was not covered (tensors
    the merge never asks for). So every byte of every tensor counts, and the file layout (sharding,
    header order, metadata) does not: two saves of the same weights have one fingerprint.
    """

    def __init__(self, index: TensorIndex):
        self.index = index
        self.known: str | None = None  # set when the fingerprint is known already: nothing is hashed then
        self._partial: dict[str, tuple[int, Any]] = {}  # key -> (rows hashed so far, hasher)
        self._done: dict[str, str] = {}
        self._lock = threading.Lock()

    def feed(self, key: str, rows: tuple[int, int] | None, tensor: torch.Tensor) -> None:
        """Hash ``tensor`` (tensor ``key``, or its rows ``[a, b)``) if it continues where ``key`` stands."""
        if self.known is not None:
            return
        with self._lock:
            if key in self._done:
                return
            shape = self.index.info(key).shape
            first, last = (0, shape[0] if shape else 1) if rows is None or not shape else rows
            hashed, h = self._partial.get(key, (0, None))
            if first != hashed:
                return
            h = h or hashlib.sha256()
            if tensor.numel():
                h.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            total = shape[0] if shape else 1
            if last >= total:
                self._partial.pop(key, None)
                self._done[key] = h.hexdigest()
            else:
                self._partial[key] = (last, h)

    def hexdigest(self) -> str:
        """``sha256:`` and the first 16 hex digits of the digest over all tensors (reading any not yet hashed)."""
        if self.known is not None:
            return self.known
        for key in self.index.keys():
            if key in self._done:
                continue
            info = self.index.info(key)
            with self._lock:
                self._partial.pop(key, None)  # a tensor left half-hashed starts again from its first row
            for rows in iter_row_chunks(info.shape, itemsize(info.dtype), 64 << 20):
                self.feed(key, rows, self.index.read(key, rows))  # a Checkpoint's read() feeds too: the repeat is ignored
        h = hashlib.sha256()
        for key in sorted(self._done):
            info = self.index.info(key)
            h.update(f"{key}\0{info.dtype}\0{list(info.shape)}\0{self._done[key]}\n".encode())
        self.known = FINGERPRINT_SCHEME + h.hexdigest()[:16]
        return self.known


def is_content_digest(fingerprint: str) -> bool:
    """Whether a recorded fingerprint is a :class:`ContentDigest` (not a commit hash or a legacy one)."""
    return fingerprint.startswith(FINGERPRINT_SCHEME)


def legacy_fingerprint(checkpoint: Checkpoint) -> str:
    """What hf-contmerge 0.1 recorded for a local folder (without the ``sha256:`` scheme): every file's size
    and header plus five 64 KiB samples. Only used to recognise the base of a step written by it on resume."""
    h = hashlib.sha256()
    paths = sorted({checkpoint.file_of(k) for k in checkpoint.keys()})
    for path in paths:
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(f.read(min(n, 1 << 24)) if path.suffix == ".safetensors" else b"")
            for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
                f.seek(max(0, int(size * frac) - (1 << 16)))
                h.update(f.read(1 << 16))
    return h.hexdigest()[:16]
