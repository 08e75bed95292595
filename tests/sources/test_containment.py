"""Nothing leaves a source folder: links out of it are refused before anything is read or written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from support.tiny_models import weights


@pytest.fixture
def stream_copy(tmp_path, streams):
    """A private copy of a tiny Llama stream (the tests add links to it)."""
    base, items = streams("llama", n=2)
    shutil.copytree(base, tmp_path / "base")
    shutil.copytree(items[0], tmp_path / "ft0")
    return tmp_path / "base", tmp_path / "ft0"


def _merge(cli, base: Path, item: Path, out: Path):
    return cli("merge", "--base", base, "--stream", item, "--method", "average", "--out", out, "--quiet")


def _no_trace_of(secret: bytes, root: Path) -> bool:
    return not any(secret in p.read_bytes() for p in root.rglob("*") if p.is_file()) if root.exists() else True


@pytest.mark.parametrize("where", ["base", "item"])
@pytest.mark.parametrize("name", ["vocab.txt", "generation_config.json", "model.safetensors"])
def test_links_out_of_a_source_are_refused(tmp_path, cli, stream_copy, where, name):
    base, item = stream_copy
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = outside / "secret.txt"
    if name == "model.safetensors":  # real weights, but kept outside the source folder
        shutil.copyfile((base if where == "base" else item) / name, secret)
    else:
        secret.write_text("host secret 9f3c1e")
    folder = base if where == "base" else item
    (folder / name).unlink(missing_ok=True)
    os.symlink(secret, folder / name)
    out = tmp_path / "out"
    code, _, err = _merge(cli, base, item, out)
    assert code == 2 and "Traceback" not in err, err
    assert name in err and "outside the source folder" in err
    assert not (out / "step-1").exists() and _no_trace_of(b"host secret 9f3c1e", tmp_path / "out")


def test_a_linked_folder_out_of_a_source_is_refused(tmp_path, cli, stream_copy):
    base, item = stream_copy
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "tokenizer.json").write_text('{"secret": "host secret 9f3c1e"}')
    os.symlink(tmp_path / "elsewhere", base / "extra")
    code, _, err = _merge(cli, base, item, tmp_path / "out")
    assert code == 2 and "extra" in err and "outside the source folder" in err
    assert _no_trace_of(b"host secret 9f3c1e", tmp_path / "out")


def test_links_inside_a_source_are_followed(tmp_path, cli, stream_copy):
    base, item = stream_copy
    (base / "vocab-real.txt").write_text("a\nb\n")
    os.symlink("vocab-real.txt", base / "vocab.txt")  # relative, inside the folder
    code, _, err = _merge(cli, base, item, tmp_path / "out")
    assert code == 0, err
    step = tmp_path / "out" / "step-1"
    assert not (step / "vocab.txt").is_symlink() and (step / "vocab.txt").read_text() == "a\nb\n"


def test_a_hub_cache_snapshot_given_as_a_folder_may_link_into_its_blobs(tmp_path, cli, stream_copy):
    """A snapshot of the Hub cache (``models--org--name/snapshots/<commit>``) is made of links into its
    repo's ``blobs/``: those are inside the source."""
    base, item = stream_copy
    repo = tmp_path / "hub" / "models--org--base"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in base.iterdir():
        shutil.copyfile(f, repo / "blobs" / f.name)
        os.symlink(Path("../../blobs") / f.name, snapshot / f.name)
    code, _, err = _merge(cli, snapshot, item, tmp_path / "out")
    assert code == 0, err
    assert weights(tmp_path / "out" / "step-1").keys() == weights(base).keys()
