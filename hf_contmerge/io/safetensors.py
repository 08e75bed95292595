"""Reading and writing safetensors files one tensor (or one row range) at a time.

Why not ``safetensors.safe_open`` for reading: it memory-maps the whole file, and every page it
touches counts in the process's resident set until the mapping goes. A 7B merge touches every byte
of every input, so a mapped read makes peak RSS look like the model size. Here a tensor, or a range
of its rows, is read with ``preadv`` straight into a torch buffer: one copy, and nothing stays
resident after the tensor is dropped.

Writing, chunk by chunk, is ``writer.py``'s. Small files (task heads) are written with the
``safetensors`` library itself (:func:`write_small`).
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ContMergeError
from .schemas import safetensors_header

SAFE_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFE_DTYPES.items()}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def itemsize(dtype: str) -> int:
    return torch.empty((), dtype=SAFE_DTYPES[dtype]).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file (absolute byte offsets)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def _corrupt(path: Path, why: str) -> ContMergeError:
    return ContMergeError(
        f"{path} is truncated or corrupt ({why}). Save it again, or, if it came from the Hub, delete it "
        "from the Hub cache (`hf cache delete`) so that the next run downloads it afresh."
    )


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header against the file's size.

    Checks what a truncated or damaged download breaks: header length, JSON, the entries' types
    (``schemas.safetensors_header``), known dtypes, each tensor's byte length against its shape,
    offsets inside the file, and data that exactly fills the file with no gaps or overlaps.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise _corrupt(path, f"only {size} bytes, not even a header length")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise _corrupt(path, f"header length {n} does not fit a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _corrupt(path, f"header is not valid JSON: {e}") from None
    try:
        entries, metadata = safetensors_header(header)
    except ValueError as e:
        raise _corrupt(path, str(e)) from None
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in entries.items():
        dtype, shape, (begin, end) = entry.dtype, tuple(entry.shape), entry.data_offsets
        if dtype not in SAFE_DTYPES:
            raise _corrupt(path, f"tensor {key!r} has unknown dtype {dtype!r}")
        expected = math.prod(shape) * itemsize(dtype)
        if end - begin != expected:
            raise _corrupt(path, f"tensor {key!r} spans {begin}..{end}, expected {expected} bytes")
        tensors[key] = TensorInfo(dtype, shape, data_start + begin, data_start + end)
        spans.append((begin, end, key))
    spans.sort()
    cursor = 0
    for begin, end, key in spans:
        if begin != cursor:
            raise _corrupt(path, f"tensor {key!r} starts at {begin}, expected {cursor} (gap or overlap)")
        cursor = end
    if data_start + cursor != size:
        raise _corrupt(path, f"data ends at byte {data_start + cursor} but the file has {size} bytes")
    return tensors, metadata


_READ = [0]  # tensor bytes this process has read from safetensors files (``--verbose`` reports a step's)
_READ_LOCK = threading.Lock()  # the engine reads in a reader thread


def bytes_read() -> int:
    """Tensor bytes read by :meth:`SafetensorsFile.read` in this process so far."""
    return _READ[0]


class SafetensorsFile:
    """One safetensors file, validated on open; tensors are read on demand, rows at a time."""

    def __init__(self, path: str | os.PathLike[str]):
        self._fd: int | None = None
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``key`` (or its rows ``[a, b)`` along dim 0) in its stored dtype, freshly allocated (counted
        in :func:`bytes_read`)."""
        info = self.tensors[key]
        shape, start, nbytes = info.shape, info.start, info.nbytes
        if rows is not None and shape:
            a, b = rows
            row_bytes = nbytes // shape[0] if shape[0] else 0
            start, nbytes, shape = start + a * row_bytes, (b - a) * row_bytes, (b - a, *shape[1:])
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        fd, done = self._descriptor(), 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], start + done)
            if got <= 0:
                raise _corrupt(self.path, f"read of {key!r} stopped after {done} of {nbytes} bytes")
            done += got
        with _READ_LOCK:
            _READ[0] += nbytes
        return buf.view(SAFE_DTYPES[info.dtype]).reshape(shape)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # best effort; engine code closes explicitly
        self.close()


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: name, shape and stored dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def write_small(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a small safetensors file (task heads, scalars) with the safetensors library itself."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt", **(metadata or {})})


def iter_row_chunks(shape: tuple[int, ...], itemsz: int, budget_bytes: int) -> Iterable[tuple[int, int] | None]:
    """Row ranges ``[a, b)`` along dim 0 whose size stays under ``budget_bytes``; ``None`` = whole."""
    if len(shape) < 1 or shape[0] == 0:
        yield None
        return
    row = max(1, math.prod(shape[1:]) * itemsz)
    step = max(1, budget_bytes // row)
    if step >= shape[0]:
        yield None
        return
    for a in range(0, shape[0], step):
        yield (a, min(a + step, shape[0]))


def finite(t: torch.Tensor) -> bool:
    """Whether every value of a float tensor is finite: one reduction (a NaN/Inf makes the sum non-finite),
    and the exact check only when the sum says otherwise (finite values may overflow a low-precision sum)."""
    return not t.is_floating_point() or math.isfinite(t.sum()) or bool(torch.isfinite(t).all())
