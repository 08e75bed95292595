"""The carried state of a method's weight slot, stored exactly in far fewer bytes (state format 5).

A method whose published weight *is* one of its float32 slots (``Method.carried_weight_slot``, ``merged``
for most: the published tensor is that slot rounded to the output dtype) does not need the slot
written in full beside the weights:

- **float32 output**: the published tensor is the slot, bit for bit; nothing more is written
  (encoding ``weight``).
- **bfloat16 output**: the published tensor is the slot rounded to nearest-even, i.e. its top 16
  bits, plus one when the dropped half rounded up. The int32 difference of the two bit patterns,
  ``d = bits(slot) − bits(float32(published))``, lies in [−32768, 32768] (rounding moves at most half
  a bfloat16 step), so an int16 code holds it. The two ends share one int16 code, −32768: both are
  exact ties (dropped half = 0x8000), rounded down to an even value (+32768) or up to it (−32768),
  which the published value cannot tell apart. The ties rounded down go to ``ties-{slot}``, per tensor
  and only when there are any: their flat indices (int64) while they are few (random low bits: one
  element in 65536), else a bitmask of the flattened tensor (uint8, 1 bit a parameter: the running
  mean of two bfloat16 models is such a case, a tie wherever their last bits differ); the reader adds
  65536 there.
- **The low bits compressed** (``--state-compression zstd``, the default): each slice the engine writes is
  one zstd frame (level 1, with a checksum) of its int16 codes palette-coded (format 5), the uint8 tensor
  ``KEY::pal16[a:b]`` of ``low16-{slot}`` for flat elements [a, b). The codes of a merge of bfloat16 models
  are far from random: a task vector of bfloat16 models is a small multiple of the base's last bit, so a
  scaled sum of a few has few distinct low halves, and a scaling such as 0.3 or the mean's 1/t repeats
  its binary digits. In a 4-million-element slice of the benchmark's task-arithmetic states
  (bench_stream.py) 5 000–10 000 distinct codes occur and the 255 most frequent make up 97–99 % of them:
  their order-0 entropy is 5–6 bits of the 16 (benchmarks/RESULTS.md). A frame therefore holds the
  block's **palette** (its 255 most frequent codes, counted on a sample of 2^18 of them, most frequent
  first, int16), each code as its index in the palette (a byte; 255 for a code outside it) and the
  escaped codes in order (int16); zstd's entropy coder then sees bytes, the unit it codes, rather than
  pairs of bytes it cannot relate: 0.32–0.38 of the codes' bytes for task arithmetic where zstd on the
  codes themselves (format 4, ``KEY::low16[a:b]``, read as before) gave 0.52–0.60, in less compression
  time (bench_codec.py: 1.8 against 2.6–4.0 ns an element; the palette is 0.85 of it, one pass of
  codec.c); on real fine-tunes in bfloat16, 0.17–0.19 against 0.28–0.31 (the running mean: 0.075–0.099
  against 0.100–0.133, in about the same time). Random codes stay at 2 bytes and ~1 %. Why zstd
  (``zstandard``, no dependencies of its own): its entropy coder is what these codes need (LZ4, without
  one, saves 5–12 %), at ~1.5 ns an element to decode. A step thus writes at most 4 bytes a parameter (2
  published + 2), at most 4.125 when ties abound, and ~2.5–2.9 in the benchmark's streams (1.27–1.44×
  the published bytes). ``--state-compression none`` writes the codes as they are, one int16 tensor
  ``KEY`` of ``low16-{slot}`` (format 3's layout, read the same way): 2 bytes a parameter and no CPU, for
  a fast local disk and few cores.
- **Compressed slots** (``Method.compressible_slots``: MagMax's τmax): slots that hold task-vector
  entries as they came, differences of the stored models, exact in float32 with as few significant
  bits as the models' dtype. Each slice is one zstd frame of the high halves of its bits, then the low
  halves (mostly zero for bfloat16 models), the uint8 tensor ``KEY::f32[a:b]`` of the slot's own file
  ``{slot}``, whose metadata records the tensors' shapes (``contmerge_shapes``): ~0.4 of the 4 bytes.
- float16 output (a wider exponent: no bit relation), other slots (Fisher sums: full float32
  mantissas) and ``--allow-nonfinite`` runs keep the float32 file ``{slot}``, as does every slot
  with ``--state-compression none``.

Reading is exact for every encoding (:class:`CompactSlot`); steps of state format 4 (zstd frames of the
plain codes), 3 (the int16 codes uncompressed, tensor ``KEY`` of ``low16-{slot}``) and 2 (float32
throughout) are read as before. A step encodes and decodes with :func:`encode_bf16` and
:func:`decode_state`, and palette-codes with :func:`palette`: one pass each of the compiled codec
(``codec.c``, built on first use: native.py) where the machine has a C compiler, else the torch ops below
(:func:`encode_low16`, :func:`decode_low16`, the tie packing, :func:`palette_torch`), which write the
same bytes.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import torch
import zstandard

from ..errors import ContMergeError
from ..io.checkpoint import Checkpoint, TensorIndex
from ..io.safetensors import TensorInfo, finite
from . import native
from .layout import LEFT, LOWRANK_PREFIX, STATE_DIR

LOW16_PREFIX = "low16-"
TIES_PREFIX = "ties-"
TIE = -32768  # the int16 code shared by the two exact ties (see the module docstring)
PALETTE = 255  # codes in a block's palette (state format 5); index ESCAPE marks a code outside it
ESCAPE = 255
PALETTE_SAMPLE_LOG = 18  # the palette is chosen on every (n >> 18)-th code of a block of n (codec.c says why)
_REMOVE = "Remove that step folder and resume from the one before."  # what a damaged step's reader says to do
_BLOCK = re.compile(r"^(.+)::(pal16|low16|f32)\[(\d+):(\d+)\]$")
SHAPES = "contmerge_shapes"  # metadata of a compressed float32 slot's files: the shape of each tensor (JSON)
# Level 1 with a smaller match table: the codes' gain is in the entropy coder more than in matches, and
# the table is what costs (hash_log 14 → 12: task arithmetic's codes 2× faster, 1.5 % larger). Worker
# threads on every core, each job 1 MiB: zstd's output is the same for any number of workers ≥ 1 (not
# for 0), so the bytes do not depend on the machine.
_ZSTD = zstandard.ZstdCompressionParameters.from_level(1, hash_log=12, write_checksum=True, threads=-1, job_size=1 << 20)


CHUNK = 1 << 22  # elements per block: int32 temporaries of 16 MB, not of a whole 32000 x 4096 lm_head
# bit i of a tie bitmask's byte j is element 8j + i: byte value -> its 8 elements (0/1)
_UNPACK = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).to(torch.uint8)
# 8 bytes of 0/1 read as one little-endian uint64 x: the top byte of x * _GATHER is their bitmask byte
# (bit i of it is byte i: the partial products have distinct bit positions, so nothing carries into it)
_GATHER = 0x0102040810204080


def encode_low16(state: torch.Tensor, published: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``state`` (float32) against ``published``, its bfloat16 rounding to nearest (the caller checks that
    ``published`` is ``state.to(torch.bfloat16)``): the int16 ``low16`` code, and the ties rounded down as a
    bool mask of the slice (:func:`pack_mask` packs them for :class:`TieCollector`, :func:`decode_low16` takes them).

    The code is the low half of the float32's bits as it stands: ``bits(state) − bits(float32(published))``
    is that half when rounding went down, and that half minus 65536 when it went up, which is what the half
    reads as int16 in both cases (a value rounds up exactly when its low half is 0x8000 or more, the tie
    0x8000 aside). A tie rounded down keeps the high half, so it is where the float32 is the published value
    plus 0x8000, bit for bit. Three passes over contiguous int32 (int32 → int16 wraps to the low half;
    bfloat16 → float32 is a shift; one compare into a bool mask) where the strided int16 views of the
    float32 halves copied element by element and took two compares more."""
    bits = state.contiguous().view(torch.int32)
    low = bits.to(torch.int16)
    tie_down = published.contiguous().to(torch.float32).view(torch.int32).add_(0x8000)
    return low, torch.eq(bits, tie_down)


def decode_low16(published: torch.Tensor, low: torch.Tensor, ties: torch.Tensor) -> torch.Tensor:
    """The float32 state from the published bfloat16 tensor, its int16 low bits and its ties rounded down:
    their flat indices in this slice (int64), or a 0/1 mask of the slice (bool or uint8)."""
    top, rest = published.contiguous().view(torch.int16).reshape(-1), low.reshape(-1)
    mask = ties.reshape(-1).view(torch.uint8) if ties.dtype in (torch.bool, torch.uint8) else None
    bits = torch.empty(top.shape, dtype=torch.int32)
    for a in range(0, top.numel(), CHUNK):
        block = bits[a : a + CHUNK].copy_(top[a : a + CHUNK])
        if mask is not None:  # a tie rounded down: the high half is one more than the code's default
            block.add_(mask[a : a + CHUNK])
        block.bitwise_left_shift_(16).add_(rest[a : a + CHUNK])
    if mask is None and ties.numel():
        bits[ties] += 65536
    return bits.view(torch.float32).view(published.shape)


def encode_bf16(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """``state`` (float32) as a step stores it for a bfloat16 output: its bfloat16 rounding (the published
    tensor, ``state``'s shape), the int16 low bits (flat), the ties rounded down as bitmask bytes of the
    slice (:func:`pack_mask`'s layout, on the CPU) and their count; None when a value is not finite or rounds
    to an infinity (the caller says which). One pass of the compiled codec (native.py) on the CPU, else
    :func:`encode_low16`'s torch ops: the same bits."""
    lib = native.library() if state.device.type == "cpu" else None
    if lib is None:
        return encode_bf16_torch(state)
    flat = state.contiguous().reshape(-1)
    published = torch.empty(state.shape, dtype=torch.bfloat16)
    low = torch.empty(flat.numel(), dtype=torch.int16)
    ties = torch.empty(-(-flat.numel() // 8), dtype=torch.uint8)
    count = lib.cm_encode(flat.data_ptr(), flat.numel(), published.data_ptr(), low.data_ptr(), ties.data_ptr())
    return None if count < 0 else (published, low, ties, count)


def encode_bf16_torch(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """:func:`encode_bf16` in torch ops, on any device (no compiler, or the state on a GPU)."""
    published = state.to(torch.bfloat16)
    if not finite(published):  # rounding keeps NaN and Inf, and makes Inf of overflows
        return None
    low, mask = encode_low16(state, published)
    mask = mask.cpu()
    return published, low.reshape(-1), pack_mask(mask), int(torch.count_nonzero(mask))


def decode_state(published: torch.Tensor, low: torch.Tensor, stored_ties: torch.Tensor, start: int) -> torch.Tensor:
    """The float32 state of flat elements [start, start + n) of a tensor from their published bfloat16 values
    (any shape: the result's), their int16 low bits and the tensor's ties as stored (:func:`pack_ties`). The
    compiled codec (native.py), else :func:`decode_low16`'s torch ops: the same bits."""
    stop = start + published.numel()
    bitmask = stored_ties.dtype == torch.uint8 and stored_ties.numel() > 0
    # what a damaged or foreign step could hold instead (the compiled codec reads raw buffers: sizes first)
    if (published.dtype != torch.bfloat16 or low.dtype != torch.int16 or low.numel() != published.numel()
            or (bitmask and stored_ties.numel() < -(-stop // 8))):
        raise ContMergeError(f"the low bits of a carried tensor do not fit its published weights ({low.dtype} x {low.numel()} "
                             f"for {published.dtype} x {published.numel()}, ties {stored_ties.dtype} x {stored_ties.numel()}): "
                             f"the step is damaged. {_REMOVE}")
    lib = native.library() if published.device.type == "cpu" else None
    if lib is None:
        return decode_low16(published, low, ties_between(stored_ties, start, stop))
    top, rest = published.contiguous(), low.contiguous()
    out = torch.empty(published.shape, dtype=torch.float32)
    lib.cm_decode(top.data_ptr(), rest.data_ptr(), stored_ties.data_ptr() if bitmask else None, start, top.numel(),
                  out.data_ptr())
    if not bitmask and stored_ties.numel():  # sparse ties: their indices
        out.view(-1).view(torch.int32)[ties_between(stored_ties, start, stop)] += 65536
    return out


def block_name(key: str, start: int, stop: int, kind: str = "pal16") -> str:
    """The name of the compressed block of flat elements [start, stop) of tensor ``key``: its low bits
    (``pal16``; ``low16`` in a format-4 step) or its float32 values (``f32``, a compressed slot)."""
    return f"{key}::{kind}[{start}:{stop}]"


def unit_span(shape: tuple[int, ...], rows: tuple[int, int] | None) -> tuple[int, int]:
    """The flat elements [start, stop) of a work unit's ``rows`` (None: the whole tensor) of ``shape``."""
    rows = rows if rows is not None and shape else (0, shape[0] if shape else 1)
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return rows[0] * per_row, rows[1] * per_row


def _zstd(data: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as one zstd frame (uint8) with the step's parameters (``_ZSTD``)."""
    frame = zstandard.ZstdCompressor(compression_params=_ZSTD).compress(data.contiguous().reshape(-1).view(torch.uint8).numpy())
    return torch.frombuffer(bytearray(frame), dtype=torch.uint8)


def _unzstd(frame: torch.Tensor, max_bytes: int, what: str) -> bytes:
    """The bytes of a frame of :func:`_zstd`, at most ``max_bytes``; a damaged one is refused (``what``)."""
    try:
        return zstandard.ZstdDecompressor().decompress(frame.contiguous().numpy(), max_output_size=max_bytes)
    except zstandard.ZstdError as e:
        raise ContMergeError(f"{what} is damaged ({e}). {_REMOVE}") from e


def compress_low16(low: torch.Tensor) -> torch.Tensor:
    """A slice's int16 codes as one zstd frame (uint8; state format 4, and :func:`compress_f32`'s halves)."""
    return _zstd(low)


def decompress_low16(frame: torch.Tensor, numel: int, what: str) -> torch.Tensor:
    """The ``numel`` int16 codes of a frame of :func:`compress_low16`; a damaged one is refused (``what``)."""
    raw = _unzstd(frame, 2 * numel, what)
    if len(raw) != 2 * numel:
        raise ContMergeError(f"{what} holds {len(raw) // 2} codes, expected {numel}: the step is damaged. {_REMOVE}")
    return torch.frombuffer(bytearray(raw), dtype=torch.int16) if numel else torch.zeros(0, dtype=torch.int16)


def palette(codes: torch.Tensor) -> torch.Tensor:
    """A block's int16 ``codes`` (flat) palette-coded, as the bytes a ``pal16`` frame holds (uint8): the
    palette (the :data:`PALETTE` codes most frequent in it, counted on every (n >> 18)-th, most frequent first,
    equal counts in ascending code order; int16), each code's index in it (a byte; :data:`ESCAPE` for a code outside it), then the escaped
    codes in order (int16). The compiled codec (native.py), else the torch ops of :func:`palette_torch`: the
    same bytes."""
    codes = codes.contiguous().reshape(-1)
    lib = native.library()
    if lib is None:
        return palette_torch(codes)
    n, head = codes.numel(), 2 * PALETTE + codes.numel()
    out = torch.empty(head + 2 * n, dtype=torch.uint8)  # the escapes' room is only touched where used
    escaped = torch.empty(n, dtype=torch.int16)
    count = lib.cm_palette(codes.data_ptr(), n, out.data_ptr(), out.data_ptr() + 2 * PALETTE, escaped.data_ptr())
    if count < 0:
        raise MemoryError("the palette of a block of low bits")
    out[head : head + 2 * count] = escaped[:count].view(torch.uint8)
    return out[: head + 2 * count]


def palette_torch(codes: torch.Tensor) -> torch.Tensor:
    """:func:`palette` in torch ops: a stable sort of the 65536 codes by descending count orders the table."""
    flat = codes.reshape(-1)
    at = flat.to(torch.int32) + 32768
    stride = max(1, at.numel() >> PALETTE_SAMPLE_LOG)
    order = torch.sort(torch.bincount(at[::stride], minlength=65536), descending=True, stable=True).indices[:PALETTE]
    lut = torch.full((65536,), ESCAPE, dtype=torch.uint8)
    lut[order] = torch.arange(PALETTE, dtype=torch.uint8)
    ranks = lut[at]
    parts = [(order - 32768).to(torch.int16).view(torch.uint8), ranks, flat[ranks == ESCAPE].view(torch.uint8)]
    return torch.cat(parts)


def unpalette(payload: torch.Tensor, numel: int, what: str) -> torch.Tensor:
    """The ``numel`` int16 codes of :func:`palette`'s bytes; bytes that do not fit (a size, escapes the
    indices do not call for) are refused (``what``)."""
    head = 2 * PALETTE + numel
    if payload.numel() < head or (payload.numel() - head) % 2:
        raise ContMergeError(f"{what} holds {payload.numel()} bytes, not the palette and indices of {numel} codes: the "
                             f"step is damaged. {_REMOVE}")
    table, ranks = payload[: 2 * PALETTE].view(torch.int16), payload[2 * PALETTE : head]
    escaped = payload[head:].clone().view(torch.int16)  # at an odd offset where numel is odd: copied, so aligned
    lib = native.library()
    if lib is None:
        codes = torch.cat([table, table.new_zeros(1)])[ranks.long()]
        out = ranks == ESCAPE
        wanted = int(out.sum())
        if wanted == escaped.numel():
            codes[out] = escaped
    else:
        codes = torch.empty(numel, dtype=torch.int16)
        wanted = lib.cm_unpalette(ranks.data_ptr(), numel, table.data_ptr(), escaped.data_ptr(), escaped.numel(),
                                  codes.data_ptr())
    if wanted != escaped.numel():
        raise ContMergeError(f"{what} calls for {wanted} codes outside its palette and holds {escaped.numel()}: "
                             f"the step is damaged. {_REMOVE}")
    return codes


def compress_codes(low: torch.Tensor) -> torch.Tensor:
    """A slice's int16 codes as one zstd frame of their :func:`palette` bytes (uint8, block kind ``pal16``;
    see the module docstring)."""
    return _zstd(palette(low))


def decompress_codes(frame: torch.Tensor, numel: int, what: str) -> torch.Tensor:
    """The ``numel`` int16 codes of a frame of :func:`compress_codes`; a damaged one is refused (``what``)."""
    raw = _unzstd(frame, 2 * PALETTE + 3 * numel, what)
    return unpalette(torch.frombuffer(bytearray(raw), dtype=torch.uint8), numel, what)


def compress_f32(values: torch.Tensor) -> torch.Tensor:
    """A slice of a compressed float32 slot as one zstd frame: the high halves of its bits, then the low
    halves (int16 each). Split so the coder sees the low halves together: a difference of two close
    bfloat16 values has few significant bits (8 and the gap of their exponents), so its low half is
    mostly zero."""
    bits = values.contiguous().reshape(-1).view(torch.int32)
    return compress_low16(torch.cat([bits.bitwise_right_shift(16).to(torch.int16), bits.to(torch.int16)]))


def decompress_f32(frame: torch.Tensor, numel: int, what: str) -> torch.Tensor:
    """The ``numel`` float32 values of a frame of :func:`compress_f32`; a damaged one is refused (``what``)."""
    halves = decompress_low16(frame, 2 * numel, what)
    bits = halves[:numel].to(torch.int32).bitwise_left_shift_(16)
    return bits.bitwise_or_(halves[numel:].to(torch.int32).bitwise_and_(0xFFFF)).view(torch.float32)


_DECODERS = {"pal16": decompress_codes, "low16": decompress_low16, "f32": decompress_f32}  # block kind -> decoder


def parse_block(name: str) -> tuple[str, str, int, int] | None:
    """A :func:`block_name`'s tensor key, kind and flat span [start, stop); None for another name."""
    m = _BLOCK.match(name)
    return None if m is None else (m[1], m[2], int(m[3]), int(m[4]))


def decode_block(name: str, frame: torch.Tensor, what: str) -> torch.Tensor:
    """The tensor a compressed block holds, flat (int16 codes or float32 values), decoded as its name's kind
    says; a damaged one is refused (``what``)."""
    _, kind, start, stop = parse_block(name)
    return _DECODERS[kind](frame, stop - start, what)


class BlockWriter:
    """Compressed blocks of a step (the weight slot's low bits, a compressed slot): each slice compressed as
    it is written (in the engine's writer thread, beside the kernels) and appended to ``real`` under its
    :func:`block_name`."""

    def __init__(self, real, kind: str = "low16"):
        self.real = real  # an appended StreamingWriter
        self.encode = compress_codes if kind == "low16" else compress_f32

    def write(self, name: str, chunk: torch.Tensor) -> None:
        self.real.write(name, self.encode(chunk))

    def close(self) -> list[Path]:
        return self.real.close()


def pack_ties(indices: torch.Tensor, numel: int) -> torch.Tensor:
    """A tensor's ties rounded down as stored: their sorted flat ``indices`` (int64) while that is smaller
    than a bitmask of the tensor (uint8, bit i of byte j for element 8j + i), else the bitmask."""
    return TieCollector(numel).add(indices, 0).stored()


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as bitmask bytes (bit i of byte j: element 8j + i), zero-padded to whole bytes."""
    flat = mask.reshape(-1).view(torch.uint8)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    elif flat.storage_offset() % 8 or not flat.is_contiguous():  # a uint64 view needs whole aligned words
        flat = flat.clone()
    if sys.byteorder != "little":  # the uint64 reading below is little-endian's
        return (flat.view(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)
    # unsigned arithmetic wraps, as defined; torch has no uint64 shift, so the top byte is read as a byte
    return (flat.view(torch.uint64) * _GATHER).view(torch.uint8).view(-1, 8)[:, 7].clone()


class TieCollector:
    """A tensor's ties rounded down, gathered slice by slice (in order) into what :func:`pack_ties` stores:
    indices while they are few, a bitmask from the slice on where they stop being so. Memory stays at most
    1/8 byte a parameter where int64 indices of a tensor with ties everywhere would take 8."""

    def __init__(self, numel: int):
        self.numel, self.count = numel, 0
        self.parts: list[torch.Tensor] = []
        self.bits: torch.Tensor | None = None

    def add(self, indices: torch.Tensor, offset: int) -> TieCollector:
        """The ties of the slice starting at flat element ``offset``: their sorted indices in the slice."""
        if not indices.numel():
            return self
        self.count += indices.numel()
        if self.bits is None and self.count * 64 <= self.numel:
            self.parts.append(indices + offset)
            return self
        if self.bits is None:
            self._to_bitmask()
        self._set(indices + offset)
        return self

    def add_packed(self, bits: torch.Tensor, count: int, offset: int) -> TieCollector:
        """The ties of the slice starting at flat element ``offset``, as :func:`encode_bf16` gives them: the
        slice's bitmask bytes and their ``count``. A slice starting on a whole byte ORs its bytes in (its
        padding bits are zero); one that does not, or while ties are few, goes by their indices."""
        if not count:
            return self
        if offset % 8 or (self.bits is None and (self.count + count) * 64 <= self.numel):
            return self.add(packed_indices(bits), offset)
        self.count += count
        if self.bits is None:
            self._to_bitmask()
        self.bits[offset // 8 : offset // 8 + bits.numel()] |= bits
        return self

    def _to_bitmask(self) -> None:
        self.bits = torch.zeros(-(-self.numel // 8), dtype=torch.uint8)
        if self.parts:
            self._set(torch.cat(self.parts))
        self.parts = []

    def _set(self, indices: torch.Tensor) -> None:
        # distinct bits of one byte add without a carry: O(ties), not O(numel)
        self.bits.index_add_(0, indices >> 3, torch.bitwise_left_shift(1, indices & 7).to(torch.uint8))

    def stored(self) -> torch.Tensor:
        if self.bits is not None:
            return self.bits
        return torch.cat(self.parts) if self.parts else torch.zeros(0, dtype=torch.int64)


def tie_mask(stored: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Flat elements [start, stop) of a tie bitmask (:func:`pack_ties`), one uint8 0/1 an element."""
    first = start // 8
    return _UNPACK[stored[first : -(-stop // 8)].long()].flatten()[start - 8 * first : stop - 8 * first]


def packed_indices(bits: torch.Tensor) -> torch.Tensor:
    """The sorted positions of the set bits of bitmask bytes (bit i of byte j: position 8j + i), scanning the
    bytes once and looking inside those that are not zero."""
    nz = bits.nonzero().flatten()
    at = (nz[:, None] * 8 + torch.arange(8)).flatten()
    return at[_UNPACK[bits[nz].long()].flatten().bool()]


def ties_between(stored: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The ties of flat elements [start, stop) of a tensor, as :func:`decode_low16` takes them for the
    slice (``stored``: see :func:`pack_ties`): indices from ``start``, or the bitmask's 0/1 mask."""
    if stored.dtype == torch.uint8:
        return tie_mask(stored, start, stop)
    lo, hi = torch.searchsorted(stored, torch.tensor([start, stop])).tolist()
    return stored[lo:hi] - start


def _blocks_by_key(names, *kinds: str) -> dict[str, list[tuple[int, int, str]]]:
    """The blocks of ``kinds`` among ``names`` (:func:`block_name`), by tensor: (start, stop, name) each."""
    found: dict[str, list[tuple[int, int, str]]] = {}
    for name in names:
        if (parsed := parse_block(name)) is not None and parsed[1] in kinds:
            found.setdefault(parsed[0], []).append((parsed[2], parsed[3], name))
    return found


def _tiling(spans: list[tuple[int, int, str]], numel: int, key: str, label: str) -> list[tuple[int, int, str]]:
    """A tensor's blocks in order, refused unless they tile its ``numel`` elements (a gap or an overlap
    is a damaged step)."""
    spans = sorted(spans)
    ends = [0] + [b for _, b, _ in spans]
    if [a for a, _, _ in spans] != ends[:-1] or ends[-1] != numel:
        raise ContMergeError(f"{label}: the blocks of {key!r} do not cover its {numel} elements: the step is damaged. "
                             + _REMOVE)
    return spans


def open_optional(folder: Path, prefix: str, label: str) -> Checkpoint | None:
    """The checkpoint ``{prefix}.safetensors`` (or its index) in ``folder``, or None when there is none."""
    if (folder / f"{prefix}.safetensors").is_file() or (folder / f"{prefix}.safetensors.index.json").is_file():
        return Checkpoint.open(folder, prefix=prefix, label=label)
    return None


class CompactSlot(TensorIndex):
    """A step's carried slot, float32, whatever its encoding: the float32 file, or the published weights
    (``weight``: a float32 published tensor in neither file), or those plus the low bits and ties
    (``low16``: compressed blocks, or one int16 tensor in a format-3 step), or compressed float32 blocks
    (``f32``: a slot of ``Method.compressible_slots``). ``is_weight``: the slot is the method's weight slot
    (state format 3 on records it)."""

    def __init__(self, step_folder: Path, slot: str, is_weight: bool):
        folder, label = Path(step_folder) / STATE_DIR, f"carried state {slot!r} of {step_folder}"
        self.label = label
        self.full = Checkpoint.open(folder, prefix=slot, label=label)
        self.low = open_optional(folder, LOW16_PREFIX + slot, label) if is_weight else None
        self.ties = open_optional(folder, TIES_PREFIX + slot, label) if is_weight else None
        self.weights = Checkpoint.open(Path(step_folder), label=f"published weights of {step_folder}") if is_weight else None
        self._info = dict(self.full._info)
        self._encoding: dict[str, str] = {}
        # the compressed low bits: palette-coded (format 5) or plain int16 (format 4) frames
        self._blocks = _blocks_by_key(self.low.keys() if self.low is not None else (), "pal16", "low16")
        # a compressed slot (Method.compressible_slots): its float32 tensors as blocks, shapes in the metadata
        self._f32 = _blocks_by_key(self._info, "f32")
        for spans in self._f32.values():
            for *_, name in spans:
                del self._info[name]
        if self._f32:
            shapes = {k: tuple(v) for f in self.full._files for k, v in json.loads(f.metadata.get(SHAPES, "{}")).items()}
            for key in self._f32:
                if key not in shapes:
                    raise ContMergeError(f"{label}: no shape recorded for {key!r}: the step is damaged. {_REMOVE}")
                self._info[key] = TensorInfo("F32", shapes[key], 0, 4 * math.prod(shapes[key]))
                self._f32[key] = _tiling(self._f32[key], math.prod(shapes[key]), key, label)
                self._encoding[key] = "f32"
        factored = open_optional(folder, LOWRANK_PREFIX + slot, label) if is_weight else None
        apart = set(factored.keys()) if factored is not None else set()  # KEY::left of the tensors carried as factors
        if factored is not None:
            factored.close()
        for key in self.weights.keys() if self.weights is not None else ():
            info = self.weights.info(key)
            low = self.low is not None and (key in self.low or key in self._blocks)
            if key in self._info or key + LEFT in apart or not (info.dtype == "F32" or low):
                continue
            self._encoding[key] = "low16" if low else "weight"
            self._info[key] = TensorInfo("F32", tuple(info.shape), 0, 4 * math.prod(tuple(info.shape)))
            if key in self._blocks:
                self._blocks[key] = _tiling(self._blocks[key], math.prod(tuple(info.shape)), key, label)
        self._tie_cache: tuple[str, torch.Tensor] | None = None
        self._block_cache: tuple[str, torch.Tensor] | None = None

    def encoding(self, key: str) -> str:
        return self._encoding.get(key, "float32")

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        kind = self.encoding(key)
        if kind == "float32":
            return self.full.read(key, rows)
        if kind == "f32":
            shape = self._info[key].shape
            start, stop = unit_span(shape, rows)
            flat = self._between(self.full, self._f32[key], start, stop)
            return flat.view(shape if rows is None or not shape else (rows[1] - rows[0], *shape[1:]))
        published = self.weights.read(key, rows)
        if kind == "weight":
            return published.to(torch.float32)
        start, stop = unit_span(self._info[key].shape, rows)
        low = self.low.read(key, rows) if key in self.low else self._between(self.low, self._blocks[key], start, stop)
        return decode_state(published, low, self._ties(key), start)

    def _between(self, ck: Checkpoint, blocks: list[tuple[int, int, str]], start: int, stop: int) -> torch.Tensor:
        """Flat elements [start, stop) of a tensor stored as compressed ``blocks`` of ``ck``, each decoded as its
        name's kind says. The last block decoded is kept: a reader whose slices cut a block decodes it once."""
        parts = []
        for a, b, name in blocks:
            if b <= start or a >= stop:
                continue
            if self._block_cache is None or self._block_cache[0] != name:
                self._block_cache = (name, decode_block(name, ck.read(name), f"{self.label}: block {name!r}"))
            parts.append(self._block_cache[1][max(start, a) - a : min(stop, b) - a])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _ties(self, key: str) -> torch.Tensor:
        if self._tie_cache is None or self._tie_cache[0] != key:  # a tensor's slices are read one after another
            found = self.ties.read(key) if self.ties is not None and key in self.ties else torch.zeros(0, dtype=torch.int64)
            self._tie_cache = (key, found)
        return self._tie_cache[1]

    def close(self) -> None:
        for ck in (self.full, self.low, self.ties, self.weights):
            if ck is not None:
                ck.close()
