"""The factory over every kind of source: a text as the user wrote it -> an opened :class:`ResolvedSource`.

Kinds: a local folder or a Hub repo (``io/remote.py``), holding a full checkpoint (``io/checkpoint.py``,
safetensors single or sharded, pickles only when allowed) or a PEFT LoRA adapter (``lora.py``: the
base plus ``s·B@A``). What identifies the source exactly (the resolved commit hash, or for a local
folder the sha256 of every tensor) is recorded, so a card and a resume can say what went in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ContMergeError
from ..io import schemas
from ..io.checkpoint import ADAPTER_CONFIG, SAFE_INDEX, SAFE_SINGLE, Checkpoint, TensorIndex
from ..io.remote import RemoteCheckpoint, SourceSpec, fetch, hub_errors, remote_metadata
from ..io.safetensors import TensorInfo


@dataclass
class ResolvedSource:
    """A source fetched (if remote) and opened, with what identifies it exactly."""

    spec: SourceSpec
    folder: Path
    kind: str  # "full" or "lora"
    revision: str | None  # commit hash for Hub sources
    known_fingerprint: str | None  # None: the content digest of a local checkpoint, complete once it was read
    config: dict = field(default_factory=dict)
    checkpoint: TensorIndex | None = None
    download_bytes: int = 0  # weights still to be fetched (lazy Hub sources)

    def ensure_local(self) -> Path:
        """Download a lazily resolved Hub checkpoint now (pinned to its pre-flight commit); its folder."""
        if isinstance(self.checkpoint, RemoteCheckpoint):
            self.checkpoint.fetch()
            self.folder = self.checkpoint.folder
        return self.folder

    @property
    def fingerprint(self) -> str:
        """What identifies the content: the commit hash (Hub), the adapter files' hash (LoRA), or for a local
        checkpoint the sha256 of every tensor (``ContentDigest``, fed by the merge's own reads; asking
        before a step has read the tensors reads them now)."""
        if self.known_fingerprint is not None:
            return self.known_fingerprint
        if not isinstance(self.checkpoint, Checkpoint):
            raise TypeError(f"internal: {self.spec.text} has neither a known fingerprint nor a local checkpoint")
        return self.checkpoint.fingerprint()

    @property
    def fingerprint_ready(self) -> bool:
        """Whether :attr:`fingerprint` is known without reading the tensors (a commit, or a cached digest)."""
        digest = self.checkpoint.digest if isinstance(self.checkpoint, Checkpoint) else None
        return self.known_fingerprint is not None or (digest is not None and digest.known is not None)

    def identity(self) -> dict[str, str | None]:
        """What the state file and the card record about this source (never a token)."""
        return {"source": self.spec.text, "kind": self.kind, "revision": self.revision, "fingerprint": self.fingerprint}

    def close(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint.close()


def read_config(folder: Path, label: str = "") -> dict:
    """The folder's ``config.json`` (``{}`` when it has none), validated (``io/schemas.py``)."""
    path = folder / "config.json"
    if not path.is_file():
        return {}
    return _config(schemas.read_json(path, f"{label or 'model'}: config", _CONFIG_FIX), path, label)


_CONFIG_FIX = "Re-download the model, or re-save it with save_pretrained."


def _config(data: object, path: Path | str, label: str) -> dict:
    schemas.validate(schemas.ModelConfig, data, f"{label or 'model'}: config", path, _CONFIG_FIX)
    return dict(data)  # type: ignore[call-overload]  # validated as an object above


def refuse_remote_code(config: dict, label: str) -> dict:
    """A model whose config names its own code (``auto_map``: ``configuration_*.py``/``modeling_*.py``
    shipped with it) is refused: hf-contmerge never runs code from a model folder or repo, and never
    lets transformers ask whether to (every loader gets ``trust_remote_code=False``)."""
    if isinstance(config, dict) and config.get("auto_map"):
        names = ", ".join(sorted(config["auto_map"])) if isinstance(config["auto_map"], dict) else "auto_map"
        raise ContMergeError(
            f"{label} needs custom code: its config.json maps {names} to Python files of its own (auto_map). "
            "hf-contmerge never runs code from a model, so it cannot build or check this architecture. Use a "
            "model whose architecture transformers itself defines. Nothing was written."
        )
    return config


def resolve(
    text: str, *, token: str | None = None, allow_pickle: bool = False, role: str = "source", base: ResolvedSource | None = None,
    lazy: bool = False,
) -> ResolvedSource:
    """Parse, fetch and open one source; raise :class:`ContMergeError` for anything unusable.

    A PEFT LoRA adapter folder (``adapter_config.json``) is opened over ``base`` (``lora.py``):
    it answers the base's tensors plus its ``s·B@A`` deltas, and records kind ``lora``. With
    ``lazy``, a Hub checkpoint is known from its headers only (:class:`RemoteCheckpoint`) until its
    tensors are first read.
    """
    spec = SourceSpec.parse(text)
    label = f"{role} {text!r}"
    if lazy and not spec.is_local and not spec.cache_only:  # offline: no metadata call, fetch() returns the cached snapshot
        sha, files = remote_metadata(spec, token)
        weights = [n for n in files if n.endswith(".safetensors") and "/" not in n and n.startswith("model")]
        if weights and ADAPTER_CONFIG not in files:
            from huggingface_hub import get_safetensors_metadata, hf_hub_download

            with hub_errors(spec):
                meta = get_safetensors_metadata(spec.location, revision=sha, token=token)
                config_path = Path(hf_hub_download(spec.location, "config.json", revision=sha, token=token)) \
                    if "config.json" in files else None
            config = _config(schemas.read_json(config_path, f"{label}: config", _CONFIG_FIX), f"{spec.text}/config.json", label) \
                if config_path else {}
            tensors: dict[str, TensorInfo] = {}
            for file_meta in meta.files_metadata.values():
                for key, t in file_meta.tensors.items():
                    begin, end = t.data_offsets
                    tensors[key] = TensorInfo(t.dtype, tuple(t.shape), begin, end)
            checkpoint = RemoteCheckpoint(spec, sha, tensors, token, allow_pickle)
            source = ResolvedSource(spec, Path(), "full", sha, sha[:16], refuse_remote_code(config, label), checkpoint)
            source.download_bytes = sum(files[n] for n in weights)
            return source
    folder, revision = fetch(spec, token=token, allow_pickle=allow_pickle)
    if (folder / ADAPTER_CONFIG).is_file() and not (folder / SAFE_SINGLE).is_file() and not (folder / SAFE_INDEX).is_file():
        if base is None:
            raise ContMergeError(f"{label} is a PEFT adapter; adapters are stream items, not a base. Give a full model as --base.")
        from .lora import adapter_fingerprint, open_adapter  # PEFT and transformers' model classes: only for adapters

        location = None if base.spec.is_local else base.spec.location
        checkpoint = open_adapter(folder, label, base.ensure_local(), location, base.checkpoint, allow_pickle)
        return ResolvedSource(spec, folder, "lora", revision, adapter_fingerprint(folder), dict(base.config), checkpoint)
    config = refuse_remote_code(read_config(folder, label), label)
    checkpoint = Checkpoint.open(folder, allow_pickle=allow_pickle, label=label)
    if not revision:
        checkpoint.fingerprinted()  # a local folder: identified by its content
    return ResolvedSource(spec, folder, "full", revision, revision[:16] if revision else None, config, checkpoint)
