"""`hf-contmerge merge --push-to`: every step pushed as it completes; a failed push is finished by --resume."""

from __future__ import annotations

from pathlib import Path

import torch

from support.tiny_models import weights

TOKEN = "hf_CLIsecret0987654321"
COMMIT = r"^POST /api/models/org/merged/commit/"


def _merge(cli, base, items, out, *extra):
    return cli("merge", "--base", base, "--stream", *items, "--method", "task_arithmetic", "--out", out,
               "--push-to", "org/merged", "--token", TOKEN, "--push-retries", "1", *extra)


def test_push_every_step_and_finish_a_failed_push_with_resume(tmp_path, streams, cli, hub_server):
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM

    base, items = streams("llama", n=3)
    out = tmp_path / "out"
    hub_server.fail_next(COMMIT, status=503, count=10 ** 3)  # from now on every commit fails…
    code, stdout, err = _merge(cli, base, items, out)
    assert code == 2 and "--resume" in err and "could not be pushed" in err
    assert [p.name for p in sorted(out.iterdir())] == [".hf-contmerge.json", "step-1"]  # the step stays, whole
    mtime = (out / "step-1" / "model.safetensors").stat().st_mtime_ns
    hub_server._failures.clear()  # …until the server recovers
    code, stdout, err = _merge(cli, base, items, out, "--resume")
    assert code == 0, err
    assert (out / "step-1" / "model.safetensors").stat().st_mtime_ns == mtime  # pushed, not recomputed
    api = HfApi(token=TOKEN)
    refs = {t.name: t.target_commit for t in api.list_repo_refs("org/merged").tags}
    assert sorted(refs) == ["step-1", "step-2", "step-3"]
    titles = [c.title for c in api.list_repo_commits("org/merged")]
    assert any(t.startswith("step 3: task_arithmetic + ") for t in titles)
    for t in (1, 2, 3):
        model = AutoModelForCausalLM.from_pretrained("org/merged", revision=f"step-{t}", token=TOKEN)
        local = weights(out / f"step-{t}")
        for k, v in model.state_dict().items():
            assert torch.equal(v, local[k]), (t, k)
    main_files = set(api.list_repo_files("org/merged"))
    assert {"README.md", "contmerge_state.json", "contmerge_state/merged.safetensors", "model.safetensors"} <= main_files
    # the token is nowhere: not in what was written, printed, logged or stored by the server
    for path in [*Path(out).rglob("*"), *Path(hub_server.store.root).rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in stdout + err
    assert all(TOKEN not in repr(r) for r in hub_server.requests)


def test_foreign_repo_is_refused_before_any_work(tmp_path, streams, cli, hub_server):
    from huggingface_hub import HfApi

    base, items = streams("llama", n=3)
    api = HfApi(token=TOKEN)
    api.create_repo("org/merged")
    api.upload_file(path_or_fileobj=b"my own model", path_in_repo="README.md", repo_id="org/merged")
    code, _, err = _merge(cli, base, items, tmp_path / "out")
    assert code == 2 and "org/merged" in err and "--push-existing" in err
    assert not (tmp_path / "out").exists()
    code, _, err = _merge(cli, base, items[:1], tmp_path / "out", "--push-existing", "--quiet")
    assert code == 0, err


def test_api_evaluates_each_step_before_it_is_pushed(tmp_path, streams, hub_server):
    """The published card carries base_model_relation: merge and the step's evaluation results."""
    from huggingface_hub import HfApi, ModelCard, hf_hub_download

    from hf_contmerge import ContinualMerger

    base, items = streams("llama", n=2)
    api = HfApi(token=TOKEN)
    for repo, folder in (("org/base", base), ("org/ft-0", items[0]), ("org/ft-1", items[1])):
        api.create_repo(repo)
        api.upload_folder(folder_path=folder, repo_id=repo)
    seen = []

    def evaluate(result):
        seen.append(result.step)
        scores = [0.5 + 0.1 * i for i in range(result.step)]
        return {"description": "toy scores", "tasks": [f"task{i}" for i in range(result.step)],
                "rows": [{"name": f"merged, step {result.step}", "scores": scores, "mean": sum(scores) / len(scores)}]}

    merger = ContinualMerger(base="org/base", method="opcm", out=tmp_path / "out", push_to="org/merged", token=TOKEN,
                             evaluate=evaluate)
    merger.run(["org/ft-0", "org/ft-1"])
    assert seen == [1, 2]
    card = ModelCard.load(hf_hub_download("org/merged", "README.md", revision="step-2", token=TOKEN))
    assert card.data.base_model_relation == "merge"
    assert card.data.base_model == ["org/base", "org/ft-0", "org/ft-1"]
    assert [(r.dataset_name, r.metric_value) for r in card.data.eval_results] == [("task0", 0.5), ("task1", 0.6)]
