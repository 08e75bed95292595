"""Dense OPCM at 7B layer shapes: step time against the sum of its SVDs alone, and peak RSS.

An OPCM step t ≥ 2 takes one thin SVD per linear weight (for a Llama-7B layer: four 4096×4096 and
three 11008×4096 matrices; for the model, also ``lm_head``, 32000×4096), then a global rescale that needs a second pass
over the model. The SVDs
are the irreducible cost; everything else (reading, projecting, two passes, writing) is overhead.
This script times, in one run on the same machine and thread count:

1. the SVDs alone: ``methods.opcm_kernels.thin_svd`` on float32 random matrices of every linear weight's shape,
   each timed once, summed;
2. ``hf-contmerge merge --method opcm`` step 2 (the first step with projections) on a synthetic
   stream (``make_synthetic.py``), as a subprocess, with its wall time and peak RSS (``wait4``),
   once per dense kernel: ``kernel=svd`` (thin SVD for every matrix: the previous version's
   behaviour) and ``kernel=auto`` (the default: the Gram kernel for long matrices), side by side.

Target (issue): step time within 20 % of the SVD sum, peak RSS under 3 GiB. The table also shows
what step 2 reports about the diagonal entries OPCM left in place (``diagonal_kept``, their share
of ‖τt‖², ``diagonal_null``).

``--git-ref REF`` (repeatable) measures those commits instead of the working tree, each from a
snapshot of the package (``bench_stream.snapshot_package``), kernel by kernel in turn, so two
versions are compared side by side in one run.

    python benchmarks/bench_opcm.py --depth 1 --scratch /work/bench-scratch
    python benchmarks/bench_opcm.py --depth 1 --git-ref 86278f0 --git-ref HEAD
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_stream import insert_section, machine, run_measured, snapshot_package
from make_synthetic import ensure, llama_config, llama_shapes

from hf_contmerge.methods.opcm_kernels import thin_svd

SECTION = "## OPCM (dense) at 7B layer shapes"


def svd_seconds(depth: int) -> float:
    """Sum of one thin SVD per weight the engine projects: every linear weight of the model as
    ``naming.linear_weight_layout`` finds it (the same call OPCM makes), ``lm_head`` included."""
    from hf_contmerge.sources.naming import linear_weight_layout

    linear = linear_weight_layout(llama_config(depth))
    total = 0.0
    g = torch.Generator().manual_seed(0)
    for name, shape in llama_shapes(depth):
        if name in linear:
            x = torch.randn(shape, generator=g) * 0.002
            t0 = time.perf_counter()
            thin_svd(x)
            total += time.perf_counter() - t0
    return total


def diagonal(step: Path) -> str:
    """What OPCM reported about the diagonal entries it left in place (versions that report it)."""
    import json

    scalars = json.loads((step / "contmerge_state.json").read_text())["scalars"]
    if "diagonal_kept" not in scalars:
        return "not reported"
    return f"{scalars['diagonal_kept']} ({scalars['diagonal_kept_share']:.2g}) / {scalars['diagonal_null']}"


def commit() -> str:
    import subprocess

    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()


def load() -> str:
    """1-minute load average: this script's timings assume an otherwise idle machine."""
    import os

    return f"{os.getloadavg()[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--scratch", type=Path, default=Path("/work/bench-scratch"))
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "RESULTS.md")
    parser.add_argument("--git-ref", dest="refs", action="append", default=[],
                        help="commit to measure (repeatable; default: the working tree as installed)")
    parser.add_argument("--kernel", dest="kernels", action="append", choices=["svd", "auto"], default=[],
                        help="dense kernel to run (repeatable; default: svd and auto)")
    args = parser.parse_args()
    folders = ensure(args.scratch / f"llama-d{args.depth}-opcm", args.depth, 2)
    base, items = folders[0], folders[1:]
    here = Path(__file__).parent.parent
    # name -> (environment, working directory, description); a snapshot runs outside the repo, or
    # ``python -m`` would import the repo's package (the working directory comes first on sys.path)
    codes = {"worktree": ({}, here, f"commit {commit()} (working tree)")} if not args.refs else {}
    for ref in args.refs:
        code = snapshot_package(ref, args.scratch / f"opcm-code-{len(codes)}")
        codes[ref] = (code.env(), args.scratch, code.source)
    load_before = load()
    runs = {}
    kernels = args.kernels or ["svd", "auto"]
    for kernel in kernels:
        for name, (env, cwd, _) in codes.items():
            out = args.scratch / f"opcm-d{args.depth}-{kernel}-out"
            if out.exists():
                shutil.rmtree(out)
            cli = [sys.executable, "-m", "hf_contmerge.cli", "merge", "--base", str(base), "--method", "opcm",
                   "--set", f"kernel={kernel}", "--out", str(out), "--quiet"]
            step1 = run_measured([*cli, "--stream", str(items[0])], env, cwd)
            step2 = run_measured([*cli, "--stream", *map(str, items), "--resume"], env, cwd)
            runs[name, kernel] = (step1, step2, diagonal(out / "step-2"))
            print(f"{name} {kernel}: step 1 {step1[0]:.1f} s, step 2 {step2[0]:.1f} s, {step2[1] / 2**20:.2f} GiB", flush=True)
    svd = svd_seconds(args.depth)
    rows = [
        "| code | depth | kernel | SVDs alone (s) | OPCM step 2 wall (s) | overhead | step 2 peak RSS | step 1 wall (s) "
        "| step 1 peak RSS | diagonal entries kept (share) / null |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, kernel), (step1, step2, diag) in runs.items():
        rows.append(
            f"| {name} | {args.depth} | {kernel} | {svd:.1f} | {step2[0]:.1f} | {100 * (step2[0] / svd - 1):+.0f} % | "
            f"{step2[1] / 2**20:.2f} GiB | {step1[0]:.1f} | {step1[1] / 2**20:.2f} GiB | {diag} |"
        )
    rows.append("")
    for name in codes if len(kernels) == 2 else ():
        rows.append(f"Step 2 of {name}, auto against svd kernel (same run): time "
                    f"{runs[name, 'auto'][1][0] / runs[name, 'svd'][1][0]:.2f}x, "
                    f"peak RSS {runs[name, 'auto'][1][1] / runs[name, 'svd'][1][1]:.2f}x.")
    if len(codes) == 2:
        a, b = codes
        for kernel in kernels:
            rows.append(f"Kernel {kernel}, {b} against {a}: step 2 time {runs[b, kernel][1][0] / runs[a, kernel][1][0]:.2f}x, "
                        f"step 1 time {runs[b, kernel][0][0] / runs[a, kernel][0][0]:.2f}x, "
                        f"step 2 peak RSS {runs[b, kernel][1][1] / runs[a, kernel][1][1]:.2f}x.")
    sources = "; ".join(f"`{name}` = {source}" for name, (_, _, source) in codes.items())
    block = "\n".join([
        f"### {date.today().isoformat()}: depth {args.depth}",
        "",
        f"Command: `python benchmarks/bench_opcm.py {' '.join(sys.argv[1:])}`. Code: {sources}. "
        f"Machine: {machine()}. Load before / after: {load_before} / {load()}.",
        "",
        *rows,
    ])
    print(block)
    insert_section(args.results, block, SECTION)


if __name__ == "__main__":
    main()
