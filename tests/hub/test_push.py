"""Pushing step folders to a Hub (hf_contmerge.hub.push) against the local Hub-compatible server.

Step folders are written by the real CLI on tiny Llama models. References are independent of the code under
test: the server's on-disk store (commit trees as git blob ids, refs, first-parent history), git blob ids of
the local files, the raw safetensors of the local step folders, and the request log.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from transformers import AutoModelForCausalLM

from hf_contmerge.artifacts.layout import step_dir
from hf_contmerge.artifacts.state import read_state
from hf_contmerge.cli import main
from hf_contmerge.errors import ContMergeError
from hf_contmerge.hub.push import (
    MAX_RETRY_AFTER,
    PushTarget,
    _Hub,
    _redact,
    check_target,
    commit_message,
    push_missing,
    push_step,
    pushed_steps,
    retry_delay,
)
from support.hub_server import HubServer, git_blob_oid, running_hub
from support.tiny_models import make_stream, weights

TOKEN = "hf_SECRETtoken123"
REPO = "org/m"
COMMIT_ROUTE = rf"^POST /api/models/{REPO}/commit/"


def _target(repo: str = REPO, **kw) -> PushTarget:
    values = dict(private=False, layout="single", revision_prefix="step-", allow_existing=False, retries=2, backoff=0.01)
    return PushTarget(repo=repo, **{**values, **kw})


def _merge(*args: str) -> None:
    assert main(["merge", *args, "--method", "task_arithmetic", "--quiet"]) == 0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """``OUT`` with three steps: steps 1-2 sharded (small --shard-size), step 3 one file (resumed, default size)."""
    tmp = tmp_path_factory.mktemp("push-run")
    base, items = make_stream(tmp, "llama", n=3)
    sources = [str(p) for p in items]
    out = tmp / "out"
    _merge("--base", str(base), "--stream", *sources[:2], "--out", str(out), "--shard-size", "30KB")
    _merge("--base", str(base), "--stream", *sources, "--out", str(out), "--resume")
    assert (step_dir(out, 2) / "model.safetensors.index.json").is_file()
    assert not (step_dir(out, 3) / "model.safetensors.index.json").exists()
    assert (step_dir(out, 3) / "model.safetensors").is_file()
    return SimpleNamespace(out=out, sources=sources)


def _local_tree(folder: Path) -> dict[str, str]:
    """What a commit holding exactly ``folder`` must contain: git blob id per file, plus the Hub's .gitattributes."""
    tree = {p.relative_to(folder).as_posix(): git_blob_oid(p.read_bytes()) for p in folder.rglob("*") if p.is_file()}
    return {**tree, ".gitattributes": "(any)"}


def _server_tree(hub: HubServer, revision: str, repo: str = REPO) -> dict[str, str]:
    store = hub.store.repo("model", repo)
    tree = dict(store.commit(store.resolve(revision)).tree)
    assert ".gitattributes" in tree
    return {**tree, ".gitattributes": "(any)"}


def _refs(hub: HubServer, repo: str = REPO) -> dict[str, dict[str, str]]:
    return hub.store.repo("model", repo).refs()


def _history(hub: HubServer, repo: str = REPO) -> list:
    store = hub.store.repo("model", repo)
    return store.history(store.resolve("main"))


def _push(out: Path, step: int, target: PushTarget | None = None) -> str:
    folder = step_dir(out, step)
    return push_step(folder, step, target or _target(), TOKEN, commit_message(read_state(folder)))


# ------------------------------------------------------------------------------------------------ layouts


def test_single_layout_three_steps(hub_server: HubServer, run: SimpleNamespace) -> None:
    target = _target()
    check_target(target, TOKEN, steps=[1, 2, 3])
    commits = [_push(run.out, s) for s in (1, 2, 3)]

    refs = _refs(hub_server)
    assert refs["tags"] == {"step-1": commits[0], "step-2": commits[1], "step-3": commits[2]}
    assert refs["branches"] == {"main": commits[2]}
    history = _history(hub_server)
    assert [c.id for c in history[:3]] == commits[::-1] and len(history) == 4  # one commit per step + initial
    expected_titles = [f"step {s}: task_arithmetic + {run.sources[s - 1]}" for s in (3, 2, 1)]
    assert [c.title for c in history[:3]] == expected_titles and history[3].title == "initial commit"

    # Each tag holds exactly its step folder; main holds step 3 and nothing of step 2's shards.
    for s in (1, 2, 3):
        assert _server_tree(hub_server, f"step-{s}") == _local_tree(step_dir(run.out, s))
    assert _server_tree(hub_server, "main") == _local_tree(step_dir(run.out, 3))
    stale = [p for p in _server_tree(hub_server, "step-2") if p.startswith("model-0")]
    assert stale and not set(stale) & set(_server_tree(hub_server, "main"))

    model = AutoModelForCausalLM.from_pretrained(REPO, revision="step-2")
    hub_weights, local = model.state_dict(), weights(step_dir(run.out, 2))
    assert local and all(torch.equal(hub_weights[k].float(), v.float()) for k, v in local.items())

    card = ModelCard(Path(hf_hub_download(REPO, "README.md")).read_text())
    assert {"hf-contmerge", "continual-merging", "task_arithmetic"} <= set(card.data.tags)
    assert "step 3" in card.text

    assert pushed_steps(target, TOKEN) == {1, 2, 3}
    assert push_missing(run.out, target, TOKEN, [1, 2, 3]) == []
    assert _refs(hub_server) == refs and len(_history(hub_server)) == 4  # idempotent: nothing new


def test_per_step_layout_with_hub_sources(hub_server: HubServer, tmp_path: Path) -> None:
    """Sources given as Hub ids: the pushed card declares them with ``base_model_relation: merge``."""
    base, items = make_stream(tmp_path / "models", "llama", n=2)
    api = HfApi()
    for repo, folder in [("org/base", base), ("org/ft-0", items[0]), ("org/ft-1", items[1])]:
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder)
    out = tmp_path / "out"
    _merge("--base", "org/base", "--stream", "org/ft-0", "org/ft-1", "--out", str(out))

    target = _target("org/m-step-{step}", layout="per-step")
    assert target.repo_for(2) == "org/m-step-2" and target.tag_for(2) == "step-2"
    check_target(target, TOKEN, steps=[1, 2])
    assert push_missing(out, target, TOKEN, [1, 2]) == [1, 2]
    for s in (1, 2):
        repo = f"org/m-step-{s}"
        refs = _refs(hub_server, repo)
        assert refs["tags"] == {f"step-{s}": refs["branches"]["main"]}
        assert _server_tree(hub_server, "main", repo) == _local_tree(step_dir(out, s))
        assert [c.title for c in _history(hub_server, repo)] == [f"step {s}: task_arithmetic + org/ft-{s - 1}", "initial commit"]
    card = ModelCard(Path(hf_hub_download("org/m-step-2", "README.md")).read_text())
    assert card.data.base_model_relation == "merge"
    assert set(card.data.base_model) == {"org/base", "org/ft-0", "org/ft-1"}
    assert pushed_steps(target, TOKEN, [1, 2, 3]) == {1, 2}
    assert not hub_server.store.repo("model", "org/m-step-3").exists


def test_target_from_options_and_validation(run: SimpleNamespace) -> None:
    from hf_contmerge.options import MergeOptions

    options = MergeOptions.create(base="b", stream=["a"], method="task_arithmetic", out=run.out / "x", push_to="org/r",
                                  private=True, revision_prefix="v", push_retries=3, token=TOKEN)
    target = PushTarget.from_options(options)
    assert target == PushTarget("org/r", True, "single", "v", False, 3)
    assert target.tag_for(4) == "v4" and target.step_of_tag("v4") == 4 and target.step_of_tag("v04") is None
    assert TOKEN not in repr(target)
    assert PushTarget.from_options(options.model_copy(update={"push_to": None})) is None
    with pytest.raises(ContMergeError, match="per-step"):
        _target("org/m-{step}")
    with pytest.raises(ContMergeError, match=r"\{step\}"):
        _target("org/m", layout="per-step")


# ---------------------------------------------------------------------------------------- pre-flight


def test_foreign_repo_refused_unless_allowed(hub_server: HubServer, run: SimpleNamespace) -> None:
    api = HfApi()
    api.create_repo("org/fresh")  # only .gitattributes: fine
    check_target(_target("org/fresh"), TOKEN, steps=[1])
    api.create_repo("org/foreign")
    api.upload_file(path_or_fileobj=b"# Someone else's model\n", path_in_repo="README.md", repo_id="org/foreign")
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="notes.json", repo_id="org/foreign")
    head = _refs(hub_server, "org/foreign")["branches"]["main"]
    with pytest.raises(ContMergeError) as excinfo:
        check_target(_target("org/foreign"), TOKEN, steps=[1])
    assert "org/foreign" in str(excinfo.value) and "--push-existing" in str(excinfo.value)
    assert _refs(hub_server, "org/foreign")["branches"]["main"] == head

    allowed = _target("org/foreign", allow_existing=True)
    check_target(allowed, TOKEN, steps=[1])
    _push(run.out, 1, allowed)
    assert _server_tree(hub_server, "main", "org/foreign") == _local_tree(step_dir(run.out, 1))  # notes.json gone

    # A repo of an earlier run: accepted, but not when it already has a tag this run would write.
    check_target(_target("org/foreign"), TOKEN, steps=[2, 3])
    with pytest.raises(ContMergeError, match="already has tag step-1"):
        check_target(_target("org/foreign"), TOKEN, steps=[1, 2])


def test_missing_or_rejected_token_refused_before_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with running_hub(tmp_path, require_token=True) as hub:
        with pytest.raises(ContMergeError, match="needs a Hub token"):
            check_target(_target(), None)
        assert hub.requests == []
        hub.fail_next("whoami", status=401)
        with pytest.raises(ContMergeError, match="did not accept the token"):
            check_target(_target(), TOKEN)
        assert [r.status for r in hub.requests] == [401]  # a 401 is not retried
        hub.fail_next("whoami", status=503, count=3)
        with pytest.raises(ContMergeError,
                           match=r"Could not check --push-to org/m on the Hub \(HTTP 503.*3 attempts\)\. Nothing was computed"):
            check_target(_target(), TOKEN)
        assert [r.status for r in hub.requests] == [401, 503, 503, 503]
        with monkeypatch.context() as patch:
            patch.setattr(HfApi, "whoami", lambda self, **kw: {"auth": {"accessToken": {"role": "read"}}})
            with pytest.raises(ContMergeError, match="read-only"):
                check_target(_target(), TOKEN)
        assert not hub.store.repo("model", REPO).exists


def test_tag_of_another_run_is_never_moved(hub_server: HubServer, run: SimpleNamespace, tmp_path: Path) -> None:
    """Another run's step 1 (same files, another parameter in its state) is refused, not pushed over step-1."""
    first = _push(run.out, 1)
    other = tmp_path / "other" / "step-1"
    shutil.copytree(step_dir(run.out, 1), other)
    state = json.loads((other / "contmerge_state.json").read_text())
    state["params"]["scaling"] = 0.9
    (other / "contmerge_state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    with pytest.raises(ContMergeError, match="another run's step 1"):
        push_step(other, 1, _target(), TOKEN)
    with pytest.raises(ContMergeError, match="another run's step 1"):
        push_missing(other.parent, _target(), TOKEN, [1])
    assert _refs(hub_server)["tags"] == {"step-1": first} and len(_history(hub_server)) == 2
    with pytest.raises(ContMergeError, match="holds step 1, not step 2"):
        push_step(step_dir(run.out, 1), 2, _target(), TOKEN)


# ------------------------------------------------------------------------------------------------ faults


def test_commit_500s_are_retried(hub_server: HubServer, run: SimpleNamespace) -> None:
    hub_server.fail_next(COMMIT_ROUTE, status=500, count=2)
    commit = _push(run.out, 1)
    assert [(r.status, r.injected) for r in hub_server.requests_to("commit")] == [(500, True), (500, True), (200, False)]
    assert _refs(hub_server)["tags"] == {"step-1": commit} and len(_history(hub_server)) == 2


def test_push_that_keeps_failing_stops_cleanly_and_resume_pushes_the_rest(hub_server: HubServer, run: SimpleNamespace) -> None:
    target = _target()
    first = _push(run.out, 1)
    hub_server.fail_next(COMMIT_ROUTE, status=503, count=3)  # retries=2: three attempts, all fail
    with pytest.raises(ContMergeError) as excinfo:
        _push(run.out, 2)
    message = str(excinfo.value)
    assert "Step 2" in message and str(step_dir(run.out, 2)) in message and REPO in message
    assert "HTTP 503" in message and "--resume" in message
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__
    assert _refs(hub_server)["tags"] == {"step-1": first} and _refs(hub_server)["branches"]["main"] == first
    assert [r.status for r in hub_server.requests_to("commit")] == [200, 503, 503, 503]

    assert pushed_steps(target, TOKEN) == {1}
    assert push_missing(run.out, target, TOKEN, [1, 2, 3]) == [2, 3]
    refs = _refs(hub_server)
    assert set(refs["tags"]) == {"step-1", "step-2", "step-3"} and refs["branches"]["main"] == refs["tags"]["step-3"]
    assert _server_tree(hub_server, "step-2") == _local_tree(step_dir(run.out, 2))
    assert _server_tree(hub_server, "main") == _local_tree(step_dir(run.out, 3))
    assert len(_history(hub_server)) == 4


def test_stop_between_commit_and_tag_is_recovered_without_a_new_commit(hub_server: HubServer, run: SimpleNamespace) -> None:
    _push(run.out, 1)
    hub_server.fail_next(rf"^POST /api/models/{REPO}/tag/", status=500, count=3)
    with pytest.raises(ContMergeError, match="Step 2 is complete"):
        _push(run.out, 2)
    main = _refs(hub_server)["branches"]["main"]
    assert "step-2" not in _refs(hub_server)["tags"]
    assert _server_tree(hub_server, "main") == _local_tree(step_dir(run.out, 2))  # the commit went through
    commits_before = len(hub_server.requests_to("commit"))

    assert push_missing(run.out, _target(), TOKEN, [1, 2]) == [2]
    assert _refs(hub_server)["tags"]["step-2"] == main == _refs(hub_server)["branches"]["main"]
    assert len(hub_server.requests_to("commit")) == commits_before and len(_history(hub_server)) == 3


def test_deleted_tag_is_recreated_at_the_same_commit(hub_server: HubServer, run: SimpleNamespace) -> None:
    commit = _push(run.out, 1)
    store = hub_server.store.repo("model", REPO)
    refs = store.refs()
    del refs["tags"]["step-1"]
    store.save_refs(refs)
    assert push_missing(run.out, _target(), TOKEN, [1]) == [1]
    assert _refs(hub_server)["tags"] == {"step-1": commit} and len(_history(hub_server)) == 2


def test_rate_limit_honours_retry_after_and_4xx_is_not_retried(hub_server: HubServer, run: SimpleNamespace) -> None:
    hub_server.fail_next(COMMIT_ROUTE, status=429, count=1, retry_after=0.6)
    start = time.monotonic()
    _push(run.out, 1)
    assert time.monotonic() - start >= 0.6  # the backoff alone would wait 0.01 s
    assert [(r.status, r.injected) for r in hub_server.requests_to("commit")] == [(429, True), (200, False)]

    hub_server.fail_next(COMMIT_ROUTE, status=403, count=1)
    with pytest.raises(ContMergeError, match="HTTP 403"):
        _push(run.out, 2)
    assert [r.status for r in hub_server.requests_to("commit")] == [429, 200, 403]


def test_retry_delay_policy() -> None:
    def error(status: int, retry_after: str | None = None) -> SimpleNamespace:
        headers = {} if retry_after is None else {"Retry-After": retry_after}
        return SimpleNamespace(response=SimpleNamespace(status_code=status, headers=headers))

    assert [retry_delay(error(503), k, 1.0) for k in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert retry_delay(error(429, "10"), 0, 1.0) == 10 and retry_delay(error(429, "0"), 2, 1.0) == 4
    assert retry_delay(error(429, "100000"), 0, 1.0) == MAX_RETRY_AFTER
    date = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 <= retry_delay(error(503, date), 0, 1.0) <= 30


def test_connection_errors_are_retried_and_redacted(hub_server: HubServer, run: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    real = HfApi.create_commit
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise httpx2.ConnectError("connection reset")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", flaky)
    _push(run.out, 1)
    assert len(calls) == 2 and "step-1" in _refs(hub_server)["tags"]

    def leaky(self, *args, **kwargs):
        raise httpx2.ReadTimeout(f"proxy echoed Authorization: Bearer {TOKEN}")

    monkeypatch.setattr(HfApi, "create_commit", leaky)
    with pytest.raises(ContMergeError) as excinfo:
        _push(run.out, 2)
    assert "ReadTimeout" in str(excinfo.value) and "3 attempts" in str(excinfo.value)
    assert TOKEN not in str(excinfo.value) and excinfo.value.__cause__ is None


def test_redact() -> None:
    text = f"Authorization: Bearer {TOKEN}; again {TOKEN}, custom my-secret-value"
    redacted = _redact(text, "my-secret-value")
    assert TOKEN not in redacted and "my-secret-value" not in redacted and "SECRET" not in redacted
    assert _redact("Bearer abc.def.ghi") == "Bearer ***" and _redact("no secrets here") == "no secrets here"
    assert TOKEN not in repr(_Hub(_target(), TOKEN, print))


# ------------------------------------------------------------------------------------------------- token


def test_token_never_written_logged_or_shown(tmp_path: Path, run: SimpleNamespace, capsys, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    target = _target()
    with running_hub(tmp_path, require_token=True) as hub:
        check_target(target, TOKEN, steps=[1, 2, 3])
        hub.fail_next(COMMIT_ROUTE, status=500, count=1)  # one logged retry
        assert push_missing(run.out, target, TOKEN, [1, 2]) == [1, 2]
        hub.fail_next(COMMIT_ROUTE, status=500, count=3)
        with pytest.raises(ContMergeError) as excinfo:
            _push(run.out, 3)
        with_token = list(hub.requests)
        with pytest.raises(ContMergeError) as refused:  # no token at all: the server answers 401
            push_step(step_dir(run.out, 3), 3, target, None)
        assert "HTTP 401" in str(refused.value)
    assert with_token and all(r.authenticated for r in with_token)
    assert not any(r.authenticated for r in hub.requests[len(with_token):])
    assert "retry 1/2" in caplog.text  # the retry was logged, without the token
    captured = capsys.readouterr()
    for text in (str(excinfo.value), str(refused.value), repr(hub.requests), captured.out, captured.err, caplog.text):
        assert TOKEN not in text and "SECRET" not in text
    files = [p for root in (tmp_path, run.out) for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "contmerge_state.json" for p in files) and any("hub_store" in p.parts for p in files)
    assert not any(TOKEN.encode() in p.read_bytes() for p in files)
