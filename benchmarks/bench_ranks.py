"""Several ranks against one process, side by side, on the 7B-layer-shape synthetic stream.

For each method (default ``opcm`` and ``task_arithmetic``) a base plus two fine-tunes of
``make_synthetic.py`` (Llama-2-7B widths, bf16, ``--depth`` decoder layers) are merged in two steps,
one ``hf-contmerge merge --resume`` per step, in three ways, one after the other in this run:

- ``1 process``: the engine's defaults (torch's default threads: every core for a whole-matrix
  kernel such as OPCM's SVDs);
- ``1 process, 1 thread``: ``OMP_NUM_THREADS=1``, the thread count of each rank below, so its
  step folders must be **bit-identical** to the ranks' (checked: sha256 of every file of step 2);
- ``N ranks``: ``torchrun --nproc_per_node N`` on 127.0.0.1 (gloo; torchrun gives each rank one
  thread), each rank executing its cost-balanced share of the step (``StepPlan.split``).

Each step is timed in a fresh measuring process (``bench_stream.run_measured``: wall time of the
whole command, Python start and ``torchrun`` included; peak RSS of the largest process), and is
followed by a plain copy of the bytes the step moved (``bench_stream.timed_copy``: the base's, the
item's and the previous step's state read, as many bytes as the step wrote written and fsynced),
so a step bounded by the disk can be read against it. Reported: each step's wall time, the speed-up
of the ranks over each single-process way, and merge/copy. The package is snapshotted first
(``--git-ref``) so the run measures one version.

    python benchmarks/bench_ranks.py --depth 1 --methods opcm task_arithmetic --ranks 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_synthetic
from bench_stream import folder_bytes, insert_section, machine, run_measured, snapshot_package, timed_copy, weight_files

SECTION = "## Several ranks against one process (torchrun, 7B layer shapes)"
ITEMS = 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ways(ranks: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Name -> (launcher prefix, environment)."""
    python = [sys.executable, "-m"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1"]
    return {"1 process": (python, {}), "1 process, 1 thread": (python, {"OMP_NUM_THREADS": "1"}),
            f"{ranks} ranks": ([*torchrun, "--master_port", "{port}", "-m"], {"OMP_NUM_THREADS": "1"})}


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            with open(p, "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["opcm", "task_arithmetic"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--scratch", type=Path, default=Path("/work/bench-scratch"))
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--git-ref", default="HEAD", help="commit of hf_contmerge to measure, or 'worktree'")
    args = parser.parse_args()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    args.scratch.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now().astimezone()
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    code = snapshot_package(args.git_ref, args.scratch)
    log(f"measuring {code.source}")
    inputs = args.scratch / f"llama-d{args.depth}"
    subprocess.run([sys.executable, str(Path(make_synthetic.__file__)), "--depth", str(args.depth), "--items", str(ITEMS),
                    "--out", str(inputs)], check=True, env={**os.environ, **code.env()}, cwd=args.scratch)
    base, *items = [inputs / n for n in make_synthetic.folder_names(ITEMS)]
    rows, identical = [], {}
    for method in args.methods:
        hashes = {}
        for way, (launcher, env) in ways(args.ranks).items():
            run = args.scratch / f"ranks-{method}-{way.replace(' ', '').replace(',', '-')}"
            shutil.rmtree(run, ignore_errors=True)
            for t in range(1, ITEMS + 1):
                prefix = [a.replace("{port}", str(_port())) for a in launcher]
                cmd = [*prefix, "hf_contmerge", "merge", "--base", str(base), "--stream", *map(str, items[:t]), "--method",
                       method, "--out", str(run), "--resume", "--quiet"]
                load1 = os.getloadavg()[0]
                wall, rss, _ = run_measured(cmd, {**code.env(), **env}, args.scratch)
                moved = weight_files(base) + weight_files(items[t - 1])
                if t > 1:
                    moved += weight_files(run / f"step-{t - 1}" / "contmerge_state")
                written = folder_bytes(run / f"step-{t}")
                copy_s, _ = timed_copy(moved, written, args.scratch)
                rows.append((method, t, way, wall, copy_s, rss, load1))
                log(f"{method} step {t} {way}: {wall:.1f} s (copy {copy_s:.1f} s), peak RSS {rss / 2**20:.2f} GiB, load {load1:.1f}")
            hashes[way] = digest(run / f"step-{ITEMS}")
            shutil.rmtree(run)
        one_thread, ranked = hashes["1 process, 1 thread"], hashes[f"{args.ranks} ranks"]
        identical[method] = one_thread == ranked
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    names = list(ways(args.ranks))
    head = (f"| method | step | {' | '.join(f'{n} s' for n in names)} | speed-up over 1 process | over 1 process, 1 thread | "
            f"plain copy s | {names[-1]}: merge/copy time | peak RSS GiB (largest process) |\n" + "|---" * (len(names) + 7) + "|\n")
    body = ""
    for method in args.methods:
        for t in range(1, ITEMS + 1):
            r = {row[2]: row for row in rows if row[:2] == (method, t)}
            walls = [r[n][3] for n in names]
            body += (f"| {method} | {t} | {' | '.join(f'{w:.1f}' for w in walls)} | {walls[0] / walls[-1]:.2f}× | "
                     f"{walls[1] / walls[-1]:.2f}× | {r[names[-1]][4]:.1f} | {walls[-1] / r[names[-1]][4]:.2f} | "
                     f"{' / '.join(f'{r[n][5] / 2**20:.2f}' for n in names)} |\n")
    block = (
        f"### Run of {started:%Y-%m-%d %H:%M %Z}\n\n"
        f"Command: `python benchmarks/bench_ranks.py {shlex.join(sys.argv[1:])}` (depth {args.depth}: "
        f"{make_synthetic.model_bytes(args.depth) / 1e9:.2f} GB per model, base + {ITEMS} fine-tunes)\n\n"
        f"Code: {code.source}\n\nMachine: {machine()}\n\n"
        f"Load: before `{uptime_before}`; after `{uptime_after}`.\n\n"
        + head + body + "\n"
        + "".join(f"Step {ITEMS} of {m} on {args.ranks} ranks is {'bit-identical' if same else 'NOT bit-identical'} to 1 "
                  "process with 1 thread (sha256 of every file).\n" for m, same in identical.items())
    )
    shutil.rmtree(code.path)
    print("\n" + block)
    insert_section(args.results, block, SECTION)
    log(f"appended to {args.results}")


if __name__ == "__main__":
    main()
