"""Several ranks (torchrun, gloo on 127.0.0.1): the step folders are bit-identical to one process's.

Both sides run as subprocesses with one torch thread per process (torchrun's default), since a
whole-matrix kernel's bits depend on the thread count. Small shards make every step several files,
so ranks share files and write their tensors into them at the planned offsets.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hf_contmerge.artifacts.layout import LOWRANK_PREFIX
from support.tiny_models import make_stream

SMALL_SHARDS = ["--shard-size", "40KB", "--quiet"]


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


def test_data_methods_refuse_several_ranks_for_now(tmp_path, stream):
    base, items = stream
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b c"}\n')
    run = ranks(2, "--base", base, "--stream", *items, "--method", "fisher", "--data", *([data] * 3), "--out", tmp_path / "o")
    assert run.returncode != 0 and "runs in one process for now" in run.stderr


def test_dry_run_shows_how_ranks_would_share_a_step(tmp_path, stream, cli):
    """--dry-run --ranks N: per rank its tensors, elements, bytes and cost share; the shares cover the step."""
    import re

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
