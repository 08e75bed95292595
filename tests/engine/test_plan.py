"""The step plan on its own: chunking, factored selection, adapter export, shard cuts, splits for N workers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from hf_contmerge.artifacts.state import StepState
from hf_contmerge.engine.plan import CHUNK_ITEMSIZE, ModelFacts, StepPlan, plan_step
from hf_contmerge.io.writer import plan_shards
from hf_contmerge.methods.registry import build_method
from hf_contmerge.options import MergeOptions
from hf_contmerge.sources.naming import config_from_dict, file_layout
from hf_contmerge.sources.preflight import plan_stream
from hf_contmerge.sources.resolve import resolve


def _stream(base: Path, items: list[Path]):
    b = resolve(str(base), role="base", lazy=True)
    return plan_stream(b, [resolve(str(i), role="stream item", base=b, lazy=True) for i in items])


def _plan(stream, method: str, step: int = 1, previous: StepState | None = None, index: int = 0, **options) -> StepPlan:
    opts = MergeOptions.create(base=str(stream.base.spec.text), stream=[i.spec.text for i in stream.items], method=method,
                               out=Path("unused"), **options)
    m = build_method(method, opts.params)
    layout = file_layout(config_from_dict(stream.base.config))
    facts = ModelFacts(frozenset(layout.linear) if m.needs_module_types else frozenset(), layout)
    return plan_step(stream, index, step, previous, m, opts, facts)


def _previous(step: int, lowrank: dict[str, int], touched: list[str] = ()) -> StepState:
    return StepState(step=step, method="opcm", params={}, options={}, base={}, stream=[], lowrank=lowrank, touched=list(touched))


@pytest.fixture(scope="module")
def llama_stream(streams):
    base, items = streams("llama")
    return _stream(base, items)


def test_dense_units_cover_every_row_once_within_the_budget(llama_stream):
    chunk_mb = 0.002
    plan = _plan(llama_stream, "task_arithmetic", chunk_mb=chunk_mb)
    budget = int(chunk_mb * 2**20)
    assert len(plan.passes) == 1 and not plan.factored
    units = plan.passes[0]
    assert [u.key for u in units if u.rows is None or u.rows[0] == 0] == [kp.key for kp in plan.keys]  # base file order
    for kp in plan.keys:
        mine = [u for u in units if u.key == kp.key]
        assert all(u.form == "dense" and not u.heavy and u.shard == "model.safetensors" for u in mine)
        if len(mine) == 1 and mine[0].rows is None:
            assert math.prod(kp.shape) * CHUNK_ITEMSIZE <= budget or len(kp.shape) < 1
            continue
        cuts = [u.rows for u in mine]
        assert cuts[0][0] == 0 and cuts[-1][1] == kp.shape[0]
        assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))  # contiguous, no overlap
        row = math.prod(kp.shape[1:]) * CHUNK_ITEMSIZE
        assert all((b - a) * row <= max(budget, row) for a, b in cuts)
        assert sum(u.numel for u in mine) == math.prod(kp.shape)


def test_whole_tensor_kernels_get_whole_tensors(llama_stream):
    plan = _plan(llama_stream, "ties", chunk_mb=0.002)  # TIES trims per tensor: not elementwise
    assert all(u.rows is None and u.heavy for u in plan.passes[0])


def test_opcm_plan_two_passes_linear_weights_whole(llama_stream):
    plan = _plan(llama_stream, "opcm", chunk_mb=0.002)
    first, final = plan.passes
    linear = {k for k, info in plan.info.items() if info.linear}
    assert "model.layers.0.self_attn.q_proj.weight" in linear and "model.embed_tokens.weight" not in linear
    assert "model.norm.weight" not in linear
    for u in first:
        assert u.shard is None  # the first pass writes scratch slots only
        assert (u.rows is None and u.heavy) if u.key in linear else not u.heavy
    assert {u.key for u in first} == {kp.key for kp in plan.keys if kp.merged}
    assert [(u.key, u.rows) for u in first] == [(u.key, u.rows) for u in final]  # merged keys only: same cut
    assert any(u.rows is not None for u in first if u.key == "model.embed_tokens.weight")  # the plain rule is sliced


def test_factored_selection_from_headers_and_previous_state(lora_stream):
    base, adapters, _ = lora_stream
    stream = _stream(base, adapters[:1])  # r = 4 on q/k/v/o/gate/up/down
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    plan = _plan(stream, "opcm")
    assert plan.factored[q] == 4 and plan.factored[k] == 4
    assert plan.factored["model.embed_tokens.weight"] == 0  # a matrix the adapter leaves alone: rank 0
    assert "model.norm.weight" not in plan.factored  # 1-D: never factored
    assert plan.touched == {key for key in plan.factored if plan.factored[key] > 0}
    assert plan.factor_names[:2] == (f"{next(iter(plan.factored))}::left", f"{next(iter(plan.factored))}::right")
    assert not set(plan.factored) & {spec.key for spec in plan.state_specs}  # the dense state holds the others
    # step 2: the bound grows by the previous factors' rank: q_proj (32 x 32) at 4 + 8 = 12 is still smaller as
    # factors (12·64 < 1024), k_proj (16 x 32) at 4 + 12 = 16 is not (16·48 ≥ 512); tensors dense before stay dense
    plan2 = _plan(stream, "opcm", step=2, previous=_previous(1, {q: 8, k: 12}))
    assert plan2.factored == {q: 12}
    assert plan2.touched >= {q, k}
    assert not _plan(stream, "opcm", lowrank="off").factored
    assert not _plan(stream, "average").factored  # no low-rank form


def test_adapter_export_plan(lora_stream):
    base, adapters, _ = lora_stream
    stream = _stream(base, adapters[:1])
    plan = _plan(stream, "opcm", output_format="adapter", max_rank=3)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert plan.adapter is not None and plan.adapter.max_rank == 3
    assert q in plan.adapter.lora_keys and not plan.adapter.dense_keys
    assert plan.published_name(q) is None and plan.published_name("model.norm.weight") is None
    final = plan.passes[-1]
    assert not any(u.form == "rows" for u in final)  # factors are published, never rows
    assert not plan.weight_specs and not plan.weight_shards
    assert f"base_model.model.{'model.layers.0.self_attn.q_proj'}.lora_A.weight" in plan.adapter.names()
    full = _plan(stream, "opcm")
    assert [u.form for u in full.passes[-1] if u.key == q][1:] and all(
        u.form == "rows" for u in full.passes[-1] if u.key == q and u.form != "factored")


def test_weight_shards_are_huggingface_s_split(llama_stream):
    plan = _plan(llama_stream, "average", shard_size="20KB")
    assert len(plan.weight_shards) > 1
    assert [s.name for s in plan.weight_shards] == [f"model-{i:05d}-of-{len(plan.weight_shards):05d}.safetensors"
                                                     for i in range(1, len(plan.weight_shards) + 1)]
    assert [k for s in plan.weight_shards for k in s.keys] == [kp.key for kp in plan.keys]
    assert plan_shards(plan.weight_specs, 20_000) == list(plan.weight_shards)
    shard_of = {k: s.name for s in plan.weight_shards for k in s.keys}
    assert all(u.shard == shard_of[u.key] for u in plan.passes[-1])
    assert all(s.dtype == "F32" for s in plan.state_specs) and set(plan.state_shards) == {"merged"}


def test_plan_reads_no_tensor_and_is_reproducible(llama_stream, monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("the plan read a tensor")

    for src in (llama_stream.base, *llama_stream.items):
        monkeypatch.setattr(src.checkpoint, "read", refuse)
    assert _plan(llama_stream, "opcm", chunk_mb=0.002) == _plan(llama_stream, "opcm", chunk_mb=0.002)


@pytest.mark.parametrize("method", ["task_arithmetic", "opcm"])
def test_split_for_one_and_two_workers_covers_the_same_units_in_order(llama_stream, method):
    plan = _plan(llama_stream, method, chunk_mb=0.002)
    shapes = {kp.key: kp.shape for kp in plan.keys}
    for p, units in enumerate(plan.passes):
        (one,) = plan.split(p, 1)
        assert one == units
        halves = plan.split(p, 2)
        assert len(halves) == 2 and halves[0] + halves[1] == units and all(halves)
        assert not {u.key for u in halves[0]} & {u.key for u in halves[1]}  # a tensor is never cut between workers
        costs = [sum(plan.cost(p, u) for u in h) for h in halves]
        biggest = max(sum(plan.cost(p, u) for u in units if u.key == k) for k in shapes)
        assert max(costs) <= sum(costs) / 2 + biggest  # balanced up to one tensor
        assert sum(map(len, plan.split(p, 5))) == len(units) and sum(plan.split(p, 5), ()) == units
