"""Fisher merging, streamed: the Fisher-weighted average of every fine-tune so far.

Matena & Raffel 2022, "Merging Models with Fisher Weighting" (NeurIPS), arXiv 2111.09832; streamed
as in METHODS.md ("Fisher merging"):

    F̃i = max(Fi, 1e-6)                       (elementwise; Fi the diagonal Fisher of θi on task i's data)
    SF(t) = SF(t−1) + F̃t,   SFθ(t) = SFθ(t−1) + F̃t·θt
    θ(t) = SFθ(t) / SF(t)                     (θ(1) = θ1)

The two running sums are the carried slots (float32, model-sized: constant in T); no past model or
Fisher is kept. Choices:

- [choice] Fi is the expected squared gradient of the log-likelihood of the model's own predicted
  label (``calibration/fisher.py``), per sample by default; ``--set fisher=batch`` takes BECAME's
  batch approximation instead (one backward pass per batch).
- [choice] The floor 1e-6 makes an entry that no task's data touches a plain average, not 0/0.
- The Fisher of a classifier fine-tune is taken with its own head; the head is kept apart (not
  merged) and only merged tensors are weighted. A merged tensor the Fisher does not cover (a module
  the item lacks, a fused tensor without a 1:1 in-memory parameter) gets the floor: that item
  counts with the same small weight everywhere in it. Integer buffers are copied from the base as
  by every method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field
from torch import Tensor

from .base import CalibrationRequest, Method, MethodParams, StepContext, StepStats, TensorInputs, TensorOutput

FLOOR = 1e-6


class FisherParams(MethodParams):
    fisher: Literal["per_sample", "batch"] = Field(
        "per_sample", description="per_sample: mean of squared per-sample gradients; batch: BECAME's batch approximation")


class FisherMerge(Method):
    name = "fisher"
    summary = "Fisher-weighted average of the fine-tunes so far (running sums ΣF, ΣF·θ); needs --data"
    reference = "Matena & Raffel 2022 (NeurIPS), arXiv 2111.09832; streamed as in METHODS.md"
    Params = FisherParams
    slots = ("sum_f", "sum_f_theta")

    @property
    def calibration(self) -> tuple[CalibrationRequest, ...]:  # type: ignore[override]
        return (CalibrationRequest("fisher", "item", self.params.fisher),)

    def merge(self, ctx: StepContext, x: TensorInputs) -> TensorOutput:
        fisher = x.extra.get("fisher")
        weight = fisher.clamp_min(FLOOR) if fisher is not None else x.item.new_full(x.item.shape, FLOOR)
        stats = {"elements": float(x.item.numel()), "covered": 0.0 if fisher is None else float(fisher.numel())}
        if x.prev is None:
            return TensorOutput({"sum_f": weight, "sum_f_theta": x.item.mul_(weight)}, stats)
        sum_f = x.prev["sum_f"].add_(weight)
        return TensorOutput({"sum_f": sum_f, "sum_f_theta": x.prev["sum_f_theta"].add_(x.item.mul_(weight))}, stats)

    def end_pass(self, ctx: StepContext, stats: StepStats) -> dict[str, Any]:
        elements = stats.sums.get("elements", 0.0)
        return {"fisher_covered": stats.sums.get("covered", 0.0) / elements if elements else 0.0}

    def step_summary(self, scalars: Mapping[str, Any]) -> dict[str, Any]:
        return {"fisher_covered": round(scalars.get("fisher_covered", 0.0), 6)}

    def weight(self, ctx: StepContext, base: Tensor, slots: dict[str, Tensor]) -> Tensor:
        # θ(1) = F̃·θ1 / F̃: θ1 within one float32 rounding, so exactly θ1 once written in bf16/fp16
        return slots["sum_f_theta"] / slots["sum_f"]
