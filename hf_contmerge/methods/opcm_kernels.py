r"""Linear-algebra kernels of OPCM (Orthogonal Projection-based Continual Merging).

Reference: A. Tang et al., "Merging Models on the Fly Without Retraining: A Sequential Approach
to Scalable Continual Model Merging", arXiv 2501.09522; official code in FusionBench
``fusion_bench/method/opcm/``. This module holds only the per-matrix maths, on plain tensors: no
model, no files. All arithmetic is float32 (inputs of other dtypes are converted; outputs are
float32) on the device of the first matrix argument (``tau_bar``, ``L`` or ``L1``; the other
arguments are moved there).

Definition (literal, as in the paper and METHODS.md)
----------------------------------------------------
For one linear weight, ``tau_bar = theta(t-1) - theta0`` (m x n) and ``tau_t = theta_t - theta0``.
Take the full SVD ``tau_bar = U diag(s) V^T`` (U: m x m, V: n x n, s descending, length
k = min(m, n)) and

* ``r`` = the first 0-based index with ``cumsum(s)[r] / sum(s) > alpha``; ``r = 0`` if there is
  none (see :func:`rank_cutoff`);
* ``P = U^T tau_t V`` (m x n); ``P[:r, :r] = 0``; if ``zero_diagonal``: ``P[i, i] = 0`` for all
  i < k (an m x n matrix has k diagonal entries);
* ``tau' = U P V^T``.

This is :func:`opcm_project_literal`: O(m n max(m, n)) time and O(m^2 + n^2) memory, kept as the
executable specification for the tests.

Thin form (what :func:`opcm_project` computes)
----------------------------------------------
Write ``tau_t = sum_{i,j} P_ij u_i v_j^T``. Zeroing the block ``P[:r, :r]`` removes
``sum_{i,j<r} P_ij u_i v_j^T = U_r (U_r^T tau_t V_r) V_r^T`` (U_r, V_r: the first r columns), only
that r x r block and not whole rows; zeroing the diagonal removes, in addition, the entries
``P_ii`` with ``r <= i < k`` (those with i < r are inside the block already). Hence, exactly,

    tau' = tau_t - U_r (U_r^T tau_t V_r) V_r^T - sum_{i=r}^{k-1} (u_i^T tau_t v_i) u_i v_i^T

with the last sum only if ``zero_diagonal``. Every vector used has index < k, so the thin SVD
(:func:`thin_svd`) suffices: O(m n k) time, O((m + n) k) extra memory. Since r <= k - 1,
``U_r`` is always a proper part of the thin basis.

When the two forms agree exactly (in exact arithmetic): singular pairs with distinct non-zero
singular values are unique up to a joint sign flip, which cancels in every term above, and the
block term only needs the span of the first r pairs. So the forms are identical whenever
``s[r-1] > s[r]`` and, if ``zero_diagonal``, all k singular values are distinct and non-zero.
When ``tau_bar`` is rank-deficient (or has repeated singular values) and ``zero_diagonal`` is set,
the *literal definition itself* depends on which basis the SVD routine returned for the null
space (the directions of singular value 0): the diagonal entries removed there lie along
arbitrary vectors; the same holds inside a cluster of equal singular values. ``opcm_project``
keeps that behaviour by default (``diagonal="literal"``); with ``diagonal="resolved"`` (what OPCM
uses) it removes a diagonal entry only along a direction the decomposition determines
(:func:`resolved_directions`: a gap to every other singular value above the kernel's precision,
a value above :func:`noise_floor`), which is basis-independent and equals the literal definition
wherever that is well defined. For ``tau_bar = 0`` LAPACK returns identity bases, so the literal
definition zeroes the entries ``tau_t[i, i]``; the resolved rule leaves ``tau_t`` as it is. The
Gram kernel and the factored path (:func:`opcm_project_lowrank`) follow the resolved rule at
their own precision.

Choices
-------
* ``rank_cutoff`` divides by ``cumsum(s)[-1]`` in float64 rather than by a separately rounded
  ``sum(s)``: the last ratio is then exactly 1, so ``alpha >= 1`` never removes anything. The
  reference code (``(s.cumsum(0) / s.sum() > alpha).float().argmax()`` in float32) can produce a
  last ratio just above 1 through rounding and would then remove all but one direction at
  ``alpha = 1``. For every ``alpha <= 0`` the cutoff is 0 as well (the first ratio is positive).
* :func:`thin_svd` decomposes a wide matrix through its transpose (same SVD, several times
  faster with CPU LAPACK on row-major data).
* Long dense matrices (``lm_head``, a 7B MLP weight) can instead be projected by
  :func:`opcm_project_gram`: singular pairs from the float64 eigendecomposition of the small Gram
  matrix, ``tau' = tau_t - tau_bar M`` with an n x n ``M``, so neither U nor a copy of the input
  is formed (about the time of the SVD alone there; :func:`gram_preferred` says where it wins).
* Low-rank streams (LoRA): the merged task vector of one linear weight is kept as factors
  ``tau_bar = L @ R`` (L: m x q, R: q x n). Its thin SVD comes from QR of ``L`` and ``R^T`` and the
  SVD of the small core ``R_L R_R^T`` (``lowrank.thin_svd_from_factors``), O((m + n) q^2) instead of
  O(m n min(m, n)); ``tau'`` is returned as factors too, so no m x n matrix is ever formed.
  Directions whose singular value is at most ``max(m, n) * eps32 * ||L||_2 * ||R||_2`` are
  treated as zero (see :func:`thin_svd_from_factors`).
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch
from torch import Tensor

from .lowrank import EPS32, EPS64, F32, as_f32, check_factors, check_matrix, count_above, thin_svd_from_factors

__all__ = [
    "rank_cutoff",
    "opcm_project_literal",
    "opcm_project",
    "opcm_project_gram",
    "gram_preferred",
    "thin_svd",
    "project_with_svd",
    "opcm_project_lowrank",
    "project_factors_with_svd",
    "sum_sq",
]



_SUM_BLOCK = 1 << 20  # elements per block of sum_sq: a 4 MiB float32 temporary, whatever the tensor


def sum_sq(x: Tensor, minus: Tensor | None = None) -> float:
    r"""``||x - minus||_F^2`` (or ``||x||_F^2``) as a Python float, accumulated in float64.

    Blockwise over the flattened tensors, so the only temporaries are one block (float32 and its
    float64 square sum), not a float64 copy of the whole tensor: an 11008 x 4096 float32 matrix
    would otherwise cost ~0.7 GB of temporaries per norm.
    """
    flat = x.reshape(-1)
    other = None if minus is None else minus.reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), _SUM_BLOCK):
        block = flat[start : start + _SUM_BLOCK]
        if other is not None:
            block = block - other[start : start + _SUM_BLOCK]
        total += float(torch.linalg.vector_norm(block, dtype=torch.float64).square())
    return total


def _check_pair(tau_bar: Tensor, tau_t: Tensor) -> None:
    check_matrix("tau_bar", tau_bar)
    if tau_t.shape != tau_bar.shape:
        raise ValueError(
            f"tau_t has shape {tuple(tau_t.shape)} but tau_bar has shape {tuple(tau_bar.shape)}"
        )


def rank_cutoff(s: Tensor, alpha: float) -> int:
    r"""OPCM split index ``r``: the first 0-based i with ``cumsum(s)[i] / sum(s) > alpha``.

    ``s`` is a 1-D vector of singular values (non-negative, descending). Returns 0 when no index
    qualifies (``alpha >= 1``), when ``s`` is empty, and when ``s`` is all zeros (the ratio is
    undefined; nothing is "explained", so nothing is protected). Because the first ratio is
    positive for a non-zero ``s``, ``alpha <= 0`` also gives 0. The result is at most
    ``len(s) - 1``. The ratio is taken in float64 against ``cumsum(s)[-1]`` so that the last
    ratio is exactly 1 (see the module docstring).
    """
    if math.isnan(alpha):
        raise ValueError("alpha must be a number, got NaN")
    if s.ndim != 1:
        raise ValueError(f"s must be a 1-D vector, got shape {tuple(s.shape)}")
    if s.numel() == 0:
        return 0
    cumulative = torch.cumsum(s.detach().to(device="cpu", dtype=torch.float64), dim=0)
    total = cumulative[-1]
    if total <= 0:
        return 0
    above = (cumulative / total) > alpha
    if not bool(above.any()):
        return 0
    return int(torch.argmax(above.to(torch.int8)))


def opcm_project_literal(
    tau_bar: Tensor, tau_t: Tensor, alpha: float, zero_diagonal: bool
) -> Tensor:
    r"""The literal OPCM projection: full SVD, ``P = U^T tau_t V``, zero ``P[:r, :r]`` (and the
    diagonal if ``zero_diagonal``), return ``U P V^T``.

    The executable specification that :func:`opcm_project` is tested against. Costs
    O(m n max(m, n)) time and O(m^2 + n^2) memory: use :func:`opcm_project` in real runs.
    """
    _check_pair(tau_bar, tau_t)
    tb = as_f32(tau_bar)
    tt = as_f32(tau_t, tb.device)
    u, s, vh = torch.linalg.svd(tb, full_matrices=True)
    r = rank_cutoff(s, alpha)
    p = u.mT @ tt @ vh.mT
    p[:r, :r] = 0
    if zero_diagonal:
        p.diagonal().zero_()
    return u @ p @ vh


def _removed_rows(
    left: Tensor, right: Tensor, vh_a: Tensor, r: int, zero_diagonal: bool,
    keep: Tensor | None = None, stats: dict[str, float] | None = None,
) -> Tensor:
    r"""``C @ Vh_a`` (a x n), where ``C`` (a x a) holds the coefficients OPCM removes.

    ``left`` (a x p) and ``right`` (p x a) are such that ``P = left @ right = U_a^T tau_t V_a``
    (``left = U_a^T tau_t`` and ``right = V_a`` for a dense ``tau_t``; ``left = U_a^T B`` and
    ``right = A V_a`` for ``tau_t = B A``). ``C`` keeps ``P[:r, :r]`` and, if ``zero_diagonal``,
    ``P[i, i]`` for ``r <= i < a`` where ``keep[i]`` (every i when ``keep`` is None); nothing else.
    Only those entries of ``P`` are formed, and the product uses the block-plus-diagonal
    structure: O(r^2 (n + p) + a (n + p)), not O(a^2 n). ``stats`` gets the diagonal entries left
    in place (:func:`_report`).
    """
    active = vh_a.shape[0]
    rows = vh_a.new_zeros(active, vh_a.shape[1])
    if r > 0:
        rows[:r] = (left[:r] @ right[:, :r]) @ vh_a[:r]
    if zero_diagonal and active > r:
        diag = torch.einsum("ij,ji->i", left[r:], right[:, r:])
        if keep is not None:
            _report(stats, diag[~keep[r:active]])
            diag = diag * keep[r:active]
        rows[r:] = diag[:, None] * vh_a[r:]
    return rows


def _report(stats: dict[str, float] | None, values: Tensor, null: int = 0, unvalued: int = 0) -> None:
    """Add diagonal entries left in place to ``stats``: ``diagonal_kept`` counts those outside the null
    space (``values`` are the ones computed, summed as squares in ``diagonal_kept_sq``; ``unvalued``
    were not computed), ``diagonal_null`` those in it (at or below the noise floor: no entry there is
    defined, whatever the basis)."""
    if stats is not None:
        stats["diagonal_kept"] = stats.get("diagonal_kept", 0) + values.numel() + unvalued
        stats["diagonal_null"] = stats.get("diagonal_null", 0) + null
        stats["diagonal_kept_sq"] = stats.get("diagonal_kept_sq", 0.0) + float(values.double().square().sum())


def resolved_directions(s: Tensor, tol: float, null_space: bool, floor: float = 0.0) -> Tensor:
    r"""Which singular directions are determined at absolute precision ``tol`` (a bool per entry of ``s``).

    A singular pair is unique up to a joint sign flip when its value is apart from every other
    singular value, and a backward-stable decomposition with error ``delta`` determines it to
    ``delta / gap`` (Wedin's bound); ``gap_i`` is the distance from ``s_i`` to the nearest other
    value of ``s`` and, when the matrix has a null space on either side (``null_space``: it is not
    square, or ``s`` is truncated), to 0: its vector can turn into that space. A square matrix's
    smallest pair is determined by its gap to the others alone. Direction i is resolved iff
    ``gap_i > tol`` and ``s_i > floor`` (:func:`noise_floor`); nothing is when ``s[0] = 0``.
    """
    s64 = s.detach().to(device="cpu", dtype=torch.float64)
    k = s64.numel()
    if k == 0 or float(s64[0]) <= 0.0:
        return torch.zeros(k, dtype=torch.bool, device=s.device)
    gap = torch.full((k,), math.inf, dtype=torch.float64)
    if k > 1:
        step = s64[:-1] - s64[1:]
        gap[:-1] = torch.minimum(gap[:-1], step)
        gap[1:] = torch.minimum(gap[1:], step)
    if null_space:
        gap = torch.minimum(gap, s64)
    return ((gap > tol) & (s64 > floor)).to(s.device)


def gap_tolerance(shape: tuple[int, int], unit: float) -> float:
    r"""The gap a singular pair needs to count as determined: ``max(m, n) * unit``, with ``unit`` the
    decomposition's own rounding (``eps32 * s[0]`` for a float32 SVD, ``eps64 * s[0]^2`` for the Gram
    matrix's eigenvalues). LAPACK bounds the backward error by about ``max(m, n) * unit``, so by
    Wedin's bound a pair above it is known to ``1 / max(m, n)`` or better, which keeps the result
    within float32 tolerance of the literal definition (tested to 1e-4 of ``||tau_t||``). Below it a
    pair may still be roughly known: in a dense spectrum (a random 4096 x 4096 task vector has gaps
    of about ``s[0] / 4096``) most directions fall below, and their diagonal entries stay; each step
    reports how many and their share of ``||tau_t||^2`` (7e-6 on the synthetic 7B-shaped stream of
    ``benchmarks/bench_opcm.py``)."""
    return max(shape) * unit


def noise_floor(s0: float, k: int) -> float:
    r"""Singular values at or below ``sqrt(k) * eps32 * s0`` may be nothing but the float32 rounding of
    ``tau_bar`` itself (rounding error E with ``||E||_2 <= ||E||_F <= eps32 / 2 * ||tau_bar||_F <=
    eps32 / 2 * sqrt(k) * s0``, k = min(m, n)): a numerical null space, whichever kernel decomposes it."""
    return math.sqrt(k) * EPS32 * s0


def project_with_svd(
    tau_t: Tensor, u: Tensor, s: Tensor, vh: Tensor, alpha: float, zero_diagonal: bool,
    *, keep: Tensor | None = None, stats: dict[str, float] | None = None, null_start: int | None = None,
) -> Tensor:
    r"""OPCM projection of a dense ``tau_t`` given a (thin, possibly truncated) SVD of ``tau_bar``.

    ``u`` (m x k'), ``s`` (k'), ``vh`` (k' x n), columns/rows in the order of descending ``s``.
    Computes ``tau' = tau_t - U_a C V_a^T`` with ``C`` as in :func:`_removed_rows`, where
    ``a = k'`` if ``zero_diagonal`` else ``r``. With the full thin SVD (k' = min(m, n)) and no
    ``keep`` this is the literal definition; ``keep`` (bool per direction) restricts the diagonal
    removal to the directions it marks (:func:`resolved_directions`), and ``stats`` gets what was
    left in place (directions from ``null_start`` on: null space). Output float32 on ``u``'s device.
    """
    check_matrix("tau_t", tau_t)
    device = u.device
    u32, vh32 = as_f32(u), as_f32(vh, device)
    tt = as_f32(tau_t, device)
    r = rank_cutoff(s, alpha)
    active = s.numel() if zero_diagonal else r
    active, keep = _trim(r, active, keep if zero_diagonal else None, stats, s.numel() if null_start is None else null_start)
    if active == 0:
        return tt.clone()
    u_a, vh_a = u32[:, :active], vh32[:active]
    return tt - u_a @ _removed_rows(u_a.mT @ tt, vh_a.mT, vh_a, r, zero_diagonal, keep, stats)


def _trim(r: int, active: int, keep: Tensor | None, stats: dict[str, float] | None, null_start: int) -> tuple[int, Tensor | None]:
    """The directions to form, and the mask still needed. The diagonal directions left out at the end
    (a null space, the usual case) are cut off instead of masked, and their entries are not computed
    (``stats`` counts them; those from ``null_start`` on are null space); a mask stays only for
    directions left out between resolved ones (a cluster of close singular values)."""
    if keep is None or active <= r:
        return active, keep
    resolved = keep[r:active].nonzero()
    end = r + (int(resolved[-1]) + 1 if resolved.numel() else 0)
    null = active - max(null_start, end)
    _report(stats, keep.new_zeros(0, dtype=torch.float32), null=null, unvalued=active - end - null)
    return end, (None if bool(keep[r:end].all()) else keep)


def thin_svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Thin float32 SVD ``x = U diag(s) Vh`` (U: m x k, s: k, Vh: k x n, k = min(m, n)).

    A wide matrix is decomposed through its (contiguous) transpose, ``x^T = U' S Vh'`` giving
    ``U = Vh'^T`` and ``Vh = U'^T``: the CPU LAPACK route is several times slower on wide
    row-major input (about 3x for 1024 x 4096, measured), and the result is the same SVD.
    """
    check_matrix("x", x)
    xf = as_f32(x)
    if xf.shape[0] >= xf.shape[1]:
        u, s, vh = torch.linalg.svd(xf, full_matrices=False)
        return u, s, vh
    u_t, s, vh_t = torch.linalg.svd(xf.mT.contiguous(), full_matrices=False)
    return vh_t.mT, s, u_t.mT


def opcm_project(
    tau_bar: Tensor,
    tau_t: Tensor,
    alpha: float,
    zero_diagonal: bool,
    *,
    diagonal: Literal["literal", "resolved"] = "literal",
    stats: dict[str, float] | None = None,
    noise: float = 0.0,
) -> Tensor:
    r"""OPCM projection of ``tau_t`` against ``tau_bar`` through the thin SVD (float32).

    ``tau' = tau_t - U_r (U_r^T tau_t V_r) V_r^T - sum_{i=r}^{k-1} (u_i^T tau_t v_i) u_i v_i^T``
    (the sum only if ``zero_diagonal``), k = min(m, n). Equal to :func:`opcm_project_literal`
    (see the module docstring for the proof and for the rank-deficient case). O(m n k). When
    ``zero_diagonal`` is false and ``alpha >= 1`` or ``alpha <= 0`` the cut-off is 0 for every
    ``tau_bar``, so the SVD is skipped and a float32 copy of ``tau_t`` is returned.

    ``diagonal="resolved"`` removes a diagonal entry only along a direction the float32 SVD
    determines (:func:`resolved_directions` with gaps above :func:`gap_tolerance`, a null
    space when m != n, and values above :func:`noise_floor`): where the literal definition is
    itself well defined it is followed, and where it
    is not (an exact or numerical null space, repeated singular values: the basis the SVD returned
    is arbitrary there; for ``tau_bar = 0`` LAPACK's identity would zero ``tau_t[i, i]`` itself) the
    entry stays. ``noise``: a bound on the error with which ``tau_bar`` itself is known (OPCM passes
    ``eps32 * ||theta(t-1)||_F``: the merged weights were rounded to float32 when stored, an error
    relative to the weights, not to their task vector); singular values at or below it count as
    null space too. ``stats`` gets the entries left in place (``diagonal_kept``,
    ``diagonal_kept_sq``). ``"literal"`` (the default) removes every diagonal entry, whatever its basis.
    """
    _check_pair(tau_bar, tau_t)
    tb = as_f32(tau_bar)
    if not zero_diagonal and (alpha >= 1.0 or alpha <= 0.0):
        return as_f32(tau_t, tb.device).clone()
    u, s, vh = thin_svd(tb)
    keep, null_start = None, None
    if diagonal == "resolved" and s.numel():
        s0 = float(s[0])
        floor = max(noise, noise_floor(s0, s.numel()))
        keep = resolved_directions(s, gap_tolerance(tb.shape, EPS32 * s0), tb.shape[0] != tb.shape[1], floor)
        null_start = count_above(s, floor)
    return project_with_svd(tau_t, u, s, vh, alpha, zero_diagonal, keep=keep, stats=stats, null_start=null_start)


_GRAM_BLOCK_BYTES = 32 << 20  # float64 row block of the Gram accumulation: 32 MiB, whatever the matrix
_GRAM_COLS = 1024  # column block of the Gram accumulation (its lower triangle is computed block by block)


def gram_preferred(shape: tuple[int, ...]) -> bool:
    """Whether :func:`opcm_project_gram` is the faster dense kernel for a matrix of this shape.

    Its decomposition is an eigendecomposition of the small k x k Gram matrix (k = min(m, n)) and
    two m x n x k products, against LAPACK's SVD of the whole m x n matrix: a win once the matrix
    is at least twice as long as it is wide (measured on 2 CPU cores: 11008 x 4096 and
    32000 x 4096 take 0.76x and 0.69x the SVD route's time, about the time of the SVD alone;
    4096 x 4096 about 1.1x; ``benchmarks/RESULTS.md``). It always needs less memory (no U, no
    copy of the input).
    """
    return len(shape) == 2 and min(shape) > 0 and max(shape) >= 2 * min(shape)


def opcm_project_gram(
    tau_bar: Tensor, tau_t: Tensor, alpha: float, zero_diagonal: bool, *, inplace: bool = False,
    stats: dict[str, float] | None = None, noise: float = 0.0,
) -> Tensor:
    r"""OPCM projection through the eigendecomposition of the small Gram matrix (float64).

    For a tall ``tau_bar`` (m >= n; a wide one is handled as its transpose, the projection
    commutes with transposition): ``G = tau_bar^T tau_bar = V diag(s^2) V^T`` (float64, its
    lower triangle by blocks) and ``K = tau_bar^T tau_t`` (float32) are accumulated over row
    blocks, so ``U = tau_bar V S^-1`` is never formed:

        P = U_a^T tau_t V_a = S_a^-1 V_a^T K V_a,   C = P masked as in :func:`_removed_rows`,
        tau' = tau_t - U_a C V_a^T = tau_t - tau_bar M,   M = V_a S_a^-1 C V_a^T   (n x n)

    with the diagonal removal restricted to the directions this kernel resolves (the convention
    of ``opcm_project(..., diagonal="resolved")``, at this kernel's precision): ``v_i`` apart from
    the other eigenvectors, ``resolved_directions(s^2, gap_tolerance(shape, eps64 * s[0]^2))``, and ``s_i``
    above :func:`noise_floor` and ``noise`` (as in :func:`opcm_project`). ``U = tau_bar V S^-1`` and ``K`` in float32 carry an error
    of ``eps32 * s[0] / s_i`` along direction i, so directions with ``s_i <= max(m, n) * eps32 *
    s[0]`` have ``u_i`` and ``u_i^T tau_t`` computed in float64 instead (O(m n) each; real task
    vectors have few such directions). ``stats`` gets the diagonal entries left in place. Extra
    memory O(n^2) plus one row block; time: the float64 half-Gram (about m n^2 flops), two float32
    m x n x n products, a float64 n x n ``eigh`` and two float32 n^3 products.

    Accuracy: G in float64 resolves every direction above the rank tolerance (its eigenvalues
    carry an absolute error of order ``n * eps64 * s[0]^2``), so V is accurate and orthonormal
    and ``U = tau_bar V S^-1`` is well defined; the rest is float32 like the SVD route. Against a
    float64 SVD reference the result is within float32 tolerance and as close as the float32 SVD
    route's (tested on spectra spanning five and eight
    decades). ``inplace=True`` writes ``tau'`` into ``tau_t`` (which must then be a float32
    tensor on ``tau_bar``'s device) and returns it. Output float32 on ``tau_bar``'s device.
    """
    _check_pair(tau_bar, tau_t)
    x = as_f32(tau_bar)
    out = tau_t if inplace else as_f32(tau_t, x.device).clone()
    if inplace and (out.dtype != F32 or out.device != x.device):
        raise ValueError("inplace needs tau_t as float32 on tau_bar's device")
    if x.numel() == 0 or (not zero_diagonal and (alpha >= 1.0 or alpha <= 0.0)):
        return out  # the cut-off is 0 for every tau_bar: nothing is removed
    wide = x.shape[0] < x.shape[1]
    xt, tt = (x.mT, out.mT) if wide else (x, out)  # tall views: rows of xt are columns of a wide tau_bar
    m, n = xt.shape
    f64 = torch.float64
    step = max(1, _GRAM_BLOCK_BYTES // (8 * n))
    g = torch.zeros(n, n, dtype=f64, device=x.device)
    cols = [(j, min(j + _GRAM_COLS, n)) for j in range(0, n, _GRAM_COLS)]
    for i in range(0, m, step):
        xb = xt[i : i + step].to(f64)
        for a0, a1 in cols:  # the lower triangle only (eigh reads no more): ~5/8 of the products for n = 4096
            for b0, b1 in cols[: a0 // _GRAM_COLS + 1]:
                g[a0:a1, b0:b1].addmm_(xb[:, a0:a1].mT, xb[:, b0:b1])
    w, v = torch.linalg.eigh(g, UPLO="L")  # ascending
    del g  # each stage's n x n temporaries go before the next stage's (n = 4096: 128 MiB each)
    w = w.flip(0).clamp_min(0.0)  # descending, as an SVD returns them (v's columns: ascending still)
    s = w.sqrt()
    s0 = float(s[0]) if s.numel() else 0.0
    rho = count_above(s, max(m, n) * EPS32 * s0)  # u_i = tau_bar v_i / s_i is accurate in float32
    # resolved: v_i apart from the other eigenvectors of G at G's float64 precision, and u_i computable in float64
    floor = max(noise, noise_floor(s0, n))
    keep = resolved_directions(w, gap_tolerance((m, n), EPS64 * s0**2), null_space=False) & (s > floor)
    r = min(rank_cutoff(s, alpha), count_above(s, max(m, n) * EPS64 * s0))
    base_rows = rho if zero_diagonal else min(r, rho)
    fine = [i for i in range(base_rows, s.numel()) if i < r or (zero_diagonal and bool(keep[i]))]  # float64 rows
    if zero_diagonal:
        lost = int((~keep[max(r, rho):]).sum())  # left out below the float32 rows: entries not computed
        null = s.numel() - max(count_above(s, floor), r, rho)
        _report(stats, s.new_zeros(0), null=null, unvalued=lost - null)
    if base_rows + len(fine) == 0:
        return out
    chosen = torch.tensor([*range(base_rows), *fine], dtype=torch.long, device=v.device)
    v_a = v[:, n - base_rows :].flip(1)  # the top directions, descending (LAPACK's column-major layout kept)
    if fine:
        v_a = torch.cat([v_a, v[:, [n - 1 - i for i in fine]]], dim=1)
    s_a = s[chosen]
    del v, w
    k = torch.zeros(n, n, dtype=F32, device=x.device)  # K = tau_bar^T tau_t, accumulated by row blocks
    for i in range(0, m, step):
        k.addmm_(xt[i : i + step].mT, tt[i : i + step])
    v32, s32 = v_a.to(F32), s_a.to(F32)
    left = (v32[:, :base_rows].mT @ k).div_(s32[:base_rows, None])  # U_a^T tau_t (a x n), without U
    del k
    u_fine = None
    if fine:  # small singular values: u_i and u_i^T tau_t in float64 (float32 would lose eps32 * s0 / s_i)
        f = len(fine)
        u64 = torch.empty(m, f, dtype=f64, device=x.device)
        left64 = torch.zeros(f, n, dtype=f64, device=x.device)
        for i in range(0, m, step):
            u64[i : i + step] = (xt[i : i + step].to(f64) @ v_a[:, base_rows:]).div_(s_a[base_rows:])
            left64.addmm_(u64[i : i + step].mT, tt[i : i + step].to(f64))
        left = torch.cat([left, left64.to(F32)])
        u_fine = u64.to(F32)
        del u64, left64
    rows_c = _removed_rows(left, v32, v32.mT, min(r, len(chosen)), zero_diagonal, keep[chosen], stats)  # C V_a^T
    del left
    rows_fine = rows_c[base_rows:]
    m_mat = v32[:, :base_rows] @ rows_c[:base_rows].div_(s32[:base_rows, None])  # M = V_a S^-1 C V_a^T
    del rows_c, v32
    # tau' = tau_t - tau_bar M - U_fine C_fine V_a^T, by row blocks of the output (a wide tau_bar: transposed)
    rows = max(1, _GRAM_BLOCK_BYTES // (4 * max(out.shape[1], 1)))
    for i in range(0, out.shape[0], rows):
        if wide:
            out[i : i + rows].sub_(m_mat[:, i : i + rows].mT @ x)
            if u_fine is not None:
                out[i : i + rows].sub_(rows_fine[:, i : i + rows].mT @ u_fine.mT)
        else:
            out[i : i + rows].sub_(x[i : i + rows] @ m_mat)
            if u_fine is not None:
                out[i : i + rows].sub_(u_fine[i : i + rows] @ rows_fine)
    return out


@overload
def opcm_project_lowrank(
    left: Tensor,
    right: Tensor,
    tau_t: tuple[Tensor, Tensor],
    alpha: float,
    zero_diagonal: bool,
) -> tuple[Tensor, Tensor]: ...


@overload
def opcm_project_lowrank(
    left: Tensor, right: Tensor, tau_t: Tensor, alpha: float, zero_diagonal: bool
) -> Tensor: ...


def opcm_project_lowrank(
    left: Tensor,
    right: Tensor,
    tau_t: tuple[Tensor, Tensor] | Tensor,
    alpha: float,
    zero_diagonal: bool,
) -> tuple[Tensor, Tensor] | Tensor:
    r"""OPCM projection with ``tau_bar = left @ right`` given as factors.

    ``tau_t`` is either factors ``(B, A)`` with ``tau_t = B @ A`` (B: m x r_t, A: r_t x n), and
    then ``tau'`` is returned as factors ``(L', R')``, or a dense m x n tensor, and then ``tau'``
    is returned dense. With ``U, s, Vh`` the numerically non-zero thin SVD of ``tau_bar``
    (:func:`thin_svd_from_factors`, rank rho) and ``r = rank_cutoff(s, alpha)``:

        tau' = tau_t - U_r (U_r^T tau_t V_r) V_r^T - sum_{i=r}^{rho-1} (u_i^T tau_t v_i) u_i v_i^T

    (the sum only if ``zero_diagonal``). **[choice]** The diagonal removal is restricted to the
    rho non-zero directions of ``tau_bar``: in its null space the singular basis is arbitrary.
    This equals :func:`opcm_project` when ``tau_bar`` has full rank min(m, n); when it is
    rank-deficient and ``zero_diagonal`` is set, the dense path additionally removes diagonal
    entries along whatever null-space basis its SVD happened to return. With
    ``zero_diagonal=False`` the two paths agree for any rank.

    Factored result: ``L' = [B, U_a]`` (m x (r_t + a)), ``R' = [A; -C Vh_a]`` with ``C`` the
    a x a removed coefficients (a = rho if ``zero_diagonal`` else r); O((m + n)(q^2 + r_t a)),
    no m x n matrix is formed. Pass ``(L', R')`` through :func:`recompress` to fold its rank.
    """
    u, s, vh = thin_svd_from_factors(left, right)
    if isinstance(tau_t, Tensor):
        check_matrix("tau_t", tau_t)
        if tuple(tau_t.shape) != (left.shape[0], right.shape[1]):
            raise ValueError(
                f"tau_t has shape {tuple(tau_t.shape)} but tau_bar is "
                f"{left.shape[0]} x {right.shape[1]}"
            )
        return project_with_svd(tau_t, u, s, vh, alpha, zero_diagonal)
    return project_factors_with_svd(tau_t, u, s, vh, alpha, zero_diagonal)


def project_factors_with_svd(
    tau_t: tuple[Tensor, Tensor], u: Tensor, s: Tensor, vh: Tensor, alpha: float, zero_diagonal: bool,
    *, stats: dict[str, float] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The factored OPCM projection of ``tau_t = B @ A`` given the (numerically non-zero) thin SVD
    ``U, s, Vh`` of ``tau_bar``: factors ``(L', R')`` as in :func:`opcm_project_lowrank`.

    For callers that carry ``tau_bar`` in SVD form already (``U·s``, ``Vh``): no QR is needed. The
    diagonal removal covers the directions :func:`resolved_directions` resolves at
    ``max(m, n) * eps32 * s[0]`` (the rest of the space is ``tau_bar``'s null space), as the dense
    route's ``diagonal="resolved"``; ``stats`` gets the entries left in place.
    """
    b, a = tau_t
    check_factors("tau_t", b, a)
    if (b.shape[0], a.shape[1]) != (u.shape[0], vh.shape[1]):
        raise ValueError(
            f"tau_t is {b.shape[0]} x {a.shape[1]} but tau_bar is "
            f"{u.shape[0]} x {vh.shape[1]}"
        )
    bf, af = as_f32(b, u.device), as_f32(a, u.device)
    r = rank_cutoff(s, alpha)
    active = s.numel() if zero_diagonal else r
    floor = noise_floor(float(s[0]), min(u.shape[0], vh.shape[1])) if s.numel() else 0.0
    keep = resolved_directions(s, gap_tolerance((u.shape[0], vh.shape[1]), EPS32 * float(s[0])), null_space=True, floor=floor) \
        if s.numel() else None
    active, keep = _trim(r, active, keep if zero_diagonal else None, stats, count_above(s, floor))
    if active == 0:
        return bf.clone(), af.clone()
    u_a, vh_a = u[:, :active], vh[:active]
    # P = (U_a^T B)(A V_a): both parts are small (active x r_t and r_t x active).
    removed = _removed_rows(u_a.mT @ bf, af @ vh_a.mT, vh_a, r, zero_diagonal, keep, stats)
    return torch.cat([bf, u_a], dim=1), torch.cat([af, -removed], dim=0)


