"""Hub repos as base and stream items, against the local Hub-compatible server on 127.0.0.1."""

from __future__ import annotations

import json

import torch

from support.tiny_models import weights


def _publish(tmp_path, streams, api, n=3):
    base, items = streams("llama", n=n)
    api.create_repo("org/base")
    api.upload_folder(folder_path=base, repo_id="org/base")
    for i, item in enumerate(items):
        api.create_repo(f"org/ft-{i}")
        api.upload_folder(folder_path=item, repo_id=f"org/ft-{i}")
    return base, items


def _full_downloads(server, repo):
    return [r for r in server.requests if r.method == "GET" and f"{repo}/resolve/" in r.path
            and r.path.endswith(".safetensors") and r.status == 200]


def test_hub_stream_equals_local_stream_and_records_revisions(tmp_path, streams, cli, hub_server):
    from huggingface_hub import HfApi

    api = HfApi()
    base, items = _publish(tmp_path, streams, api)
    api.create_tag("org/ft-1", tag="v1")
    code, _, err = cli("merge", "--base", "org/base", "--stream", "org/ft-0", "org/ft-1@v1", "org/ft-2",
                       "--method", "task_arithmetic", "--out", tmp_path / "hub", "--quiet")
    assert code == 0, err
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "task_arithmetic",
                       "--out", tmp_path / "local", "--quiet")
    assert code == 0, err
    for t in (1, 2, 3):
        assert (tmp_path / f"hub/step-{t}/model.safetensors").read_bytes() == (tmp_path / f"local/step-{t}/model.safetensors").read_bytes()
    state = json.loads((tmp_path / "hub/step-3/contmerge_state.json").read_text())
    shas = [api.model_info(r).sha for r in ("org/ft-0", "org/ft-1", "org/ft-2")]
    assert [s["revision"] for s in state["stream"]] == shas
    assert state["base"]["revision"] == api.model_info("org/base").sha
    card = (tmp_path / "hub/step-3/README.md").read_text()
    assert "base_model_relation: merge" in card and "- org/ft-1" in card and shas[1] in card
    assert "org/ft-1@v1" in card  # the reproduce command keeps the revision as asked


def test_hub_preflight_reads_headers_only(tmp_path, streams, cli, hub_server):
    """A stream refused in the pre-flight downloads no weights; inspect reports sizes to download."""
    from huggingface_hub import HfApi
    from transformers import LlamaConfig, LlamaForCausalLM

    api = HfApi()
    _publish(tmp_path, streams, api, n=2)
    odd = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    odd.save_pretrained(tmp_path / "odd")
    api.create_repo("org/odd")
    api.upload_folder(folder_path=tmp_path / "odd", repo_id="org/odd")
    hub_server.requests.clear()
    code, _, err = cli("merge", "--base", "org/base", "--stream", "org/ft-0", "org/ft-1", "org/odd",
                       "--method", "average", "--out", tmp_path / "out", "--quiet")
    assert code == 2 and "org/odd" in err and "mlp" in err
    assert not (tmp_path / "out").exists()
    assert not _full_downloads(hub_server, "org/ft-0") and not _full_downloads(hub_server, "org/odd")
    assert not _full_downloads(hub_server, "org/base")
    code, out, err = cli("inspect", "--base", "org/base", "--stream", "org/ft-0", "org/ft-1")
    assert code == 0, err
    assert "to download" in out and "revision" in out
    assert not _full_downloads(hub_server, "org/ft-1") and not _full_downloads(hub_server, "org/base")


def test_hub_errors_are_clear(tmp_path, streams, cli, hub_server):
    from huggingface_hub import HfApi

    _publish(tmp_path, streams, HfApi(), n=1)
    code, _, err = cli("merge", "--base", "org/base", "--stream", "org/missing", "--method", "average", "--out", tmp_path / "o")
    assert code == 2 and "org/missing" in err and "not found" in err
    code, _, err = cli("merge", "--base", "org/base", "--stream", "org/ft-0@nope", "--method", "average", "--out", tmp_path / "o")
    assert code == 2 and "'nope'" in err
    assert not (tmp_path / "o").exists()
    # the item's weights are downloaded when its step runs: step 1 of an average is that item exactly
    code, _, err = cli("merge", "--base", "org/base", "--stream", "org/ft-0", "--method", "average", "--out", tmp_path / "ok", "--quiet")
    assert code == 0, err
    _, items = streams("llama", n=1)
    for k, v in weights(items[0]).items():
        assert torch.equal(weights(tmp_path / "ok/step-1")[k], v), k
