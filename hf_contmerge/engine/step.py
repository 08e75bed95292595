"""Executing a step's plan: the passes over its work units, the kernels, the statistics, the writers.

For every unit the reader thread loads, as stored: the base tensor (or rows), the new item's, the
method's carried slots from the previous step (dense, or factors ``base + L @ R`` expanded by rows),
or the first pass's slots, and per-tensor calibration statistics; the calling thread converts to
float32 on the device, calls the method's kernel with a :class:`~hf_contmerge.methods.base.StepContext`,
adds its statistics in plan order, and queues what to write: the published weight (output dtype)
and the new slots (float32). Two-pass methods write their first pass to a scratch area of the
partial folder, then ``end_pass`` gives the new scalars, then the second pass finishes every tensor.

With several ranks (``distributed.py``) each executes its run of every pass (``StepPlan.split``):
planned files are shared (rank 0 creates them, each rank ``pwrite``s its tensors at their offsets),
the factors of factored tensors (and an adapter's tensors, one file) go to rank 0, which writes them
in plan order, and every unit's statistics are gathered and added in plan order, so the files and
scalars are those of one process. A method's ``after_slots`` pass is split the same way as its final pass.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from contextlib import ExitStack, closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..artifacts.adapter import AdapterExport
from ..artifacts.compact import LOW16_PREFIX, SHAPES, TIES_PREFIX, BlockWriter, TieCollector, block_name, encode_bf16, unit_span
from ..artifacts.folder import open_lowrank, open_slot
from ..artifacts.layout import ADAPTER_WEIGHTS_PREFIX, LEFT, LOWRANK_PREFIX, PASS1_DIR, RIGHT, STATE_DIR, WEIGHTS_PREFIX
from ..artifacts.state import StepState
from ..errors import ContMergeError
from ..io.checkpoint import Checkpoint, TensorIndex
from ..io.safetensors import SAFE_DTYPES, finite, iter_row_chunks
from ..io.writer import Share, StreamingWriter
from ..methods.base import LowRankInputs, Method, StepContext, StepStats, TensorInputs, TensorOutput
from ..methods.lowrank import LowRank
from ..sources.preflight import StreamPlan
from .distributed import World
from .executor import PIPELINE_CHUNKS, run_units
from .plan import StepPlan, WorkUnit


@dataclass
class StepResult:
    """A written step: its number, its folder and its state."""

    step: int
    folder: Path
    state: StepState
    # while a step is being published (``StepHook.before_publish``): the base's local folder, the item and
    # the whole stream's plan (``StreamPlan``: every item, the ones still to come too)
    base_folder: Path | None = None
    item: Any = None
    stream: Any = None


@dataclass
class TensorsWritten:
    """What writing a step's tensors leaves for its state: the new scalars, the rank of every factored
    tensor, and the adapter's summary when one was written."""

    scalars: dict[str, Any]
    ranks: dict[str, int] = field(default_factory=dict)
    adapter: AdapterExport | None = None


def _read_lowrank(ck: TensorIndex, key: str) -> LowRank:
    return LowRank(ck.read(key + LEFT).to(torch.float32), ck.read(key + RIGHT).to(torch.float32))


def _factor_tensors(key: str, factors: LowRank) -> list[tuple[str, torch.Tensor]]:
    """The two named tensors that store a factored tensor in the state files."""
    return [(key + LEFT, factors.left), (key + RIGHT, factors.right)]


class _Deferred:
    """An appended writer (factors, an adapter) in a step of several ranks: what is written to it is gathered and
    written by rank 0 in plan order (``real``, on rank 0 only)."""

    def __init__(self, prefix: str, real: StreamingWriter | None):
        self.prefix, self.real = prefix, real

    def close(self) -> list[Path]:
        return self.real.close() if self.real is not None else []


class _Recorder:
    """A unit's ``StepStats.add`` calls, kept to be added in plan order (:meth:`StepWriter._run`)."""

    def __init__(self) -> None:
        self.adds: list[tuple[str, TensorOutput]] = []

    def add(self, key: str, out: TensorOutput) -> None:
        self.adds.append((key, TensorOutput({}, {k: float(v) for k, v in out.stats.items()}, dict(out.notes))))


class StepWriter:
    """Writes the tensors of one planned step into a partial step folder (``write``)."""

    def __init__(self, plan: StepPlan, stream: StreamPlan, method: Method, *, device: torch.device, chunk_bytes: int,
                 shard_bytes: int, allow_nonfinite: bool, quiet: bool,
                 calibration: Mapping[str, TensorIndex] | None = None, calibration_scalars: Mapping[str, float] | None = None,
                 world: World | None = None):
        self.world = world or World()
        self.plan, self.stream, self.method = plan, stream, method
        self.device, self.chunk_bytes, self.shard_bytes = device, chunk_bytes, shard_bytes
        self.allow_nonfinite, self.quiet = allow_nonfinite, quiet
        self.calibration = dict(calibration or {})
        self.calibration_scalars = dict(calibration_scalars or {})
        self.item = stream.items[plan.item_index]
        self.kp = {kp.key: kp for kp in plan.keys}
        self.prev: dict[str, TensorIndex] = {}
        self.prev_lowrank: dict[str, TensorIndex] = {}
        self.first: dict[str, TensorIndex] = {}
        self.factors: tuple[str, dict[str, LowRank]] | None = None  # final factors of the key being written
        self._ties: dict[str, TieCollector] = {}  # a compact tensor's ties so far, by its slices
        # the base is read for its bytes' fingerprint too: skipped only once that is known (cache or commit)
        self.skip_base = not method.needs_base and stream.base.fingerprint_ready
        self.written = TensorsWritten({})

    # ------------------------------------------------------------------ the step
    def write(self, partial: Path, prev_folder: Path | None, scalars: dict[str, Any],
              prev_weight_slot: str | None = None) -> TensorsWritten:
        """``prev_weight_slot``: the slot the previous step carries over its published weights (its state's)."""
        plan, method = self.plan, self.method
        ctx = StepContext(plan.step, scalars, self.device, self.calibration_scalars)
        with ExitStack() as stack:
            if prev_folder is not None:
                for slot in method.slots:
                    self.prev[slot] = stack.enter_context(closing(open_slot(prev_folder, slot, prev_weight_slot)))
                    if (factored := open_lowrank(prev_folder, slot)) is not None:
                        self.prev_lowrank[slot] = stack.enter_context(closing(factored))
                self._check_previous(prev_folder)
            world, last = self.world, len(plan.passes) - 1
            mine = [plan.split(p, world.size)[world.rank] for p in range(len(plan.passes))]
            with world.agree(f"creating the files of step {plan.step}"):
                weights = self._weights_writer(partial, mine[last])
                state = self._slot_writers(partial / STATE_DIR, mine[last])
            total = sum(u.numel for u in mine[last]) if world.size > 1 else \
                sum(math.prod(kp.shape) if kp.shape else 1 for kp in plan.keys)
            bar = tqdm(total=total * len(plan.passes), unit="el", unit_scale=True, desc=f"step {plan.step}",
                       disable=self.quiet or not world.main, leave=False)
            with bar:
                stats = StepStats()
                if plan.two_pass:
                    with world.agree(f"creating the first-pass files of step {plan.step}"):
                        scratch = self._slot_writers(partial / PASS1_DIR, mine[0], scratch=True)
                    with world.agree(f"the first pass of step {plan.step}"):
                        done = self._run(0, mine[0], lambda u, raw, st: self._first_pass(ctx, st, scratch, u, raw), bar)
                    self._combine(done, stats, scratch, f"the first pass of step {plan.step}")
                    ctx = replace(ctx, scalars=method.end_pass(ctx, stats))
                    for prefix in plan.slot_files:
                        self.first[prefix] = stack.enter_context(closing(Checkpoint.open(partial / PASS1_DIR, prefix=prefix)))
                with world.agree(f"writing step {plan.step}"):
                    done = self._run(last, mine[last], lambda u, raw, st: self._final_pass(ctx, st, weights, state, u, raw), bar)
                    if not isinstance(weights, _Deferred):
                        weights.close()
                self._combine(done, stats, {**state, ADAPTER_WEIGHTS_PREFIX: weights} if isinstance(weights, _Deferred)
                              else state, f"writing step {plan.step}")
            if plan.two_pass:
                for ck in self.first.values():
                    ck.close()
                if world.main:
                    shutil.rmtree(partial / PASS1_DIR)
            else:
                ctx = replace(ctx, scalars=method.end_pass(ctx, stats))
            if world.size > 1:  # the factored tensors' ranks, from every rank, for the state rank 0 writes
                self.written.ranks = {k: r for ranks in world.gather(self.written.ranks) for k, r in ranks.items()}
                self.written.ranks = {k: self.written.ranks[k] for k in plan.factored if k in self.written.ranks}
                if (export := self.written.adapter) is not None:  # what its weights add up to, in plan order
                    parts = {k: p for rank in world.gather(export.parts) for k, p in rank.items()}
                    export.parts = {u.key: parts[u.key] for u in plan.passes[last] if u.key in parts}
        self.written.scalars = dict(ctx.scalars)
        return self.written

    def write_after(self, partial: Path, prev_folder: Path | None, extras: Mapping[str, TensorIndex],
                    scalars: dict[str, Any]) -> None:
        """The ``after_slots`` of every merged tensor, once the merged model's statistics (``extras``) are
        known: dim-0 slices of at most ``chunk_bytes`` (float32), in the planned order of the state."""
        plan, method, world = self.plan, self.method, self.world
        ctx = StepContext(plan.step, scalars, self.device, self.calibration_scalars)
        last = len(plan.passes) - 1
        # each rank the tensors of its run of the final pass; a state tensor in no run (none today) is rank 0's
        runs, keys = [{u.key for u in run} for run in plan.split(last, world.size)], {s.key for s in plan.state_specs}
        mine = keys & runs[world.rank] | (keys - set().union(*runs) if world.main else set())
        with ExitStack() as stack:
            prev = {s: stack.enter_context(closing(open_slot(prev_folder, s))) for s in method.after_slots} if prev_folder else {}
            with world.agree(f"creating the files of step {plan.step}'s after pass"):
                writers = {s: StreamingWriter.planned(partial / STATE_DIR, plan.state_specs, plan.state_shards[s], s,
                                                      share=self._share(mine)) for s in method.after_slots}
            with world.agree(f"the after pass of step {plan.step}"):
                for spec in plan.state_specs:
                    if spec.key not in mine:
                        continue
                    for rows in iter_row_chunks(spec.shape, 4, self.chunk_bytes):
                        extra = {n: idx.read(spec.key, rows).to(self.device, torch.float32) for n, idx in extras.items()
                                 if spec.key in idx}
                        old = {s: p.read(spec.key, rows).to(self.device, torch.float32) for s, p in prev.items()} if prev else None
                        shape = spec.shape if rows is None else (rows[1] - rows[0], *spec.shape[1:])
                        new = method.after(ctx, spec.key, shape, old, extra)
                        for s, w in writers.items():
                            w.write(spec.key, self._checked(spec.key, new[s], torch.float32, slot=s).cpu())
                for w in writers.values():
                    w.close()

    def _check_previous(self, prev_folder: Path) -> None:
        """Every merged tensor's carried slots must be in the previous step, float32, in this plan's shapes
        (dense, or factors ``(rows, r)`` and ``(r, cols)``): a damaged state is refused before any work."""
        for slot in self.plan.slots:
            dense, factored = self.prev[slot], self.prev_lowrank.get(slot)
            for kp in self.plan.keys:
                if not kp.merged:
                    continue
                if factored is not None and kp.key + LEFT in factored:
                    left = factored.info(kp.key + LEFT)
                    right = factored.info(kp.key + RIGHT) if kp.key + RIGHT in factored else None
                    fits = right is not None and len(kp.shape) == 2 and left.shape[:1] == kp.shape[:1] and \
                        right.shape[1:] == kp.shape[1:] and left.shape[1:] == right.shape[:1] and left.dtype == right.dtype == "F32"
                    found = f"factors {left.shape} and {right.shape if right else 'none'}"
                elif kp.key in dense:
                    info = dense.info(kp.key)
                    fits, found = info.shape == kp.shape and info.dtype == "F32", f"{info.dtype} {list(info.shape)}"
                else:
                    fits, found = False, "nothing"
                if not fits:
                    raise ContMergeError(
                        f"--resume: the carried state {slot!r} of {prev_folder} holds {found} for tensor {kp.key!r}, "
                        f"expected float32 {list(kp.shape)}: the step is damaged or was made on another base. Remove "
                        "that step folder and resume from the one before, or start a new --out. Nothing was written."
                    )

    def _run(self, pass_index: int, units: tuple[WorkUnit, ...], handle, bar: tqdm) -> tuple[list, list]:
        """Run this rank's ``units`` of a pass (no collective here: a failure must reach :meth:`World.agree`);
        returns each unit's statistics and the factors for ``_Deferred`` writers, by plan position."""
        final = pass_index == len(self.plan.passes) - 1
        position = {u: i for i, u in enumerate(self.plan.passes[pass_index])}
        recorded: list[tuple[int, list]] = []
        deferred: list[tuple[int, int, str, str, torch.Tensor]] = []

        def tagged(u: WorkUnit, raw: dict[str, Any]) -> list:
            rec = _Recorder()
            out = handle(u, raw, rec)
            recorded.append((position[u], rec.adds))
            direct = []
            for n, (w, name, t) in enumerate(out):
                if isinstance(w, _Deferred):
                    deferred.append((position[u], n, w.prefix, name, t.cpu()))
                else:
                    direct.append((w, name, t))
            return direct

        # a factored tensor's elements count in pass 1, or through its rows
        run_units(units, self._load, tagged, step=self.plan.step, budget=PIPELINE_CHUNKS * self.chunk_bytes,
                  progress=lambda u: bar.update(0 if u.form == "factored" and final else u.numel))
        return recorded, deferred

    def _combine(self, done: tuple[list, list], stats: StepStats, writers: Mapping[str, Any], what: str) -> None:
        """After a pass on every rank: each unit's statistics added to ``stats`` in plan order (on every
        rank: the scalars must agree), the factors written by rank 0 in plan order, the slot writers closed."""
        recorded, deferred = done
        world = self.world
        blocks = [w for w in writers.values() if isinstance(w, BlockWriter)] if world.size > 1 else []
        if not world.main:  # complete before the gather, after which rank 0 reads them
            for w in blocks:
                w.close()
        everyone = world.gather(recorded)
        for _, adds in sorted((r for rank in everyone for r in rank), key=lambda r: r[0]):
            for key, out in adds:
                stats.add(key, out)
        factors = world.gather_to_main(deferred) if any(isinstance(w, _Deferred) for w in writers.values()) else None
        with world.agree(what):
            if factors is not None and world.main:
                by_prefix = {w.prefix: w.real for w in writers.values() if isinstance(w, _Deferred)}
                for _, _, prefix, name, t in sorted((d for rank in factors for d in rank), key=lambda d: d[:2]):
                    by_prefix[prefix].write(name, t)
            if world.main:
                for w in blocks:
                    self._append_rank_parts(w.real)
            for w in writers.values():
                if world.main or w not in blocks:
                    w.close()

    @staticmethod
    def _rank_parts(partial: Path, rank: int, prefix: str) -> Path:
        return partial / f".{prefix}-rank{rank}"

    def _append_rank_parts(self, real: StreamingWriter) -> None:
        """Rank 0, after the final pass: the other ranks' compressed blocks appended to the real file, rank by
        rank. The runs are contiguous in plan order, rank 0's first, so the file is the one a single process
        writes, byte for byte, and memory holds one block at a time."""
        partial = real.folder.parent
        for rank in range(1, self.world.size):
            parts = self._rank_parts(partial, rank, real.prefix)
            with closing(Checkpoint.open(parts, prefix=real.prefix, label=f"rank {rank}'s blocks")) as ck:
                for name in ck.keys():
                    real.write(name, ck.read(name))
            shutil.rmtree(parts)

    # ------------------------------------------------------------------ writers
    def _share(self, keys: set[str]) -> Share | None:
        """This rank's part of a shared planned writer (None with one process)."""
        return Share(self.world.main, frozenset(keys)) if self.world.size > 1 else None

    def _weights_writer(self, partial: Path, units: tuple[WorkUnit, ...]) -> StreamingWriter:
        """The published weights: model shards (full) or the adapter file (``--output-format adapter``)."""
        plan = self.plan
        if plan.adapter is None:
            share = self._share({u.key for u in units if u.form != "factored"})
            return StreamingWriter.planned(partial, plan.weight_specs, plan.weight_shards, WEIGHTS_PREFIX, share=share)
        self.written.adapter = AdapterExport(plan.adapter)
        shapes = {plan.adapter.published_name(kp.key): kp.shape for kp in plan.keys
                  if kp.merged and kp.key in plan.adapter.dense_keys}
        real = StreamingWriter.appended(partial, plan.adapter.names(), 2**62, ADAPTER_WEIGHTS_PREFIX, shapes=shapes) \
            if self.world.main else None
        return real if self.world.size == 1 else _Deferred(ADAPTER_WEIGHTS_PREFIX, real)  # one file, written by rank 0

    def _slot_writers(self, folder: Path, units: tuple[WorkUnit, ...], scratch: bool = False) -> dict[str, Any]:
        """Writers of the carried slots: a planned writer per slot for the dense tensors, and an append
        writer per slot for the factored ones (ranks are known only once computed). The ``after_slots``
        are written by :meth:`write_after`; a first pass's ``scratch`` has them all."""
        plan, main = self.plan, self.world.main
        if main:
            folder.mkdir()
        slots = [s for s in plan.slots if scratch or s not in self.method.after_slots]
        mine = {u.key for u in units if u.form == "dense" and self.kp[u.key].merged}

        def appended(prefix: str, names) -> Any:
            real = StreamingWriter.appended(folder, names, self.shard_bytes, prefix) if main else None
            return real if self.world.size == 1 else _Deferred(prefix, real)

        if scratch:  # the first pass's slots, float32 throughout
            files = {s: (plan.state_specs, plan.state_shards[s]) for s in slots}
        else:  # as the state is carried (compact.py): the weight slot's compact tensors apart
            files = {p: f for p, f in plan.state_files.items() if p.removeprefix(LOW16_PREFIX) in slots}
        writers: dict[str, Any] = {p: StreamingWriter.planned(folder, specs, shards, p,
                                                              share=self._share(mine & {sp.key for sp in specs}))
                                   for p, (specs, shards) in files.items()}
        for prefix, kind in ({} if scratch else plan.block_files()).items():  # compressed (compact.py)
            # a compressed slot's tensors' shapes, which its blocks do not tell
            meta = {SHAPES: json.dumps({sp.key: list(sp.shape) for sp in plan.state_specs})} if kind == "f32" else None
            if main:
                writers[prefix] = BlockWriter(StreamingWriter.appended(folder, plan.blocks(kind), self.shard_bytes, prefix,
                                                                       metadata=meta), kind)
            else:  # this rank's blocks, appended to the real file by rank 0 after the pass (_combine)
                (parts := self._rank_parts(folder.parent, self.world.rank, prefix)).mkdir()
                writers[prefix] = BlockWriter(StreamingWriter.appended(parts, plan.blocks(kind, units), 2**62, prefix), kind)
        low = LOW16_PREFIX + str(plan.weight_slot)
        if not scratch and low in writers:  # the exact ties, per tensor (few)
            writers[TIES_PREFIX + plan.weight_slot] = appended(TIES_PREFIX + plan.weight_slot,
                                                               [k for k, e in plan.compact.items() if e == "low16"])
        if plan.factored:
            for s in plan.slots:
                writers[LOWRANK_PREFIX + s] = appended(LOWRANK_PREFIX + s, plan.factor_names)
        return writers

    # ------------------------------------------------------------------ loading (reader thread)
    def _load(self, u: WorkUnit) -> dict[str, Any]:
        """Everything one unit needs, as stored on disk."""
        kp, rows = self.kp[u.key], u.rows
        slots = self.plan.slots
        if u.form == "factored":  # factors only: the item's task vector and the carried slots, or pass 1's
            if self.first:
                return {"first": {s: _read_lowrank(self.first[LOWRANK_PREFIX + s], kp.key) for s in slots}}
            ikey = kp.item_keys[self.plan.item_index]
            tau = LowRank.zeros(kp.shape) if ikey is None else LowRank(*self.item.checkpoint.low_rank_delta(ikey))
            prev = {s: _read_lowrank(self.prev_lowrank[s], kp.key) for s in slots} if self.prev else None
            return {"tau": tau, "prev": prev, "extra": self._extra(kp.key, None)}
        ikey = kp.item_keys[self.plan.item_index] if kp.merged else None
        skip = self.skip_base and kp.merged and u.form == "dense" and not self.first and ikey is not None
        raw: dict[str, Any] = {} if skip else {"base": self.stream.base.checkpoint.read(kp.key, rows)}
        if not kp.merged or u.form == "rows":
            return raw
        if self.first:
            raw["first"] = {s: self.first[s].read(kp.key, rows) for s in slots}
            return raw
        raw["item"] = None if ikey is None else self.item.checkpoint.read(ikey, rows)
        raw["prev"] = {s: self._read_prev(s, kp.key, rows) for s in slots} if self.prev else None
        raw["extra"] = self._extra(kp.key, rows)
        return raw

    def _read_prev(self, slot: str, key: str, rows: tuple[int, int] | None) -> torch.Tensor:
        """A previous slot's tensor (rows), dense; a factored one is expanded to ``base + L @ R``."""
        lowrank = self.prev_lowrank.get(slot)
        if lowrank is not None and key + LEFT in lowrank:
            base = self.stream.base.checkpoint.read(key, rows).to(torch.float32)
            return base + _read_lowrank(lowrank, key).rows(rows)
        return self.prev[slot].read(key, rows)

    def _extra(self, key: str, rows: tuple[int, int] | None) -> dict[str, torch.Tensor]:
        return {name: index.read(key, rows) for name, index in self.calibration.items() if key in index}

    # ------------------------------------------------------------------ the passes (calling thread)
    def _first_pass(self, ctx: StepContext, stats: StepStats, scratch: dict, u: WorkUnit, raw: dict[str, Any]) -> list:
        """Pass 1 of a two-pass method: first-pass slots to the scratch area, statistics summed."""
        slots = self.plan.slots
        if u.form == "factored":
            new = self._merge_lowrank(ctx, stats, u, raw).slots
            return [(scratch[LOWRANK_PREFIX + s], name, t) for s in slots for name, t in _factor_tensors(u.key, new[s])]
        _, new = self._merge_dense(ctx, stats, u, raw)
        return [(scratch[s], u.key, new[s].float()) for s in slots]

    def _final_pass(self, ctx: StepContext, stats: StepStats, weights: StreamingWriter, state: dict, u: WorkUnit,
                    raw: dict[str, Any]) -> list:
        """The published weights and the carried slots (pass 2 of a two-pass method, else the only pass)."""
        method, plan, key = self.method, self.plan, u.key
        out_dtype = SAFE_DTYPES[plan.out_dtype[key]]
        if u.form == "factored":  # final factors of the key: kept for its rows, written to the state
            if self.first:
                slots = method.finish_lowrank(ctx, {s: f.to(self.device) for s, f in raw["first"].items()})
            else:
                slots = self._merge_lowrank(ctx, stats, u, raw).slots
            for s, f in slots.items():
                self._checked(key, f.left, torch.float32, slot=s)
                self._checked(key, f.right, torch.float32, slot=s)
            self.factors = (key, slots)
            self.written.ranks[key] = max(f.rank for f in slots.values())
            out = [(state[LOWRANK_PREFIX + s], name, t) for s in plan.slots for name, t in _factor_tensors(key, slots[s])]
            export = self.written.adapter
            if export is not None and key in export.plan.lora_keys:
                out += [(weights, name, self._checked(key, t, out_dtype))
                        for name, t in export.lora_tensors(key, method.weight_lowrank(ctx, slots), torch.float32)]
            return out
        name = plan.published_name(key)
        kp = self.kp[key]
        if not kp.merged:  # copied from the base (integer buffers), in the output dtype
            return [(weights, name, raw["base"].to(out_dtype))]
        if u.form == "rows":
            base = raw["base"].to(self.device, torch.float32)
            slots = {s: base + f.rows(u.rows) for s, f in self.factors[1].items()}
            return [(weights, name, self._checked(key, method.weight(ctx, base, slots), out_dtype))]
        if self.first:
            base = raw["base"].to(self.device, torch.float32)
            slots = method.finish(ctx, base, {s: t.to(self.device, torch.float32) for s, t in raw["first"].items()})
        else:
            base, slots = self._merge_dense(ctx, stats, u, raw)  # converts the base once, itself
        compact = plan.compact.get(key)
        span = unit_span(self.kp[key].shape, u.rows)  # this slice's flat elements: its blocks (BlockWriter compresses)
        out = [(state[s], block_name(key, *span, "f32") if s in plan.compressed_slots else key,
                self._checked(key, slots[s], torch.float32, slot=s)) for s in plan.slots
               if s in state and not (compact and s == plan.weight_slot)]
        merged = method.weight(ctx, base, slots)
        if compact is not None:  # the weight slot, carried beside the weight it rounds to (compact.py)
            value = slots[plan.weight_slot].to(torch.float32)
            if merged is not value and not torch.equal(merged, value):  # the method's promise (carried_weight_slot)
                raise RuntimeError(f"internal: the published {key!r} is not the carried slot {plan.weight_slot!r}")
            weight, carried = self._compact(key, span, value, out_dtype, state)
            out += carried
        else:
            weight = self._checked(key, merged, out_dtype)
        if name is None:  # an adapter leaves this tensor at the base: it must be the base, bit for bit
            if not torch.equal(weight, base.to(out_dtype)):
                raise ContMergeError(f"internal: {key!r} changed although no adapter touched it; use --output-format full "
                                     "and report this.")
            return out
        return [*out, (weights, name, weight)]

    def _compact(self, key: str, span: tuple[int, int], value: torch.Tensor, out_dtype: torch.dtype,
                 state: dict) -> tuple[torch.Tensor, list]:
        """The published weight (``value``, the weight slot, rounded to ``out_dtype`` and checked finite) and
        what carries ``value`` beside it (one unit, flat elements ``span``: :func:`unit_span`): nothing for a
        float32 weight, its int16 low bits for a bfloat16 one, and at the tensor's last slice its ties
        (``TieCollector``)."""
        plan, slot = self.plan, self.plan.weight_slot
        if plan.compact[key] == "weight":  # the published float32 tensor is the slot itself
            return self._checked(key, value, out_dtype), []
        start, stop = span
        encoded = encode_bf16(value)  # rounding, finite check, low bits and ties in one pass
        if encoded is None:
            self._checked(key, value, out_dtype)  # raises: says whether it is NaN/Inf or the dtype's range
            raise RuntimeError(f"internal: {key!r} has a value that is not finite, yet it passed the check")
        weight, low, bits, count = encoded
        collector = self._ties.setdefault(key, TieCollector(math.prod(self.kp[key].shape)))
        collector.add_packed(bits, count, start)
        out = [(state[LOW16_PREFIX + slot], block_name(key, start, stop) if plan.compressed else key,
                low.view(value.shape))]  # BlockWriter compresses
        if stop == collector.numel:  # the tensor is complete: its ties, if any, in one tensor
            del self._ties[key]
            if collector.count:
                out.append((state[TIES_PREFIX + slot], key, collector.stored()))
        return weight, out

    def _checked(self, key: str, value: torch.Tensor, dtype: torch.dtype, slot: str | None = None) -> torch.Tensor:
        """``value`` in ``dtype``, refused when a value is not finite (unless --allow-nonfinite): the inputs
        were checked, so it is an overflow of the method's arithmetic, or of the output dtype's range."""
        out = value.to(dtype)
        if self.allow_nonfinite or finite(out):
            return out
        what = f"the carried state {slot!r}" if slot else "the merged weight"
        if finite(value):
            why = (f"its values exceed the range of {str(dtype).removeprefix('torch.')} (largest "
                   f"{torch.finfo(dtype).max:g}); write a wider dtype (--dtype bfloat16 or float32)")
        else:
            why = ("the method's arithmetic overflowed float32 (inputs or parameters too large, e.g. --set scaling); "
                   "check the parameters and the items' scale")
        raise ContMergeError(f"step {self.plan.step}: {what} of tensor {key!r} has NaN or Inf values: {why}. "
                             f"Step {self.plan.step} was not written (--allow-nonfinite writes it anyway).")

    def _merge_lowrank(self, ctx: StepContext, stats: StepStats, u: WorkUnit, raw: dict[str, Any]) -> TensorOutput:
        prev = {s: f.to(self.device) for s, f in raw["prev"].items()} if raw["prev"] else None
        info = self.plan.info[u.key]
        inputs = LowRankInputs(u.key, info.shape, raw["tau"].to(self.device), prev, info.linear, _on(raw["extra"], self.device))
        out = self.method.merge_lowrank(ctx, inputs)
        stats.add(u.key, out)
        return out

    def _merge_dense(self, ctx: StepContext, stats: StepStats, u: WorkUnit, raw: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        """The base chunk (float32, on device) and the method's new slots for it; statistics summed."""
        kp = self.kp[u.key]

        def f32(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, torch.float32)

        def stored_finite(stored: torch.Tensor, converted: torch.Tensor) -> bool:
            # the stored bfloat16 is half the bytes to sum; a float16 sum overflows at 65504: its float32 copy
            return self.allow_nonfinite or finite(converted if stored.dtype == torch.float16 else stored)

        # pop: the stored-dtype buffers go as soon as their float32 copies exist (whole 32000 x 4096 lm_head)
        raw_base = raw.pop("base", None)  # None: a method that does not read it (needs_base)
        base = None if raw_base is None else f32(raw_base)
        if base is not None and not stored_finite(raw_base, base):
            raise ContMergeError(
                f"the base {self.stream.base.spec.text!r} has NaN or Inf values in tensor {u.key!r}, which would reach every "
                f"step. Step {self.plan.step} was not written. Use a base without them, or pass --allow-nonfinite."
            )
        del raw_base
        raw_item = raw.pop("item")
        if raw_item is None:  # the item lacks this whole module: its task vector is zero here
            item = base.clone()  # a buffer of its own: kernels may overwrite ``item``
        else:
            item = f32(raw_item)
            if not stored_finite(raw_item, item):
                raise ContMergeError(
                    f"stream item {self.item.spec.text!r} has NaN or Inf values in tensor "
                    f"{kp.item_keys[self.plan.item_index]!r}. Step {self.plan.step} was not written. Fix or drop the item, "
                    "or pass --allow-nonfinite to merge it anyway."
                )
        del raw_item
        raw_prev = raw.pop("prev")
        prev = {s: f32(t) for s, t in raw_prev.items()} if raw_prev else None
        del raw_prev
        info = self.plan.info[u.key]
        out = self.method.merge(ctx, TensorInputs(u.key, kp.shape, u.rows, base, item, prev, info.linear,
                                                  _on(raw.pop("extra"), self.device)))
        stats.add(u.key, out)
        return base, out.slots


def _on(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: t.to(device, torch.float32) for k, t in tensors.items()}
