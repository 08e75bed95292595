"""MagMax: keep, per entry, the task-vector value of largest magnitude seen so far.

    τmax(1) = τ1
    τmax(t)[j] = τt[j] if |τt[j]| ≥ |τmax(t−1)[j]| else τmax(t−1)[j]
    θ(t) = θ0 + λ·τmax(t)

The carried state is the unscaled τmax; ``scaling`` λ (default 0.5) is applied only when the weight
is published, so changing λ does not change what is carried. Ties go to the newer model (≥).
τmax is carried compressed (``compressible_slots``): its values are task-vector entries as they came,
differences of two bfloat16 models with few significant bits, so zstd keeps ~0.4 of its 4 bytes.
Reference: Marczak et al. 2024, "MagMax: Leveraging Model Merging for Seamless Continual Learning"
(ECCV), arXiv 2407.06322.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from .base import Method, MethodParams, StepContext, TensorInputs, TensorOutput


class MagMaxParams(MethodParams):
    scaling: float = Field(0.5, gt=0, description="λ applied to the max-magnitude task vector")


class MagMax(Method):
    name = "magmax"
    summary = "per entry, the largest-magnitude task-vector value so far, scaled by λ"
    reference = "Marczak et al. 2024 (ECCV), arXiv 2407.06322"
    Params = MagMaxParams
    slots = ("tau_max",)
    compressible_slots = ("tau_max",)  # a selection of τt = θt − θ0: of bf16 models, ~0.4 of its 4 bytes

    def merge(self, ctx: StepContext, x: TensorInputs) -> TensorOutput:
        tau = x.item - x.base
        if x.prev is None:
            return TensorOutput({"tau_max": tau})
        old = x.prev["tau_max"]
        return TensorOutput({"tau_max": torch.where(tau.abs() >= old.abs(), tau, old)})

    def weight(self, ctx: StepContext, base: Tensor, slots: dict[str, Tensor]) -> Tensor:
        return base + self.params.scaling * slots["tau_max"]
