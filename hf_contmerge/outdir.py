"""The output folder: ``OUT/step-1 … OUT/step-T``, each written whole or not at all.

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
from pathlib import Path

from .errors import ContMergeError
from .safetensors_io import fsync_dir

MARKER = ".hf-contmerge.json"
STEP_RE = re.compile(r"step-([1-9]\d*)")
PARTIAL_RE = re.compile(r"\.step-[1-9]\d*\.partial-\d+")


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
            if not (out / e / "contmerge_state.json").is_file():
                raise ContMergeError(f"{out / e} has no contmerge_state.json: it was not written by hf-contmerge. Move it away.")
            steps.append(int(m.group(1)))
    return sorted(steps)


def claim(out: Path) -> None:
    """Create ``out`` if needed and mark it as ours; remove partial steps of killed runs."""
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
    """Make a finished partial step visible atomically (rename), durably (fsync the parent)."""
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
