"""OPCM on a stream of LoRA adapters at Llama-7B layer shapes: the factored path against the dense path.

A LoRA adapter's task vector on a linear weight is ``s·B@A`` (rank r). OPCM keeps the merged task
vector's column space at rank ≤ t·r after t adapters, so the engine can carry it as factors and
replace each step's thin SVD of an m x n matrix (four 4096×4096 and three 11008×4096 per layer) by
QR + SVD of the factors (``hf-contmerge merge --lowrank auto``); ``--lowrank off`` forms every task
vector densely and runs today's dense OPCM. This script times both on the same inputs:

- **inputs** (deterministic, cached in ``--scratch``): a base from ``make_synthetic.ensure``
  (Llama-2-7B widths cut to ``--depth`` layers, bf16, N(0, 0.02²) matrices) and ``--adapters`` PEFT
  LoRA adapters written directly as ``adapter_config.json`` (``peft.LoraConfig.save_pretrained``)
  plus ``adapter_model.safetensors`` (float32 factors, keys
  ``base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight``), rank ``--rank``,
  ``lora_alpha`` = 2·rank (s = 2), targets q, k, v, o, gate, up, down of every layer. Values, from
  a ``torch.Generator`` seeded by CRC32 of (seed, tensor, adapter, factor):
  ``A ~ N(0, 1/in)`` (r x in), ``B ~ N(0, σ²)`` (out x r) with ``σ = 0.002·sqrt(in/r)/s``, so the
  entries of ``s·B@A`` have standard deviation 0.002 (``make_synthetic``'s fine-tune noise: a
  non-trivial delta, 10 % of the base's scale). No model is instantiated.
- **merge**: ``python -m hf_contmerge.cli merge --base BASE --method opcm --out RUN --quiet --stream
  A1 … At --resume`` plus the variant's flag, one step per process, each measured by a fresh small
  process (``bench_stream.run_measured``): wall time of the whole merge process (start-up, imports,
  pre-flight, merge, fsyncs), its peak RSS and its CPU time (user + system). The package is
  snapshotted once (``--git-ref``, default HEAD, or ``worktree``) so every step of both variants runs
  one version of the engine while the repository changes. Variants: ``factored`` = ``--lowrank
  auto`` for all N steps, then ``dense`` = ``--lowrank off`` for the first ``--dense-steps`` K
  steps only (a dense step at 7B shapes costs minutes per layer on 2 cores). Step 1 has no SVD and
  is the same work in both; steps 2 … K are the comparison.
- **ratio** = mean dense wall time / mean factored wall time over steps 2 … K. Target (issue): ≥ 20.
- **flatness** of the factored path: wall time of step N / step 2 (and the largest step of 2 … N
  / step 2). Target (issue): flat over the stream (the factored work grows with the rank t·r, but
  stays small next to reading and writing the model).
- **agreement**: after both runs, the first 64 rows of layer 0's ``q_proj`` and the last layer's
  ``down_proj`` published at step K by each variant are read with ``safetensors``; the two paths
  are the same maths up to float32 rounding, and the bf16 output can round an element to a
  neighbouring value, so the check allows one bf16 rounding step per element and requires what
  is left, max(|factored − dense| − ulp, 0), to be ≤ 1e-5 of RMS(dense − base) (float32-level
  agreement; an absolute ulp criterion alone fails on near-zero elements, whose ulp is below
  float32 noise). Reported: that figure, the maximum in ulps, max |Δ| relative to the RMS of the
  dense rows, the number of elements that differ at all, and RMS(dense − base) / RMS(base) of
  the same rows (≈ 0.1: the merge moved them, so agreement is not the trivial agreement of two
  copies of the base).

Results are printed as markdown and, unless ``--small``, inserted into ``benchmarks/RESULTS.md``
under "OPCM on a LoRA stream: factored vs dense" with the command, code, commit, machine, load and
date. ``--small`` (hidden 256, intermediate 688, vocabulary 1024, 4 heads) is a smoke run of the
whole script in a minute; it only prints.

    python benchmarks/bench_lowrank.py --depth 1 --adapters 10 --rank 16 --dense-steps 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_synthetic
from bench_stream import (
    Code,
    folder_bytes,
    insert_section,
    machine,
    run_measured,
    snapshot_package,
    startup_seconds,
)

SECTION = "## OPCM on a LoRA stream: factored vs dense"
REPO = Path(__file__).resolve().parent.parent
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DELTA_STD = make_synthetic.NOISE_STD  # std of the entries of s·B@A
ALPHA_PER_RANK = 2  # lora_alpha = 2·r, so s = alpha / r = 2
CHECK_ROWS = 64
MAX_EXCESS = 1e-5  # float32-level agreement beyond bf16 rounding
GIB = 2**30
FORMAT = 1  # bump when the generated adapters change
# --small: make_synthetic's 7B widths mapped to small ones (names and order stay llama_shapes').
SMALL = {make_synthetic.HIDDEN: 256, make_synthetic.INTERMEDIATE: 688, make_synthetic.VOCAB: 1024}
SMALL_HEADS = 4


@dataclass(frozen=True)
class Variant:
    name: str
    args: tuple[str, ...]

    def describe(self) -> str:
        return f"`{shlex.join(self.args)}`" if self.args else "the engine's default"


@dataclass
class Step:
    variant: str
    step: int
    wall_s: float
    rss_kib: int
    cpu_s: float
    written: int
    load1: float

    @property
    def rss_gib(self) -> float:
        return self.rss_kib / 2**20


# ---------------------------------------------------------------------------------------- inputs
def shapes(depth: int, small: bool) -> Iterator[tuple[str, tuple[int, ...]]]:
    """``make_synthetic.llama_shapes`` with the widths of ``--small`` when asked."""
    for name, shape in make_synthetic.llama_shapes(depth):
        yield name, tuple(SMALL[d] for d in shape) if small else shape


def small_base(folder: Path, depth: int, seed: int = 0) -> Path:
    """A base like ``make_synthetic``'s (same names, values and dtype) at the ``--small`` widths."""
    config = make_synthetic.llama_config(depth)
    config.hidden_size, config.intermediate_size = SMALL[make_synthetic.HIDDEN], SMALL[make_synthetic.INTERMEDIATE]
    config.vocab_size = SMALL[make_synthetic.VOCAB]
    config.num_attention_heads = config.num_key_value_heads = SMALL_HEADS
    config.head_dim = config.hidden_size // SMALL_HEADS
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    tensors = {n: make_synthetic.base_tensor(n, s, seed).to(torch.bfloat16) for n, s in shapes(depth, small=True)}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def base_folder(scratch: Path, depth: int, small: bool) -> Path:
    if small:
        return small_base(scratch / f"llama-small-d{depth}-lora" / "base", depth)
    return make_synthetic.ensure(scratch / f"llama-d{depth}-lora", depth, 0)[0]


def targets(depth: int, small: bool) -> list[tuple[str, tuple[int, int]]]:
    """(module name, (out, in)) of every LoRA target: the seven linear weights of every layer."""
    return [(n.removesuffix(".weight"), s) for n, s in shapes(depth, small)  # type: ignore[misc]
            if n.rsplit(".", 2)[-2] in LINEAR]


def factors(module: str, out_in: tuple[int, int], rank: int, adapter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of one target: A ~ N(0, 1/in) (r x in), B ~ N(0, σ²) (out x r), σ = DELTA_STD·sqrt(in/r)/s."""
    out, inp = out_in
    gen = lambda part: torch.Generator().manual_seed(zlib.crc32(f"{seed}/{module}/adapter-{adapter}/{part}".encode()))  # noqa: E731
    sigma = DELTA_STD * math.sqrt(inp / rank) / ALPHA_PER_RANK
    a = torch.randn(rank, inp, generator=gen("A")) / math.sqrt(inp)
    b = torch.randn(out, rank, generator=gen("B")) * sigma
    return a, b


def write_adapter(folder: Path, base: Path, depth: int, small: bool, rank: int, index: int, seed: int) -> None:
    """One PEFT LoRA adapter folder: ``adapter_config.json`` and ``adapter_model.safetensors``."""
    from peft import LoraConfig  # here: a cache hit should not pay its import

    folder.mkdir(parents=True)
    LoraConfig(r=rank, lora_alpha=ALPHA_PER_RANK * rank, target_modules=list(LINEAR),
               base_model_name_or_path=str(base)).save_pretrained(folder)
    tensors = {}
    for module, out_in in targets(depth, small):
        a, b = factors(module, out_in, rank, index, seed)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


def adapter_folders(scratch: Path, base: Path, depth: int, small: bool, count: int, rank: int, seed: int = 0) -> list[Path]:
    """``count`` adapters of ``base`` under the scratch folder, written unless already there (``adapters.json``)."""
    root = scratch / f"lora-{'small-' if small else ''}d{depth}-r{rank}"
    wanted = {"format": FORMAT, "depth": depth, "small": small, "count": count, "rank": rank, "seed": seed,
              "base": str(base), "torch": torch.__version__}
    folders = [root / f"adapter-{i}" for i in range(1, count + 1)]
    manifest = root / "adapters.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == wanted and all(f.is_dir() for f in folders):
        return folders
    shutil.rmtree(root, ignore_errors=True)  # stale or partial: the manifest is written last
    for i, folder in enumerate(folders, 1):
        write_adapter(folder, base, depth, small, rank, i, seed)
    manifest.write_text(json.dumps(wanted, indent=2) + "\n")
    return folders


# ---------------------------------------------------------------------------------------- running
def has_lowrank_flag(code: Code, cwd: Path) -> bool:
    """Whether the snapshotted engine's ``merge`` knows ``--lowrank``."""
    out = subprocess.run([sys.executable, "-m", "hf_contmerge.cli", "merge", "--help"], capture_output=True, text=True,
                         cwd=cwd, env={**os.environ, **code.env()})
    return "--lowrank" in out.stdout


def run_variant(variant: Variant, steps: int, base: Path, adapters: list[Path], work: Path, code: Code, keep: int,
                log) -> list[Step]:
    """Steps 1 … ``steps`` of OPCM, one measured process each; keeps the last step and step ``keep``."""
    run = work / f"run-{variant.name}"
    shutil.rmtree(run, ignore_errors=True)
    rows = []
    for t in range(1, steps + 1):
        cmd = [sys.executable, "-m", "hf_contmerge.cli", "merge", "--base", str(base), "--method", "opcm", "--out",
               str(run), "--quiet", "--stream", *map(str, adapters[:t]), "--resume", *variant.args]
        load1 = os.getloadavg()[0]
        wall, rss, cpu = run_measured(cmd, code.env(), work)
        rows.append(Step(variant.name, t, wall, rss, cpu, folder_bytes(run / f"step-{t}"), load1))
        if t - 1 not in (0, keep):
            shutil.rmtree(run / f"step-{t - 1}")  # a resume needs only the last step
        log(f"  {variant.name} step {t}: {wall:.1f} s, peak RSS {rows[-1].rss_gib:.2f} GiB, CPU {cpu:.1f} s, "
            f"load {load1:.1f}")
    return rows


# ---------------------------------------------------------------------------------------- checking
def read_rows(folder: Path, key: str, rows: int) -> torch.Tensor:
    """The first ``rows`` rows of ``key`` from a step folder's safetensors shards, as float32."""
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            if key in f.keys():
                return f.get_slice(key)[:rows].float()
    raise KeyError(f"{key} not in {folder}")


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 values at |x|: 2^(e − 7) for |x| in [2^e, 2^(e+1)) (7 stored mantissa bits)."""
    _, exponent = torch.frexp(x.abs().clamp_min(torch.finfo(torch.bfloat16).tiny))  # |x| = m·2^E, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(x), exponent - 8)


@dataclass(frozen=True)
class Agreement:
    key: str
    max_ulps: float
    max_rel: float  # max |Δ| / RMS of the dense rows
    differing: int
    total: int
    change: float  # RMS(dense − base) / RMS(base): the merge moved the weights, so agreement is not vacuous
    excess: float  # max (|Δ| − 1 bf16 ulp, at least 0) / RMS(dense − base): the check


def rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


def agreement(factored: Path, dense: Path, base: Path, key: str) -> Agreement:
    f, d, b = (read_rows(folder, key, CHECK_ROWS) for folder in (factored, dense, base))
    diff = (f - d).abs()
    ulps = diff / bf16_ulp(torch.maximum(f.abs(), d.abs()))
    # beyond one bf16 rounding step, relative to the merge's own change of these rows
    excess = (diff - bf16_ulp(torch.maximum(f.abs(), d.abs()))).clamp_min(0)
    return Agreement(key, float(ulps.max()), float(diff.max()) / rms(d), int((diff > 0).sum()), diff.numel(),
                     rms(d - b) / rms(b), float(excess.max()) / rms(d - b))


# ---------------------------------------------------------------------------------------- report
def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def step_table(fact: list[Step], dense: list[Step]) -> str:
    head = ("| step | factored s | factored peak RSS GiB | factored CPU s | factored written GB | dense s | "
            "dense peak RSS GiB | dense CPU s | dense written GB | dense / factored | factored step / step 2 | "
            "load (1 min) factored / dense |\n" + "|---" * 12 + "|\n")
    by_step = {r.step: r for r in dense}
    f2 = fact[1].wall_s if len(fact) > 1 else float("nan")
    lines = []
    for f in fact:
        d = by_step.get(f.step)
        dcols = (f"{d.wall_s:.1f} | {d.rss_gib:.2f} | {d.cpu_s:.1f} | {d.written / 1e9:.3g} | {d.wall_s / f.wall_s:.1f}"
                 if d else "— | — | — | — | —")
        lines.append(f"| {f.step} | {f.wall_s:.1f} | {f.rss_gib:.2f} | {f.cpu_s:.1f} | {f.written / 1e9:.3g} | {dcols} | "
                     f"{f.wall_s / f2:.2f} | {f.load1:.1f} / {f'{d.load1:.1f}' if d else '—'} |")
    return head + "\n".join(lines) + "\n"


def summary_table(args: argparse.Namespace, fact: list[Step], dense: list[Step], agree: list[Agreement]) -> str:
    k = len(dense)
    fk, dk = _mean([r.wall_s for r in fact[1:k]]), _mean([r.wall_s for r in dense[1:]])
    f2, ft = fact[1].wall_s, fact[-1].wall_s
    worst = max(r.wall_s for r in fact[1:])
    excess = max(a.excess for a in agree)
    head = ("| depth | adapters | rank | dense steps | factored mean s (steps 2…K) | dense mean s (steps 2…K) | "
            "dense / factored (≥ 20) | factored step 2 s | factored step N s | N / 2 (flat) | max step / step 2 | "
            f"max peak RSS GiB factored / dense | agreement at step K (beyond 1 bf16 ulp ≤ {MAX_EXCESS:g} of the change) |\n"
            + "|---" * 13 + "|\n")
    return head + (
        f"| {args.depth} | {args.adapters} | {args.rank} | {k} | {fk:.1f} | {dk:.1f} | {dk / fk:.1f} | {f2:.1f} | "
        f"{ft:.1f} | {ft / f2:.2f} | {worst / f2:.2f} | {max(r.rss_gib for r in fact):.2f} / "
        f"{max(r.rss_gib for r in dense):.2f} | {excess:.1e}: {'pass' if excess <= MAX_EXCESS else 'FAIL'} |\n")


def agreement_lines(agree: list[Agreement], step: int) -> str:
    return "".join(
        f"- step {step} `{a.key}` (first {CHECK_ROWS} rows): max |factored − dense| = {a.max_ulps:.1f} bf16 ulps "
        f"(of the element's own magnitude; near-zero elements make this large), {a.max_rel:.2e} of the rows' RMS; "
        f"{a.differing} of {a.total} elements differ; beyond one bf16 rounding step the largest difference is "
        f"{a.excess:.1e} of the merge's change of these rows (which moved them from the base by {a.change:.3f} of "
        "their RMS)\n" for a in agree)


# ---------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=1, help="decoder layers (default 1)")
    parser.add_argument("--adapters", type=int, default=10, help="LoRA adapters in the stream, N (default 10)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (default 16; lora_alpha = 2r)")
    parser.add_argument("--dense-steps", type=int, default=3, help="steps K the dense variant runs (default 3, 2 ≤ K ≤ N)")
    parser.add_argument("--scratch", type=Path, default=Path("/work/bench-scratch"))
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--git-ref", default="HEAD", help="commit of hf_contmerge to measure, or 'worktree' (default HEAD)")
    parser.add_argument("--keep", action="store_true", help="keep the inputs and both step-K folders")
    parser.add_argument("--small", action="store_true", help="smoke run at small widths; prints, writes no results")
    args = parser.parse_args()
    if not 2 <= args.dense_steps <= args.adapters:
        parser.error("--dense-steps must be between 2 and --adapters")
    return args


def main() -> None:
    args = parse_args()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    command = "python benchmarks/bench_lowrank.py " + shlex.join(sys.argv[1:])
    started = dt.datetime.now().astimezone()
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    work = args.scratch / f"lowrank-bench{'-small' if args.small else ''}"  # own pkg/ and runs: bench_stream uses scratch/pkg
    work.mkdir(parents=True, exist_ok=True)
    code = snapshot_package(args.git_ref, work)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    log(f"measuring {code.source}")
    variants = [Variant("factored", ("--lowrank", "auto")), Variant("dense", ("--lowrank", "off"))]
    note = ""
    if not has_lowrank_flag(code, work):
        if not args.small:
            sys.exit(f"the engine measured ({code.source}) has no `merge --lowrank`; commit it or pass --git-ref worktree")
        variants = [Variant(v.name, ()) for v in variants]
        note = "Note: this engine has no `--lowrank`; both variants ran its default (dense) path.\n\n"
        log(note.strip())
    base = base_folder(args.scratch, args.depth, args.small)
    adapters = adapter_folders(args.scratch, base, args.depth, args.small, args.adapters, args.rank)
    log(f"inputs: {base}, {len(adapters)} adapters in {adapters[0].parent}")
    startup = startup_seconds(code, work)
    k = args.dense_steps
    fact = run_variant(variants[0], args.adapters, base, adapters, work, code, k, log)
    dense = run_variant(variants[1], k, base, adapters, work, code, k, log)
    agree = [agreement(work / "run-factored" / f"step-{k}", work / "run-dense" / f"step-{k}", base, key)
             for key in ("model.layers.0.self_attn.q_proj.weight", f"model.layers.{args.depth - 1}.mlp.down_proj.weight")]
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    block = (
        f"### Run of {started:%Y-%m-%d %H:%M %Z}: depth {args.depth}, {args.adapters} adapters of rank {args.rank}"
        f"{' (--small)' if args.small else ''}\n\n"
        f"Command: `{command}`\n\n"
        f"Code: {code.source}; repository HEAD {commit}. Variants: "
        f"{', '.join(f'`{v.name}` = {v.describe()}' for v in variants)}.\n\n"
        f"Machine: {machine()}\n\n"
        f"Load: before `{uptime_before}`; after `{uptime_after}`. Start-up of one `hf-contmerge` process "
        f"(`hf-contmerge methods`): {startup:.1f} s, included in every step's wall time.\n\n"
        + note
        + summary_table(args, fact, dense, agree) + "\n" + step_table(fact, dense) + "\n"
        + agreement_lines(agree, k)
    )
    shutil.rmtree(code.path)
    for name in ("factored", "dense"):
        for step in (work / f"run-{name}").glob("step-*"):
            if not (args.keep and step.name == f"step-{k}"):
                shutil.rmtree(step)
    if not args.keep:
        shutil.rmtree(work)
        shutil.rmtree(adapters[0].parent)
        shutil.rmtree(base.parent)
    print("\n" + block)
    if not args.small:
        insert_section(args.results, block, SECTION)
        log(f"appended to {args.results}")


if __name__ == "__main__":
    main()
