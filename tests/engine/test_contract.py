"""The method contract: kernels are functions of their arguments; calibration statistics reach them per tensor."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from hf_contmerge.engine.calibration import Calibrated
from hf_contmerge.engine.run import Engine
from hf_contmerge.errors import ContMergeError
from hf_contmerge.io.checkpoint import TensorDict
from hf_contmerge.methods.base import CalibrationRequest, Method, TensorOutput
from hf_contmerge.methods.registry import REGISTRY, build_method
from hf_contmerge.options import MergeOptions
from support.tiny_models import weights


def _hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*")) if p.is_file()}


class FreshEachTime:
    """Stands in for a method object: every attribute is taken from a method object built anew, so no
    kernel call can see anything an earlier call left behind."""

    def __init__(self, name: str, params: dict):
        self._name, self._params = name, params
        self.built = 0

    def __getattr__(self, attr: str):
        self.built += 1
        return getattr(build_method(self._name, self._params), attr)


def _options(base, items, out, method, **values) -> MergeOptions:
    return MergeOptions.create(base=str(base), stream=[str(i) for i in items], method=method, out=out, quiet=True,
                               chunk_mb=0.002, **values)


@pytest.mark.parametrize("method", list(REGISTRY))
def test_method_recreated_between_tensors_gives_the_same_bytes(tmp_path, streams, method):
    base, items = streams("llama")
    # a data-dependent method gets fixed statistics: what is tested here is that it keeps nothing between calls
    stats = {r.statistic: {k: v.abs() + 0.5 for k, v in weights(base).items() if v.is_floating_point()}
             for r in build_method(method, {}).calibration}
    Engine(_options(base, items, tmp_path / "normal", method), calibrator=Calibrator(stats) if stats else None).run()
    engine = Engine(_options(base, items, tmp_path / "fresh", method), calibrator=Calibrator(stats) if stats else None)
    assert set(vars(engine.method)) == {"params"}  # a method object holds its parameters, nothing else
    engine.method = FreshEachTime(method, engine.options.params)
    engine.run()
    assert engine.method.built > 3 * len(weights(base))  # a new object for (at least) every tensor of every step
    assert _hashes(tmp_path / "fresh") == _hashes(tmp_path / "normal")


def test_factored_opcm_recreated_between_tensors_gives_the_same_bytes(tmp_path, lora_stream):
    base, adapters, _ = lora_stream
    Engine(_options(base, adapters, tmp_path / "normal", "opcm")).run()
    engine = Engine(_options(base, adapters, tmp_path / "fresh", "opcm"))
    engine.method = FreshEachTime("opcm", {})
    engine.run()
    assert _hashes(tmp_path / "fresh") == _hashes(tmp_path / "normal")


# ---------------------------------------------------------------- calibration: the seam data-dependent methods use
class Weighted(Method):
    """test-only: θ(t) = θ(t−1) + c·w ⊙ (θt − θ0), with w a per-tensor statistic of the item and c a scalar."""

    name = "weighted"
    summary = "test"
    reference = "test"
    calibration = (CalibrationRequest("importance", "item"),)

    def merge(self, ctx, x):
        start = x.base if x.prev is None else x.prev["merged"]
        return TensorOutput({"merged": start + ctx.calibration["c"] * x.extra["importance"] * (x.item - x.base)})


class Calibrator:
    """test-only: statistic ``name`` of step t is ``t · stats[name]`` (``importance`` by default), scalar c = 0.5."""

    def __init__(self, stats: dict[str, dict[str, torch.Tensor]] | dict[str, torch.Tensor]):
        first = next(iter(stats.values()))
        self.stats = stats if isinstance(first, dict) else {"importance": stats}
        self.calls, self.prepared = [], []

    def prepare(self, steps, base):
        self.prepared.append(sorted(steps))

    def calibrate(self, step, requests, *, base, item, previous_step, key_map, scratch):
        self.calls.append((step, requests, item.spec.text, previous_step))
        assert set(key_map.values()) <= set(weights(base.folder))  # the merged tensors' output names
        tensors = {name: TensorDict({k: v * step for k, v in stat.items()}) for name, stat in self.stats.items()}
        return Calibrated(tensors, {"c": 0.5})


def test_calibration_statistics_reach_every_slice(tmp_path, streams, monkeypatch):
    monkeypatch.setitem(REGISTRY, "weighted", Weighted)
    base, items = streams("llama")
    b = weights(base)
    g = torch.Generator().manual_seed(3)
    importance = {k: torch.rand(v.shape, generator=g) for k, v in b.items()}
    calibrator = Calibrator(importance)
    out = tmp_path / "out"
    Engine(_options(base, items[:2], out, "weighted"), calibrator=calibrator).run()  # tiny slices: rows of each statistic
    assert [(c[0], c[2], c[3]) for c in calibrator.calls] == [(1, str(items[0]), None), (2, str(items[1]), out / "step-1")]
    assert calibrator.prepared == [[1, 2]]  # every step's data checked before the first one is written
    expected = {k: v.double() for k, v in b.items()}
    for t, item in enumerate(items[:2], start=1):
        ft = weights(item)
        expected = {k: expected[k] + 0.5 * t * importance[k].double() * (ft[k].double() - b[k].double()) for k in b}
        got = weights(out / f"step-{t}")
        for k in b:
            torch.testing.assert_close(got[k].double(), expected[k], atol=1e-6, rtol=1e-5)


def test_a_method_needing_calibration_without_a_calibrator_is_refused(tmp_path, streams, cli, monkeypatch):
    monkeypatch.setitem(REGISTRY, "weighted", Weighted)
    base, items = streams("llama")
    with pytest.raises(ContMergeError, match="'weighted' needs calibration data"):
        Engine(_options(base, items, tmp_path / "out", "weighted"))
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "weighted", "--out", tmp_path / "out")
    assert code == 2 and "needs calibration data" in err and not (tmp_path / "out").exists()
