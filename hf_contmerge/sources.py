"""Where models come from: local folders or Hub repos, read one tensor at a time.

A *source* is written ``PATH`` (an existing local folder) or ``ORG/NAME[@REVISION]`` (a Hub repo,
fetched with ``huggingface_hub.snapshot_download``: only weights, configs and tokenizer files,
honouring ``HF_HUB_OFFLINE`` and the usual cache). The resolved commit hash is recorded so a card
and a resume can say exactly what went in. Local folders get a content fingerprint instead.

A :class:`Checkpoint` answers ``keys()``, ``info(key)`` (shape and dtype from the headers alone) and
``read(key, rows)``; it never holds a whole model. Pickle checkpoints (``*.bin``) are refused unless
the user opts in (``--allow-pickle``), since unpickling runs code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ContMergeError
from .safetensors_io import DTYPE_NAMES, SafetensorsFile, TensorInfo

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_SINGLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"
# Files a merged folder needs besides weights; fetched from the Hub and copied from the base.
# Never code (*.py): loading it would need trust_remote_code.
SIDE_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


@dataclass(frozen=True)
class SourceSpec:
    """A source as the user wrote it, split into location and optional revision."""

    text: str
    location: str
    revision: str | None
    is_local: bool

    @classmethod
    def parse(cls, text: str) -> SourceSpec:
        expanded = os.path.expanduser(text)
        if os.path.isdir(expanded):
            return cls(text, str(Path(expanded).resolve()), None, True)
        if os.path.exists(expanded):
            raise ContMergeError(f"Source {text!r} is a file; give the folder that holds the model.")
        location, _, revision = text.partition("@")
        looks_local = text.startswith((".", "/", "~")) or os.sep in location.strip("/").replace("/", "", 1)
        if looks_local or not REPO_ID.match(location):
            raise ContMergeError(
                f"Source {text!r} is neither an existing folder nor a Hub repo id (ORG/NAME[@REVISION]). "
                "Check the path, or the spelling of the repo id."
            )
        return cls(text, location, revision or None, False)


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


class Checkpoint(TensorIndex):
    """The weights of one model folder: safetensors (single or sharded), or opted-in pickles."""

    def __init__(self, folder: Path, files: list[SafetensorsFile] | None = None, pickles: list[Path] | None = None):
        self.folder = folder
        self._files = files or []
        self._pickles = pickles or []
        self._pickle_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        self._where: dict[str, SafetensorsFile | Path] = {}
        self._info: dict[str, TensorInfo] = {}
        for f in self._files:
            for key, info in sorted(f.tensors.items(), key=lambda kv: kv[1].start):
                self._where[key], self._info[key] = f, info
        for p in self._pickles:
            for key, t in self._load_pickle(p).items():
                self._where[key] = p
                self._info[key] = TensorInfo(DTYPE_NAMES[t.dtype], tuple(t.shape), 0, t.numel() * t.element_size())

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
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise ContMergeError(f"{path} could not be read as a PyTorch checkpoint ({e}). Re-save it.") from None

    def file_of(self, key: str) -> Path:
        where = self._where[key]
        return where.path if isinstance(where, SafetensorsFile) else where

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        where = self._where[key]
        if isinstance(where, SafetensorsFile):
            return where.read(key, rows)
        if self._pickle_cache is None or self._pickle_cache[0] != where:
            self._pickle_cache = (where, self._load_pickle(where))
        t = self._pickle_cache[1][key]
        return (t if rows is None or t.dim() == 0 else t[rows[0] : rows[1]]).clone()

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._pickle_cache = None


def _index_files(index: Path, label: str) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ContMergeError(f"{index} in {label} is not a valid shard index ({e}). Re-download or re-save it.") from None
    names = sorted(set(weight_map.values()))
    for name in names:
        if Path(name).name != name or name in (".", ".."):
            raise ContMergeError(f"{index} in {label} names a shard outside its folder ({name!r}); refusing it.")
        if not (index.parent / name).is_file():
            raise ContMergeError(
                f"{label}: shard {name} listed in {index.name} is missing. The download is incomplete: fetch it again."
            )
    return names


@dataclass
class ResolvedSource:
    """A source fetched (if remote) and opened, with what identifies it exactly."""

    spec: SourceSpec
    folder: Path
    kind: str  # "full" or "lora"
    revision: str | None  # commit hash for Hub sources
    fingerprint: str
    config: dict = field(default_factory=dict)
    checkpoint: TensorIndex | None = None
    download_bytes: int = 0  # weights still to be fetched (lazy Hub sources)

    def ensure_local(self) -> Path:
        """Download a lazily resolved Hub checkpoint now (pinned to its pre-flight commit); its folder."""
        if isinstance(self.checkpoint, RemoteCheckpoint):
            self.checkpoint.fetch()
            self.folder = self.checkpoint.folder
        return self.folder

    def identity(self) -> dict[str, str | None]:
        """What the state file and the card record about this source (never a token)."""
        return {"source": self.spec.text, "kind": self.kind, "revision": self.revision, "fingerprint": self.fingerprint}

    def close(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint.close()


@contextmanager
def hub_errors(spec: SourceSpec) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one clear message (never echoing a token)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError:
        raise ContMergeError(f"{spec.text} is gated: accept its terms on the Hub and pass --token (or log in).") from None
    except RepositoryNotFoundError:
        raise ContMergeError(
            f"{spec.text!r} is not a local folder, and Hub repo {spec.location} was not found (or is private). "
            "Check the path or the id, or pass --token / log in."
        ) from None
    except RevisionNotFoundError:
        raise ContMergeError(f"Revision {spec.revision!r} of {spec.location} does not exist. Check the branch/tag/commit.") from None
    except LocalEntryNotFoundError:
        raise ContMergeError(
            f"{spec.text} is not in the local Hub cache and the Hub cannot be reached (offline?). "
            "Download it first, unset HF_HUB_OFFLINE, or give a local folder."
        ) from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "")
        raise ContMergeError(f"Fetching {spec.text} from the Hub failed ({e.__class__.__name__} {status}). Try again later.") from None


def fetch(spec: SourceSpec, *, token: str | None = None, allow_pickle: bool = False, revision: str | None = None) -> tuple[Path, str | None]:
    """The local folder for ``spec`` (downloaded weights, configs, tokenizer) and its commit hash."""
    if spec.is_local:
        return Path(spec.location), None
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", *SIDE_PATTERNS] + (["*.bin"] if allow_pickle else [])
    with hub_errors(spec):
        folder = Path(snapshot_download(spec.location, revision=revision or spec.revision, allow_patterns=patterns, token=token))
    # snapshot_download returns .../snapshots/<commit hash>
    return folder, folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else None


class RemoteCheckpoint(TensorIndex):
    """A Hub checkpoint known from its safetensors headers alone; weights are fetched on first read.

    The pre-flight of a whole stream needs only names, shapes and dtypes, which
    ``get_safetensors_metadata`` reads with HTTP range requests. The download happens when the
    item's step starts, pinned to the commit resolved in the pre-flight, and what arrives must
    match the headers the pre-flight saw.
    """

    def __init__(self, spec: SourceSpec, sha: str, tensors: dict[str, TensorInfo], token: str | None, allow_pickle: bool):
        self.spec, self.sha, self._info = spec, sha, tensors
        self._token, self._allow_pickle = token, allow_pickle
        self._real: Checkpoint | None = None
        self.folder: Path | None = None

    def fetch(self) -> Checkpoint:
        if self._real is None:
            self.folder, _ = fetch(self.spec, token=self._token, allow_pickle=self._allow_pickle, revision=self.sha)
            real = Checkpoint.open(self.folder, allow_pickle=self._allow_pickle, label=f"stream item {self.spec.text!r}")
            changed = [k for k in self._info if k not in real or (real.info(k).shape, real.info(k).dtype)
                       != (self._info[k].shape, self._info[k].dtype)] + [k for k in real.keys() if k not in self._info]
            if changed:
                raise ContMergeError(
                    f"{self.spec.text} at {self.sha[:12]} does not match its own headers read in the pre-flight "
                    f"(tensor {changed[0]!r}); the download is damaged. Delete it from the Hub cache and run again with --resume."
                )
            self._real = real
        return self._real

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.fetch().read(key, rows)

    def file_of(self, key: str) -> Path:
        return self.fetch().file_of(key)

    def close(self) -> None:
        if self._real is not None:
            self._real.close()


def remote_metadata(spec: SourceSpec, token: str | None) -> tuple[str, dict[str, int]]:
    """Commit hash and file sizes of a Hub source, without downloading anything large."""
    from huggingface_hub import HfApi

    with hub_errors(spec):
        info = HfApi(token=token).model_info(spec.location, revision=spec.revision, files_metadata=True)
    return info.sha, {f.rfilename: f.size or 0 for f in info.siblings or []}


def fingerprint(checkpoint: Checkpoint) -> str:
    """A cheap content fingerprint: every file's size and header plus sampled data blocks.

    Hashing every byte of a 7B model would cost as much as the merge; the header (names, shapes,
    offsets) plus 64 KiB samples at fixed positions catches a different or re-trained model.
    """
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


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ContMergeError(f"{path} is not valid JSON ({e}). Re-download or re-save the model.") from None


def resolve(
    text: str, *, token: str | None = None, allow_pickle: bool = False, role: str = "source", base: ResolvedSource | None = None,
    lazy: bool = False,
) -> ResolvedSource:
    """Parse, fetch and open one source; raise :class:`ContMergeError` for anything unusable.

    A PEFT LoRA adapter folder (``adapter_config.json``) is opened over ``base`` (``lora_source.py``):
    it answers the base's tensors plus its ``s·B@A`` deltas, and records kind ``lora``. With
    ``lazy``, a Hub checkpoint is known from its headers only (:class:`RemoteCheckpoint`) until its
    tensors are first read.
    """
    spec = SourceSpec.parse(text)
    label = f"{role} {text!r}"
    if lazy and not spec.is_local:
        sha, files = remote_metadata(spec, token)
        weights = [n for n in files if n.endswith(".safetensors") and "/" not in n and n.startswith("model")]
        if weights and ADAPTER_CONFIG not in files:
            from huggingface_hub import get_safetensors_metadata, hf_hub_download

            with hub_errors(spec):
                meta = get_safetensors_metadata(spec.location, revision=sha, token=token)
                config = json.loads(Path(hf_hub_download(spec.location, "config.json", revision=sha, token=token)).read_text()) \
                    if "config.json" in files else {}
            tensors: dict[str, TensorInfo] = {}
            for file_meta in meta.files_metadata.values():
                for key, t in file_meta.tensors.items():
                    begin, end = t.data_offsets
                    tensors[key] = TensorInfo(t.dtype, tuple(t.shape), begin, end)
            checkpoint = RemoteCheckpoint(spec, sha, tensors, token, allow_pickle)
            source = ResolvedSource(spec, Path(), "full", sha, sha[:16], config, checkpoint)
            source.download_bytes = sum(files[n] for n in weights)
            return source
    folder, revision = fetch(spec, token=token, allow_pickle=allow_pickle)
    if (folder / ADAPTER_CONFIG).is_file() and not (folder / SAFE_SINGLE).is_file() and not (folder / SAFE_INDEX).is_file():
        if base is None:
            raise ContMergeError(f"{label} is a PEFT adapter; adapters are stream items, not a base. Give a full model as --base.")
        from .lora_source import adapter_fingerprint, open_adapter

        location = None if base.spec.is_local else base.spec.location
        checkpoint = open_adapter(folder, label, base.ensure_local(), location, base.checkpoint, allow_pickle)
        return ResolvedSource(spec, folder, "lora", revision, adapter_fingerprint(folder), dict(base.config), checkpoint)
    checkpoint = Checkpoint.open(folder, allow_pickle=allow_pickle, label=label)
    return ResolvedSource(spec, folder, "full", revision, revision[:16] if revision else fingerprint(checkpoint),
                          read_config(folder), checkpoint)
