"""Several ranks (torchrun, gloo on 127.0.0.1): the step folders are bit-identical to one process's.

Both sides run as subprocesses with one torch thread per process (torchrun's default), since a
whole-matrix kernel's bits depend on the thread count. Small shards make every step several files,
so ranks share files and write their tensors into them at the planned offsets.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hf_contmerge.artifacts.layout import LOWRANK_PREFIX
from support.tiny_models import classifier_stream, make_stream

SMALL_SHARDS = ["--shard-size", "40KB", "--quiet"]
DATA_FLAGS = ["--calib-samples", "6", "--calib-batch-size", "3", "--max-length", "16"]
PROBE = Path(__file__).parents[1] / "support" / "world_probe.py"
API_PROBE = PROBE.with_name("api_probe.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def one_process(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_contmerge", "merge", *map(str, args)], env=_env(**env),
                          capture_output=True, text=True, timeout=300)


def ranks(n: int, *args, **env) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    return subprocess.run([*launcher, "-m", "hf_contmerge", "merge", *map(str, args)], env=_env(**env),
                          capture_output=True, text=True, timeout=300)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same(a: Path, b: Path) -> None:
    ta, tb = tree(a), tree(b)
    assert sorted(ta) == sorted(tb)
    assert any(n.startswith("step-1/model-0000") for n in ta), "the step should span several shards"
    for name in ta:
        assert ta[name] == tb[name], name


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    return make_stream(tmp_path_factory.mktemp("dist"), "llama", n=3)


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties", "magmax", "opcm"])
def test_two_ranks_write_what_one_process_writes(tmp_path, stream, method):
    base, items = stream
    args = ["--base", base, "--stream", *items, "--method", method, *SMALL_SHARDS]
    single = one_process(*args, "--out", tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    double = ranks(2, *args, "--out", tmp_path / "two")
    assert double.returncode == 0, double.stderr[-3000:]
    assert_same(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("mode", ["own", "fresh"])
def test_the_api_steps_inside_a_scripts_job_and_leaves_its_group_working(tmp_path, stream, mode):
    """``ContinualMerger.step`` under torchrun makes a world a step: each tears its own group down, the job's
    default group stays (the script's own in ``own``, which still answers an all-reduce after), and every
    step is the one process's, byte for byte."""
    base, items = stream
    assert one_process("--base", base, "--stream", *items, "--method", "task_arithmetic", "--quiet",
                       "--out", tmp_path / "one").returncode == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    done = subprocess.run([*launcher, str(API_PROBE), mode, str(base), str(tmp_path / "api"), *map(str, items)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(f"steps {len(items)} done") == 2, done.stdout
    if mode == "own":
        assert "rank 0: all-reduce 2" in done.stdout and "rank 1: all-reduce 2" in done.stdout, done.stdout
    one, api = tree(tmp_path / "one"), tree(tmp_path / "api")
    assert sorted(one) == sorted(api)
    for name in one:
        assert one[name] == api[name], name


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_two_ranks_carry_the_same_compact_bf16_state(tmp_path, compression):
    """bf16 weights: the low bits' compressed blocks of rank 1 are appended by rank 0 after its own (shards
    small enough that they span files), or, uncompressed, shared planned files; the ties (abundant in the
    mean of two bf16 models, so some tensors keep a bitmask) go to rank 0; tensors are sliced, so ties
    and blocks span slices."""
    import torch

    base, items = make_stream(tmp_path / "bf16", "llama", n=3, dtype=torch.bfloat16)
    args = ["--base", base, "--stream", *items, "--method", "average", "--chunk-mb", "0.002", "--shard-size", "8KB", "--quiet",
            "--state-compression", compression]
    assert one_process(*args, "--out", tmp_path / "one").returncode == 0
    double = ranks(2, *args, "--out", tmp_path / "two")
    assert double.returncode == 0, double.stderr[-3000:]
    state = tmp_path / "one" / "step-2" / "contmerge_state"
    assert list(state.glob("low16-merged-*")) and list(state.glob("ties-merged*"))
    assert_same(tmp_path / "one", tmp_path / "two")


def test_two_ranks_carry_the_same_compressed_slot(tmp_path):
    """MagMax's τmax as compressed float32 blocks: rank 1's appended by rank 0 after its own, the files
    those of one process, byte for byte."""
    import torch

    base, items = make_stream(tmp_path / "bf16", "llama", n=2, dtype=torch.bfloat16)
    args = ["--base", base, "--stream", *items, "--method", "magmax", "--chunk-mb", "0.002", "--shard-size", "8KB", "--quiet"]
    assert one_process(*args, "--out", tmp_path / "one").returncode == 0
    double = ranks(2, *args, "--out", tmp_path / "two")
    assert double.returncode == 0, double.stderr[-3000:]
    assert list((tmp_path / "one" / "step-2" / "contmerge_state").glob("tau_max-*"))
    assert_same(tmp_path / "one", tmp_path / "two")


def test_two_ranks_on_a_lora_stream_carry_the_same_factors(tmp_path, lora_stream):
    """OPCM's factored kernel: the factors are gathered to rank 0 and written in plan order."""
    base, adapters, _ = lora_stream
    args = ["--base", base, "--stream", *adapters, "--method", "opcm", *SMALL_SHARDS]
    assert one_process(*args, "--out", tmp_path / "one").returncode == 0
    double = ranks(2, *args, "--out", tmp_path / "two")
    assert double.returncode == 0, double.stderr[-3000:]
    assert any(p.name.startswith(LOWRANK_PREFIX) for p in (tmp_path / "one" / "step-3" / "contmerge_state").iterdir())
    assert_same(tmp_path / "one", tmp_path / "two")


def test_a_rank_killed_mid_step_publishes_nothing_and_resume_finishes_bit_identically(tmp_path, stream):
    base, items = stream
    args = ["--base", base, "--stream", *items, "--method", "ties", *SMALL_SHARDS]
    assert one_process(*args, "--out", tmp_path / "ref").returncode == 0
    killed = ranks(2, *args, "--out", tmp_path / "run", HF_CONTMERGE_FAILPOINT="step-2:tensor-2", HF_CONTMERGE_FAILPOINT_RANK="1")
    assert killed.returncode != 0
    assert (tmp_path / "run" / "step-1").is_dir() and not (tmp_path / "run" / "step-2").exists()
    # resumed by one process, and (from a copy of the same state) by two ranks: the reference either way
    shutil.copytree(tmp_path / "run", tmp_path / "run2")
    assert one_process(*args, "--out", tmp_path / "run", "--resume").returncode == 0
    again = ranks(2, *args, "--out", tmp_path / "run2", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same(tmp_path / "ref", tmp_path / "run")
    assert_same(tmp_path / "ref", tmp_path / "run2")


def test_a_rank_that_raises_fails_every_rank_with_its_message(tmp_path, stream):
    """rank 0 cannot take --out (another run holds it): rank 1 stops too, naming rank 0, and nothing is written."""
    base, items = stream
    from hf_contmerge.artifacts import layout

    out = tmp_path / "held"
    with layout.exclusive(out):
        run = ranks(2, "--base", base, "--stream", *items, "--method", "average", "--out", out, "--dist-timeout", "60")
    assert run.returncode != 0
    assert "rank 0 of 2 failed" in run.stderr and "another" in run.stderr.lower()
    assert not list(out.glob("step-*"))


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    return classifier_stream(tmp_path_factory.mktemp("cls"), labels=(2, 3, 2), scale=0.05)


@pytest.mark.parametrize("method", ["fisher", "became", "divmerge"])
def test_data_methods_on_two_ranks_write_what_one_process_writes(tmp_path, classifiers, method):
    """Rank 0 calibrates (Fishers, learned coefficients) into the partial step; both ranks merge, and
    BECAME's after pass (the accumulated Fisher, from θ(t)'s) is split as well. (TRM learns its
    coefficients through DivMerge's path, ``calibration/learned.py``; it was checked by hand.)"""
    base, items, data = classifiers
    args = ["--base", base, "--stream", *items, "--data", *data, *DATA_FLAGS, "--method", method, *SMALL_SHARDS]
    single = one_process(*args, "--out", tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    double = ranks(2, *args, "--out", tmp_path / "two")
    assert double.returncode == 0, double.stderr[-3000:]
    assert_same(tmp_path / "one", tmp_path / "two")
    if method == "became":
        assert len(list((tmp_path / "two" / "step-3" / "contmerge_state").glob("fisher_bar-*.safetensors"))) > 1


def test_two_ranks_write_the_adapter_one_process_writes(tmp_path, lora_stream):
    """--output-format adapter: one adapter file, its tensors gathered to rank 0 and written in plan order;
    its truncation summary added up in plan order."""
    base, adapters, _ = lora_stream
    args = ["--base", base, "--stream", *adapters, "--method", "opcm", "--output-format", "adapter", "--max-rank", "6",
            *SMALL_SHARDS]
    single = one_process(*args, "--out", tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    double = ranks(2, *args, "--out", tmp_path / "two")
    assert double.returncode == 0, double.stderr[-3000:]
    ta, tb = tree(tmp_path / "one"), tree(tmp_path / "two")
    assert "step-3/adapter_model.safetensors" in ta and ta == tb


def _probe(mode: str, launcher: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, str(PROBE), mode], env=_env(), capture_output=True, text=True, timeout=120)


def test_rank_0_working_alone_longer_than_the_timeout_keeps_the_others_waiting(tmp_path):
    """World.on_main: rank 0 works 6 s with a 2 s --dist-timeout (calibrating, evaluating a 7B model
    takes longer than any fixed bound); its heartbeats keep rank 1 waiting, and both get its result."""
    run = _probe("slow", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_free_port())])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0: got 42" in run.stdout and "rank 1: got 42" in run.stdout


def test_a_hung_rank_0_fails_the_others_within_the_timeout():
    """Rank 0 stops (SIGSTOP) while working alone: no heartbeat comes, and rank 1 fails with a message
    naming rank 0 within about --dist-timeout (2 s), instead of hanging. Launched without torchrun,
    whose agent would stop the other ranks itself."""
    env = _env(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank0 = subprocess.Popen([sys.executable, str(PROBE), "hang"], env={**env, "RANK": "0", "LOCAL_RANK": "0"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rank1 = subprocess.run([sys.executable, str(PROBE), "hang"], env={**env, "RANK": "1", "LOCAL_RANK": "1"},
                               capture_output=True, text=True, timeout=120)
    finally:
        rank0.kill()
        rank0.wait()
    assert rank1.returncode == 3, rank1.stderr[-3000:]
    waited = float(re.search(r"failed after ([\d.]+) s", rank1.stdout).group(1))
    assert "rank 0 of 2 stopped answering while probing" in rank1.stdout and 1.5 < waited < 30


def test_dry_run_shows_how_ranks_would_share_a_step(tmp_path, stream, cli):
    """--dry-run --ranks N: per rank its tensors, elements, bytes and cost share; the shares cover the step."""
    base, items = stream
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "opcm", "--out", tmp_path / "o", "--dry-run",
                       "--ranks", "3")
    assert code == 0, err
    rows = re.findall(r"(first pass|finish), rank (\d): (\d+) tensors, .*?, ([\d.]+)% of the cost", err)
    assert [r[1] for r in rows] == ["0", "1", "2"] * 2
    for name in ("first pass", "finish"):
        assert abs(sum(float(r[3]) for r in rows if r[0] == name) - 100) < 0.5
    assert not (tmp_path / "o").exists()
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "opcm", "--out", tmp_path / "o", "--ranks", "2")
    assert code == 2 and "--ranks applies with --dry-run" in err


def _sparse_llama_7b(folder: Path, depth: int = 2) -> Path:
    """Headers of a Llama-2-7B-shaped checkpoint cut to ``depth`` layers (bf16), data left sparse: a plan
    reads headers only, so this costs no disk."""
    import json
    import struct

    h, i, v = 4096, 11008, 32000
    shapes = [("model.embed_tokens.weight", (v, h))]
    for layer in range(depth):
        p = f"model.layers.{layer}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        shapes += [(p + f"self_attn.{n}.weight", (h, h)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        shapes += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)), (p + "mlp.down_proj.weight", (h, i))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    header, offset = {}, 0
    for name, shape in shapes:
        n = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    folder.mkdir(parents=True)
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        fh.truncate(8 + len(blob) + offset)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": i,
        "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": depth, "vocab_size": v,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}))
    return folder


@pytest.mark.parametrize("method", ["task_arithmetic", "opcm"])
def test_the_cost_split_balances_a_7b_shaped_step(tmp_path, method):
    """Each rank's share of a pass's cost is within 1/N plus the largest single tensor's share (whole
    tensors are never cut across ranks), and within 1/N + 5% on this plan."""
    from hf_contmerge.engine.plan import ModelFacts, plan_step
    from hf_contmerge.engine.run import Engine
    from hf_contmerge.options import MergeOptions
    from hf_contmerge.sources.preflight import plan_stream
    from hf_contmerge.sources.resolve import resolve

    base, item = _sparse_llama_7b(tmp_path / "base"), _sparse_llama_7b(tmp_path / "ft")
    opts = MergeOptions.create(base=str(base), stream=[str(item)], method=method, out=tmp_path / "o")
    engine = Engine(opts)
    b = resolve(str(base), role="base", lazy=True)
    stream = plan_stream(b, [resolve(str(item), role="stream item", base=b, lazy=True)])
    plan = plan_step(stream, 0, 1, None, engine.method, opts, engine._model_facts(b) if engine.method.needs_module_types else ModelFacts())
    for p in range(len(plan.passes)):
        costs = {}
        for u in plan.passes[p]:
            costs[u.key] = costs.get(u.key, 0.0) + plan.cost(p, u)
        total, largest = sum(costs.values()), max(costs.values())
        for n in (2, 3, 4):
            shares = [sum(plan.cost(p, u) for u in run) / total for run in plan.split(p, n)]
            assert abs(sum(shares) - 1) < 1e-9
            assert max(shares) <= 1 / n + largest / total + 1e-9, (p, n, shares)
            assert max(shares) <= 1 / n + 0.05, (method, p, n, shares)
