"""OPCM equals its literal definition wherever that definition is itself well defined (issue 14).

The literal definition removes τt's diagonal entry along every singular pair of τ̄. Where a pair is
determined (its singular value apart from the others) both dense kernels must remove it, however
small the singular value; where it is not (a null space, a cluster) the basis is arbitrary and the
entry stays, and the kernels report how many entries that was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from hf_contmerge.methods.lowrank import thin_svd_from_factors
from hf_contmerge.methods.opcm_kernels import (
    opcm_project,
    opcm_project_gram,
    opcm_project_lowrank,
    project_factors_with_svd,
    project_with_svd,
    resolved_directions,
)
from support.reference import opcm_reference
from support.tiny_models import weights

EPS32 = torch.finfo(torch.float32).eps
O_PROJ = "model.layers.1.self_attn.o_proj.weight"


def _orthogonal(n: int, seed: int) -> Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def _literal64(tau_bar: Tensor, tau_t: Tensor, alpha: float) -> Tensor:
    """The literal definition in float64 (full SVD, P = UᵀτtV, block and whole diagonal zeroed)."""
    u, s, vh = torch.linalg.svd(tau_bar.double(), full_matrices=True)
    ratio = torch.cumsum(s, 0) / s.sum()
    r = int(torch.nonzero(ratio > alpha)[0]) if bool((ratio > alpha).any()) else 0
    p = u.mT @ tau_t.double() @ vh.mT
    p[:r, :r] = 0
    p.diagonal().zero_()
    return u @ p @ vh


def test_resolved_directions() -> None:
    s = torch.tensor([1.0, 0.5, 0.5 - 1e-9, 0.1, 1e-6])
    assert resolved_directions(s, 1e-4, null_space=False).tolist() == [True, False, False, True, True]
    assert resolved_directions(s, 1e-4, null_space=True).tolist() == [True, False, False, True, False]
    assert not resolved_directions(torch.zeros(3), 0.0, null_space=False).any()
    assert resolved_directions(torch.tensor([2.0]), 1e-3, null_space=False).tolist() == [True]


@pytest.mark.parametrize("kernel", ["svd", "gram"])
def test_eight_decades_agree_with_the_literal_definition_where_it_is_defined(kernel: str) -> None:
    n = 256
    s = torch.logspace(0, -8, n, dtype=torch.float64)
    tau_bar = ((_orthogonal(n, 1) * s) @ _orthogonal(n, 2).mT).float()
    noise = torch.randn(n, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tau_t = (0.01 * noise + 0.5 * tau_bar.double()).float()
    stats: dict[str, float] = {}
    if kernel == "svd":
        got = opcm_project(tau_bar, tau_t, 0.5, True, diagonal="resolved", stats=stats)
    else:
        got = opcm_project_gram(tau_bar, tau_t, 0.5, True, stats=stats)
    literal = _literal64(tau_bar, tau_t, 0.5)
    u, s64, vh = torch.linalg.svd(tau_bar.double())
    # the stated tolerance: gaps above max(m, n)·eps32·s0, values above the noise floor sqrt(k)·eps32·s0
    resolved = resolved_directions(s64, n * EPS32 * float(s64[0]), null_space=False, floor=n**0.5 * EPS32 * float(s64[0]))
    assert 50 < int(resolved.sum()) < 200  # the spectrum has both kinds
    # the difference, in τ̄'s own (float64) basis, outside the block of two unresolved directions
    diff = u.mT @ (got.double() - literal) @ vh.mT
    diff[~resolved[:, None] & ~resolved[None, :]] = 0
    assert float(diff.norm()) <= 1e-4 * float(tau_t.double().norm())
    # what stayed in place is reported: the SVD route keeps the unresolved directions' entries, those at
    # the float32 noise floor (sqrt(n)·eps32·s0) as null space
    kept, null = int(stats["diagonal_kept"]), int(stats["diagonal_null"])
    at_floor = int((s64 <= n**0.5 * EPS32 * float(s64[0])).sum())
    assert at_floor > 0 and abs(null - at_floor) <= 1  # a value at the floor may fall either side in float32
    if kernel == "svd":
        assert abs(kept + null - int((~resolved).sum())) <= 1
    else:  # the float64 Gram matrix resolves more of them than a float32 SVD
        assert kept + null < int((~resolved).sum())
    assert 0.0 <= stats["diagonal_kept_sq"] <= float(tau_t.double().norm() ** 2)


def test_a_separated_tiny_singular_value_is_removed_like_the_literal_definition() -> None:
    """s_min / s0 = 1e-6 in a square matrix, 1e5 times below its neighbour: determined, so removed."""
    n = 32
    s = torch.cat([torch.linspace(1.0, 0.1, n - 1, dtype=torch.float64), torch.tensor([1e-6], dtype=torch.float64)])
    tau_bar = ((_orthogonal(n, 4) * s) @ _orthogonal(n, 5).mT).float()
    tau_t = torch.randn(n, n, generator=torch.Generator().manual_seed(6)).float()
    literal = _literal64(tau_bar, tau_t, 0.5)
    for got in (opcm_project(tau_bar, tau_t, 0.5, True, diagonal="resolved"), opcm_project_gram(tau_bar, tau_t, 0.5, True)):
        assert float((got.double() - literal).norm()) <= 1e-5 * float(tau_t.norm())
    # the rule of the earlier versions (a value below max(m, n)·eps32·s0 counts as zero) departed from it
    u, sv, vh = torch.linalg.svd(tau_bar, full_matrices=False)
    rho = int((sv > n * EPS32 * sv[0]).sum())
    assert rho == n - 1
    value_rule = project_with_svd(tau_t, u[:, :rho], sv[:rho], vh[:rho], 0.5, True)
    assert float((value_rule.double() - literal).norm()) > 1e-3 * float(tau_t.norm())


def test_exact_null_space_keeps_factored_equal_to_dense() -> None:
    g = torch.Generator().manual_seed(7)
    left, right = torch.randn(24, 3, generator=g), torch.randn(3, 24, generator=g)
    b, a = torch.randn(24, 2, generator=g), torch.randn(2, 24, generator=g)
    stats_dense: dict[str, float] = {}
    stats_factored: dict[str, float] = {}
    dense = opcm_project(left @ right, b @ a, 0.5, True, diagonal="resolved", stats=stats_dense)
    gram = opcm_project_gram(left @ right, b @ a, 0.5, True, stats={})
    u, s, vh = thin_svd_from_factors(left, right)
    new_left, new_right = project_factors_with_svd((b, a), u, s, vh, 0.5, True, stats=stats_factored)
    scale = float((b @ a).norm())
    assert float((new_left @ new_right - dense).norm()) <= 5e-5 * scale
    assert float((gram - dense).norm()) <= 5e-5 * scale
    lowrank_left, lowrank_right = opcm_project_lowrank(left, right, (b, a), 0.5, True)
    assert float((lowrank_left @ lowrank_right - dense).norm()) <= 5e-5 * scale
    assert (stats_dense["diagonal_kept"], stats_dense["diagonal_null"]) == (0, 21)  # the null space: 24 - 3 directions
    assert stats_factored.get("diagonal_kept", 0) == stats_factored.get("diagonal_null", 0) == 0  # none in its SVD


@pytest.mark.parametrize("kernel", ["svd", "gram"])
def test_tiny_llama_stream_equals_the_float64_literal_definition(tmp_path, streams, cli, kernel):
    """The issue's case: an o_proj whose τ̄ has s_min / s0 ≈ 1e-6 (far from its neighbours). Every
    tensor of every step equals the float64 literal definition; the state reports no entry kept."""
    base, items = streams("llama", n=3)
    first = Path(shutil.copytree(items[0], tmp_path / "ft1"))
    sd = load_file(first / "model.safetensors")
    b = load_file(base / "model.safetensors")[O_PROJ].double()
    n = b.shape[0]
    s = torch.cat([torch.linspace(0.2, 0.02, n - 1, dtype=torch.float64), torch.tensor([6e-7], dtype=torch.float64)])
    sd[O_PROJ] = (b + (_orthogonal(n, 8) * s) @ _orthogonal(n, 9).mT).float()
    save_file(sd, first / "model.safetensors", metadata={"format": "pt"})
    tau1 = sd[O_PROJ].double() - b
    ratio = torch.linalg.svdvals(tau1)
    assert 4 * n**0.5 * EPS32 < float(ratio[-1] / ratio[0]) < n * EPS32  # above the float32 noise, below the old rule
    stream = [first, *items[1:]]
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", base, "--stream", *stream, "--method", "opcm", "--set", f"kernel={kernel}",
                       "--out", out, "--quiet")
    assert code == 0, err
    from transformers import AutoConfig

    from hf_contmerge.sources.naming import linear_weight_file_keys

    linear = linear_weight_file_keys(AutoConfig.from_pretrained(base))
    expected, _ = opcm_reference(weights(base), [weights(i) for i in stream], linear)
    for t, ref in enumerate(expected, start=1):
        got = weights(out / f"step-{t}")
        for k, v in ref.items():
            torch.testing.assert_close(got[k].double(), v, atol=1e-6, rtol=1e-4, msg=lambda m: f"step {t} {k}: {m}")
    state = json.loads((out / "step-3" / "contmerge_state.json").read_text())
    assert state["scalars"]["diagonal_kept"] == 0
    assert [e["method"]["diagonal_kept"] for e in state["stream"]] == [0, 0, 0]
