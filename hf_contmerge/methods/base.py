"""What a continual merging method tells the engine, and nothing more: the method contract.

A method is a set of kernels that are functions of their arguments, plus a description. The
object holds its validated, immutable ``params`` and nothing else: everything a kernel needs
arrives in its arguments, so a method object may be re-created between any two calls (the tests
do) and a step may later be split over several processes.

Description (class attributes):

- ``Params``: a frozen pydantic model (names and defaults as in METHODS.md; validation there).
- ``slots``: the float32 tensors carried from step to step for each merged tensor (the running
  merged weights, MagMax's max-magnitude task vector, …). The engine stores them with the step,
  so a resume, or a later run from a published step, continues exactly.
- ``elementwise``: kernels may get dim-0 slices of a tensor (:meth:`Method.can_slice` refines it
  per tensor). ``two_pass``: the step needs a global quantity over all tensors (OPCM's λ): see below.
- ``lowrank``: the method has a factored form for LoRA streams (see below).
- ``needs_module_types``: kernels need to know which tensors are linear weights (``KeyInfo.linear``,
  decided from the module types of the base built on the meta device, never from tensor rank).
- ``calibration``: the statistics of forward/backward passes the method needs at every step
  (:class:`CalibrationRequest`); they arrive per tensor in ``TensorInputs.extra`` and as scalars in
  ``StepContext.calibration``. Empty for the data-free methods.
- ``interpretation`` / ``experimental``: shown in ``--help``, ``hf-contmerge methods`` and the card.

Kernels (all tensors float32, on ``ctx.device``):

- ``merge(ctx, inputs) -> TensorOutput``: the new slots of one tensor, or of one dim-0 slice of it,
  from the base tensor, the new item's tensor and the previous slots (``None`` at step 1), plus the
  statistics the step sums over all tensors (``stats``, summed in plan order) and notes about the
  tensor (``notes``, handed to ``end_pass`` by key). ``inputs.item`` and ``inputs.prev``'s tensors
  are fresh buffers a kernel may overwrite (whole 7B matrices: one copy less each); ``inputs.base``
  must stay as it is.
- ``end_pass(ctx, stats) -> scalars``: the carried scalars after the step, from the ones carried in
  (``ctx.scalars``) and the step's summed statistics and notes.
- ``finish(ctx, base, slots) -> slots`` (``two_pass`` only): the engine stores the first pass's
  slots, calls ``end_pass``, then ``finish`` on every tensor with the new scalars in ``ctx``; the
  first-pass slots it gets are fresh buffers it may overwrite.
- ``weight(ctx, base, slots) -> Tensor``: the merged weight to publish, from the final slots.
- ``after(ctx, key, shape, prev, extra) -> slots`` (methods with ``after_slots``): once the step's
  weights are written, the engine calibrates the merged model θ(t) (``CalibrationRequest(model=
  "merged")``) and streams every merged tensor once more: the ``after_slots`` from their previous
  values and those statistics (BECAME's accumulated Fisher of the merged models).
- Low-rank form: for tensors where ``lowrank_key`` holds and every task vector so far is low-rank
  (LoRA streams), the engine passes task vectors and slots as :class:`~hf_contmerge.methods.lowrank.LowRank`
  factors, slot values being deltas from the base tensor (dense slot = ``base + L @ R``), to
  ``merge_lowrank`` / ``finish_lowrank`` / ``weight_lowrank``. They must give the same results as the
  dense kernels up to float32 rounding; ``weight`` then sees the dense slot rows ``base + L @ R``.

``ctx.scalars`` are the scalars carried in from the previous step (``init_scalars`` at step 1)
during the first pass, and the scalars ``end_pass`` returned during ``finish`` and the weights
written with it. Scalars are JSON-able; they are written to ``contmerge_state.json``.

The engine knows the order, the step counter, I/O, devices and state files; a method knows none of
them. That is what lets a new method be one small file (registered by one line in ``registry.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from .lowrank import LowRank


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown names are errors, values are immutable and finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# The ranks' cost model (``engine/plan.unit_cost``) counts work in float32 multiply-adds of a matrix
# product (about 86 ps each on one core of the machine of benchmarks/RESULTS.md, "Several ranks");
# one element of a memory-bound pass (read the inputs, merge, convert, write) costs about 250 of them
# there (a task-arithmetic step: ~21 ns per parameter).
ELEMENT_COST = 250.0

@dataclass(frozen=True)
class CalibrationRequest:
    """A statistic a method needs at each step (from step ``from_step`` on).

    ``statistic``: the name it arrives under (``TensorInputs.extra[statistic]`` per tensor, float32,
    by the tensor's file name; scalars in ``StepContext.calibration``). ``model``: whose forward and
    backward passes give it, on the new item's task data: ``item`` (θt, the new fine-tune) or
    ``previous`` (θ(t−1), the merged model so far), computed before the step's tensor pass; or
    ``merged`` (θ(t), the step just written), computed after it, for the ``after_slots``.

    With ``learn`` (a :class:`~hf_contmerge.calibration.learned.LearnSpec`) the request is not a
    Fisher but learned merge coefficients (DivMerge, TRM): they arrive as scalars
    (``StepContext.calibration["NAME@GROUP"]``); ``model`` is then ``item``.
    """

    statistic: str
    model: Literal["item", "previous", "merged"]
    fisher: Literal["per_sample", "batch"] = "per_sample"  # for a diagonal Fisher: which estimator
    from_step: int = 1
    to_step: int | None = None  # the last step it is needed at (None: every step from from_step)
    learn: Any = None  # a LearnSpec: learned coefficients instead of a Fisher


@dataclass(frozen=True)
class KeyInfo:
    """What a method may know about a tensor before any of it is read."""

    key: str
    shape: tuple[int, ...]
    linear: bool = False  # the 2-D weight of an nn.Linear / Conv1D module (needs_module_types methods)


@dataclass(frozen=True)
class StepContext:
    """What every kernel of a step gets: the step (1-based), the carried scalars (see the module
    docstring for which), the device, and scalar calibration results."""

    step: int
    scalars: Mapping[str, Any]
    device: torch.device = torch.device("cpu")
    calibration: Mapping[str, float] = field(default_factory=dict)


@dataclass
class TensorInputs:
    """One tensor, or its dim-0 rows ``rows``, as ``merge`` gets it (float32, on the step's device)."""

    key: str
    shape: tuple[int, ...]  # the whole tensor's shape
    rows: tuple[int, int] | None  # the slice being merged, None for the whole tensor
    base: Tensor | None  # None only for a method that declares needs_base = False (and may still get it)
    item: Tensor
    prev: dict[str, Tensor] | None
    linear: bool = False
    extra: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass
class LowRankInputs:
    """One factored tensor as ``merge_lowrank`` gets it: the item's task vector and the previous
    slots as deltas from the base, all :class:`LowRank`."""

    key: str
    shape: tuple[int, ...]
    tau: LowRank
    prev: dict[str, LowRank] | None
    linear: bool = False
    extra: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass
class TensorOutput:
    """What ``merge`` returns: the new slots, sums for the step's statistics, notes for ``end_pass``."""

    slots: dict[str, Any]  # Tensor, or LowRank from merge_lowrank
    stats: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepStats:
    """A pass's statistics: ``sums`` over every tensor and slice, added in plan order (so the result
    does not depend on how the work is split), and ``notes`` by tensor key, in plan order."""

    sums: dict[str, float] = field(default_factory=dict)
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, key: str, out: TensorOutput) -> None:
        for name, value in out.stats.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        if out.notes:
            self.notes.setdefault(key, {}).update(out.notes)


class Method:
    """Base of every method; see the module docstring for the contract."""

    name: ClassVar[str]
    summary: ClassVar[str]
    reference: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    slots: ClassVar[tuple[str, ...]] = ("merged",)
    elementwise: ClassVar[bool] = True
    two_pass: ClassVar[bool] = False
    lowrank: ClassVar[bool] = False  # implements merge_lowrank (and finish_lowrank if two_pass)
    needs_module_types: ClassVar[bool] = False
    calibration: ClassVar[tuple[CalibrationRequest, ...]] = ()
    # Slots computed after the step's weights are written, from statistics of the merged model θ(t)
    # (requests with ``model="merged"``): ``after`` gives each tensor's new value. The tensor passes
    # do not write them (a two-pass method may use their names for its first-pass scratch).
    after_slots: ClassVar[tuple[str, ...]] = ()
    # The slot whose value the published weight is (``weight`` returns it unchanged; the writer rounds it
    # to the output dtype): carried in a compact exact form over the published weights
    # (``artifacts/compact.py``). None: ``carried_weight_slot`` decides (``merged`` when ``weight`` is
    # not overridden).
    weight_slot: ClassVar[str | None] = None
    # Float32 slots that hold task-vector values as they came (differences of the stored models, exact
    # in float32 and with as few significant bits as the models' dtype): carried as compressed blocks
    # (``artifacts/compact.py``, ``--state-compression``), at a fraction of their 4 bytes for bf16 models.
    compressible_slots: ClassVar[tuple[str, ...]] = ()
    # Whether ``merge`` and ``weight`` read ``x.base`` / ``base``. When not, the engine reads the base only
    # where it must (the item lacks the tensor, or the base's fingerprint is still to be computed from
    # its bytes) and passes None otherwise.
    needs_base: ClassVar[bool] = True
    # Set when the implementation is an interpretation of the paper; shown in --help and the card.
    interpretation: ClassVar[str | None] = None
    experimental: ClassVar[bool] = False

    def __init__(self, params: MethodParams):
        self.params = params

    def can_slice(self, info: KeyInfo) -> bool:
        """Whether a tensor may be merged a dim-0 slice at a time (elementwise kernels)."""
        return self.elementwise

    def carried_weight_slot(self) -> str | None:
        """The slot the published weight is (``weight_slot``), if any: by default ``merged`` when the
        method has it and keeps the default ``weight``; None when ``weight`` computes something else."""
        if self.weight_slot is not None:
            return self.weight_slot
        return "merged" if "merged" in self.slots and type(self).weight is Method.weight else None

    def whole_cost(self, info: KeyInfo) -> float:
        """Work of merging one tensor this method does not slice (``can_slice`` False), in the units of the
        ranks' cost model (``engine/plan.unit_cost``: one element of a memory-bound pass counts
        ``ELEMENT_COST``): by default such a pass over the whole tensor (a per-tensor statistic, e.g.
        TIES's magnitude threshold)."""
        return ELEMENT_COST * math.prod(info.shape) if info.shape else ELEMENT_COST

    @property
    def whole_stream(self) -> bool:
        """Whether the method needs every stream item in one run (DivMerge's all-at-once form): the API's
        one-step-at-a-time ``step`` cannot run it."""
        return False

    def init_scalars(self) -> dict[str, Any]:
        return {}

    def step_summary(self, scalars: Mapping[str, Any]) -> dict[str, Any]:
        """What the lineage of this step should show (e.g. OPCM's λt); recorded in the state and card."""
        return {}

    def merge(self, ctx: StepContext, inputs: TensorInputs) -> TensorOutput:
        """New carried slots for one tensor (or slice), with statistics and notes."""
        raise NotImplementedError(f"{type(self).__name__} defines no merge kernel")

    def end_pass(self, ctx: StepContext, stats: StepStats) -> dict[str, Any]:
        """Carried scalars after the step, given the pass's summed statistics; unchanged by default."""
        return dict(ctx.scalars)

    def finish(self, ctx: StepContext, base: Tensor, slots: dict[str, Tensor]) -> dict[str, Tensor]:
        """Second pass of a ``two_pass`` method: final slots from the first-pass slots."""
        return slots

    def after(self, ctx: StepContext, key: str, shape: tuple[int, ...], prev: Mapping[str, Tensor] | None,
              extra: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The ``after_slots`` of one tensor (or dim-0 slice): from their previous values (None at step 1)
        and the merged model's statistics; ``ctx.scalars`` are the step's final scalars."""
        raise NotImplementedError(f"{self.name} declares after_slots but no after()")

    def weight(self, ctx: StepContext, base: Tensor, slots: dict[str, Tensor]) -> Tensor:
        """The published merged weight; by default the ``merged`` slot."""
        return slots["merged"]

    # ---------------------------------------------------------------- low-rank form (LoRA streams)
    def lowrank_key(self, info: KeyInfo) -> bool:
        """Whether a tensor's slots may be carried as low-rank factors (``lowrank`` methods)."""
        return False

    def merge_lowrank(self, ctx: StepContext, inputs: LowRankInputs) -> TensorOutput:
        """``merge`` on factors; the slots are :class:`LowRank` deltas from the base, the statistics the
        same sums as the dense ``merge`` would give."""
        raise NotImplementedError(f"{self.name} has no low-rank form")

    def finish_lowrank(self, ctx: StepContext, slots: dict[str, LowRank]) -> dict[str, LowRank]:
        """``finish`` on factors (two-pass methods)."""
        return slots

    def weight_lowrank(self, ctx: StepContext, slots: dict[str, LowRank]) -> LowRank:
        """The published weight's delta from the base, as factors (``--output-format adapter``);
        the counterpart of ``weight``, by default the ``merged`` slot."""
        return slots["merged"]
