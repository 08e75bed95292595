"""Shard writer and reader against the safetensors library and transformers; CLI, recipes, API."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hf_contmerge.io.safetensors import SafetensorsFile, TensorSpec, iter_row_chunks
from hf_contmerge.io.writer import StreamingWriter, plan_shards
from tiny_models import weights


def test_sharded_writer_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(7, 5, generator=g),
        "a.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.ids": torch.arange(6, dtype=torch.int64),
        "scalar": torch.tensor(3.5, dtype=torch.float16),
        "empty": torch.zeros(0, 4),
    }
    specs = [TensorSpec(k, tuple(v.shape), {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64",
                                             torch.float16: "F16"}[v.dtype]) for k, v in tensors.items()]
    writer = StreamingWriter.planned(tmp_path, specs, plan_shards(specs, 100))
    for key in writer.sequence:
        t = tensors[key]
        for rows in iter_row_chunks(tuple(t.shape), t.element_size(), 24):
            writer.write(key, t if rows is None else t[rows[0]:rows[1]])
    files = writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    loaded = {}
    for f in files:
        if f.suffix == ".safetensors":
            loaded.update(load_file(f))  # the safetensors library accepts what we wrote
            assert SafetensorsFile(f).metadata == {"format": "pt"}
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k


def test_append_writer_round_trip(tmp_path):
    """Shapes known only on arrival (low-rank factors): whole tensors, chunked ones, empty ones, shards."""
    g = torch.Generator().manual_seed(1)
    tensors = {
        "w::left": torch.randn(6, 3, generator=g),
        "w::right": torch.randn(3, 0, generator=g),
        "chunked": torch.randn(8, 2, generator=g).to(torch.bfloat16),
        "x::left": torch.randn(2, 9, generator=g),
    }
    writer = StreamingWriter.appended(tmp_path, [*tensors, "never.written"], max_shard_size=60, prefix="lowrank-merged",
                                      shapes={"chunked": (8, 2)})
    for key, t in tensors.items():
        for rows in ([(0, 3), (3, 8)] if key == "chunked" else [None]):
            writer.write(key, t if rows is None else t[rows[0]:rows[1]])
    files = writer.close()
    index = json.loads((tmp_path / "lowrank-merged.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and len({f for f in files if f.suffix == ".safetensors"}) > 1
    loaded = {}
    for f in files:
        if f.suffix == ".safetensors":
            loaded.update(load_file(f))
            assert set(SafetensorsFile(f).tensors) <= set(tensors)  # our validating reader accepts the padding
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k
    assert not list(tmp_path.glob(".*partial"))


def test_writers_with_nothing_planned_leave_valid_empty_files(tmp_path):
    StreamingWriter.planned(tmp_path, [], [], prefix="merged").close()
    StreamingWriter.appended(tmp_path, ["a"], prefix="lowrank-merged").close()
    assert load_file(tmp_path / "merged.safetensors") == {} and load_file(tmp_path / "lowrank-merged.safetensors") == {}


def test_reader_rows_equal_slices(tmp_path):
    t = torch.randn(9, 4, 3)
    save_file({"x": t, "y": torch.ones(2)}, tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    assert torch.equal(f.read("x"), t)
    assert torch.equal(f.read("x", (2, 7)), t[2:7])
    f.close()


def test_sharded_output_loads_with_transformers(tmp_path, streams, cli):
    from transformers import AutoModelForCausalLM

    base, items = streams("llama")
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "average", "--shard-size", "30KB",
                       "--out", out, "--quiet")
    assert code == 0, err
    step = out / "step-3"
    assert len(list(step.glob("model-*-of-*.safetensors"))) > 2 and (step / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(step)
    ref = {k: sum(weights(i)[k] for i in items) / 3 for k in weights(base)}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref[k])
    # the carried state is sharded the same way and reads back as the published weights (float32)
    assert (step / "contmerge_state" / "merged.safetensors.index.json").is_file()
    carried = {}
    for f in (step / "contmerge_state").glob("merged-*.safetensors"):
        carried.update(load_file(f))
    assert carried.keys() == ref.keys()
    for k, v in weights(step).items():
        assert torch.equal(carried[k], v), k  # float32 model: state and weights are the same numbers


def test_sharded_input_is_read(tmp_path, streams, cli):
    from transformers import AutoModelForCausalLM

    base, items = streams("llama")
    sharded = tmp_path / "sharded-ft"
    AutoModelForCausalLM.from_pretrained(items[0]).save_pretrained(sharded, max_shard_size="20KB")
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", base, "--stream", sharded, "--method", "average", "--out", out, "--quiet")
    assert code == 0, err
    assert weights(out / "step-1").keys() == weights(items[0]).keys()
    for k, v in weights(items[0]).items():
        assert torch.equal(weights(out / "step-1")[k], v)


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


def test_card_metadata_and_lineage(tmp_path, streams, cli):
    from huggingface_hub import ModelCard

    base, items = streams("bert")
    out = tmp_path / "out"
    assert cli("merge", "--base", base, "--stream", *items[:2], "--method", "ties", "--set", "top_k=0.4",
               "--out", out, "--quiet")[0] == 0
    card = ModelCard.load(out / "step-2" / "README.md")
    assert {"merge", "continual-merging", "hf-contmerge", "ties"} <= set(card.data.tags)
    text = card.text
    assert "`top_k=0.4`" in text and "`scaling=0.3`" in text
    assert str(items[0]) in text and str(items[1]) in text and "fingerprint" in text
    assert "--set top_k=0.4" in text and "arXiv 2306.01708" in text


def test_card_names_hub_models_as_base_model():
    from hf_contmerge.artifacts.card import render_card
    from hf_contmerge.artifacts.state import StepState

    state = StepState(step=2, method="average", params={}, options={"dtype": "auto"},
                      base={"source": "org/base@v1", "revision": "a" * 40, "fingerprint": "f", "kind": "full"},
                      stream=[{"source": "org/ft-1", "revision": "b" * 40, "fingerprint": "g", "kind": "full"},
                              {"source": "org/ft-2", "revision": "c" * 40, "fingerprint": "h", "kind": "full"}])
    from huggingface_hub import ModelCard

    card = ModelCard(render_card(state))
    assert card.data.base_model == ["org/base", "org/ft-1", "org/ft-2"]
    assert card.data.base_model_relation == "merge"
    assert "b" * 40 in card.text


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


def test_recorded_evaluation_reaches_card_metadata(tmp_path, streams, cli):
    from huggingface_hub import ModelCard

    from hf_contmerge.artifacts.folder import record_evaluation
    from hf_contmerge.artifacts.state import read_state

    base, items = streams("llama")
    out = tmp_path / "out"
    assert cli("merge", "--base", base, "--stream", *items[:2], "--method", "average", "--out", out, "--quiet")[0] == 0
    evaluation = {"description": "demo accuracy", "tasks": ["a", "b"],
                  "rows": [{"name": "experts", "scores": [0.9, 0.8], "mean": 0.85},
                           {"name": "merged, step 2", "scores": [0.7, 0.6], "mean": 0.65}]}
    record_evaluation(out / "step-2", evaluation)
    card = ModelCard.load(out / "step-2" / "README.md")
    assert [(r.dataset_name, r.metric_value) for r in card.data.eval_results] == [("a", 0.7), ("b", 0.6)]
    assert "| merged, step 2 | 70.00 | 60.00 | 65.00 |" in card.text
    assert read_state(out / "step-2").evaluation == evaluation
    assert not list((out / "step-2").glob(".*tmp*"))  # the atomic rewrite left nothing behind
