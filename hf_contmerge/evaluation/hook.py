"""The evaluation step hook: every step is scored on the tasks of the items seen so far before it is
published, so a step folder never looks complete without its evaluation (a crash while scoring
leaves a partial step, which a resume computes again).

Step ``k`` is scored on tasks ``1..k`` (items given ``-`` or no data have no column), each with its
own head when the stream keeps heads apart (the papers' protocol) and with the merged model itself
otherwise (causal LMs). Earlier rows of the matrix come from step ``k - 1``'s record; a step that
has none (evaluation started on a resume) is scored now from its folder, which is left as it is.
``--eval-references`` adds the base (with each task's head) and each fine-tune alone, computed when
the item arrives (it is at hand then) and carried in the record afterwards. The record goes into
``contmerge_state.json`` and the card; ``evaluation/`` holds FusionBench-style reports and the plots.

``--eval-all`` also scores every step on the tasks of items not merged yet (forward transfer, the
upper triangle of the matrix). An unseen classifier task is read through its fine-tune's own head:
during a merge it is taken from the item in the stream's plan (a Hub item is downloaded then, not
when its step comes) into a temporary folder, never into the step; ``hf-contmerge eval`` takes it
from the newest complete step that carries it. A task whose head is nowhere at hand (``eval`` on an
unfinished run) is left empty. ACC, BWT and normalised ACC count the seen tasks only either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from .._version import __version__
from ..artifacts import layout
from ..artifacts.folder import load_step, load_task_model, record_evaluation
from ..artifacts.heads import head_dir, task_model, write_head
from ..artifacts.state import read_state, write_json_atomic
from ..calibration.data import DataSpec
from ..engine.executor import failpoint
from ..engine.hooks import StepHook
from ..engine.step import StepResult
from ..errors import ContMergeError
from ..io.fingerprints import cache_root
from ..options import MergeOptions
from . import plots
from .record import Evaluation, Score, TaskInfo, fusionbench_reports
from .tasks import PreparedTask, TaskSpec, model_kind, prepare, score

logger = logging.getLogger("hf_contmerge")


def task_specs(options: MergeOptions, memory: dict[str, DataSpec] | None = None) -> list[TaskSpec | None]:
    """One task (or None) per stream item, from ``--eval-data`` and the ``--eval-*`` settings."""
    settings = {**spec_settings(options), "kind": options.eval_kind}
    return [None if text in ("", "-") else TaskSpec.parse(text, memory, **settings) for text in options.eval_data]


def spec_settings(options: MergeOptions) -> dict[str, Any]:
    """How every task is read and scored (all ``--eval-*`` settings but the kind)."""
    o = options
    return dict(column=o.eval_column, label_column=o.eval_label_column, choices_column=o.eval_choices_column,
                samples=o.eval_samples, seed=o.seed, max_length=o.eval_max_length, max_new_tokens=o.eval_max_new_tokens,
                batch_size=o.eval_batch_size)


class TaskEvaluationHook(StepHook):
    def __init__(self, options: MergeOptions, memory: dict[str, DataSpec] | None = None):
        self.options = options
        self.memory = memory or {}
        self.specs = task_specs(options, memory)
        self._prepared: dict[tuple[int, str], PreparedTask] = {}
        self._heads: tempfile.TemporaryDirectory | None = None  # --eval-all: heads of items not merged yet
        self._stream = None  # the stream's plan while a merge publishes a step (StepResult.stream)
        if options.quiet:  # every model load and dataset read would draw a bar
            from datasets.utils.logging import disable_progress_bar
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            disable_progress_bar()

    # -------------------------------------------------------------- seams
    def check(self, steps: range) -> None:
        """Every task's data loads and has its columns, before anything is computed."""
        names = [s.name for s in self.specs if s is not None]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ContMergeError(f"--eval-data names tasks {dup} twice; name them NAME=SPEC.")
        if self.options.eval_harness:
            from .harness import check_tasks

            check_tasks(self.options.eval_harness, self.options.eval_harness_include)
        for spec in self.specs:
            if spec is None:
                continue
            data = spec.data.load()
            columns = list(data.column_names)
            if spec.column is not None and spec.column not in columns:
                raise ContMergeError(f"--eval-data {spec.data.text!r} has no column {spec.column!r} (it has {columns}).")
            if len(data) == 0:
                raise ContMergeError(f"--eval-data {spec.data.text!r} is empty: evaluation needs at least one example.")

    def before_publish(self, result: StepResult) -> StepResult:
        k = result.step
        self._stream = result.stream
        prev_folder = layout.step_dir(self.options.out, k - 1) if k > 1 else None
        previous = Evaluation.parse(read_state(prev_folder).evaluation) if prev_folder else None
        last = max(k, len(self.specs)) if self.options.eval_all else k
        items = [i for i in range(1, last + 1) if self._spec(i, previous) is not None]
        harness = list(self.options.eval_harness)
        if not items and not harness:
            return result
        infos: list[TaskInfo] = []
        for i in items:
            task = self._task(i, previous, result.folder, result.state)
            infos.append(TaskInfo(name=task.spec.name, item=i, data=task.spec.data.text, kind=task.kind, metric=task.metric,
                                  dataset=task.spec.data.location if task.spec.data.kind == "hub" else None,
                                  higher_is_better=task.higher_is_better, samples=len(task.inputs)))
        now = self._harness_scores(result.folder) if harness else []
        infos += [TaskInfo(name=h.task, item=0, data=f"lm-eval:{h.task}", kind="harness", metric=h.metric,
                           higher_is_better=h.higher_is_better, samples=h.samples) for h in now]
        columns = [*items, *(f"harness:{t}" for t in harness)]
        earlier: dict[Any, list[Score]] = {}
        for c, t in enumerate(previous.tasks if previous else []):
            earlier[f"harness:{t.name}" if t.item == 0 else t.item] = [row[c] for row in previous.matrix]
        matrix: list[list[Score]] = []
        for j in range(1, k):
            if previous is not None and all(c in earlier or (isinstance(c, int) and c > j) for c in columns):
                matrix.append([earlier[c][j - 1] if c in earlier else None for c in columns])
            else:  # no record for step j (evaluation began later): score its folder now, read-only
                folder = layout.step_dir(self.options.out, j)
                matrix.append(self._row(folder, j, items, previous) + [h.value for h in self._harness_scores(folder)])
        matrix.append(self._row(result.folder, k, items, previous) + [h.value for h in now])
        base = finetuned = None
        if self.options.eval_references:
            base, finetuned = self._references(result, items, previous)
            if harness:
                old = earlier_refs(previous)
                base += [old.get(t) if t in old else None for t in harness]
                if any(b is None for b in base[len(items):]) and result.base_folder is not None:
                    base[len(items):] = [h.value for h in self._harness_scores(result.base_folder)]
                finetuned += [None] * len(harness)  # a harness task belongs to no single fine-tune
        evaluation = Evaluation.build(k, infos, matrix, base, finetuned)
        fusionbench_reports(evaluation, result.folder / layout.EVAL_DIR)
        plots.draw(evaluation, result.folder / layout.EVAL_DIR)
        failpoint(f"step-{k}:evaluate")
        result.state = record_evaluation(result.folder, evaluation.model_dump(mode="json"))
        s = evaluation.summary
        logger.info(f"step {k}: ACC {_pct(s.acc)}, BWT {_pct(s.bwt)} over {len(items)} task(s)")
        return result

    def _harness_scores(self, folder: Path) -> list:
        from transformers import AutoTokenizer

        from .harness import run_harness

        o = self.options
        model = self._place(load_step(folder, **self._load_kwargs())).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        return run_harness(model, tokenizer, o.eval_harness, o.eval_harness_include, limit=o.eval_samples,
                           batch_size=o.eval_batch_size, seed=o.seed)

    # -------------------------------------------------------------- tasks and models
    def _spec(self, item: int, previous: Evaluation | None) -> TaskSpec | None:
        if item <= len(self.specs) and self.specs[item - 1] is not None:
            return self.specs[item - 1]
        for t in previous.tasks if previous else []:  # given to an earlier run (the API gives one item at a time)
            if t.item == item:
                if t.data.startswith("<in-memory") and t.data not in self.memory:
                    raise ContMergeError(f"Task {t.name!r} (item {item}) was evaluated on an in-memory Dataset that this run "
                                         "was not given again; pass it as eval_data for that item, or a data spec.")
                return TaskSpec.parse(f"{t.name}={t.data}", self.memory, **{**spec_settings(self.options), "kind": t.kind})
        return None

    def _task(self, item: int, previous: Evaluation | None, folder: Path, state) -> PreparedTask:
        spec = self._spec(item, previous)
        key = (item, spec.data.text)
        if key not in self._prepared:
            from transformers import AutoConfig

            head = self._head(folder, state, item)
            config = AutoConfig.from_pretrained(folder if head in (None, _NO_HEAD) else head, trust_remote_code=False)
            if head is _NO_HEAD:  # read through the backbone, for its TaskInfo only: not kept
                return prepare(spec, model_kind(config))
            self._prepared[key] = prepare(spec, model_kind(config))
        return self._prepared[key]

    def _head(self, folder: Path, state, item: int) -> Path | None:
        """The folder of item ``item``'s head for scoring step ``folder``, or None when the item has none.

        A seen item's head is in the step. An unseen one's (``--eval-all``) comes from the newest complete
        step that carries it, else from the stream's plan, written once into a temporary folder."""
        if any(h.get("task") == item for h in state.heads):
            return head_dir(folder, item)
        if item <= state.step:
            return None
        for k in reversed(layout.complete_steps(self.options.out)):
            if any(h.get("task") == item for h in read_state(layout.step_dir(self.options.out, k)).heads):
                return head_dir(layout.step_dir(self.options.out, k), item)
        if self._stream is None or item > len(self._stream.items):
            return _NO_HEAD if state.heads else None  # a stream of heads: this one is not at hand
        keys = self._stream.item_plans[item - 1].heads
        if not keys:
            return None
        if self._heads is None:
            self._heads = tempfile.TemporaryDirectory(prefix="hf-contmerge-heads-")
        target = head_dir(Path(self._heads.name), item)
        if not target.is_dir():
            source = self._stream.items[item - 1]
            source.ensure_local()
            write_head(Path(self._heads.name), item, source, keys)
        return target

    def _load_kwargs(self) -> dict[str, Any]:
        o = self.options
        if o.device_map:
            return {k: v for k, v in (("device_map", o.device_map_value()), ("max_memory", o.max_memory_value()),
                                      ("offload_folder", o.offload_folder)) if v is not None}
        return {}

    def _place(self, model):
        if not self.options.device_map:
            from ..engine.run import resolve_device

            model.to(resolve_device(self.options.device))
        return model

    def _row(self, folder: Path, step: int, items: list[int], previous: Evaluation | None) -> list[Score]:
        """Scores of step ``step``'s folder on the tasks of items seen by then (None for later ones)."""
        state = read_state(folder)
        shared = None  # a model without heads serves every task
        row: list[Score] = []
        for i in items:
            head = self._head(folder, state, i) if i <= step or self.options.eval_all else _NO_HEAD
            if head is _NO_HEAD:
                row.append(None)
                continue
            task = self._task(i, previous, folder, state)
            if head is not None:  # an unseen item's head (--eval-all) goes over this step's backbone too
                model = self._place(load_task_model(folder, i, head=head, **self._load_kwargs()))
            else:
                if shared is None:
                    shared = self._place(load_step(folder, **self._load_kwargs()))
                model = shared
            row.append(score(task, model, folder))  # every step folder carries the base's tokenizer / processor
        return row

    def _references(self, result: StepResult, items: list[int], previous: Evaluation | None) -> tuple[list[Score], list[Score]]:
        old = {t.item: c for c, t in enumerate(previous.tasks)} if previous else {}
        base_row: list[Score] = []
        ft_row: list[Score] = []
        base_folder = result.base_folder
        bare = None  # the base without heads serves every task
        for i in items:
            if i > result.step:  # not merged yet (--eval-all): its references come with it
                base_row.append(None)
                ft_row.append(None)
                continue
            if i in old and i < result.step and previous.base is not None and previous.finetuned is not None:
                base_row.append(previous.base[old[i]])
                ft_row.append(previous.finetuned[old[i]])
                continue
            task = self._task(i, previous, result.folder, result.state)
            head = head_dir(result.folder, i) / "model.safetensors"
            has_head = head.is_file()

            def base_score(task=task, i=i, has_head=has_head):
                nonlocal bare
                if has_head:
                    return score(task, self._place(task_model(base_folder, head_dir(result.folder, i), i, self._load_kwargs())),
                                 result.folder)
                if bare is None:
                    bare = self._place(load_step(base_folder, **self._load_kwargs()))
                return score(task, bare, result.folder)

            head_digest = hashlib.sha256(head.read_bytes()).hexdigest() if has_head else "none"
            base_row.append(None if base_folder is None else
                            _cached(("base", result.state.base["fingerprint"], head_digest), task, base_score))
            item = result.item if i == result.step else None
            if item is None:  # an earlier item is not at hand any more (the stream keeps no past fine-tune)
                logger.warning(f"no reference row for item {i}: it was merged before evaluation with references began")
                ft_row.append(None)
                continue
            ft_row.append(_cached(("finetuned", result.state.stream[i - 1]["fingerprint"]), task,
                                  lambda task=task, item=item: score(task, self._place(self._finetune(item, base_folder)),
                                                                     result.folder)))
        return base_row, ft_row

    def _finetune(self, item, base_folder: Path | None):
        if item.kind == "lora":
            from peft import PeftModel

            return PeftModel.from_pretrained(load_step(base_folder, **self._load_kwargs()), item.folder).merge_and_unload()
        return load_step(item.folder, **self._load_kwargs())


_NO_HEAD = Path("<no head at hand>")  # the item has a head, and it is not available to score this step with


def _cached(model: tuple, task: PreparedTask, compute) -> Score:
    """A reference score (the base with a head, or a fine-tune alone, on one task) cached per machine in
    ``HF_CONTMERGE_CACHE/eval-references``: it depends only on the model's content and the task's
    examples and settings, so every run and task order of a ``compare`` scores each once."""
    spec = task.spec
    key = json.dumps([__version__, list(model), spec.data.text, task.fingerprint, task.kind, task.column, spec.label_column,
                      spec.choices_column, spec.samples, spec.seed, spec.max_length, spec.max_new_tokens, len(task.inputs)])
    path = cache_root() / "eval-references" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())["score"]
        except (ValueError, KeyError):
            pass  # a damaged cache entry is computed again
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, json.dumps({"score": value, "key": key}) + "\n")
    return value


def earlier_refs(previous: Evaluation | None) -> dict[str, Score]:
    """The base row's harness scores of an earlier record, by task name."""
    if previous is None or previous.base is None:
        return {}
    return {t.name: previous.base[c] for c, t in enumerate(previous.tasks) if t.item == 0}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _pinned(entry: dict[str, Any]) -> str:
    """A recorded source at its recorded commit (Hub), or its folder as given."""
    from ..io.remote import SourceSpec

    spec = SourceSpec.parse(entry["source"])
    return spec.text if spec.is_local or not entry.get("revision") else f"{spec.location}@{entry['revision']}"


def evaluate_folder(options: MergeOptions, from_step: int = 1) -> list[Evaluation]:
    """``hf-contmerge eval``: score the complete steps of ``options.out`` in order (all, or from
    ``from_step`` on, which needs the record of the step before) and record each step's evaluation
    in its state, card and ``evaluation/`` (each file replaced atomically). The reference rows need
    the fine-tunes themselves: they are read from their recorded sources (a Hub item at its commit)."""
    from ..sources.resolve import resolve

    done = layout.complete_steps(options.out)
    if not done:
        raise ContMergeError(f"{options.out} holds no complete step to evaluate.")
    todo = [k for k in done if k >= from_step]
    if todo and todo[0] > 1 and Evaluation.parse(read_state(layout.step_dir(options.out, todo[0] - 1)).evaluation) is None:
        raise ContMergeError(f"step-{todo[0] - 1} has no evaluation record, and step {todo[0]}'s matrix needs it: evaluate "
                             "from step 1 (omit --from-step).")
    hook = TaskEvaluationHook(options)
    hook.check(range(1, len(done) + 1))
    token = options.token_value()
    records = []
    with layout.exclusive(options.out):
        last = read_state(layout.step_dir(options.out, done[-1]))
        base = resolve(_pinned(last.base), token=token, allow_pickle=options.allow_pickle, role="base", lazy=True)
        try:
            base_folder = base.ensure_local()
            for k in todo:
                folder = layout.step_dir(options.out, k)
                state = read_state(folder)
                item = None
                if options.eval_references:
                    item = resolve(_pinned(state.stream[k - 1]), token=token, allow_pickle=options.allow_pickle,
                                   role="stream item", base=base, lazy=True)
                    item.ensure_local()
                try:
                    result = hook.before_publish(StepResult(k, folder, state, base_folder=base_folder, item=item))
                finally:
                    if item is not None:
                        item.close()
                record = Evaluation.parse(result.state.evaluation)
                if record is not None:
                    records.append(record)
        finally:
            base.close()
    return records
