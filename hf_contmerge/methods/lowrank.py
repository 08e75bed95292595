"""Low-rank matrices as factors: the type, its linear algebra, and when the engine keeps a task vector factored.

A LoRA adapter's task vector on a linear weight is ``s·B@A``: rank r, stored in (m + n)·r numbers
instead of m·n. A continual merge of such deltas stays low-rank as long as the method only adds,
scales and projects them (OPCM: the merged task vector's column space grows by at most the new
adapter's rank per step). Carrying it as factors turns OPCM's per-step SVD of an m x n matrix,
O(m·n·min(m, n)), into QR + SVD of the factors, O((m + n)·q²) (:func:`thin_svd_from_factors`).

Convention: a carried slot held as :class:`LowRank` ``(L, R)`` stands for the dense slot value
``base + L @ R`` (a delta from the base tensor). The engine keeps a tensor factored while
``q·(m + n) < m·n`` (:func:`worth_factoring`): beyond that the factors are no smaller than the
dense matrix, and the tensor continues dense from the next step on, with the same results.

The functions here are method-agnostic maths on factors (QR of both factors and an SVD of the
small core, re-factoring to the numerical rank); OPCM's projections on factors are in
``methods/opcm_kernels.py``. All arithmetic is float32 on the device of the first factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

F32 = torch.float32
EPS32 = torch.finfo(F32).eps
EPS64 = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class LowRank:
    """The m x n matrix ``left @ right`` (left: m x q, right: q x n), float32, on one device."""

    left: Tensor
    right: Tensor

    def __post_init__(self) -> None:
        if self.left.dim() != 2 or self.right.dim() != 2 or self.left.shape[1] != self.right.shape[0]:
            raise ValueError(f"factors do not chain: {tuple(self.left.shape)} @ {tuple(self.right.shape)}")

    @classmethod
    def zeros(cls, shape: tuple[int, ...], device: torch.device | str = "cpu") -> LowRank:
        m, n = shape
        return cls(torch.zeros(m, 0, device=device), torch.zeros(0, n, device=device))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    @property
    def rank(self) -> int:
        """Number of factor columns (an upper bound of the rank; exact after :meth:`compressed`)."""
        return self.left.shape[1]

    def to(self, device: torch.device | str) -> LowRank:
        return LowRank(self.left.to(device, torch.float32), self.right.to(device, torch.float32))

    def scaled(self, c: float) -> LowRank:
        return LowRank(self.left * c, self.right)

    def rows(self, rows: tuple[int, int] | None) -> Tensor:
        """Dense rows ``[a, b)`` of ``left @ right`` (all rows for None): O(rows · q · n)."""
        left = self.left if rows is None else self.left[rows[0] : rows[1]]
        return left @ self.right

    def compressed(self, max_rank: int | None = None) -> tuple[LowRank, float]:
        """Re-factored to its numerical rank (at most ``max_rank``) in SVD form ``(U·s, Vh)``, and the
        squared Frobenius norm dropped (:func:`recompress`)."""
        left, right, dropped = recompress(self.left, self.right, max_rank)
        return LowRank(left, right), dropped

    def svd_of_svd_form(self) -> tuple[Tensor, Tensor, Tensor]:
        """``U, s, Vh`` of a matrix held in SVD form (what :meth:`compressed` returns, or a scaling of it):
        ``s`` = the column norms of ``left``, ``U = left / s``, ``Vh = right``; sorted by descending ``s``,
        zero columns dropped. No QR: the factors already are the decomposition."""
        s = torch.linalg.vector_norm(self.left, dim=0)
        order = torch.argsort(s, descending=True, stable=True)
        order = order[s[order] > 0]
        s = s[order]
        return self.left[:, order] / s, s, self.right[order]

    def norm_sq_of_svd_form(self) -> float:
        """``‖left @ right‖_F²`` for SVD form (orthonormal rows in ``right``): ``‖left‖_F²``, float64."""
        return float(torch.linalg.vector_norm(self.left, dtype=torch.float64) ** 2)

    def norm_sq(self) -> float:
        """``‖left @ right‖_F²`` from the triangular QR factors (orthogonal invariance), float64-summed:
        ``‖L R‖ = ‖R_L R_Rᵀ‖`` with ``L = Q_L R_L``, ``Rᵀ = Q_R R_R``; no m x n product is formed."""
        if self.rank == 0:
            return 0.0
        r_left = torch.linalg.qr(self.left, mode="r").R
        r_right = torch.linalg.qr(self.right.mT, mode="r").R
        return float(torch.linalg.matrix_norm((r_left @ r_right.mT).double()) ** 2)


def worth_factoring(shape: tuple[int, ...], rank: int) -> bool:
    """Whether an m x n matrix of rank ≤ ``rank`` is smaller as factors than dense: ``rank·(m + n) < m·n``."""
    if len(shape) != 2:
        return False
    m, n = shape
    return rank * (m + n) < m * n


def as_f32(x: Tensor, device: torch.device | None = None) -> Tensor:
    """``x`` as float32 on ``device`` (its own device when None); no copy when already there."""
    return x.to(device=x.device if device is None else device, dtype=F32)


def check_matrix(name: str, x: Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(x.shape)}")


def check_factors(name: str, left: Tensor, right: Tensor) -> None:
    check_matrix(f"{name} left factor", left)
    check_matrix(f"{name} right factor", right)
    if left.shape[1] != right.shape[0]:
        raise ValueError(
            f"{name} factors do not chain: {tuple(left.shape)} @ {tuple(right.shape)}"
        )


def count_above(s: Tensor, tol: float) -> int:
    """How many entries of the descending ``s`` exceed ``tol`` (the numerical rank)."""
    return int((s > tol).sum()) if s.numel() else 0


def _factor_core_svd(
    left: Tensor, right: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, float]:
    r"""QR of both factors and SVD of the small core: ``left @ right = Q1 Uc diag(s) Vhc Q2^T``.

    Returns ``(Q1, Uc, s, Vhc, Q2, tol)`` where ``tol`` is the numerical-zero threshold of
    :func:`thin_svd_from_factors`. ``q = 0`` (no columns) is handled as the zero matrix.
    """
    check_factors("low-rank", left, right)
    lf = as_f32(left)
    rf = as_f32(right, lf.device)
    q1, r1 = torch.linalg.qr(lf)  # q1: m x min(m, q), r1: min(m, q) x q
    q2, r2 = torch.linalg.qr(rf.mT)  # q2: n x min(n, q), r2: min(n, q) x q
    uc, s, vhc = torch.linalg.svd(r1 @ r2.mT, full_matrices=False)
    m, n = lf.shape[0], rf.shape[1]
    if s.numel() == 0:
        return q1, uc, s, vhc, q2, 0.0
    # ||L||_2 ||R||_2 is the scale of the rounding error of this route; it equals s[0] when the
    # factors are an SVD (recompress output) and exposes exact cancellation between factors.
    scale = float(torch.linalg.matrix_norm(r1, ord=2) * torch.linalg.matrix_norm(r2, ord=2))
    return q1, uc, s, vhc, q2, max(m, n) * EPS32 * scale


def thin_svd_from_factors(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Thin SVD of ``left @ right`` (m x q @ q x n) without forming the m x n product.

    ``left = Q1 R1`` and ``right^T = Q2 R2`` (reduced QR), ``R1 R2^T = Uc diag(s) Vhc`` (small
    SVD), so ``left @ right = (Q1 Uc) diag(s) (Vhc Q2^T)``: O((m + n) q^2 + q^3) time.

    Only the numerically non-zero directions are returned: those with
    ``s_i > max(m, n) * eps_float32 * ||left||_2 * ||right||_2`` (the spectral norms are read off
    the small triangular factors). ``||left||_2 ||right||_2 >= s[0]``, with equality for factors
    in SVD form (what :func:`recompress` returns), where this is the usual
    ``max(m, n) * eps * s[0]`` rank tolerance; using the factor norms also reports rank 0 for
    factors that cancel exactly (e.g. ``[B, -B] @ [A; A]``), whose computed ``s[0]`` is itself
    rounding noise. Returns ``U`` (m x rho), ``s`` (rho), ``Vh`` (rho x n), float32, rho >= 0.
    """
    q1, uc, s, vhc, q2, tol = _factor_core_svd(left, right)
    keep = count_above(s, tol)
    return q1 @ uc[:, :keep], s[:keep].clone(), vhc[:keep] @ q2.mT


def factored_norm_sq(left: Tensor, right: Tensor) -> Tensor:
    r"""``||left @ right||_F^2`` from the q x q Gram matrices, without the m x n product.

    ``||L R||_F^2 = tr(R^T L^T L R) = sum((L^T L) * (R R^T))`` (both Grams are symmetric):
    O((m + n) q^2). Returns a 0-d float32 tensor on ``left``'s device (no host sync), clamped at
    0. Its absolute error is of order ``eps32 * ||L||_F^2 ||R||_F^2``, so when the factors cancel
    heavily (a freshly projected ``tau'``) run :func:`recompress` first for a tight value.
    """
    check_factors("norm", left, right)
    lf = as_f32(left)
    rf = as_f32(right, lf.device)
    return ((lf.mT @ lf) * (rf @ rf.mT)).sum().clamp_min(0.0)


def add_factored(
    left1: Tensor,
    right1: Tensor,
    left2: Tensor,
    right2: Tensor,
    scale1: float = 1.0,
    scale2: float = 1.0,
) -> tuple[Tensor, Tensor]:
    r"""Factors of ``scale1 * left1 @ right1 + scale2 * left2 @ right2``.

    ``L = [scale1 * left1, scale2 * left2]``, ``R = [right1; right2]`` (the scales go on the left
    factors); the rank is the sum of the two ranks, so follow with :func:`recompress` to keep it
    bounded. For the OPCM update ``unscaled = lam_prev * tau_bar + tau'`` use
    ``add_factored(L, R, L', R', lam_prev, 1.0)``. float32 on ``left1``'s device.
    """
    check_factors("first", left1, right1)
    check_factors("second", left2, right2)
    if (left1.shape[0], right1.shape[1]) != (left2.shape[0], right2.shape[1]):
        raise ValueError(
            f"cannot add a {left1.shape[0]} x {right1.shape[1]} and a "
            f"{left2.shape[0]} x {right2.shape[1]} matrix"
        )
    device = left1.device
    left = torch.cat([scale1 * as_f32(left1), scale2 * as_f32(left2, device)], dim=1)
    right = torch.cat([as_f32(right1, device), as_f32(right2, device)], dim=0)
    return left, right


def recompress(
    left: Tensor, right: Tensor, max_rank: int | None = None
) -> tuple[Tensor, Tensor, float]:
    r"""Re-factor ``left @ right`` to its numerical rank (and at most ``max_rank``).

    From :func:`thin_svd_from_factors`, ``left @ right ~= (U diag(s)) @ Vh``: returns
    ``(U * s, Vh, dropped_energy)`` with the singular values on the left factor (so the right
    factor has orthonormal rows), keeping the numerically non-zero directions, then the top
    ``max_rank`` of them when given (the best rank-``max_rank`` approximation, Eckart-Young).
    ``dropped_energy = sum of s_i^2 over dropped directions = ||left @ right - L' R'||_F^2``
    (the numerically-zero ones included), as a Python float.
    """
    if max_rank is not None and max_rank < 0:
        raise ValueError(f"max_rank must be >= 0, got {max_rank}")
    q1, uc, s, vhc, q2, tol = _factor_core_svd(left, right)
    keep = count_above(s, tol)
    if max_rank is not None:
        keep = min(keep, max_rank)
    new_left = q1 @ (uc[:, :keep] * s[:keep])
    new_right = vhc[:keep] @ q2.mT
    dropped = float(s[keep:].to(torch.float64).square().sum()) if s.numel() else 0.0
    return new_left, new_right, dropped
