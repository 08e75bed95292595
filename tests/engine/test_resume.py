"""Resume and atomicity: steps are whole or absent, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_contmerge.artifacts.layout import complete_steps

FILES = ("model.safetensors", "contmerge_state.json", "README.md", "config.json", "contmerge_state/merged.safetensors")


def _merge_args(base, items, out, method="task_arithmetic"):
    return ["merge", "--base", base, "--stream", *items, "--method", method, "--set", "scaling=0.6", "--out", out, "--quiet"]


def _same_files(a: Path, b: Path) -> None:
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{a.name}/{name} differs"


@pytest.fixture
def reference_run(tmp_path, streams, cli):
    base, items = streams("llama", n=4)
    out = tmp_path / "uninterrupted"
    code, _, err = cli(*_merge_args(base, items, out))
    assert code == 0, err
    return base, items, out


def test_resume_is_bit_identical(tmp_path, cli, reference_run):
    base, items, ref = reference_run
    out = tmp_path / "resumed"
    assert cli(*_merge_args(base, items[:2], out))[0] == 0
    assert complete_steps(out) == [1, 2]
    code, _, err = cli(*_merge_args(base, items, out), "--resume")
    assert code == 0, err
    for t in range(1, 5):
        _same_files(out / f"step-{t}", ref / f"step-{t}")


def test_resume_needs_only_the_last_step(tmp_path, cli, reference_run):
    """Earlier steps and past stream items may be deleted: the last step's state is enough."""
    import shutil

    base, items, ref = reference_run
    copies = [shutil.copytree(i, tmp_path / f"gone-{n}") for n, i in enumerate(items[:2])]
    out = tmp_path / "resumed"
    assert cli(*_merge_args(base, copies, out))[0] == 0
    shutil.rmtree(out / "step-1")
    for c in copies:
        shutil.rmtree(c)
    code, _, err = cli(*_merge_args(base, [*copies, *items[2:]], out), "--resume")
    assert code == 0, err
    for name in ("model.safetensors", "contmerge_state/merged.safetensors"):
        assert (out / "step-4" / name).read_bytes() == (ref / "step-4" / name).read_bytes()


@pytest.mark.parametrize("point", ["step-2:tensor-7", "step-2:publish", "step-1:tensor-1"])
def test_killed_run_leaves_only_complete_steps_and_resume_finishes(tmp_path, cli, reference_run, point):
    base, items, ref = reference_run
    out = tmp_path / "killed"
    env = {**os.environ, "HF_CONTMERGE_FAILPOINT": point}
    args = [str(a) for a in _merge_args(base, items, out)]
    proc = subprocess.run([sys.executable, "-m", "hf_contmerge.cli", *args], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    killed_at = int(point.split(":")[0].split("-")[1])
    assert complete_steps(out) == list(range(1, killed_at))
    assert not (out / f"step-{killed_at}").exists()
    # without --resume the folder is refused, and nothing is touched
    code, _, err = cli(*_merge_args(base, items, out)) if killed_at > 1 else (2, "", "--resume")
    assert code == 2 and "--resume" in err
    code, _, err = cli(*_merge_args(base, items, out), "--resume")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".hf-contmerge.json", "step-1", "step-2", "step-3", "step-4"]
    for t in range(1, 5):
        _same_files(out / f"step-{t}", ref / f"step-{t}")


def test_resume_with_other_settings_is_refused(tmp_path, cli, streams):
    base, items = streams("llama", n=4)
    out = tmp_path / "out"
    assert cli(*_merge_args(base, items[:2], out))[0] == 0
    before = sorted(p.name for p in out.rglob("*"))
    for args, needle in [
        (_merge_args(base, items, out, method="average"), "method"),
        ([*_merge_args(base, items, out)[:-3], "--set", "scaling=0.1", "--out", out, "--quiet"], "parameters"),
        (_merge_args(base, [items[1], items[0], *items[2:]], out), "stream so far"),
        ([*_merge_args(base, items, out), "--dtype", "bfloat16"], "--dtype"),
        ([*_merge_args(base, items, out), "--seed", "3"], "--seed"),
    ]:
        code, _, err = cli(*args, "--resume")
        assert code == 2 and needle in err, err
    assert sorted(p.name for p in out.rglob("*")) == before


def test_resume_when_complete_does_nothing(tmp_path, cli, streams):
    base, items = streams("llama", n=4)
    out = tmp_path / "out"
    assert cli(*_merge_args(base, items[:2], out))[0] == 0
    mtime = (out / "step-2" / "model.safetensors").stat().st_mtime_ns
    code, _, err = cli(*_merge_args(base, items[:2], out)[:-1], "--resume")  # not --quiet
    assert code == 0 and "nothing to do" in err
    assert (out / "step-2" / "model.safetensors").stat().st_mtime_ns == mtime


def test_api_continues_a_cli_run(tmp_path, cli, reference_run):
    from hf_contmerge import ContinualMerger

    base, items, ref = reference_run
    out = tmp_path / "mixed"
    assert cli(*_merge_args(base, items[:1], out))[0] == 0
    merger = ContinualMerger(base=str(base), method="task_arithmetic", params={"scaling": 0.6}, out=out, resume=True)
    assert merger.steps == 1
    for item in items[1:]:
        merger.step(str(item))
    for t in range(1, 5):
        _same_files(out / f"step-{t}", ref / f"step-{t}")
    model = merger.model()
    assert type(model).__name__ == "LlamaForCausalLM"


def test_options_free_on_resume_are_recorded_per_step(tmp_path, cli, streams):
    """--shard-size (and --lowrank, --output-format, --max-rank) may change on resume: each step records its own."""
    base, items = streams("llama", n=3)
    out = tmp_path / "out"
    assert cli(*_merge_args(base, items[:2], out))[0] == 0
    code, _, err = cli(*_merge_args(base, items, out), "--shard-size", "20KB", "--resume")
    assert code == 0, err
    options = [json.loads((out / f"step-{t}" / "contmerge_state.json").read_text())["options"] for t in (2, 3)]
    assert options[0]["shard_size"] == "5GB" and options[1]["shard_size"] == "20KB"
    assert (out / "step-3" / "model.safetensors.index.json").is_file() and not (out / "step-2" / "model.safetensors.index.json").exists()
    assert "--shard-size 20KB" in (out / "step-3" / "README.md").read_text()  # the card reproduces what it was made with
