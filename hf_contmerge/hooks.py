"""The standard step hooks of a run, built from its options: evaluation on the ``--eval-data`` tasks
(``evaluation/``), a custom ``evaluate`` callable (the API), then the push to the Hub. Outside
``engine/`` because it names the subsystems that plug into the engine's hook seam."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .engine.hooks import EvaluationHook, PushHook, StepHook
from .engine.step import StepResult
from .hub.push import PushTarget
from .options import MergeOptions


def step_hooks(options: MergeOptions, evaluate: Callable[[StepResult], dict[str, Any]] | None = None,
               memory: dict[str, Any] | None = None) -> Sequence[StepHook]:
    """The hooks a run with these options has: evaluation on the ``--eval-data`` tasks (``--eval``;
    ``memory``: in-memory datasets of the API by their spec text), a custom ``evaluate`` callable, then the push."""
    hooks: list[StepHook] = []
    if options.eval:
        from .evaluation.hook import TaskEvaluationHook  # datasets, evaluate, matplotlib: only when asked

        hooks.append(TaskEvaluationHook(options, memory))
    if evaluate is not None:
        hooks.append(EvaluationHook(evaluate))
    target = PushTarget.from_options(options)
    if target is not None:
        hooks.append(PushHook(target, options.token_value(), options.out))
    return hooks
