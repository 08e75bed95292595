"""The Python API: the same options and engine as the CLI, one step at a time.

    from hf_contmerge import ContinualMerger
    merger = ContinualMerger(base="org/base", method="task_arithmetic", params={"scaling": 0.3}, out="runs/ta")
    merger.step("org/finetune-1")          # writes runs/ta/step-1
    merger.step("org/finetune-2")          # writes runs/ta/step-2
    model = merger.model()                 # the latest merged model, a transformers model

Each ``step`` runs the same pre-flight and writer as ``hf-contmerge merge --resume``, so what the
API writes is what the CLI writes, and either can continue the other's ``out`` folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifacts import layout
from .artifacts.folder import load_step
from .artifacts.state import read_state
from .calibration.calibrator import make_calibrator
from .calibration.data import DataSpec
from .engine.run import Engine
from .engine.step import StepResult
from .errors import ContMergeError
from .hooks import step_hooks
from .methods.registry import build_method
from .options import MergeOptions

if TYPE_CHECKING:
    from datasets import Dataset


class ContinualMerger:
    """Continual merging into ``out``; construct once, call :meth:`step` for every new fine-tune.

    Keyword arguments are :class:`MergeOptions` fields (``dtype``, ``device``, ``shard_size``,
    ``allow_pickle``, ``token``, ``push_to`` …). With ``resume=True`` an ``out`` that already holds
    steps is continued; otherwise it must be new or empty. ``evaluate(result) -> dict`` scores each
    step before it is pushed, so its card (and model-index metadata) carries the results
    (format: ``artifacts.folder.record_evaluation``).
    """

    def __init__(self, base: str | os.PathLike[str], method: str, out: str | os.PathLike[str], params: dict[str, Any] | None = None,
                 evaluate: Callable[[StepResult], dict[str, Any]] | None = None, **options: Any):
        options.setdefault("quiet", True)
        self.evaluate = evaluate
        self._memory: dict[str, DataSpec] = {}  # in-memory datasets given so far, by the spec text the state records
        self.options = MergeOptions.create(base=base, method=method, out=Path(out), params=params or {}, **options)
        done = layout.complete_steps(self.options.out)
        if done and not self.options.resume:
            raise ContMergeError(f"{out} already holds steps; pass resume=True to continue them, or use another out.")
        self.history: list[str] = [s["source"] for s in read_state(layout.step_dir(self.options.out, done[-1])).stream] if done else []

    @classmethod
    def from_options(cls, options: MergeOptions) -> ContinualMerger:
        values = options.model_dump()
        values["token"] = options.token
        return cls(**values)

    @property
    def steps(self) -> int:
        return len(self.history)

    @property
    def method_needs_data(self) -> bool:
        """Whether every step needs calibration data (``data=`` of :meth:`step`)."""
        return bool(build_method(self.options.method, self.options.params).calibration)

    @property
    def last_step_folder(self) -> Path | None:
        return layout.step_dir(self.options.out, self.steps) if self.history else None

    def step(self, source: str | os.PathLike[str], data: str | os.PathLike[str] | Dataset | None = None,
             eval_data: str | os.PathLike[str] | Dataset | None = None) -> StepResult:
        """Merge one more fine-tune (folder or Hub id) and write the next step folder. ``data``: its
        calibration data for a data-dependent method: a spec as for ``--data``, or a ``datasets.Dataset``
        (recorded by its fingerprint). ``eval_data``: its evaluation task with ``eval=True`` (``[NAME=]SPEC`` or a
        ``datasets.Dataset``; see ``--eval-data``)."""
        if build_method(self.options.method, self.options.params).whole_stream:
            raise ContMergeError(f"Method {self.options.method!r} with these parameters learns over the whole stream at "
                                 "once, so it cannot be given one item at a time: call run([...], data=[...]) with every "
                                 "item.")
        return self._run([source], None if data is None else [data], None if eval_data is None else [eval_data])[0]

    def _run(self, sources: list, data: list | None, eval_data: list | None = None) -> list[StepResult]:
        """Merge ``sources`` (with their data) in one engine run: the next steps of this merger."""
        sources = [os.fspath(s) for s in sources]
        memory = self._memory  # kept across steps: later steps score earlier items' in-memory tasks again

        def texts_of(entries: list, none: str) -> list[str]:
            texts = []
            for d in entries:
                if d is not None and not isinstance(d, (str, os.PathLike)):
                    spec = DataSpec.memory(d)
                    memory[spec.text] = spec
                    d = spec.text
                texts.append(none if d is None else os.fspath(d))
            return texts

        texts = texts_of(data or [], "")
        done = layout.complete_steps(self.options.out)
        if done != list(range(1, self.steps + 1)):
            found = f"steps {done[0]}..{done[-1]}" if done else "no step"
            raise ContMergeError(
                f"{self.options.out} changed under this merger: it should hold steps 1..{self.steps}, and it holds {found}. "
                "Nothing was written. Make a new ContinualMerger (resume=True continues whatever the folder holds)."
            )
        update: dict[str, Any] = {"stream": [*self.history, *sources], "resume": bool(self.history) or self.options.resume}
        if data is not None:  # earlier items are merged already: their data is not read again
            if len(texts) != len(sources):
                raise ContMergeError(f"give one data entry per source ({len(texts)} for {len(sources)}).")
            update["data"] = [*([""] * len(self.history)), *texts]
        if self.options.eval:  # earlier items' tasks are read back from the last step's record
            evals = texts_of(eval_data or [None] * len(sources), "-")
            if len(evals) != len(sources):
                raise ContMergeError(f"give one eval_data entry per source ({len(evals)} for {len(sources)}).")
            update["eval_data"] = [*(["-"] * len(self.history)), *evals]
        elif eval_data is not None:
            raise ContMergeError("eval_data is given, and this merger was made without eval=True: pass eval=True.")
        opts = MergeOptions.create(**{**self.options.model_dump(), "token": self.options.token, **update})
        results = Engine(opts, hooks=step_hooks(opts, self.evaluate, memory), calibrator=make_calibrator(opts, memory)).run()
        self.history.extend(sources)
        return results

    def run(self, sources: list[str | os.PathLike[str]], data: list | None = None, eval_data: list | None = None) -> list[StepResult]:
        """Merge ``sources`` in order, in one run (``data``, ``eval_data``: one entry per source, as for
        :meth:`step`), so a method that learns over the whole stream (``divmerge`` ``form=all``) sees every item."""
        return self._run(list(sources), None if data is None else list(data), None if eval_data is None else list(eval_data))

    def model(self, **from_pretrained_kwargs: Any):
        """The latest merged model, loaded with transformers."""
        if not self.history:
            raise ContMergeError("No step has been merged yet: call step() first.")
        return load_step(self.last_step_folder, **from_pretrained_kwargs)
