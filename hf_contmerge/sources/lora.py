"""A PEFT LoRA adapter as a stream item: the base plus ``s·B@A``, one tensor (or row range) at a time.

The engine asks a stream item for tensors by the base's file names; this checkpoint answers
``base + s·B@A`` for LoRA targets (rows ``[a, b)`` cost ``B[a:b] @ A``, never a full merged copy on
disk or in memory), the adapter's full tensor for ``modules_to_save``, and the base tensor itself
for everything else (task vector zero). So every method merges a LoRA stream exactly as it merges the
same fine-tunes given as merged full checkpoints. Adapter parsing and its refusals are in
``lora_adapter.py``; shapes are always checked against the base, and a declared base name against
``--base`` when both are Hub ids.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import ContMergeError
from ..io.checkpoint import Checkpoint, TensorIndex
from ..io.safetensors import TensorInfo
from .lora_adapter import AdapterError, LoraAdapter


class LoraCheckpoint(TensorIndex):
    """Checkpoint interface (``keys``, ``info``, ``read``) over a base checkpoint and an adapter."""

    def __init__(self, base: Checkpoint, adapter: LoraAdapter):
        self.base, self.adapter = base, adapter
        self._targets = set(adapter.target_file_keys())
        self._replaced = set(adapter.replacement_keys())
        self._factors: tuple[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None
        self._info = {k: base.info(k) for k in base.keys()}
        for k in self._replaced:
            shape = tuple(adapter.replacement_shape(k))
            n = int(torch.Size(shape).numel())
            self._info[k] = TensorInfo("F32", shape, 0, 4 * n)

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if key in self._replaced:
            t = self.adapter.replacement(key)
            return t if rows is None or t.dim() == 0 else t[rows[0] : rows[1]]
        base = self.base.read(key, rows)
        if key not in self._targets:
            return base
        if self._factors is None or self._factors[0] != key:  # slices of one tensor come in a row
            self._factors = (key, self.adapter.factors(key))
        b, a, s = self._factors[1]
        if rows is not None:
            b = b[rows[0] : rows[1]]
        return base.to(torch.float32) + s * (b @ a)

    def low_rank(self, key: str) -> int | None:
        if key in self._replaced:
            return None
        return self.adapter.rank(key) if key in self._targets else 0

    def low_rank_delta(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self._targets:
            info = self._info[key]
            return torch.zeros(info.shape[0], 0), torch.zeros(0, info.shape[1])
        b, a, s = self.adapter.factors(key)
        return b * s, a

    def close(self) -> None:
        self._factors = None  # the base checkpoint belongs to the base source


def open_adapter(folder: Path, label: str, base_folder: Path, base_location: str | None, base: Checkpoint,
                 allow_pickle: bool) -> LoraCheckpoint:
    """Open and check an adapter folder against the base; raise a clear error if it does not fit."""
    from transformers import AutoConfig

    try:
        base_config = AutoConfig.from_pretrained(base_folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ContMergeError(f"{label} is a LoRA adapter, which needs the base's config.json to place it ({e}).") from None
    try:
        adapter = LoraAdapter.from_dir(folder, base_config, allow_pickle=allow_pickle)
        adapter.verify_base_copies(lambda k: base.read(k))
    except AdapterError as e:
        raise ContMergeError(f"{label}: {e}") from None
    declared = adapter.declared_base()
    if declared and base_location and not Path(declared).exists() and declared.split("@")[0] != base_location:
        raise ContMergeError(
            f"{label} is a LoRA adapter for {declared!r}, but --base is {base_location!r}. Pass the base it was "
            "trained on, or, if it is the same model under another name, set base_model_name_or_path in its adapter_config.json."
        )
    return LoraCheckpoint(base, adapter)


def adapter_fingerprint(folder: Path) -> str:
    """Adapters are small: hash their config and weight files whole."""
    h = hashlib.sha256()
    for name in sorted(p.name for p in folder.iterdir() if p.name.startswith("adapter_")):
        h.update(name.encode())
        h.update((folder / name).read_bytes())
    return h.hexdigest()[:16]
