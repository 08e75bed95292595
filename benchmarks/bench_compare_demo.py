"""``hf-contmerge compare`` on the demo's real MiniLM stream: methods over seeded task orders.

The demo's three all-MiniLM-L6-v2 experts (sentiment, subjectivity, chat topic; built once per
machine), each with its test split as its evaluation task and its training split as calibration
data; every method over the stream as given and ``--orders - 1`` seeded permutations. The table
(mean ± std over orders of ACC, BWT and normalised ACC, in the form of the OPCM paper's tables)
goes into ``benchmarks/RESULTS.md``; the runs stay in the cache, so a rerun only tabulates.

    python benchmarks/bench_compare_demo.py --methods opcm task_arithmetic ties magmax --orders 3
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
from hf_contmerge.demo.tasks import load_tasks
from hf_contmerge.evaluation.compare import compare
from hf_contmerge.methods.registry import build_method
from hf_contmerge.options import MergeOptions

SECTION = "## Methods over task orders on the demo's MiniLM stream (hf-contmerge compare)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["opcm", "task_arithmetic", "ties", "magmax", "average"])
    ap.add_argument("--orders", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="default: a folder in the cache, reused by reruns")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = ap.parse_args()
    tasks = load_tasks()
    experts = build_experts(tasks, progress=False)
    needs_data = any(build_method(m.partition(":")[0], {}).calibration for m in args.methods)
    out = args.out or cache_root() / "compare-demo" / f"seed-{args.seed}"
    options = MergeOptions.create(base=str(BASE_MODEL_DIR()), stream=[str(e) for e in experts], method="average", out=out,
                                  seed=args.seed, quiet=True, eval=True, eval_references=True, eval_max_length=MAX_LENGTH,
                                  eval_data=[f"{t.name}={_split_folder(t, 'test')}" for t in tasks],
                                  data=[str(_split_folder(t, "train")) for t in tasks] if needs_data else [])
    result = compare(options, args.methods, args.orders, out, quiet=False)
    orders = "; ".join(" → ".join(tasks[i].name for i in perm) for perm in result["orders"])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"### Run of {stamp}\n\nCommand: `python benchmarks/bench_compare_demo.py --methods {' '.join(args.methods)} "
             f"--orders {args.orders} --seed {args.seed}`. Machine: {machine()}. Orders: {orders}. Accuracy on each task's "
             "held-out split with its own head.\n\n" + (out / "compare.md").read_text())
    insert_section(args.results, block, SECTION)
    print((out / "compare.md").read_text())


if __name__ == "__main__":
    main()
