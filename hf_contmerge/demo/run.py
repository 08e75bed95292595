"""The offline demo: a real stream of MiniLM fine-tunes, merged continually, evaluated per step.

Three experts (sentiment, subjectivity, chat topic) are fine-tuned from all-MiniLM-L6-v2 once per
machine and cached (``experts.py``). The stream is merged with the chosen method and scored by the
evaluation subsystem (``--eval``, ``evaluation/``): after every step the merged backbone is evaluated
on every task seen so far, each with its own head (the papers' protocol: task-specific heads are not
merged). Printed: the accuracy matrix a[t][i], with the pretrained backbone and the individual
experts as the lower and upper rows, then ACC, BWT and normalised ACC. The results and their plots
are written into each step's card. A data-dependent method (``fisher``, ``became``)
is calibrated on each expert's own training texts (its task's train split, saved once per machine).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from ..api import ContinualMerger
from ..artifacts.state import read_state
from ..evaluation.record import Evaluation
from ..methods.registry import build_method
from .evaluate import MAX_LENGTH
from .experts import BASE_MODEL_DIR, build_experts, cache_root
from .tasks import load_tasks


def _split_folder(task, split: str) -> Path:
    """A split of the task (``train``: calibration data, ``test``: evaluation) as a ``save_to_disk`` folder,
    written once per machine."""
    return saved_dataset(getattr(task, split), f"{task.name}{'' if split == 'train' else '-' + split}")


def saved_dataset(data, name: str) -> Path:
    """``data`` as a ``save_to_disk`` folder ``<cache>/demo-data/NAME-<content hash>``, written once per machine."""
    import hashlib

    digest = hashlib.sha256(json.dumps(data.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root() / "demo-data" / f"{name}-{digest}"
    if not folder.is_dir():
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()  # the demo prints its own table
        tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
        data.save_to_disk(str(tmp))
        os.replace(tmp, folder)
    return folder


def _fresh_out(method: str) -> Path:
    runs = cache_root() / "demo-runs"
    n = 1
    while (runs / f"{method}-{n}").exists():
        n += 1
    return runs / f"{method}-{n}"


def _print_row(name: str, scores: list[float | None], mean: float | None, width: int) -> None:
    cells = "".join(f"{'–' if v is None else f'{100 * v:.1f}':>{width}}" for v in scores)
    print(f"{name:<22}{cells}{'–' if mean is None else f'{100 * mean:.1f}':>{width}}")


def run_demo(method: str = "opcm", out: Path | None = None, params: dict[str, Any] | None = None, quiet: bool = False) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the printed table readable
    hf_logging.set_verbosity_error()
    tasks = load_tasks()
    experts = build_experts(tasks, progress=not quiet)
    base = BASE_MODEL_DIR()
    out = Path(out) if out else _fresh_out(method)
    names = [t.name for t in tasks]
    print(f"hf-contmerge demo: {method} over {len(experts)} MiniLM fine-tunes ({', '.join(names)}) -> {out}", file=sys.stderr)
    # the evaluation subsystem scores each step (each task with its own head) and the reference rows;
    # inputs truncated at 64 tokens, the length the experts were trained with
    merger = ContinualMerger(base=str(base), method=method, params=params or {}, out=out, quiet=True, eval=True,
                             eval_references=True, eval_max_length=MAX_LENGTH)
    needs_data = bool(build_method(method, params or {}).calibration)  # each expert's own training texts
    merger.run([str(e) for e in experts], data=[_split_folder(t, "train") for t in tasks] if needs_data else None,
               eval_data=[f"{t.name}={_split_folder(t, 'test')}" for t in tasks])
    record = Evaluation.parse(read_state(merger.last_step_folder).evaluation)
    counted = [t.higher_is_better for t in record.tasks]

    def mean(scores: list[float | None]) -> float | None:
        seen = [v for v, c in zip(scores, counted) if c and v is not None]
        return sum(seen) / len(seen) if seen else None

    rows = [{"name": "pretrained + heads", "scores": record.base, "mean": mean(record.base)},
            {"name": "individual experts", "scores": record.finetuned, "mean": mean(record.finetuned)},
            *({"name": f"merged, step {k + 1}", "scores": r, "mean": record.summary.seen_average[k]}
              for k, r in enumerate(record.matrix))]
    width = max(14, *(len(n) + 2 for n in names))
    print(f"{'accuracy (%)':<22}" + "".join(f"{n:>{width}}" for n in names) + f"{'mean':>{width}}")
    for r in rows:
        _print_row(r["name"], r["scores"], r["mean"], width)
    acc, bwt = record.summary.acc, record.summary.bwt
    print(f"ACC {100 * acc:.2f}   BWT {100 * bwt:+.2f}   normalised ACC {100 * record.summary.normalized_acc:.2f}%   "
          f"(final model over all {len(tasks)} tasks; BWT = mean a[T][i] − a[i][i])")
    print(f"steps written to {out}; each step's README.md holds its card, these results and their plots", file=sys.stderr)
    return {"rows": rows, "ACC": acc, "BWT": bwt, "out": out, "evaluation": record}
