"""What a method that learns its merge coefficients asks for (DivMerge, TRM): the contract's half.

A method declares a :class:`LearnSpec` in a ``CalibrationRequest(learn=...)``; the calibrator
(``calibration/learned.py``) learns the coefficients and hands them to the kernels as scalars
``NAME@GROUP``, the group of each tensor given by :func:`layer_group` on both sides.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from .base import MethodParams

Divergence = Literal["js", "kl"]
Direction = Literal["item-base", "previous-base", "item-previous"]
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_group(key: str, granularity: Literal["task", "layer"]) -> str:
    """The coefficient group of a merged tensor (by its output name): ``all`` at task level; at layer
    level ``layer.N`` for transformer block N, ``embeddings`` (token/position embeddings), ``head``
    (an LM head, a merged classifier) and ``other`` (final norms, poolers)."""
    if granularity == "task":
        return "all"
    match = _BLOCK.search(key)
    if match:
        return f"layer.{int(match.group(1))}"
    if any(part in key for part in ("embed", "wte.", "wpe.")):
        return "embeddings"
    if key.startswith(("lm_head.", "classifier.", "score.", "head.")) or ".head." in key:
        return "head"
    return "other"


@dataclass(frozen=True)
class Term:
    """One teacher the student is pulled towards, on task t's inputs: θt (``item``) or θ(t−1) (``previous``)."""

    teacher: Literal["item", "previous"]
    divergence: Divergence = "js"
    weight: float = 1.0


@dataclass(frozen=True)
class LearnSpec:
    """What a method asks the calibrator to learn (see the module docstring). ``directions``:
    (coefficient name, direction, task) with ``task`` the index of the task whose item the direction
    uses (0 for the continual forms; each item of the stream for DivMerge's all-at-once form)."""

    anchor: Literal["base", "previous"]
    directions: tuple[tuple[str, Direction, int], ...]
    init: tuple[float, ...]
    granularity: Literal["task", "layer"]
    terms: tuple[Term, ...]
    saturation_weight: float = 0.0
    saturation_threshold: float = 0.9
    lr: float = 1e-2
    epochs: int = 4
    batch_per_task: int = 4
    gen_tokens: int = 16
    cache_bytes: int = 4 * 10**9
    init_became: bool = False  # the first coefficient starts at a BECAME λ* of θt against θ(t−1) (TRM)
    all_items: bool = False  # one task per stream item (DivMerge's all-at-once form)
    buffer: int = 0  # past samples (inputs and their teacher's outputs) carried in the state and scored too


def learned_coefficients(calibration: Mapping[str, Any]) -> dict[str, float]:
    """The learned coefficients (``NAME@GROUP``) among a step's calibration scalars, sorted, for the state."""
    return {k: float(v) for k, v in sorted(calibration.items()) if "@" in k}


class LearnedParams(MethodParams):
    """The optimisation parameters every learned-coefficient method shares (METHODS.md's DivMerge values)."""

    granularity: Literal["task", "layer"] = Field("layer", description="one coefficient per direction, or per direction "
                                                  "and layer group")
    lr: float = Field(1e-2, gt=0, description="Adam learning rate")
    epochs: int = Field(4, ge=0, description="passes over the calibration samples")
    batch_per_task: int = Field(4, ge=1, description="samples of every task in a batch")
    gen_tokens: int = Field(16, ge=1, description="causal LMs: tokens of each teacher's greedy continuation scored")
    cache_bytes: int = Field(4 * 10**9, ge=1, description="most bytes of cached teacher outputs per step")

    def optimisation(self) -> dict[str, Any]:
        """These parameters as :class:`LearnSpec` fields."""
        return {name: getattr(self, name) for name in LearnedParams.model_fields}
