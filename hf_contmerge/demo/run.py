"""The offline demo: a real stream of MiniLM fine-tunes, merged continually, evaluated per step.

Three experts (sentiment, subjectivity, chat topic) are fine-tuned from all-MiniLM-L6-v2 once per
machine and cached (``experts.py``). The stream is merged with the chosen method; after every step
the merged backbone is evaluated on every task seen so far, each with its own head (the papers'
protocol: task-specific heads are not merged). Printed: the accuracy matrix a[t][i], with the
pretrained backbone and the individual experts as the lower and upper rows, then ACC and BWT.
The results are written into each step's card. A data-dependent method (``fisher``, ``became``)
is calibrated on each expert's own training texts (its task's train split, saved once per machine).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from ..api import ContinualMerger
from ..artifacts.folder import load_task_model
from ..methods.registry import build_method
from .evaluate import evaluate
from .experts import BASE_MODEL_DIR, build_experts, cache_root
from .tasks import load_tasks


def _task_data(task) -> Path:
    """The task's training split as a ``save_to_disk`` folder (calibration data), written once per machine."""
    import hashlib

    digest = hashlib.sha256(json.dumps(task.train.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root() / "demo-data" / f"{task.name}-{digest}"
    if not folder.is_dir():
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()  # the demo prints its own table
        tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
        task.train.save_to_disk(str(tmp))
        os.replace(tmp, folder)
    return folder


def _fresh_out(method: str) -> Path:
    runs = cache_root() / "demo-runs"
    n = 1
    while (runs / f"{method}-{n}").exists():
        n += 1
    return runs / f"{method}-{n}"


def _row(name: str, scores: list[float | None]) -> dict[str, Any]:
    seen = [s for s in scores if s is not None]
    return {"name": name, "scores": scores, "mean": sum(seen) / len(seen) if seen else None}


def _print_row(row: dict[str, Any], width: int) -> None:
    cells = "".join(f"{'–' if s is None else f'{100 * s:.1f}':>{width}}" for s in row["scores"])
    mean = "–" if row["mean"] is None else f"{100 * row['mean']:.1f}"
    print(f"{row['name']:<22}{cells}{mean:>{width}}")


def run_demo(method: str = "opcm", out: Path | None = None, params: dict[str, Any] | None = None, quiet: bool = False) -> dict[str, Any]:
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the printed table readable
    hf_logging.set_verbosity_error()
    tasks = load_tasks()
    experts = build_experts(tasks, progress=not quiet)
    base = BASE_MODEL_DIR()
    out = Path(out) if out else _fresh_out(method)
    tokenizer = AutoTokenizer.from_pretrained(base)
    names = [t.name for t in tasks]
    width = max(14, *(len(n) + 2 for n in names))
    print(f"hf-contmerge demo: {method} over {len(experts)} MiniLM fine-tunes ({', '.join(names)}) -> {out}", file=sys.stderr)

    # lower row: the pretrained backbone with each expert's head; upper row: each expert alone
    lower, upper = [], []
    for task, expert in zip(tasks, experts):
        model = AutoModelForSequenceClassification.from_pretrained(expert)
        upper.append(evaluate(model, tokenizer, task))
        model.bert.load_state_dict(AutoModel.from_pretrained(base).state_dict())
        lower.append(evaluate(model, tokenizer, task))
    rows = [_row("pretrained + heads", lower), _row("individual experts", upper)]
    print(f"{'accuracy (%)':<22}" + "".join(f"{n:>{width}}" for n in names) + f"{'mean':>{width}}")
    for r in rows:
        _print_row(r, width)

    matrix: list[list[float | None]] = []
    summary: dict[str, float] = {}

    def evaluate_step(result) -> dict[str, Any]:
        t = result.step
        scores: list[float | None] = [None] * len(tasks)
        for i in range(t):
            scores[i] = evaluate(load_task_model(result.folder, i + 1), tokenizer, tasks[i])
        matrix.append(scores)
        row = _row(f"merged, step {t}", scores)
        rows.append(row)
        _print_row(row, width)
        summary["ACC"] = row["mean"]
        summary["BWT"] = sum(matrix[-1][i] - matrix[i][i] for i in range(t - 1)) / (t - 1) if t > 1 else 0.0
        return {
            "description": (
                f"Accuracy (%) on the held-out split of each demo task, each with its own head (heads are not merged). "
                f"After step {t}: ACC {100 * summary['ACC']:.2f}, BWT {100 * summary['BWT']:+.2f} (over the tasks seen so far)."
            ),
            "tasks": names,
            "rows": list(rows),
            "metrics": dict(summary),
        }

    merger = ContinualMerger(base=str(base), method=method, params=params or {}, out=out, quiet=True, evaluate=evaluate_step)
    needs_data = bool(build_method(method, params or {}).calibration)  # each expert's own training texts
    merger.run([str(e) for e in experts], data=[_task_data(t) for t in tasks] if needs_data else None)
    acc, bwt = summary["ACC"], summary["BWT"]
    print(f"ACC {100 * acc:.2f}   BWT {100 * bwt:+.2f}   (final model over all {len(tasks)} tasks; BWT = mean a[T][i] − a[i][i])")
    print(f"steps written to {out}; each step's README.md holds its card and these results", file=sys.stderr)
    return {"rows": rows, "ACC": acc, "BWT": bwt, "out": out}
