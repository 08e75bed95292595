"""Accuracy matrices of several methods on the demo's real MiniLM stream, side by side.

The demo (``hf_contmerge/demo``): three all-MiniLM-L6-v2 experts (sentiment, subjectivity, chat
topic; built once per machine), merged continually in that order; after every step each seen task
is scored with its own head. Rows per method: the pretrained backbone with the experts' heads and
each expert alone (the lower and upper references), then a[t][i] after every step; ACC and BWT
after the last, and the normalised accuracy (the mean over tasks of a[T][i] / the expert's own, as
DivMerge reports it). Data-dependent methods are calibrated on each expert's own training texts.

    python benchmarks/bench_demo_methods.py            # every method below (NAME or NAME:KEY=VALUE,...)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_stream import insert_section, machine

from hf_contmerge.demo.run import run_demo

SECTION = "## Accuracy on the demo's MiniLM stream: data-free and data-dependent methods"


def _cached(method: str, params: dict) -> dict | None:
    """The rows, ACC and BWT of the newest complete demo run of ``method`` with ``params`` (its last step's
    state records the evaluation the demo made), or None."""
    from hf_contmerge.artifacts.state import read_state
    from hf_contmerge.demo.experts import cache_root
    from hf_contmerge.evaluation.record import Evaluation
    from hf_contmerge.methods.registry import build_method

    want = build_method(method, params).params.model_dump()
    runs = sorted((cache_root() / "demo-runs").glob(f"{method}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for run in runs:
        last = run / "step-3"
        if (last / "contmerge_state.json").is_file():
            state = read_state(last)
            record = Evaluation.parse(state.evaluation)
            if state.params == want and record is not None and record.base is not None:
                return _result(record)
    return None


def _result(record) -> dict:
    """The demo's result (``run_demo``'s rows, ACC, BWT) from a step's evaluation record."""
    def mean(scores):
        return sum(scores) / len(scores)

    rows = [{"name": "pretrained + heads", "scores": record.base, "mean": mean(record.base)},
            {"name": "individual experts", "scores": record.finetuned, "mean": mean(record.finetuned)},
            *({"name": f"merged, step {k + 1}", "scores": r, "mean": record.summary.seen_average[k]}
              for k, r in enumerate(record.matrix))]
    return {"rows": rows, "ACC": record.summary.acc, "BWT": record.summary.bwt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties", "opcm", "fisher", "became", "divmerge",
                                                     "divmerge:granularity=task", "divmerge:form=all", "trm"])
    ap.add_argument("--reuse", action="store_true", help="take a method's rows from its newest complete demo run in the "
                    "cache (same parameters) instead of running it again")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = ap.parse_args()
    tables = []
    for label in args.methods:  # NAME or NAME:KEY=VALUE,KEY=VALUE (method parameters)
        method, _, sets = label.partition(":")
        params = {k: yaml.safe_load(v) for k, _, v in (kv.partition("=") for kv in sets.split(",") if kv)}
        result = _cached(method, params) if args.reuse else None
        if result is None:
            with contextlib.redirect_stdout(io.StringIO()):  # the demo prints its own table; ours is built below
                result = run_demo(method=method, params=params, quiet=True)
        method = label
        rows = result["rows"]
        tasks = len(rows[0]["scores"])
        head = "| " + method + " | " + " | ".join(f"task {i + 1}" for i in range(tasks)) + " | mean |\n" + "|---" * (tasks + 2) + "|\n"
        body = "".join("| " + r["name"] + " | " + " | ".join("–" if s is None else f"{100 * s:.1f}" for s in r["scores"])
                       + f" | {100 * r['mean']:.1f} |\n" for r in rows)
        experts, final = rows[1]["scores"], rows[-1]["scores"]
        normalised = sum(a / e for a, e in zip(final, experts)) / tasks  # DivMerge's measure: a[T][i] / a_ft[i]
        tables.append(f"{head}{body}\nACC {100 * result['ACC']:.2f}, BWT {100 * result['BWT']:+.2f}, normalised ACC "
                      f"{100 * normalised:.2f} % (mean of a[T][i] / expert i).\n")
        print(f"{method}: ACC {100 * result['ACC']:.2f}  BWT {100 * result['BWT']:+.2f}  normalised {100 * normalised:.2f}",
              flush=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"### Run of {stamp}\n\nCommand: `python benchmarks/bench_demo_methods.py --methods {' '.join(args.methods)}`. "
             f"Machine: {machine()}. Tasks in stream order: 1 sentiment, 2 subjectivity, 3 chat topic; accuracy % on each "
             "task's held-out split with its own head.\n\n" + "\n".join(tables))
    insert_section(args.results, block, SECTION)


if __name__ == "__main__":
    main()
