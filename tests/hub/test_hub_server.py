"""Tests of the local Hub server against the real huggingface_hub / transformers client code.

References are independent of the code under test: local files and their bytes, safetensors headers read with
``safetensors.safe_open``, the server's on-disk store, and raw HTTP through ``http.client``.
transformers and huggingface_hub are imported at module level on purpose: the fixture must redirect clients that
were imported (and read ``HF_ENDPOINT``) before it ran.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import huggingface_hub
import pytest
import torch
import transformers
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils._runtime import is_xet_available  # the check upload_folder itself makes
from safetensors import safe_open

from support.hub_server import HubServer, git_blob_oid, running_hub

REPO = "org/tiny-llama"


def _tiny_llama(seed: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def step_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two saved tiny Llama checkpoints with a README card and a notes file that differ between steps."""
    dirs = []
    for step in (1, 2):
        folder = tmp_path_factory.mktemp(f"step-{step}")
        _tiny_llama(seed=step).save_pretrained(folder)
        (folder / "README.md").write_text(f"---\nlicense: apache-2.0\ntags: [merge]\n---\n# Step {step}\n")
        (folder / "notes.txt").write_text(f"notes of step {step}\n")
        dirs.append(folder)
    return dirs


def _push_steps(api: HfApi, step_dirs: list[Path], repo_id: str = REPO) -> list[str]:
    """Create the repo, push each step as one commit with a branch and a tag; return the commit ids."""
    api.create_repo(repo_id)
    oids = []
    for step, folder in enumerate(step_dirs, start=1):
        oid = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=f"step {step}").oid
        api.create_branch(repo_id, branch=f"step-{step}", revision=oid)
        api.create_tag(repo_id, tag=f"v{step}", revision=oid)
        oids.append(oid)
    return oids


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _local_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------------ repos


def test_fixture_redirects_clients_imported_before_it(hub_server: HubServer, tmp_path: Path) -> None:
    assert hub_server.endpoint == huggingface_hub.constants.ENDPOINT
    assert huggingface_hub.constants.HF_HUB_CACHE.startswith(str(tmp_path))
    url = huggingface_hub.create_repo(REPO)  # module-level function bound to the HfApi built at import
    assert url == f"{hub_server.endpoint}/{REPO}" and url.repo_id == REPO
    assert transformers.utils.hub.hf_api().repo_exists(REPO)
    assert hub_server.store.repo("model", REPO).exists
    # ModelCard validates against constants.ENDPOINT, read at import: it must reach this server too.
    huggingface_hub.ModelCard("---\nlicense: mit\n---\n# Card\n").push_to_hub(REPO)
    assert "# Card" in Path(huggingface_hub.hf_hub_download(REPO, "README.md")).read_text()
    assert "validate_yaml" in {r.route for r in hub_server.requests}


def test_create_repo_conflict_and_exist_ok(hub_server: HubServer) -> None:
    api = HfApi()
    first = api.create_repo(REPO)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo(REPO)
    assert excinfo.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True) == first
    # The Hub starts every repo with one commit holding .gitattributes on main.
    info = api.model_info(REPO)
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]
    assert info.sha == hub_server.store.repo("model", REPO).refs()["branches"]["main"]
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    assert not api.repo_exists("org/missing")
    assert [r.route for r in hub_server.requests] == ["create_repo"] * 3 + ["repo_info"] * 3


def test_upload_branches_tags_refs_and_commits(hub_server: HubServer, step_dirs: list[Path]) -> None:
    api = HfApi()
    oid1, oid2 = _push_steps(api, step_dirs)
    assert oid1 != oid2
    assert set(api.list_repo_files(REPO)) == _local_files(step_dirs[1]) | {".gitattributes"}

    refs = api.list_repo_refs(REPO)
    branches = {b.name: b.target_commit for b in refs.branches}
    tags = {t.name: (t.ref, t.target_commit) for t in refs.tags}
    assert branches == {"main": oid2, "step-1": oid1, "step-2": oid2}
    assert tags == {"v1": ("refs/tags/v1", oid1), "v2": ("refs/tags/v2", oid2)}
    stored = hub_server.store.repo("model", REPO).refs()
    assert stored["branches"] == branches and stored["tags"] == {"v1": oid1, "v2": oid2}

    commits = api.list_repo_commits(REPO)
    assert [c.title for c in commits] == ["step 2", "step 1", "initial commit"]
    assert [c.commit_id for c in commits[:2]] == [oid2, oid1]
    assert [c.commit_id for c in api.list_repo_commits(REPO, revision="v1")] == [oid1, commits[2].commit_id]

    info = api.model_info(REPO, revision="step-1", files_metadata=True)
    sizes = {s.rfilename: (s.size, s.blob_id) for s in info.siblings}
    local = step_dirs[0] / "model.safetensors"
    assert info.sha == oid1
    assert sizes["model.safetensors"] == (local.stat().st_size, git_blob_oid(local.read_bytes()))
    assert info.safetensors.total == sum(p.numel() for p in _tiny_llama(1).state_dict().values())

    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_branch(REPO, branch="step-1")
    assert excinfo.value.response.status_code == 409
    api.create_branch(REPO, branch="step-1", exist_ok=True)
    api.delete_branch(REPO, branch="step-1")
    api.delete_tag(REPO, tag="v1")
    assert not api.revision_exists(REPO, "step-1") and not api.revision_exists(REPO, "v1")
    assert api.revision_exists(REPO, oid1) and api.revision_exists(REPO, oid1[:10])
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-branch")


def test_create_commit_deletes_checks_parent_and_opens_prs(hub_server: HubServer, step_dirs: list[Path]) -> None:
    api = HfApi()
    _, oid2 = _push_steps(api, step_dirs)
    info = api.create_commit(
        REPO,
        operations=[CommitOperationDelete("notes.txt"), CommitOperationAdd("extra/a.txt", b"a")],
        commit_message="tidy",
        parent_commit=oid2,
    )
    files = set(api.list_repo_files(REPO))
    assert "notes.txt" not in files and "extra/a.txt" in files
    tree = {e.path: type(e).__name__ for e in api.list_repo_tree(REPO)}
    assert tree["extra"] == "RepoFolder" and tree["config.json"] == "RepoFile"
    assert [e.path for e in api.list_repo_tree(REPO, path_in_repo="extra")] == ["extra/a.txt"]

    with pytest.raises(HfHubHTTPError) as excinfo:  # stale parent: someone committed since oid2
        api.create_commit(REPO, operations=[CommitOperationAdd("b.txt", b"b")], commit_message="x", parent_commit=oid2)
    assert excinfo.value.response.status_code == 412
    with pytest.raises(EntryNotFoundError):
        api.create_commit(REPO, operations=[CommitOperationDelete("missing.txt")], commit_message="x")
    with pytest.raises(HfHubHTTPError) as excinfo:  # tags are not branches
        api.create_commit(REPO, operations=[CommitOperationAdd("b.txt", b"b")], commit_message="x", revision="v1")
    assert excinfo.value.response.status_code == 400

    pr = api.create_commit(REPO, operations=[CommitOperationAdd("pr.txt", b"pr")], commit_message="pr", create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1
    assert api.list_repo_refs(REPO, include_pull_requests=True).pull_requests[0].target_commit == pr.oid
    assert Path(api.hf_hub_download(REPO, "pr.txt", revision="refs/pr/1")).read_bytes() == b"pr"
    assert api.model_info(REPO).sha == info.oid  # the PR left main alone

    # Unchanged files are dropped client-side thanks to the preupload oid: no new commit.
    again = api.upload_folder(repo_id=REPO, folder_path=step_dirs[1], allow_patterns=["config.json"])
    assert again.oid == info.oid


def test_revisions_with_slashes_are_url_encoded(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo(REPO)
    api.create_branch(REPO, branch="feature/x")
    api.upload_file(path_or_fileobj=b"on a branch", path_in_repo="f.txt", repo_id=REPO, revision="feature/x")
    assert Path(api.hf_hub_download(REPO, "f.txt", revision="feature/x")).read_bytes() == b"on a branch"
    assert Path(api.hf_hub_download(REPO, "f.txt", revision="refs/heads/feature/x")).read_bytes() == b"on a branch"
    assert "f.txt" not in api.list_repo_files(REPO)
    assert "/branch/feature%2Fx" in {r.path[len(f"/api/models/{REPO}") :] for r in hub_server.requests}


def test_dataset_repos(hub_server: HubServer) -> None:
    api = HfApi()
    url = api.create_repo("org/data", repo_type="dataset")
    assert url.repo_type == "dataset"
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data.csv", repo_id="org/data", repo_type="dataset")
    path = api.hf_hub_download("org/data", "data.csv", repo_type="dataset")
    assert Path(path).read_bytes() == b"a,b\n1,2\n"
    assert api.dataset_info("org/data").sha == hub_server.store.repo("dataset", "org/data").refs()["branches"]["main"]


# -------------------------------------------------------------------------------------------- downloads


def test_hf_hub_download_at_tag_and_snapshot_download(
    hub_server: HubServer, step_dirs: list[Path], tmp_path: Path
) -> None:
    api = HfApi()
    oid1, _ = _push_steps(api, step_dirs)
    at_tag = Path(huggingface_hub.hf_hub_download(REPO, "notes.txt", revision="v1"))
    at_main = Path(huggingface_hub.hf_hub_download(REPO, "notes.txt"))
    assert at_tag.read_text() == "notes of step 1\n" and at_main.read_text() == "notes of step 2\n"
    assert at_tag.is_relative_to(tmp_path / "hf_home") and oid1 in at_tag.parts
    weights = huggingface_hub.hf_hub_download(REPO, "model.safetensors", revision="step-1")
    assert _sha256(weights) == _sha256(step_dirs[0] / "model.safetensors")

    snapshot = Path(
        huggingface_hub.snapshot_download(REPO, revision="v1", allow_patterns=["*.json"], cache_dir=tmp_path / "fresh")
    )
    assert _local_files(snapshot) == {p for p in _local_files(step_dirs[0]) if p.endswith(".json")}
    for name in _local_files(snapshot):
        assert (snapshot / name).read_bytes() == (step_dirs[0] / name).read_bytes()
    assert api.file_exists(REPO, "config.json", revision="v1") and not api.file_exists(REPO, "nope.json")
    with pytest.raises(EntryNotFoundError):
        huggingface_hub.hf_hub_download(REPO, "nope.json")
    # Xet is never advertised, so every request went to a route this server knows.
    assert all(r.route is not None for r in hub_server.requests)


def test_get_safetensors_metadata_single_and_sharded(
    hub_server: HubServer, step_dirs: list[Path], tmp_path: Path
) -> None:
    api = HfApi()
    _push_steps(api, step_dirs[:1])
    meta = api.get_safetensors_metadata(REPO, revision="v1")
    assert not meta.sharded
    with safe_open(step_dirs[0] / "model.safetensors", "pt") as f:
        expected = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    tensors = meta.files_metadata["model.safetensors"].tensors
    assert {k: (t.shape, t.dtype) for k, t in tensors.items()} == expected
    assert any(r.route == "resolve" and r.status == 206 for r in hub_server.requests)  # header read by Range

    sharded = tmp_path / "sharded"
    _tiny_llama(seed=3).save_pretrained(sharded, max_shard_size="10KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    api.create_repo("org/sharded")
    api.upload_folder(repo_id="org/sharded", folder_path=sharded)
    meta = api.get_safetensors_metadata("org/sharded")
    assert meta.sharded and meta.weight_map == index["weight_map"]
    assert api.get_sharded_safetensors_metadata("org/sharded").weight_map == index["weight_map"]


def test_from_pretrained_at_revision_matches_local_folder(hub_server: HubServer, step_dirs: list[Path]) -> None:
    _push_steps(HfApi(), step_dirs)
    hub_model = transformers.AutoModel.from_pretrained(REPO, revision="step-1")
    local_model = transformers.AutoModel.from_pretrained(step_dirs[0])
    hub_state, local_state = hub_model.state_dict(), local_model.state_dict()
    assert hub_state.keys() == local_state.keys()
    assert all(torch.equal(hub_state[k], local_state[k]) for k in local_state)
    main_state = transformers.AutoModel.from_pretrained(REPO).state_dict()
    assert not torch.equal(main_state["embed_tokens.weight"], local_state["embed_tokens.weight"])


def test_transformers_api_created_before_the_fixture_is_redirected(tmp_path: Path, step_dirs: list[Path]) -> None:
    stale = transformers.utils.hub.hf_api()  # bound to whatever endpoint was current before the server
    with running_hub(tmp_path) as hub:
        _push_steps(HfApi(), step_dirs[:1])
        model = transformers.AutoModelForCausalLM.from_pretrained(REPO, revision="v1")
        assert transformers.utils.hub.hf_api() is not stale
        assert transformers.utils.hub.hf_api().endpoint == hub.endpoint
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert hub.endpoint != huggingface_hub.constants.ENDPOINT  # restored on exit


def test_peft_adapter_from_a_repo_revision(hub_server: HubServer, tmp_path: Path) -> None:
    """peft checks files with huggingface_hub's module-level ``file_exists``, bound to the import-time HfApi."""
    import peft  # imported here: it is slow to import and only this test needs it

    config = _tiny_llama(seed=0).config
    lora = peft.get_peft_model(
        _tiny_llama(seed=0), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(tmp_path / "adapter")
    api = HfApi()
    api.create_repo("org/lora")
    oid = api.upload_folder(repo_id="org/lora", folder_path=tmp_path / "adapter").oid
    api.create_tag("org/lora", tag="v1", revision=oid)
    api.upload_file(path_or_fileobj=b"later", path_in_repo="later.txt", repo_id="org/lora")
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM(config), "org/lora", revision="v1")
    expected = {k: v for k, v in lora.state_dict().items() if "lora_" in k}
    got = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert {r.path.rsplit("/", 2)[-2] for r in hub_server.requests_to("resolve")} == {"v1"}


# ------------------------------------------------------------------------------- faults, auth, transport


def test_fail_next_injects_a_500_then_the_retry_succeeds(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo(REPO)
    head = api.model_info(REPO).sha
    hub_server.fail_next(rf"^POST /api/models/{REPO}/commit/", status=500, count=1)
    operations = [CommitOperationAdd("a.txt", b"a")]
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_commit(REPO, operations=operations, commit_message="a")
    assert excinfo.value.response.status_code == 500
    assert api.model_info(REPO).sha == head  # nothing was committed
    retried = api.create_commit(REPO, operations=[CommitOperationAdd("a.txt", b"a")], commit_message="a")
    assert api.model_info(REPO).sha == retried.oid != head
    assert [(r.status, r.injected) for r in hub_server.requests_to("commit")] == [(500, True), (200, False)]


def test_backoff_routes_retry_through_an_injected_503(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo(REPO)
    hub_server.fail_next("/preupload/", status=503, count=1, retry_after=0)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert [(r.status, r.injected) for r in hub_server.requests_to("preupload")] == [(503, True), (200, False)]


@pytest.mark.parametrize("disable_xet", [False, True])
def test_upload_folder_path_and_an_injected_commit_failure(
    tmp_path: Path, step_dirs: list[Path], disable_xet: bool
) -> None:
    """With hf_xet available, upload_folder commits through huggingface_hub's pipelined uploader, which retries a
    5xx on the commit; with Xet disabled it makes one plain create_commit, which raises. Neither touches Xet."""
    with running_hub(tmp_path, disable_xet=disable_xet) as hub:
        api = HfApi()
        api.create_repo(REPO)
        pipelined = is_xet_available()
        assert not (disable_xet and pipelined)
        hub.fail_next(rf"^POST /api/models/{REPO}/commit/main$", status=500, retry_after=0)
        if pipelined:
            oid = api.upload_folder(repo_id=REPO, folder_path=step_dirs[0]).oid
            assert api.model_info(REPO).sha == oid
        else:
            with pytest.raises(HfHubHTTPError):
                api.upload_folder(repo_id=REPO, folder_path=step_dirs[0])
        commits = [(r.status, r.injected) for r in hub.requests_to("commit")]
        assert commits == [(500, True), (200, False)] if pipelined else [(500, True)]
        assert all(r.route is not None for r in hub.requests)


def test_subprocess_reaches_the_server_through_the_environment(hub_server: HubServer) -> None:
    HfApi().create_repo(REPO)
    code = f"from huggingface_hub import HfApi; print(HfApi().model_info({REPO!r}).sha)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == hub_server.store.repo("model", REPO).refs()["branches"]["main"]


def test_token_is_sent_but_never_logged_and_can_be_required(tmp_path: Path) -> None:
    token = "hf_TopSecretValue123"
    with running_hub(tmp_path, require_token=True) as hub:
        with pytest.raises(HfHubHTTPError) as excinfo:
            HfApi().create_repo(REPO)
        assert excinfo.value.response.status_code == 401
        api = HfApi(token=token)
        api.create_repo(REPO, private=True)
        with pytest.raises(RepositoryNotFoundError):  # a 401 on a repo route reads as "not found", as on the Hub
            HfApi(token=False).model_info(REPO)
        api.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=REPO)
        assert Path(api.hf_hub_download(REPO, "s.txt")).read_bytes() == b"secret"
        assert api.whoami()["name"] == hub.username
        hub.require_token = False
        with pytest.raises(RepositoryNotFoundError):  # private repo, anonymous caller
            HfApi(token=False).model_info(REPO)
    authenticated = [r.authenticated for r in hub.requests]
    assert authenticated == [False, True, False] + [True] * (len(authenticated) - 4) + [False]
    assert [r.status for r in hub.requests][:3] == [401, 200, 401]
    assert token not in repr(hub.requests)
    assert not any(token.encode() in p.read_bytes() for p in (tmp_path / "hub_store").rglob("*") if p.is_file())


def test_raw_http_range_keepalive_and_stop(tmp_path: Path) -> None:
    hub = HubServer(tmp_path / "store", request_timeout=60).start()
    repo = hub.store.repo("model", REPO)
    repo.create(private=False, author="me")
    content = repo.read_blob(repo.commit(repo.resolve("main")).tree[".gitattributes"])
    size = len(content)
    host, port = urlsplit(hub.endpoint).hostname, urlsplit(hub.endpoint).port
    conn = http.client.HTTPConnection(host, port, timeout=3)  # one keep-alive connection for every request
    try:
        conn.request("POST", "/api/no/such/route", body=b"x" * 10_000)  # body must be drained for keep-alive
        response = conn.getresponse()
        assert response.status == 404 and json.loads(response.read())["error"]
        for header, status, expected, content_range in [
            ("bytes=0-9", 206, content[:10], f"bytes 0-9/{size}"),
            ("bytes=-4", 206, content[-4:], f"bytes {size - 4}-{size - 1}/{size}"),
            (f"bytes=5-{10**9}", 206, content[5:], f"bytes 5-{size - 1}/{size}"),
            (None, 200, content, None),
        ]:
            conn.request("GET", f"/{REPO}/resolve/main/.gitattributes", headers={"Range": header} if header else {})
            response = conn.getresponse()
            assert (response.status, response.read()) == (status, expected)
            assert response.getheader("ETag") == f'"{git_blob_oid(content)}"'
            assert response.getheader("Content-Range") == content_range
        conn.request("GET", f"/{REPO}/resolve/main/.gitattributes", headers={"Range": f"bytes={size}-"})
        response = conn.getresponse()
        assert response.status == 416 and response.getheader("Content-Range") == f"bytes */{size}"
        response.read()
        assert [r.status for r in hub.requests] == [404, 206, 206, 206, 200, 416]
        hub.stop()
        # The idle keep-alive connection was closed by stop(), not left to the 60 s request timeout.
        assert conn.sock.recv(1) == b""
    finally:
        conn.close()
        hub.stop()
    with pytest.raises(OSError):
        http.client.HTTPConnection(host, port, timeout=2).request("GET", "/")
