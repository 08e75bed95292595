"""Every method's step folders are byte-identical to the ones recorded before the architecture change."""

from __future__ import annotations

import json

import pytest

from support.golden_steps import CASES, GOLDEN, build_fixtures, run_cases, versions


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    build_fixtures(root)
    return run_cases(root)


@pytest.mark.parametrize("case", list(CASES))
def test_step_folders_match_recorded_bytes(produced, case):
    golden = json.loads(GOLDEN.read_text())
    if golden["versions"] != versions():
        pytest.fail(f"golden hashes were recorded with {golden['versions']}, this environment has {versions()}: "
                    "review the change and re-record with `python tests/support/golden_steps.py record`")
    want, got = golden["cases"][case], produced[case]
    assert sorted(got) == sorted(want), f"{case}: files differ"
    changed = [name for name in want if got[name] != want[name]]
    assert not changed, f"{case}: bytes changed in {changed}"
