"""The one streaming safetensors writer: HF-named shards written chunk by chunk, never a whole tensor held.

Why not ``safetensors.torch.save_file``: it needs every tensor of a shard in memory at once. A
safetensors file starts with its header (names, dtypes, shapes, offsets), so a writer that streams
must know the header before the data. Two cases, one writer:

- **planned** (model shards, dense carried state): the step plan knows every name, shape and dtype
  before a byte is read, and cuts them into shards with huggingface_hub's own split
  (:func:`plan_shards`); each shard's exact header is written when it is opened, and chunks are
  appended in the planned order (mergekit's ``TensorWriter`` does the same per whole tensor).
- **appended** (low-rank factors, a PEFT adapter): shapes are known only once computed. Room for
  the header is reserved up front (every name that may come, with dimensions and offsets of up to
  20 digits), data is appended as it arrives, a shard is closed once it holds ``max_shard_size``
  bytes, and :meth:`StreamingWriter.close` writes the real header into the reserved room, padded
  with spaces, which the format allows. Only the names written appear in the files.

- **shared** (a planned writer of one rank of a multi-process merge, ``share=``): every rank knows
  the same headers, so rank 0 creates each shard at its full size with its header, and each rank
  writes its own tensors (whole ones, in any order) with ``pwrite`` at their planned offsets:
  disjoint byte ranges, the same bytes as one process writing them all. Each rank fsyncs what it
  wrote; rank 0 writes the index. (Disjoint ``pwrite`` ranges are safe on local and cluster
  filesystems, where MPI-IO relies on the same; NFS's client caching is not, see the README.)

Either way the files follow the transformers conventions: ``{prefix}.safetensors`` for one shard,
else ``{prefix}-0000i-of-0000N.safetensors`` plus ``{prefix}.safetensors.index.json``
(``metadata.total_size``, ``weight_map``), and ``{"format": "pt"}`` metadata. Every file is fsynced
when closed, and the disk is started on a file's pages as they come (:func:`start_writeback`), so that
the fsync waits for the last few MiB, not the whole file. The tests read them back with the
``safetensors`` library.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory

from .safetensors import DTYPE_NAMES, TensorSpec

WRITEBACK_BYTES = 64 << 20  # a file's pages are handed to the disk every this many bytes written
SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h
_ENTRY = len('"":{"dtype":"BF16","shape":[],"data_offsets":[,]},') + 2 * 20 + 4 * 21  # reserved per name


@functools.cache
def _sync_file_range():
    """Linux's ``sync_file_range``, or None elsewhere (ctypes: Python's ``os`` does not expose it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes, call.restype = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint], ctypes.c_int
    return call


def start_writeback(fd: int) -> None:
    """Start the disk on the dirty pages of file ``fd`` without waiting for it (``SYNC_FILE_RANGE_WRITE``):
    the kernel would otherwise hold a step's gigabytes in the page cache until the closing fsync, and the
    step would wait for all of them there (benchmarks/RESULTS.md). Advisory: the fsync still makes the file
    durable, and where the call is missing or fails nothing changes."""
    call = _sync_file_range()
    if call is not None:
        call(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # offset 0, nbytes 0: the whole file


@dataclass(frozen=True)
class Share:
    """A shared planned writer's part: whether this rank creates the files and writes the index
    (rank 0), and the tensors it writes."""

    main: bool
    keys: frozenset[str]


@dataclass(frozen=True)
class PlannedShard:
    """One planned output file: its name and the tensors it holds, in the order they are written."""

    name: str
    keys: tuple[str, ...]


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int | str, prefix: str = "model") -> list[PlannedShard]:
    """huggingface_hub's split of ``specs`` into shards of at most ``max_shard_size`` bytes.

    Shards come in the order their first tensor appears in ``specs``; within a shard tensors keep
    their ``specs`` order, so writing ``specs`` in order fills the shards one after another. A tensor
    larger than the shard size gets a shard of its own, as transformers does; the split puts it aside
    and goes on filling the shard it was in, so that shard is cut there (into contiguous runs of
    ``specs``) to keep the one-shard-after-another order, and the files are named again.
    """
    if not specs:
        return []
    split = split_state_dict_into_shards_factory(
        {s.key: s for s in specs}, get_storage_size=lambda s: s.nbytes,
        filename_pattern=prefix + "{suffix}.safetensors", max_shard_size=max_shard_size,
    )
    shard_of = {key: name for name, keys in split.filename_to_tensors.items() for key in keys}
    runs: list[list[str]] = []
    for spec in specs:
        if runs and shard_of[runs[-1][-1]] == shard_of[spec.key]:
            runs[-1].append(spec.key)
        else:
            runs.append([spec.key])
    if len(runs) == 1:
        return [PlannedShard(f"{prefix}.safetensors", tuple(runs[0]))]
    return [PlannedShard(f"{prefix}-{i:05d}-of-{len(runs):05d}.safetensors", tuple(run)) for i, run in enumerate(runs, 1)]


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _header_blob(header: dict[str, object], room: int | None = None) -> bytes:
    """The 8-byte length and the JSON header, padded with spaces (to 8-byte alignment, or to ``room``)."""
    blob = json.dumps(header, separators=(",", ":")).encode()
    size = len(blob) + (-(len(blob) + 8) % 8) if room is None else room - 8
    if len(blob) > size:
        raise RuntimeError("internal: safetensors header outgrew its reserved room")
    return struct.pack("<Q", size) + blob + b" " * (size - len(blob))


class StreamingWriter:
    """Write tensors chunk by chunk into HF-named safetensors shards; see the module docstring.

    Build with :meth:`planned` or :meth:`appended`; call :meth:`write` with consecutive dim-0 chunks
    of each tensor (a whole tensor is one chunk), then :meth:`close`, which checks that every planned
    byte was written, fsyncs, names the files and writes the index; it returns the files written.
    """

    def __init__(self, folder: Path, prefix: str, metadata: dict[str, str] | None) -> None:
        self.folder, self.prefix = Path(folder), prefix
        self.metadata = {"format": "pt", **(metadata or {})}
        self.files: list[Path] = []
        self.weight_map: dict[str, str] = {}
        self._file = None
        self._headers: list[dict[str, object]] = []  # per shard opened so far
        self._offset = 0  # data bytes in the open shard
        self._unstarted = 0  # bytes written since the disk was last started on them (start_writeback)
        self._current: tuple[str, int] | None = None  # tensor being written and its bytes still expected
        # planned mode
        self._specs: dict[str, TensorSpec] = {}
        self._shards: list[PlannedShard] = []
        self._sequence: list[str] = []
        self._shard_of: dict[str, int] = {}
        self._next = 0  # index into _sequence of the next tensor to begin
        # shared mode
        self._share: Share | None = None
        self._fds: dict[int, int] = {}
        self._pos = 0  # file offset of the next byte of the tensor being written
        self._done: set[str] = set()
        self._data_start: list[int] = []  # per shard: the file offset of its data (after the header)
        # appended mode
        self._names: set[str] | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._max_shard_size = 0
        self._reserved = 0
        self._temp: list[Path] = []

    @classmethod
    def planned(cls, folder: Path, specs: Sequence[TensorSpec], shards: Sequence[PlannedShard], prefix: str = "model",
                metadata: dict[str, str] | None = None, share: Share | None = None) -> StreamingWriter:
        """Every tensor known in advance: ``specs`` (shapes, dtypes) cut into ``shards`` (:func:`plan_shards`).
        ``share``: this rank's part of a shared writer (rank 0 creates the files now; the others may write
        once it has)."""
        w = cls(folder, prefix, metadata)
        w._specs = {s.key: s for s in specs}
        w._shards = list(shards)
        w._sequence = [k for shard in w._shards for k in shard.keys]
        w._shard_of = {k: i for i, shard in enumerate(w._shards) for k in shard.keys}
        if sorted(w._sequence) != sorted(w._specs):
            raise RuntimeError("internal: the shard plan does not cover the tensor specs")
        w._share = share
        if share is not None:
            w._headers = [w._planned_header(i) for i in range(len(w._shards))]
            blobs = [_header_blob(header) for header in w._headers]
            w._data_start = [len(blob) for blob in blobs]
            if share.main:
                for shard, blob in zip(w._shards, blobs):
                    with open(w.folder / shard.name, "wb") as fh:
                        fh.write(blob)
                        fh.truncate(len(blob) + sum(w._specs[k].nbytes for k in shard.keys))
        return w

    @classmethod
    def appended(cls, folder: Path, names: Iterable[str], max_shard_size: int = 5 * 10**9, prefix: str = "model",
                 metadata: dict[str, str] | None = None, shapes: dict[str, tuple[int, ...]] | None = None) -> StreamingWriter:
        """Shapes known once computed: any of ``names`` may be written, once each, in any order. ``shapes``
        gives the full shape of tensors that arrive in several chunks (others are one chunk)."""
        w = cls(folder, prefix, metadata)
        names = list(names)
        w._names, w._shapes, w._max_shard_size = set(names), dict(shapes or {}), max_shard_size
        w._reserved = 8 + len(json.dumps({"__metadata__": w.metadata})) + sum(len(json.dumps(n)) + _ENTRY for n in names)
        w._reserved += -w._reserved % 8
        return w

    @property
    def sequence(self) -> list[str]:
        """The order in which a planned writer takes its tensors."""
        return list(self._sequence)

    # ------------------------------------------------------------------ writing
    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append ``chunk``: a whole tensor, or the next rows of tensor ``name`` (begun by its first chunk)."""
        if self._current is None:
            self._begin(name, chunk)
            if self._current is None:  # an empty tensor is complete once begun
                return
        if self._current[0] != name:
            raise RuntimeError(f"internal: {name!r} written while {self._current[0]!r} is incomplete")
        data = _tensor_bytes(chunk)
        if len(data) > self._current[1]:
            raise RuntimeError(f"internal: {name!r} got more bytes than its shape holds")
        if self._share is not None:
            fd = self._fds[self._shard_of[name]]
            done = 0
            while done < len(data):  # pwrite may write less than asked (Linux: at most 2 GiB a call)
                done += os.pwrite(fd, data[done:], self._pos + done)
            self._pos += len(data)
            self._written(fd, len(data))
            self._current = (name, self._current[1] - len(data)) if len(data) < self._current[1] else None
            return
        self._file.write(data)
        self._offset += len(data)
        self._written(self._file, len(data))
        self._current = (name, self._current[1] - len(data)) if len(data) < self._current[1] else None

    def _written(self, file, nbytes: int) -> None:
        """Count ``nbytes`` just written to ``file`` (a file object or a descriptor); every
        ``WRITEBACK_BYTES``, start the disk on them."""
        self._unstarted += nbytes
        if self._unstarted >= WRITEBACK_BYTES:
            if not isinstance(file, int):
                file.flush()
                file = file.fileno()
            start_writeback(file)
            self._unstarted = 0

    def _begin(self, name: str, chunk: torch.Tensor) -> None:
        if self._share is not None:  # shared: one of this rank's tensors, once, at its planned offset
            if name not in self._share.keys or name in self._done:
                raise RuntimeError(f"internal: {name!r} is not this rank's to write, or was written twice")
            spec, index = self._specs[name], self._shard_of[name]
            if DTYPE_NAMES[chunk.dtype] != spec.dtype:
                raise RuntimeError(f"internal: {name} chunk is {chunk.dtype}, planned {spec.dtype}")
            if index not in self._fds:
                self._fds[index] = os.open(self.folder / self._shards[index].name, os.O_WRONLY)
            self._pos = self._data_start[index] + self._headers[index][name]["data_offsets"][0]
            self._done.add(name)
            self._current = (name, spec.nbytes) if spec.nbytes else None
            return
        if self._names is None:  # planned: the next tensor of the sequence, in its planned dtype
            if self._next >= len(self._sequence) or self._sequence[self._next] != name:
                raise RuntimeError(f"internal: wrote {name!r} out of the planned order")
            spec = self._specs[name]
            if DTYPE_NAMES[chunk.dtype] != spec.dtype:
                raise RuntimeError(f"internal: {name} chunk is {chunk.dtype}, planned {spec.dtype}")
            if self._shard_of[name] != len(self._headers) - 1:
                self._open_planned(self._shard_of[name])
            self._next += 1
            nbytes = spec.nbytes
        else:  # appended: any announced name, once; a new shard once this one is full
            if name not in self._names or any(name in h for h in self._headers):
                raise RuntimeError(f"internal: {name!r} was not planned for this writer, or written twice")
            if self._file is None or self._offset >= self._max_shard_size:
                self._open_appended()
            shape = self._shapes.get(name, tuple(chunk.shape))
            nbytes = math.prod(shape) * chunk.element_size()
            self._headers[-1][name] = {"dtype": DTYPE_NAMES[chunk.dtype], "shape": list(shape),
                                       "data_offsets": [self._offset, self._offset + nbytes]}
        self._current = (name, nbytes) if nbytes else None

    def _planned_header(self, index: int) -> dict[str, object]:
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for k in self._shards[index].keys:
            s = self._specs[k]
            header[k] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        return header

    def _open_planned(self, index: int) -> None:
        self._close_file()
        shard = self._shards[index]
        header = self._planned_header(index)
        self._start_file(self.folder / shard.name, _header_blob(header))
        self._headers.append(header)
        self.weight_map.update(dict.fromkeys(shard.keys, shard.name))

    def _open_appended(self) -> None:
        self._close_file()
        path = self.folder / f".{self.prefix}-{len(self._headers) + 1:05d}.partial"
        self._start_file(path, b"\0" * self._reserved)
        self._temp.append(path)
        self._headers.append({"__metadata__": self.metadata})

    def _start_file(self, path: Path, head: bytes) -> None:
        self._file = open(path, "wb")
        self._file.write(head)
        self._offset = 0

    def _close_file(self) -> None:
        if self._file is None:
            return
        if self._names is not None:  # the real header, into the room reserved at the start
            self._file.seek(0)
            self._file.write(_header_blob(self._headers[-1], self._reserved))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    # ------------------------------------------------------------------ closing
    def close(self) -> list[Path]:
        """Finish the last shard, name the shards, write the index when sharded; the files written."""
        if self._current is not None:
            raise RuntimeError(f"internal: closed before {self._current[0]!r} was complete")
        if self._share is not None:
            missing = sorted(self._share.keys - self._done)
            if missing:
                raise RuntimeError(f"internal: closed before writing {missing[0]!r}")
            for fd in self._fds.values():
                os.fsync(fd)
                os.close(fd)
            self._fds.clear()
            if not self._shards and self._share.main:
                self._start_file(self.folder / f"{self.prefix}.safetensors", _header_blob({"__metadata__": self.metadata}))
                self._close_file()
            names = [shard.name for shard in self._shards] or [f"{self.prefix}.safetensors"]
            self.weight_map = {k: shard.name for shard in self._shards for k in shard.keys}
            total = sum(s.nbytes for s in self._specs.values())
            self.files = [self.folder / name for name in names]
            if len(names) > 1 and self._share.main:
                self.files.append(self._write_index(total))
            return self.files
        if self._names is None:
            if self._next != len(self._sequence):
                raise RuntimeError(f"internal: closed before writing {self._sequence[self._next]!r}")
            if not self._shards:  # nothing planned (every tensor of a slot carried as factors): still a valid file
                self._start_file(self.folder / f"{self.prefix}.safetensors", _header_blob({"__metadata__": self.metadata}))
            self._close_file()
            names = [shard.name for shard in self._shards] or [f"{self.prefix}.safetensors"]
            total = sum(s.nbytes for s in self._specs.values())
        else:
            if self._file is None:
                self._open_appended()  # nothing was written: still an (empty) valid file
            self._close_file()
            n = len(self._temp)
            names = [f"{self.prefix}.safetensors" if n == 1 else f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
                     for i in range(1, n + 1)]
            for tmp, name, header in zip(self._temp, names, self._headers):
                os.replace(tmp, self.folder / name)
                self.weight_map.update({k: name for k in header if k != "__metadata__"})
            total = sum(e["data_offsets"][1] - e["data_offsets"][0] for h in self._headers for k, e in h.items()
                        if k != "__metadata__")
        self.files = [self.folder / name for name in names]
        if len(names) > 1:
            self.files.append(self._write_index(total))
        return self.files

    def _write_index(self, total: int) -> Path:
        index = self.folder / f"{self.prefix}.safetensors.index.json"
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))},
                                    indent=2) + "\n")
        return index
