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


def learned_coefficients(calibration: Mapping[str, Any]) -> dict[str, float]:
    """The learned coefficients (``NAME@GROUP``) among a step's calibration scalars, sorted, for the state."""
    return {k: float(v) for k, v in sorted(calibration.items()) if "@" in k}
