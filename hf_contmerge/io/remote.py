"""Hub sources: a repo id with an optional revision, fetched or known from its headers alone.

A source is written ``PATH`` (an existing local folder) or ``ORG/NAME[@REVISION]`` (a Hub repo,
fetched with ``huggingface_hub.snapshot_download``: only weights, configs and tokenizer files,
honouring ``HF_HUB_OFFLINE`` and the usual cache). The resolved commit hash is recorded so a card
and a resume can say exactly what went in. huggingface_hub is imported only where a Hub call is made.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ContMergeError
from .checkpoint import SIDE_PATTERNS, Checkpoint, TensorIndex, refuse_outside_links
from .safetensors import TensorInfo

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


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


@contextmanager
def hub_errors(spec: SourceSpec) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one clear message (never echoing a token)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError:
        raise ContMergeError(f"{spec.text} is gated: accept its terms on the Hub and pass --token (or log in).") from None
    except RepositoryNotFoundError:
        raise ContMergeError(
            f"{spec.text!r} is not a local folder, and Hub repo {spec.location} was not found (or is private). "
            "Check the path or the id, or pass --token / log in."
        ) from None
    except RevisionNotFoundError:
        raise ContMergeError(f"Revision {spec.revision!r} of {spec.location} does not exist. Check the branch/tag/commit.") from None
    except LocalEntryNotFoundError:
        raise ContMergeError(
            f"{spec.text} is not in the local Hub cache and the Hub cannot be reached (offline?). "
            "Download it first, unset HF_HUB_OFFLINE, or give a local folder."
        ) from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "")
        raise ContMergeError(f"Fetching {spec.text} from the Hub failed ({e.__class__.__name__} {status}). Try again later.") from None


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
    """Commit hash and file sizes of a Hub source, without downloading anything large."""
    from huggingface_hub import HfApi

    with hub_errors(spec):
        info = HfApi(token=token).model_info(spec.location, revision=spec.revision, files_metadata=True)
    return info.sha, {f.rfilename: f.size or 0 for f in info.siblings or []}
