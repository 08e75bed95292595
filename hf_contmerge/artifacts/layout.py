"""Where everything lives: every file name the package reads or writes, and the output folder.

The output folder: ``OUT/step-1 … OUT/step-T``, each written whole or not at all.

A step is built in ``OUT/.step-T.partial-PID`` and renamed into place once every file in it is
written and fsynced, so a process killed at any moment leaves only complete steps (plus a partial
folder that the next run removes). ``OUT/.hf-contmerge.json`` marks a folder as this tool's; a
folder holding anything else is refused, never overwritten.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ContMergeError

# ---- checkpoints (sources and step folders): transformers' and PEFT's names, defined where they are read
from ..io.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS_PREFIX,
    CONFIG,
    GENERATION_CONFIG,
    PICKLE_INDEX,
    PICKLE_SINGLE,
    SAFE_INDEX,
    SAFE_SINGLE,
    SIDE_PATTERNS,
    WEIGHTS_PREFIX,
)

CARD = "README.md"
GITATTRIBUTES = ".gitattributes"  # created by the Hub with every repo; never deleted by a push, never copied back

# ---- a step folder (see artifacts/state.py for what the state holds)
STATE_FILE = "contmerge_state.json"
STATE_DIR = "contmerge_state"  # {slot}.safetensors (dense), lowrank-{slot}.safetensors (factors)
LOWRANK_PREFIX = "lowrank-"
LEFT, RIGHT = "::left", "::right"  # suffixes of the two factors of a key in the low-rank state files
HEADS_DIR = "task_heads"  # task_heads/task-{i}/
EVAL_DIR = "evaluation"  # reports (FusionBench form) and plots of the step's evaluation
PASS1_DIR = "_pass1"  # scratch of a two-pass method's first pass, inside the partial step folder
CALIBRATION_DIR = "_calibration"  # inside a partial step: the step's calibration statistics, removed before publish
# Files of the base folder that are not copied into a step (weights indexes, our own files, its card).
SKIP_SIDE = {SAFE_INDEX, PICKLE_INDEX, ADAPTER_CONFIG, CARD, STATE_FILE}
MODEL_CONFIGS = {CONFIG, GENERATION_CONFIG}  # side files an adapter step must not carry

# ---- the output folder
MARKER = ".hf-contmerge.json"
STEP_RE = re.compile(r"step-([1-9]\d*)")
PARTIAL_RE = re.compile(r"\.step-[1-9]\d*\.partial-\d+")

__all__ = [  # every file name, including the checkpoint names imported above
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS_PREFIX", "CARD", "CONFIG", "GENERATION_CONFIG", "GITATTRIBUTES", "HEADS_DIR",
    "LEFT", "LOWRANK_PREFIX", "MARKER", "MODEL_CONFIGS", "PASS1_DIR", "PICKLE_INDEX", "PICKLE_SINGLE", "RIGHT",
    "SAFE_INDEX", "SAFE_SINGLE", "SIDE_PATTERNS", "SKIP_SIDE", "STATE_DIR", "STATE_FILE", "WEIGHTS_PREFIX",
    "claim", "complete_steps", "exclusive", "fsync_dir", "fsync_tree", "new_partial", "publish", "safe_relative", "step_dir",
]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (and ``root``): what a step holds is on disk before
    the rename that makes it visible. Files fsynced already (the shards) cost next to nothing."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def step_dir(out: Path, step: int) -> Path:
    return Path(out) / f"step-{step}"


def complete_steps(out: Path) -> list[int]:
    """Step numbers present in ``out``; raises if ``out`` holds anything that is not ours."""
    out = Path(out)
    if not out.exists():
        return []
    if not out.is_dir():
        raise ContMergeError(f"--out {out} is a file. Give a folder (new, empty, or an earlier hf-contmerge output).")
    entries = sorted(p.name for p in out.iterdir())
    if entries and MARKER not in entries:
        raise ContMergeError(
            f"--out {out} is not empty and was not written by hf-contmerge (it holds {entries[0]!r}). "
            "Nothing was written; choose a new or empty folder."
        )
    foreign = [e for e in entries if e != MARKER and not STEP_RE.fullmatch(e) and not PARTIAL_RE.fullmatch(e)]
    if foreign:
        raise ContMergeError(
            f"--out {out} holds {foreign[0]!r}, which hf-contmerge did not write. Nothing was overwritten; "
            "move it away or choose another --out."
        )
    steps = []
    for e in entries:
        if m := STEP_RE.fullmatch(e):
            if not (out / e / STATE_FILE).is_file():
                raise ContMergeError(f"{out / e} has no contmerge_state.json: it was not written by hf-contmerge. Move it away.")
            steps.append(int(m.group(1)))
    return sorted(steps)


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold ``out`` for one run: an exclusive ``flock`` on the folder itself, for the whole run.

    A second run on the same ``--out`` (or the same command twice) stops at once with a clear
    message, instead of removing the first run's step in progress as a leftover. The folder is
    created if needed; a run that wrote no step into a new folder (refused before or during its
    first step) removes its marker again, and the folder if it created it. ``flock`` is advisory and local to one machine (on a network
    filesystem it may not reach other machines); without ``fcntl`` (Windows) no lock is taken.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ContMergeError(f"--out {out} is a file. Give a folder (new, empty, or an earlier hf-contmerge output).")
    created = not out.exists()
    marked = (out / MARKER).exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ContMergeError(f"--out {out} cannot be created ({e.strerror}). Choose a folder you can write.") from None
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            import fcntl
        except ImportError:
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ContMergeError(
                    f"--out {out} is being written by another hf-contmerge run right now. Wait for it to finish "
                    "(then --resume continues after its last step), or choose another --out. Nothing was written."
                ) from None
        yield
    finally:
        os.close(fd)  # releases the lock
        if not marked and out.is_dir() and {p.name for p in out.iterdir()} <= {MARKER}:  # no step came of this run
            (out / MARKER).unlink(missing_ok=True)
            if created:
                out.rmdir()


def claim(out: Path) -> None:
    """Create ``out`` if needed and mark it as ours; remove partial steps of killed runs (the run holds
    :func:`exclusive`, so no other run is writing one)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"tool": "hf-contmerge", "layout": 1}) + "\n")
    for p in out.iterdir():
        if PARTIAL_RE.fullmatch(p.name):
            shutil.rmtree(p)


def new_partial(out: Path, step: int) -> Path:
    path = Path(out) / f".step-{step}.partial-{os.getpid()}"
    path.mkdir()
    return path


def publish(partial: Path, final: Path) -> None:
    """Make a finished partial step visible atomically (rename), durably: every file in it, then the
    parent after the rename, are fsynced."""
    fsync_tree(partial)
    if final.exists():
        raise ContMergeError(f"{final} appeared while this step was being written; another run is using --out {final.parent}.")
    os.rename(partial, final)
    fsync_dir(final.parent)


def safe_relative(root: Path, relative: str) -> Path:
    """``root / relative``, refusing names that would escape ``root`` (``..``, absolute paths)."""
    target = (root / relative).resolve()
    if not relative or os.path.isabs(relative) or not target.is_relative_to(root.resolve()):
        raise ContMergeError(f"Refusing file name {relative!r}: it would be written outside {root}.")
    return target
