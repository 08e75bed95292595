"""A step's plan: everything the step will do, decided before any tensor is read.

:func:`plan_step` is a pure function of the stream plan (pre-flight), the previous step's state,
the method's description and the options. It fixes:

- which tensors are carried as low-rank factors this step, with a bound of their rank (from the
  headers' ranks and the previous state: a tensor stays factored while the method has a low-rank
  form for it, the item's task vector on it is low-rank, it was factored before, and the factors
  stay smaller than the matrix; ``lowrank.worth_factoring``);
- the ordered **work units** of each pass: a dense tensor or dim-0 slice of it (``dense``), a
  factored tensor's merge or finish (``factored``), or rows of a factored tensor's published weight
  (``rows``); each names the weights shard it writes;
- the writers' shard cuts (huggingface_hub's split of the planned specs) and, for
  ``--output-format adapter``, the adapter's contents (:class:`~hf_contmerge.artifacts.adapter.AdapterPlan`).

The plan is the same however many workers execute it: :meth:`StepPlan.split` cuts a pass into
contiguous runs of whole tensors balanced by a cost model, and the executor reduces statistics in
plan order, so the bytes do not depend on the split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..artifacts.adapter import AdapterPlan
from ..artifacts.compact import LOW16_PREFIX, block_name, unit_span
from ..artifacts.layout import LEFT, LOWRANK_PREFIX, RIGHT, WEIGHTS_PREFIX
from ..io.safetensors import TensorSpec, iter_row_chunks
from ..io.writer import PlannedShard, plan_shards
from ..methods.base import ELEMENT_COST, KeyInfo, Method
from ..methods.lowrank import worth_factoring
from ..sources.preflight import KeyPlan, StreamPlan

if TYPE_CHECKING:
    from ..artifacts.state import StepState
    from ..options import MergeOptions
    from ..sources.naming import FileLayout

OUT_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
CHUNK_ITEMSIZE = 4  # slices are sized for their float32 working copies


@dataclass(frozen=True)
class ModelFacts:
    """What the plan may know about the base model's modules, computed once per run (and only when
    needed: building the meta model costs a transformers import): the linear weights' file keys
    (methods with ``needs_module_types``) and the file layout (adapter output)."""

    linear: frozenset[str] = frozenset()
    file_layout: FileLayout | None = None


@dataclass(frozen=True)
class WorkUnit:
    """One unit of a pass: ``form`` ``dense`` (a tensor, or rows ``rows`` of it), ``factored`` (a factored
    tensor, whole) or ``rows`` (rows of a factored tensor's published weight). ``shard``: the weights file
    it writes (planned full output), else None. ``heavy``: a whole-matrix kernel (SVD, QR) that gets all
    of torch's threads; the others are memory-bound (see ``executor.py``). ``numel``: elements covered."""

    key: str
    rows: tuple[int, int] | None
    form: Literal["dense", "factored", "rows"]
    numel: int
    shard: str | None = None
    heavy: bool = False


@dataclass(frozen=True)
class StepPlan:
    step: int
    item_index: int  # into the stream plan's items
    keys: tuple[KeyPlan, ...]  # every output tensor, in the base's file order
    info: Mapping[str, KeyInfo]  # what the method may know about each tensor
    out_dtype: Mapping[str, str]  # stored dtype of each published tensor
    factored: Mapping[str, int]  # tensors merged as factors this step -> bound of their rank
    touched: frozenset[str]  # tensors some item so far changed
    passes: tuple[tuple[WorkUnit, ...], ...]  # (merge,) or, for two-pass methods, (merge to scratch, finish)
    slots: tuple[str, ...]
    weight_specs: tuple[TensorSpec, ...]  # full output: every published tensor
    weight_shards: tuple[PlannedShard, ...]
    state_specs: tuple[TensorSpec, ...]  # dense carried tensors of each slot (float32)
    state_shards: Mapping[str, tuple[PlannedShard, ...]]  # slot -> its cut of state_specs (first pass, after pass)
    # the final state's planned files: prefix -> (specs, shards); the weight slot's compact tensors are
    # left out of its float32 file; for bfloat16 weights their low bits are compressed blocks (low_blocks),
    # or planned here, int16, under LOW16_PREFIX + slot (--state-compression none)
    state_files: Mapping[str, tuple[tuple[TensorSpec, ...], tuple[PlannedShard, ...]]]
    compact: Mapping[str, str]  # the weight slot's dense tensors -> "weight" (float32) or "low16" (bfloat16)
    compressed: bool  # the low bits as zstd blocks (low_blocks), else planned in state_files (--state-compression none)
    compressed_slots: tuple[str, ...]  # slots carried as float32 zstd blocks (Method.compressible_slots), not planned
    weight_slot: str | None  # the slot carried over the published weights (Method.carried_weight_slot), if any
    whole_costs: Mapping[str, float]  # tensors merged whole (not sliced) -> their kernel's cost (Method.whole_cost)
    factor_names: tuple[str, ...]  # KEY::left / KEY::right of the factored tensors
    adapter: AdapterPlan | None  # --output-format adapter

    @property
    def two_pass(self) -> bool:
        return len(self.passes) == 2

    @property
    def slot_files(self) -> tuple[str, ...]:
        """File prefixes of the carried state: each slot's dense set, and its factored one if any."""
        return (*self.slots, *(LOWRANK_PREFIX + s for s in self.slots if self.factored))

    def block_files(self) -> dict[str, str]:
        """The final state's files of compressed blocks (``compact.py``), prefix -> kind: the weight slot's low
        bits (``low16``, when it has any) and the compressed slots (``f32``)."""
        has_low = self.compressed and "low16" in self.compact.values()  # compact keys are dense in the final pass
        low = {LOW16_PREFIX + str(self.weight_slot): "low16"} if has_low else {}
        return {**low, **dict.fromkeys(self.compressed_slots, "f32")}

    def low_blocks(self, units: tuple[WorkUnit, ...] | None = None) -> list[str]:
        """The compressed blocks of the weight slot's low bits (``compact.py``) that the final pass's
        ``units`` (default: all of them) write, one per slice, in order."""
        if not self.compressed:
            return []
        units = self.passes[-1] if units is None else units
        return [block_name(u.key, *unit_span(self.info[u.key].shape, u.rows)) for u in units
                if u.form == "dense" and self.compact.get(u.key) == "low16"]

    def slot_blocks(self, units: tuple[WorkUnit, ...] | None = None) -> list[str]:
        """The blocks a compressed slot's file holds for the final pass's ``units`` (default: all), in order:
        one per slice of every dense carried tensor."""
        units = self.passes[-1] if units is None else units
        carried = {sp.key for sp in self.state_specs}
        return [block_name(u.key, *unit_span(self.info[u.key].shape, u.rows), "f32") for u in units
                if u.form == "dense" and u.key in carried]

    def blocks(self, kind: str, units: tuple[WorkUnit, ...] | None = None) -> list[str]:
        """The blocks that ``units`` write to a file of :meth:`block_files` of ``kind``."""
        return self.low_blocks(units) if kind == "low16" else self.slot_blocks(units)

    def published_name(self, key: str) -> str | None:
        """The name ``key``'s merged weight is written under, or None when the output leaves it out (an
        adapter publishes LoRA targets as factors and untouched tensors not at all)."""
        return key if self.adapter is None else self.adapter.published_name(key)

    def cost(self, pass_index: int, unit: WorkUnit) -> float:
        """The cost model's work of ``unit`` in pass ``pass_index`` (:func:`unit_cost`): a tensor merged whole
        as its method counts it, except in a two-pass method's finish, which is elementwise."""
        finish = self.two_pass and pass_index == len(self.passes) - 1
        return unit_cost(unit, self.info[unit.key].shape, self.factored.get(unit.key, 0),
                         None if finish else self.whole_costs.get(unit.key))

    def split(self, pass_index: int, workers: int) -> list[tuple[WorkUnit, ...]]:
        """Pass ``pass_index`` cut into ``workers`` contiguous runs of whole tensors, balanced by :func:`unit_cost`.

        Concatenated in order the runs are the pass itself, for any ``workers``; a run may be empty.
        """
        units = self.passes[pass_index]
        groups: list[list[WorkUnit]] = []
        for u in units:  # a tensor's units stay together (factors, then the rows that need them)
            if groups and groups[-1][0].key == u.key:
                groups[-1].append(u)
            else:
                groups.append([u])
        costs = [sum(self.cost(pass_index, u) for u in g) for g in groups]
        total, done, runs = sum(costs), 0.0, [[] for _ in range(max(1, workers))]
        for group, cost in zip(groups, costs):
            # the run whose share of the total the middle of this tensor falls in
            index = min(int((done + cost / 2) / total * len(runs)) if total else 0, len(runs) - 1)
            runs[index].extend(group)
            done += cost
        return [tuple(r) for r in runs]


def share_report(plan: StepPlan, workers: int) -> str:
    """How ``workers`` ranks would share each pass of ``plan`` (``merge --dry-run --ranks N``): per rank
    the tensors, the float32 elements its kernels touch, the bytes it writes (weights in their output
    dtype, carried slots as stored: float32, or compact; the low bits and compressed slots counted at
    their 2 and 4 bytes before compression) and its share of the cost model's total."""
    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
    carried = {sp.key for sp in plan.state_specs}
    final_state = {k: sum(0 if s == plan.weight_slot and plan.compact.get(k) == "weight" else
                          2 if s == plan.weight_slot and plan.compact.get(k) == "low16" else 4 for s in plan.slots)
                   for k in carried}
    lines = [f"step {plan.step} on {workers} ranks (cost model: multiply-adds; {ELEMENT_COST:g} per element of a memory-bound "
             "pass, the method's count for a tensor merged whole (OPCM: ≈5.6·m·n·k per SVD, m·n·k + 4.6·k³ per Gram "
             "kernel), (m + n)·r² per factored kernel):"]
    for p, _ in enumerate(plan.passes):
        runs = plan.split(p, workers)
        costs = [sum(plan.cost(p, u) for u in run) for run in runs]
        total = sum(costs) or 1.0
        name = "merge" if len(plan.passes) == 1 else ("first pass" if p == 0 else "finish")
        for r, (run, cost) in enumerate(zip(runs, costs)):
            written = sum(u.numel * (itemsize.get(plan.out_dtype[u.key], 4) + (final_state.get(u.key, 0) if u.form == "dense" else 0))
                          for u in run if u.form != "factored") if p == len(plan.passes) - 1 else \
                sum(4 * len(plan.slots) * u.numel for u in run if u.form == "dense" and u.key in carried)
            lines.append(f"  {name}, rank {r}: {len({u.key for u in run})} tensors, {sum(u.numel for u in run) / 1e6:.1f}M "
                         f"elements, writes {written / 1e9:.2f} GB, {100 * cost / total:.1f}% of the cost")
    return "\n".join(lines)


def numel(shape: tuple[int, ...], rows: tuple[int, int] | None) -> int:
    """Elements of a tensor of ``shape``, or of its dim-0 rows ``rows``."""
    n = math.prod(shape) if shape else 1
    return n if rows is None or not shape or shape[0] == 0 else n // shape[0] * (rows[1] - rows[0])


def unit_cost(unit: WorkUnit, shape: tuple[int, ...], rank: int, whole: float | None = None) -> float:
    """Work of a unit, in float32 multiply-adds of a matrix product, for balancing ranks
    (``methods.base.ELEMENT_COST``): ``whole`` (the method's ``whole_cost``) for a tensor merged whole,
    (m + n)·q² for a factored kernel of bound q, ``ELEMENT_COST`` per element of a memory-bound unit."""
    if unit.form == "factored":
        return float((shape[0] + shape[1]) * max(rank, 1) ** 2) if len(shape) == 2 else ELEMENT_COST * unit.numel
    if whole is not None and unit.rows is None:
        return whole
    return ELEMENT_COST * unit.numel


def out_dtype(kp: KeyPlan, dtype: str) -> str:
    """Stored dtype of a published tensor: floats in ``dtype`` (``auto``: the base's), others as they are."""
    if kp.dtype in OUT_DTYPE.values() or kp.dtype == "F64":
        return kp.dtype if dtype == "auto" else OUT_DTYPE[dtype]
    return kp.dtype  # integer / bool buffers keep their dtype


def plan_step(stream: StreamPlan, item_index: int, step: int, previous: StepState | None, method: Method,
              options: MergeOptions, facts: ModelFacts) -> StepPlan:
    """The plan of ``step``, merging ``stream.items[item_index]`` into the previous step (see the module docstring)."""
    item = stream.items[item_index].checkpoint
    chunk_bytes = int(options.chunk_mb * 2**20)
    merged = [kp for kp in stream.keys if kp.merged]
    info = {kp.key: KeyInfo(kp.key, kp.shape, kp.key in facts.linear) for kp in stream.keys}

    factored: dict[str, int] = {}
    if options.lowrank != "off" and method.lowrank:
        for kp in merged:
            if len(kp.shape) != 2 or not method.lowrank_key(info[kp.key]):
                continue
            ikey = kp.item_keys[item_index]
            rank = 0 if ikey is None else item.low_rank(ikey)
            if rank is None:
                continue
            if previous is not None:
                if kp.key not in previous.lowrank:  # dense before: dense from then on
                    continue
                rank += previous.lowrank[kp.key]
            if worth_factoring(kp.shape, rank):
                factored[kp.key] = rank
    touched = set(previous.touched) if previous else set()
    for kp in merged:
        ikey = kp.item_keys[item_index]
        if ikey is not None and item.low_rank(ikey) != 0:
            touched.add(kp.key)

    adapter = None
    if options.output_format == "adapter":
        adapter = AdapterPlan.plan(facts.file_layout, set(factored), touched, options.max_rank)
    dtypes = {kp.key: out_dtype(kp, options.dtype) for kp in stream.keys}
    weight_specs = tuple(TensorSpec(kp.key, kp.shape, dtypes[kp.key]) for kp in stream.keys) if adapter is None else ()
    weight_shards = tuple(plan_shards(weight_specs, options.shard_bytes, WEIGHTS_PREFIX))
    shard_of = {k: shard.name for shard in weight_shards for k in shard.keys}

    published = (lambda key: key) if adapter is None else adapter.published_name

    def dense(kp: KeyPlan, final: bool) -> list[WorkUnit]:
        whole = kp.merged and not method.can_slice(info[kp.key])  # the kernel needs the whole tensor (an SVD)
        cuts = [None] if whole else iter_row_chunks(kp.shape, CHUNK_ITEMSIZE, chunk_bytes)
        return [WorkUnit(kp.key, rows, "dense", numel(kp.shape, rows), shard_of.get(kp.key) if final else None, whole)
                for rows in cuts]

    def factors(kp: KeyPlan) -> WorkUnit:
        return WorkUnit(kp.key, None, "factored", numel(kp.shape, None), None, heavy=True)

    passes: list[tuple[WorkUnit, ...]] = []
    if method.two_pass:
        passes.append(tuple(u for kp in merged for u in ([factors(kp)] if kp.key in factored else dense(kp, final=False))))
    final: list[WorkUnit] = []
    for kp in stream.keys:
        if kp.key in factored:
            final.append(factors(kp))
            if published(kp.key) is not None:  # an adapter publishes the factors themselves, no rows
                final += [WorkUnit(kp.key, rows, "rows", numel(kp.shape, rows), shard_of.get(kp.key))
                          for rows in iter_row_chunks(kp.shape, CHUNK_ITEMSIZE, chunk_bytes)]
        elif kp.merged or adapter is None:
            final += dense(kp, final=True)
    passes.append(tuple(final))

    state_specs = tuple(TensorSpec(kp.key, kp.shape, "F32") for kp in merged if kp.key not in factored)
    # the weight slot over the published weights (compact.py): only a full output publishes them, and a
    # non-finite value allowed through (--allow-nonfinite) has no bit relation to its rounding
    slot = method.carried_weight_slot() if adapter is None and not options.allow_nonfinite else None
    compact = {} if slot is None else {sp.key: {"F32": "weight", "BF16": "low16"}[dtypes[sp.key]] for sp in state_specs
                                       if dtypes[sp.key] in ("F32", "BF16")}
    compressed = options.state_compression == "zstd"
    # a two-pass method's first pass and the after pass write planned float32 files: those slots stay planned
    squeezed = tuple(s for s in method.compressible_slots if compressed and s != slot and s not in method.after_slots
                     and not method.two_pass)
    state_files = {}
    for s in method.slots:
        specs = tuple(sp for sp in state_specs if s != slot or sp.key not in compact)
        if s not in squeezed:
            state_files[s] = (specs, tuple(plan_shards(specs, options.shard_bytes, s)))
    if not compressed and (low := tuple(TensorSpec(sp.key, sp.shape, "I16") for sp in state_specs if compact.get(sp.key) == "low16")):
        state_files[LOW16_PREFIX + slot] = (low, tuple(plan_shards(low, options.shard_bytes, LOW16_PREFIX + slot)))
    return StepPlan(
        step=step,
        item_index=item_index,
        keys=tuple(stream.keys),
        info=info,
        out_dtype=dtypes,
        factored=factored,
        touched=frozenset(touched),
        passes=tuple(passes),
        slots=tuple(method.slots),
        weight_specs=weight_specs,
        weight_shards=weight_shards,
        state_specs=state_specs,
        state_shards={s: tuple(plan_shards(state_specs, options.shard_bytes, s)) for s in method.slots},
        state_files=state_files,
        compact=compact,
        compressed=compressed,
        compressed_slots=squeezed,
        weight_slot=slot if compact else None,
        whole_costs={kp.key: method.whole_cost(info[kp.key]) for kp in merged if not method.can_slice(info[kp.key])},
        factor_names=tuple(n for key in factored for n in (key + LEFT, key + RIGHT)),
        adapter=adapter,
    )
