"""Continual TIES-merging (the continual TIES baseline of the OPCM paper).

    θ(1) = θ0 + λ·τ1
    θ(t) = θ(t−1) + λ·TIES([τ̄(t−1), τt])      (t ≥ 2),   τ̄(t−1) = θ(t−1) − θ0

TIES([a, b]) (Yadav et al. 2023):
1. trim: in each of a and b keep the entries whose magnitude is at least the k-th largest, with
   k = ⌊top_k·n⌋ and n the number of entries of the tensor (ties at the threshold are kept, as in
   the reference ``topk_values_mask``, whose kthvalue index keeps one entry more than k: an
   off-by-one not copied here; k = n keeps everything, k = 0 keeps only the largest);
2. elect: per entry, the sign of the sum of the trimmed values (a zero sum elects +);
3. disjoint **sum**: add the trimmed entries whose sign agrees with the elected sign.

[choice] Trimming is per tensor. The reference code trims over the whole flattened model, which
cannot stream one tensor at a time; per-tensor trimming keeps the same fraction in every tensor
instead of letting large-magnitude tensors take the budget of small ones.

The result is added to θ(t−1), not θ0, so contributions compound over the stream: that instability
is a known property of this baseline (OPCM paper, Table 1: 49.0 % on ViT-B/32, 8 tasks), not a bug.
Reference: Yadav et al. 2023, "TIES-Merging" (NeurIPS), arXiv 2306.01708; continual form from
Tang et al. 2025, arXiv 2501.09522. Not elementwise (the trim threshold needs the whole tensor).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from .base import Method, MethodParams, StepContext, TensorInputs, TensorOutput


class TiesParams(MethodParams):
    scaling: float = Field(0.3, gt=0, description="λ applied to each TIES merge of [τ̄(t−1), τt]")
    top_k: float = Field(0.2, gt=0, le=1, description="fraction of entries kept per tensor when trimming")


def trim(x: Tensor, top_k: float) -> Tensor:
    """Zero all but the entries of largest magnitude (fraction ``top_k`` of the tensor)."""
    n = x.numel()
    keep = int(n * top_k)
    if n == 0 or keep >= n:
        return x.clone()
    mag = x.abs().reshape(-1)
    # the k-th largest is the (n − k + 1)-th smallest; the reference passes n − k and so keeps k + 1
    threshold = mag.kthvalue(n - keep + 1).values if keep > 0 else mag.max()
    return torch.where(x.abs() >= threshold, x, torch.zeros_like(x))


def ties_merge(vectors: list[Tensor], top_k: float) -> Tensor:
    """TIES of task vectors: trim, elect sign (zero → +), disjoint sum."""
    trimmed = torch.stack([trim(v, top_k) for v in vectors])
    sign = torch.where(trimmed.sum(dim=0) >= 0, 1.0, -1.0).to(trimmed.dtype)
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    return (trimmed * agree).sum(dim=0)


class Ties(Method):
    name = "ties"
    summary = "adds λ·TIES([θ(t−1) − θ0, θt − θ0]) to θ(t−1) (trim per tensor, elect sign, disjoint sum)"
    reference = "Yadav et al. 2023 (NeurIPS), arXiv 2306.01708; continual form as in arXiv 2501.09522"
    Params = TiesParams
    elementwise = False

    def merge(self, ctx: StepContext, x: TensorInputs) -> TensorOutput:
        tau = x.item - x.base
        if x.prev is None:
            return TensorOutput({"merged": x.base + self.params.scaling * tau})
        merged = x.prev["merged"]
        return TensorOutput({"merged": merged + self.params.scaling * ties_merge([merged - x.base, tau], self.params.top_k)})
