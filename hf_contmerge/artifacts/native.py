"""The compiled low-bits codec (``codec.c``): built once per machine into the cache, loaded with ``ctypes``.

Why hand-built: no library has a fused kernel for these bit operations, torch's eager ops make each one
a pass over memory, and the codec runs on every parameter of every step (``benchmarks/bench_codec.py``:
encoding 2.0 → 0.9 ns an element, decoding 2.6 → 0.6, on one core). ``ctypes`` and the system C compiler
rather than a torch extension: the source is plain C on raw buffers, so it builds in a fraction of a
second with no torch headers, and ``ctypes`` releases the GIL during each call (the reader thread decodes
while the calling thread computes).

Built on first use with ``$CC`` (else ``cc``) into ``<cache>/native/codec-<hash>.so`` (``cache``:
``$HF_CONTMERGE_CACHE``, else ``~/.cache/hf-contmerge``), the hash covering the source, the flags, the
compiler and the machine, written to a temporary name and renamed, so concurrent processes never load a
half-written library. Where there is no compiler, the cache is not writable or ``HF_CONTMERGE_NATIVE=0``,
compact.py runs the same codec in torch ops: the same bits, more passes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..io.fingerprints import cache_root

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("codec.c")
FLAGS = ["-O3", "-std=gnu99", "-shared", "-fPIC"]  # no -march=native: a shared cache may serve other CPUs


def _compiler() -> list[str] | None:
    cc = shlex.split(os.environ.get("CC", "")) or ["cc"]
    return cc if shutil.which(cc[0]) else None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded codec, or None (see the module docstring); built on the first call of a process."""
    if os.environ.get("HF_CONTMERGE_NATIVE", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        log.info("no C compiler (cc or $CC): the low bits are encoded with torch ops")
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(cc + FLAGS).encode(), platform.machine().encode(),
                                     platform.platform().encode()])).hexdigest()[:16]
    target = cache_root() / "native" / f"codec-{key}.so"
    try:
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                subprocess.run([*cc, *FLAGS, "-o", str(built), str(SOURCE)], check=True, capture_output=True, timeout=120)
                os.replace(built, target)  # atomic: another process loads the old name or the whole new file
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.info("the C codec could not be built or loaded (%s %s): the low bits are encoded with torch ops",
                 e, detail.decode(errors="replace")[:500])
        return None
    lib.cm_encode.restype = ctypes.c_int64
    lib.cm_encode.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.cm_decode.restype = None
    lib.cm_decode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                              ctypes.c_void_p]
    lib.cm_palette.restype = ctypes.c_int64
    lib.cm_palette.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.cm_unpalette.restype = ctypes.c_int64
    lib.cm_unpalette.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                 ctypes.c_void_p]
    return lib
