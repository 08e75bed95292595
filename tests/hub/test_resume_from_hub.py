"""--resume-from ORG/NAME@REV: continue from a published step, bit-identical to one local run."""

from __future__ import annotations

import json


def _args(base, items, out):
    return ["merge", "--base", base, "--stream", *items, "--method", "opcm", "--out", out, "--quiet"]


def test_resume_from_published_step(tmp_path, streams, cli, hub_server):
    from huggingface_hub import HfApi

    base, items = streams("gpt2", n=4)
    assert cli(*_args(base, items, tmp_path / "local"))[0] == 0
    assert cli(*_args(base, items[:2], tmp_path / "first"))[0] == 0
    api = HfApi()
    api.create_repo("org/merged")
    commit = api.upload_folder(folder_path=tmp_path / "first/step-2", repo_id="org/merged")
    api.create_tag("org/merged", tag="step-2", revision=commit.oid)
    api.upload_folder(folder_path=tmp_path / "first/step-1", repo_id="org/merged", delete_patterns=["*"])  # main moves on

    out = tmp_path / "continued"
    code, _, err = cli(*_args(base, items, out), "--resume-from", "org/merged@step-2")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".hf-contmerge.json", "step-2", "step-3", "step-4"]
    for t in (3, 4):
        for name in ("model.safetensors", "contmerge_state.json", "README.md", "contmerge_state/merged.safetensors"):
            assert (out / f"step-{t}" / name).read_bytes() == (tmp_path / f"local/step-{t}" / name).read_bytes(), name


def test_resume_from_checks_the_stream_and_the_repo(tmp_path, streams, cli, hub_server):
    from huggingface_hub import HfApi

    base, items = streams("gpt2", n=4)
    assert cli(*_args(base, items[:2], tmp_path / "first"))[0] == 0
    api = HfApi()
    api.create_repo("org/merged")
    api.upload_folder(folder_path=tmp_path / "first/step-2", repo_id="org/merged")
    code, _, err = cli(*_args(base, [items[1], items[0], *items[2:]], tmp_path / "a"), "--resume-from", "org/merged")
    assert code == 2 and "stream so far" in err
    assert not (tmp_path / "a").exists()
    api.create_repo("org/other")
    api.upload_file(path_or_fileobj=b"hello", path_in_repo="README.md", repo_id="org/other")
    code, _, err = cli(*_args(base, items, tmp_path / "b"), "--resume-from", "org/other")
    assert code == 2 and "contmerge_state.json" in err
    assert not (tmp_path / "b").exists()
    state = json.loads((tmp_path / "first/step-2/contmerge_state.json").read_text())
    assert state["step"] == 2


def test_became_resumes_from_a_published_step_bit_identically(tmp_path, cli, hub_server):
    """BECAME carries its accumulated Fisher as a slot: a step pushed to the Hub continues exactly."""
    from huggingface_hub import HfApi

    from support.tiny_models import classifier_stream

    base, items, data = classifier_stream(tmp_path, labels=(2, 3, 2), texts=6, scale=0.05)
    flags = ["--method", "became", "--calib-samples", "4", "--calib-batch-size", "2", "--max-length", "12", "--quiet"]
    assert cli("merge", "--base", base, "--stream", *items, "--data", *data, "--out", tmp_path / "local", *flags)[0] == 0
    assert cli("merge", "--base", base, "--stream", *items[:2], "--data", *data[:2], "--out", tmp_path / "first", *flags)[0] == 0
    api = HfApi()
    api.create_repo("org/became")
    api.upload_folder(folder_path=tmp_path / "first/step-2", repo_id="org/became")
    out = tmp_path / "continued"
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--data", *data, "--out", out, *flags,
                       "--resume-from", "org/became")
    assert code == 0, err
    for name in ("model.safetensors", "contmerge_state.json", "README.md", "contmerge_state/merged.safetensors",
                 "contmerge_state/fisher_bar.safetensors"):
        assert (out / "step-3" / name).read_bytes() == (tmp_path / "local/step-3" / name).read_bytes(), name

