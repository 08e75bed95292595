"""The carried state of a method's weight slot, stored exactly in far fewer bytes (state format 3).

A method whose published weight *is* one of its float32 slots (``Method.carried_weight_slot``, ``merged``
for most: the published tensor is that slot rounded to the output dtype) does not need the slot
written in full beside the weights:

- **float32 output**: the published tensor is the slot, bit for bit; nothing more is written
  (encoding ``weight``).
- **bfloat16 output**: the published tensor is the slot rounded to nearest-even, i.e. its top 16
  bits, plus one when the dropped half rounded up. The int32 difference of the two bit patterns,
  ``d = bits(slot) − bits(float32(published))``, lies in [−32768, 32768] (rounding moves at most half
  a bfloat16 step), so an int16 tensor ``low16-{slot}`` holds it. The two ends share one int16 code,
  −32768: both are exact ties (dropped half = 0x8000), rounded down to an even value (+32768) or up
  to it (−32768), which the published value cannot tell apart. The ties rounded down go to
  ``ties-{slot}``, per tensor and only when there are any: their flat indices (int64) while they are
  few (random low bits: one element in 65536), else a bitmask of the flattened tensor (uint8, 1 bit a
  parameter: the running mean of two bfloat16 models is such a case, a tie wherever their last bits
  differ); the reader adds 65536 there. 4 bytes per parameter in all (2 published + 2) instead of 6,
  at most 4.125 when ties abound.
- float16 output (a wider exponent: no bit relation), other slots (MagMax's τmax, Fisher sums) and
  ``--allow-nonfinite`` runs keep the float32 file ``{slot}``.

Reading is exact for every encoding (:class:`CompactSlot`); a step of state format 2 (float32
throughout) is read as before.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..io.checkpoint import Checkpoint, TensorIndex
from ..io.safetensors import TensorInfo
from .layout import LEFT, LOWRANK_PREFIX, STATE_DIR

LOW16_PREFIX = "low16-"
TIES_PREFIX = "ties-"
TIE = -32768  # the int16 code shared by the two exact ties (see the module docstring)


CHUNK = 1 << 22  # elements per block: int32 temporaries of 16 MB, not of a whole 32000 x 4096 lm_head


def encode_low16(state: torch.Tensor, published: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``state`` (float32) against ``published`` (its bfloat16 rounding): the int16 difference of their
    bit patterns and the flat indices (plus ``offset``, the slice's first element in its tensor) of the
    ties rounded down. Raises if ``published`` is not ``state`` rounded (a method's broken promise)."""
    bits, top = state.contiguous().view(torch.int32).reshape(-1), published.contiguous().view(torch.int16).reshape(-1)
    low = torch.empty(bits.shape, dtype=torch.int16, device=bits.device)
    ties = []
    for a in range(0, bits.numel(), CHUNK):
        d = top[a : a + CHUNK].to(torch.int32).bitwise_left_shift_(16)
        torch.sub(bits[a : a + CHUNK], d, out=d)
        if int(d.min()) < -32768 or int(d.max()) > 32768:
            raise RuntimeError("internal: the published weight is not the carried slot rounded to bfloat16")
        down = d == 32768
        if bool(down.any()):
            ties.append(down.nonzero().flatten() + (a + offset))
            d.masked_fill_(down, TIE)
        low[a : a + CHUNK] = d
    found = torch.cat(ties) if ties else torch.zeros(0, dtype=torch.int64, device=bits.device)
    return low.view(state.shape), found


def decode_low16(published: torch.Tensor, low: torch.Tensor, ties: torch.Tensor) -> torch.Tensor:
    """The float32 state from the published bfloat16 tensor, its int16 low bits and the flat indices
    (in this slice) of its ties rounded down."""
    top, rest = published.contiguous().view(torch.int16).reshape(-1), low.reshape(-1)
    bits = torch.empty(top.shape, dtype=torch.int32)
    for a in range(0, top.numel(), CHUNK):
        block = bits[a : a + CHUNK]
        block.copy_(top[a : a + CHUNK]).bitwise_left_shift_(16).add_(rest[a : a + CHUNK])
    if ties.numel():
        bits[ties] += 65536
    return bits.view(torch.float32).view(published.shape)


def pack_ties(indices: torch.Tensor, numel: int) -> torch.Tensor:
    """A tensor's ties rounded down as stored: their sorted flat ``indices`` (int64) while that is smaller
    than a bitmask of the tensor (uint8, bit i of byte j for element 8j + i), else the bitmask."""
    if indices.numel() * 64 <= numel:
        return indices
    bits = torch.zeros(-(-numel // 8) * 8, dtype=torch.uint8)
    bits[indices] = 1
    return (bits.view(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def ties_between(stored: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The ties of flat elements [start, stop) of a tensor, as indices from ``start`` (``stored``: see
    :func:`pack_ties`)."""
    if stored.dtype == torch.uint8:
        first = start // 8
        chunk = stored[first : -(-stop // 8)]
        bits = ((chunk[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()
        return bits[start - 8 * first : stop - 8 * first].nonzero().flatten()
    lo, hi = torch.searchsorted(stored, torch.tensor([start, stop])).tolist()
    return stored[lo:hi] - start


def open_optional(folder: Path, prefix: str, label: str) -> Checkpoint | None:
    """The checkpoint ``{prefix}.safetensors`` (or its index) in ``folder``, or None when there is none."""
    if (folder / f"{prefix}.safetensors").is_file() or (folder / f"{prefix}.safetensors.index.json").is_file():
        return Checkpoint.open(folder, prefix=prefix, label=label)
    return None


class CompactSlot(TensorIndex):
    """A step's carried slot, float32, whatever its encoding: the float32 file, or the published weights
    (``weight``: a float32 published tensor in neither file), or those plus the low bits and ties
    (``low16``). ``is_weight``: the slot is the method's weight slot (state format 3 records it)."""

    def __init__(self, step_folder: Path, slot: str, is_weight: bool):
        folder, label = Path(step_folder) / STATE_DIR, f"carried state {slot!r} of {step_folder}"
        self.full = Checkpoint.open(folder, prefix=slot, label=label)
        self.low = open_optional(folder, LOW16_PREFIX + slot, label) if is_weight else None
        self.ties = open_optional(folder, TIES_PREFIX + slot, label) if is_weight else None
        self.weights = Checkpoint.open(Path(step_folder), label=f"published weights of {step_folder}") if is_weight else None
        self._info = dict(self.full._info)
        self._encoding: dict[str, str] = {}
        factored = open_optional(folder, LOWRANK_PREFIX + slot, label) if is_weight else None
        apart = set(factored.keys()) if factored is not None else set()  # KEY::left of the tensors carried as factors
        if factored is not None:
            factored.close()
        for key in self.weights.keys() if self.weights is not None else ():
            info = self.weights.info(key)
            if key in self._info or key + LEFT in apart or not (info.dtype == "F32" or (self.low is not None and key in self.low)):
                continue
            self._encoding[key] = "low16" if self.low is not None and key in self.low else "weight"
            self._info[key] = TensorInfo("F32", tuple(info.shape), 0, 4 * math.prod(tuple(info.shape)))
        self._tie_cache: tuple[str, torch.Tensor] | None = None

    def encoding(self, key: str) -> str:
        return self._encoding.get(key, "float32")

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        kind = self.encoding(key)
        if kind == "float32":
            return self.full.read(key, rows)
        published = self.weights.read(key, rows)
        if kind == "weight":
            return published.to(torch.float32)
        shape = self._info[key].shape
        per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
        start, stop = (0, math.prod(shape)) if rows is None or not shape else (rows[0] * per_row, rows[1] * per_row)
        return decode_low16(published, self.low.read(key, rows), ties_between(self._ties(key), start, stop))

    def _ties(self, key: str) -> torch.Tensor:
        if self._tie_cache is None or self._tie_cache[0] != key:  # a tensor's slices are read one after another
            found = self.ties.read(key) if self.ties is not None and key in self.ties else torch.zeros(0, dtype=torch.int64)
            self._tie_cache = (key, found)
        return self._tie_cache[1]

    def close(self) -> None:
        for ck in (self.full, self.low, self.ties, self.weights):
            if ck is not None:
                ck.close()
