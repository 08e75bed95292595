"""Low-rank matrices as factors, and how the engine decides to keep a task vector factored.

A LoRA adapter's task vector on a linear weight is ``s·B@A``: rank r, stored in (m + n)·r numbers
instead of m·n. A continual merge of such deltas stays low-rank as long as the method only adds,
scales and projects them (OPCM: the merged task vector's column space grows by at most the new
adapter's rank per step). Carrying it as factors turns OPCM's per-step SVD of an m x n matrix,
O(m·n·min(m, n)), into QR + SVD of the factors, O((m + n)·q²) (``linalg.thin_svd_from_factors``).

Convention: a carried slot held as :class:`LowRank` ``(L, R)`` stands for the dense slot value
``base + L @ R`` (a delta from the base tensor). The engine keeps a tensor factored while
``q·(m + n) < m·n`` (:func:`worth_factoring`): beyond that the factors are no smaller than the
dense matrix, and the tensor continues dense from the next step on, with the same results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .linalg import recompress

LEFT, RIGHT = "::left", "::right"  # suffixes of the two factors of a key in the state files


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
        squared Frobenius norm dropped (``linalg.recompress``)."""
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

    def state_tensors(self, key: str) -> list[tuple[str, Tensor]]:
        """The two named tensors that store this matrix for tensor ``key``."""
        return [(key + LEFT, self.left), (key + RIGHT, self.right)]


def worth_factoring(shape: tuple[int, ...], rank: int) -> bool:
    """Whether an m x n matrix of rank ≤ ``rank`` is smaller as factors than dense: ``rank·(m + n) < m·n``."""
    if len(shape) != 2:
        return False
    m, n = shape
    return rank * (m + n) < m * n
