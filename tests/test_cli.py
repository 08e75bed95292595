"""The CLI, recipes and the Python API: one options model behind the three."""

from __future__ import annotations

import json

import pytest
import torch
import yaml


def test_methods_command_lists_parameters(cli):
    code, out, _ = cli("methods")
    assert code == 0
    for needle in ("average", "task_arithmetic", "--set scaling=0.3", "ties", "--set top_k=0.2", "magmax", "--set scaling=0.5"):
        assert needle in out


def test_merge_help_lists_methods(capsys):
    from hf_contmerge.cli import main

    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = capsys.readouterr().out
    assert "--shard-size" in text and "--allow-pickle" in text and "magmax" in text and "--recipe" in text


def test_dry_run_writes_nothing(tmp_path, streams, cli):
    base, items = streams("llama")
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "ties", "--out", out, "--dry-run")
    assert code == 0, err
    assert "pre-flight: OK" in err and "would write step-1, step-2, step-3" in err
    assert not out.exists()


def test_recipe_equals_flags_and_flags_override(tmp_path, streams, cli):
    base, items = streams("llama")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(base), "stream": [str(i) for i in items], "method": "task_arithmetic",
                                      "params": {"scaling": 0.9}, "out": str(tmp_path / "a"), "quiet": True}))
    assert cli("merge", "--recipe", recipe)[0] == 0
    assert cli("merge", "--recipe", recipe, "--set", "scaling=0.2", "--out", tmp_path / "b")[0] == 0
    assert cli("merge", "--base", base, "--stream", *items, "--method", "task_arithmetic", "--set", "scaling=0.2",
               "--out", tmp_path / "c", "--quiet")[0] == 0
    assert (tmp_path / "b/step-3/model.safetensors").read_bytes() == (tmp_path / "c/step-3/model.safetensors").read_bytes()
    assert (tmp_path / "a/step-3/model.safetensors").read_bytes() != (tmp_path / "b/step-3/model.safetensors").read_bytes()
    assert json.loads((tmp_path / "a/step-3/contmerge_state.json").read_text())["params"] == {"scaling": 0.9}


def test_shipped_recipes_are_valid():
    from pathlib import Path

    from hf_contmerge.options import MergeOptions, load_recipe

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert recipes
    for r in recipes:
        MergeOptions.create(**load_recipe(r))


def test_api_equals_cli(tmp_path, streams, cli):
    from hf_contmerge import ContinualMerger

    base, items = streams("gpt2")
    assert cli("merge", "--base", base, "--stream", *items, "--method", "magmax", "--out", tmp_path / "cli", "--quiet")[0] == 0
    merger = ContinualMerger(base=str(base), method="magmax", out=tmp_path / "api")
    results = merger.run([str(i) for i in items])
    assert [r.step for r in results] == [1, 2, 3]
    for t in (1, 2, 3):
        for name in ("model.safetensors", "contmerge_state.json", "README.md"):
            assert (tmp_path / f"api/step-{t}/{name}").read_bytes() == (tmp_path / f"cli/step-{t}/{name}").read_bytes()
    assert type(merger.model()).__name__ == "GPT2LMHeadModel"


def test_device_auto_runs_and_missing_cuda_is_a_clear_error(tmp_path, streams, cli):
    base, items = streams("llama")
    code, _, err = cli("merge", "--base", base, "--stream", *items[:1], "--method", "opcm", "--device", "auto",
                       "--out", tmp_path / "auto", "--quiet")
    assert code == 0, err
    if not torch.cuda.is_available():
        code, _, err = cli("merge", "--base", base, "--stream", *items[:1], "--method", "opcm", "--device", "cuda",
                           "--out", tmp_path / "cuda", "--quiet")
        assert code == 2 and "no CUDA GPU" in err
        assert not (tmp_path / "cuda").exists()
