"""The continual loop: one step per stream item, one tensor (or slice) at a time inside a step.

For step t the engine reads, per output tensor in the base's file order: the base tensor, the new
item's tensor and the method's carried slots from step t−1; calls the method's kernel in float32
on the chosen device; and appends the merged weight (output dtype) and the new slots (float32) to
streaming shard writers. Elementwise kernels get dim-0 slices of large tensors, so peak memory is a
few slices, whatever the model size or stream length. Two-pass methods (a global scalar over all
tensors, like OPCM's λ) get a first pass whose slots go to a scratch area, then a second pass.

The step is built in a partial folder and renamed into place when complete (``outdir.py``); the
carried state goes with it (``state.py``), so ``--resume`` continues bit-identically. The engine
knows nothing about any particular method.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import outdir
from .adapter_out import WEIGHTS_NAME as ADAPTER_WEIGHTS
from .adapter_out import AdapterExport
from .card import render_card
from .errors import ContMergeError
from .heads import copy_heads, write_head
from .lowrank import LEFT, RIGHT, LowRank, worth_factoring
from .methods import Method, TensorContext, build_method
from .options import MergeOptions
from .preflight import KeyPlan, StreamPlan, plan_stream
from .push import PushTarget, check_target, commit_message, push_missing, push_step
from .safetensors_io import SAFE_DTYPES, AppendWriter, ShardedWriter, TensorSpec, iter_row_chunks
from .sources import Checkpoint, ResolvedSource, resolve
from .state import LOWRANK_PREFIX, STATE_DIR, STATE_FILE, StepState, open_lowrank, open_slot, read_state, record_evaluation

OUT_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# Reads run ahead, and writes queue behind, by at most this many chunks' worth of bytes (at least
# one item each way): a whole 11008 x 4096 matrix (unsliced kernels) then waits alone, not two deep.
PIPELINE_CHUNKS = 2
# Files of the base folder that are not copied into a step (weights, our own files, its card).
SKIP_SIDE = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "adapter_config.json", "README.md", STATE_FILE}

MODEL_CONFIGS = {"config.json", "generation_config.json"}  # side files an adapter step must not carry


def failpoint(name: str) -> None:
    """Crash tests' hook: ``HF_CONTMERGE_FAILPOINT=<name>`` kills this process (SIGKILL) right here.

    Points: ``step-T:tensor-N`` (after the N-th output tensor of step T is written) and
    ``step-T:publish`` (everything written, just before the rename that makes step T visible).
    """
    if os.environ.get("HF_CONTMERGE_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ContMergeError(f"--device {name} was asked for but no CUDA GPU is available. Use --device cpu or auto.")
    return dev


@dataclass
class StepResult:
    step: int
    folder: Path
    state: StepState


@dataclass
class _StepContext:
    """Everything one step reads from, while it runs."""

    step: int
    plan: StreamPlan
    item_index: int  # index into plan.items / item_plans
    prev_slots: dict[str, Checkpoint] = field(default_factory=dict)
    prev_lowrank: dict[str, Checkpoint] = field(default_factory=dict)  # slot -> its factored tensors, if any
    lowrank: dict[str, int] = field(default_factory=dict)  # keys merged in factored form -> rank bound
    first: dict[str, Checkpoint] = field(default_factory=dict)  # pass-1 slots (two-pass methods, pass 2)
    factors: tuple[str, dict[str, LowRank]] | None = None  # final factors of the key being written
    ranks: dict[str, int] = field(default_factory=dict)  # rank of the factors carried, per factored key
    touched: set[str] = field(default_factory=set)  # tensors some item so far changed
    export: AdapterExport | None = None  # what the adapter holds (--output-format adapter)
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def item(self) -> ResolvedSource:
        return self.plan.items[self.item_index]


@dataclass(frozen=True)
class _Work:
    """One unit of the pipeline: a dense tensor or dim-0 slice (``dense``), a factored tensor's
    merge or finish (``lowrank``), or rows of a factored tensor's published weight (``rows``)."""

    kp: KeyPlan
    rows: tuple[int, int] | None
    kind: str


def _read_lowrank(ck: Checkpoint, key: str) -> LowRank:
    return LowRank(ck.read(key + LEFT).to(torch.float32), ck.read(key + RIGHT).to(torch.float32))


def _slot_files(slots: tuple[str, ...], lowrank: dict[str, int]) -> list[str]:
    """File prefixes of a slot set: the dense files, and the factored ones when any tensor is factored."""
    return [*slots, *(LOWRANK_PREFIX + s for s in slots if lowrank)]


class Engine:
    """Runs a validated :class:`MergeOptions` to completion (``run``), or one step at a time."""

    def __init__(self, options: MergeOptions, log: Callable[[str], None] = print,
                 evaluate: Callable[[StepResult], dict[str, Any]] | None = None):
        """``evaluate``, if given, scores each written step; its result goes into the step's state and
        card (``state.record_evaluation``) before the step is pushed, so the published card has it."""
        self.options = options
        self.evaluate = evaluate
        self.method: Method = build_method(options.method, options.params)
        self.device = resolve_device(options.device)
        self.log = log

    # ------------------------------------------------------------------ whole runs
    def run(self) -> list[StepResult]:
        """Pre-flight the whole stream, then write every missing step. Returns the steps written."""
        opts = self.options
        if not opts.stream:
            raise ContMergeError("No stream items: give at least one fine-tune with --stream (or `stream:` in the recipe).")
        if opts.resume_from and not opts.dry_run:
            from .published import materialise

            materialise(opts.resume_from, opts.out, opts.token_value(), check=self._check_resume)
        done = outdir.complete_steps(opts.out)
        if done and not (opts.resume or opts.resume_from):
            raise ContMergeError(
                f"--out {opts.out} already holds steps {done[0]}..{done[-1]} of an earlier run. Pass --resume to "
                "continue it, or choose another --out. Nothing was written."
            )
        last = done[-1] if done else 0
        previous = read_state(outdir.step_dir(opts.out, last)) if last else None
        if previous is not None:
            self._check_resume(previous)
        token = opts.token_value()
        with ExitStack() as stack:
            base = resolve(opts.base, token=token, allow_pickle=opts.allow_pickle, role="base", lazy=True)
            stack.callback(base.close)
            if previous is not None and previous.base["fingerprint"] != base.fingerprint:
                raise ContMergeError(
                    f"The base {opts.base!r} is not the one step {last} in {opts.out} was made from (its content "
                    "changed). Resume with the same base, or start a new --out."
                )
            items = []
            for text in opts.stream[last:]:
                items.append(resolve(text, token=token, allow_pickle=opts.allow_pickle, role="stream item", base=base, lazy=True))
                stack.callback(items[-1].close)
            plan = plan_stream(base, items)
            self.method.bind(base.config)
            if opts.output_format == "adapter":
                self._check_adapter_output(previous, items)
            target = PushTarget.from_options(opts)
            if target:  # refuse a foreign repo or a bad token before anything is computed
                check_target(target, token, steps=range(last + 1, len(opts.stream) + 1), log=self.log)
            if opts.dry_run:
                self.log(plan.report())
                todo = range(last + 1, len(opts.stream) + 1)
                self.log(f"dry run: would write {', '.join(f'step-{t}' for t in todo) or 'nothing'} in {opts.out}")
                return []
            if target and done:  # steps computed earlier whose push failed: push them, never recompute
                push_missing(opts.out, target, token, done, log=self.log)
            if last >= len(opts.stream):
                self.log(f"{opts.out}: all {last} steps are already complete; nothing to do.")
                return []
            base.ensure_local()  # every step reads it, and its config and tokenizer go into each step
            outdir.claim(opts.out)
            results = []
            for j in range(len(items)):
                result = self.write_step(plan, j, last + 1 + j, previous)
                previous = result.state
                results.append(result)
                self.log(f"wrote {result.folder}")
                if self.evaluate is not None:
                    result.state = record_evaluation(result.folder, self.evaluate(result))
                if target:
                    push_step(result.folder, result.step, target, token, commit_message(result.state), log=self.log)
            return results

    def _check_adapter_output(self, previous: StepState | None, items: list[ResolvedSource]) -> None:
        """``--output-format adapter`` needs a method with a low-rank form and a stream of LoRA adapters only."""
        if not self.method.lowrank:
            raise ContMergeError(
                f"--output-format adapter: method {self.method.name!r} has no low-rank form, so its merged model is "
                "not a LoRA adapter. Use a method that has one (opcm), or --output-format full."
            )
        kinds = [(s["source"], s.get("kind", "full")) for s in (previous.stream if previous else [])]
        kinds += [(item.spec.text, item.kind) for item in items]
        full = [src for src, kind in kinds if kind != "lora"]
        if full:
            raise ContMergeError(
                f"--output-format adapter: stream item {full[0]!r} is a full checkpoint, so the merged model is not "
                "low-rank. Stream only LoRA adapters, or use --output-format full. Nothing was written."
            )
        if previous is not None and not previous.lowrank:
            raise ContMergeError(
                f"--output-format adapter: step {previous.step} in {self.options.out} carries its state dense (made with "
                "--lowrank off or an older hf-contmerge), so later steps cannot be published as an adapter. Continue "
                "it with --output-format full, or start a new --out. Nothing was written."
            )

    def _check_resume(self, previous: StepState) -> None:
        opts = self.options
        k = previous.step
        if previous.lowrank and previous.format_version < 2:
            raise ContMergeError(
                f"--resume: step {k} in {opts.out} carries low-rank factors written by a development version of "
                "hf-contmerge (state format 1), which this version does not read. Recompute the run into a new --out."
            )
        asked = self.method.params.model_dump()
        problems = []
        if previous.method != opts.method:
            problems.append(f"method {previous.method!r} there, {opts.method!r} now")
        elif previous.params != asked:
            problems.append(f"parameters {previous.params} there, {asked} now")
        if previous.options.get("dtype") != opts.dtype:
            problems.append(f"--dtype {previous.options.get('dtype')} there, {opts.dtype} now")
        if previous.base["source"] != opts.base:
            problems.append(f"base {previous.base['source']!r} there, {opts.base!r} now")
        done = [s["source"] for s in previous.stream]
        if done != list(opts.stream[:k]):
            problems.append(f"stream so far {done} there, {list(opts.stream[:k])} now")
        if problems:
            raise ContMergeError(
                f"--resume: {opts.out} step {k} was made with other settings: {'; '.join(problems)}. "
                "Resume with the same base, method, parameters, dtype and stream prefix, or choose another --out."
            )

    # ------------------------------------------------------------------ one step
    def write_step(self, plan: StreamPlan, item_index: int, step: int, previous: StepState | None) -> StepResult:
        """Write ``OUT/step-{step}`` merging ``plan.items[item_index]`` into the previous step."""
        opts = self.options
        prev_folder = outdir.step_dir(opts.out, previous.step) if previous else None
        partial = outdir.new_partial(opts.out, step)
        ctx = _StepContext(step, plan, item_index)
        try:
            with ExitStack() as stack:
                if previous is not None:
                    for slot in self.method.slots:
                        ctx.prev_slots[slot] = open_slot(prev_folder, slot)
                        stack.callback(ctx.prev_slots[slot].close)
                        if (factored := open_lowrank(prev_folder, slot)) is not None:
                            ctx.prev_lowrank[slot] = factored
                            stack.callback(factored.close)
                ctx.lowrank = self._lowrank_plan(ctx)
                ctx.touched = self._touched(ctx, previous)
                scalars = dict(previous.scalars) if previous else self.method.init_scalars()
                scalars = self._write_tensors(ctx, partial, scalars)
            state = self._finish_folder(ctx, partial, prev_folder, previous, scalars)
            final = outdir.step_dir(opts.out, step)
            failpoint(f"step-{step}:publish")
            outdir.publish(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return StepResult(step, final, state)

    def _out_dtype(self, kp: KeyPlan) -> str:
        if kp.dtype in OUT_DTYPE.values() or kp.dtype == "F64":
            return kp.dtype if self.options.dtype == "auto" else OUT_DTYPE[self.options.dtype]
        return kp.dtype  # integer / bool buffers keep their dtype

    def _lowrank_plan(self, ctx: _StepContext) -> dict[str, int]:
        """Tensors merged in factored form this step, each with a bound of its factors' rank.

        A tensor qualifies when the method has a low-rank form for it, the item's task vector on it
        is low-rank (a LoRA target, or untouched: rank 0), every slot of the previous step is
        factored (or this is step 1), and the factors stay smaller than the dense matrix
        (``lowrank.worth_factoring``). Decided before the step from ranks in the headers, so the
        writers can be planned.
        """
        method, idx = self.method, ctx.item_index
        if self.options.lowrank == "off" or not method.lowrank:
            return {}
        item = ctx.item.checkpoint
        plan: dict[str, int] = {}
        for kp in ctx.plan.merged_keys:
            if len(kp.shape) != 2 or not method.lowrank_key(kp.key):
                continue
            ikey = kp.item_keys[idx]
            rank = 0 if ikey is None else item.low_rank(ikey)
            if rank is None:
                continue
            if ctx.prev_slots:
                prev = [ctx.prev_lowrank.get(s) for s in method.slots]
                if any(ck is None or kp.key + LEFT not in ck for ck in prev):
                    continue
                rank += max(ck.info(kp.key + LEFT).shape[1] for ck in prev)
            if worth_factoring(kp.shape, rank):
                plan[kp.key] = rank
        return plan

    def _touched(self, ctx: _StepContext, previous: StepState | None) -> set[str]:
        """Merged tensors some item so far changed: a full checkpoint changes all, a LoRA adapter its targets."""
        item, idx = ctx.item.checkpoint, ctx.item_index
        touched = set(previous.touched) if previous else set()
        for kp in ctx.plan.merged_keys:
            ikey = kp.item_keys[idx]
            if ikey is not None and item.low_rank(ikey) != 0:
                touched.add(kp.key)
        return touched

    def _weights_writer(self, ctx: _StepContext, partial: Path) -> ShardedWriter | AppendWriter:
        """The published weights: model shards (full) or the adapter file (``--output-format adapter``)."""
        plan, opts = ctx.plan, self.options
        if opts.output_format == "full":
            return ShardedWriter(partial, [TensorSpec(kp.key, kp.shape, self._out_dtype(kp)) for kp in plan.keys], opts.shard_bytes)
        from .naming import config_from_dict, file_layout  # transformers' model classes: only for adapters

        layout = file_layout(config_from_dict(plan.base.config))
        ctx.export = AdapterExport.plan(layout, set(ctx.lowrank), ctx.touched, opts.max_rank)
        shapes = {ctx.export.dense_name(kp.key): kp.shape for kp in plan.merged_keys if kp.key in ctx.export.dense_keys}
        return AppendWriter(partial, ctx.export.names(), 2**62, prefix=ADAPTER_WEIGHTS, shapes=shapes)

    def _weight_name(self, ctx: _StepContext, key: str) -> str | None:
        """Name of ``key``'s published weight, or None when an adapter leaves it at the base."""
        if ctx.export is None:
            return key
        return ctx.export.dense_name(key) if key in ctx.export.dense_keys else None

    def _write_tensors(self, ctx: _StepContext, partial: Path, scalars: dict[str, Any]) -> dict[str, Any]:
        plan, method, opts = ctx.plan, self.method, self.options
        method.start_step(ctx.step, scalars)
        weights = self._weights_writer(ctx, partial)
        state = self._slot_writers(ctx, partial / STATE_DIR)
        total = sum(_numel(kp.shape, None) for kp in plan.keys)
        bar = tqdm(total=total * (2 if method.two_pass else 1), unit="el", unit_scale=True, desc=f"step {ctx.step}",
                   disable=opts.quiet, leave=False)
        with bar:
            if method.two_pass:
                scratch = self._slot_writers(ctx, partial / "_pass1")
                work = [_Work(kp, rows, "lowrank" if kp.key in ctx.lowrank else "dense")
                        for kp in plan.merged_keys for rows in self._chunks(ctx, kp)]
                self._pipeline(ctx, work, lambda w, raw: self._first_pass(ctx, scratch, w, raw), bar)
                for w in scratch.values():
                    w.close()
                scalars = method.end_pass(ctx.step, scalars, ctx.stats)
                ctx.first = {s: Checkpoint.open(partial / "_pass1", prefix=s) for s in _slot_files(method.slots, ctx.lowrank)}
            work = []
            for kp in plan.keys:
                if kp.key in ctx.lowrank:
                    work.append(_Work(kp, None, "lowrank"))
                    if self._weight_name(ctx, kp.key) is not None:  # an adapter publishes factors, no rows
                        work += [_Work(kp, rows, "rows") for rows in iter_row_chunks(kp.shape, 4, int(opts.chunk_mb * 2**20))]
                elif kp.merged or ctx.export is None:
                    work += [_Work(kp, rows, "dense") for rows in self._chunks(ctx, kp)]
            self._pipeline(ctx, work, lambda w, raw: self._final_pass(ctx, weights, state, w, raw, scalars), bar)
            for ck in ctx.first.values():
                ck.close()
            if method.two_pass:
                shutil.rmtree(partial / "_pass1")
            else:
                scalars = method.end_pass(ctx.step, scalars, ctx.stats)
        weights.close()
        for w in state.values():
            w.close()
        return scalars

    def _slot_writers(self, ctx: _StepContext, folder: Path) -> dict[str, ShardedWriter | AppendWriter]:
        """Writers of the carried slots: one planned writer per slot for the dense tensors, and an
        append writer per slot for the factored ones (ranks are known only once computed)."""
        folder.mkdir()
        specs = [TensorSpec(kp.key, kp.shape, "F32") for kp in ctx.plan.merged_keys if kp.key not in ctx.lowrank]
        writers: dict[str, ShardedWriter | AppendWriter] = {
            s: ShardedWriter(folder, specs, self.options.shard_bytes, prefix=s) for s in self.method.slots
        }
        if ctx.lowrank:
            names = [n for key in ctx.lowrank for n in (key + LEFT, key + RIGHT)]
            for s in self.method.slots:
                writers[LOWRANK_PREFIX + s] = AppendWriter(folder, names, self.options.shard_bytes, prefix=LOWRANK_PREFIX + s)
        return writers

    def _chunks(self, ctx: _StepContext, kp: KeyPlan) -> Iterator[tuple[int, int] | None]:
        if kp.key in ctx.lowrank or (kp.merged and not self.method.can_slice(kp.key)):
            return iter([None])
        return iter_row_chunks(kp.shape, 4, int(self.options.chunk_mb * 2**20))

    # ------------------------------------------------------------------ the pipeline and its kernels
    def _pipeline(self, ctx: _StepContext, work: list[_Work], handle: Callable[[_Work, dict[str, Any]], list], bar: tqdm) -> None:
        """Run ``handle`` on every ``work`` item in order: reads run ahead in a reader thread and
        writes drain in a writer thread, so the disk works while this thread computes.

        Reads and writes each keep the planned order (one thread each), and every kernel and every
        statistic runs here, in order, so the bytes are the same as a sequential run. Both threads
        spend their time in ``preadv``/``write`` (which release the GIL). ``handle`` returns the
        ``(writer, name, tensor)`` triples to append.
        """
        budget = PIPELINE_CHUNKS * int(self.options.chunk_mb * 2**20)
        with ThreadPoolExecutor(1, thread_name_prefix="contmerge-read") as reader, \
                ThreadPoolExecutor(1, thread_name_prefix="contmerge-write") as writer:
            loads: deque = deque()
            writes: deque = deque()
            next_load, read_ahead, written_behind = 0, 0, 0

            def fill() -> None:
                nonlocal next_load, read_ahead
                while next_load < len(work) and (not loads or read_ahead < budget):
                    w = work[next_load]
                    size = 0 if w.kind == "lowrank" else 4 * _numel(w.kp.shape, w.rows)  # float32-equivalent bytes
                    loads.append((w, size, reader.submit(self._load, ctx, w)))
                    read_ahead += size
                    next_load += 1

            n_key = 0
            last_key = None
            fill()
            while loads:
                w, size, future = loads.popleft()
                read_ahead -= size
                if w.kp.key != last_key:
                    n_key, last_key = n_key + 1, w.kp.key
                    failpoint(f"step-{ctx.step}:tensor-{n_key}")
                fill()  # the reader moves on while this chunk is computed
                out = [(wr, key, t.cpu()) for wr, key, t in handle(w, future.result())]
                nbytes = sum(t.numel() * t.element_size() for _, _, t in out)
                writes.append((nbytes, writer.submit(_store, out)))
                written_behind += nbytes
                del out  # this chunk's buffers go once written, not when the next chunk replaces them
                while len(writes) > 1 and written_behind > budget:
                    done_bytes, done = writes.popleft()
                    done.result()
                    written_behind -= done_bytes
                bar.update(0 if w.kind == "lowrank" and (ctx.first or not self.method.two_pass) else _numel(w.kp.shape, w.rows))
            for _, future in writes:
                future.result()

    def _load(self, ctx: _StepContext, w: _Work) -> dict[str, Any]:
        """Everything one work item needs, as stored on disk (reader thread)."""
        kp, rows = w.kp, w.rows
        if w.kind == "lowrank":  # factors only: the item's task vector and the carried slots, or pass 1's
            if ctx.first:
                return {"first": {s: _read_lowrank(ctx.first[LOWRANK_PREFIX + s], kp.key) for s in self.method.slots}}
            ikey = kp.item_keys[ctx.item_index]
            tau = LowRank.zeros(kp.shape) if ikey is None else LowRank(*ctx.item.checkpoint.low_rank_delta(ikey))
            prev = {s: _read_lowrank(ctx.prev_lowrank[s], kp.key) for s in self.method.slots} if ctx.prev_slots else None
            return {"tau": tau, "prev": prev}
        raw: dict[str, Any] = {"base": ctx.plan.base.checkpoint.read(kp.key, rows)}
        if not kp.merged or w.kind == "rows":
            return raw
        if ctx.first:
            raw["first"] = {s: ctx.first[s].read(kp.key, rows) for s in self.method.slots}
            return raw
        ikey = kp.item_keys[ctx.item_index]
        raw["item"] = None if ikey is None else ctx.item.checkpoint.read(ikey, rows)
        raw["prev"] = None
        if ctx.prev_slots:
            raw["prev"] = {s: self._read_prev(ctx, s, kp.key, rows) for s in self.method.slots}
        return raw

    def _read_prev(self, ctx: _StepContext, slot: str, key: str, rows: tuple[int, int] | None) -> torch.Tensor:
        """A previous slot's tensor (rows), dense; a factored one is expanded to ``base + L @ R``."""
        lowrank = ctx.prev_lowrank.get(slot)
        if lowrank is not None and key + LEFT in lowrank:
            base = ctx.plan.base.checkpoint.read(key, rows).to(torch.float32)
            return base + _read_lowrank(lowrank, key).rows(rows)
        return ctx.prev_slots[slot].read(key, rows)

    def _first_pass(self, ctx: _StepContext, scratch: dict, w: _Work, raw: dict[str, Any]) -> list:
        """Pass 1 of a two-pass method: first-pass slots to the scratch area, statistics summed."""
        if w.kind == "lowrank":
            _, _, new = self._merge_lowrank(ctx, w, raw)
            return [(scratch[LOWRANK_PREFIX + s], name, t) for s in self.method.slots for name, t in new[s].state_tensors(w.kp.key)]
        _, new = self._merge_dense(ctx, w, raw)
        return [(scratch[s], w.kp.key, new[s].float()) for s in self.method.slots]

    def _final_pass(self, ctx: _StepContext, weights: ShardedWriter, state: dict, w: _Work, raw: dict[str, Any],
                    scalars: dict[str, Any]) -> list:
        """The published weights and the carried slots (pass 2 of a two-pass method, else the only pass)."""
        method, kp = self.method, w.kp
        out_dtype = SAFE_DTYPES[self._out_dtype(kp)]
        if w.kind == "lowrank":  # final factors of the key: kept for its rows, written to the state
            if ctx.first:
                slots = method.finish_lowrank(ctx.step, {s: f.to(self.device) for s, f in raw["first"].items()}, scalars)
            else:
                _, _, slots = self._merge_lowrank(ctx, w, raw)
            ctx.factors = (kp.key, slots)
            ctx.ranks[kp.key] = max(f.rank for f in slots.values())
            out = [(state[LOWRANK_PREFIX + s], name, t) for s in method.slots for name, t in slots[s].state_tensors(kp.key)]
            if ctx.export is not None and kp.key in ctx.export.lora_keys:
                out += [(weights, name, t) for name, t in ctx.export.lora_tensors(kp.key, method.weight_lowrank(slots), out_dtype)]
            return out
        name = self._weight_name(ctx, kp.key)
        if not kp.merged:  # copied from the base (integer buffers), in the output dtype
            return [(weights, name, raw["base"].to(out_dtype))]
        base = raw["base"].to(self.device, torch.float32)
        if w.kind == "rows":
            key, factors = ctx.factors
            slots = {s: base + f.rows(w.rows) for s, f in factors.items()}
            return [(weights, name, method.weight(base, slots).to(out_dtype))]
        if ctx.first:
            slots = method.finish(ctx.step, base, {s: t.to(self.device, torch.float32) for s, t in raw["first"].items()}, scalars)
        else:
            base, slots = self._merge_dense(ctx, w, raw)
        out = [(state[s], kp.key, slots[s].float()) for s in method.slots]
        weight = method.weight(base, slots).to(out_dtype)
        if name is None:  # an adapter leaves this tensor at the base: it must be the base, bit for bit
            if not torch.equal(weight, base.to(out_dtype)):
                raise ContMergeError(f"internal: {kp.key!r} changed although no adapter touched it; use --output-format full "
                                     "and report this.")
            return out
        return [*out, (weights, name, weight)]

    def _merge_lowrank(self, ctx: _StepContext, w: _Work, raw: dict[str, Any]) -> tuple[LowRank, dict | None, dict[str, LowRank]]:
        tau = raw["tau"].to(self.device)
        prev = {s: f.to(self.device) for s, f in raw["prev"].items()} if raw["prev"] else None
        ctx_t = TensorContext(w.kp.key, w.kp.shape, None)
        new = self.method.merge_lowrank(ctx.step, tau, prev, ctx_t)
        for name, value in self.method.stats_lowrank(ctx.step, tau, prev, new).items():
            ctx.stats[name] = ctx.stats.get(name, 0.0) + float(value)
        return tau, prev, new

    def _merge_dense(self, ctx: _StepContext, w: _Work, raw: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The base chunk (float32, on device) and the method's new slots for it; statistics summed."""
        kp, rows = w.kp, w.rows
        f32 = lambda t: t.to(self.device, torch.float32)  # noqa: E731
        # pop: the stored-dtype buffers go as soon as their float32 copies exist (whole 32000 x 4096 lm_head)
        base = f32(raw.pop("base"))
        raw_item = raw.pop("item")
        if raw_item is None:  # the item lacks this whole module: its task vector is zero here
            item = base.clone()  # a buffer of its own: kernels may overwrite ``item``
        else:
            item = f32(raw_item)
            del raw_item
            # a NaN/Inf anywhere makes the sum non-finite: one reduction, then the exact check to confirm
            if not self.options.allow_nonfinite and not math.isfinite(item.sum()) and not bool(torch.isfinite(item).all()):
                raise ContMergeError(
                    f"stream item {ctx.item.spec.text!r} has NaN or Inf values in tensor {kp.item_keys[ctx.item_index]!r}. "
                    f"Step {ctx.step} was not written. Fix or drop the item, or pass --allow-nonfinite to merge it anyway."
                )
        raw_prev = raw.pop("prev")
        prev = {s: f32(t) for s, t in raw_prev.items()} if raw_prev else None
        del raw_prev
        new = self.method.merge(ctx.step, base, item, prev, TensorContext(kp.key, kp.shape, rows))
        for name, value in self.method.stats(ctx.step, base, item, prev, new).items():
            ctx.stats[name] = ctx.stats.get(name, 0.0) + float(value)
        return base, new

    # ------------------------------------------------------------------ side files, heads, state, card
    def _finish_folder(self, ctx: _StepContext, partial: Path, prev_folder: Path | None, previous: StepState | None, scalars: dict[str, Any]) -> StepState:
        plan, item = ctx.plan, ctx.item
        self._copy_side_files(plan.base.folder, partial, adapter=ctx.export is not None)
        copy_heads(prev_folder, partial)
        item_plan = plan.item_plans[ctx.item_index]
        heads = list(previous.heads) if previous else []
        if item_plan.heads:
            heads.append(write_head(partial, ctx.step, item, item_plan.heads))
        entry = {
            **item.identity(),
            "step": ctx.step,
            "alignment": item_plan.alignment.describe(),
            "heads": item_plan.heads,
            "kept_modules": item_plan.kept_modules,
            "method": self.method.step_summary(scalars),
        }
        state = StepState(
            step=ctx.step,
            method=self.method.name,
            params=self.method.params.model_dump(),
            options=self.options.recorded(),
            base=plan.base.identity(),
            stream=[*(previous.stream if previous else []), entry],
            scalars=scalars,
            slots=list(self.method.slots),
            heads=heads,
            lowrank=dict(ctx.ranks),
            touched=sorted(ctx.touched),
            output=ctx.export.summary() if ctx.export else {"format": "full"},
        )
        if ctx.export is not None:
            base_id = plan.base.identity()
            ctx.export.write_config(partial, plan.base.config, base_id["source"], base_id.get("revision"))
        (partial / STATE_FILE).write_text(state.to_json())
        (partial / "README.md").write_text(render_card(state))
        return state

    def _copy_side_files(self, base_folder: Path, target: Path, adapter: bool = False) -> None:
        """Config, generation config, tokenizer/processor files (and small sub-configs) from the base.

        An adapter step takes the tokenizer/processor files only: a ``config.json`` beside
        ``adapter_config.json`` would make transformers read the folder as a full model."""
        import json

        from .sources import SIDE_PATTERNS

        for path in sorted(base_folder.rglob("*")):
            rel = path.relative_to(base_folder)
            if not path.is_file() or rel.parts[0].startswith(".") or rel.name in SKIP_SIDE:
                continue
            if not any(rel.match(p) for p in SIDE_PATTERNS) or (adapter and rel.name in MODEL_CONFIGS):
                continue
            dest = outdir.safe_relative(target, str(rel))
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)  # follows Hub-cache symlinks: the step holds real files
        config = target / "config.json"
        if config.is_file() and self.options.dtype != "auto":
            data = json.loads(config.read_text())
            for key in ("torch_dtype", "dtype"):
                if key in data or key == "dtype":
                    data[key] = self.options.dtype
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _store(writes: list[tuple[ShardedWriter, str, torch.Tensor]]) -> None:
    """Writer thread: append chunks to their writers, in the order they were queued."""
    for writer, key, tensor in writes:
        writer.write(key, tensor)


def _numel(shape: tuple[int, ...], rows: tuple[int, int] | None) -> int:
    n = torch.Size(shape).numel() if shape else 1
    return n if rows is None or not shape or shape[0] == 0 else n // shape[0] * (rows[1] - rows[0])

