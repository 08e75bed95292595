"""OPCM streamed over files equals a literal, full-SVD, float64 in-memory reference; and its invariants."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig

from hf_contmerge.sources.naming import linear_weight_file_keys
from support.reference import opcm_reference
from support.tiny_models import weights


def _run(cli, base, items, out, **params):
    sets = [a for k, v in params.items() for a in ("--set", f"{k}={v}")]
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "opcm", *sets, "--out", out, "--quiet",
                       "--chunk-mb", "0.002")
    assert code == 0, err


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "vit"])
@pytest.mark.parametrize("zero_diagonal", [True, False])
def test_opcm_streamed_equals_reference(tmp_path, streams, cli, family, zero_diagonal):
    base, items = streams(family, n=4)
    out = tmp_path / "out"
    _run(cli, base, items, out, alpha=0.5, zero_diagonal=zero_diagonal)
    linear = linear_weight_file_keys(AutoConfig.from_pretrained(base))
    assert linear, "the family must have linear weights"
    b = weights(base)
    expected, norms = opcm_reference(b, [weights(i) for i in items], linear, 0.5, zero_diagonal)
    for t, ref in enumerate(expected, start=1):
        got = weights(out / f"step-{t}")
        for k, v in ref.items():
            torch.testing.assert_close(got[k].double(), v, atol=1e-5, rtol=1e-4, msg=lambda m: f"step {t} {k}: {m}")
        # invariant: ‖θ(t) − θ0‖ equals the mean task-vector norm so far (t ≥ 2)
        if t > 1:
            dist = math.sqrt(sum(float((got[k].double() - b[k].double()).pow(2).sum()) for k in ref))
            assert dist == pytest.approx(sum(norms[:t]) / t, rel=1e-5)
    state = json.loads((out / "step-4" / "contmerge_state.json").read_text())
    assert sorted(state["scalars"]["projected"]) == sorted(k for k in linear if k in b)
    assert state["stream"][0]["method"] == {"lambda": 1.0, "projected": 0, "diagonal_kept": 0,
                                           "diagonal_kept_share": 0.0, "diagonal_null": 0}
    assert all(s["method"]["lambda"] > 1.0 for s in state["stream"][1:])  # grows ~√t for near-orthogonal τ
    assert "lambda=" in (out / "step-4" / "README.md").read_text()


@pytest.mark.parametrize("kernel", ["svd", "gram"])
def test_each_dense_kernel_equals_reference(tmp_path, streams, cli, kernel):
    """Forcing either dense kernel on every linear weight (square ones included) gives the literal result."""
    base, items = streams("llama", n=3)
    out = tmp_path / "out"
    _run(cli, base, items, out, kernel=kernel)
    linear = linear_weight_file_keys(AutoConfig.from_pretrained(base))
    expected, _ = opcm_reference(weights(base), [weights(i) for i in items], linear)
    for k, v in expected[-1].items():
        torch.testing.assert_close(weights(out / "step-3")[k].double(), v, atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    state = json.loads((out / "step-3" / "contmerge_state.json").read_text())
    assert state["params"]["kernel"] == kernel


def test_step_one_is_the_first_fine_tune(tmp_path, streams, cli):
    base, items = streams("llama", n=4)
    _run(cli, base, items[:1], tmp_path / "out")
    for k, v in weights(items[0]).items():
        assert torch.equal(weights(tmp_path / "out/step-1")[k], v), k


def test_alpha_one_without_diagonal_is_rescaled_task_arithmetic(tmp_path, streams, cli):
    """alpha ≥ 1 protects nothing: unscaled = λ(t−1)·τ̄ + τt, then the global rescale."""
    base, items = streams("llama", n=4)
    out = tmp_path / "out"
    _run(cli, base, items, out, alpha=1.0, zero_diagonal=False)
    expected, _ = opcm_reference(weights(base), [weights(i) for i in items], linear=set(), alpha=1.0, zero_diagonal=False)
    for k, v in expected[-1].items():
        torch.testing.assert_close(weights(out / "step-4")[k].double(), v, atol=1e-5, rtol=1e-4)


def test_opcm_resume_is_bit_identical(tmp_path, streams, cli):
    base, items = streams("gpt2", n=4)
    _run(cli, base, items, tmp_path / "a")
    _run(cli, base, items[:2], tmp_path / "b")
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "opcm", "--out", tmp_path / "b",
                       "--quiet", "--chunk-mb", "0.002", "--resume")
    assert code == 0, err
    for name in ("model.safetensors", "contmerge_state.json", "contmerge_state/merged.safetensors"):
        assert (tmp_path / "a/step-4" / name).read_bytes() == (tmp_path / "b/step-4" / name).read_bytes()


def test_invalid_alpha(tmp_path, streams, cli):
    base, items = streams("llama", n=4)
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "opcm", "--set", "alpha=-0.1",
                       "--out", tmp_path / "o")
    assert code == 2 and "alpha" in err
