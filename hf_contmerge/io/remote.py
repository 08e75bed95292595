"""Hub sources: a repo id with an optional revision, fetched or known from its headers alone.

A source is written ``PATH`` (an existing local folder) or ``ORG/NAME[@REVISION]`` (a Hub repo,
fetched with ``huggingface_hub.snapshot_download``: only weights, configs and tokenizer files,
honouring ``HF_HUB_OFFLINE`` and the usual cache). The resolved commit hash is recorded so a card
and a resume can say exactly what went in. huggingface_hub is imported only where a Hub call is made.

Every Hub call runs inside :func:`hub_errors`, which turns whatever it raises (typed Hub errors,
offline mode, an unreachable server, an answer that is not a Hub API response) into one
:class:`ContMergeError` naming the source.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import torch

from ..errors import ContMergeError
from .checkpoint import SIDE_PATTERNS, Checkpoint, TensorIndex, refuse_outside_links
from .safetensors import TensorInfo

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set: Hub sources then come from the local
    Hub cache only. huggingface_hub reads the variable once, at import, into ``constants.HF_HUB_OFFLINE``,
    and its own guard reads that constant at call time; so does this."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@dataclass(frozen=True)
class SourceSpec:
    """A source as the user wrote it, split into location and optional revision."""

    text: str
    location: str
    revision: str | None
    is_local: bool

    @classmethod
    def parse(cls, text: str) -> SourceSpec:
        expanded = os.path.expanduser(text)
        if os.path.isdir(expanded):
            return cls(text, str(Path(expanded).resolve()), None, True)
        if os.path.exists(expanded):
            raise ContMergeError(f"Source {text!r} is a file; give the folder that holds the model.")
        location, _, revision = text.partition("@")
        looks_local = text.startswith((".", "/", "~")) or os.sep in location.strip("/").replace("/", "", 1)
        if looks_local or not REPO_ID.match(location):
            raise ContMergeError(
                f"Source {text!r} is neither an existing folder nor a Hub repo id (ORG/NAME[@REVISION]). "
                "Check the path, or the spelling of the repo id."
            )
        return cls(text, location, revision or None, False)

    @property
    def cache_only(self) -> bool:
        """A Hub source that can only come from the local Hub cache (:func:`hub_offline`): no metadata call
        can be made for it, only ``snapshot_download``, which returns the cached snapshot."""
        return not self.is_local and hub_offline()


def hub_endpoint() -> str:
    """The Hub endpoint calls go to (``HF_ENDPOINT``), without any user:password part, for messages."""
    from huggingface_hub import constants

    try:
        parts = urlsplit(str(constants.ENDPOINT))
        host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname  # IPv6
        host = f"{host}:{parts.port}" if host and parts.port else host
    except ValueError:  # a malformed HF_ENDPOINT: say so rather than echo it
        return "HF_ENDPOINT (malformed)"
    return f"{parts.scheme}://{host}{parts.path}".rstrip("/") if host else "HF_ENDPOINT (malformed)"


def not_a_hub_answer(spec: SourceSpec, what: str) -> ContMergeError:
    """The refusal for an answer from the Hub that hf-contmerge cannot use (``what``: which kind of failure)."""
    return ContMergeError(
        f"Fetching {spec.text} failed: the Hub at {hub_endpoint()} answered something that is not a Hub API response "
        f"({what}). Check HF_ENDPOINT (it must point at the Hub or a Hub mirror, not at a proxy or a login page), "
        f"or try again later; if it repeats once the Hub answers again, clear the repo from the Hub cache "
        f"(`hf cache rm model/{spec.location}`)."
    )


def _module_errors(module_name: str, names: tuple[str, ...]) -> tuple[type[BaseException], ...]:
    """Exception classes of an HTTP library, if it was imported (if not, nothing can have raised them)."""
    module = sys.modules.get(module_name)
    return tuple(c for n in names if isinstance(c := getattr(module, n, None), type) and issubclass(c, BaseException))


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures and timeouts of whichever HTTP library huggingface_hub uses (httpx2 in 2.x,
    httpx in 1.x, requests before), when they escape its calls untyped."""
    return (ConnectionError, TimeoutError, *_module_errors("httpx2", ("TransportError",)),
            *_module_errors("httpx", ("TransportError",)), *_module_errors("requests", ("ConnectionError", "Timeout")))


def _garbage_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub's parsing raises on an answer that is not JSON, or JSON of another shape (its own
    ``assert`` on a missing ``sha`` included), and the HTTP libraries' other errors (undecodable bodies,
    redirect loops). Only Hub calls run inside :func:`hub_errors`, so these are never our own bugs."""
    from huggingface_hub.errors import SafetensorsParsingError

    return (ValueError, KeyError, TypeError, AttributeError, AssertionError, SafetensorsParsingError,
            *_module_errors("httpx2", ("HTTPError",)), *_module_errors("httpx", ("HTTPError",)),
            *_module_errors("requests", ("RequestException",)))


@contextmanager
def hub_errors(spec: SourceSpec) -> Iterator[None]:
    """Turn what a Hub call raises into one :class:`ContMergeError` naming ``spec`` and the fix.

    Wrap Hub calls only: besides huggingface_hub's typed errors, offline mode and connection failures, an
    answer that is not a Hub API response (not JSON, JSON of another shape, names a client refuses) surfaces
    as ``ValueError``/``KeyError``/``TypeError``/... from inside huggingface_hub, and is reported as such.
    Messages are built from the source, the endpoint (without credentials) and exception class names,
    never from an exception's text, so a token never shows.
    """
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except ContMergeError:
        raise
    except GatedRepoError:
        raise ContMergeError(f"{spec.text} is gated: accept its terms on the Hub and pass --token (or log in).") from None
    except RepositoryNotFoundError:
        raise ContMergeError(
            f"{spec.text!r} is not a local folder, and Hub repo {spec.location} was not found (or is private). "
            "Check the path or the id, or pass --token / log in."
        ) from None
    except RevisionNotFoundError:
        raise ContMergeError(f"Revision {spec.revision!r} of {spec.location} does not exist. Check the branch/tag/commit.") from None
    except LocalEntryNotFoundError as e:  # also IncompleteSnapshotError (a partial snapshot; by name: recent versions only)
        if hub_offline():
            raise ContMergeError(
                f"{spec.text} is not {'fully ' if e.__class__.__name__ == 'IncompleteSnapshotError' else ''}in the local "
                "Hub cache, and HF_HUB_OFFLINE is set. Download it first where the Hub can be reached "
                f"(`hf download {spec.location}`{f' --revision {spec.revision}' if spec.revision else ''}, with the same "
                "HF_HOME / HF_HUB_CACHE), unset HF_HUB_OFFLINE, or give a local folder."
            ) from None
        raise ContMergeError(
            f"{spec.text} is not in the local Hub cache and the Hub cannot be reached (offline?). "
            "Download it first, unset HF_HUB_OFFLINE, or give a local folder."
        ) from None
    except OfflineModeIsEnabled:  # a call that has no cache to fall back on (before ConnectionError, its base)
        raise ContMergeError(
            f"{spec.text} needs the Hub, but HF_HUB_OFFLINE is set. Unset HF_HUB_OFFLINE, or give a local folder."
        ) from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "")
        raise ContMergeError(f"Fetching {spec.text} from the Hub failed ({e.__class__.__name__} {status}). Try again later.") from None
    except HFValidationError:  # huggingface_hub's own check of the id, stricter than SourceSpec.parse
        raise ContMergeError(
            f"{spec.text!r} is not a valid Hub repo id or revision: ids are ORG/NAME of letters, digits, '-', '_' "
            "and '.', without '--' or '..', at most 96 characters. Check the spelling."
        ) from None
    except _transport_errors() as e:
        raise ContMergeError(
            f"Fetching {spec.text} failed: the Hub at {hub_endpoint()} could not be reached ({e.__class__.__name__}). "
            "Check the network and HF_ENDPOINT and try again, or set HF_HUB_OFFLINE=1 to use what the Hub cache holds."
        ) from None
    except _garbage_errors() as e:
        raise not_a_hub_answer(spec, e.__class__.__name__) from None


def fetch(spec: SourceSpec, *, token: str | None = None, allow_pickle: bool = False,
          revision: str | None = None) -> tuple[Path, str | None]:
    """The local folder for ``spec`` (downloaded weights, configs, tokenizer) and its commit hash.

    A folder holding a link to a file outside it is refused (:func:`~.checkpoint.refuse_outside_links`);
    a Hub snapshot's links into its own repo's ``blobs/`` are what the cache is made of."""
    if spec.is_local:
        folder = Path(spec.location)
        refuse_outside_links(folder, _links_root(folder), f"source {spec.text!r}")
        return folder, None
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", *SIDE_PATTERNS] + (["*.bin"] if allow_pickle else [])
    with hub_errors(spec):
        folder = Path(snapshot_download(spec.location, revision=revision or spec.revision, allow_patterns=patterns, token=token))
    refuse_outside_links(folder, _links_root(folder), f"source {spec.text!r}")
    # snapshot_download returns .../snapshots/<commit hash>
    return folder, folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else None


def _links_root(folder: Path) -> Path:
    """Where a source's links may point: its own folder, or for a snapshot of the Hub cache
    (``models--org--name/snapshots/<commit>``, downloaded or given as a local path) the repo's folder,
    whose ``blobs/`` hold the files the snapshot links to."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


class RemoteCheckpoint(TensorIndex):
    """A Hub checkpoint known from its safetensors headers alone; weights are fetched on first read.

    The pre-flight of a whole stream needs only names, shapes and dtypes, which
    ``get_safetensors_metadata`` reads with HTTP range requests. The download happens when the
    item's step starts, pinned to the commit resolved in the pre-flight, and what arrives must
    match the headers the pre-flight saw.
    """

    def __init__(self, spec: SourceSpec, sha: str, tensors: dict[str, TensorInfo], token: str | None, allow_pickle: bool):
        self.spec, self.sha, self._info = spec, sha, tensors
        self._token, self._allow_pickle = token, allow_pickle
        self._real: Checkpoint | None = None
        self.folder: Path | None = None

    def fetch(self) -> Checkpoint:
        if self._real is None:
            self.folder, _ = fetch(self.spec, token=self._token, allow_pickle=self._allow_pickle, revision=self.sha)
            real = Checkpoint.open(self.folder, allow_pickle=self._allow_pickle, label=f"stream item {self.spec.text!r}")
            changed = [k for k in self._info if k not in real or (real.info(k).shape, real.info(k).dtype)
                       != (self._info[k].shape, self._info[k].dtype)] + [k for k in real.keys() if k not in self._info]
            if changed:
                raise ContMergeError(
                    f"{self.spec.text} at {self.sha[:12]} does not match its own headers read in the pre-flight "
                    f"(tensor {changed[0]!r}); the download is damaged. Delete it from the Hub cache and run again with --resume."
                )
            self._real = real
        return self._real

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.fetch().read(key, rows)

    def file_of(self, key: str) -> Path:
        return self.fetch().file_of(key)

    def close(self) -> None:
        if self._real is not None:
            self._real.close()


def remote_metadata(spec: SourceSpec, token: str | None) -> tuple[str, dict[str, int]]:
    """Commit hash and file sizes of a Hub source, without downloading anything large.

    An answer that parses but lacks a commit hash or a well-formed file list is refused like one that does not
    parse (:func:`not_a_hub_answer`): the hash pins every later download, the names and sizes plan it."""
    from huggingface_hub import HfApi

    with hub_errors(spec):
        info = HfApi(token=token).model_info(spec.location, revision=spec.revision, files_metadata=True)
    sha, siblings = getattr(info, "sha", None), getattr(info, "siblings", None) or []
    if not isinstance(sha, str) or not COMMIT_SHA.fullmatch(sha):
        raise not_a_hub_answer(spec, "no commit hash")
    files: dict[str, int] = {}
    for sibling in siblings:
        name, size = getattr(sibling, "rfilename", None), getattr(sibling, "size", None) or 0
        if not isinstance(name, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise not_a_hub_answer(spec, "a malformed file list")
        files[name] = size
    return sha, files
