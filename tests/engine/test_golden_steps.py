"""Every method's step folders are byte-identical to the ones recorded before the architecture change
(on a processor whose LAPACK gives other last bits, the OPCM cases equal them up to rounding: see
``support/golden_steps.py``). The configs transformers writes carry its version
(``transformers_version``), which the loose requirement lets a fresh install move on: they must be
the recorded ones but for that field. The compressed blocks of a carried state (state formats 4 and 5: the low
bits ``low16-*``, MagMax's ``tau_max``) must give back the recorded float32 state, whatever their bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from support.golden_steps import (
    CASES,
    GOLDEN,
    LINALG,
    build_fixtures,
    differences,
    expected,
    hash_steps,
    holds_blocks,
    machine,
    run_cases,
    summaries,
    versions,
)

STAMPED = {"config.json", "generation_config.json"}  # written by transformers, with its version in them


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    build_fixtures(root)
    return root, run_cases(root)


@pytest.mark.parametrize("case", list(CASES))
def test_step_folders_match_recorded_bytes(produced, case):
    golden = json.loads(GOLDEN.read_text())
    root, hashes = produced
    want, got = expected(golden, case), hashes[case]
    assert sorted(got) == sorted(want), f"{case}: files differ"
    changed = [name for name in want if got[name] != want[name]]
    found = summaries(root / f"out-{case}") if changed else {}  # read once, for the two comparisons below
    restamped = [name for name in changed if Path(name).name in STAMPED]
    if restamped:
        unstamped = lambda summary: {k: v for k, v in summary.items() if k != "transformers_version"}  # noqa: E731
        beyond = [name for name in restamped if unstamped(golden["summaries"][case][name]) != unstamped(found[name])]
        assert not beyond, (f"{case}: {beyond} changed beyond transformers_version (recorded with {golden['versions']}, "
                            f"here {versions()})")
        changed = [name for name in changed if name not in restamped]
    compressed = [name for name in changed if holds_blocks(root / f"out-{case}" / name)]
    if compressed:  # zstd frames, whose bytes a zstandard release may change: the float32 state they give back
        loose = case in LINALG and machine() not in golden.get("machines", {})
        moved = [p for name in compressed for p in differences(golden["summaries"][case][name], found[name], name)] if loose \
            else [name for name in compressed if golden["summaries"][case][name] != found[name]]
        assert not moved, f"{case}: the carried state changed in {moved[:5]}"
        changed = [name for name in changed if name not in compressed]
    if changed and case in LINALG and machine() not in golden.get("machines", {}):
        problems = [p for name in changed for p in differences(golden["summaries"][case][name], found[name], name)]
        assert not problems, f"{case} on {machine()}: more than LAPACK rounding changed: {problems[:5]}"
        return
    assert not changed, (f"{case}: bytes changed in {changed} (recorded with {golden['versions']}, here {versions()}: "
                         "after reviewing the change, re-record with `python tests/support/golden_steps.py record`)")


@pytest.mark.parametrize("case", ["task_arithmetic_bf16_sliced", "average_lora"])
def test_the_torch_codec_writes_the_same_step_folders(produced, monkeypatch, case):
    """Without the compiled low-bits codec (no C compiler: artifacts/native.py) every file is the same, the
    compressed low bits and the ties included (the sliced case cuts tensors off whole bytes of ties)."""
    from hf_contmerge.artifacts import native
    from hf_contmerge.cli import main

    root, hashes = produced
    assert native.library() is not None or shutil.which("cc") is None
    monkeypatch.setattr(native, "library", lambda: None)
    monkeypatch.chdir(root)
    assert main(["merge", *CASES[case], "--out", f"torch-{case}", "--quiet"]) == 0
    assert hash_steps(root / f"torch-{case}") == hashes[case]
