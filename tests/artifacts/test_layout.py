"""The step folder on disk: every file of a step durable before the step becomes visible; size options."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hf_contmerge.artifacts import layout
from hf_contmerge.options import parse_size


def test_every_file_and_folder_of_a_step_is_fsynced_before_it_appears(tmp_path, streams, cli, monkeypatch):
    base, items = streams("bert")
    synced: list[tuple[str, bool]] = []  # (path, did the step already exist)
    real = os.fsync

    def recording(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((path, (tmp_path / "out" / "step-1").exists()))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    code, _, err = cli("merge", "--base", base, "--stream", items[0], "--method", "opcm", "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    step, out = tmp_path / "out" / "step-1", tmp_path / "out"
    before = set()  # what was fsynced in the partial folder, relative to it
    for path, visible in synced:
        parts = Path(path).relative_to(out).parts if Path(path).is_relative_to(out) else ()
        if not visible and parts and layout.PARTIAL_RE.fullmatch(parts[0]):
            before.add(str(Path(*parts[1:])) if parts[1:] else ".")
    files = {str(p.relative_to(step)) for p in step.rglob("*")}
    assert files and files | {"."} <= before  # config, tokenizer files, state, card, shards, folders: all of them
    assert any(p == str(tmp_path / "out") for p, visible in synced if visible)  # the parent, after the rename


@pytest.mark.parametrize("text,size", [("5GB", 5 * 10**9), ("20KB", 20_000), ("1000000", 10**6), ("2GiB", 2 * 2**30),
                                       ("1.5MB", 1_500_000), (" 3 mb ", 3 * 10**6)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "5 GBs", "-1MB", "five"])
def test_bad_sizes(text):
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


def test_layout_lists_every_file_name():
    assert {"SAFE_SINGLE", "STATE_FILE", "HEADS_DIR", "ADAPTER_CONFIG", "SIDE_PATTERNS"} <= set(layout.__all__)
    assert all(hasattr(layout, name) for name in layout.__all__)
