"""Continual task arithmetic.

    τt = θt − θ0
    θ(1) = θ0 + λ·τ1
    θ(t) = θ(t−1) + λ·τt                      (t ≥ 2)

so θ(T) = θ0 + λ·Σt τt. ``scaling`` λ defaults to 0.3. Reference: Ilharco et al. 2023, "Editing
models with task arithmetic" (ICLR); continual form as in Tang et al. 2025 (arXiv 2501.09522).
"""

from __future__ import annotations

from pydantic import Field

from .base import Method, MethodParams, StepContext, TensorInputs, TensorOutput


class TaskArithmeticParams(MethodParams):
    scaling: float = Field(0.3, gt=0, description="λ, the weight of each task vector")


class TaskArithmetic(Method):
    name = "task_arithmetic"
    summary = "adds λ·(θt − θ0) for every new fine-tune"
    reference = "Ilharco et al. 2023 (ICLR), arXiv 2212.04089; continual form as in arXiv 2501.09522"
    Params = TaskArithmeticParams

    def merge(self, ctx: StepContext, x: TensorInputs) -> TensorOutput:
        start = x.base if x.prev is None else x.prev["merged"]
        # in the item's buffer (ours, see Method): the same bits as start + λ·(θt − θ0), no temporaries
        return TensorOutput({"merged": x.item.sub_(x.base).mul_(self.params.scaling).add_(start)})
