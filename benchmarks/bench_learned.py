"""Cost of a learned-coefficient step (DivMerge, TRM) against the plain passes it is made of.

A ``divmerge`` step (continual form) on N calibration samples runs: each teacher (θt, θ(t−1)) once
forward on every sample (cached), the objective over all samples before and after (forward only,
batches of ``batch_per_task``), and ``epochs`` × ⌈N / batch⌉ optimisation steps, each a forward and
backward pass of the student per teacher term. This script times, for two demo experts (MiniLM,
sentiment then subjectivity; built once per machine by the demo) and their own training texts:

1. ``merge``: ``hf-contmerge merge --method divmerge`` (or ``trm``) over the two experts, as a
   separate process (peak RSS from ``wait4``), minus the same merge with ``--set epochs=0``;
2. ``plain``: in one process, the same number of plain ``loss.backward()`` passes of the expert's
   model on batches of the same samples (and forward passes for the objective), no composition.

Ratio = (merge − merge with epochs=0) / plain optimisation passes: what the composed model, its
directions and the Adam steps cost on top of the passes themselves.

    python benchmarks/bench_learned.py --samples 64 --method divmerge
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_stream import insert_section, machine

SECTION = "## Learned coefficients (DivMerge, TRM): a step against its plain passes"


def run(cmd: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return time.perf_counter() - start, usage.ru_maxrss / 2**20


def plain_passes(expert: Path, texts: list[str], batch: int, epochs: int, terms: int) -> float:
    """Seconds of the optimisation's passes done plainly: epochs × ⌈N/batch⌉ × terms forward+backward."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(expert)
    model = AutoModelForSequenceClassification.from_pretrained(expert).eval()
    batches = [dict(tokenizer(texts[i : i + batch], truncation=True, max_length=64, padding=True, return_tensors="pt"))
               for i in range(0, len(texts), batch)]
    start = time.perf_counter()
    for _ in range(epochs):
        for b in batches:
            for _ in range(terms):
                model.zero_grad(set_to_none=True)
                torch.log_softmax(model(**b).logits, -1).amax(-1).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--method", default="divmerge", choices=["divmerge", "trm"])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--scratch", type=Path, default=Path("/work/bench-scratch/learned"))
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = ap.parse_args()
    import shutil

    from hf_contmerge.demo.experts import BASE_MODEL_DIR, build_experts
    from hf_contmerge.demo.run import _task_data
    from hf_contmerge.demo.tasks import load_tasks

    torch.set_num_threads(os.cpu_count() or 1)
    tasks = load_tasks()[:2]
    experts = build_experts(tasks, progress=False)
    data = [_task_data(t) for t in tasks]
    shutil.rmtree(args.scratch, ignore_errors=True)
    args.scratch.mkdir(parents=True)
    common = [sys.executable, "-m", "hf_contmerge.cli", "merge", "--base", str(BASE_MODEL_DIR()), "--stream", *map(str, experts),
              "--data", *map(str, data), "--method", args.method, "--calib-samples", str(args.samples), "--max-length", "64",
              "--quiet"]
    rows = []
    for epochs in (0, args.epochs):
        wall, rss = run([*common, "--set", f"epochs={epochs}", "--out", str(args.scratch / f"e{epochs}")])
        rows.append((epochs, wall, rss))
        print(f"merge, epochs={epochs}: {wall:.1f} s, peak RSS {rss:.2f} GiB", flush=True)
    terms = 2  # both forms' teachers: θt and θ(t−1) (TRM with beta > 0 as well)
    texts = tasks[1].train.select(range(min(args.samples, len(tasks[1].train))))["text"]
    plain = plain_passes(experts[1], texts, 4, args.epochs, terms)
    learned = rows[1][1] - rows[0][1]
    passes = args.epochs * math.ceil(len(texts) / 4) * terms
    print(f"plain passes: {plain:.1f} s for {passes} forward+backward; learned part of the step: {learned:.1f} s")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"### Run of {stamp}\n\nCommand: `python benchmarks/bench_learned.py --samples {args.samples} --method "
             f"{args.method} --epochs {args.epochs}`. Machine: {machine()}. Two demo experts (MiniLM-L6: sentiment, "
             f"subjectivity), {len(texts)} calibration samples of the second, batches of 4, {terms} teacher terms.\n\n"
             "| run | wall s | peak RSS GiB |\n|---|---|---|\n"
             + "".join(f"| merge, epochs={e} | {w:.1f} | {r:.2f} |\n" for e, w, r in rows)
             + f"| plain: {passes} forward+backward passes of the expert | {plain:.1f} | |\n\n"
             f"Learned part of the step (epochs={args.epochs} minus epochs=0): {learned:.1f} s, "
             f"{learned / plain:.2f}× the plain passes.\n")
    insert_section(args.results, block, SECTION)


if __name__ == "__main__":
    main()
