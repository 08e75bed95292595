"""BECAME: a Bayesian, Fisher-weighted closed-form coefficient for each new fine-tune.

Li et al. 2025, "BECAME: BayEsian Continual Learning with Adaptive Model MErging", arXiv 2504.02666;
official code ``GPM-based/fisher.py`` and ``train_util.py`` (upstream "Code init", 2025-07-04). As in
METHODS.md ("BECAME merge"), for a stream of published fine-tunes:

    step 1:   θ(1) = θ1;   F̄(1) = Fisher(θ(1), X1)
    step t:   δ = θt − θ(t−1)
              λ* = Σ Fnew·δ² / Σ (Fnew + F̄(t−1))·δ²        (one global scalar, sums over every merged entry)
              θ(t) = θ(t−1) + λ*·δ
              F̄(t) = Fisher(θ(t), Xt) + γ·F̄(t−1)

with Fnew the diagonal Fisher of θt on task t's inputs Xt. λ* minimises the quadratic surrogate
``(1−λ)²·δᵀFnew δ + λ²·δᵀF̄ δ`` (tested against a line search). The state is θ(t) and F̄(t), two
float32 model-sized slots: no past model, Fisher or data is kept. λ*, and its two sums, are recorded
for each step in the state and card.

Choices, and where this differs from the official code:

- [choice] θold = θ(t−1) and θnew = θt (the paper merges inside one training run: stage-1 and stage-2
  weights of the same task; here the new weights are a published fine-tune of the base).
- [choice] The Fisher is the official one, the "true" diagonal Fisher with the model's own argmax
  prediction as target, in its batch form (squared gradient of the batch-mean log-likelihood, times
  the batch size, over N: ``--set fisher=batch``, the default here); ``fisher=per_sample`` is the exact
  per-sample estimator. Unlike the official code, the model is in eval mode (dropout off), so the
  Fisher is a function of the weights and data alone.
- [choice] Task heads kept apart by the pre-flight are not merged and not in λ*'s sums (the official
  NSCL variant leaves the head out too); the Fisher of a classifier is taken with its own head.
- A merged tensor the Fisher does not cover (no 1:1 in-memory parameter) has Fnew = 0 there: it adds
  nothing to either sum and is merged with the global λ*. If every δ is zero where a Fisher is non-zero
  (``Σ (Fnew + F̄)·δ² = 0``), λ* = 0: θ(t) = θ(t−1).
- γ (``gamma``, default 1.0) discounts the accumulated Fisher; 1.0 is the paper's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from .base import CalibrationRequest, Method, MethodParams, StepContext, StepStats, TensorInputs, TensorOutput


class BecameParams(MethodParams):
    fisher: Literal["per_sample", "batch"] = Field("batch", description="Fisher estimator: batch (the official code's) "
                                                   "or per_sample")
    gamma: float = Field(1.0, ge=0, description="γ: F̄(t) = Fisher(θ(t)) + γ·F̄(t−1)")


class Became(Method):
    name = "became"
    summary = "θ(t−1) + λ*·(θt − θ(t−1)), λ* the closed-form Fisher-weighted coefficient; F̄ accumulated; needs --data"
    reference = "Li et al. 2025, arXiv 2504.02666 (official code GPM-based/fisher.py)"
    Params = BecameParams
    two_pass = True
    # pass 1 keeps its scratch in the slot files: "merged" holds δ, "fisher_bar" holds θ(t−1) (see finish)
    slots = ("merged", "fisher_bar")
    after_slots = ("fisher_bar",)
    weight_slot = "merged"  # weight() publishes θ(t) as it is

    @property
    def calibration(self) -> tuple[CalibrationRequest, ...]:  # type: ignore[override]
        return (CalibrationRequest("fisher", "item", self.params.fisher, from_step=2),
                CalibrationRequest("fisher_merged", "merged", self.params.fisher))

    def init_scalars(self) -> dict[str, Any]:
        return {"lambda": 1.0, "numerator": 0.0, "denominator": 0.0}

    def merge(self, ctx: StepContext, x: TensorInputs) -> TensorOutput:
        if x.prev is None:  # θ(1) = θ1 (the scratch slots hold it twice; finish keeps one)
            return TensorOutput({"merged": x.item, "fisher_bar": x.item})
        prev, fisher_bar = x.prev["merged"], x.prev["fisher_bar"]
        delta = x.item.sub_(prev)  # in the item's buffer (ours, see Method)
        fnew = x.extra.get("fisher")
        sq = delta.square()
        numerator = float((fnew * sq).sum(dtype=torch.float64)) if fnew is not None else 0.0
        denominator = numerator + float((fisher_bar * sq).sum(dtype=torch.float64))
        return TensorOutput({"merged": delta, "fisher_bar": prev}, {"numerator": numerator, "denominator": denominator})

    def end_pass(self, ctx: StepContext, stats: StepStats) -> dict[str, Any]:
        if ctx.step == 1:
            return {"lambda": 1.0, "numerator": 0.0, "denominator": 0.0}
        num, den = stats.sums.get("numerator", 0.0), stats.sums.get("denominator", 0.0)
        return {"lambda": num / den if den > 0 else 0.0, "numerator": num, "denominator": den}

    def finish(self, ctx: StepContext, base: Tensor, slots: dict[str, Tensor]) -> dict[str, Tensor]:
        if ctx.step == 1:
            return {"merged": slots["merged"]}
        # θ(t) = θ(t−1) + λ*·δ, in the first pass's buffers (ours)
        return {"merged": slots["fisher_bar"].add_(slots["merged"].mul_(float(ctx.scalars["lambda"])))}

    def weight(self, ctx: StepContext, base: Tensor, slots: dict[str, Tensor]) -> Tensor:
        return slots["merged"]

    def after(self, ctx: StepContext, key: str, shape: tuple[int, ...], prev: Mapping[str, Tensor] | None,
              extra: Mapping[str, Tensor]) -> dict[str, Tensor]:
        fisher = extra.get("fisher_merged")
        if fisher is None:  # a tensor the Fisher does not cover
            fisher = torch.zeros(shape, device=ctx.device)
        if prev is None:
            return {"fisher_bar": fisher}
        return {"fisher_bar": fisher.add_(prev["fisher_bar"], alpha=self.params.gamma)}

    def step_summary(self, scalars: Mapping[str, Any]) -> dict[str, Any]:
        return {"lambda": round(scalars["lambda"], 6)}
