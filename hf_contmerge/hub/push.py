"""Publishing step folders to the Hugging Face Hub (``--push-to``), one atomic commit per step.

Layouts (``--push-layout``)
---------------------------
- ``single`` (default): one repo ``ORG/NAME``. Step *t* is one commit on ``main`` whose tree is exactly
  ``OUT/step-t`` (plus the Hub's ``.gitattributes``), and the tag ``{revision_prefix}{t}`` (``step-1``,
  ``step-2``, …) points at that commit. So ``main`` always holds the latest pushed step and
  ``from_pretrained(repo, revision="step-2")`` loads step 2.
- ``per-step``: one repo per step, named by a template with ``{step}`` (``org/model-step-{step}``); its
  ``main`` holds that step and the same tag marks it.

Guarantees
----------
- **Atomic.** A step is one ``HfApi.create_commit``: every file of the step folder is added and every
  other file on ``main`` (stale shards of the previous step, an index that no longer applies) is
  deleted in the same commit; ``.gitattributes`` is kept. Large files take the library's own path
  (preupload, then Xet/LFS) before that one commit is sent. ``upload_folder`` is not used on purpose:
  with ``hf_xet`` installed (the default) it runs a pipelined uploader that splits a folder into several
  commits ("(part N)") when it has many files, holds much inline content, takes over five minutes, or
  a commit fails, and every split would show a half step on ``main``. The commit names its parent
  (``main``'s head read just before), so a concurrent writer makes it fail instead of mixing trees.
- **Resumable and idempotent.** The tag is created after the commit. Pushing a step again is safe: if
  its tag already points at a commit holding the same ``contmerge_state.json`` nothing is sent; if
  ``main`` already holds the step (a run stopped between commit and tag) only the tag is created; a
  retried commit whose first attempt went through finds nothing to change and adds no commit.
  :func:`push_missing` pushes the complete local steps that are not on the Hub yet, in increasing
  order, so ``main`` ends at the latest. A tag that points at another run's step is refused, never moved.
- **Retries.** Every Hub call is retried on HTTP 5xx, 429 and connection errors/timeouts, up to
  ``retries`` times, waiting ``backoff · 2^k`` seconds before retry *k* (k = 0, 1, …), capped at
  :data:`MAX_BACKOFF`; a ``Retry-After`` header (seconds or HTTP date) lengthens the wait up to
  :data:`MAX_RETRY_AFTER`. Other 4xx errors are not retried. A push that still fails leaves the local
  step complete and raises :class:`ContMergeError` telling to rerun with ``--resume``.
- **Pre-flight.** :func:`check_target` runs before anything is computed: it checks the token, refuses a
  repo that exists with files but was not written by hf-contmerge (unless ``--push-existing``), and
  refuses tags that the run would have to overwrite.
- **The token** is passed to ``HfApi`` only. It is never printed, logged, written to the card or the
  state, or put in an error message: messages are built from exception class names and HTTP status
  codes, and every text taken from an exception goes through :func:`_redact`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from .._version import __version__
from ..artifacts.layout import GITATTRIBUTES, STATE_FILE, step_dir
from ..artifacts.state import StepState, read_state
from ..errors import ContMergeError
from ..io.remote import hub_offline

logger = logging.getLogger(__name__)

MAX_BACKOFF = 60.0  # seconds: longest computed wait between two attempts
MAX_RETRY_AFTER = 300.0  # seconds: longest wait a server's Retry-After can impose

_T = TypeVar("_T")
Log = Callable[[str], None]  # where retry notices and progress go (the engine passes its own; default: logging)
_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9_]{4,}")
_BEARER_RE = re.compile(r"(?i)(bearer\s+)\S+")
_HINTS = {  # what an HTTP status means for a push, for the user
    401: "the Hub did not accept the token (or none was given): pass --token, set HF_TOKEN or run `hf auth login`",
    403: "the token cannot write to this repo",
    404: "repo not found, or the token has no access to it",
    409: "conflict with the repo's current state",
    412: "main changed while pushing (another writer?)",
    429: "rate limited by the Hub",
}


# --------------------------------------------------------------------------------------------- the target


@dataclass(frozen=True)
class PushTarget:
    """Where and how steps are pushed.

    ``repo``: ``ORG/NAME`` (layout ``single``) or a template containing ``{step}`` (layout ``per-step``).
    ``backoff``: seconds before the first retry, doubled for each further retry (capped at MAX_BACKOFF).
    """

    repo: str
    private: bool
    layout: Literal["single", "per-step"]
    revision_prefix: str
    allow_existing: bool
    retries: int
    backoff: float = 1.0

    def __post_init__(self) -> None:
        templated = "{step}" in self.repo
        if self.layout == "per-step" and not templated:
            raise ContMergeError(f"--push-layout per-step needs a --push-to template containing {{step}}, not {self.repo!r}.")
        if self.layout == "single" and templated:
            raise ContMergeError(f"--push-to {self.repo!r} is a template: add --push-layout per-step, or give one repo ORG/NAME.")
        if self.retries < 0 or self.backoff < 0:
            raise ContMergeError("--push-retries and the push backoff must not be negative.")
        if not self.revision_prefix or not re.fullmatch(r"[\w.\-/]+", self.revision_prefix):
            raise ContMergeError(f"--revision-prefix {self.revision_prefix!r} is not a valid tag prefix (letters, digits, . _ - /).")

    @classmethod
    def from_options(cls, options: Any) -> PushTarget | None:
        """The target described by a :class:`~hf_contmerge.options.MergeOptions`; None without ``push_to``."""
        if options.push_to is None:
            return None
        return cls(
            repo=options.push_to,
            private=options.private,
            layout=options.push_layout,
            revision_prefix=options.revision_prefix,
            allow_existing=options.push_existing,
            retries=options.push_retries,
        )

    def repo_for(self, step: int) -> str:
        """The repo that holds ``step``: the repo itself, or the template filled in."""
        return self.repo.replace("{step}", str(step)) if self.layout == "per-step" else self.repo

    def tag_for(self, step: int) -> str:
        """The tag that marks ``step``: ``{revision_prefix}{step}``."""
        return f"{self.revision_prefix}{step}"

    def step_of_tag(self, tag: str) -> int | None:
        """Inverse of :meth:`tag_for`: the step a tag names, or None for other tags."""
        match = re.fullmatch(re.escape(self.revision_prefix) + r"([1-9]\d*)", tag)
        return int(match.group(1)) if match else None


def commit_message(state: StepState) -> str:
    """``"step {t}: {method} + {new item as given}"``, the title of a step's commit."""
    return f"step {state.step}: {state.method} + {state.stream[-1]['source']}"


def _commit_description(state: StepState) -> str:
    item = state.stream[-1]
    revision = f" at revision {item['revision']}" if item.get("revision") else ""
    return (
        f"Written by hf-contmerge {__version__}: step {state.step} of a continual merge ({state.method}, "
        f"parameters {state.params}) of base {state.base['source']}; the new item is {item['source']}{revision}. "
        f"See README.md for the lineage and {STATE_FILE} for the carried state."
    )


# ---------------------------------------------------------------------------------- errors and retrying


def _redact(text: str, secret: str | None = None) -> str:
    """``text`` with anything that looks like a token replaced by ``***``: the given secret, ``hf_…``
    strings, and whatever follows ``Bearer``."""
    if secret:
        text = text.replace(secret, "***")
    text = _BEARER_RE.sub(r"\1***", text)
    return _TOKEN_RE.sub("hf_***", text)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection errors and timeouts worth retrying, of whichever HTTP library huggingface_hub uses
    (httpx2 in 2.x, httpx in 1.x, requests before) plus the built-in ones."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name, names in (
        ("httpx2", ("TimeoutException", "NetworkError", "RemoteProtocolError")),
        ("httpx", ("TimeoutException", "NetworkError", "RemoteProtocolError")),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        found += [getattr(module, n) for n in names if isinstance(getattr(module, n, None), type)]
    return tuple(found)


_TRANSPORT_ERRORS = _transport_errors()


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _retry_after(error: BaseException) -> float | None:
    """Seconds asked by a ``Retry-After`` header (delay-seconds or HTTP date), or None."""
    response = getattr(error, "response", None)
    value = (getattr(response, "headers", None) or {}).get("Retry-After")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max((parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds(), 0.0)
    except (TypeError, ValueError):
        return None


def _is_transient(error: BaseException) -> bool:
    """HTTP 5xx or 429, a connection error or a timeout; never offline mode (retrying cannot help)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return False
    status = _status(error)
    if status is not None:
        return status == 429 or 500 <= status < 600
    return isinstance(error, _TRANSPORT_ERRORS)


def retry_delay(error: BaseException, attempt: int, backoff: float) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): ``min(backoff·2^attempt, MAX_BACKOFF)``,
    lengthened to the server's ``Retry-After`` (at most MAX_RETRY_AFTER)."""
    delay = min(backoff * 2**attempt, MAX_BACKOFF)
    asked = _retry_after(error)
    return min(max(delay, asked), MAX_RETRY_AFTER) if asked is not None else delay


def _describe(error: BaseException, secret: str | None) -> str:
    """A short reason from the exception's class name and HTTP status only (the text may echo headers)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set; unset it to push"
    status = _status(error)
    if status is None:
        return _redact(type(error).__name__, secret)
    hint = _HINTS.get(status, "server error" if status >= 500 else "refused by the Hub")
    return _redact(f"HTTP {status} {type(error).__name__}: {hint}", secret)


class _HubCallFailed(Exception):
    """A Hub call that failed for good; ``reason`` is safe to show (redacted, no exception text)."""

    def __init__(self, reason: str, status: int | None) -> None:
        super().__init__(reason)
        self.reason, self.status = reason, status


@dataclass
class _Hub:
    """The Hub calls a push makes, each retried by :func:`retry_delay`'s policy."""

    target: PushTarget
    token: str | None = field(repr=False)  # never in a repr, a log line or a message
    log: Log
    api: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from huggingface_hub import HfApi

        self.api = HfApi(token=self.token, library_name="hf-contmerge", library_version=__version__)

    def call(self, what: str, fn: Callable[[], _T]) -> _T:
        """``fn()``, retried on transient errors; raises :class:`_HubCallFailed` when it gives up."""
        attempts = self.target.retries + 1
        for attempt in range(attempts):
            try:
                return fn()
            except ContMergeError:
                raise
            except Exception as error:  # any failure: classified below, re-raised as a safe message
                reason = _describe(error, self.token)
                if not _is_transient(error):
                    raise _HubCallFailed(reason, _status(error)) from None
                if attempt == attempts - 1:
                    raise _HubCallFailed(f"{reason}; gave up after {attempts} attempts", _status(error)) from None
                delay = retry_delay(error, attempt, self.target.backoff)
                self.log(f"{what}: {reason}; retry {attempt + 1}/{self.target.retries} in {delay:.2f} s")
                time.sleep(delay)
        raise AssertionError("unreachable")

    # -- reading --------------------------------------------------------------------------------------------

    def head(self, repo: str) -> _Head | None:
        """``main`` of ``repo`` (commit and file sizes), or None when the repo does not exist."""
        from huggingface_hub.errors import RepositoryNotFoundError

        def read() -> _Head | None:
            try:
                info = self.api.model_info(repo, revision="main", files_metadata=True)
            except RepositoryNotFoundError:
                return None
            return _Head(info.sha, {s.rfilename: s.size for s in info.siblings or []})

        return self.call(f"reading {repo}", read)

    def tags(self, repo: str) -> dict[str, str] | None:
        """``{tag: commit}`` of ``repo``, or None when the repo does not exist."""
        from huggingface_hub.errors import RepositoryNotFoundError

        def read() -> dict[str, str] | None:
            try:
                refs = self.api.list_repo_refs(repo)
            except RepositoryNotFoundError:
                return None
            return {t.name: t.target_commit for t in refs.tags}

        return self.call(f"listing the tags of {repo}", read)

    def state_at(self, repo: str, revision: str) -> bytes | None:
        """The bytes of ``contmerge_state.json`` at ``revision``, or None when there is none."""
        from huggingface_hub.errors import EntryNotFoundError

        def read() -> bytes | None:
            try:
                return Path(self.api.hf_hub_download(repo, STATE_FILE, revision=revision)).read_bytes()
            except EntryNotFoundError:
                return None

        return self.call(f"reading {STATE_FILE} of {repo}@{revision[:12]}", read)

    # -- writing --------------------------------------------------------------------------------------------

    def create_repo(self, repo: str) -> None:
        self.call(f"creating {repo}", lambda: self.api.create_repo(repo, private=self.target.private, exist_ok=True))

    def commit(self, repo: str, folder: Path, message: str, description: str) -> str:
        """One commit to ``main`` whose tree is exactly ``folder`` (plus .gitattributes); its id.

        Each attempt re-reads ``main`` and rebuilds the operations, so an attempt after one whose reply was
        lost finds nothing to change and returns ``main``'s head without a new commit.
        """
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        local = _local_files(folder)

        def attempt() -> str:
            info = self.api.model_info(repo, revision="main", files_metadata=True)
            stale = sorted(s.rfilename for s in info.siblings or [] if s.rfilename not in local and s.rfilename != GITATTRIBUTES)
            operations: list[Any] = [CommitOperationDelete(path_in_repo=p) for p in stale]
            operations += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p in sorted(local)]
            done = self.api.create_commit(
                repo, operations, commit_message=message, commit_description=description, parent_commit=info.sha
            )
            return done.oid

        return self.call(f"committing to {repo}", attempt)

    def tag(self, repo: str, tag: str, commit: str) -> None:
        """Create ``tag`` at ``commit``; fine if it is already there (a retried call), an error if elsewhere."""
        try:
            self.call(f"tagging {repo}", lambda: self.api.create_tag(repo, tag=tag, revision=commit))
        except _HubCallFailed as failure:
            if failure.status != 409:
                raise
            existing = (self.tags(repo) or {}).get(tag)
            if existing != commit:
                raise ContMergeError(
                    f"Tag {tag} of {repo} already points at commit {existing}, not at {commit}. hf-contmerge never "
                    "moves a tag: delete it on the Hub, or push with another --revision-prefix or --push-to."
                ) from None


@dataclass(frozen=True)
class _Head:
    sha: str
    sizes: dict[str, int | None]


def _local_files(folder: Path) -> dict[str, int]:
    """Every file under a step folder: posix path relative to it -> size."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _holds(head: _Head, folder: Path) -> bool:
    """Whether ``main`` has exactly the files of ``folder`` (plus .gitattributes) with the same sizes."""
    local = _local_files(folder)
    return {p: s for p, s in head.sizes.items() if p != GITATTRIBUTES} == local


# ---------------------------------------------------------------------------------------------- the API


def check_target(target: PushTarget, token: str | None, steps: Iterable[int] = (), *, log: Log | None = None) -> None:
    """Pre-flight of a push, before anything is computed.

    Refuses, with :class:`ContMergeError`: a missing or read-only token; a repo that exists with files other
    than ``.gitattributes`` but no ``contmerge_state.json`` on ``main`` (not written by hf-contmerge) unless
    ``target.allow_existing``; a repo that already has the tag of a step this run will compute. ``steps``:
    the steps this run will compute (not those already complete); in the per-step layout they name the repos.
    A repo holding another hf-contmerge run is accepted here (the tags decide later). Network failures,
    after retries, are a ContMergeError too, and so is offline mode (``HF_HUB_OFFLINE``), at once.
    """
    if hub_offline():
        raise ContMergeError(
            f"--push-to {target.repo} needs the Hub, but HF_HUB_OFFLINE is set. Nothing was computed. Unset HF_HUB_OFFLINE "
            "to push, or run without --push-to and push later: the same command with --resume pushes the steps not yet on the Hub."
        )
    hub = _Hub(target, token, log or logger.warning)
    steps = sorted(set(steps))
    repos = [target.repo] if target.layout == "single" else [target.repo_for(s) for s in steps]
    repo = target.repo
    try:
        _check_token(hub)
        for repo in repos:
            head = hub.head(repo)
            if head is None:
                continue
            if set(head.sizes) - {GITATTRIBUTES} and STATE_FILE not in head.sizes and not target.allow_existing:
                raise ContMergeError(
                    f"--push-to {repo} exists and was not written by hf-contmerge (its main has files but no {STATE_FILE}). "
                    "Nothing was computed. Push to another repo, or pass --push-existing to replace its main with the steps."
                )
            tags = hub.tags(repo) or {}
            taken = [target.tag_for(s) for s in steps if target.repo_for(s) == repo and target.tag_for(s) in tags]
            if taken:
                raise ContMergeError(
                    f"--push-to {repo} already has tag {taken[0]}, which this run would write: it holds an earlier run. "
                    "Nothing was computed. Push to another repo, use another --revision-prefix, or resume that run with --resume."
                )
    except _HubCallFailed as failure:
        raise ContMergeError(
            f"Could not check --push-to {repo} on the Hub ({failure.reason}). Nothing was computed; "
            "check the network, the token and HF_ENDPOINT, then run the command again."
        ) from None


def _check_token(hub: _Hub) -> None:
    """A token must be found and accepted, and must not be read-only (fine-grained tokens are checked by the push)."""
    from huggingface_hub import get_token

    if not (hub.token or get_token()):
        raise ContMergeError(
            "Pushing needs a Hub token with write access: pass --token, set HF_TOKEN or run `hf auth login`. Nothing was computed."
        )
    try:
        me = hub.call("checking the token", lambda: hub.api.whoami(cache=False))
    except _HubCallFailed as failure:
        if failure.status == 401:
            raise ContMergeError(f"The Hub did not accept the token ({failure.reason}). Nothing was computed.") from None
        raise
    role = (((me.get("auth") or {}).get("accessToken") or {}).get("role") or "").lower()
    if role == "read":
        raise ContMergeError("The Hub token is read-only; pushing needs a token with write access. Nothing was computed.")


def push_step(
    step_folder: Path,
    step: int,
    target: PushTarget,
    token: str | None,
    message: str | None = None,
    *,
    log: Log | None = None,
) -> str:
    """Push one complete step folder as one commit to ``main`` of ``target.repo_for(step)`` and tag it
    ``target.tag_for(step)``; return the commit id. ``message`` defaults to :func:`commit_message` of the
    step's state.

    Idempotent: a step whose tag already holds the same ``contmerge_state.json`` is not pushed again (its
    commit is returned), and a ``main`` that already holds the step (same files and sizes, same state
    bytes) is only tagged. Raises :class:`ContMergeError` naming the step, the folder and the repo, with the
    ``--resume`` hint, when the Hub refuses or keeps failing.
    """
    folder = Path(step_folder)
    state = read_state(folder)
    if state.step != step:
        raise ContMergeError(f"{folder} holds step {state.step}, not step {step}; nothing was pushed.")
    local_state = (folder / STATE_FILE).read_bytes()
    repo, tag = target.repo_for(step), target.tag_for(step)
    hub = _Hub(target, token, log or logger.warning)
    try:
        hub.create_repo(repo)
        existing = (hub.tags(repo) or {}).get(tag)
        if existing is not None:
            if hub.state_at(repo, existing) == local_state:
                return existing
            raise ContMergeError(
                f"Tag {tag} of {repo} already marks another run's step {step} (its {STATE_FILE} differs from {folder}'s). "
                "Nothing was pushed. Push to another repo or use another --revision-prefix."
            )
        head = hub.head(repo)
        if head is not None and _holds(head, folder) and hub.state_at(repo, head.sha) == local_state:
            commit = head.sha  # a push that stopped between its commit and its tag
        else:
            commit = hub.commit(repo, folder, message or commit_message(state), _commit_description(state))
        hub.tag(repo, tag, commit)
        return commit
    except _HubCallFailed as failure:
        raise ContMergeError(
            f"Step {step} is complete in {folder} but could not be pushed to {repo} ({failure.reason}); "
            "run the same command with --resume to push the missing steps."
        ) from None


def pushed_steps(target: PushTarget, token: str | None, steps: Iterable[int] | None = None, *, log: Log | None = None) -> set[int]:
    """The steps on the Hub: tags ``{prefix}{t}`` of the repo (layout single; limited to ``steps`` when given),
    or, for the per-step layout, those of ``steps`` (required there) whose repo has its tag."""
    hub = _Hub(target, token, log or logger.warning)
    try:
        if target.layout == "single":
            found = {t for tag in (hub.tags(target.repo) or {}) if (t := target.step_of_tag(tag)) is not None}
            return found if steps is None else found & set(steps)
        if steps is None:
            raise ValueError("pushed_steps: the per-step layout needs the step numbers to look for")
        return {s for s in steps if target.tag_for(s) in (hub.tags(target.repo_for(s)) or {})}
    except _HubCallFailed as failure:
        raise ContMergeError(
            f"Could not read which steps are on {target.repo} ({failure.reason}); the local steps are complete: "
            "run the same command with --resume to push the missing ones."
        ) from None


def push_missing(out: Path, target: PushTarget, token: str | None, steps: list[int], *, log: Log | None = None) -> list[int]:
    """Push the complete local steps ``steps`` of ``out`` that are not on the Hub yet, in increasing order
    (so ``main`` ends at the latest), and return them. Steps already on the Hub must be the same steps
    (same ``contmerge_state.json``); in the single layout a missing step older than one on the Hub is
    refused, since pushing it would move ``main`` back."""
    progress = log or logger.info
    log = log or logger.warning
    steps = sorted(set(steps))
    on_hub = pushed_steps(target, token, steps, log=log)
    _check_same_steps(out, target, token, sorted(on_hub), log)
    missing = [s for s in steps if s not in on_hub]
    if target.layout == "single" and missing and on_hub and missing[0] < max(on_hub):
        raise ContMergeError(
            f"{target.repo} has {target.tag_for(max(on_hub))} but not {target.tag_for(missing[0])}: pushing step "
            f"{missing[0]} now would move main back. Delete the later tags on the Hub or push to another repo."
        )
    for step in missing:
        push_step(step_dir(out, step), step, target, token, log=log)
        progress(f"pushed step {step} to {target.repo_for(step)} ({target.tag_for(step)})")
    return missing


def _check_same_steps(out: Path, target: PushTarget, token: str | None, steps: list[int], log: Log) -> None:
    """Each of ``steps`` (tagged on the Hub) must hold the local step's exact state file."""
    hub = _Hub(target, token, log)
    for step in steps:
        repo, tag = target.repo_for(step), target.tag_for(step)
        try:
            remote = hub.state_at(repo, tag)
        except _HubCallFailed as failure:
            raise ContMergeError(
                f"Could not read {tag} of {repo} ({failure.reason}); the local steps are complete: "
                "run the same command with --resume to push the missing ones."
            ) from None
        if remote != (step_dir(out, step) / STATE_FILE).read_bytes():
            raise ContMergeError(
                f"{tag} of {repo} holds another run's step {step} (its {STATE_FILE} differs from {step_dir(out, step)}'s). "
                "Nothing was pushed. Push to another repo or use another --revision-prefix."
            )
