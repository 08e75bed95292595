"""Step hooks: run in the given order, before anything is computed and after every complete step."""

from __future__ import annotations

from hf_contmerge.artifacts.state import read_state
from hf_contmerge.engine.hooks import EvaluationHook, PushHook, StepHook
from hf_contmerge.engine.run import Engine
from hf_contmerge.hooks import step_hooks
from hf_contmerge.options import MergeOptions


class Recording(StepHook):
    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def check(self, steps):
        self.calls.append((self.name, "check", list(steps)))

    def start(self, done):
        self.calls.append((self.name, "start", list(done)))

    def after_step(self, result):
        self.calls.append((self.name, "after", result.step, result.folder.is_dir()))
        return result


def _options(base, items, out, **values) -> MergeOptions:
    return MergeOptions.create(base=str(base), stream=[str(i) for i in items], method="average", out=out, quiet=True, **values)


def test_hooks_run_in_order_around_complete_steps(tmp_path, streams):
    base, items = streams("llama")
    calls: list = []
    Engine(_options(base, items[:1], tmp_path / "out"), hooks=[Recording("a", calls), Recording("b", calls)]).run()
    Engine(_options(base, items[:2], tmp_path / "out", resume=True), hooks=[Recording("a", calls)]).run()
    assert calls == [
        ("a", "check", [1]), ("b", "check", [1]), ("a", "start", []), ("b", "start", []),
        ("a", "after", 1, True), ("b", "after", 1, True),  # the step is whole on disk when hooks see it
        ("a", "check", [2]), ("a", "start", [1]), ("a", "after", 2, True),
    ]


def test_dry_run_checks_but_does_not_start(tmp_path, streams):
    base, items = streams("llama")
    calls: list = []
    Engine(_options(base, items, tmp_path / "out", dry_run=True), hooks=[Recording("a", calls)]).run()
    assert calls == [("a", "check", [1, 2, 3])] and not (tmp_path / "out").exists()


def test_evaluation_is_recorded_before_the_next_hook_sees_the_step(tmp_path, streams):
    base, items = streams("llama")
    seen = []

    class Reads(StepHook):
        def after_step(self, result):
            seen.append((result.state.evaluation, read_state(result.folder).evaluation))
            return result

    scores = {"description": "toy", "tasks": ["t"], "rows": [{"name": "merged", "scores": [0.5], "mean": 0.5}]}
    Engine(_options(base, items[:1], tmp_path / "out"), hooks=[EvaluationHook(lambda r: scores), Reads()]).run()
    assert seen == [(scores, scores)]


def test_standard_hooks_evaluate_then_push(tmp_path):
    options = MergeOptions.create(base="org/base", stream=["org/ft"], method="average", out=tmp_path, push_to="org/merged")
    hooks = step_hooks(options, evaluate=lambda r: {})
    assert [type(h) for h in hooks] == [EvaluationHook, PushHook]
    assert step_hooks(MergeOptions.create(base="org/base", method="average", out=tmp_path)) == []
