"""DivMerge: merge coefficients learned by minimising the divergence of the merge from each fine-tune.

Touayouch et al. 2025, "DivMerge: A divergence-based model merging method for multi-tasking",
arXiv 2509.02108 (no public code). As in METHODS.md ("DivMerge"): label-free, each fine-tune is the
teacher on unlabeled inputs of its own task, and the coefficients Γ of θ = θ0 + Σt Γt ⊙ τt minimise

    Σt E_{x∈Xt} JS( p_θt(·|x) ‖ p_θ(·|x) )        (KL with divergence=kl)

computed in log-space (``calibration/divergence.py``); for a classifier over class distributions
with each task's own head, for a causal LM over the tokens of the teacher's greedy continuation
(``gen_tokens``). Γ is one scalar per model (``granularity=task``) or per model and layer group
(``layer``, the paper's better variant: each transformer block, the embeddings and the head are
groups, and the rest — final norms, poolers — one more, ``other``). Adam, lr 1e-2, 4 epochs, batches
of 4 samples of every task, init 0.5 (``calibration/learned.py`` runs it through the device map).

Two forms:

- ``form=continual`` (default) **[adaptation, not the paper's]**: at step t ≥ 2 learn
  θ(t) = θ0 + g_old·τ̄(t−1) + g_new·τt (τ̄(t−1) = θ(t−1) − θ0), per group, with teachers θt and
  θ(t−1), both on task t's inputs: the merge must keep answering like the merge so far and like
  the new fine-tune, and no past model or data is kept. Step 1 is θ1. ``buffer=N`` (0 by default:
  nothing of past tasks is kept) carries at most N past samples in the state (``contmerge_state/
  buffer/``: each input with its own fine-tune's output distribution, computed when that task was
  merged; an equal share per task, the first of each) and adds their divergence from the merge to
  the objective (one term, each past task's share equal), so old tasks are scored on their own
  inputs by their own teachers, through their own heads where the stream has a head per task. The
  samples are published with the step.
- ``form=all``: the paper's all-at-once merge of the stream's items, learned once at the first step
  of the run over every item (teachers each item on its own data; needs every item and its
  directions at once). Step t writes the partial sum θ0 + Σ_{i≤t} Γi ⊙ τi; the last step is the
  paper's merged model. The coefficients are carried in the state; a stream longer than the one
  they were learned over is refused.

Choices: θt is scored through its own output (its head, or the LM head); θ(t−1) through the
outputs it already served: the LM head, or with a head per task each past task's head (on task t's
inputs, the previous teacher's weight shared among them), so the old tasks' predictions are what
the merge must keep. The teachers' distributions are computed once per step and cached on disk in the step's
scratch folder (bounded by ``cache_bytes``); the data order is seeded by ``--seed`` and the step, so
a rerun and a resume are bit-identical. A merged tensor no student parameter covers (a fused file
tensor) takes its group's coefficient when the group was learned, else the initial value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from ..errors import ContMergeError
from .base import CalibrationRequest, Method, StepContext, TensorInputs, TensorOutput
from .learning import LearnedParams, LearnSpec, Term, layer_group
from .learning import learned_coefficients as _learned


class DivMergeParams(LearnedParams):
    form: Literal["continual", "all"] = Field("continual", description="continual (an adaptation: θ0 + g_old·τ̄(t−1) + "
                                              "g_new·τt at every step) or all (the paper's, over every item at once)")
    divergence: Literal["js", "kl"] = Field("js", description="divergence of the merge from each teacher")
    init: float = Field(0.5, description="initial value of every coefficient")
    buffer: int = Field(0, ge=0, description="form=continual: past samples (inputs and their fine-tune's outputs) kept in "
                        "the state and scored at every step, an equal share per task; published with the step; 0 keeps none")


class DivMerge(Method):
    name = "divmerge"
    summary = ("coefficients of the task vectors learned so that the merge's outputs stay close (JS/KL) to each "
               "fine-tune's on its own unlabeled inputs; needs --data")
    reference = "Touayouch et al. 2025, arXiv 2509.02108 (no public code)"
    Params = DivMergeParams
    interpretation = ("form=continual (the default) is an adaptation of the paper's all-at-once merge to a stream: "
                      "θ0 + g_old·τ̄(t−1) + g_new·τt learned at every step with teachers θt and θ(t−1) on task t's "
                      "inputs; form=all is the paper's")

    @property
    def calibration(self) -> tuple[CalibrationRequest, ...]:  # type: ignore[override]
        p = self.params
        common = p.optimisation()
        if p.form == "all":  # learned once, at step 1, over every item (directions and init per item: learned.py)
            spec = LearnSpec(anchor="base", directions=(), init=(p.init,), terms=(Term("item", p.divergence),), all_items=True,
                             **common)
            return (CalibrationRequest("coefficients", "item", from_step=1, to_step=1, learn=spec),)
        spec = LearnSpec(anchor="base", directions=(("old", "previous-base", 0), ("new", "item-base", 0)),
                         init=(p.init, p.init), terms=(Term("item", p.divergence), Term("previous", p.divergence)),
                         buffer=p.buffer, **common)
        # with a buffer, step 1 is calibrated too: its samples and θ1's outputs start the buffer
        return (CalibrationRequest("coefficients", "item", from_step=1 if p.buffer else 2, learn=spec),)

    @property
    def whole_stream(self) -> bool:
        return self.params.form == "all"

    def init_scalars(self) -> dict[str, Any]:
        return {"coefficients": {}}

    def _coefficient(self, learned: Mapping[str, float], name: str, key: str) -> float:
        return float(learned.get(f"{name}@{layer_group(key, self.params.granularity)}", self.params.init))

    def merge(self, ctx: StepContext, x: TensorInputs) -> TensorOutput:
        if self.params.form == "all":
            learned = ctx.calibration or ctx.scalars["coefficients"]
            if not any(k.startswith(f"task{ctx.step}@") for k in learned):
                raise ContMergeError(f"divmerge form=all learned its coefficients at step 1 over "
                                     f"{len({k.split('@')[0] for k in learned})} items; step {ctx.step} has none. Merge a "
                                     "longer stream in a new --out (or use form=continual).")
            c = self._coefficient(learned, f"task{ctx.step}", x.key)
            start = x.base if x.prev is None else x.prev["merged"]
            return TensorOutput({"merged": x.item.sub_(x.base).mul_(c).add_(start)})
        if x.prev is None:  # θ(1) = θ1
            return TensorOutput({"merged": x.item})
        old, new = self._coefficient(ctx.calibration, "old", x.key), self._coefficient(ctx.calibration, "new", x.key)
        tau = x.item.sub_(x.base)
        merged = x.prev["merged"].sub(x.base).mul_(old).add_(tau.mul_(new)).add_(x.base)
        return TensorOutput({"merged": merged})

    def end_pass(self, ctx: StepContext, stats) -> dict[str, Any]:
        if self.params.form == "all":
            return {"coefficients": _learned(ctx.calibration) or dict(ctx.scalars["coefficients"])}
        return {"coefficients": _learned(ctx.calibration)}
