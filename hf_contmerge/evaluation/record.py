"""The typed evaluation record of a step, and the stream metrics computed from its matrix.

``a[k][i]`` is the score of the merged model after step ``k`` on task ``i`` (both 1-based here,
0-based in the lists), ``None`` where task ``i`` was not evaluated at step ``k`` (not seen yet).
With ``T`` the record's step and ``S`` the tasks that count (stream tasks whose metric is higher-is-
better; perplexity is shown but not averaged into accuracy):

- ``ACC = mean_{i <= T, i in S} a[T][i]``; lm-eval tasks (``--eval-harness``) are scored at every
  step and shown, and belong to no item, so they are not in ``S`` either;
- ``BWT = mean_{i < T, i in S} (a[T][i] - a[i][i])`` (``None`` at ``T = 1``), as in Lopez-Paz &
  Ranzato (2017) and the OPCM paper;
- normalised accuracy ``mean_{i <= T, i in S} a[T][i] / a_ft[i]`` with ``a_ft[i]`` the individual
  fine-tune's score on its own task (when the reference rows were computed);
- the seen average of every step ``k``: ``mean_{i <= k, i in S} a[k][i]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

FORMAT = "hf-contmerge/evaluation"
Score = float | None


class TaskInfo(BaseModel):
    """One column of the matrix: what was scored, how, and on how many examples."""

    model_config = ConfigDict(extra="forbid")
    name: str
    item: int  # the stream position (1-based) whose task this is; 0: an lm-eval task scored at every step
    data: str  # the data spec as given
    dataset: str | None = None  # its Hub dataset id, when it is one (the card's model-index names it)
    kind: str  # classification, choice, label-words, exact-match, perplexity
    metric: str
    higher_is_better: bool = True
    samples: int


class Summary(BaseModel):
    model_config = ConfigDict(extra="forbid")
    acc: Score = None
    bwt: Score = None
    normalized_acc: Score = None
    seen_average: list[Score] = []


class Evaluation(BaseModel):
    """``contmerge_state.json``'s ``evaluation`` of step ``step``: every step's row so far."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["hf-contmerge/evaluation"] = FORMAT
    format_version: int = 1
    step: int
    tasks: list[TaskInfo]
    matrix: list[list[Score]]  # rows: steps 1..step; columns: tasks
    base: list[Score] | None = None  # the base model (with each task's head)
    finetuned: list[Score] | None = None  # each individual fine-tune on its own task
    summary: Summary = Summary()

    @classmethod
    def build(cls, step: int, tasks: list[TaskInfo], matrix: list[list[Score]], base: list[Score] | None = None,
              finetuned: list[Score] | None = None) -> Evaluation:
        return cls(step=step, tasks=tasks, matrix=matrix, base=base, finetuned=finetuned,
                   summary=summarise(matrix, [t.higher_is_better and t.item > 0 for t in tasks], finetuned,
                                     [t.item for t in tasks]))

    @classmethod
    def parse(cls, data: object) -> Evaluation | None:
        """The record in a state's ``evaluation`` field, or None for none or another format (a custom
        ``evaluate=`` callable's dict, or an older version's record)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return None
        return cls.model_validate(data)


def _mean(values: list[float]) -> Score:
    return sum(values) / len(values) if values else None


def summarise(matrix: list[list[Score]], counts: list[bool], finetuned: list[Score] | None = None,
              items: list[int] | None = None) -> Summary:
    """ACC, BWT, normalised accuracy and the seen average of every step (see the module docstring).

    Column ``c`` is the task of stream item ``items[c]`` (default ``c + 1``: every item has a task); it is
    seen from step ``items[c]`` on, and ``a[i][i]`` is its score at that step."""
    T = len(matrix)
    if T == 0:
        return Summary()
    items = items or list(range(1, len(counts) + 1))
    seen = [[c for c in range(len(counts)) if counts[c] and items[c] <= k + 1 and matrix[k][c] is not None] for k in range(T)]
    last = matrix[-1]
    acc = _mean([last[c] for c in seen[-1]])
    diffs = [last[c] - matrix[items[c] - 1][c] for c in seen[-1] if items[c] < T and matrix[items[c] - 1][c] is not None]
    bwt = _mean(diffs) if T > 1 else None
    normalized = None
    if finetuned is not None:
        normalized = _mean([last[c] / finetuned[c] for c in seen[-1] if finetuned[c]])
    return Summary(acc=acc, bwt=bwt, normalized_acc=normalized, seen_average=[_mean([matrix[k][c] for c in seen[k]]) for k in range(T)])


def fusionbench_reports(evaluation: Evaluation, folder: Path) -> list[Path]:
    """The record as FusionBench's continual-merging logs: ``report_{k}.json`` for the model after
    step ``k + 1`` (FusionBench counts models from 0), each ``{task: {metric: score}, "average":
    {metric: mean}}`` over the tasks scored then, and ``model_names.json``, the tasks in stream order."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k, row in enumerate(evaluation.matrix):
        report: dict[str, dict[str, float]] = {}
        per_metric: dict[str, list[float]] = {}
        for task, score in zip(evaluation.tasks, row):
            if score is not None:
                report[task.name] = {task.metric: score}
                per_metric.setdefault(task.metric, []).append(score)
        report["average"] = {m: sum(v) / len(v) for m, v in per_metric.items()}
        path = folder / f"report_{k}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        written.append(path)
    names = folder / "model_names.json"
    names.write_text(json.dumps([t.name for t in evaluation.tasks], indent=2) + "\n")
    return [*written, names]
