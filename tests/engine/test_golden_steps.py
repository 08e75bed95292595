"""Every method's step folders are byte-identical to the ones recorded before the architecture change
(on a processor whose LAPACK gives other last bits, the OPCM cases equal them up to rounding: see
``support/golden_steps.py``)."""

from __future__ import annotations

import json

import pytest

from support.golden_steps import CASES, GOLDEN, LINALG, build_fixtures, differences, expected, machine, run_cases, summaries, versions


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    build_fixtures(root)
    return root, run_cases(root)


@pytest.mark.parametrize("case", list(CASES))
def test_step_folders_match_recorded_bytes(produced, case):
    golden = json.loads(GOLDEN.read_text())
    if golden["versions"] != versions():
        pytest.fail(f"golden hashes were recorded with {golden['versions']}, this environment has {versions()}: "
                    "review the change and re-record with `python tests/support/golden_steps.py record`")
    root, hashes = produced
    want, got = expected(golden, case), hashes[case]
    assert sorted(got) == sorted(want), f"{case}: files differ"
    changed = [name for name in want if got[name] != want[name]]
    if changed and case in LINALG and machine() not in golden.get("machines", {}):
        found = summaries(root / f"out-{case}")
        problems = [p for name in changed for p in differences(golden["summaries"][case][name], found[name], name)]
        assert not problems, f"{case} on {machine()}: more than LAPACK rounding changed: {problems[:5]}"
        return
    assert not changed, f"{case}: bytes changed in {changed}"
