"""What happens around each step, outside the engine: step hooks, run in a fixed order.

A :class:`StepHook` is told the steps a run will write before anything is computed (``check``: refuse
early, e.g. a push target that is not ours), the steps an earlier run left (``start``, not in a dry
run), and every step once it is complete on disk (``after_step``, which may return an updated
result). :func:`step_hooks` builds the standard ones from the options, in the order that makes the
published card carry the scores: evaluate, then push. The engine runs whatever hooks it is given
and names none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..artifacts.folder import record_evaluation
from ..hub.push import PushTarget, check_target, commit_message, push_missing, push_step
from .step import StepResult


class StepHook:
    """Base of step hooks: every method is a no-op."""

    def check(self, steps: range) -> None:
        """Before anything is computed (also in a dry run): raise to refuse the run."""

    def start(self, done: list[int]) -> None:
        """Once the run will write, with the steps already complete in the output folder."""

    def before_publish(self, result: StepResult) -> StepResult:
        """The step is written in its partial folder (``result.folder``) and not yet in place: what the hook
        adds there (and to ``result.state``, rewritten with its card) is part of the step."""
        return result

    def after_step(self, result: StepResult) -> StepResult:
        """A step is complete on disk; return the result (updated if the step folder changed)."""
        return result


class EvaluationHook(StepHook):
    """Scores each step with ``evaluate(result) -> dict`` and records the scores in its state and card
    (``artifacts.folder.record_evaluation`` has the format)."""

    def __init__(self, evaluate: Callable[[StepResult], dict[str, Any]]):
        self.evaluate = evaluate

    def after_step(self, result: StepResult) -> StepResult:
        result.state = record_evaluation(result.folder, self.evaluate(result))
        return result


class PushHook(StepHook):
    """Publishes every step to the Hub as one commit (``hub/push.py``), after checking the target
    before anything is computed, and pushes what an earlier run computed but could not push."""

    def __init__(self, target: PushTarget, token: str | None, out: Path):
        self.target, self.token, self.out = target, token, out

    def check(self, steps: range) -> None:
        check_target(self.target, self.token, steps=steps)

    def start(self, done: list[int]) -> None:
        if done:  # steps computed earlier whose push failed: push them, never recompute
            push_missing(self.out, self.target, self.token, done)

    def after_step(self, result: StepResult) -> StepResult:
        push_step(result.folder, result.step, self.target, self.token, commit_message(result.state))
        return result
