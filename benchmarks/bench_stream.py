"""Throughput, peak memory and step-time flatness of the streaming engine at 7B layer shapes.

For each depth D (decoder layers of a Llama-2-7B-shaped model, see ``make_synthetic.py``) and each
method, a base plus ``--items`` fine-tunes are merged one step per ``hf-contmerge merge`` process
(``--resume`` adds one step at a time, so every step is timed on its own):

- **code**: the package is snapshotted once at the start (``git archive`` of ``--git-ref``, default
  HEAD, or the working tree as it is with ``--git-ref worktree``) into the scratch folder, and every
  step runs that snapshot (``PYTHONPATH``, working directory outside the repo), so a run measures
  one version of the engine even while the repository changes; the commit is recorded.
- **merge**: ``hf-contmerge merge --base B --stream ft-1 … ft-t --method M --out RUN --resume
  --quiet`` as a subprocess of a fresh, small measuring Python process, which reports
  ``getrusage(RUSAGE_CHILDREN)`` after it: ``ru_maxrss`` (peak RSS) and ``ru_utime + ru_stime`` of
  exactly the merge process. (Reading ``wait4`` from this script instead would be wrong: Linux
  carries the RSS high-water mark of the image a child is forked from across ``exec``, so a child
  of a large parent reports at least the parent's peak.) Wall time is measured around the merge in
  the measuring process: the whole merge process (Python start, imports, pre-flight, merge, fsyncs,
  rename). ``--variant`` runs the same steps again with other flags or environment (e.g.
  ``omp1=OMP_NUM_THREADS=1``); the default is the engine's defaults.
- **bytes** from file sizes: read = the base's and the item's ``*.safetensors`` plus, for t ≥ 2, the
  previous step's ``contmerge_state/*.safetensors`` (what the engine reads; config files are a few
  KB and not counted); written = every file of the new step folder.
- **copy** of the same bytes, right after the merge of the same step, in this process: read the
  same input files in the same order in 16 MiB ``readinto`` blocks, writing each block out until as
  many bytes as the step wrote have been written (when the inputs are shorter, as at step 1, the
  last block is written again until the count is reached). Output goes to files of at most 2 GiB in
  the same scratch folder, each flushed, fsynced (the engine fsyncs every shard too) and deleted
  once closed, so the copy needs 2 GiB of disk. Nothing is dropped from the page cache before
  either; running the copy second means it reads inputs the merge has just read, which can only
  favour the copy (conservative for the merge/copy ratio).
- **floor copy**: the least a continual step must move, copied plainly right after: read the base's,
  the new item's and the previous step's published weight files, write as many bytes as the step's
  published model (fsynced). ``merge ÷ floor copy`` is the step's time over it (issue 15's target:
  ≤ 1.5), and ``written ÷ published`` what the step wrote over its published model (target ≤ 2).
  Bytes read are the engine's own count (``--verbose``) where the measured version has it.
- **engine step**: each step runs in a process of its own (``--resume``), so ``merge s`` includes the
  process's start-up (its imports, ~1.5 s, measured below) and the sources' resolution, which a stream
  merged in one process (``--stream A B C …``) pays once, not at every step. ``engine step s`` is the
  step as the engine times it (``--verbose``: from its plan to the published folder: every read, kernel,
  write and fsync), and ``engine step ÷ floor copy`` the per-step cost of such a stream against the floor.
- **settle**: before every timed operation (merge, copy, floor copy, mergekit) the script syncs and
  waits ``--settle`` seconds (default 3). This project's machines are virtual machines that hand freed
  guest memory back to their host about 2 s after it is freed (free page reporting), and a page
  touched afresh then costs several times one reused at once: writing 0.97 GB into a new file took
  0.8–1.4 s of CPU after a pause of 1–5 s, 0.18 s right after deleting another file of that size
  (``benchmarks/first_touch.py``). Without the pause the two copies, run right after something freed
  memory, reused warm pages while every merge (a new process) wrote into cold ones; with it every
  operation starts from the same cold pool, as a step run after any idle time does.
- **ratio** = merge throughput / copy throughput, both (read + written) bytes per second.
- **flatness**: merge time of step T / step 2; the same ratio for the copies (steps t ≥ 2 move
  identical bytes, so it is the machine's own drift: load, disk); and the first divided by the
  second, the drift-corrected figure.
- **mergekit one-shot** (``--mergekit PATH`` to its ``mergekit-yaml``, or one on PATH; skipped with a
  note otherwise): what a user without a continual tool runs at every new fine-tune, ``mergekit-yaml``
  over the base and the first t items (t = 2, 4, 8 up to ``--items``): ``task_arithmetic`` with weight
  λ = 0.3 each, or ``linear`` (equal weights) for ``average``, float32 arithmetic and bfloat16 out as
  ours (the last one checked against the formula like ours), under the same measuring
  process; against our step t and our whole stream up to t. ``magmax`` (``--methods magmax``) has no
  mergekit counterpart and is measured alone. mergekit 0.1.5 installs from PyPI beside the
  project's packages: ``python -m venv V && echo $(.venv site-packages) > V/lib/python3.11/site-packages/
  project.pth && V/bin/pip install mergekit==0.1.5`` (it adds only immutables, sentencepiece, protobuf).
- Inputs are generated by ``make_synthetic.py`` in a subprocess (cached between runs).
- After the last step, a few rows of ``lm_head.weight`` and ``model.norm.weight`` are checked
  against the method's formula computed from the inputs with the ``safetensors`` library, so the
  timed work is a real merge.

Results are printed as markdown and inserted into ``benchmarks/RESULTS.md`` under the section
"Streaming engine: data-free methods at 7B layer shapes", with the command, machine and date.
Scratch data lives under ``--scratch`` (default /work/bench-scratch): the synthetic models of one
depth (``(items + 1) × M``) and at most two step folders (``2 × 3M``: bf16 weights plus the
float32 carried state) at a time; it is deleted afterwards unless ``--keep-inputs``.

    python benchmarks/bench_stream.py --depths 2 4 8 --methods average task_arithmetic --items 4
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_synthetic

SECTION = "## Streaming engine: data-free methods at 7B layer shapes"
BLOCK = 16 * 2**20
COPY_FILE_BYTES = 2 * 2**30
GB = 1e9
REPO = Path(__file__).resolve().parent.parent
# The measuring process: runs argv[1:] and prints wall seconds, peak RSS (KiB) and CPU seconds of it.
MEASURE = (
    "import resource, subprocess, sys, time\n"
    "t0 = time.perf_counter()\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)\n"
    "wall = time.perf_counter() - t0\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "sys.stderr.buffer.write(rc.stdout)\n"
    "print(wall, u.ru_maxrss, u.ru_utime + u.ru_stime)\n"
    "sys.exit(rc.returncode)\n"
)
SCALING = 0.3  # task_arithmetic's default λ, used by the correctness check
MAGMAX_SCALING = 0.5  # magmax's default λ (no mergekit counterpart: measured alone)


@dataclass(frozen=True)
class Variant:
    """A named way of running the merge: extra ``hf-contmerge merge`` flags and environment variables."""

    name: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``NAME=[ENV=VALUE ...] [--flag value ...]``, e.g. ``tuned=OMP_NUM_THREADS=1 --chunk-mb 16``."""
        name, _, rest = text.partition("=")
        tokens = shlex.split(rest)
        env = tuple(tuple(t.split("=", 1)) for t in tokens if "=" in t and not t.startswith("-"))
        args = tuple(t for t in tokens if not ("=" in t and not t.startswith("-")))
        return cls(name, args, env)  # type: ignore[arg-type]

    def describe(self) -> str:
        return " ".join([*(f"{k}={v}" for k, v in self.env), *self.args]) or "engine defaults"


@dataclass
class StepRow:
    depth: int
    method: str
    variant: str
    step: int
    read: int
    written: int
    merge_s: float
    copy_s: float
    copy_bytes: int
    rss_kib: int
    cpu_s: float
    load1: float
    floor_s: float = float("nan")  # the plain copy of what a continual step must move at the least
    published: int = 0  # bytes of the step's published model files
    engine_s: float = float("nan")  # the step as the engine times it (--verbose), without the process start-up

    @property
    def engine_floor_ratio(self) -> float:
        return self.engine_s / self.floor_s

    @property
    def floor_ratio(self) -> float:
        """Merge time over the floor copy's time (target ≤ 1.5)."""
        return self.merge_s / self.floor_s

    @property
    def merge_gbps(self) -> float:
        return (self.read + self.written) / self.merge_s / GB

    @property
    def copy_gbps(self) -> float:
        return self.copy_bytes / self.copy_s / GB

    @property
    def ratio(self) -> float:
        return self.merge_gbps / self.copy_gbps


# ---------------------------------------------------------------------------------------- measuring
def weight_files(folder: Path, pattern: str = "*.safetensors") -> list[Path]:
    return sorted(folder.glob(pattern))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@dataclass(frozen=True)
class Code:
    """The package snapshot every merge runs: ``PYTHONPATH`` entry and what it was taken from."""

    path: Path
    source: str
    verbose: bool = False  # the snapshot's merge has --verbose (reports the bytes a step read)

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.path)}


def snapshot_package(ref: str, scratch: Path) -> Code:
    """Copy ``hf_contmerge`` (and its ``model_cards`` subpackage) at ``ref`` or the working tree."""
    dest = scratch / "pkg"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    git = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
    if ref == "worktree":
        shutil.copytree(REPO / "hf_contmerge", dest / "hf_contmerge", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(REPO / "model_cards", dest / "model_cards")
        dirty = git("status", "--porcelain", "hf_contmerge", "model_cards")
        source = f"working tree on {git('rev-parse', '--short', 'HEAD')}" + (" with uncommitted changes" if dirty else "")
    else:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "hf_contmerge", "model_cards"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        subject = git("log", "-1", "--format=%s", ref)
        source = f"commit {git('rev-parse', '--short', ref)} ({subject[:90] + ('…' if len(subject) > 90 else '')})"
    (dest / "model_cards").rename(dest / "hf_contmerge" / "model_cards")  # where the installed package has it
    verbose = "verbose: bool" in (dest / "hf_contmerge" / "options.py").read_text()
    return Code(dest, source, verbose)


def engine_defaults(code: Code, scratch: Path) -> str:
    """The merge options that shape the I/O, as the measured snapshot defines their defaults."""
    probe = ("from hf_contmerge.options import MergeOptions as M; f = M.model_fields; "
             "print(f'--device {f[\"device\"].default} --chunk-mb {f[\"chunk_mb\"].default:g} --shard-size {f[\"shard_size\"].default}')")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=scratch, env={**os.environ, **code.env()})
    return f"`{out.stdout.strip()}`" if out.returncode == 0 else "unknown"


def run_measured(cmd: list[str], env: dict[str, str], cwd: Path, output: list[str] | None = None) -> tuple[float, int, float]:
    """Run ``cmd`` under a fresh measuring process; its wall seconds, peak RSS (KiB), CPU seconds (and its
    output appended to ``output``)."""
    proc = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **env})
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed with {proc.returncode}:\n{proc.stderr}")
    if output is not None:
        output.append(proc.stderr)
    wall, rss, cpu = proc.stdout.split()
    return float(wall), int(rss), float(cpu)


def settle(seconds: float) -> None:
    """Sync, then let the host take back what was freed (see the module docstring) before a timed operation."""
    os.sync()
    time.sleep(seconds)


def timed_copy(inputs: list[Path], n_write: int, scratch: Path) -> tuple[float, int]:
    """Read every byte of ``inputs`` and write ``n_write`` bytes (see the module docstring).

    Returns the seconds taken and the bytes moved (read + written).
    """
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    state = {"written": 0, "in_file": 0, "part": 0, "f": None}

    def next_file() -> None:
        close_file()
        state["f"] = open(scratch / f"copy-{state['part']}.bin", "wb", buffering=0)
        state["part"] += 1
        state["in_file"] = 0

    def close_file() -> None:
        f = state["f"]
        if f is not None:
            os.fsync(f.fileno())
            f.close()
            os.unlink(f.name)  # written and durable; deleting keeps the copy's disk use at 2 GiB
            state["f"] = None

    def emit(data: memoryview) -> None:
        while len(data) and state["written"] < n_write:
            if state["f"] is None or state["in_file"] >= COPY_FILE_BYTES:
                next_file()
            n = min(len(data), n_write - state["written"], COPY_FILE_BYTES - state["in_file"])
            state["f"].write(data[:n])
            state["written"] += n
            state["in_file"] += n
            data = data[n:]

    t0 = time.perf_counter()
    n_read = last = 0
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while got := f.readinto(buf):
                n_read += got
                last = got
                emit(view[:got])
    while state["written"] < n_write:  # inputs shorter than the output: rewrite the last block
        emit(view[:last])
    close_file()
    return time.perf_counter() - t0, n_read + state["written"]


def startup_seconds(code: Code, scratch: Path) -> float:
    """Wall time of ``hf-contmerge methods``: Python start plus the package's imports."""
    return run_measured([sys.executable, "-m", "hf_contmerge.cli", "methods"], code.env(), scratch)[0]


# ---------------------------------------------------------------------------------------- one run
def check_merge(method: str, base: Path, items: list[Path], step_folder: Path) -> None:
    """The published weights match the method's formula on a few rows (bf16 tolerance)."""
    rows = slice(0, 64)

    def get(folder: Path, key: str) -> torch.Tensor:
        for path in weight_files(folder):
            with safe_open(str(path), "pt") as f:
                if key in f.keys():
                    t = f.get_slice(key)
                    return (t[rows] if len(t.get_shape()) > 1 else t[:]).float()
        raise KeyError(key)

    for key in ("lm_head.weight", "model.norm.weight"):
        b, fts = get(base, key), [get(f, key) for f in items]
        if method == "magmax":  # the largest-magnitude task-vector entry so far (ties to the newer), λ 0.5
            tau_max = fts[0] - b
            for f in fts[1:]:
                tau_max = torch.where((f - b).abs() >= tau_max.abs(), f - b, tau_max)
            expected = b + MAGMAX_SCALING * tau_max
        else:
            expected = torch.stack(fts).mean(0) if method == "average" else b + SCALING * sum(f - b for f in fts)
        torch.testing.assert_close(get(step_folder, key), expected.bfloat16().float(), rtol=1.6e-2, atol=1e-5)


def bench_method(depth: int, method: str, variant: Variant, folders: list[Path], scratch: Path, code: Code, log,
                 pause: float) -> list[StepRow]:
    base, items = folders[0], folders[1:]
    run = scratch / f"run-d{depth}-{method}-{variant.name}"
    shutil.rmtree(run, ignore_errors=True)
    rows = []
    for t in range(1, len(items) + 1):
        prev = run / f"step-{t - 1}"
        inputs = weight_files(base) + weight_files(items[t - 1])
        if t > 1:
            inputs += weight_files(prev / "contmerge_state")
            if '"weight_slot": "' in (prev / "contmerge_state.json").read_text():  # format 3: read over the weights
                inputs += weight_files(prev)
        cmd = [sys.executable, "-m", "hf_contmerge.cli", "merge", "--base", str(base), "--stream", *map(str, items[:t]),
               "--method", method, "--out", str(run), "--resume", *variant.args,
               "--quiet", *(["--verbose"] if code.verbose else [])]
        load1 = os.getloadavg()[0]
        output: list[str] = []
        settle(pause)
        wall, rss, cpu = run_measured(cmd, {**code.env(), **dict(variant.env)}, scratch, output)
        step = run / f"step-{t}"
        written, published = folder_bytes(step), sum(p.stat().st_size for p in weight_files(step))
        # what the engine read, as it reports it (--verbose); an older engine: the files it reads whole
        said = re.search(rf"step {t}: read ([\d.]+) GB", output[0])
        read = round(float(said.group(1)) * GB) if said else sum(p.stat().st_size for p in inputs)
        timed = re.search(rf"step {t}: read .* in ([\d.]+) s", output[0])
        settle(pause)
        copy_s, copy_bytes = timed_copy(inputs, written, scratch)
        # the least a continual step moves: read the base, the new model and the previous published model, write one
        settle(pause)
        floor_s, _ = timed_copy(weight_files(base) + weight_files(items[t - 1]) + (weight_files(prev) if t > 1 else []),
                                published, scratch)
        if t > 1:
            shutil.rmtree(prev)  # a resume needs only the last step; keeps the disk to two steps
        row = StepRow(depth, method, variant.name, t, read, written, wall, copy_s, copy_bytes, rss, cpu, load1, floor_s,
                      published, float(timed.group(1)) if timed else float("nan"))
        log(f"  d{depth} {method} {variant.name} step {t}: merge {wall:.1f}s {row.merge_gbps:.3f} GB/s, copy {copy_s:.1f}s "
            f"{row.copy_gbps:.3f} GB/s, ratio {row.ratio:.2f}, floor copy {floor_s:.1f}s ({row.floor_ratio:.2f}×), "
            f"engine step {row.engine_s:.1f}s ({row.engine_floor_ratio:.2f}×), "
            f"written/published {written / published:.2f}, RSS {rss / 2**20:.2f} GiB, CPU {cpu:.1f}s, load {load1:.1f}")
        rows.append(row)
    check_merge(method, base, items, run / f"step-{len(items)}")
    shutil.rmtree(run)
    return rows


@dataclass
class OneShotRow:
    depth: int
    method: str
    t: int
    wall_s: float
    rss_kib: int
    ours_step_s: float  # our continual step t (same depth and method, default variant)
    ours_total_s: float  # our steps 1..t


# float32 arithmetic, bfloat16 out, as ours (``dtype: bfloat16`` is faster but rounds every operation: its
# result is off by a bfloat16 step in places)
DTYPES = "dtype: float32\nout_dtype: bfloat16\n"


def mergekit_config(method: str, base: Path, items: list[Path]) -> str:
    """The mergekit YAML that merges ``items`` over ``base`` as ``method`` does in one shot (paths as JSON
    strings, which YAML reads as they are)."""
    if method == "average":
        models = "".join(f"  - model: {json.dumps(str(p))}\n    parameters:\n      weight: 1.0\n" for p in items)
        return f"merge_method: linear\n{DTYPES}models:\n{models}"
    models = "".join(f"  - model: {json.dumps(str(p))}\n    parameters:\n      weight: {SCALING}\n" for p in items)
    return f"merge_method: task_arithmetic\nbase_model: {json.dumps(str(base))}\n{DTYPES}parameters:\n  normalize: false\nmodels:\n{models}"


def bench_mergekit(exe: str, depth: int, method: str, folders: list[Path], scratch: Path, ours: list[StepRow],
                   log, pause: float) -> list[OneShotRow]:
    base, items = folders[0], folders[1:]
    rows = []
    for t in (2, 4, 8):
        if t > len(items):
            break
        config, out = scratch / f"mergekit-{method}-{t}.yml", scratch / f"mergekit-out-d{depth}"
        config.write_text(mergekit_config(method, base, items[:t]))
        shutil.rmtree(out, ignore_errors=True)
        settle(pause)
        wall, rss, _ = run_measured([exe, str(config), str(out), "--no-copy-tokenizer", "--quiet", "--no-write-model-card"],
                                    {}, scratch)
        if t == len(items):  # the same merge as our last step: the same formula, so bfloat16-close weights
            check_merge(method, base, items, out)
        shutil.rmtree(out)
        config.unlink()
        mine = [r for r in ours if r.step <= t]
        rows.append(OneShotRow(depth, method, t, wall, rss, mine[-1].merge_s, sum(r.merge_s for r in mine)))
        log(f"  d{depth} {method} mergekit one-shot of {t}: {wall:.1f}s, RSS {rss / 2**20:.2f} GiB "
            f"(ours: step {t} {rows[-1].ours_step_s:.1f}s, steps 1..{t} {rows[-1].ours_total_s:.1f}s)")
    return rows


def disk_plan(depth: int, items: int, scratch: Path) -> tuple[float, float]:
    """(GB this depth needs beyond what is already on disk, GB free now)."""
    m = make_synthetic.model_bytes(depth)
    have = make_synthetic.MANIFEST in {p.name for p in scratch.glob(f"llama-d{depth}/*")}
    need = (0 if have else (items + 1) * m) + 2 * 3 * m + COPY_FILE_BYTES
    return need / GB, shutil.disk_usage(scratch).free / GB


# ---------------------------------------------------------------------------------------- report
def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    src = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", "/work"], capture_output=True, text=True).stdout.strip()
    return (f"nproc {os.cpu_count()} ({cpu}), RAM {mem:.1f} GiB, torch {torch.__version__}, Python "
            f"{platform.python_version()}, disk {src or '?'} (scratch on the same filesystem)")


def step_table(rows: list[StepRow]) -> str:
    head = ("| depth | method | variant | step | read GB | written GB | written ÷ published | merge s | merge GB/s | "
            "copy s | copy GB/s | merge/copy | floor copy s | merge ÷ floor copy | engine step s | engine step ÷ floor copy | "
            "peak RSS GiB | CPU s | load (1 min) |\n" + "|---" * 19 + "|\n")
    return head + "".join(
        f"| {r.depth} | {r.method} | {r.variant} | {r.step} | {r.read / GB:.2f} | {r.written / GB:.2f} | "
        f"{r.written / r.published:.2f} | {r.merge_s:.1f} | {r.merge_gbps:.3f} | {r.copy_s:.1f} | {r.copy_gbps:.3f} | "
        f"{r.ratio:.2f} | {r.floor_s:.1f} | {r.floor_ratio:.2f} | {r.engine_s:.1f} | {r.engine_floor_ratio:.2f} | "
        f"{r.rss_kib / 2**20:.2f} | {r.cpu_s:.1f} | {r.load1:.1f} |\n"
        for r in rows)


def summary_table(rows: list[StepRow]) -> str:
    head = ("| depth | model GB | method | variant | merge GB/s | copy GB/s | merge/copy (≥ 0.7) | max peak RSS GiB (< 2) | "
            "step 2 s | step T s | T/2 (within ±15 %) | copy T/2 | T/2 ÷ copy T/2 | steps ÷ floor copies (≤ 1.5) | "
            "engine steps ÷ floor copies | max written ÷ published (≤ 2) |\n" + "|---" * 16 + "|\n")
    out = []
    for depth, method, variant in dict.fromkeys((r.depth, r.method, r.variant) for r in rows):
        rs = [r for r in rows if (r.depth, r.method, r.variant) == (depth, method, variant)]
        merge = sum(r.read + r.written for r in rs) / sum(r.merge_s for r in rs) / GB
        copy = sum(r.copy_bytes for r in rs) / sum(r.copy_s for r in rs) / GB
        s2, st = rs[1].merge_s if len(rs) > 1 else float("nan"), rs[-1].merge_s
        c2, ct = rs[1].copy_s if len(rs) > 1 else float("nan"), rs[-1].copy_s
        out.append(f"| {depth} | {make_synthetic.model_bytes(depth) / GB:.2f} | {method} | {variant} | {merge:.3f} | {copy:.3f} | "
                   f"{merge / copy:.2f} | {max(r.rss_kib for r in rs) / 2**20:.2f} | {s2:.1f} | {st:.1f} | {st / s2:.2f} | "
                   f"{ct / c2:.2f} | {st / s2 / (ct / c2):.2f} | {sum(r.merge_s for r in rs) / sum(r.floor_s for r in rs):.2f} | "
                   f"{sum(r.engine_s for r in rs) / sum(r.floor_s for r in rs):.2f} | "
                   f"{max(r.written / r.published for r in rs):.2f} |")
    return head + "\n".join(out) + "\n"


def mergekit_version(exe: str) -> str:
    probe = "from importlib.metadata import version; print('mergekit', version('mergekit'))"
    python = Path(exe).with_name("python")
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True) if python.exists() else None
    return out.stdout.strip() if out is not None and out.returncode == 0 else exe


def oneshot_table(rows: list[OneShotRow]) -> str:
    head = ("| depth | method | t | mergekit one-shot s | its peak RSS GiB | our step t s | one-shot ÷ our step | "
            "our steps 1..t s |\n" + "|---" * 8 + "|\n")
    return head + "".join(f"| {r.depth} | {r.method} | {r.t} | {r.wall_s:.1f} | {r.rss_kib / 2**20:.2f} | {r.ours_step_s:.1f} | "
                          f"{r.wall_s / r.ours_step_s:.2f} | {r.ours_total_s:.1f} |\n" for r in rows)


def insert_section(results: Path, block: str, section: str = SECTION) -> None:
    """Append ``block`` at the end of this benchmark's section of RESULTS.md (created if missing)."""
    text = results.read_text() if results.exists() else "# Benchmarks\n"
    if section not in text:
        text = text.rstrip("\n") + f"\n\n{section}\n"
    start = text.index(section) + len(section)
    nxt = text.find("\n## ", start)
    end = len(text) if nxt < 0 else nxt + 1
    text = text[:end].rstrip("\n") + "\n\n" + block.strip("\n") + "\n" + ("\n" + text[end:] if nxt >= 0 else "")
    results.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--methods", nargs="+", default=["average", "task_arithmetic"], choices=["average", "task_arithmetic", "magmax"])
    parser.add_argument("--items", type=int, default=4)
    parser.add_argument("--scratch", type=Path, default=Path("/work/bench-scratch"))
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--keep-inputs", action="store_true", help="keep the synthetic models for a later run")
    parser.add_argument("--variant", dest="variants", action="append", type=Variant.parse, metavar="NAME=[ENV=V] [FLAGS]",
                        help="a way to run the merge (repeatable), e.g. 'tuned=OMP_NUM_THREADS=1 --chunk-mb 16'; "
                             "default: one variant 'default' with the engine's defaults")
    parser.add_argument("--git-ref", default="HEAD", help="commit of hf_contmerge to measure, or 'worktree' (default HEAD)")
    parser.add_argument("--mergekit", default=shutil.which("mergekit-yaml"),
                        help="mergekit-yaml to time one-shot merges of the first 2, 4, 8 items (default: the one on PATH)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds to wait (after a sync) before every timed operation (see the docstring; 0: none)")
    parser.add_argument("--max-disk-fraction", type=float, default=0.6, help="skip a depth needing more of the free space")
    args = parser.parse_args()
    variants: list[Variant] = args.variants or [Variant("default")]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    args.scratch.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_stream.py " + shlex.join(sys.argv[1:])
    started = dt.datetime.now().astimezone()
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows: list[StepRow] = []
    notes: list[str] = []
    oneshot: list[OneShotRow] = []
    if not args.mergekit:
        notes.append("mergekit one-shot not measured: --mergekit empty and no mergekit-yaml on PATH")
    code = snapshot_package(args.git_ref, args.scratch)
    log(f"measuring {code.source}")
    startup = startup_seconds(code, args.scratch)
    for depth in args.depths:
        need, free = disk_plan(depth, args.items, args.scratch)
        if need > args.max_disk_fraction * free:
            notes.append(f"depth {depth} skipped: needs {need:.1f} GB, {free:.1f} GB free (limit {args.max_disk_fraction:.0%})")
            log(notes[-1])
            continue
        log(f"depth {depth}: generating/reusing inputs (needs {need:.1f} GB of {free:.1f} GB free)")
        t0 = time.perf_counter()
        out = args.scratch / f"llama-d{depth}"
        subprocess.run([sys.executable, str(Path(make_synthetic.__file__)), "--depth", str(depth), "--items", str(args.items),
                        "--out", str(out)], check=True, env={**os.environ, **code.env()}, cwd=args.scratch)
        folders = [out / n for n in make_synthetic.folder_names(args.items)]
        log(f"depth {depth}: inputs ready in {time.perf_counter() - t0:.0f}s")
        for method in args.methods:
            for variant in variants:
                rows += bench_method(depth, method, variant, folders, args.scratch, code, log, args.settle)
            if args.mergekit and method != "magmax":  # mergekit has no MagMax
                ours = [r for r in rows if (r.depth, r.method, r.variant) == (depth, method, variants[0].name)]
                oneshot += bench_mergekit(args.mergekit, depth, method, folders, args.scratch, ours, log, args.settle)
        if not args.keep_inputs:
            shutil.rmtree(args.scratch / f"llama-d{depth}")
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    block = (
        f"### Run of {started:%Y-%m-%d %H:%M %Z}\n\n"
        f"Command: `{command}` (items {args.items})\n\n"
        f"Code: {code.source}\n\n"
        f"Variants: {'; '.join(f'`{v.name}` = {v.describe()}' for v in variants)} (engine defaults: "
        f"{engine_defaults(code, args.scratch)}, torch's default threads)\n\n"
        f"Machine: {machine()}\n\n"
        f"Settle: {args.settle:g} s (sync, then a pause) before every timed operation\n\n"
        f"Load: before `{uptime_before}`; after `{uptime_after}`. Start-up of one `hf-contmerge` process "
        f"(`hf-contmerge methods`): {startup:.1f} s, included in every merge time.\n\n"
        + "".join(f"Note: {n}\n\n" for n in notes)
        + (summary_table(rows) + "\n" + step_table(rows) if rows else "No depth ran.\n")
        + (f"\nmergekit one-shot (`{mergekit_version(args.mergekit)}`) of the base and the first t items, against our "
           "continual step t (variant `" + variants[0].name + "`):\n\n" + oneshot_table(oneshot) if oneshot else "")
    )
    shutil.rmtree(code.path)
    print("\n" + block)
    insert_section(args.results, block)
    log(f"appended to {args.results}")


if __name__ == "__main__":
    main()
