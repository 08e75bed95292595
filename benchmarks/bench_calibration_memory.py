"""Peak memory of a data-dependent merge: resident against a device map that offloads to disk.

Stream: the synthetic Llama with 7B layer shapes (``make_synthetic.py``: hidden 4096, intermediate
11008, vocabulary 32000, bf16 files), ``--depth`` layers, base + ``--items`` fine-tunes. Each
``hf-contmerge merge --method fisher`` step builds the fine-tune in float32 for its Fisher (at depth
1: 1.86 GB of weights, plus 1.86 GB of float32 accumulators), takes it on ``--samples`` random token
sequences, and streams the merge. Run as separate processes, for T = 1, 2 and ``--items`` steps:

1. ``resident``: no device map, the whole model and its accumulators in RAM;
2. ``offload``: ``--device-map auto --max-memory cpu=BUDGET --offload-folder``: Accelerate keeps
   ``BUDGET`` of weights in RAM and the rest on disk, the accumulators of disk-offloaded modules are
   file-backed (``calibration/fisher.py``).

Measured per process: peak RSS (``wait4``'s ``ru_maxrss``) and the peak of its anonymous memory
(``RssAnon`` in ``/proc/PID/status``, sampled every 20 ms): file-backed pages (the mmapped
checkpoints, offloaded weights and accumulators) count in RSS while resident but are the page
cache's, which the kernel reclaims under pressure; anonymous memory is what the process holds.
Targets (issue 10): offloaded peak bounded by the map, not the model; flat in stream length.

    python benchmarks/bench_calibration_memory.py --depth 1 --items 3 --budget 512MB
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import make_synthetic
from bench_stream import insert_section, machine

SECTION = "## Calibration: peak memory under a device map with disk offload"
GiB = 2**30


def token_data(path: Path, n: int, length: int, vocab: int) -> Path:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (n, length), generator=g).tolist()
    path.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in ids))
    return path


def measured(cmd: list[str]) -> tuple[float, float, float]:
    """Run ``cmd``; wall seconds, peak RSS and peak anonymous memory (GiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_anon = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_anon
        status = Path(f"/proc/{proc.pid}/status")
        while not done.is_set():
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak_anon = max(peak_anon, int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024 / GiB, peak_anon / GiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--items", type=int, default=3)
    ap.add_argument("--budget", default="512MB", help="--max-memory cpu=BUDGET of the offload runs")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--scratch", type=Path, default=Path("/work/bench-scratch"))
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = ap.parse_args()

    folders = make_synthetic.ensure(args.scratch / f"llama-d{args.depth}", args.depth, args.items)
    base, items = folders[0], folders[1 : 1 + args.items]
    work = args.scratch / "calib-memory"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = token_data(work / "tokens.jsonl", args.samples, args.length, 32000)
    rows = []
    for variant in ("resident", "offload"):
        for steps in sorted({1, 2, args.items}):
            out = work / f"{variant}-{steps}"
            cmd = [sys.executable, "-m", "hf_contmerge.cli", "merge", "--base", str(base), "--stream", *map(str, items[:steps]),
                   "--data", *[str(data)] * steps, "--method", "fisher", "--set", "fisher=batch", "--calib-samples",
                   str(args.samples), "--calib-batch-size", str(args.samples), "--out", str(out), "--quiet"]
            if variant == "offload":
                cmd += ["--device-map", "auto", "--max-memory", f"cpu={args.budget}", "--offload-folder", str(work / "offload")]
            wall, rss, anon = measured(cmd)
            rows.append((variant, steps, wall, rss, anon))
            print(f"{variant:>9} T={steps}: {wall:7.1f} s  peak RSS {rss:.2f} GiB  peak anonymous {anon:.2f} GiB", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(work / "offload", ignore_errors=True)
    model_gib = make_synthetic.model_bytes(args.depth) * 2 / GiB  # float32, as calibration builds it
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table = ("| variant | steps | wall s | peak RSS GiB | peak anonymous GiB |\n|---|---|---|---|---|\n"
             + "".join(f"| {v} | {s} | {w:.1f} | {r:.2f} | {a:.2f} |\n" for v, s, w, r, a in rows))
    block = (f"### Run of {stamp}\n\nCommand: `python benchmarks/bench_calibration_memory.py --depth {args.depth} --items "
             f"{args.items} --budget {args.budget}`. Machine: {machine()}. Model in float32: {model_gib:.2f} GiB of weights "
             f"(+ as much in Fisher accumulators); method fisher (batch form), {args.samples} samples of {args.length} "
             f"tokens per step.\n\n{table}")
    insert_section(args.results, block, SECTION)
    print(block)


if __name__ == "__main__":
    main()
