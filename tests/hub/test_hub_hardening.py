"""Hub-side hardening (issue 16): a server that does not answer like the Hub, a published step whose file list
would escape the step folder, and offline runs from the Hub cache. Every refusal is one ContMergeError paragraph
(exit 2, no traceback) naming the input, and nothing is written to --out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.hub_server import Commit, HubServer, git_blob_oid

TOKEN = "hf_HardeningSecret1234567890"
GARBAGE = [  # a login page, JSON of another shape, an object without a commit hash, a file list without names
    b"<html><body>Please sign in to continue</body></html>",
    [1, 2, 3],
    {"id": "org/x"},
    {"id": "org/x", "sha": "a" * 40, "siblings": [{"name": "model.safetensors"}]},
]


def _publish(api, repo: str, folder: Path, tag: str | None = None) -> str:
    api.create_repo(repo, exist_ok=True)
    commit = api.upload_folder(folder_path=folder, repo_id=repo)
    if tag:
        api.create_tag(repo, tag=tag, revision=commit.oid)
    return commit.oid


def _merge(base, items, out, *extra):
    return ["merge", "--base", base, "--stream", *items, "--method", "opcm", "--out", out, "--quiet", *extra]


def _refused(result, out: Path, *named: str) -> str:
    """The run was refused as one message naming ``named``, with no traceback, and left no --out behind."""
    code, stdout, err = result
    assert code == 2, (stdout, err)
    assert "Traceback" not in err and "hf-contmerge: error: " in err, err
    message = err[err.index("hf-contmerge: error: "):].strip()  # (progress bars of building the fixtures may precede it)
    assert "\n" not in message, message  # one paragraph
    for text in named:
        assert text in message, (text, message)
    assert TOKEN not in stdout + err
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    return message


def _info_route(repo: str) -> str:
    return rf"^GET /api/models/{repo}(/revision/[^/]+)?$"


def _commit_files(hub: HubServer, repo_id: str, files: dict[str, bytes]) -> None:
    """Add ``files`` to ``main`` of ``repo_id`` straight in the server's store: the client refuses to upload such
    names, a broken or hostile Hub serves them anyway."""
    repo = hub.store.repo("model", repo_id)
    with hub.store.lock:
        refs = repo.refs()
        head = refs["branches"]["main"]
        tree = dict(repo.commit(head).tree) | {name: repo.write_blob(data) for name, data in files.items()}
        refs["branches"]["main"] = repo.write_commit(Commit.make((head,), "add files", "", ("someone",), tree)).id
        repo.save_refs(refs)


@pytest.fixture
def offline(hub_server):
    """``offline()``: HF_HUB_OFFLINE=1 from now until the test ends. huggingface_hub reads the variable once, at
    import, into ``constants.HF_HUB_OFFLINE`` (its request guard, ``is_offline_mode`` and transformers' checks read
    that constant at call time; peft reads it and the variable), so both are set, and undone before ``hub_server``
    (a dependency, so torn down after) restores its own patch of the constant."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        def go_offline() -> None:
            patch.setattr(constants, "HF_HUB_OFFLINE", True)
            patch.setenv("HF_HUB_OFFLINE", "1")

        yield go_offline


# ------------------------------------------------------------------------------- 1. a server that is not the Hub


def test_an_answer_that_is_not_a_hub_response_is_a_clear_refusal(tmp_path, streams, cli, hub_server):
    from huggingface_hub import HfApi

    base, items = streams("llama", n=1)
    api = HfApi()
    _publish(api, "org/base", base)
    _publish(api, "org/ft-0", items[0])
    out = tmp_path / "out"
    runs = {  # the input each run names (as written), its command; that repo's metadata call gets garbage
        "org/base": _merge("org/base", items, out, "--token", TOKEN),
        "org/ft-0": ["inspect", "--base", base, "--stream", "org/ft-0", "--token", TOKEN],
        "org/merged": _merge(base, items, out, "--resume-from", "org/merged", "--token", TOKEN),
    }
    for body in GARBAGE:
        for named, args in runs.items():
            hub_server.answer_next(_info_route(named), body, count=10)
            _refused(cli(*args), out, named, hub_server.endpoint, "not a Hub API response", "HF_ENDPOINT")
            hub_server._overrides.clear()
    # a safetensors header that is a login page: the pre-flight's range reads get garbage
    hub_server.answer_next(r"^GET /org/base/resolve/[^/]+/model\.safetensors$", b"<html>sign in</html>" * 20, count=10)
    _refused(cli(*runs["org/base"]), out, "org/base", "not a Hub API response")
    hub_server._overrides.clear()
    # an id that passes the parser but not huggingface_hub's own check is not reported as a broken Hub
    _refused(cli(*_merge("org/a--b", items, out)), out, "'org/a--b'", "not a valid Hub repo id")
    # and a Hub that cannot be reached at all
    endpoint = hub_server.endpoint
    hub_server.stop()
    _refused(cli(*runs["org/base"]), out, "org/base", endpoint, "could not be reached", "HF_HUB_OFFLINE=1")
    # credentials in HF_ENDPOINT never reach a message
    from huggingface_hub import constants

    from hf_contmerge.io.remote import hub_endpoint

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "ENDPOINT", endpoint.replace("http://", f"http://user:{TOKEN}@") + "/mirror/")
        assert hub_endpoint() == endpoint + "/mirror"
        _refused(cli(*runs["org/base"]), out, "org/base", endpoint + "/mirror", "could not be reached")


# ------------------------------------------------------------------ 2. a published step that names ../../x


def test_resume_from_a_repo_whose_file_names_escape_is_refused_before_any_download(tmp_path, streams, cli, hub_server):
    from huggingface_hub import HfApi

    base, items = streams("gpt2", n=3)
    assert cli(*_merge(base, items[:2], tmp_path / "first"))[0] == 0
    api = HfApi()
    out = tmp_path / "out"
    for i, bad in enumerate(["../../x", "/tmp/hf-contmerge-escape", "..", "task_heads/../../x"]):
        repo = f"org/merged-{i}"
        _publish(api, repo, tmp_path / "first/step-2")
        _commit_files(hub_server, repo, {bad: b"not yours"})
        hub_server.requests.clear()
        err = _refused(cli(*_merge(base, items, out, "--resume-from", repo)), out, f"--resume-from {repo}", repr(bad),
                       "Nothing was downloaded")
        assert "outside the step folder" in err
        assert not [r for r in hub_server.requests if r.route in ("resolve", "tree")], hub_server.requests  # nothing fetched
        assert not (tmp_path / "x").exists() and not Path("/tmp/hf-contmerge-escape").exists()
    # a listing that is clean but a tree that is not (the repo changed in between, or a broken server): the download's
    # own refusal is a ContMergeError too
    repo = "org/merged-ok"
    _publish(api, repo, tmp_path / "first/step-2")
    entry = {"type": "file", "path": "../../x", "size": 9, "oid": git_blob_oid(b"not yours")}
    hub_server.answer_next(rf"^GET /api/models/{repo}/tree/", [entry], count=10)
    _refused(cli(*_merge(base, items, out, "--resume-from", repo)), out, repo, "not a Hub API response")
    hub_server._overrides.clear()
    # an untampered repo resumes (the check does not refuse a real step). Not org/merged-ok itself: huggingface_hub
    # cached the tampered tree listing of that commit, and would serve it again
    _publish(api, "org/merged-clean", tmp_path / "first/step-2")
    code, _, err = cli(*_merge(base, items, out, "--resume-from", "org/merged-clean"))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".hf-contmerge.json", "step-2", "step-3"]


# --------------------------------------------------------------------------- 3. offline, from the Hub cache


def test_offline_merge_uses_the_hub_cache(tmp_path, streams, cli, hub_server, offline):
    from huggingface_hub import HfApi, snapshot_download

    base, items = streams("llama", n=2)
    api = HfApi()
    shas = {repo: _publish(api, repo, folder) for repo, folder in (("org/base", base), ("org/ft-0", items[0]),
                                                                      ("org/ft-1", items[1]), ("org/ft-2", items[1]))}
    for repo in ("org/base", "org/ft-0", "org/ft-1"):  # what a login node downloads; org/ft-2 stays on the Hub
        snapshot_download(repo)
    assert cli(*_merge(base, items, tmp_path / "local"))[0] == 0

    offline()
    hub_server.requests.clear()
    out = tmp_path / "hub"
    code, _, err = cli(*_merge("org/base", ["org/ft-0", "org/ft-1"], out))
    assert code == 0, err
    for t in (1, 2):
        assert (out / f"step-{t}/model.safetensors").read_bytes() == (tmp_path / f"local/step-{t}/model.safetensors").read_bytes()
    state = json.loads((out / "step-2/contmerge_state.json").read_text())
    assert state["base"]["revision"] == shas["org/base"]
    assert [s["revision"] for s in state["stream"]] == [shas["org/ft-0"], shas["org/ft-1"]]
    code, stdout, err = cli("inspect", "--base", "org/base", "--stream", "org/ft-0", "org/ft-1")
    assert code == 0, err
    assert hub_server.requests == []  # nothing left the machine

    # not in the cache: one message naming the source and how to get it
    for args, named in ((_merge("org/base", ["org/ft-0", "org/ft-2"], tmp_path / "a"), "org/ft-2"),
                        (_merge("org/nowhere", items, tmp_path / "a"), "org/nowhere")):
        err = _refused(cli(*args), tmp_path / "a", named, "HF_HUB_OFFLINE", f"hf download {named}")
    assert hub_server.requests == []


def test_offline_resume_from_and_push(tmp_path, streams, cli, hub_server, offline):
    from huggingface_hub import HfApi, snapshot_download

    base, items = streams("gpt2", n=3)
    assert cli(*_merge(base, items, tmp_path / "local"))[0] == 0
    assert cli(*_merge(base, items[:2], tmp_path / "first"))[0] == 0
    api = HfApi()
    _publish(api, "org/merged", tmp_path / "first/step-2", tag="step-2")
    _publish(api, "org/elsewhere", tmp_path / "first/step-2")
    snapshot_download("org/merged", revision="step-2")

    offline()
    hub_server.requests.clear()
    out = tmp_path / "continued"
    code, _, err = cli(*_merge(base, items, out, "--resume-from", "org/merged@step-2"))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".hf-contmerge.json", "step-2", "step-3"]
    for name in ("model.safetensors", "contmerge_state.json"):
        assert (out / "step-3" / name).read_bytes() == (tmp_path / "local/step-3" / name).read_bytes(), name
    _refused(cli(*_merge(base, items, tmp_path / "a", "--resume-from", "org/elsewhere")), tmp_path / "a",
             "org/elsewhere", "HF_HUB_OFFLINE")
    # pushing cannot work offline: refused in the pre-flight, before any step is computed
    _refused(cli(*_merge(base, items, tmp_path / "b", "--push-to", "org/pushed", "--token", TOKEN)), tmp_path / "b",
             "org/pushed", "HF_HUB_OFFLINE")
    assert hub_server.requests == []
