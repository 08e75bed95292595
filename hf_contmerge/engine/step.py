"""Executing a step's plan: the passes over its work units, the kernels, the statistics, the writers.

For every unit the reader thread loads, as stored: the base tensor (or rows), the new item's, the
method's carried slots from the previous step (dense, or factors ``base + L @ R`` expanded by rows),
or the first pass's slots, and per-tensor calibration statistics; the calling thread converts to
float32 on the device, calls the method's kernel with a :class:`~hf_contmerge.methods.base.StepContext`,
adds its statistics in plan order, and queues what to write: the published weight (output dtype)
and the new slots (float32). Two-pass methods write their first pass to a scratch area of the
partial folder, then ``end_pass`` gives the new scalars, then the second pass finishes every tensor.
"""

from __future__ import annotations

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
from ..artifacts.folder import open_lowrank, open_slot
from ..artifacts.layout import ADAPTER_WEIGHTS_PREFIX, LEFT, LOWRANK_PREFIX, PASS1_DIR, RIGHT, STATE_DIR, WEIGHTS_PREFIX
from ..artifacts.state import StepState
from ..errors import ContMergeError
from ..io.checkpoint import Checkpoint, TensorIndex
from ..io.safetensors import SAFE_DTYPES, iter_row_chunks
from ..io.writer import StreamingWriter
from ..methods.base import LowRankInputs, Method, StepContext, StepStats, TensorInputs, TensorOutput
from ..methods.lowrank import LowRank
from ..sources.preflight import StreamPlan
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


class StepWriter:
    """Writes the tensors of one planned step into a partial step folder (``write``)."""

    def __init__(self, plan: StepPlan, stream: StreamPlan, method: Method, *, device: torch.device, chunk_bytes: int,
                 shard_bytes: int, allow_nonfinite: bool, quiet: bool,
                 calibration: Mapping[str, TensorIndex] | None = None, calibration_scalars: Mapping[str, float] | None = None):
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
        self.written = TensorsWritten({})

    # ------------------------------------------------------------------ the step
    def write(self, partial: Path, prev_folder: Path | None, scalars: dict[str, Any]) -> TensorsWritten:
        plan, method = self.plan, self.method
        ctx = StepContext(plan.step, scalars, self.device, self.calibration_scalars)
        with ExitStack() as stack:
            if prev_folder is not None:
                for slot in method.slots:
                    self.prev[slot] = stack.enter_context(closing(open_slot(prev_folder, slot)))
                    if (factored := open_lowrank(prev_folder, slot)) is not None:
                        self.prev_lowrank[slot] = stack.enter_context(closing(factored))
                self._check_previous(prev_folder)
            weights = self._weights_writer(partial)
            state = self._slot_writers(partial / STATE_DIR)
            total = sum(math.prod(kp.shape) if kp.shape else 1 for kp in plan.keys)
            bar = tqdm(total=total * len(plan.passes), unit="el", unit_scale=True, desc=f"step {plan.step}",
                       disable=self.quiet, leave=False)
            with bar:
                stats = StepStats()
                if plan.two_pass:
                    scratch = self._slot_writers(partial / PASS1_DIR, scratch=True)
                    self._run(plan.passes[0], lambda u, raw: self._first_pass(ctx, stats, scratch, u, raw), bar, pass_index=0)
                    for w in scratch.values():
                        w.close()
                    ctx = replace(ctx, scalars=method.end_pass(ctx, stats))
                    for prefix in plan.slot_files:
                        self.first[prefix] = stack.enter_context(closing(Checkpoint.open(partial / PASS1_DIR, prefix=prefix)))
                self._run(plan.passes[-1], lambda u, raw: self._final_pass(ctx, stats, weights, state, u, raw), bar,
                          pass_index=len(plan.passes) - 1)
            if plan.two_pass:
                for ck in self.first.values():
                    ck.close()
                shutil.rmtree(partial / PASS1_DIR)
            else:
                ctx = replace(ctx, scalars=method.end_pass(ctx, stats))
            weights.close()
            for w in state.values():
                w.close()
        self.written.scalars = dict(ctx.scalars)
        return self.written

    def write_after(self, partial: Path, prev_folder: Path | None, extras: Mapping[str, TensorIndex],
                    scalars: dict[str, Any]) -> None:
        """The ``after_slots`` of every merged tensor, once the merged model's statistics (``extras``) are
        known: dim-0 slices of at most ``chunk_bytes`` (float32), in the planned order of the state."""
        plan, method = self.plan, self.method
        ctx = StepContext(plan.step, scalars, self.device, self.calibration_scalars)
        with ExitStack() as stack:
            prev = {s: stack.enter_context(closing(open_slot(prev_folder, s))) for s in method.after_slots} if prev_folder else {}
            writers = {s: StreamingWriter.planned(partial / STATE_DIR, plan.state_specs, plan.state_shards[s], s)
                       for s in method.after_slots}
            for spec in plan.state_specs:
                for rows in iter_row_chunks(spec.shape, 4, self.chunk_bytes):
                    extra = {n: idx.read(spec.key, rows).to(self.device, torch.float32) for n, idx in extras.items() if spec.key in idx}
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

    def _run(self, units: tuple[WorkUnit, ...], handle, bar: tqdm, pass_index: int) -> None:
        final = pass_index == len(self.plan.passes) - 1
        # a factored tensor's elements count in pass 1, or through its rows
        run_units(units, self._load, handle, step=self.plan.step, budget=PIPELINE_CHUNKS * self.chunk_bytes,
                  progress=lambda u: bar.update(0 if u.form == "factored" and final else u.numel))

    # ------------------------------------------------------------------ writers
    def _weights_writer(self, partial: Path) -> StreamingWriter:
        """The published weights: model shards (full) or the adapter file (``--output-format adapter``)."""
        plan = self.plan
        if plan.adapter is None:
            return StreamingWriter.planned(partial, plan.weight_specs, plan.weight_shards, WEIGHTS_PREFIX)
        self.written.adapter = AdapterExport(plan.adapter)
        shapes = {plan.adapter.published_name(kp.key): kp.shape for kp in plan.keys
                  if kp.merged and kp.key in plan.adapter.dense_keys}
        return StreamingWriter.appended(partial, plan.adapter.names(), 2**62, ADAPTER_WEIGHTS_PREFIX, shapes=shapes)

    def _slot_writers(self, folder: Path, scratch: bool = False) -> dict[str, StreamingWriter]:
        """Writers of the carried slots: a planned writer per slot for the dense tensors, and an append
        writer per slot for the factored ones (ranks are known only once computed). The ``after_slots``
        are written by :meth:`write_after`; a first pass's ``scratch`` has them all."""
        folder.mkdir()
        plan = self.plan
        slots = [s for s in plan.slots if scratch or s not in self.method.after_slots]
        writers = {s: StreamingWriter.planned(folder, plan.state_specs, plan.state_shards[s], s) for s in slots}
        if plan.factored:
            for s in plan.slots:
                writers[LOWRANK_PREFIX + s] = StreamingWriter.appended(folder, plan.factor_names, self.shard_bytes, LOWRANK_PREFIX + s)
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
        raw: dict[str, Any] = {"base": self.stream.base.checkpoint.read(kp.key, rows)}
        if not kp.merged or u.form == "rows":
            return raw
        if self.first:
            raw["first"] = {s: self.first[s].read(kp.key, rows) for s in slots}
            return raw
        ikey = kp.item_keys[self.plan.item_index]
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
        out = [(state[s], key, self._checked(key, slots[s], torch.float32, slot=s)) for s in plan.slots if s in state]
        weight = self._checked(key, method.weight(ctx, base, slots), out_dtype)
        if name is None:  # an adapter leaves this tensor at the base: it must be the base, bit for bit
            if not torch.equal(weight, base.to(out_dtype)):
                raise ContMergeError(f"internal: {key!r} changed although no adapter touched it; use --output-format full "
                                     "and report this.")
            return out
        return [*out, (weights, name, weight)]

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

        # pop: the stored-dtype buffers go as soon as their float32 copies exist (whole 32000 x 4096 lm_head)
        base = f32(raw.pop("base"))
        if not self.allow_nonfinite and not finite(base):
            raise ContMergeError(
                f"the base {self.stream.base.spec.text!r} has NaN or Inf values in tensor {u.key!r}, which would reach every "
                f"step. Step {self.plan.step} was not written. Use a base without them, or pass --allow-nonfinite."
            )
        raw_item = raw.pop("item")
        if raw_item is None:  # the item lacks this whole module: its task vector is zero here
            item = base.clone()  # a buffer of its own: kernels may overwrite ``item``
        else:
            item = f32(raw_item)
            del raw_item
            if not self.allow_nonfinite and not finite(item):
                raise ContMergeError(
                    f"stream item {self.item.spec.text!r} has NaN or Inf values in tensor "
                    f"{kp.item_keys[self.plan.item_index]!r}. Step {self.plan.step} was not written. Fix or drop the item, "
                    "or pass --allow-nonfinite to merge it anyway."
                )
        raw_prev = raw.pop("prev")
        prev = {s: f32(t) for s, t in raw_prev.items()} if raw_prev else None
        del raw_prev
        info = self.plan.info[u.key]
        out = self.method.merge(ctx, TensorInputs(u.key, kp.shape, u.rows, base, item, prev, info.linear,
                                                  _on(raw.pop("extra"), self.device)))
        stats.add(u.key, out)
        return base, out.slots


def finite(t: torch.Tensor) -> bool:
    """Whether every value of a float tensor is finite: one reduction (a NaN/Inf makes the sum non-finite),
    and the exact check only when the sum says otherwise (finite values may overflow a low-precision sum)."""
    return not t.is_floating_point() or math.isfinite(t.sum()) or bool(torch.isfinite(t).all())


def _on(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: t.to(device, torch.float32) for k, t in tensors.items()}
