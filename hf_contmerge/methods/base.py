"""What a continual merging method tells the engine, and nothing more.

A method is a pure per-tensor kernel plus a description:

- ``Params``: a frozen pydantic model (names and defaults as in METHODS.md; validation there).
- ``slots``: the float32 tensors it carries from step to step for each merged tensor (for example
  the running merged weights, or MagMax's running max-magnitude task vector). The engine stores
  them with the step, so a resume, or a later run from a published step, continues exactly.
- ``merge(step, base, item, prev, ctx)``: the new slots of one tensor (or one dim-0 slice of it
  when ``elementwise``), from the base tensor, the new stream item's tensor and the previous slots
  (``None`` at step 1). All float32, on the engine's device. ``item`` and ``prev``'s tensors are
  fresh buffers of their own: a kernel may overwrite them (whole 7B matrices: one copy less each),
  and ``stats`` then sees the overwritten buffers; ``base`` must stay as it is.
- ``weight(base, slots)``: the merged weight to publish, derived from the slots.
- Optional global pass: ``stats`` returns sums the engine adds up over all tensors of the step;
  if ``two_pass``, the engine stores the first-pass slots, calls ``end_pass`` with the sums and
  the carried scalars, then ``finish`` on every tensor to get the final slots (OPCM's global
  rescaling needs this); the first-pass slots ``finish`` gets are fresh buffers it may overwrite.
- Optional low-rank form (``lowrank``): for tensors where ``lowrank_key`` holds and every task
  vector so far is low-rank (LoRA streams), the engine passes task vectors and slots as
  :class:`~hf_contmerge.lowrank.LowRank` factors, slot values being deltas from the base tensor
  (dense slot = ``base + L @ R``), to ``merge_lowrank`` / ``stats_lowrank`` / ``finish_lowrank``.
  They must give the same results as the dense kernels up to float32 rounding; ``weight`` then sees
  the dense slot rows ``base + L @ R``.
- Scalars carried across steps (counters, norms) live in a JSON-able dict: ``init_scalars`` and
  ``end_pass`` update it; it is written to ``contmerge_state.json``.

The engine knows the order, the step counter, I/O, devices and state files; a method knows none of
them. That is what lets a new method be one small file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from ..lowrank import LowRank


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown names are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class TensorContext:
    """What a kernel may know about the tensor it is merging."""

    key: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None  # the dim-0 slice being merged, None for the whole tensor


class Method(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    reference: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    slots: ClassVar[tuple[str, ...]] = ("merged",)
    elementwise: ClassVar[bool] = True
    two_pass: ClassVar[bool] = False
    needs_data: ClassVar[bool] = False
    lowrank: ClassVar[bool] = False  # implements merge_lowrank (and finish_lowrank if two_pass)
    # Set when the implementation is an interpretation of the paper; shown in --help and the card.
    interpretation: ClassVar[str | None] = None
    experimental: ClassVar[bool] = False

    def __init__(self, params: MethodParams):
        self.params = params

    def bind(self, base_config: dict[str, Any]) -> None:
        """Called once, after the pre-flight, with the base model's config (``config.json`` as a dict).

        For methods that need to know the model (OPCM finds the linear weights from module types).
        """

    def can_slice(self, key: str) -> bool:
        """Whether tensor ``key`` may be merged a dim-0 slice at a time (elementwise kernels)."""
        return self.elementwise

    def init_scalars(self) -> dict[str, Any]:
        return {}

    def start_step(self, step: int, scalars: dict[str, Any]) -> None:
        """Called before the first pass of each step with the scalars carried from the last one."""

    def step_summary(self, scalars: dict[str, Any]) -> dict[str, Any]:
        """What the lineage of this step should show (e.g. OPCM's λt); recorded in the state and card."""
        return {}

    @abstractmethod
    def merge(self, step: int, base: Tensor, item: Tensor, prev: dict[str, Tensor] | None, ctx: TensorContext) -> dict[str, Tensor]:
        """New carried slots for one tensor (or slice) at ``step`` (1-based)."""

    def weight(self, base: Tensor, slots: dict[str, Tensor]) -> Tensor:
        """The published merged weight; by default the ``merged`` slot."""
        return slots["merged"]

    def stats(self, step: int, base: Tensor, item: Tensor, prev: dict[str, Tensor] | None, new: dict[str, Tensor]) -> dict[str, float]:
        """Sums over all tensors that ``end_pass`` needs (e.g. squared norms); none by default."""
        return {}

    def end_pass(self, step: int, scalars: dict[str, Any], stats: dict[str, float]) -> dict[str, Any]:
        """Carried scalars after step ``step``, given the summed ``stats`` of its first pass."""
        return scalars

    def finish(self, step: int, base: Tensor, slots: dict[str, Tensor], scalars: dict[str, Any]) -> dict[str, Tensor]:
        """Second pass of a ``two_pass`` method: final slots from the first-pass slots."""
        return slots

    # ---------------------------------------------------------------- low-rank form (LoRA streams)
    def lowrank_key(self, key: str) -> bool:
        """Whether tensor ``key``'s slots may be carried as low-rank factors (``lowrank`` methods)."""
        return False

    def merge_lowrank(self, step: int, tau: LowRank, prev: dict[str, LowRank] | None, ctx: TensorContext) -> dict[str, LowRank]:
        """``merge`` on factors: ``tau`` is the item's task vector, ``prev`` the slots as deltas from the base."""
        raise NotImplementedError(f"{self.name} has no low-rank form")

    def stats_lowrank(self, step: int, tau: LowRank, prev: dict[str, LowRank] | None, new: dict[str, LowRank]) -> dict[str, float]:
        """``stats`` on factors; the same sums as the dense ``stats`` would give."""
        return {}

    def weight_lowrank(self, slots: dict[str, LowRank]) -> LowRank:
        """The published weight's delta from the base, as factors (``--output-format adapter``);
        the counterpart of ``weight``, by default the ``merged`` slot."""
        return slots["merged"]

    def finish_lowrank(self, step: int, slots: dict[str, LowRank], scalars: dict[str, Any]) -> dict[str, LowRank]:
        """``finish`` on factors (two-pass methods)."""
        return slots
