"""Streamed Fisher merging equals the in-memory Fisher-weighted average (METHODS.md, "Fisher merging")."""

from __future__ import annotations

import json

import pytest
import torch

from hf_contmerge.calibration.data import DataSpec, load_calibration
from support.reference import fisher_per_sample, unpadded
from support.refusal import merge, refused
from support.tiny_models import classifier_stream, perturb, save, save_tokenizer, sentences, weights

FLOOR = 1e-6


def _samples(spec, base):
    data = load_calibration(DataSpec.parse(str(spec)), base, column=None, samples=6, seed=0, batch_size=4, max_length=16,
                            model_kind="text")
    return unpadded(data.batches)


def test_streamed_fisher_equals_the_fisher_weighted_average(tmp_path, cli):
    from transformers import BertForSequenceClassification

    base, items, data = classifier_stream(tmp_path)
    out = tmp_path / "out"
    code, _, err = merge(cli, base, items, out, "--data", *data, "--calib-samples", "6", "--calib-batch-size", "4",
                         "--max-length", "16", method="fisher")
    assert code == 0, err
    base_w = weights(base)
    num, den = {}, {}
    for t, (item, spec) in enumerate(zip(items, data), start=1):
        model = BertForSequenceClassification.from_pretrained(item)
        fisher = {k.removeprefix("bert."): v for k, v in fisher_per_sample(model, _samples(spec, base)).items()}
        theta = {k.removeprefix("bert."): v.double() for k, v in weights(item).items()}
        for k in base_w:
            if base_w[k].is_floating_point():
                f = fisher[k].clamp_min(FLOOR) if k in fisher else torch.full(base_w[k].shape, FLOOR, dtype=torch.float64)
                num[k] = num.get(k, 0) + f * theta[k]
                den[k] = den.get(k, 0) + f
        got = weights(out / f"step-{t}")
        for k in num:
            torch.testing.assert_close(got[k].double(), num[k] / den[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{item.name} {k}: {m}")
    step1 = weights(out / "step-1")
    item1 = {k.removeprefix("bert."): v for k, v in weights(items[0]).items()}
    assert all(float((step1[k] - item1[k]).abs().max()) <= 1e-6 * float(item1[k].abs().max()) for k in num)  # θ(1) = θ1
    state = json.loads((out / "step-2" / "contmerge_state.json").read_text())
    assert state["stream"][1]["calibration"]["data"] == str(data[1]) and state["stream"][1]["calibration"]["samples"] == 6
    assert 0.9 < state["scalars"]["fisher_covered"] <= 1.0
    assert not (out / "step-2" / "_calibration").exists()
    assert "task_heads" in {p.name for p in (out / "step-2").iterdir()}  # heads kept apart, as for every method


def test_calibration_inputs_are_refused_before_anything_is_written(tmp_path, cli):
    base, items, data = classifier_stream(tmp_path)
    out = tmp_path / "out"
    refused(merge(cli, base, items, out, method="fisher"), "needs calibration data", "--data")
    refused(merge(cli, base, items, out, "--data", data[0], method="fisher"), "exactly one --data", "1 given for 2 items")
    refused(merge(cli, base, items, out, "--data", data[0], tmp_path / "none.jsonl", method="fisher"), "none.jsonl",
            "no such file")
    refused(merge(cli, base, items, out, "--data", *data, "--data-column", "prompt", method="fisher"), "no column 'prompt'")
    refused(merge(cli, base, items, out, "--data", *data, "--calib-samples", "0", method="fisher"), "--calib-samples")
    assert not out.exists()


def test_recipe_per_item_data_and_api_datasets_equal_the_flags(tmp_path, cli):
    """``stream: [{source, data}]`` in a recipe, and a ``datasets.Dataset`` given to the API, calibrate
    as ``--data`` does: the same weights, bit for bit."""
    import yaml
    from datasets import load_dataset

    from hf_contmerge import ContinualMerger

    base, items, data = classifier_stream(tmp_path)
    flags = ["--calib-samples", "6", "--calib-batch-size", "4", "--max-length", "16"]
    assert merge(cli, base, items, tmp_path / "flags", "--data", *data, *flags, method="fisher")[0] == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(base), "method": "fisher", "out": str(tmp_path / "recipe"), "quiet": True,
                                      "stream": [{"source": str(i), "data": str(d)} for i, d in zip(items, data)]}))
    assert cli("merge", "--recipe", recipe, *flags)[0] == 0
    merger = ContinualMerger(base=base, method="fisher", out=tmp_path / "api", calib_samples=6, calib_batch_size=4, max_length=16)
    for item, spec in zip(items, data):
        merger.step(item, data=load_dataset("json", data_files=str(spec), split="train"))
    for out in ("recipe", "api"):
        for t in (1, 2):
            assert (tmp_path / out / f"step-{t}/model.safetensors").read_bytes() == \
                (tmp_path / "flags" / f"step-{t}/model.safetensors").read_bytes(), f"{out} step {t}"
    state = json.loads((tmp_path / "api/step-2/contmerge_state.json").read_text())
    assert state["stream"][1]["calibration"]["data"].startswith("<in-memory Dataset ")

    # refused: data both per item and as a list, an item with an unknown key, a data spec that is not a string
    for stream, extra, needle in (
        ([{"source": str(items[0]), "data": str(data[0])}], {"data": [str(data[0])]}, "both per stream item and as a list"),
        ([{"source": str(items[0]), "labels": "x"}], {}, "stream item 1 must be a source string or a mapping"),
        ([{"source": str(items[0]), "data": {"path": str(data[0])}}], {}, "give a data spec string"),
    ):
        recipe.write_text(yaml.safe_dump({"base": str(base), "method": "fisher", "out": str(tmp_path / "bad"), "stream": stream,
                                          **extra}))
        refused(cli("merge", "--recipe", recipe), needle)
    assert not (tmp_path / "bad").exists()
    from datasets import DatasetDict

    with pytest.raises(Exception, match="pass one split"):
        ContinualMerger(base=base, method="fisher", out=tmp_path / "bad").step(items[0], data=DatasetDict())


def test_causal_lm_and_lora_items_under_a_device_map(tmp_path, cli, lora_llama):
    """A causal LM stream with a full and a LoRA item: offloaded to CPU and disk, the same merge."""
    base, items, data = lora_llama
    plain, mapped = tmp_path / "plain", tmp_path / "mapped"
    flags = ["--data", *data, "--calib-samples", "4", "--calib-batch-size", "2", "--max-length", "12"]
    code, _, err = merge(cli, base, items, plain, *flags, method="fisher")
    assert code == 0, err
    code, _, err = merge(cli, base, items, mapped, *flags, "--device-map", "auto", "--max-memory", "cpu=40KB",
                         "--offload-folder", tmp_path / "offload", method="fisher")
    assert code == 0, err
    a, b = weights(plain / "step-2"), weights(mapped / "step-2")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    refused(merge(cli, base, items, tmp_path / "o3", *flags, "--max-memory", "cpu=1GB", method="fisher"), "--device-map only")
    refused(merge(cli, base, items, tmp_path / "o3", *flags, "--device-map", "gpu", method="fisher"), "--device-map 'gpu'")


@pytest.fixture
def lora_llama(tmp_path):
    from peft import LoraConfig

    from support.tiny_models import llama, save_lora

    torch.manual_seed(0)
    model = llama()
    base = save_tokenizer(save(model, tmp_path / "base"), kind="llama")
    full = save(perturb(llama(), seed=3), tmp_path / "full")
    full.joinpath("config.json").write_text((base / "config.json").read_text())
    torch.manual_seed(0)
    adapter = save_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 7, tmp_path / "lora", 0.1)
    data = []
    for i in range(2):
        path = tmp_path / f"d{i}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(6, seed=40 + i)))
        data.append(path)
    return base, [full, adapter], data
