"""A per-machine cache of content fingerprints: an unchanged local checkpoint is hashed once.

The fingerprint of a local checkpoint is the sha256 of every tensor (``checkpoint.ContentDigest``);
for a 7B base that is 14 GB through one core, and every run that resumes (each API step, each
``--resume``, ``--resume-from``) would pay it again. The cache maps a checkpoint's weight files,
each identified by (real path, size, mtime_ns, ctime_ns, inode, device), to the digest computed
from their content. Any write to a file changes its ctime, which no system call can set back, so
an entry is found only for the bytes that were hashed; the identity is taken when the checkpoint
is opened and again when the digest is stored, and a file that changed in between is not stored.

File: ``fingerprints-v1.json`` under ``$HF_CONTMERGE_CACHE`` (default ``~/.cache/hf-contmerge``),
or the file ``$HF_CONTMERGE_FINGERPRINT_CACHE`` names (``off`` disables the cache). It keeps the
``MAX_ENTRIES`` most recent entries; two runs storing at once may lose one entry, which costs a
rehash, never a wrong answer. Nothing in it is secret: paths and digests of the user's own files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

MAX_ENTRIES = 1000
FILE_NAME = "fingerprints-v1.json"


def cache_root() -> Path:
    """``$HF_CONTMERGE_CACHE``, else ``~/.cache/hf-contmerge``: where hf-contmerge keeps per-machine files."""
    env = os.environ.get("HF_CONTMERGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hf-contmerge"


def _cache_file() -> Path | None:
    env = os.environ.get("HF_CONTMERGE_FINGERPRINT_CACHE")
    if env == "off":
        return None
    return Path(env) if env else cache_root() / FILE_NAME


def identity(paths: Iterable[Path]) -> str | None:
    """One key for the current state of these files (None if one cannot be stat'ed)."""
    parts = []
    try:
        for path in sorted(Path(p).resolve() for p in paths):
            st = path.stat()
            parts.append([str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev])
    except OSError:
        return None
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _load(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or damaged: a cache, not a record
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) else {}


def lookup(key: str | None) -> str | None:
    """The digest stored for ``key`` (:func:`identity`), if any."""
    path = _cache_file()
    return _load(path).get(key) if key and path else None


def remember(key: str | None, paths: Iterable[Path], digest: str) -> None:
    """Store ``digest`` under ``key`` if the files still have that identity (best effort: a cache)."""
    path = _cache_file()
    if not key or path is None or identity(paths) != key:
        return
    entries = _load(path)
    entries.pop(key, None)
    entries[key] = digest  # most recent last
    entries = dict(list(entries.items())[-MAX_ENTRIES:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the next run hashes again
