"""Reading and writing safetensors files one tensor (or one row range) at a time.

Why not ``safetensors.safe_open`` for reading: it memory-maps the whole file, and every page it
touches counts in the process's resident set until the mapping goes. A 7B merge touches every byte
of every input, so a mapped read makes peak RSS look like the model size. Here a tensor, or a range
of its rows, is read with ``preadv`` straight into a torch buffer: one copy, and nothing stays
resident after the tensor is dropped.

Why not ``safetensors.torch.save_file`` for the model shards: it needs every tensor of a shard in
memory at once. The shapes are known from the pre-flight, so the header of each shard is computed
first and the data is appended in order, chunk by chunk (as mergekit's ``TensorWriter`` does per
tensor, but here without holding even one tensor whole). The files written are ordinary
safetensors files; the tests read them back with the ``safetensors`` library.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory

from .errors import ContMergeError

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

    Checks what a truncated or damaged download breaks: header length, JSON, known dtypes, each
    tensor's byte length against its shape, offsets inside the file, and data that exactly fills the
    file with no gaps or overlaps.
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
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"malformed entry for tensor {key!r}") from None
        if dtype not in SAFE_DTYPES:
            raise _corrupt(path, f"tensor {key!r} has unknown dtype {dtype!r}")
        if any((not isinstance(d, int)) or d < 0 for d in shape):
            raise _corrupt(path, f"tensor {key!r} has invalid shape {list(shape)}")
        expected = math.prod(shape) * itemsize(dtype)
        if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != expected or begin < 0:
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
    return tensors, {str(k): str(v) for k, v in metadata.items()}


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
        """Tensor ``key`` (or its rows ``[a, b)`` along dim 0) in its stored dtype, freshly allocated."""
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


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardedWriter:
    """Write tensors in a fixed, planned order into HF-named safetensors shards, chunk by chunk.

    ``specs`` fixes the order and the shapes. Shards follow the transformers conventions:
    ``{prefix}.safetensors`` when one shard suffices, else ``{prefix}-00001-of-0000N.safetensors``
    plus ``{prefix}.safetensors.index.json`` (``metadata.total_size`` and ``weight_map``); the split
    is huggingface_hub's own. Call :meth:`write` with consecutive chunks (dim-0 slices) of each
    tensor in order, then :meth:`close`, which checks that every byte was written and fsyncs.
    """

    def __init__(
        self,
        folder: Path,
        specs: Sequence[TensorSpec],
        max_shard_size: int | str = "5GB",
        prefix: str = "model",
        metadata: dict[str, str] | None = None,
    ):
        self.folder = Path(folder)
        self.specs = list(specs)
        self.metadata = {"format": "pt", **(metadata or {})}
        by_key = {s.key: s for s in self.specs}
        split = split_state_dict_into_shards_factory(
            by_key,
            get_storage_size=lambda s: s.nbytes,
            filename_pattern=prefix + "{suffix}.safetensors",
            max_shard_size=max_shard_size,
        )
        self.is_sharded = split.is_sharded
        self.index_name = f"{prefix}.safetensors.index.json"
        self.weight_map = dict(split.tensor_to_filename)
        # Shards are written in the order their first tensor appears in ``specs``; within a shard,
        # tensors keep their ``specs`` order. The engine must feed chunks in exactly this order.
        order = {s.key: i for i, s in enumerate(self.specs)}
        self.shards = sorted(
            ((name, sorted(keys, key=order.__getitem__)) for name, keys in split.filename_to_tensors.items()),
            key=lambda item: order[item[1][0]],
        )
        self.sequence = [k for _, keys in self.shards for k in keys]
        self._shard_of = {k: i for i, (_, keys) in enumerate(self.shards) for k in keys}
        self._by_key = by_key
        self._pos = -1  # index into self.sequence of the tensor being written
        self._written = 0
        self._file = None
        self._shard_idx = -1
        self.files: list[Path] = []

    def _open_shard(self, idx: int) -> None:
        self._close_file()
        name, keys = self.shards[idx]
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for k in keys:
            s = self._by_key[k]
            header[k] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(len(blob) + 8) % 8)  # safetensors pads the header to 8-byte alignment
        path = self.folder / name
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self.files.append(path)
        self._shard_idx = idx

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def _finish_current(self) -> None:
        if self._pos >= 0:
            spec = self._by_key[self.sequence[self._pos]]
            if self._written != spec.nbytes:
                raise RuntimeError(f"internal: {spec.key} got {self._written} of {spec.nbytes} bytes")

    def write(self, key: str, chunk: torch.Tensor) -> None:
        """Append ``chunk`` (the next rows of tensor ``key``, already in the planned dtype)."""
        if self._pos < 0 or self.sequence[self._pos] != key:
            self._finish_current()
            self._pos += 1
            if self._pos >= len(self.sequence) or self.sequence[self._pos] != key:
                raise RuntimeError(f"internal: wrote {key!r} out of the planned order")
            self._written = 0
            shard = self._shard_of[key]
            if shard != self._shard_idx:
                self._open_shard(shard)
        spec = self._by_key[key]
        if DTYPE_NAMES[chunk.dtype] != spec.dtype:
            raise RuntimeError(f"internal: {key} chunk is {chunk.dtype}, planned {spec.dtype}")
        data = _tensor_bytes(chunk)
        self._written += len(data)
        if self._written > spec.nbytes:
            raise RuntimeError(f"internal: {key} got more bytes than its shape holds")
        self._file.write(data)

    def close(self) -> list[Path]:
        """Finish the last shard, write the index when sharded, and return the files written."""
        self._finish_current()
        if self._pos != len(self.sequence) - 1:
            missing = self.sequence[self._pos + 1] if self.sequence else None
            raise RuntimeError(f"internal: closed before writing {missing!r}")
        if not self.shards:  # nothing planned (every tensor of a slot carried as factors): still a valid file
            self.shards = [(f"{self.index_name.removesuffix('.index.json')}", [])]
            self._open_shard(0)
        self._close_file()
        if self.is_sharded:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.specs)},
                "weight_map": dict(sorted(self.weight_map.items())),
            }
            path = self.folder / self.index_name
            path.write_text(json.dumps(index, indent=2) + "\n")
            self.files.append(path)
        return self.files


class AppendWriter:
    """Write tensors whose shapes are not known in advance (low-rank factors), in arrival order.

    The header of a safetensors file comes first, so room for it is reserved up front: enough for
    every name in ``names`` with dimensions and offsets of up to 20 digits. Data is appended as
    tensors arrive (a tensor may come in dim-0 chunks after :meth:`begin`), and :meth:`close` writes
    the real header into the reserved room, padded with spaces, which the format allows. A shard is
    closed and the next one started once it holds ``max_shard_size`` bytes; names follow
    :class:`ShardedWriter` (``{prefix}.safetensors`` or ``{prefix}-0000i-of-0000N.safetensors`` plus an
    index). Only the names written appear in the files.
    """

    def __init__(self, folder: Path, names: Iterable[str], max_shard_size: int = 5 * 10**9, prefix: str = "model",
                 metadata: dict[str, str] | None = None, shapes: dict[str, tuple[int, ...]] | None = None):
        self.folder, self.prefix, self.max_shard_size = Path(folder), prefix, max_shard_size
        self._shapes = shapes or {}  # full shapes of the tensors that arrive in several chunks
        self.metadata = {"format": "pt", **(metadata or {})}
        entry = len('"":{"dtype":"BF16","shape":[],"data_offsets":[,]},') + 2 * 20 + 4 * 21
        names = list(names)
        self._reserved = 8 + len(json.dumps({"__metadata__": self.metadata})) + sum(len(json.dumps(n)) + entry for n in names)
        self._reserved += -self._reserved % 8
        self._names = set(names)
        self._shards: list[tuple[Path, dict[str, object]]] = []  # (temporary path, header) per shard
        self._file = None
        self._offset = 0
        self._current: tuple[str, int] | None = None  # name and bytes still expected
        self.weight_map: dict[str, str] = {}
        self.files: list[Path] = []

    def begin(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Announce tensor ``name``; its bytes follow through :meth:`write` (one or more dim-0 chunks)."""
        if self._current is not None:
            raise RuntimeError(f"internal: {self._current[0]!r} is incomplete")
        if name not in self._names or any(name in h for _, h in self._shards):
            raise RuntimeError(f"internal: {name!r} was not planned for this writer, or written twice")
        if self._file is None or self._offset >= self.max_shard_size:
            self._start_shard()
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        self._shards[-1][1][name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                                     "data_offsets": [self._offset, self._offset + nbytes]}
        self._current = (name, nbytes)
        self._flush_if_done()

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append ``chunk``: a whole tensor (begun implicitly) or the next rows of the begun one."""
        if self._current is None:
            self.begin(name, self._shapes.get(name, tuple(chunk.shape)), chunk.dtype)
            if self._current is None:  # an empty tensor is complete once begun
                return
        if self._current[0] != name:
            raise RuntimeError(f"internal: {name!r} written while {self._current[0]!r} is incomplete")
        data = _tensor_bytes(chunk)
        if len(data) > self._current[1]:
            raise RuntimeError(f"internal: {name!r} got more bytes than its shape holds")
        self._file.write(data)
        self._offset += len(data)
        self._current = (name, self._current[1] - len(data))
        self._flush_if_done()

    def _flush_if_done(self) -> None:
        if self._current is not None and self._current[1] == 0:
            self._current = None

    def _start_shard(self) -> None:
        self._finish_shard()
        path = self.folder / f".{self.prefix}-{len(self._shards) + 1:05d}.partial"
        self._file = open(path, "wb")
        self._file.write(b"\0" * self._reserved)
        self._shards.append((path, {"__metadata__": self.metadata}))
        self._offset = 0

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        blob = json.dumps(self._shards[-1][1], separators=(",", ":")).encode()
        if len(blob) + 8 > self._reserved:
            raise RuntimeError("internal: safetensors header outgrew its reserved room")
        self._file.seek(0)
        self._file.write(struct.pack("<Q", self._reserved - 8) + blob + b" " * (self._reserved - 8 - len(blob)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def close(self) -> list[Path]:
        """Finish the last shard, name the shards, write the index when sharded; the files written."""
        if self._current is not None:
            raise RuntimeError(f"internal: closed before {self._current[0]!r} was complete")
        if self._file is None:
            self._start_shard()  # nothing was written: still an (empty) valid file
        self._finish_shard()
        n = len(self._shards)
        for i, (tmp, header) in enumerate(self._shards, 1):
            name = f"{self.prefix}.safetensors" if n == 1 else f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.folder / name)
            self.files.append(self.folder / name)
            self.weight_map.update({k: name for k in header if k != "__metadata__"})
        if n > 1:
            sizes = sum(e["data_offsets"][1] - e["data_offsets"][0] for _, h in self._shards for k, e in h.items() if k != "__metadata__")
            index = self.folder / f"{self.prefix}.safetensors.index.json"
            index.write_text(json.dumps({"metadata": {"total_size": sizes}, "weight_map": dict(sorted(self.weight_map.items()))}, indent=2) + "\n")
            self.files.append(index)
        return self.files


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
