"""The engine's global pass (what OPCM's λ needs), exercised with a toy two-pass method.

``unit_tv``: θ(t) = θ0 + τ̄/‖τ̄‖ with τ̄ = Σ τi and ‖·‖ over all merged tensors together: the norm
is only known after every tensor was seen, so the step needs a first pass and a second one.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_contmerge.methods.base import Method, TensorOutput
from hf_contmerge.methods.registry import REGISTRY
from support.tiny_models import weights


class UnitTaskVector(Method):
    name = "unit_tv"
    summary = "test-only: θ0 + (Σ τi)/‖Σ τi‖"
    reference = "test"
    slots = ("tau_sum",)
    two_pass = True

    def merge(self, ctx, x):
        tau = x.item - x.base
        new = tau if x.prev is None else x.prev["tau_sum"] + tau
        return TensorOutput({"tau_sum": new}, {"sq": float(new.double().pow(2).sum())})

    def end_pass(self, ctx, stats):
        return {**ctx.scalars, "norm": math.sqrt(stats.sums["sq"]), "passes": ctx.scalars.get("passes", 0) + 1}

    def finish(self, ctx, base, slots):
        return slots  # carried unscaled; the scale applies when publishing

    def weight(self, ctx, base, slots):
        return base + slots["tau_sum"] / ctx.scalars["norm"]


@pytest.fixture
def unit_tv(monkeypatch):
    norms = {}

    class Recording(UnitTaskVector):
        def finish(self, ctx, base, slots):
            norms[ctx.step] = ctx.scalars["norm"]
            return slots

    monkeypatch.setitem(REGISTRY, "unit_tv", Recording)
    return norms


def test_two_pass_global_scale(tmp_path, streams, cli, unit_tv):
    base, items = streams("llama", n=3)
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "unit_tv", "--out", out, "--quiet",
                       "--chunk-mb", "0.002")
    assert code == 0, err
    b = {k: v.double() for k, v in weights(base).items()}
    fts = [{k: v.double() for k, v in weights(i).items()} for i in items]
    for t in (1, 2, 3):
        tau = {k: sum(f[k] - b[k] for f in fts[:t]) for k in b}
        norm = math.sqrt(sum(float(v.pow(2).sum()) for v in tau.values()))
        got = weights(out / f"step-{t}")
        for k in b:
            torch.testing.assert_close(got[k].double(), b[k] + tau[k] / norm, atol=1e-6, rtol=1e-5)
        state = json.loads((out / f"step-{t}" / "contmerge_state.json").read_text())
        assert state["scalars"]["passes"] == t and state["scalars"]["norm"] == pytest.approx(norm, rel=1e-6)
        assert not (out / f"step-{t}" / "_pass1").exists()  # the scratch area is gone
