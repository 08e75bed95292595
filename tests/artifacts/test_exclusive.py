"""One run per --out at a time; a refused first step leaves no new --out behind."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from hf_contmerge.artifacts import layout


def _merge(cli, base, items, out, *extra):
    return cli("merge", "--base", base, "--stream", *items, "--method", "average", "--out", out, "--quiet", *extra)


def test_a_second_run_on_the_same_out_stops_at_once(tmp_path, cli, streams):
    base, items = streams("llama", n=2)
    out = tmp_path / "out"
    assert _merge(cli, base, items[:1], out)[0] == 0
    in_progress = out / ".step-2.partial-999999"  # what a first run would be writing
    in_progress.mkdir()
    (in_progress / "model.safetensors").write_bytes(b"partial")
    with layout.exclusive(out):  # that first run holds the folder
        code, _, err = _merge(cli, base, items, out, "--resume")
    assert code == 2 and "being written by another hf-contmerge run" in err and "Traceback" not in err
    assert (in_progress / "model.safetensors").read_bytes() == b"partial"  # its step in progress is untouched
    assert not (out / "step-2").exists()
    code, _, err = _merge(cli, base, items, out, "--resume")  # once it is gone, resume finishes the job
    assert code == 0, err
    assert (out / "step-2").is_dir() and not in_progress.exists()


def test_a_refused_first_step_leaves_no_new_out(tmp_path, cli, streams):
    base, items = streams("llama", n=1)
    bad = tmp_path / "nan"
    bad.mkdir()
    for f in items[0].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "model.safetensors")
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "new" / "out"
    code, _, err = _merge(cli, base, [bad], out)
    assert code == 2 and "NaN or Inf" in err
    assert not out.exists()
    out.mkdir(parents=True)  # a folder the user made stays
    assert _merge(cli, base, [bad], out)[0] == 2 and out.is_dir() and not any(out.iterdir())


def test_dry_run_creates_nothing(tmp_path, cli, streams):
    base, items = streams("llama", n=1)
    assert _merge(cli, base, items, tmp_path / "out", "--dry-run")[0] == 0
    assert not (tmp_path / "out").exists()


def test_the_lock_is_released_after_a_run(tmp_path, cli, streams):
    base, items = streams("llama", n=1)
    assert _merge(cli, base, items, tmp_path / "out")[0] == 0
    with layout.exclusive(tmp_path / "out"):  # would raise if the run had kept it
        pass
    assert torch.equal(load_file(tmp_path / "out" / "step-1" / "model.safetensors")["model.norm.weight"],
                       load_file(items[0] / "model.safetensors")["model.norm.weight"])
