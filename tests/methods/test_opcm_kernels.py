"""Tests of the OPCM linear-algebra kernels against independent references.

References used: the literal full-matrix definition (the module's own spec function, and a
float64 re-implementation here that takes an explicit basis), exact rational arithmetic for the
rank cut-off, dense float64 SVDs for the factored path.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch import Tensor

from hf_contmerge.methods.lowrank import add_factored, factored_norm_sq, recompress, thin_svd_from_factors
from hf_contmerge.methods.opcm_kernels import (
    gram_preferred,
    opcm_project,
    opcm_project_gram,
    opcm_project_literal,
    opcm_project_lowrank,
    project_with_svd,
    rank_cutoff,
    thin_svd,
)

ALPHAS = [0.0, 0.3, 0.5, 0.99, 1.0, 1.5]
FULL_SHAPES = [(1, 7), (7, 1), (12, 9), (9, 12), (10, 10)]
# (m, n, rank) with rank < min(m, n); rank 0 is the zero matrix.
DEFICIENT_SHAPES = [(12, 9, 4), (9, 12, 3), (10, 10, 5), (12, 9, 0), (7, 1, 0)]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
    ),
]
REL_TOL = 5e-5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def _low_rank(m: int, n: int, rank: int, seed: int) -> Tensor:
    return _randn(m, rank, seed=seed) @ _randn(rank, n, seed=seed + 1)


def _assert_rel_close(actual: Tensor, expected: Tensor, scale: Tensor | float) -> None:
    """``||actual - expected||_F <= REL_TOL * scale`` (scale: the size of the inputs)."""
    err = float(torch.linalg.matrix_norm(actual.double().cpu() - expected.double().cpu()))
    assert err <= REL_TOL * float(scale), f"error {err:.3e} vs scale {float(scale):.3e}"


def _literal_with_basis(
    u: Tensor, vh: Tensor, tau_t: Tensor, r: int, zero_diagonal: bool
) -> Tensor:
    """The literal definition in float64 with full orthonormal bases U (m x m), Vh (n x n)."""
    u, vh, tau_t = u.double(), vh.double(), tau_t.double()
    p = u.mT @ tau_t @ vh.mT
    p[:r, :r] = 0
    if zero_diagonal:
        p.diagonal().zero_()
    return u @ p @ vh


def _complete_basis(q: Tensor, seed: int) -> Tensor:
    """A square orthogonal matrix whose first columns are exactly the orthonormal columns ``q``."""
    m, k = q.shape
    if k == m:
        return q
    fill = torch.linalg.qr(torch.cat([q, _randn(m, m - k, seed=seed).to(q.dtype)], dim=1))[0]
    return torch.cat([q, fill[:, k:]], dim=1)


def _restricted_dense(
    tau_bar: Tensor, tau_t: Tensor, rank: int, alpha: float, zero_diagonal: bool
) -> Tensor:
    """Dense float64 OPCM with the diagonal removal restricted to the first ``rank`` directions."""
    u, s, vh = torch.linalg.svd(tau_bar.double(), full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    r = rank_cutoff(s, alpha)
    t = tau_t.double()
    out = t - u[:, :r] @ (u[:, :r].mT @ t @ vh[:r].mT) @ vh[:r]
    if zero_diagonal:
        for i in range(r, rank):
            out = out - (u[:, i] @ t @ vh[i]) * torch.outer(u[:, i], vh[i])
    return out


# --- rank_cutoff ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "alpha", "expected"),
    [
        ([4, 3, 2, 1], 0.3, 0),  # ratios 0.4 0.7 0.9 1.0
        ([4, 3, 2, 1], 0.4, 1),  # strict ">": 0.4 does not exceed 0.4
        ([4, 3, 2, 1], 0.5, 1),
        ([4, 3, 2, 1], 0.9, 3),
        ([4, 3, 2, 1], 0.95, 3),
        ([4, 3, 2, 1], 1.0, 0),
        ([4, 3, 2, 1], 1.5, 0),
        ([4, 3, 2, 1], 0.0, 0),
        ([4, 3, 2, 1], -0.5, 0),
        ([1, 1, 1, 1], 0.5, 2),
        ([1, 0, 0], 0.5, 0),
        ([5], 0.99, 0),
        ([0, 0, 0], 0.5, 0),
        ([], 0.5, 0),
    ],
)
def test_rank_cutoff_hand_made(values: list[float], alpha: float, expected: int) -> None:
    assert rank_cutoff(torch.tensor(values, dtype=torch.float32), alpha) == expected


def test_rank_cutoff_matches_exact_arithmetic() -> None:
    g = _gen(3)
    for trial in range(30):
        s = torch.rand(int(torch.randint(1, 60, (1,), generator=g)), generator=g)
        s = s.sort(descending=True).values
        alpha = float(torch.rand(1, generator=g))
        exact = [Fraction(float(v)) for v in s]
        total = sum(exact)
        running, expected = Fraction(0), 0
        for i, v in enumerate(exact):
            running += v
            if running / total > Fraction(alpha):
                expected = i
                break
        assert rank_cutoff(s, alpha) == expected, trial


def test_rank_cutoff_alpha_one_is_robust_to_rounding() -> None:
    # Many float32 values whose float32 sum and running sum round differently.
    s = torch.rand(4099, generator=_gen(5)).sort(descending=True).values * 1e3 + 1e-3
    assert rank_cutoff(s, 1.0) == 0
    assert rank_cutoff(s, 0.999999) > 0


def test_rank_cutoff_rejects_nan_and_matrices() -> None:
    with pytest.raises(ValueError):
        rank_cutoff(torch.ones(3), float("nan"))
    with pytest.raises(ValueError):
        rank_cutoff(torch.ones(2, 2), 0.5)


# --- dense projection ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 9), (9, 12), (1, 7), (7, 1)])
def test_thin_svd(shape: tuple[int, int]) -> None:
    x = _randn(*shape, seed=sum(shape))
    u, s, vh = thin_svd(x)
    k = min(shape)
    assert u.shape == (shape[0], k) and s.shape == (k,) and vh.shape == (k, shape[1])
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    _assert_rel_close(u.double() @ torch.diag(s.double()) @ vh.double(), x, x.norm())
    torch.testing.assert_close(s.double(), torch.linalg.svdvals(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u.mT @ u, torch.eye(k), rtol=0, atol=1e-5)
    torch.testing.assert_close(vh @ vh.mT, torch.eye(k), rtol=0, atol=1e-5)


def test_literal_matches_float64_reimplementation() -> None:
    tau_bar, tau_t = _randn(12, 9, seed=10), _randn(12, 9, seed=11)
    u, s, vh = torch.linalg.svd(tau_bar, full_matrices=True)
    for alpha in ALPHAS:
        for zero_diagonal in (False, True):
            expected = _literal_with_basis(u, vh, tau_t, rank_cutoff(s, alpha), zero_diagonal)
            got = opcm_project_literal(tau_bar, tau_t, alpha, zero_diagonal)
            _assert_rel_close(got, expected, tau_t.norm())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_diagonal", [False, True])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("shape", FULL_SHAPES)
def test_fast_equals_literal_full_rank(
    shape: tuple[int, int], alpha: float, zero_diagonal: bool, device: str
) -> None:
    m, n = shape
    tau_bar = _randn(m, n, seed=m * 100 + n).float().to(device)
    tau_t = _randn(m, n, seed=m * 100 + n + 1).float().to(device)
    fast = opcm_project(tau_bar, tau_t, alpha, zero_diagonal)
    assert fast.dtype == torch.float32 and fast.device == tau_bar.device
    literal = opcm_project_literal(tau_bar, tau_t, alpha, zero_diagonal)
    _assert_rel_close(fast, literal, tau_t.norm())


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("shape", DEFICIENT_SHAPES)
def test_fast_equals_literal_rank_deficient_without_diagonal(
    shape: tuple[int, int, int], alpha: float
) -> None:
    m, n, rank = shape
    tau_bar = _low_rank(m, n, rank, seed=7).float()
    tau_t = _randn(m, n, seed=9).float()
    fast = opcm_project(tau_bar, tau_t, alpha, zero_diagonal=False)
    literal = opcm_project_literal(tau_bar, tau_t, alpha, zero_diagonal=False)
    _assert_rel_close(fast, literal, tau_t.norm())


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("shape", DEFICIENT_SHAPES)
def test_fast_equals_literal_rank_deficient_with_diagonal_same_basis(
    shape: tuple[int, int, int], alpha: float
) -> None:
    """With zero_diagonal the literal result depends on the null-space basis: compare with the
    literal definition evaluated on the thin SVD's own basis, completed to a full one."""
    m, n, rank = shape
    tau_bar = _low_rank(m, n, rank, seed=17).float()
    tau_t = _randn(m, n, seed=19).float()
    u, s, vh = thin_svd(tau_bar)  # the basis opcm_project uses
    u_full = _complete_basis(u.double(), seed=21)
    vh_full = _complete_basis(vh.double().mT, seed=23).mT
    expected = _literal_with_basis(u_full, vh_full, tau_t, rank_cutoff(s, alpha), True)
    fast = opcm_project(tau_bar, tau_t, alpha, zero_diagonal=True)
    _assert_rel_close(fast, expected, tau_t.norm())


@pytest.mark.parametrize("shape", DEFICIENT_SHAPES[:3])
def test_rank_deficient_diagonal_difference_lives_in_null_space(
    shape: tuple[int, int, int],
) -> None:
    """Whatever null-space basis each SVD picks, fast and literal agree on the range of tau_bar."""
    m, n, rank = shape
    tau_bar = _low_rank(m, n, rank, seed=27).float()
    tau_t = _randn(m, n, seed=29).float()
    diff = opcm_project(tau_bar, tau_t, 0.5, True) - opcm_project_literal(tau_bar, tau_t, 0.5, True)
    u, _, vh = torch.linalg.svd(tau_bar.double(), full_matrices=False)
    scale = REL_TOL * float(tau_t.norm())
    assert float((u[:, :rank].mT @ diff.double()).norm()) <= scale
    assert float((diff.double() @ vh[:rank].mT).norm()) <= scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_are_computed_in_float32(dtype: torch.dtype) -> None:
    tau_bar = _randn(12, 9, seed=31).to(dtype)
    tau_t = _randn(12, 9, seed=32).to(dtype)
    for zero_diagonal in (False, True):
        got = opcm_project(tau_bar, tau_t, 0.5, zero_diagonal)
        assert got.dtype == torch.float32
        expected = opcm_project_literal(tau_bar.float(), tau_t.float(), 0.5, zero_diagonal)
        _assert_rel_close(got, expected, tau_t.float().norm())


@pytest.mark.parametrize("alpha", [1.0, 1.5, 0.0, -0.3])
def test_no_cutoff_and_no_diagonal_returns_tau_t(alpha: float) -> None:
    tau_bar, tau_t = _randn(12, 9, seed=41).float(), _randn(12, 9, seed=42).float()
    got = opcm_project(tau_bar, tau_t, alpha, zero_diagonal=False)
    assert torch.equal(got, tau_t)
    assert got.data_ptr() != tau_t.data_ptr()  # a copy the caller may modify
    _assert_rel_close(opcm_project_literal(tau_bar, tau_t, alpha, False), tau_t, tau_t.norm())


def test_top_block_is_removed_and_nothing_else() -> None:
    tau_bar, tau_t = _randn(12, 9, seed=51), _randn(12, 9, seed=52)
    u, s, vh = torch.linalg.svd(tau_bar, full_matrices=False)
    r = rank_cutoff(s, 0.5)
    assert r >= 2  # the check below is not vacuous
    got = opcm_project(tau_bar, tau_t, 0.5, zero_diagonal=False).double()
    scale = REL_TOL * float(tau_t.norm())
    assert float((u[:, :r].mT @ got @ vh[:r].mT).norm()) <= scale
    # Outside the r x r block every coefficient of tau_t in the singular basis is untouched.
    u_full = _complete_basis(u, seed=53)
    p_in, p_out = u_full.mT @ tau_t @ vh.mT, u_full.mT @ got @ vh.mT
    p_in[:r, :r] = 0
    assert float((p_in - p_out).norm()) <= scale


def test_zero_diagonal_clears_every_diagonal_coefficient() -> None:
    tau_bar, tau_t = _randn(9, 12, seed=61), _randn(9, 12, seed=62)
    u, _, vh = torch.linalg.svd(tau_bar, full_matrices=False)
    got = opcm_project(tau_bar, tau_t, 0.3, zero_diagonal=True).double()
    diag = torch.diagonal(u.mT @ got @ vh.mT)
    assert float(diag.abs().max()) <= REL_TOL * float(tau_t.norm())
    assert float(torch.diagonal(u.mT @ tau_t @ vh.mT).abs().min()) > 1e-3  # was not zero


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.99])
@pytest.mark.parametrize("shape", DEFICIENT_SHAPES)
def test_dense_diagonal_restricted_to_range(shape: tuple[int, int, int], alpha: float) -> None:
    m, n, rank = shape
    tau_bar = _low_rank(m, n, rank, seed=57)
    tau_t = _randn(m, n, seed=58)
    got = opcm_project(tau_bar, tau_t, alpha, True, diagonal="resolved")
    expected = _restricted_dense(tau_bar, tau_t, rank, alpha, True)
    _assert_rel_close(got, expected, tau_t.norm())


def test_zero_tau_bar_literal_artefact_and_its_fix() -> None:
    """For tau_bar = 0 the literal definition zeroes tau_t[i, i] (identity bases from LAPACK);
    restricting the diagonal to the range of tau_bar leaves tau_t untouched."""
    tau_t = torch.arange(12.0).reshape(4, 3) + 1
    literal = opcm_project(torch.zeros(4, 3), tau_t, 0.5, True)
    assert float(literal.diagonal().abs().max()) == 0.0
    restricted = opcm_project(torch.zeros(4, 3), tau_t, 0.5, True, diagonal="resolved")
    assert torch.equal(restricted, tau_t)


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError):
        opcm_project(torch.zeros(3, 4), torch.zeros(4, 3), 0.5, True)
    with pytest.raises(ValueError):
        opcm_project(torch.zeros(3), torch.zeros(3), 0.5, True)


# --- Gram kernel (dense, U never formed) ----------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_diagonal", [False, True])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("shape", FULL_SHAPES)
def test_gram_equals_literal_full_rank(shape: tuple[int, int], alpha: float, zero_diagonal: bool, device: str) -> None:
    m, n = shape
    tau_bar = _randn(m, n, seed=m * 100 + n).float().to(device)
    tau_t = _randn(m, n, seed=m * 100 + n + 1).float().to(device)
    got = opcm_project_gram(tau_bar, tau_t, alpha, zero_diagonal)
    assert got.dtype == torch.float32 and got.device == tau_bar.device and got.data_ptr() != tau_t.data_ptr()
    _assert_rel_close(got, opcm_project_literal(tau_bar, tau_t, alpha, zero_diagonal), tau_t.norm())


@pytest.mark.parametrize("zero_diagonal", [False, True])
@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.99])
@pytest.mark.parametrize("shape", DEFICIENT_SHAPES)
def test_gram_rank_deficient_restricts_diagonal_to_range(shape: tuple[int, int, int], alpha: float, zero_diagonal: bool) -> None:
    m, n, rank = shape
    tau_bar, tau_t = _low_rank(m, n, rank, seed=67), _randn(m, n, seed=68)
    got = opcm_project_gram(tau_bar.float(), tau_t.float(), alpha, zero_diagonal)
    _assert_rel_close(got, _restricted_dense(tau_bar, tau_t, rank, alpha, zero_diagonal), tau_t.norm())
    same = opcm_project(tau_bar.float(), tau_t.float(), alpha, zero_diagonal, diagonal="resolved")
    _assert_rel_close(got, same, tau_t.norm())


@pytest.mark.parametrize("shape", [(300, 100), (100, 300)])
def test_gram_at_least_as_accurate_as_svd_on_decaying_spectrum(shape: tuple[int, int]) -> None:
    """A long matrix whose spectrum spans five decades: the Gram kernel resolves every direction
    (float64 eigenvectors, float64 rows below the float32 tolerance) and equals the float64 literal
    definition; the float32 SVD route equals it outside the directions it does not resolve (gap to
    zero or to a neighbour below max(m, n)·eps32·s0), which it reports."""
    m, n = shape
    k = min(m, n)
    qa, _ = torch.linalg.qr(_randn(m, k, seed=71))
    qb, _ = torch.linalg.qr(_randn(n, k, seed=72))
    tau_bar = ((qa * torch.logspace(0, -5, k, dtype=torch.float64)) @ qb.mT).float()
    tau_t = (_randn(m, n, seed=73) * 0.1 + 0.5 * tau_bar.double()).float()  # correlated: large removed parts
    u, s, vh = torch.linalg.svd(tau_bar.double(), full_matrices=True)
    expected = _literal_with_basis(u, vh, tau_t, rank_cutoff(s, 0.5), True)
    gram = opcm_project_gram(tau_bar, tau_t, 0.5, True)
    _assert_rel_close(gram, expected, tau_t.norm())
    stats: dict[str, float] = {}
    svd = opcm_project(tau_bar, tau_t, 0.5, True, diagonal="resolved", stats=stats)
    eps = torch.finfo(torch.float32).eps * float(s[0])
    tol = max(m, n) * eps  # gaps (to 0 as well: m != n) above max(m, n)·eps32·s0; values above sqrt(k)·eps32·s0
    resolved = (s > max(tol, k**0.5 * eps)) & (torch.cat([s[:-1] - s[1:], s.new_tensor([float("inf")])]) > tol)
    resolved &= torch.cat([s.new_tensor([float("inf")]), s[:-1] - s[1:]]) > tol
    assert 0 < int(resolved.sum()) < k and stats["diagonal_kept"] + stats["diagonal_null"] == k - int(resolved.sum())
    diff = u.mT @ (svd.double() - expected) @ vh.mT
    unresolved = torch.ones(max(m, n), dtype=torch.bool)
    unresolved[:k] = ~resolved
    diff[unresolved[:m, None] & unresolved[None, :n]] = 0
    assert float(diff.norm()) <= REL_TOL * float(tau_t.norm())


@pytest.mark.parametrize("shape", [(23, 10), (10, 23), (17, 17)])
def test_gram_blocked_accumulation(monkeypatch, shape: tuple[int, int]) -> None:
    """Row blocks of 2 rows and column blocks of 3 (a lower triangle of 4 x 4 blocks) give the
    same projection as one block: the blocking of real 7B shapes, on a small matrix."""
    import hf_contmerge.methods.opcm_kernels as linalg

    tau_bar, tau_t = _randn(*shape, seed=85).float(), _randn(*shape, seed=86).float()
    whole = opcm_project_gram(tau_bar, tau_t, 0.5, True)
    monkeypatch.setattr(linalg, "_GRAM_COLS", 3)
    monkeypatch.setattr(linalg, "_GRAM_BLOCK_BYTES", 2 * 8 * min(shape))
    blocked = opcm_project_gram(tau_bar, tau_t, 0.5, True)
    _assert_rel_close(blocked, whole, tau_t.norm())
    _assert_rel_close(blocked, opcm_project_literal(tau_bar, tau_t, 0.5, True), tau_t.norm())


def test_gram_inplace_and_trivial_cases() -> None:
    tau_bar, tau_t = _randn(12, 5, seed=81).float(), _randn(12, 5, seed=82).float()
    expected = opcm_project_gram(tau_bar, tau_t, 0.5, True)
    buf = tau_t.clone()
    got = opcm_project_gram(tau_bar, buf, 0.5, True, inplace=True)
    assert got.data_ptr() == buf.data_ptr() and torch.equal(got, expected)
    with pytest.raises(ValueError, match="inplace"):
        opcm_project_gram(tau_bar, tau_t.double(), 0.5, True, inplace=True)
    for alpha in (1.0, 1.5, 0.0, -0.3):  # no cut-off, no diagonal: tau_t, bit for bit
        assert torch.equal(opcm_project_gram(tau_bar, tau_t, alpha, False), tau_t)
    assert torch.equal(opcm_project_gram(torch.zeros(12, 5), tau_t, 0.5, True), tau_t)  # tau_bar = 0: nothing removed
    with pytest.raises(ValueError):
        opcm_project_gram(torch.zeros(3, 4), torch.zeros(4, 3), 0.5, True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_gram_other_dtypes_in_float32(dtype: torch.dtype) -> None:
    tau_bar, tau_t = _randn(12, 5, seed=91).to(dtype), _randn(12, 5, seed=92).to(dtype)
    got = opcm_project_gram(tau_bar, tau_t, 0.5, True)
    assert got.dtype == torch.float32
    _assert_rel_close(got, opcm_project_literal(tau_bar.float(), tau_t.float(), 0.5, True), tau_t.float().norm())


def test_gram_preferred_for_long_matrices_only() -> None:
    assert gram_preferred((11008, 4096)) and gram_preferred((4096, 11008)) and gram_preferred((32000, 4096))
    assert not gram_preferred((4096, 4096)) and not gram_preferred((4096, 6000))
    assert not gram_preferred((4096,)) and not gram_preferred((0, 5))


# --- factored (LoRA) path ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "n", "q", "rank"),
    [(12, 9, 5, 5), (9, 12, 5, 5), (12, 9, 20, 9), (12, 9, 6, 3), (1, 7, 3, 1), (7, 1, 2, 1)],
)
def test_thin_svd_from_factors(m: int, n: int, q: int, rank: int) -> None:
    if rank < min(q, m, n):
        left = _randn(m, rank, seed=71) @ _randn(rank, q, seed=72)  # rank-deficient left factor
    else:
        left = _randn(m, q, seed=71)
    right = _randn(q, n, seed=73)
    u, s, vh = thin_svd_from_factors(left.float(), right.float())
    assert u.shape == (m, rank) and s.shape == (rank,) and vh.shape == (rank, n)
    product = left @ right
    _assert_rel_close(u.double() @ torch.diag(s.double()) @ vh.double(), product, product.norm())
    expected_s = torch.linalg.svdvals(product)
    atol = 1e-5 * float(expected_s[0])
    torch.testing.assert_close(s.double(), expected_s[:rank], rtol=1e-5, atol=atol)
    torch.testing.assert_close(u.mT @ u, torch.eye(rank), rtol=0, atol=1e-5)
    torch.testing.assert_close(vh @ vh.mT, torch.eye(rank), rtol=0, atol=1e-5)


def test_thin_svd_from_factors_zero_and_cancelling() -> None:
    b, a = _randn(12, 3, seed=81).float(), _randn(3, 9, seed=82).float()
    for left, right in [
        (torch.zeros(12, 4), torch.zeros(4, 9)),
        (torch.zeros(12, 0), torch.zeros(0, 9)),
        (torch.cat([b, -b], dim=1), torch.cat([a, a], dim=0)),  # B A - B A = 0
    ]:
        u, s, vh = thin_svd_from_factors(left, right)
        assert u.shape == (12, 0) and s.shape == (0,) and vh.shape == (0, 9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_diagonal", [False, True])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(("m", "n", "q"), [(12, 9, 11), (9, 12, 9)])
def test_lowrank_equals_dense_at_full_rank(
    m: int, n: int, q: int, alpha: float, zero_diagonal: bool, device: str
) -> None:
    left = _randn(m, q, seed=91).float().to(device)
    right = _randn(q, n, seed=92).float().to(device)
    b = _randn(m, 3, seed=93).float().to(device)
    a = _randn(3, n, seed=94).float().to(device)
    dense = opcm_project(left @ right, b @ a, alpha, zero_diagonal)
    new_left, new_right = opcm_project_lowrank(left, right, (b, a), alpha, zero_diagonal)
    assert new_left.device == left.device and new_left.dtype == torch.float32
    assert new_left.shape[1] == new_right.shape[0] <= 3 + min(m, n)
    _assert_rel_close(new_left @ new_right, dense, (b @ a).norm())
    from_dense = opcm_project_lowrank(left, right, b @ a, alpha, zero_diagonal)
    _assert_rel_close(from_dense, dense, (b @ a).norm())


@pytest.mark.parametrize("zero_diagonal", [False, True])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(("m", "n", "rank"), [(12, 9, 4), (9, 12, 3), (10, 10, 6)])
def test_lowrank_rank_deficient_restricts_diagonal(
    m: int, n: int, rank: int, alpha: float, zero_diagonal: bool
) -> None:
    left = _randn(m, rank, seed=101).float()
    right = _randn(rank, n, seed=102).float()
    b, a = _randn(m, 2, seed=103).float(), _randn(2, n, seed=104).float()
    tau_bar, tau_t = left.double() @ right.double(), b.double() @ a.double()
    expected = _restricted_dense(tau_bar, tau_t, rank, alpha, zero_diagonal)
    new_left, new_right = opcm_project_lowrank(left, right, (b, a), alpha, zero_diagonal)
    _assert_rel_close(new_left @ new_right, expected, tau_t.norm())
    if not zero_diagonal:  # without the diagonal the dense path agrees at any rank
        dense = opcm_project(left @ right, b @ a, alpha, False)
        _assert_rel_close(new_left @ new_right, dense, tau_t.norm())


def test_lowrank_equals_dense_restricted_when_rank_deficient() -> None:
    left, right = _randn(12, 4, seed=115).float(), _randn(4, 9, seed=116).float()
    b, a = _randn(12, 2, seed=117).float(), _randn(2, 9, seed=118).float()
    for zero_diagonal in (False, True):
        new_left, new_right = opcm_project_lowrank(left, right, (b, a), 0.5, zero_diagonal)
        dense = opcm_project(
            left @ right, b @ a, 0.5, zero_diagonal, diagonal="resolved"
        )
        _assert_rel_close(new_left @ new_right, dense, (b @ a).norm())


def test_lowrank_rank_deficient_differs_from_dense_with_diagonal() -> None:
    """Documented difference: the dense path also removes null-space diagonal entries."""
    left, right = _randn(12, 4, seed=111).float(), _randn(4, 9, seed=112).float()
    b, a = _randn(12, 2, seed=113).float(), _randn(2, 9, seed=114).float()
    new_left, new_right = opcm_project_lowrank(left, right, (b, a), 0.5, True)
    dense = opcm_project(left @ right, b @ a, 0.5, True)
    assert float((new_left @ new_right - dense).norm()) > 1e-2 * float((b @ a).norm())


def test_project_with_truncated_svd_is_the_restricted_reference() -> None:
    tau_bar, tau_t = _low_rank(12, 9, 4, seed=121), _randn(12, 9, seed=122)
    u, s, vh = torch.linalg.svd(tau_bar.float(), full_matrices=False)
    got = project_with_svd(tau_t, u[:, :4], s[:4], vh[:4], 0.5, True)
    _assert_rel_close(got, _restricted_dense(tau_bar, tau_t, 4, 0.5, True), tau_t.norm())


def test_factored_norm_sq() -> None:
    for m, n, q in [(12, 9, 5), (9, 12, 20), (1, 7, 3)]:
        left, right = _randn(m, q, seed=131), _randn(q, n, seed=132)
        expected = float(torch.linalg.matrix_norm(left @ right) ** 2)
        got = factored_norm_sq(left.float(), right.float())
        assert got.ndim == 0 and got.dtype == torch.float32
        assert abs(float(got) - expected) <= 1e-5 * expected


def test_add_factored() -> None:
    l1, r1 = _randn(12, 3, seed=141).float(), _randn(3, 9, seed=142).float()
    l2, r2 = _randn(12, 2, seed=143).float(), _randn(2, 9, seed=144).float()
    left, right = add_factored(l1, r1, l2, r2, 2.0, -0.5)
    assert left.shape == (12, 5) and right.shape == (5, 9)
    expected = 2.0 * (l1 @ r1) - 0.5 * (l2 @ r2)
    _assert_rel_close(left @ right, expected, expected.norm())
    with pytest.raises(ValueError):
        add_factored(l1, r1, l2, r2[:, :8], 1.0, 1.0)


def test_recompress_preserves_product_without_truncation() -> None:
    left = _randn(12, 4, seed=151) @ _randn(4, 10, seed=152)  # 10 columns, rank 4
    right = _randn(10, 9, seed=153)
    new_left, new_right, dropped = recompress(left.float(), right.float())
    assert new_left.shape == (12, 4) and new_right.shape == (4, 9)
    product = left @ right
    _assert_rel_close(new_left @ new_right, product, product.norm())
    assert dropped <= 1e-8 * float(product.norm() ** 2)
    torch.testing.assert_close(new_right @ new_right.mT, torch.eye(4), rtol=0, atol=1e-5)


def test_recompress_truncation_is_best_low_rank_approximation() -> None:
    left, right = _randn(12, 8, seed=161), _randn(8, 9, seed=162)
    product = left @ right
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    new_left, new_right, dropped = recompress(left.float(), right.float(), max_rank=3)
    assert new_left.shape == (12, 3)
    best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    _assert_rel_close(new_left @ new_right, best, product.norm())
    assert abs(dropped - float((s[3:] ** 2).sum())) <= 1e-5 * float((s**2).sum())
    assert abs(dropped - float((product - new_left.double() @ new_right.double()).norm() ** 2)) <= (
        1e-4 * float((s**2).sum())
    )
    with pytest.raises(ValueError):
        recompress(left, right, max_rank=-1)


def test_factored_opcm_step_matches_dense_step() -> None:
    """One OPCM update kept in factors: lam * tau_bar + tau', recompressed, equals the dense one."""
    left, right = _randn(12, 10, seed=171).float(), _randn(10, 9, seed=172).float()
    b, a = _randn(12, 2, seed=173).float(), _randn(2, 9, seed=174).float()
    lam = 1.4
    proj_left, proj_right = opcm_project_lowrank(left, right, (b, a), 0.5, True)
    new_left, new_right = add_factored(left, right, proj_left, proj_right, lam, 1.0)
    new_left, new_right, dropped = recompress(new_left, new_right)
    assert new_left.shape[1] == 9  # bounded by min(m, n), not 10 + 2 + 9
    dense = lam * (left @ right) + opcm_project(left @ right, b @ a, 0.5, True)
    _assert_rel_close(new_left @ new_right, dense, dense.norm())
    assert abs(float(factored_norm_sq(new_left, new_right)) - float(dense.norm() ** 2)) <= (
        1e-5 * float(dense.norm() ** 2)
    )
