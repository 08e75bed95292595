"""A small Hugging Face Hub-compatible HTTP server for tests, standard library only.

It lets the real ``huggingface_hub`` / ``transformers`` / ``peft`` code paths run without a network:
``create_repo``, ``repo_info``/``model_info``, ``list_repo_files``/``list_repo_tree``, ``list_repo_refs``,
``list_repo_commits``, ``get_paths_info``, ``create_commit``/``upload_folder`` (preupload + NDJSON commit),
``create_branch``/``delete_branch``, ``create_tag``/``delete_tag``, ``hf_hub_download``, ``snapshot_download``,
``file_exists``, ``get_safetensors_metadata`` (HEAD + Range GETs + index), ``get_sharded_safetensors_metadata``
and ``from_pretrained(repo_id, revision=...)``.

Routes and JSON shapes follow the client in huggingface_hub 2.4 (``hf_api.py``, ``_commit_api.py``,
``file_download.py``, ``_snapshot_download.py``, ``utils/_http.py``):

- ``POST /api/repos/create`` (409 with ``url`` when the repo exists, so ``exist_ok`` works),
  ``DELETE /api/repos/delete``
- ``GET /api/{models|datasets|spaces}/{ns}/{name}[/revision/{rev}]`` -> ``id``, ``sha``, ``siblings[].rfilename``, ...
- ``GET .../tree/{rev}[/{path}]``, ``GET .../refs``, ``GET .../commits/{rev}``, ``POST .../paths-info/{rev}``
- ``POST .../preupload/{rev}`` -> always ``uploadMode: "regular"`` (never ``lfs``), so no LFS or Xet transfer
  is ever attempted; ``oid`` is the git blob sha1 of the file already at that revision, which lets the client drop
  unchanged files exactly as against the real Hub.
- ``POST .../commit/{rev}`` (NDJSON: ``header`` with ``summary``/``description``/``parentCommit``, ``file`` with
  base64 content, ``deletedFile``, ``deletedFolder``; ``lfsFile`` is refused with 400; ``?create_pr=1`` opens
  ``refs/pr/N``)
- ``POST|DELETE .../branch/{branch}``, ``POST .../tag/{rev}`` and ``DELETE .../tag/{tag}``
- ``GET /api/models/{ns}/{name}/safetensors-metadata/{index}`` (main only, like the Hub)
- ``HEAD|GET /[datasets/|spaces/]{ns}/{name}/resolve/{rev}/{path}`` with ``ETag`` (git blob sha1),
  ``X-Repo-Commit``, ``Content-Length``, ``Accept-Ranges`` and ``Range`` support (206 / 416)
- ``POST /api/validate-yaml`` (accepts everything), ``GET /api/whoami-v2``, ``GET /api/agent-harnesses`` (empty)

Errors carry the ``X-Error-Code`` header huggingface_hub maps to typed exceptions: ``RepoNotFound`` ->
``RepositoryNotFoundError``, ``RevisionNotFound`` -> ``RevisionNotFoundError``, ``EntryNotFound`` ->
``RemoteEntryNotFoundError`` (404s for a missing file also carry ``X-Repo-Commit``, as on the Hub).

Storage: one folder per repo under ``root/{type}s/{ns}/{name}`` holding ``objects/`` (blobs named by their git blob
sha1), ``commits/`` (one JSON per commit; id = sha1 hex of the commit's canonical JSON), ``refs.json`` (branches,
tags, pull-request refs) and ``info.json``. Like the Hub, a new repo starts with one commit holding
``.gitattributes`` on ``main``. Revisions are branch names, tag names, ``refs/heads/*``, ``refs/tags/*``,
``refs/pr/N``, full commit shas or unique sha prefixes of 7+ characters (URL-encoded in paths, as the client
sends them).

Pointing the clients at the server after they were imported
------------------------------------------------------------
huggingface_hub reads ``HF_ENDPOINT`` once, at import (``constants.ENDPOINT`` and
``constants.HUGGINGFACE_CO_URL_TEMPLATE``), so setting the environment variable later is not enough.
``HfApi(endpoint=...)``, ``hf_hub_download(endpoint=...)`` and ``snapshot_download(endpoint=...)`` accept an explicit
endpoint, but transformers and peft never pass one. :func:`patch_hub_clients` therefore patches, for the duration
of the context only (everything is restored on exit):

- ``huggingface_hub.constants.ENDPOINT``: default of every ``HfApi()`` created afterwards (``hf_api.py``
  ``self.endpoint = endpoint if endpoint is not None else constants.ENDPOINT``) and of ``_commit_api``, ``lfs``,
  ``repocard`` (``ModelCard.validate``) and ``utils/_xet``;
- ``huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE``: read at call time by ``hf_hub_url``, hence by
  ``hf_hub_download``, ``snapshot_download`` and transformers' ``cached_file``;
- ``huggingface_hub.hf_api.api.endpoint``: the module-level ``HfApi()`` created at import whose bound methods are
  the public functions (``huggingface_hub.create_repo``, ``model_info``, ``file_exists`` used by peft, ...);
- ``transformers.utils.hub._hf_api`` reset to ``None``: transformers' lazily created shared ``HfApi`` (used for
  ``resolve_revision``, ``create_repo``, ``model_info``), which would keep an endpoint from before the patch;
- ``datasets.config.HF_ENDPOINT`` / ``HUB_DATASETS_URL`` when datasets is imported;
- the cache and token locations derived from ``HF_HOME`` (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_ASSETS_CACHE``,
  ``HF_XET_CACHE``, ``HF_TOKEN_PATH``, ``HF_STORED_TOKENS_PATH``, ``AGENT_HARNESSES_PATH``), so the user's cache
  and stored token are never touched or sent;
- ``HF_HUB_OFFLINE`` = False (a suite may run with ``HF_HUB_OFFLINE=1`` for safety) and
  ``HF_HUB_DISABLE_TELEMETRY`` = True; the agent-harness registry cache is primed empty so no request leaves for it;
- the environment (``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_DISABLE_TELEMETRY``; ``HF_TOKEN``,
  ``HUGGING_FACE_HUB_TOKEN``, ``HF_OIDC_RESOURCE``, ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` removed), so that
  subprocesses (a CLI under test) reach the server too;
- the shared ``httpx`` client is closed on entry and exit so no pooled keep-alive connection outlives a server.

Xet is never used: the server sends no ``X-Xet-*`` headers and no ``xetHash`` in trees (downloads stay plain
HTTP) and preupload never answers ``lfs`` (uploads stay inline base64; with ``hf_xet`` installed ``upload_folder``
takes the pipelined path but only opens a Xet upload for non-regular files). ``disable_xet=True`` additionally sets
``constants.HF_HUB_DISABLE_XET`` and ``HF_HUB_DISABLE_XET=1``, which sends ``upload_folder`` through the legacy
single ``create_commit`` path.

Usage: ``tests/conftest.py`` re-exports the fixture with ``from hub_server import hub_server  # noqa: F401``
(``tests/`` has no ``__init__.py``, so pytest puts it on ``sys.path``); a test then takes ``hub_server`` and uses
``HfApi()``, ``hf_hub_download``, ``AutoModel.from_pretrained(repo_id, revision=...)`` as against the Hub. For other
options use ``with running_hub(tmp_path, require_token=True, disable_xet=True) as hub:``. ``hub.store`` reads the
server's state directly; ``hub.requests`` / ``hub.requests_to("commit")`` the log; ``hub.fail_next(...)`` injects
faults; ``hub.answer_next(...)`` answers a route with any body (non-JSON, or JSON of the wrong shape), as a
misconfigured ``HF_ENDPOINT``, a proxy or a captive portal would.

Not emulated: LFS/Xet storage (``lfsFile`` commit lines are refused), ``.gitignore`` handling in preupload
(``shouldIgnore`` is always false), ``cardData`` in repo info (no YAML parser in the standard library: download
``README.md`` instead), ``lastCommit``/security fields of ``expand=True`` listings, ``expand=`` filtering of repo
info, pagination (one page), discussions and PR metadata beyond the ``refs/pr/N`` ref, spaces' runtime routes.
A private repo read without a token answers 404 ``RepoNotFound`` (the Hub answers 401 with the same error code).
Replies are built in memory, so keep test files small.

Bounds: binds 127.0.0.1 on a free port chosen by the OS; daemon handler threads; a per-connection socket timeout;
open connections are shut down on :meth:`HubServer.stop`. The request body is always read, even for errors, so
HTTP/1.1 keep-alive stays in sync. The request log records method, path, route, status and whether an
``Authorization: Bearer`` header was sent, never the header itself.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import socketserver
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.client import HTTPMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import pytest

# Client-side names for the URL segment of each repo type (``/api/{segment}/...``).
_TYPE_BY_SEGMENT = {"models": "model", "datasets": "dataset", "spaces": "space"}
# URL prefix of each repo type in web and resolve URLs (models have none).
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# The .gitattributes the Hub writes in a new repo's initial commit (shortened: same kind of LFS rules).
_INITIAL_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.gguf filter=lfs diff=lfs merge=lfs -text\n"
)
_SHA_RE = re.compile(r"[0-9a-f]{40}")
_SHA_PREFIX_RE = re.compile(r"[0-9a-f]{7,39}")
_SAFETENSORS_MAX_HEADER = 100_000_000  # refuse absurd header lengths when counting parameters


# --------------------------------------------------------------------------------------------------- storage


def git_blob_oid(content: bytes) -> str:
    """Git blob id of ``content``: ``sha1(b"blob {len}\\0" + content)``, the Hub's ETag for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now_iso() -> str:
    """UTC time in the Hub's format ``%Y-%m-%dT%H:%M:%S.%fZ`` (milliseconds)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file and rename it into place, so readers never see half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


@dataclass(frozen=True)
class Commit:
    """One commit: a flat ``tree`` mapping each file path to its blob oid, plus the usual git metadata."""

    id: str
    parents: tuple[str, ...]
    title: str
    message: str
    date: str
    authors: tuple[str, ...]
    tree: dict[str, str]

    def payload(self) -> dict[str, Any]:
        """Everything except the id; the id is the sha1 hex of this payload's canonical JSON."""
        return {
            "parents": list(self.parents),
            "title": self.title,
            "message": self.message,
            "date": self.date,
            "authors": list(self.authors),
            "tree": dict(sorted(self.tree.items())),
        }

    @staticmethod
    def make(
        parents: tuple[str, ...], title: str, message: str, authors: tuple[str, ...], tree: dict[str, str]
    ) -> Commit:
        """Build a commit dated now; id = sha1 of the canonical JSON payload (content-addressed, like git)."""
        draft = Commit("", parents, title, message, _now_iso(), authors, dict(tree))
        canonical = json.dumps(draft.payload(), sort_keys=True, separators=(",", ":")).encode()
        return dataclasses.replace(draft, id=hashlib.sha1(canonical).hexdigest())


class RepoStore:
    """One repository on disk: ``objects/<oid>``, ``commits/<id>.json``, ``refs.json``, ``info.json``.

    Not thread-safe by itself: :class:`HubStore` serialises every request on one lock.
    """

    def __init__(self, root: Path, repo_type: str, repo_id: str) -> None:
        self.root = root
        self.repo_type = repo_type
        self.repo_id = repo_id

    @property
    def exists(self) -> bool:
        """Whether the repo was created."""
        return (self.root / "info.json").is_file()

    def create(self, *, private: bool, author: str) -> Commit:
        """Create the folders and the Hub's initial commit (``.gitattributes``) on ``main``."""
        for sub in ("objects", "commits"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self.root / "info.json", {"private": private, "createdAt": _now_iso()})
        tree = {".gitattributes": self.write_blob(_INITIAL_GITATTRIBUTES)}
        commit = self.write_commit(Commit.make((), "initial commit", "", (author,), tree))
        self.save_refs({"branches": {"main": commit.id}, "tags": {}, "pulls": {}})
        return commit

    def info(self) -> dict[str, Any]:
        """``{"private": bool, "createdAt": iso}``."""
        return json.loads((self.root / "info.json").read_text())

    def write_blob(self, content: bytes) -> str:
        """Store ``content`` under its git blob oid and return the oid."""
        oid = git_blob_oid(content)
        path = self.blob_path(oid)
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(content)
            os.replace(tmp, path)
        return oid

    def blob_path(self, oid: str) -> Path:
        """Path of a stored blob."""
        return self.root / "objects" / oid

    def read_blob(self, oid: str, start: int = 0, length: int | None = None) -> bytes:
        """Bytes ``[start, start + length)`` of a blob (the whole blob by default)."""
        with open(self.blob_path(oid), "rb") as f:
            f.seek(start)
            return f.read() if length is None else f.read(length)

    def blob_size(self, oid: str) -> int:
        """Size of a stored blob in bytes."""
        return self.blob_path(oid).stat().st_size

    def write_commit(self, commit: Commit) -> Commit:
        """Persist a commit (idempotent: same id, same content)."""
        _write_json_atomic(self.root / "commits" / f"{commit.id}.json", commit.payload())
        return commit

    def commit(self, commit_id: str) -> Commit:
        """Read a commit by full id."""
        data = json.loads((self.root / "commits" / f"{commit_id}.json").read_text())
        return Commit(
            commit_id,
            tuple(data["parents"]),
            data["title"],
            data["message"],
            data["date"],
            tuple(data["authors"]),
            data["tree"],
        )

    def refs(self) -> dict[str, dict[str, str]]:
        """``{"branches": {name: id}, "tags": {name: id}, "pulls": {"refs/pr/N": id}}``."""
        return json.loads((self.root / "refs.json").read_text())

    def save_refs(self, refs: dict[str, dict[str, str]]) -> None:
        """Replace all refs atomically."""
        _write_json_atomic(self.root / "refs.json", refs)

    def resolve(self, revision: str) -> str | None:
        """Commit id of a branch, tag, ``refs/heads|tags/*``, ``refs/pr/N``, full sha or unique sha prefix."""
        refs = self.refs()
        for kind, prefix in (("branches", ""), ("tags", ""), ("branches", "refs/heads/"), ("tags", "refs/tags/")):
            if revision.startswith(prefix) and revision[len(prefix) :] in refs[kind]:
                return refs[kind][revision[len(prefix) :]]
        if revision in refs["pulls"]:
            return refs["pulls"][revision]
        if _SHA_RE.fullmatch(revision):
            return revision if (self.root / "commits" / f"{revision}.json").is_file() else None
        if _SHA_PREFIX_RE.fullmatch(revision):
            matches = [p.stem for p in (self.root / "commits").glob(f"{revision}*.json")]
            return matches[0] if len(matches) == 1 else None
        return None

    def branch_key(self, revision: str) -> tuple[str, str] | None:
        """``(kind, name)`` of the ref a commit to ``revision`` moves, or None if it is not a branch or PR ref."""
        refs = self.refs()
        name = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
        if name in refs["branches"]:
            return "branches", name
        if revision in refs["pulls"]:
            return "pulls", revision
        return None

    def history(self, commit_id: str) -> list[Commit]:
        """First-parent history from ``commit_id`` back to the initial commit, newest first."""
        out = [self.commit(commit_id)]
        while out[-1].parents:
            out.append(self.commit(out[-1].parents[0]))
        return out


class HubStore:
    """All repos under one folder, with the one lock every request holds while it reads or writes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.RLock()
        root.mkdir(parents=True, exist_ok=True)

    def repo(self, repo_type: str, repo_id: str) -> RepoStore:
        """The store of ``repo_type``/``repo_id`` (check ``.exists`` before reading)."""
        namespace, name = repo_id.split("/", 1)
        return RepoStore(self.root / f"{repo_type}s" / namespace / name, repo_type, repo_id)


# ------------------------------------------------------------------------------------------ request handling


@dataclass(frozen=True)
class RequestRecord:
    """One handled request. ``authenticated`` says whether a Bearer token was sent; the token is never kept."""

    method: str
    path: str
    query: str
    route: str | None
    status: int
    authenticated: bool
    injected: bool


@dataclass
class Reply:
    """A response to send: status, body, headers (``Content-Length`` defaults to ``len(body)``)."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Failure:
    """A pending injected failure: ``count`` more requests matching ``pattern`` answer ``status``."""

    pattern: re.Pattern[str]
    status: int
    count: int
    retry_after: float | None


@dataclass
class _Override:
    """A pending injected answer: ``count`` more requests matching ``pattern`` get ``reply`` instead of the route's."""

    pattern: re.Pattern[str]
    reply: Reply
    count: int


@dataclass
class _Request:
    """What a route handler sees: the parsed request with its whole body."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: HTTPMessage
    body: bytes
    authenticated: bool

    def json(self) -> Any:
        """The body as JSON (``{}`` when empty)."""
        return json.loads(self.body.decode() or "{}")

    def flag(self, name: str) -> bool:
        """A boolean query parameter as the client encodes it (``true``/``True``/``1``)."""
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true")


class _HttpError(Exception):
    """Raised by route handlers; turned into a JSON error reply with the Hub's error headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _json_reply(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    """A JSON reply."""
    return Reply(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


def _error_reply(error: _HttpError) -> Reply:
    """Error reply: ``{"error": message}`` plus ``X-Error-Message`` and, if any, ``X-Error-Code``."""
    headers = {"X-Error-Message": error.message.encode("ascii", "replace").decode(), **error.headers}
    if error.code:
        headers["X-Error-Code"] = error.code
    return _json_reply({"error": error.message}, error.status, headers)


class _Handler(BaseHTTPRequestHandler):
    """Reads the request (always the whole body), dispatches to the server's routes, writes the reply."""

    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every reply sets Content-Length
    server: _Server

    def setup(self) -> None:
        self.timeout = self.server.hub.request_timeout  # per-connection socket timeout
        super().setup()
        # Headers and body go out in two writes: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms per request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:  # the base class names its argument `format`
        """Silence the default stderr access log; :attr:`HubServer.requests` is the log."""

    def _read_body(self) -> bytes:
        """The request body, by Content-Length or chunked transfer encoding."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        """Read the body first (keep-alive depends on it), answer, log, send."""
        body = self._read_body()
        raw_path, _, query = self.path.partition("?")
        auth = self.headers.get("Authorization", "")
        authenticated = auth.startswith("Bearer ") and len(auth) > len("Bearer ")
        request = _Request(
            self.command, raw_path, parse_qs(query), self.headers, body, authenticated
        )
        route, reply, injected = self.server.hub.respond(request)
        self.server.hub.record(
            RequestRecord(self.command, raw_path, query, route, reply.status, authenticated, injected)
        )
        self._send(reply)

    def _send(self, reply: Reply) -> None:
        """Status line, headers, and the body unless the request was HEAD."""
        self.send_response(reply.status)
        headers = {"Content-Length": str(len(reply.body)), **reply.headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with daemon threads that remembers open connections so stop() can close them."""

    daemon_threads = True

    def __init__(self, hub: HubServer) -> None:
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's ``socket.getfqdn`` reverse lookup, which can stall without a network."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def track(self, connection: socket.socket, *, add: bool) -> None:
        """Add or forget an open connection."""
        with self._connections_lock:
            (self._connections.add if add else self._connections.discard)(connection)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-reply (a cancelled download) is not an error worth a traceback."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Shut down every open connection (idle keep-alive ones included) so handler threads end now."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# ------------------------------------------------------------------------------------------------ the server

_REPO_API = re.compile(
    r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)"
    r"(?:/(revision|tree|refs|commits|paths-info|preupload|commit|branch|tag|safetensors-metadata)(?:/(.*))?)?$"
)
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
# (method, path) -> route name, for routes outside a repo.
_PLAIN_ROUTES = {
    ("POST", "/api/repos/create"): "create_repo",
    ("DELETE", "/api/repos/delete"): "delete_repo",
    ("POST", "/api/validate-yaml"): "validate_yaml",
    ("GET", "/api/whoami-v2"): "whoami",
    ("GET", "/api/agent-harnesses"): "agent_harnesses",
}
# (method, action after /api/{type}s/{ns}/{name}) -> route name.
_REPO_ROUTES = {
    ("GET", None): "repo_info",
    ("GET", "revision"): "repo_info",
    ("GET", "tree"): "tree",
    ("GET", "refs"): "refs",
    ("GET", "commits"): "commits",
    ("POST", "paths-info"): "paths_info",
    ("POST", "preupload"): "preupload",
    ("POST", "commit"): "commit",
    ("POST", "branch"): "create_branch",
    ("DELETE", "branch"): "delete_branch",
    ("POST", "tag"): "create_tag",
    ("DELETE", "tag"): "delete_tag",
    ("GET", "safetensors-metadata"): "safetensors_metadata",
}


class HubServer:
    """A Hub-compatible server on ``127.0.0.1:<free port>`` storing repos under ``root``.

    Attributes:
        endpoint: ``http://127.0.0.1:<port>``, to use as ``HF_ENDPOINT`` / ``HfApi(endpoint=...)``.
        requests: the request log (:class:`RequestRecord`, in arrival order).
        store: the on-disk store, to check the server's state independently of the client.
        require_token: when True, every API and file request without ``Authorization: Bearer`` gets 401.
        username: the namespace of repos created without an organisation, and the commit author.
    """

    def __init__(
        self, root: Path, *, username: str = "test-user", require_token: bool = False, request_timeout: float = 15.0
    ) -> None:
        self.store = HubStore(Path(root))
        self.username = username
        self.require_token = require_token
        self.request_timeout = request_timeout
        self.requests: list[RequestRecord] = []
        self._failures: list[_Failure] = []
        self._overrides: list[_Override] = []
        self._log_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> HubServer:
        """Bind a free port on 127.0.0.1 and serve in a daemon thread."""
        self._server = _Server(self)
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and the listening socket, join the serving thread."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test controls ---------------------------------------------------------------------------------------

    def fail_next(
        self, route_pattern: str, status: int = 500, count: int = 1, retry_after: float | None = None
    ) -> None:
        """Answer the next ``count`` requests whose ``"<METHOD> <path>"`` matches ``route_pattern`` (``re.search``)
        with ``status`` (e.g. 500, 503, 429) instead of handling them; the body is still read and the log entry has
        the route and ``injected=True``. ``retry_after`` adds a ``Retry-After`` header (seconds); huggingface_hub's
        backoff (used by preupload, tree listings, downloads, the pipelined commit) then waits ``retry_after + 1`` s
        instead of its 1, 2, 4... s schedule. Plain ``create_commit``, ``create_repo`` and branch/tag calls do not
        retry."""
        with self._log_lock:
            self._failures.append(_Failure(re.compile(route_pattern), status, count, retry_after))

    def answer_next(
        self, route_pattern: str, body: bytes | str | Any, *, status: int = 200, content_type: str | None = None,
        count: int = 1,
    ) -> None:
        """Answer the next ``count`` requests whose ``"<METHOD> <path>"`` matches ``route_pattern`` (``re.search``) with
        ``body`` and ``status`` instead of handling them, like a server that is not the Hub. ``bytes``/``str`` are sent
        as they are (``text/html`` by default); anything else is sent as JSON (``application/json``), e.g. a list where
        the client expects an object. The log entry has the route and ``injected=True``. Checked after
        :meth:`fail_next`'s failures."""
        if isinstance(body, (bytes, str)):
            data, default_type = (body.encode() if isinstance(body, str) else body), "text/html; charset=utf-8"
        else:
            data, default_type = json.dumps(body).encode(), "application/json"
        reply = Reply(status, data, {"Content-Type": content_type or default_type})
        with self._log_lock:
            self._overrides.append(_Override(re.compile(route_pattern), reply, count))

    def record(self, record: RequestRecord) -> None:
        """Append to the request log."""
        with self._log_lock:
            self.requests.append(record)

    def requests_to(self, route: str) -> list[RequestRecord]:
        """Logged requests handled by the named route (e.g. ``"commit"``, ``"resolve"``, ``"preupload"``)."""
        with self._log_lock:
            return [r for r in self.requests if r.route == route]

    def repo_url(self, repo_type: str, repo_id: str) -> str:
        """The web URL of a repo on this server."""
        return f"{self.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"

    # -- dispatch --------------------------------------------------------------------------------------------

    def _take_failure(self, method: str, path: str) -> _Failure | None:
        """The first pending failure matching ``"<METHOD> <path>"``, with its count decremented."""
        with self._log_lock:
            for failure in self._failures:
                if failure.count > 0 and failure.pattern.search(f"{method} {path}"):
                    failure.count -= 1
                    return failure
        return None

    def _take_override(self, method: str, path: str) -> Reply | None:
        """The reply of the first pending override matching ``"<METHOD> <path>"``, with its count decremented."""
        with self._log_lock:
            for override in self._overrides:
                if override.count > 0 and override.pattern.search(f"{method} {path}"):
                    override.count -= 1
                    return override.reply
        return None

    def respond(self, request: _Request) -> tuple[str | None, Reply, bool]:
        """``(route name, reply, injected)`` for one request: an injected failure or answer if one matches, else the
        route's reply; 404 for unknown routes, 400 for malformed input, 500 (with the exception) for anything else."""
        route, handler, args = self._route(request)
        failure = self._take_failure(request.method, request.path)
        if failure is not None:
            headers = {} if failure.retry_after is None else {"Retry-After": f"{failure.retry_after:g}"}
            message = f"Injected failure (HTTP {failure.status})"
            return route, _error_reply(_HttpError(failure.status, message, None, headers)), True
        if (override := self._take_override(request.method, request.path)) is not None:
            return route, override, True
        try:
            if handler is None:
                raise _HttpError(404, f"No route for {request.method} {request.path}")
            if self.require_token and not request.authenticated and route != "agent_harnesses":
                # Like the Hub: a 401 on a repo route says RepoNotFound (-> RepositoryNotFoundError).
                raise _HttpError(401, "Invalid username or password.", "RepoNotFound" if args else None)
            with self.store.lock:
                return route, handler(request, *args), False
        except _HttpError as error:
            return route, _error_reply(error), False
        except (ValueError, KeyError, TypeError) as error:  # malformed JSON, missing fields, bad base64
            return route, _error_reply(_HttpError(400, f"Bad request: {error!r}")), False
        except Exception as error:  # a bug here must reach the test as a 500, not as a dropped connection
            return route, _error_reply(_HttpError(500, f"Test Hub error: {error!r}")), False

    def _route(self, request: _Request) -> tuple[str | None, Callable[..., Reply] | None, tuple]:
        """Match the path to ``(route name, handler, handler args)``; the handler of route ``x`` is ``self._x``."""
        method, path = request.method, request.path
        if (method, path) in _PLAIN_ROUTES:
            name = _PLAIN_ROUTES[(method, path)]
            return name, getattr(self, f"_{name}"), ()
        if match := _RESOLVE.match(path):
            prefix, namespace, name, revision, filename = match.groups()
            repo_type = _TYPE_BY_SEGMENT[prefix] if prefix else "model"
            repo_id = f"{unquote(namespace)}/{unquote(name)}"
            if method in ("GET", "HEAD"):
                return "resolve", self._resolve, (repo_type, repo_id, unquote(revision), unquote(filename))
        elif match := _REPO_API.match(path):
            segment, namespace, name, action, rest = match.groups()
            if (method, action) in _REPO_ROUTES:
                route = _REPO_ROUTES[(method, action)]
                args = (_TYPE_BY_SEGMENT[segment], f"{unquote(namespace)}/{unquote(name)}", rest or "")
                return route, getattr(self, f"_{route}"), args
        return None, None, ()

    # -- helpers ---------------------------------------------------------------------------------------------

    def _repo(self, request: _Request, repo_type: str, repo_id: str) -> RepoStore:
        """The existing repo, or 404 RepoNotFound, also for a private repo read without a token (the Hub answers 401
        there with the same error code; the client raises RepositoryNotFoundError for both)."""
        repo = self.store.repo(repo_type, repo_id)
        if not repo.exists or (repo.info()["private"] and not request.authenticated):
            raise _HttpError(404, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _resolve_or_404(repo: RepoStore, revision: str, headers: dict[str, str] | None = None) -> str:
        """Commit id of ``revision`` or 404 RevisionNotFound."""
        commit_id = repo.resolve(revision)
        if commit_id is None:
            raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound", headers)
        return commit_id

    def _commit_url(self, repo: RepoStore, commit_id: str) -> str:
        """``{repo url}/commit/{id}``: the client parses the repo back out of it (``CommitInfo.repo_url``)."""
        return f"{self.repo_url(repo.repo_type, repo.repo_id)}/commit/{commit_id}"

    # -- account / misc routes -------------------------------------------------------------------------------

    def _validate_yaml(self, request: _Request) -> Reply:
        """``HfApi._validate_yaml`` / ``ModelCard.validate``: accept every card (no YAML parser in the stdlib)."""
        request.json()
        return _json_reply({"errors": [], "warnings": []})

    def _whoami(self, request: _Request) -> Reply:
        """``whoami``: the configured user for any token, 401 without one."""
        if not request.authenticated:
            raise _HttpError(401, "Invalid credentials in Authorization header")
        return _json_reply(
            {
                "type": "user",
                "name": self.username,
                "fullname": self.username,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _agent_harnesses(self, request: _Request) -> Reply:
        """Empty registry for huggingface_hub's user-agent detection (``utils/_detect_agent.py``)."""
        return _json_reply({"standardEnvVars": [], "harnesses": {}})

    # -- repos -----------------------------------------------------------------------------------------------

    def _create_repo(self, request: _Request) -> Reply:
        """``POST /api/repos/create``: 409 with the URL when the repo exists (the client's ``exist_ok`` needs it)."""
        payload = request.json()
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HttpError(400, f"Unsupported repo type {repo_type!r}")
        repo_id = f"{payload.get('organization') or self.username}/{payload['name']}"
        repo = self.store.repo(repo_type, repo_id)
        url = self.repo_url(repo_type, repo_id)
        if repo.exists:
            return _json_reply({"error": f"You already created this {repo_type} repo", "url": url}, 409)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo.create(private=private, author=self.username)
        return _json_reply({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, request: _Request) -> Reply:
        """``delete_repo``: removes the repo folder; 404 RepoNotFound if missing (``missing_ok`` relies on it)."""
        payload = request.json()
        repo_id = f"{payload.get('organization') or self.username}/{payload['name']}"
        repo = self._repo(request, payload.get("type") or "model", repo_id)
        shutil.rmtree(repo.root)
        return _json_reply({})

    def _repo_info(self, request: _Request, repo_type: str, repo_id: str, rest: str) -> Reply:
        """``model_info``/``dataset_info``/``repo_info``: ``sha`` of the revision, ``siblings`` with ``rfilename``
        (plus ``size``/``blobId`` with ``?blobs=true``) and ``safetensors`` parameter counts from the headers."""
        repo = self._repo(request, repo_type, repo_id)
        revision = unquote(rest) if rest else "main"
        commit = repo.commit(self._resolve_or_404(repo, revision))
        with_blobs = request.flag("blobs")
        siblings = []
        for path, oid in sorted(commit.tree.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=repo.blob_size(oid), blobId=oid)
            siblings.append(sibling)
        info = repo.info()
        namespace = repo_id.split("/")[0]
        data: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": namespace,
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": info["createdAt"],
            "private": info["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if repo_type == "model":
            data["modelId"] = repo_id
            if (counts := _safetensors_parameter_counts(repo, commit)) is not None:
                data["safetensors"] = counts
        return _json_reply(data)

    # -- reading trees and refs ------------------------------------------------------------------------------

    def _tree(self, request: _Request, repo_type: str, repo_id: str, rest: str) -> Reply:
        """``list_repo_tree``: files ``{"type": "file", "path", "size", "oid"}`` and folders
        ``{"type": "directory", "path", "oid"}``, direct children of the path or, with ``recursive``, all of them."""
        repo = self._repo(request, repo_type, repo_id)
        revision, _, sub = rest.partition("/")
        commit = repo.commit(self._resolve_or_404(repo, unquote(revision)))
        prefix = unquote(sub).strip("/")
        entries = _tree_entries(repo, commit.tree, prefix, recursive=request.flag("recursive"))
        if prefix and not entries and prefix not in commit.tree:
            raise _HttpError(404, f"{prefix} does not exist on {unquote(revision)}", "EntryNotFound")
        return _json_reply(entries)

    def _paths_info(self, request: _Request, repo_type: str, repo_id: str, rest: str) -> Reply:
        """``get_paths_info``: the entries among the requested paths that exist (form or JSON body)."""
        repo = self._repo(request, repo_type, repo_id)
        commit = repo.commit(self._resolve_or_404(repo, unquote(rest)))
        if request.headers.get("Content-Type", "").startswith("application/json"):
            paths = request.json().get("paths", [])
        else:
            paths = parse_qs(request.body.decode()).get("paths", [])
        all_entries = {e["path"]: e for e in _tree_entries(repo, commit.tree, "", recursive=True)}
        return _json_reply([all_entries[p.strip("/")] for p in paths if p.strip("/") in all_entries])

    def _refs(self, request: _Request, repo_type: str, repo_id: str, rest: str) -> Reply:
        """``list_repo_refs``: ``branches``, ``converts``, ``tags`` (and ``pullRequests`` with ``include_prs``)."""
        repo = self._repo(request, repo_type, repo_id)
        refs = repo.refs()

        def listing(kind: str, prefix: str) -> list[dict[str, str]]:
            return [
                {"name": name, "ref": f"{prefix}{name}", "targetCommit": target}
                for name, target in sorted(refs[kind].items())
            ]

        data: dict[str, Any] = {
            "branches": listing("branches", "refs/heads/"),
            "converts": [],
            "tags": listing("tags", "refs/tags/"),
        }
        if request.flag("include_prs"):
            data["pullRequests"] = listing("pulls", "")
        return _json_reply(data)

    def _commits(self, request: _Request, repo_type: str, repo_id: str, rest: str) -> Reply:
        """``list_repo_commits``: first-parent history, newest first, one page."""
        repo = self._repo(request, repo_type, repo_id)
        commit_id = self._resolve_or_404(repo, unquote(rest) or "main")
        return _json_reply(
            [
                {
                    "id": c.id,
                    "title": c.title,
                    "message": c.message,
                    "date": c.date,
                    "authors": [{"user": a, "avatar": None} for a in c.authors],
                }
                for c in repo.history(commit_id)
            ]
        )

    def _safetensors_metadata(self, request: _Request, repo_type: str, repo_id: str, rest: str) -> Reply:
        """``get_sharded_safetensors_metadata``: the index on ``main`` plus every shard's parsed header."""
        repo = self._repo(request, repo_type, repo_id)
        tree = repo.commit(self._resolve_or_404(repo, "main")).tree
        filename = unquote(rest)
        if filename not in tree:
            raise _HttpError(404, f"{filename} not found on main", "EntryNotFound")
        index = json.loads(repo.read_blob(tree[filename]))
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [s for s in shards if s not in tree]
        if missing:
            raise _HttpError(404, f"Shards missing on main: {missing}", "EntryNotFound")
        index_without_map = {k: v for k, v in index.items() if k != "weight_map"}
        headers = {shard: _safetensors_header(repo, tree[shard]) for shard in shards}
        return _json_reply({"index": index_without_map, "headers": headers})

    # -- files -----------------------------------------------------------------------------------------------

    def _resolve(self, request: _Request, repo_type: str, repo_id: str, revision: str, filename: str) -> Reply:
        """``HEAD|GET /{repo}/resolve/{rev}/{path}``: ETag = git blob sha1, X-Repo-Commit, Range -> 206/416."""
        repo = self._repo(request, repo_type, repo_id)
        commit_id = self._resolve_or_404(repo, revision)
        tree = repo.commit(commit_id).tree
        commit_header = {"X-Repo-Commit": commit_id}
        if filename not in tree:
            raise _HttpError(404, "Entry not found", "EntryNotFound", commit_header)
        oid = tree[filename]
        size = repo.blob_size(oid)
        headers = {
            **commit_header,
            "ETag": f'"{oid}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        byte_range = _parse_range(request.headers.get("Range"), size)
        if byte_range is None:
            body = b"" if request.method == "HEAD" else repo.read_blob(oid)
            return Reply(200, body, {**headers, "Content-Length": str(size)})
        start, end = byte_range
        if start >= size or start > end:
            raise _HttpError(416, "Requested range not satisfiable", None, {"Content-Range": f"bytes */{size}"})
        length = end - start + 1
        body = b"" if request.method == "HEAD" else repo.read_blob(oid, start, length)
        headers.update({"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(length)})
        return Reply(206, body, headers)

    # -- writing ---------------------------------------------------------------------------------------------

    def _preupload(self, request: _Request, repo_type: str, repo_id: str, rest: str) -> Reply:
        """Always ``uploadMode: "regular"`` (never lfs, so never Xet); ``oid`` = blob oid already at that revision."""
        repo = self._repo(request, repo_type, repo_id)
        tree = repo.commit(self._resolve_or_404(repo, unquote(rest))).tree
        files = request.json()["files"]
        return _json_reply(
            {
                "files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": tree.get(f["path"])}
                    for f in files
                ],
                "commitOid": None,
            }
        )

    def _commit(self, request: _Request, repo_type: str, repo_id: str, rest: str) -> Reply:
        """``create_commit``: NDJSON ``header`` + operations applied in order onto the branch (or a new PR ref)."""
        repo = self._repo(request, repo_type, repo_id)
        revision = unquote(rest)
        key = self._commit_target(repo, revision)
        refs = repo.refs()
        head = refs[key[0]][key[1]]
        lines = [json.loads(line) for line in request.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "The first NDJSON line must be the commit header")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and parent != head:
            raise _HttpError(412, "A commit has happened since. Please refresh and try again.")
        tree = _apply_operations(repo, dict(repo.commit(head).tree), lines[1:])
        commit = repo.write_commit(
            Commit.make((head,), header.get("summary", ""), header.get("description", ""), (self.username,), tree)
        )
        pr_url = None
        if request.flag("create_pr"):
            number = len(refs["pulls"]) + 1
            key = ("pulls", f"refs/pr/{number}")
            pr_url = f"{self.repo_url(repo_type, repo_id)}/discussions/{number}"
        refs[key[0]][key[1]] = commit.id
        repo.save_refs(refs)
        return _json_reply(
            {
                "success": True,
                "commitOid": commit.id,
                "commitUrl": self._commit_url(repo, commit.id),
                "pullRequestUrl": pr_url,
            }
        )

    def _commit_target(self, repo: RepoStore, revision: str) -> tuple[str, str]:
        """The ref a commit moves: 404 for an unknown revision, 400 for a tag or a commit sha."""
        key = repo.branch_key(revision)
        if key is None:
            self._resolve_or_404(repo, revision)
            raise _HttpError(400, f"Invalid rev id: {revision} is not a branch")
        return key

    def _create_branch(self, request: _Request, repo_type: str, repo_id: str, rest: str) -> Reply:
        """``create_branch``: from ``startingPoint`` (default: main); 409 if the branch exists."""
        repo = self._repo(request, repo_type, repo_id)
        branch = unquote(rest)
        if not branch or branch.startswith("refs/") or _SHA_RE.fullmatch(branch):
            raise _HttpError(400, f"Invalid reference for a branch: {branch}")
        refs = repo.refs()
        if branch in refs["branches"]:
            raise _HttpError(409, "Reference already exists")
        start = request.json().get("startingPoint") or "main"
        refs["branches"][branch] = self._resolve_or_404(repo, start)
        repo.save_refs(refs)
        return _json_reply({})

    def _delete_branch(self, request: _Request, repo_type: str, repo_id: str, rest: str) -> Reply:
        """``delete_branch``: 404 RevisionNotFound if missing; the default branch cannot go (403)."""
        repo = self._repo(request, repo_type, repo_id)
        branch = unquote(rest)
        refs = repo.refs()
        if branch == "main":
            raise _HttpError(403, "Cannot delete the default branch")
        if branch not in refs["branches"]:
            raise _HttpError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        del refs["branches"][branch]
        repo.save_refs(refs)
        return _json_reply({})

    def _create_tag(self, request: _Request, repo_type: str, repo_id: str, rest: str) -> Reply:
        """``create_tag`` at a revision; 409 if the tag exists."""
        repo = self._repo(request, repo_type, repo_id)
        commit_id = self._resolve_or_404(repo, unquote(rest))
        tag = request.json()["tag"]
        refs = repo.refs()
        if tag in refs["tags"]:
            raise _HttpError(409, "Tag already exists")
        refs["tags"][tag] = commit_id
        repo.save_refs(refs)
        return _json_reply({})

    def _delete_tag(self, request: _Request, repo_type: str, repo_id: str, rest: str) -> Reply:
        """``delete_tag``: 404 RevisionNotFound if missing."""
        repo = self._repo(request, repo_type, repo_id)
        tag = unquote(rest)
        refs = repo.refs()
        if tag not in refs["tags"]:
            raise _HttpError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
        del refs["tags"][tag]
        repo.save_refs(refs)
        return _json_reply({})


# ------------------------------------------------------------------------------------------ pure helpers


def _apply_operations(repo: RepoStore, tree: dict[str, str], operations: list[dict[str, Any]]) -> dict[str, str]:
    """Apply NDJSON commit operations to a flat tree, in order, and return it.

    ``file`` (base64 content) adds or replaces; ``deletedFile`` needs the file (404 EntryNotFound with the Hub's
    message otherwise); ``deletedFolder`` removes everything under the folder. ``lfsFile`` is refused: preupload
    never asks for LFS, so such an operation means the client took a path this server does not emulate.
    """
    for op in operations:
        key, value = op.get("key"), op.get("value", {})
        path = value.get("path", "").strip("/")
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise _HttpError(400, f"Unsupported encoding {value.get('encoding')!r}")
            tree[path] = repo.write_blob(base64.b64decode(value["content"]))
        elif key == "deletedFile":
            if path not in tree:
                raise _HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            del tree[path]
        elif key == "deletedFolder":
            for existing in [p for p in tree if p.startswith(path + "/")]:
                del tree[existing]
        elif key == "lfsFile":
            raise _HttpError(400, "LFS files are not supported by the test Hub (preupload answers 'regular')")
        else:
            raise _HttpError(400, f"Unknown commit operation {key!r}")
    return tree


def _tree_entries(repo: RepoStore, tree: dict[str, str], prefix: str, *, recursive: bool) -> list[dict[str, Any]]:
    """Files and folders under ``prefix`` (direct children, or all descendants if ``recursive``), sorted by path.
    A folder's oid is the sha1 of its sorted ``path:oid`` listing (stable, content-derived, like a git tree id)."""
    base = f"{prefix}/" if prefix else ""
    folders: dict[str, list[str]] = {}
    entries: list[dict[str, Any]] = []
    for path, oid in sorted(tree.items()):
        if not path.startswith(base):
            continue
        parts = path[len(base) :].split("/")
        for depth in range(1, len(parts)):
            folders.setdefault(base + "/".join(parts[:depth]), []).append(f"{path}:{oid}")
        if recursive or len(parts) == 1:
            entries.append({"type": "file", "path": path, "size": repo.blob_size(oid), "oid": oid})
    for folder, listing in folders.items():
        if recursive or "/" not in folder[len(base) :]:
            oid = hashlib.sha1("\n".join(listing).encode()).hexdigest()
            entries.append({"type": "directory", "path": folder, "oid": oid, "size": 0})
    return sorted(entries, key=lambda e: e["path"])


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` inclusive for a single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range, end clamped to
    the file; None without a Range header. Multiple ranges are not supported (the client never sends them)."""
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if match is None or match.groups() == ("", ""):
        raise _HttpError(416, f"Unsupported range {header!r}", None, {"Content-Range": f"bytes */{size}"})
    first, last = match.groups()
    if first == "":  # suffix range: the last n bytes
        return max(size - int(last), 0), size - 1
    return int(first), min(int(last), size - 1) if last else size - 1


def _safetensors_header(repo: RepoStore, oid: str) -> dict[str, Any]:
    """Parsed JSON header of a stored safetensors blob: 8-byte little-endian length, then that much JSON."""
    (length,) = struct.unpack("<Q", repo.read_blob(oid, 0, 8))
    if length > _SAFETENSORS_MAX_HEADER:
        raise ValueError(f"safetensors header of {length} bytes")
    return json.loads(repo.read_blob(oid, 8, length))


def _safetensors_parameter_counts(repo: RepoStore, commit: Commit) -> dict[str, Any] | None:
    """``{"parameters": {dtype: count}, "total": count}`` over the commit's ``*.safetensors`` files, as the Hub's
    ``safetensors`` field; None when there is none or a header does not parse."""
    counts: dict[str, int] = {}
    files = [oid for path, oid in commit.tree.items() if path.endswith(".safetensors")]
    if not files:
        return None
    try:
        for oid in files:
            for name, entry in _safetensors_header(repo, oid).items():
                if name != "__metadata__":
                    numel = 1
                    for dim in entry["shape"]:
                        numel *= dim
                    counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + numel
    except (ValueError, KeyError, struct.error):
        return None
    return {"parameters": counts, "total": sum(counts.values())}


# ------------------------------------------------------------------------------ client patching and fixtures


class _Patcher:
    """Set attributes and environment variables, remembering old values; ``restore`` undoes in reverse order."""

    _MISSING = object()

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr`` that ``restore`` undoes."""
        old = getattr(obj, name, self._MISSING)
        setattr(obj, name, value)
        self._undo.append(lambda: delattr(obj, name) if old is self._MISSING else setattr(obj, name, old))

    def setenv(self, name: str, value: str | None) -> None:
        """Set (or, for None, remove) an environment variable; ``restore`` undoes it."""
        old = os.environ.get(name)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
        self._undo.append(lambda: os.environ.pop(name, None) if old is None else os.environ.__setitem__(name, old))

    def restore(self) -> None:
        """Undo every change, last first."""
        while self._undo:
            self._undo.pop()()


@contextmanager
def patch_hub_clients(endpoint: str, hf_home: Path, *, disable_xet: bool = False) -> Iterator[None]:
    """Point huggingface_hub (and transformers, peft, datasets if imported) at ``endpoint`` and ``hf_home``,
    whether they were imported before or not; restore everything on exit. See the module docstring for the list."""
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _detect_agent, close_session

    hf_home = Path(hf_home)
    hub_cache = hf_home / "hub"
    patcher = _Patcher()
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1" if disable_xet else os.environ.get("HF_HUB_DISABLE_XET"),
        "HF_TOKEN": None,
        "HUGGING_FACE_HUB_TOKEN": None,
        "HF_OIDC_RESOURCE": None,
        "HF_HUB_OFFLINE": None,
        "TRANSFORMERS_OFFLINE": None,
        "HF_DATASETS_OFFLINE": None,
    }
    consts = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": disable_xet or constants.HF_HUB_DISABLE_XET,
    }
    transformers_seen = datasets_seen = True  # until known: nothing to reset on exit
    try:
        for name, value in env.items():
            patcher.setenv(name, value)
        for name, value in consts.items():
            patcher.setattr(constants, name, value)
        patcher.setattr(hf_api.api, "endpoint", endpoint)
        patcher.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
        transformers_seen = _patch_transformers(patcher)
        datasets_seen = _patch_datasets(patcher, endpoint, offline=False)
        _clear_hf_file_system_cache()
        close_session()  # drop pooled connections to earlier servers
        yield
    finally:
        close_session()
        patcher.restore()
        # Libraries first imported inside the context captured the test endpoint: reset them too.
        if not transformers_seen:
            _patch_transformers(_Patcher())
        if not datasets_seen:
            _patch_datasets(_Patcher(), constants.ENDPOINT, offline=constants.HF_HUB_OFFLINE)
        _clear_hf_file_system_cache()


def _patch_transformers(patcher: _Patcher) -> bool:
    """Drop transformers' lazily created shared ``HfApi`` (it keeps its endpoint); False if not imported."""
    module = sys.modules.get("transformers.utils.hub")
    if module is not None:
        patcher.setattr(module, "_hf_api", None)
    return module is not None


def _patch_datasets(patcher: _Patcher, endpoint: str, *, offline: bool) -> bool:
    """Set datasets' import-time copies of ``HF_ENDPOINT`` and the offline flags; False if datasets is not imported."""
    module = sys.modules.get("datasets.config")
    if module is not None:
        patcher.setattr(module, "HF_ENDPOINT", endpoint)
        patcher.setattr(module, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")
        patcher.setattr(module, "HF_HUB_OFFLINE", offline)
        patcher.setattr(module, "HF_DATASETS_OFFLINE", offline)
    return module is not None


def _clear_hf_file_system_cache() -> None:
    """fsspec caches ``HfFileSystem`` instances, each with the endpoint it was created with."""
    if (module := sys.modules.get("huggingface_hub.hf_file_system")) is not None:
        module.HfFileSystem.clear_instance_cache()


@contextmanager
def running_hub(
    tmp_path: Path,
    *,
    username: str = "test-user",
    require_token: bool = False,
    disable_xet: bool = False,
    patch_clients: bool = True,
) -> Iterator[HubServer]:
    """Start a :class:`HubServer` storing repos in ``tmp_path/hub_store`` and, unless ``patch_clients=False``,
    point the clients at it with ``HF_HOME=tmp_path/hf_home`` (:func:`patch_hub_clients`). Stops it on exit."""
    with ExitStack() as stack:
        server = HubServer(Path(tmp_path) / "hub_store", username=username, require_token=require_token)
        stack.enter_context(server)
        if patch_clients:
            stack.enter_context(patch_hub_clients(server.endpoint, Path(tmp_path) / "hf_home", disable_xet=disable_xet))
        yield server


@pytest.fixture
def hub_server(tmp_path: Path) -> Iterator[HubServer]:
    """A running local Hub with the clients pointed at it and caches under ``tmp_path``.

    Re-export from ``tests/conftest.py`` with ``from hub_server import hub_server  # noqa: F401``.
    """
    with running_hub(tmp_path) as server:
        yield server

