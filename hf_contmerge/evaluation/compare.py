"""``hf-contmerge compare``: every method over several seeded task orders, with the OPCM paper's tables.

Order 0 is the stream as given; the others are distinct permutations drawn by ``random.Random(seed)``.
An item keeps its calibration data, its evaluation task and its head in every order (heads follow
their tasks). Each (method, order) is one ordinary ``merge --eval`` into ``OUT/runs/LABEL/order-P``
(``P`` the permutation, items counted from 1),
resumed where it stopped, so a killed compare continues and a finished run is not merged again;
reference rows are cached per machine (``hook._cached``), so each is scored once for all runs, and so
are the fine-tunes' teacher outputs of DivMerge and TRM (``--cache-teachers``). ``keep="final"``
removes a run's earlier step folders once its final step is complete (the final record holds every
step's row, so the tables lose nothing; a run keeps one model and its state instead of T of them).
Written into ``OUT``: ``compare.json`` (every run's final ACC, BWT, normalised ACC and the
permutation), ``compare.md`` (mean ± std over orders per method, population std; with
``--eval-references``, the pretrained model with each task's head and the individual fine-tunes as the
first rows, each the mean over the tasks, as in the papers' tables) and ``compare.png`` (ACC per method,
std as error bars).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import statistics
from pathlib import Path
from typing import Any, Literal

import yaml

from ..artifacts import layout
from ..artifacts.state import read_state, write_json_atomic
from ..errors import ContMergeError
from .hook import TaskEvaluationHook
from .record import Evaluation, Score


def parse_method(label: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE`` (values are YAML scalars)."""
    method, _, sets = label.partition(":")
    params = {}
    for kv in filter(None, sets.split(",")):
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise ContMergeError(f"--methods {label!r}: parameters are NAME:KEY=VALUE,KEY=VALUE.")
        params[key] = yaml.safe_load(value)
    return method, params


def orders(n_items: int, n_orders: int, seed: int) -> list[list[int]]:
    """The stream as given, then distinct permutations drawn in turn by ``random.Random(seed)``."""
    if n_orders > math.factorial(n_items):
        raise ContMergeError(f"--orders {n_orders}: {n_items} items have only {math.factorial(n_items)} orders.")
    rng = random.Random(seed)
    out = [list(range(n_items))]
    while len(out) < n_orders:
        perm = list(range(n_items))
        rng.shuffle(perm)
        if perm not in out:
            out.append(perm)
    return out


def _stat(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), statistics.pstdev(vals) if len(vals) > 1 else 0.0


def _fmt(mean: float | None, std: float | None, signed: bool = False) -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:{'+' if signed else ''}.2f} ± {100 * std:.2f}"


def compare(options, methods: list[str], n_orders: int, out: Path, quiet: bool = True,
            keep: Literal["all", "final"] = "all") -> dict[str, Any]:
    """Run and tabulate; ``options`` is the MergeOptions of order 0 (its ``method``/``out`` are replaced)."""
    from tqdm.auto import tqdm

    from ..calibration.calibrator import make_calibrator
    from ..engine.run import Engine
    from ..options import MergeOptions

    if n_orders < 1:
        raise ContMergeError("--orders must be at least 1.")
    if not options.eval:
        raise ContMergeError("compare needs --eval-data: the runs are compared on their evaluation.")
    parsed = [(label, *parse_method(label)) for label in methods]
    perms = orders(len(options.stream), n_orders, options.seed)
    runs: list[dict[str, Any]] = []
    references: dict[str, dict[str, Score]] = {"pretrained": {}, "individual": {}}
    todo = [(label, m, p, j, perm) for label, m, p in parsed for j, perm in enumerate(perms)]
    for label, method, params, j, perm in tqdm(todo, desc="compare", disable=quiet):
        # named by the permutation, so a rerun with more orders reuses every run it already has
        run_out = out / "runs" / label.replace("/", "_").replace(":", "_") / ("order-" + "-".join(str(i + 1) for i in perm))
        values = {**options.model_dump(), "token": options.token, "method": method, "params": params, "out": run_out,
                  "stream": [options.stream[i] for i in perm], "resume": True, "cache_teachers": True}
        for key in ("data", "eval_data"):
            if values.get(key):
                values[key] = [options.model_dump()[key][i] for i in perm]
        opts = MergeOptions.create(**values)
        if len(perm) not in layout.complete_steps(run_out):  # the final step: earlier ones may be gone (keep="final")
            Engine(opts, hooks=[TaskEvaluationHook(opts)], calibrator=make_calibrator(opts)).run()  # compare never pushes
        if keep == "final":
            for k in range(1, len(perm)):
                shutil.rmtree(layout.step_dir(run_out, k), ignore_errors=True)
        record = Evaluation.parse(read_state(layout.step_dir(run_out, len(perm))).evaluation)
        for c, t in enumerate(record.tasks):
            if t.item > 0 and t.higher_is_better:
                for row, values in (("pretrained", record.base), ("individual", record.finetuned)):
                    if values is not None and values[c] is not None:
                        references[row][t.name] = values[c]
        s = record.summary
        runs.append({"method": label, "order": j, "permutation": perm, "acc": s.acc, "bwt": s.bwt,
                     "normalized_acc": s.normalized_acc, "out": str(run_out)})
    table = []
    for label, _, _ in parsed:
        mine = [r for r in runs if r["method"] == label]
        table.append({"method": label, **{k: _stat([r[k] for r in mine]) for k in ("acc", "bwt", "normalized_acc")}})
    refs = {row: {"tasks": scores, "acc": statistics.fmean(scores.values())} for row, scores in references.items() if scores}
    result = {"orders": perms, "seed": options.seed, "runs": runs, "table": table, "references": refs}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "compare.json", json.dumps(result, indent=2) + "\n")
    lines = [f"Mean ± std over {n_orders} task order(s) (seed {options.seed}; order 0 is the stream as given), in %.", "",
             "| method | ACC | BWT | normalised ACC |", "|---|---|---|---|"]
    names = {"pretrained": "pretrained (base + each task's head)", "individual": "individual fine-tunes"}
    lines += [f"| {names[row]} | {100 * r['acc']:.2f} | – | {'100.00' if row == 'individual' else '–'} |" for row, r in refs.items()]
    lines += [f"| {t['method']} | {_fmt(*t['acc'])} | {_fmt(*t['bwt'], signed=True)} | {_fmt(*t['normalized_acc'])} |"
              for t in table]
    write_json_atomic(out / "compare.md", "\n".join(lines) + "\n")
    _plot(table, out / "compare.png")
    return result


def _plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(table), 3.2), dpi=100)
    means = [100 * (t["acc"][0] or 0) for t in table]
    stds = [100 * (t["acc"][1] or 0) for t in table]
    ax.bar(range(len(table)), means, yerr=stds, capsize=4)
    ax.set_xticks(range(len(table)), [t["method"] for t in table], rotation=30, ha="right")
    ax.set_ylabel("ACC (%) over task orders")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
