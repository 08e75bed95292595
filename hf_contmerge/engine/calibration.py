"""The seam where data-dependent methods get their statistics: a :class:`Calibrator`.

A method declares what it needs at every step (``Method.calibration``: statistics of the new
fine-tune or of the merged model so far, e.g. diagonal Fishers). Before the step's tensor pass the
engine asks the run's calibrator for them; per-tensor statistics come back as a
:class:`~hf_contmerge.io.checkpoint.TensorIndex` per statistic (float32, keyed by the base's file
names, read a tensor or a row range at a time like any checkpoint) and reach the kernels in
``TensorInputs.extra``; scalars reach them in ``StepContext.calibration``. The streaming tensor pass
stays the one writer of weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..io.checkpoint import TensorIndex
from ..methods.base import CalibrationRequest
from ..sources.resolve import ResolvedSource


@dataclass
class Calibrated:
    """One step's calibration results: per-tensor statistics by name, and scalars by name."""

    tensors: Mapping[str, TensorIndex] = field(default_factory=dict)
    scalars: Mapping[str, float] = field(default_factory=dict)
    record: Mapping[str, Any] = field(default_factory=dict)  # what the state and card say went in (data, samples)
    keep: Mapping[str, Path] = field(default_factory=dict)  # folders the step keeps as contmerge_state/NAME (a buffer)


class Calibrator(Protocol):
    def prepare(self, steps: Mapping[int, ResolvedSource], base: ResolvedSource) -> None:
        """Check (and may load) what the steps to come need, before any is written; raise to refuse."""
        ...

    def calibrate(self, step: int, requests: tuple[CalibrationRequest, ...], *, base: ResolvedSource,
                  item: ResolvedSource, previous_step: Path | None, key_map: Mapping[str, str], scratch: Path,
                  later: Sequence[tuple[int, ResolvedSource, Mapping[str, str]]] = ()) -> Calibrated:
        """The statistics ``requests`` ask for at ``step``; ``item`` is the new fine-tune, ``previous_step``
        the folder of the merged model so far (None at step 1). ``key_map``: the item's file name of every
        merged output tensor -> that output name (what the statistics are keyed by). ``scratch``: a new
        folder inside the partial step for files the statistics need (removed before it is published)."""
        ...
