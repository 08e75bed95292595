"""OPCM: Orthogonal Projection-based Continual Merging (training-free, data-free).

Tang et al. 2025, "Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable
Continual Model Merging", arXiv 2501.09522; reference code FusionBench ``method/opcm/``.

    step 1:  θ(1) = θ1,  λ1 = 1,  norms = [‖τ1‖]
    step t ≥ 2, with τ̄ = θ(t−1) − θ0 and τt = θt − θ0:
      norms.append(‖τt‖);  A = mean(norms)
      linear weight:  τ̄ = U·diag(s)·Vᵀ;  r = first index with cumsum(s)/sum(s) > alpha (0 if none);
                      P = Uᵀ·τt·V;  P[:r, :r] = 0;  if zero_diagonal: P[i, i] = 0 ∀i;  τ' = U·P·Vᵀ
      other tensor:   τ' = τt
      unscaled = λ(t−1)·τ̄ + τ'
      λt = ‖unscaled‖ / A;   θ(t) = θ0 + unscaled / λt          (so ‖θ(t) − θ0‖ = A)

‖·‖ is over all merged tensors together, so a step is two passes over the model (the engine's
global pass): pass 1 computes every ``unscaled`` tensor and the two squared norms, pass 2 scales.
The projection of a dense τt uses one of two kernels, both equal to the literal full-matrix
definition above up to float32 rounding (tested against it and against each other):
``opcm_kernels.opcm_project`` (thin SVD of τ̄ in float32) and ``opcm_kernels.opcm_project_gram`` (τ̄'s singular
pairs from the float64 eigendecomposition of its k × k Gram matrix, k = min(m, n), with τ' =
τt − τ̄·M for an n × n matrix M, so U is never formed: O(k²) extra memory instead of several m × n
copies, and faster than LAPACK's SVD on long matrices such as ``lm_head`` or a 7B MLP weight).
``kernel=auto`` (default) takes the Gram kernel when max(m, n) ≥ 2·min(m, n), ``svd``/``gram`` force one.

Choices:
- *Linear weights* are the 2-D weights of ``nn.Linear`` and transposed HF ``Conv1D`` modules,
  found from the module types of the base model built on the meta device (``sources/naming.py``;
  the engine hands the answer to every kernel as ``linear``), mapped to file names; never from
  tensor rank (embeddings are 2-D and are not projected). A transposed
  Conv1D weight is projected as stored: the projection commutes with transposition.
- Every other floating-point tensor (biases, norms, embeddings, convolutions) takes the plain rule
  above; none is skipped (the reference code skips parameters owned by non-leaf modules, a known
  defect not copied).
- ``zero_diagonal`` (default true) is the maintained reference; ``false`` reproduces the code the
  paper's numbers were produced with (its diagonal fill was a no-op).
- [choice] The diagonal removal follows the literal definition along every singular direction of τ̄
  that the kernel determines, however small its singular value, and leaves the entry in place only
  where the definition itself depends on an arbitrary basis: directions whose singular value is
  within ``max(m, n)·eps·s0`` of another one (or of 0 when m ≠ n), which the decomposition does not
  determine to float32 tolerance (eps32 for the float32 SVD; eps64 on s² for the Gram kernel, whose
  small directions are then computed in float64; ``opcm_kernels.gap_tolerance``), and τ̄'s numerical
  null space, the singular values at or below
  ``max(eps32·‖θ(t−1)‖_F, √k·eps32·s0)`` (θ(t−1) was rounded to float32 when stored, so τ̄ is not
  known more finely; for τ̄ = 0 LAPACK's identity basis would otherwise zero τt[i, i] itself). The
  factored path (LoRA streams) uses the same rule on its SVD from factors, so a LoRA stream and its
  merged checkpoints give the same result. Each step records how many entries stayed
  (``diagonal_kept``, with their share of ‖τt‖² over the projected weights, and ``diagonal_null``
  for the null space) in its state and card.
- Low-rank form (LoRA streams): while every task vector of a matrix is low-rank, τ̄ is carried
  as factors (linear weights and embeddings alike; the plain rule is linear in the factors), kept
  in SVD form (U·s, Vh), so a linear weight's SVD is read off them and the projection runs on
  factors (``opcm_kernels.project_factors_with_svd``); ``unscaled`` is re-factored to its numerical rank
  (≤ the sum of the adapters' ranks) by QR of the factors and the SVD of a small core:
  O((m + n)·q²) instead of O(m·n·min(m, n)). Same maths as the dense
  path, including the diagonal convention above; equal to it up to float32 rounding (tested).
- State: the merged weights (slot ``merged``, float32; factors on LoRA streams) and the scalars
  λ(t), Σ‖τi‖, the count, and the list of projected tensors; the kernels keep nothing between calls.
- ``alpha`` ≥ 1 protects nothing (r = 0): with ``zero_diagonal=false`` the step is then continual
  task arithmetic with adaptive scaling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from ..errors import ContMergeError
from .base import KeyInfo, LowRankInputs, Method, MethodParams, StepContext, StepStats, TensorInputs, TensorOutput
from .lowrank import EPS32, LowRank
from .opcm_kernels import gram_preferred, opcm_project, opcm_project_gram, project_factors_with_svd, sum_sq


class OPCMParams(MethodParams):
    alpha: float = Field(0.5, ge=0, description="fraction of τ̄'s spectrum (cumulative singular values) protected")
    zero_diagonal: bool = Field(True, description="also remove τt's components along τ̄'s own singular pairs")
    kernel: Literal["auto", "svd", "gram"] = Field(
        "auto",
        description="dense decomposition of τ̄: svd (thin float32 SVD), gram (float64 eigendecomposition of the "
        "smaller Gram matrix, τ̄'s U never formed), auto (gram for matrices at least twice as long as wide)",
    )


class OPCM(Method):
    name = "opcm"
    summary = "projects each new task vector orthogonally to the merged one (per linear weight), rescales to the mean norm"
    reference = "Tang et al. 2025, arXiv 2501.09522 (FusionBench method/opcm)"
    Params = OPCMParams
    two_pass = True
    lowrank = True
    needs_module_types = True

    def can_slice(self, info: KeyInfo) -> bool:
        return not info.linear  # an SVD needs the whole matrix; the plain rule is elementwise

    def whole_cost(self, info: KeyInfo) -> float:
        """The projection's cost in multiply-adds, as measured on one core (benchmarks/RESULTS.md, "Several
        ranks": 4096² by SVD 32.8 s; 11008×4096 and 32000×4096 by Gram 43.3 s and 73.7 s): a thin SVD
        ≈ 5.6·m·n·k, the Gram kernel ≈ m·n·k + 4.6·k³ (k = min(m, n)), plus the pass over its elements."""
        if len(info.shape) != 2:
            return super().whole_cost(info)
        (m, n), k = info.shape, min(info.shape)
        gram = self.params.kernel == "gram" or (self.params.kernel == "auto" and gram_preferred(info.shape))
        return (m * n * k + 4.6 * k**3 if gram else 5.6 * m * n * k) + super().whole_cost(info)

    def init_scalars(self) -> dict[str, Any]:
        # constant in T: the running sum of task-vector norms and their count give A = mean(norms)
        return {"lambda": 1.0, "norm_sum": 0.0, "count": 0, "projected": []}

    def merge(self, ctx: StepContext, x: TensorInputs) -> TensorOutput:
        if x.prev is None:
            return TensorOutput({"merged": x.item}, {"tau_sq": sum_sq(x.item, x.base)})  # θ1: the item's buffer is ours
        # τ̄ and τt in the buffers of prev and item (fresh, ours to overwrite); ‖τt‖² first
        tau_sq = sum_sq(x.item, x.base)
        projected = x.linear and x.item.dim() == 2
        # θ(t−1) was rounded to float32 when stored: τ̄ is known to eps32·‖θ(t−1)‖ (its numerical null space)
        noise = EPS32 * math.sqrt(sum_sq(x.prev["merged"])) if projected else 0.0
        tau_bar, tau = x.prev["merged"].sub_(x.base), x.item.sub_(x.base)
        diagonal: dict[str, float] = {}
        if projected:
            p = self.params
            if p.kernel == "gram" or (p.kernel == "auto" and gram_preferred(tuple(tau.shape))):
                tau = opcm_project_gram(tau_bar, tau, p.alpha, p.zero_diagonal, inplace=True, stats=diagonal, noise=noise)
            else:
                tau = opcm_project(tau_bar, tau, p.alpha, p.zero_diagonal, diagonal="resolved", stats=diagonal, noise=noise)
        # pass 1: the unscaled task vector, built in τ̄'s buffer (whole 7B matrices: one temporary fewer)
        unscaled = tau_bar.mul_(float(ctx.scalars["lambda"])).add_(tau)
        del tau  # the SVD route's projection is a buffer of its own: gone before the norm is taken
        return TensorOutput({"merged": unscaled},
                            {"tau_sq": tau_sq, "unscaled_sq": sum_sq(unscaled), **_projected(projected, tau_sq, diagonal)},
                            {"projected": True} if projected else {})

    def lowrank_key(self, info: KeyInfo) -> bool:
        return True  # any matrix: linear weights are projected, the others (embeddings) take the plain rule

    # The carried factors are always in SVD form (U·s, Vh): ``finish_lowrank`` writes them so, so
    # the next step reads τ̄'s SVD off them instead of recomputing it (no QR of the factors).
    def merge_lowrank(self, ctx: StepContext, x: LowRankInputs) -> TensorOutput:
        if x.prev is None:
            return TensorOutput({"merged": x.tau}, {"tau_sq": x.tau.norm_sq()})
        tau_bar, tau = x.prev["merged"], x.tau
        diagonal: dict[str, float] = {}
        if x.linear:
            u, s, vh = tau_bar.svd_of_svd_form()
            tau = LowRank(*project_factors_with_svd((tau.left, tau.right), u, s, vh, self.params.alpha, self.params.zero_diagonal,
                                                    stats=diagonal))
        lam = float(ctx.scalars["lambda"])
        unscaled = LowRank(torch.cat([lam * tau_bar.left, tau.left], 1), torch.cat([tau_bar.right, tau.right], 0)).compressed()[0]
        # pass 1: the unscaled task vector, SVD form, numerical rank
        tau_sq = x.tau.norm_sq()
        return TensorOutput({"merged": unscaled}, {"tau_sq": tau_sq, "unscaled_sq": unscaled.norm_sq_of_svd_form(),
                                                   **_projected(x.linear, tau_sq, diagonal)},
                            {"projected": True} if x.linear else {})

    def end_pass(self, ctx: StepContext, stats: StepStats) -> dict[str, Any]:
        scalars = ctx.scalars
        norm_sum, count = scalars["norm_sum"] + math.sqrt(stats.sums.get("tau_sq", 0.0)), scalars["count"] + 1
        lam = 1.0
        if ctx.step > 1:
            mean_norm = norm_sum / count
            if mean_norm == 0.0:
                raise ContMergeError("opcm: every task vector so far is zero (the stream items equal the base).")
            lam = math.sqrt(stats.sums.get("unscaled_sq", 0.0)) / mean_norm
            if lam == 0.0:
                raise ContMergeError(f"opcm: the merged task vector vanished at step {ctx.step}; nothing to rescale.")
        projected = sorted(key for key, notes in stats.notes.items() if notes.get("projected"))
        sums = stats.sums
        kept_share = sums.get("diagonal_kept_sq", 0.0) / sums["projected_tau_sq"] if sums.get("projected_tau_sq") else 0.0
        return {"lambda": lam, "norm_sum": norm_sum, "count": count, "projected": projected,
                "diagonal_kept": int(sums.get("diagonal_kept", 0)), "diagonal_kept_share": kept_share,
                "diagonal_null": int(sums.get("diagonal_null", 0))}

    def finish(self, ctx: StepContext, base: Tensor, slots: dict[str, Tensor]) -> dict[str, Tensor]:
        if ctx.step == 1:
            return slots
        # in the first pass's buffer (ours, see Method): the same bits as base + unscaled / λ, one copy less
        return {"merged": slots["merged"].div_(ctx.scalars["lambda"]).add_(base)}

    def finish_lowrank(self, ctx: StepContext, slots: dict[str, LowRank]) -> dict[str, LowRank]:
        if ctx.step == 1:
            return {"merged": slots["merged"].compressed()[0]}  # θ1 − θ0 exactly, in SVD form
        return {"merged": slots["merged"].scaled(1.0 / ctx.scalars["lambda"])}  # a scaling keeps SVD form

    def step_summary(self, scalars: Mapping[str, Any]) -> dict[str, Any]:
        return {"lambda": round(scalars["lambda"], 6), "projected": len(scalars["projected"]),
                "diagonal_kept": scalars.get("diagonal_kept", 0),
                "diagonal_kept_share": float(f"{scalars.get('diagonal_kept_share', 0.0):.3g}"),
                "diagonal_null": scalars.get("diagonal_null", 0)}


def _projected(projected: bool, tau_sq: float, diagonal: dict[str, float]) -> dict[str, float]:
    """Statistics of a projected weight: ‖τt‖² and the diagonal entries the kernel left in place."""
    return {"projected_tau_sq": tau_sq, **diagonal} if projected else {}
