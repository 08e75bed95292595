"""Continual weight averaging.

    θ(1) = θ1
    θ(t) = ((t − 1)·θ(t−1) + θt) / t          (t ≥ 2)

so θ(T) is the plain mean of the T fine-tunes (the base contributes nothing), computed as a running
mean over a float32 carried state. Reference: the "Weight Averaging" baseline of Wortsman et al.
2022 (model soups) in its continual form, as used by Tang et al. 2025 (OPCM, arXiv 2501.09522).
"""

from __future__ import annotations

from .base import Method, StepContext, TensorInputs, TensorOutput


class Average(Method):
    name = "average"
    summary = "running mean of the fine-tunes: θ(t) = ((t−1)·θ(t−1) + θt)/t"
    reference = "Wortsman et al. 2022 (model soups); continual form as in Tang et al. 2025, arXiv 2501.09522"
    needs_base = False  # the base contributes nothing: a step reads the new model and the carried mean

    def merge(self, ctx: StepContext, x: TensorInputs) -> TensorOutput:
        if x.prev is None:
            return TensorOutput({"merged": x.item})  # θ1 itself: the item's buffer is ours (see Method)
        # in the previous slot's buffer (ours, see Method): the same bits as ((t − 1)·θ(t−1) + θt)/t, no temporaries
        return TensorOutput({"merged": x.prev["merged"].mul_(ctx.step - 1).add_(x.item).div_(ctx.step)})
