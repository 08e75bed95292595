"""The real text benchmark: every method over seeded task orders of a stream of all-MiniLM-L6-v2 fine-tunes.

Five tasks from registry-package data (``hf_contmerge/demo/tasks.py``): sentiment, subjectivity, chat
topic, debate party and chat language identification. One expert per task (the demo's recipe,
``demo/experts.py``), built once per machine into the cache; each expert's test split is its
evaluation task (scored with its own head), its train split the calibration data of data-dependent
methods. ``hf-contmerge compare`` runs every method over the stream as given and ``--orders - 1``
seeded permutations (runs cached, so a rerun only tabulates what it has) and writes the table (mean ±
std over orders of ACC, BWT and normalised ACC, with the pretrained and individual rows: the form of
the OPCM paper's tables) into ``benchmarks/RESULTS.md``.

    python benchmarks/bench_text_stream.py --orders 3
    python benchmarks/bench_text_stream.py --tasks sentiment subjectivity topic --methods opcm ties  # the demo stream
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_stream import insert_section, machine

from hf_contmerge.demo.evaluate import MAX_LENGTH
from hf_contmerge.demo.experts import BASE_MODEL_DIR, build_experts, cache_root
from hf_contmerge.demo.run import _split_folder
from hf_contmerge.demo.tasks import DEMO_TASKS, LOADERS, load_tasks
from hf_contmerge.evaluation.compare import compare
from hf_contmerge.methods.registry import build_method, method_names
from hf_contmerge.options import MergeOptions

SECTION = "## The real text benchmark: every method over task orders of a MiniLM stream (hf-contmerge compare)"
DEMO_SECTION = "## Methods over task orders on the demo's MiniLM stream (hf-contmerge compare)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    ap.add_argument("--methods", nargs="+", default=method_names(), help="NAME or NAME:KEY=VALUE,... (default: all)")
    ap.add_argument("--orders", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-samples", type=int, default=200, help="test examples per task (a seeded sample)")
    ap.add_argument("--out", type=Path, default=None, help="default: a folder in the cache, reused by reruns")
    ap.add_argument("--keep-steps", choices=("all", "final"), default="final", help="as compare's (default: final, "
                    "so the runs take one model each on disk)")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = ap.parse_args()
    tasks = load_tasks(args.tasks)
    experts = build_experts(tasks, progress=False)
    needs_data = any(build_method(m.partition(":")[0], {}).calibration for m in args.methods)
    out = args.out or cache_root() / "bench-text-stream" / f"{'-'.join(args.tasks)}-seed-{args.seed}-n{args.eval_samples}"
    options = MergeOptions.create(base=str(BASE_MODEL_DIR()), stream=[str(e) for e in experts], method="average", out=out,
                                  seed=args.seed, quiet=True, eval=True, eval_references=True, eval_max_length=MAX_LENGTH,
                                  eval_samples=args.eval_samples,
                                  eval_data=[f"{t.name}={_split_folder(t, 'test')}" for t in tasks],
                                  data=[str(_split_folder(t, "train")) for t in tasks] if needs_data else [])
    result = compare(options, args.methods, args.orders, out, quiet=False, keep=args.keep_steps)
    orders = "; ".join(" → ".join(tasks[i].name for i in perm) for perm in result["orders"])
    sizes = ", ".join(f"{t.name} {len(t.labels)} classes / {min(len(t.test), args.eval_samples)} test" for t in tasks)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(sys.argv[1:])
    block = (f"### Run of {stamp}\n\nCommand: `python benchmarks/bench_text_stream.py {command}`. Machine: {machine()}. "
             f"Tasks: {sizes}. Orders: {orders}. Accuracy on each task's held-out split with its own head.\n\n"
             + (out / "compare.md").read_text())
    insert_section(args.results, block, DEMO_SECTION if tuple(args.tasks) == DEMO_TASKS else SECTION)
    print((out / "compare.md").read_text())


if __name__ == "__main__":
    main()
