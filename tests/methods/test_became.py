"""BECAME equals an in-memory reference of METHODS.md's formulas; λ* minimises its surrogate; resume is bit-identical."""

from __future__ import annotations

import hashlib
import json

import torch

from hf_contmerge.calibration.data import DataSpec, load_calibration
from support.reference import fisher_batch
from support.refusal import merge
from support.tiny_models import carried, classifier_stream, weights

FLAGS = ["--calib-samples", "6", "--calib-batch-size", "3", "--max-length", "16"]


def _stream(tmp_path):
    return classifier_stream(tmp_path, labels=(2, 3, 2), scale=0.05)


def _task_model(item, backbone: dict[str, torch.Tensor]):
    """Item ``item``'s classifier (its own head) over the backbone ``backbone`` (output names)."""
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(item)
    state = model.state_dict()
    for k, v in backbone.items():
        if "bert." + k in state and state["bert." + k].is_floating_point():
            state["bert." + k] = v.to(torch.float32)
    model.load_state_dict(state)
    return model


def _reference(base, items, data, gamma=1.0):
    batches = [load_calibration(DataSpec.parse(str(d)), base, column=None, samples=6, seed=0, batch_size=3, max_length=16,
                                model_kind="text").batches for d in data]
    keys = [k for k, v in weights(base).items() if v.is_floating_point()]
    strip = lambda d: {k.removeprefix("bert."): v.double() for k, v in d.items()}  # noqa: E731
    theta = {k: strip(weights(items[0]))[k] for k in keys}
    fbar = {k: v for k, v in strip(fisher_batch(_task_model(items[0], theta), batches[0])).items() if k in keys}
    steps, lambdas, sums = [dict(theta)], [1.0], [None]
    for t in range(1, len(items)):
        fnew = strip(fisher_batch(_task_model(items[t], {}), batches[t]))
        new = strip(weights(items[t]))
        delta = {k: new[k] - theta[k] for k in keys}
        num = sum(float((fnew[k] * delta[k] ** 2).sum()) for k in keys if k in fnew)
        den = num + sum(float((fbar.get(k, 0) * delta[k] ** 2).sum()) for k in keys)
        lam = num / den
        theta = {k: theta[k] + lam * delta[k] for k in keys}
        f_merged = strip(fisher_batch(_task_model(items[t], theta), batches[t]))
        fbar = {k: f_merged.get(k, 0) + gamma * fbar.get(k, 0) for k in keys}
        steps.append(dict(theta))
        lambdas.append(lam)
        sums.append((num, den))
    return steps, lambdas, sums


def test_became_equals_the_reference_and_lambda_minimises_the_surrogate(tmp_path, cli):
    base, items, data = _stream(tmp_path)
    out = tmp_path / "out"
    code, _, err = merge(cli, base, items, out, "--data", *data, *FLAGS, method="became")
    assert code == 0, err
    steps, lambdas, sums = _reference(base, items, data)
    for t, ref in enumerate(steps, start=1):
        got = weights(out / f"step-{t}")
        for k, v in ref.items():
            torch.testing.assert_close(got[k].double(), v, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {t} {k}: {m}")
        state = json.loads((out / f"step-{t}" / "contmerge_state.json").read_text())
        assert abs(state["scalars"]["lambda"] - lambdas[t - 1]) <= 1e-4 * abs(lambdas[t - 1])
        if t > 1:  # λ* minimises (1 − λ)²·δᵀFnewδ + λ²·δᵀF̄δ: a line search finds the same λ
            num, den = sums[t - 1]
            a, b = num, den - num
            grid = torch.linspace(0, 1, 100001, dtype=torch.float64)
            best = float(grid[torch.argmin((1 - grid) ** 2 * a + grid**2 * b)])
            assert abs(best - state["scalars"]["lambda"]) <= 2e-5
            assert 0.0 < state["scalars"]["lambda"] < 1.0
    from safetensors.torch import load_file

    fbar = load_file(out / "step-3" / "contmerge_state" / "fisher_bar.safetensors")  # the carried accumulated Fisher
    assert fbar.keys() == carried(out / "step-3", "merged").keys()
    assert all(bool((v >= 0).all()) for v in fbar.values()) and any(float(v.max()) > 0 for v in fbar.values())
    assert not (out / "step-3" / "_calibration").exists()


def _hashes(out):
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0].startswith("step-")}


def test_resume_is_bit_identical(tmp_path, cli):
    base, items, data = _stream(tmp_path)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert merge(cli, base, items, whole, "--data", *data, *FLAGS, method="became")[0] == 0
    assert merge(cli, base, items[:2], parts, "--data", *data[:2], *FLAGS, method="became")[0] == 0
    assert merge(cli, base, items, parts, "--data", *data, *FLAGS, "--resume", method="became")[0] == 0
    assert _hashes(whole) == _hashes(parts)


def test_a_device_map_with_disk_offload_gives_the_same_merge(tmp_path, cli):
    """The items and the merged models (their task heads included) run offloaded to CPU and disk:
    the same statistics, so the same merged weights and λ*, as the unmapped run."""
    base, items, data = _stream(tmp_path)
    plain, mapped = tmp_path / "plain", tmp_path / "mapped"
    assert merge(cli, base, items, plain, "--data", *data, *FLAGS, method="became")[0] == 0
    code, _, err = merge(cli, base, items, mapped, "--data", *data, *FLAGS, "--device-map", "auto", "--max-memory", "cpu=40KB",
                         "--offload-folder", tmp_path / "offload", method="became")
    assert code == 0, err
    for t in (1, 2, 3):
        a, b = weights(plain / f"step-{t}"), weights(mapped / f"step-{t}")
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
        la = json.loads((plain / f"step-{t}" / "contmerge_state.json").read_text())["scalars"]["lambda"]
        lb = json.loads((mapped / f"step-{t}" / "contmerge_state.json").read_text())["scalars"]["lambda"]
        assert abs(la - lb) <= 1e-5 * abs(la)
