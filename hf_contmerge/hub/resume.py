"""Continue a stream from a step published on the Hub (``--resume-from ORG/NAME[@REV]``).

A pushed step folder holds everything the next step needs (weights, ``contmerge_state.json``, the
carried float32 tensors in ``contmerge_state/``, task heads). It is downloaded at the asked revision
(a tag such as ``step-3``, a branch, or a commit), checked to be an hf-contmerge step, and placed
in ``OUT/step-K`` the same atomic way a computed step is; the run then proceeds as ``--resume``,
which compares the recorded base, method, parameters and stream prefix with what is asked.

The repo's file list is read first and any name that would land outside the step folder (absolute, or with
a ``..`` segment) refuses the repo before anything is downloaded. With ``HF_HUB_OFFLINE`` set the step comes
from the local Hub cache, unlisted.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..artifacts import layout
from ..artifacts.layout import GITATTRIBUTES
from ..artifacts.state import StepState, read_state
from ..errors import ContMergeError
from ..io.remote import SourceSpec, hub_errors, remote_metadata


def escapes(name: str) -> bool:
    """Whether a repo file name would be written outside the folder it is downloaded into: empty, absolute
    (POSIX, drive or UNC) or with a ``..`` segment: what ``layout.safe_relative`` refuses, decided from the
    name alone (no folder needed yet), and as strict as huggingface_hub's own check of downloaded names."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return not name or os.path.isabs(name) or name.startswith(("/", "\\")) or bool(PureWindowsPath(name).drive) or ".." in parts


def materialise(published: str, out: Path, token: str | None, check: Callable[[StepState], None]) -> int:
    """Bring the published step into ``out`` (unless already there); return its step number.

    The repo's file list comes first: a name that would escape the step folder (:func:`escapes`) refuses
    the repo before anything is downloaded. Offline (``HF_HUB_OFFLINE``) the cached snapshot is used as it
    is. ``check`` validates the published state against what is asked (it raises to refuse) before
    anything is written.
    """
    from huggingface_hub import snapshot_download

    spec = SourceSpec.parse(published)
    if spec.is_local:
        raise ContMergeError(f"--resume-from {published!r} is a local folder; use --out on that folder with --resume instead.")
    if not spec.cache_only:  # offline, nothing can be listed: the cache holds only names huggingface_hub accepted
        _, files = remote_metadata(spec, token)
        if bad := sorted(n for n in files if escapes(n)):
            raise ContMergeError(
                f"--resume-from {published}: the repo's file list names {bad[0]!r}, which would be written outside the "
                f"step folder (an absolute path or a '..' segment); hf-contmerge never writes such a repo's files. "
                "Nothing was downloaded or written. Resume from a repo that hf-contmerge pushed, or check the repo id and revision."
            )
    # Downloaded at the revision as asked (not the listed commit), so the cache records the tag/branch for a later
    # offline run. Should the revision move in between, huggingface_hub refuses such names itself (a ValueError,
    # mapped by hub_errors) and the copy below goes through safe_relative.
    with hub_errors(spec):
        folder = Path(snapshot_download(spec.location, revision=spec.revision, token=token))
    state = read_state(folder)  # refuses a repo that holds no hf-contmerge step
    check(state)
    done = layout.complete_steps(out)
    if state.step in done:
        local = read_state(layout.step_dir(out, state.step))
        if (local.base, local.stream, local.method, local.params) != (state.base, state.stream, state.method, state.params):
            raise ContMergeError(
                f"--out {out} already has a step-{state.step} that differs from the one published in {published}. "
                "Use another --out to continue from the published step."
            )
        return state.step
    if done and done[-1] > state.step:
        raise ContMergeError(f"--out {out} already holds steps up to {done[-1]}, past the published step {state.step}.")
    layout.claim(out)
    partial = layout.new_partial(out, state.step)
    try:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if path.is_dir() or rel.parts[0] == ".cache" or rel.name == GITATTRIBUTES:
                continue
            dest = layout.safe_relative(partial, str(rel))  # repo file names never escape the step folder
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
        layout.publish(partial, layout.step_dir(out, state.step))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return state.step
