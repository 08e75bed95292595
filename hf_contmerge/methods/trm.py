"""TRM: the merge as an optimisation inside an augmented trajectory subspace (experimental).

Wang & Deng 2026, arXiv 2605.08311. Only the abstract is available: the merge phase becomes an
optimisation inside an *augmented trajectory subspace* with three objectives (task alignment,
prediction consistency, gradient responsiveness), storing no past data or models. Implemented as
METHODS.md ("TRM") specifies, every part of it an **[interpretation]**:

    subspace:   d1 = θt − θ(t−1),  d0 = τ̄(t−1) = θ(t−1) − θ0
    merged:     θ = θ(t−1) + c1,g·d1 + c0,g·d0        (coefficients per layer group g)
    init:       c1 = λ*, BECAME's coefficient of θt against θ(t−1) on task t's inputs; c0 = 0
    objective:  KL(p_θt ‖ p_θ)                          task alignment, on task t's inputs
              + beta  · KL(p_θ(t−1) ‖ p_θ)              prediction consistency, on the same inputs
              + gamma · relu(mean max_c p_θ(c|x) − saturation)   gradient responsiveness

optimised with Adam over task t's inputs (``calibration/learned.py``: the same differentiable merge,
device maps and seeded order as DivMerge). Step 1 is θ1.

Interpretation, part by part:

- The subspace uses d1 alone for the new task; the paper's successive checkpoint deltas of task t's
  training are not used (a stream item is one published checkpoint).
- λ* here weighs θt's Fisher against θ(t−1)'s on task t's inputs (batch form, both computed at this
  step); BECAME's accumulated Fisher of all past merges is not carried, so TRM stores nothing.
- Consistency is measured on task t's inputs through the outputs θ(t−1) already served: the LM's
  vocabulary, or with a head per task each past task's head (the weight ``beta`` shared among them).
- Responsiveness is a hinge on the student's mean max-probability above ``saturation`` (0.9): a
  saturated softmax has vanishing gradients, which the penalty keeps from happening.
- Groups are DivMerge's layer groups (``granularity=layer``) or one (``task``).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from .base import CalibrationRequest, Method, StepContext, TensorInputs, TensorOutput
from .learning import LearnedParams, LearnSpec, Term, layer_group
from .learning import learned_coefficients as _learned


class TRMParams(LearnedParams):
    beta: float = Field(1.0, ge=0, description="weight of prediction consistency, KL(p_θ(t−1) ‖ p_θ)")
    gamma: float = Field(0.1, ge=0, description="weight of gradient responsiveness (the saturation hinge)")
    saturation: float = Field(0.9, gt=0, le=1, description="mean max-probability above which predictions count as saturated")


class TRM(Method):
    name = "trm"
    summary = ("θ(t−1) + c1·(θt − θ(t−1)) + c0·τ̄(t−1), per layer, optimised for task alignment, prediction "
               "consistency and gradient responsiveness; needs --data")
    reference = "Wang & Deng 2026, arXiv 2605.08311 (abstract only; no public code)"
    Params = TRMParams
    experimental = True
    interpretation = ("Only the paper's abstract is available: the subspace {θt − θ(t−1), τ̄(t−1)}, the BECAME "
                      "initialisation, the three objectives (KL alignment, KL consistency through the outputs the previous "
                      "model served, a hinge on saturated predictions) and their weights are this implementation's reading of it")

    @property
    def calibration(self) -> tuple[CalibrationRequest, ...]:  # type: ignore[override]
        p = self.params
        terms = (Term("item", "kl", 1.0), *((Term("previous", "kl", p.beta),) if p.beta > 0 else ()))
        spec = LearnSpec(anchor="previous", directions=(("c1", "item-previous", 0), ("c0", "previous-base", 0)),
                         init=(0.0, 0.0), init_became=True, terms=terms, saturation_weight=p.gamma,
                         saturation_threshold=p.saturation, **p.optimisation())
        return (CalibrationRequest("coefficients", "item", from_step=2, learn=spec),)

    def init_scalars(self) -> dict[str, Any]:
        return {"coefficients": {}}

    def merge(self, ctx: StepContext, x: TensorInputs) -> TensorOutput:
        if x.prev is None:  # θ(1) = θ1
            return TensorOutput({"merged": x.item})
        group = layer_group(x.key, self.params.granularity)
        c1, c0 = (float(ctx.calibration.get(f"{n}@{group}", 0.0)) for n in ("c1", "c0"))
        prev = x.prev["merged"]
        d0 = prev.sub(x.base)
        merged = x.item.sub_(prev).mul_(c1).add_(prev).add_(d0.mul_(c0))
        return TensorOutput({"merged": merged})

    def end_pass(self, ctx: StepContext, stats) -> dict[str, Any]:
        return {"coefficients": _learned(ctx.calibration)}
