"""The continual loop: one step per stream item, each planned, executed, assembled and published.

For a validated :class:`~hf_contmerge.options.MergeOptions` the engine resolves the base and the
stream items still to merge, pre-flights them all from headers (``sources/preflight.py``), checks a
resume against what the last complete step recorded, and then, step by step: plans the step
(``plan.py``), gets the calibration a data-dependent method asks for, writes the step's tensors
into a partial folder (``step.py``), completes the folder (side files, heads, state, card;
``artifacts/folder.py``), renames it into place (``artifacts/layout.py``) and runs the step hooks
(evaluation, push; ``hooks.py``). It knows nothing about any particular method.

Launched on several ranks (``torchrun`` / ``accelerate launch``; ``distributed.py``) every rank runs
this loop on the same plans and writes its share of each step's tensors; rank 0 alone holds the lock,
completes and publishes the folder and runs the hooks, and the step's state goes to every rank.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch

from ..artifacts import folder as step_folder
from ..artifacts import layout
from ..artifacts.state import StepState, read_state
from ..errors import ContMergeError
from ..hub.resume import materialise
from ..io.checkpoint import Checkpoint, is_content_digest, legacy_fingerprint
from ..io.safetensors import bytes_read
from ..methods.base import Method
from ..methods.registry import build_method
from ..options import MergeOptions
from ..sources.preflight import StreamPlan, plan_stream
from ..sources.resolve import ResolvedSource, resolve
from .allocator import keep_freed_memory, release_freed_memory
from .calibration import Calibrated, Calibrator
from .distributed import World, on_main, world_from_env
from .executor import failpoint
from .hooks import StepHook
from .plan import ModelFacts, StepPlan, plan_step, share_report
from .step import StepResult, StepWriter

logger = logging.getLogger(__name__)


def _io_refusal(e: OSError, out: Path) -> ContMergeError:
    """An operating-system error while a step was written, as a message: which file, why, what to do."""
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded", errno.EROFS: "the filesystem is read-only",
           errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}.get(e.errno, e.strerror or str(e))
    where = f" on {e.filename}" if e.filename else ""
    return ContMergeError(
        f"The run stopped: {why}{where}. The step being written was removed; complete steps in --out {out} are intact. "
        "Fix the cause (free space, or a folder you can write) and rerun with --resume to finish."
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ContMergeError(f"--device {name} was asked for but no CUDA GPU is available. Use --device cpu or auto.")
    return dev


class Engine:
    """Runs a validated :class:`MergeOptions` to completion (:meth:`run`).

    ``hooks`` run after every step, in order (``hf_contmerge.hooks.step_hooks`` builds the standard ones);
    ``calibrator`` answers the calibration requests of a data-dependent method.
    """

    def __init__(self, options: MergeOptions, hooks: Sequence[StepHook] = (), calibrator: Calibrator | None = None,
                 world: World | None = None):
        self.options = options
        self.world = world or world_from_env(options.device, options.dist_timeout)
        self._own_world = world is None  # closed at the end of run(): a world given is its caller's
        self.hooks = list(hooks) if self.world.main else []  # evaluation, push: rank 0's
        self.calibrator = calibrator
        self.method: Method = build_method(options.method, options.params)
        self.device = resolve_device(options.device)
        if self.world.size > 1 and self.device.type == "cuda":  # each rank on the GPU of its LOCAL_RANK
            self.device = self.world.state.device
        if self.method.calibration and calibrator is None:
            raise ContMergeError(
                f"Method {self.method.name!r} needs calibration data at every step "
                f"({', '.join(r.statistic for r in self.method.calibration)}), and this run has no calibrator for it."
            )

    # ------------------------------------------------------------------ whole runs
    def run(self) -> list[StepResult]:
        """Pre-flight the whole stream, then write every missing step. Returns the steps written.

        A run that may write holds ``--out`` for itself (``layout.exclusive``) from start to end."""
        self._check_out()
        # process-wide, once: slice buffers reused, not faulted in afresh (allocator.py)
        keep_freed_memory(one_arena=not self.method.calibration)
        if self.options.dry_run:
            return self._run()
        with ExitStack() as stack:
            if self._own_world:
                stack.callback(self.world.close)
            with self.world.agree(f"taking --out {self.options.out}"):
                if self.world.main:  # the ranks of one job are one run
                    stack.enter_context(layout.exclusive(self.options.out))
            try:
                return self._run()
            except OSError as e:  # a full disk, a read-only or unwritable --out, a failing device
                raise _io_refusal(e, self.options.out) from None

    def _check_out(self) -> None:
        """``--out`` may be neither a dangling link nor inside a local source: each step copies the base's
        files, and a source would read the steps written into it."""
        out = Path(self.options.out)
        if out.is_symlink() and not out.exists():
            raise ContMergeError(f"--out {out} is a symbolic link to {os.readlink(out)}, which does not exist. Create the "
                                 "target folder, or give another --out. Nothing was written.")
        resolved = out.resolve()
        for role, text in (("--base", self.options.base), *(("--stream item", s) for s in self.options.stream)):
            folder = Path(os.path.expanduser(text))  # not SourceSpec.parse: items already merged may be gone
            if folder.is_dir() and resolved.is_relative_to(folder.resolve()):
                raise ContMergeError(
                    f"--out {out} is inside the {role} folder {text!r}: every step would copy and read what earlier "
                    "steps wrote there. Give an --out outside every source folder. Nothing was written."
                )

    def _run(self) -> list[StepResult]:
        opts = self.options
        if not opts.stream:
            raise ContMergeError("No stream items: give at least one fine-tune with --stream (or `stream:` in the recipe).")
        if opts.resume_from and not opts.dry_run:
            with self.world.agree(f"fetching {opts.resume_from}"):
                if self.world.main:
                    materialise(opts.resume_from, opts.out, opts.token_value(), check=self._check_resume)
        done = layout.complete_steps(opts.out)
        if done and not (opts.resume or opts.resume_from):
            raise ContMergeError(
                f"--out {opts.out} already holds steps {done[0]}..{done[-1]} of an earlier run. Pass --resume to "
                "continue it, or choose another --out. Nothing was written."
            )
        last = done[-1] if done else 0
        previous = read_state(layout.step_dir(opts.out, last)) if last else None
        if previous is not None:
            self._check_resume(previous)
        token = opts.token_value()
        with ExitStack() as stack:
            base = resolve(opts.base, token=token, allow_pickle=opts.allow_pickle, role="base", lazy=True)
            stack.callback(base.close)
            if previous is not None and (base.fingerprint_ready or not is_content_digest(previous.base["fingerprint"])):
                self._check_base(previous, base)  # now; a digest still to compute is complete once step last+1 read the base
            items = []
            for text in opts.stream[last:]:
                items.append(resolve(text, token=token, allow_pickle=opts.allow_pickle, role="stream item", base=base, lazy=True))
                stack.callback(items[-1].close)
            stream = plan_stream(base, items)
            facts = self._model_facts(base)
            if opts.output_format == "adapter":
                self._check_adapter_output(previous, items)
            todo = range(last + 1, len(opts.stream) + 1)
            for hook in self.hooks:  # e.g. refuse a foreign push target before anything is computed
                hook.check(todo)
            if opts.dry_run:
                logger.info(stream.report())
                ranks = opts.ranks or self.world.size
                if ranks > 1 and len(todo):
                    logger.info(share_report(plan_step(stream, 0, todo[0], previous, self.method, opts, facts), ranks))
                logger.info(f"dry run: would write {', '.join(f'step-{t}' for t in todo) or 'nothing'} in {opts.out}")
                return []
            for hook in self.hooks:
                hook.start(done)
            if last >= len(opts.stream):
                logger.info(f"{opts.out}: all {last} steps are already complete; nothing to do.")
                return []
            base.ensure_local()  # every step reads it, and its config and tokenizer go into each step
            if self.method.calibration:  # every step's calibration data checked before the first step is written
                steps = {last + 1 + j: item for j, item in enumerate(items)}
                on_main(self.world, "checking the calibration data", lambda: self.calibrator.prepare(steps, base))
            with self.world.agree(f"claiming --out {opts.out}"):
                if self.world.main:
                    layout.claim(opts.out)
            results = []
            for j in range(len(items)):
                plan = plan_step(stream, j, last + 1 + j, previous, self.method, opts, facts)
                started, read_before = time.perf_counter(), bytes_read()
                result = self.write_step(stream, plan, previous)
                logger.info(f"wrote {result.folder}")
                if opts.verbose:
                    self._report(result.folder, time.perf_counter() - started, bytes_read() - read_before)
                for hook in self.hooks:
                    result = hook.after_step(result)
                previous = result.state
                results.append(result)
                release_freed_memory()
            return results

    def _report(self, folder: Path, seconds: float, read: int) -> None:
        """``--verbose``: what a step moved (every rank's reads; the folder's files) and how fast."""
        read = sum(self.world.gather(read))
        if not self.world.main:
            return
        sizes = {p: p.stat().st_size for p in folder.rglob("*") if p.is_file()}
        state = sum(n for p, n in sizes.items() if layout.STATE_DIR in p.relative_to(folder).parts)
        written = sum(sizes.values())
        logger.info(f"step {folder.name.removeprefix('step-')}: read {read / 1e9:.6f} GB, wrote {written / 1e9:.6f} GB "
                    f"({(written - state) / 1e9:.6f} GB model, {state / 1e9:.6f} GB carried state) in {seconds:.1f} s: "
                    f"{(read + written) / 1e9 / max(seconds, 1e-9):.3f} GB/s")

    def _model_facts(self, base: ResolvedSource) -> ModelFacts:
        """The base's module facts the plan needs: linear weights (methods that ask), file layout (adapters)."""
        needs_layout = self.method.needs_module_types or self.options.output_format == "adapter"
        if not needs_layout:
            return ModelFacts()
        from ..sources.naming import config_from_dict, file_layout  # transformers' model classes: only when needed

        try:
            found = file_layout(config_from_dict(base.config))
        except (OSError, ValueError, KeyError) as e:
            raise ContMergeError(
                f"{self.method.name if self.method.needs_module_types else '--output-format adapter'} needs the module "
                f"types of the base model to find its linear weights, and the base's config could not be built into a "
                f"model ({e}). Use a transformers architecture for the base."
            ) from None
        return ModelFacts(frozenset(found.linear) if self.method.needs_module_types else frozenset(), found)

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
        self._check_carried_scalars(previous)
        asked = self.method.params.model_dump()
        problems = []
        if previous.method != opts.method:
            problems.append(f"method {previous.method!r} there, {opts.method!r} now")
        elif previous.params != asked:
            problems.append(f"parameters {previous.params} there, {asked} now")
        problems += opts.resume_conflicts(previous.options)
        if previous.base["source"] != opts.base:
            problems.append(f"base {previous.base['source']!r} there, {opts.base!r} now")
        done = [s["source"] for s in previous.stream]
        if done != list(opts.stream[:k]):
            problems.append(f"stream so far {done} there, {list(opts.stream[:k])} now")
        if problems:
            raise ContMergeError(
                f"--resume: {opts.out} step {k} was made with other settings: {'; '.join(problems)}. "
                "Resume with the same base, method, parameters, options and stream prefix, or choose another --out."
            )

    def _check_base(self, previous: StepState, base: ResolvedSource) -> None:
        """The base must be the one the steps so far were made from: the same commit, or the same content
        (every tensor's sha256; a step by hf-contmerge 0.1 recorded a sampled fingerprint, compared as such)."""
        recorded = previous.base["fingerprint"]
        legacy = base.known_fingerprint is None and not is_content_digest(recorded)
        now = legacy_fingerprint(base.checkpoint) if legacy else base.fingerprint
        if now != recorded:
            raise ContMergeError(
                f"The base {self.options.base!r} is not the one step {previous.step} in {self.options.out} was made "
                f"from: its content changed (fingerprint {recorded} there, {now} now). Nothing was written. Resume "
                "with the same base, or start a new --out."
            )

    def _check_carried_scalars(self, previous: StepState) -> None:
        """The scalars the method carries (``init_scalars`` names them) must be in the state, of their type."""
        if previous.method != self.method.name:
            return  # _check_resume refuses the other method itself
        where = f"--resume: step {previous.step} in {self.options.out}"
        for name, initial in self.method.init_scalars().items():
            if name not in previous.scalars:
                raise ContMergeError(f"{where} lacks the scalar {name!r} that {self.method.name} carries from step to step "
                                     "(its contmerge_state.json is damaged). Remove that step folder and resume.")
            value, kind = previous.scalars[name], float if isinstance(initial, float) else type(initial)
            if isinstance(value, bool) != isinstance(initial, bool) or not isinstance(value, (int, float) if kind is float else kind):
                raise ContMergeError(f"{where} carries scalar {name!r} = {value!r}, not a {kind.__name__} (its "
                                     "contmerge_state.json is damaged). Remove that step folder and resume.")

    # ------------------------------------------------------------------ one step
    def write_step(self, stream: StreamPlan, plan: StepPlan, previous: StepState | None) -> StepResult:
        """Write ``OUT/step-{plan.step}`` from its plan; the folder appears whole or not at all."""
        opts, method = self.options, self.method
        prev_folder = layout.step_dir(opts.out, previous.step) if previous else None
        item, item_plan = stream.items[plan.item_index], stream.item_plans[plan.item_index]
        world = self.world
        partial = on_main(world, f"starting step {plan.step}", lambda: layout.new_partial(opts.out, plan.step))
        try:
            with ExitStack() as stack:
                calibrated = self._calibrate(plan, stream, item, prev_folder, partial / layout.CALIBRATION_DIR)
                for index in calibrated.tensors.values():
                    stack.callback(index.close)
                writer = StepWriter(plan, stream, method, device=self.device, chunk_bytes=int(opts.chunk_mb * 2**20),
                                    shard_bytes=opts.shard_bytes, allow_nonfinite=opts.allow_nonfinite, quiet=opts.quiet,
                                    calibration=calibrated.tensors, calibration_scalars=calibrated.scalars, world=world)
                written = writer.write(partial, prev_folder, dict(previous.scalars) if previous else method.init_scalars(),
                                       prev_weight_slot=previous.weight_slot if previous else None)
            heads = on_main(world, f"completing step {plan.step}", lambda: self._side_files(
                stream, plan, previous, prev_folder, item, item_plan, partial))
            after = Calibrated()
            if method.after_slots:  # statistics of θ(t), the model just written (its task's head included), then a pass
                with ExitStack() as stack:
                    after = self._calibrate(plan, stream, item, partial, partial / layout.CALIBRATION_DIR, when="after")
                    for index in after.tensors.values():
                        stack.callback(index.close)
                    writer.write_after(partial, prev_folder, after.tensors, written.scalars)
            final = layout.step_dir(opts.out, plan.step)
            state = on_main(world, f"publishing step {plan.step}",
                            lambda: self._finish_step(stream, plan, previous, item, item_plan, partial, heads,
                                                      calibrated, after, written, final))
        except BaseException:
            if world.main:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        return StepResult(plan.step, final, state)

    def _side_files(self, stream: StreamPlan, plan: StepPlan, previous: StepState | None, prev_folder: Path | None, item,
                    item_plan, partial: Path) -> list:
        """Rank 0: the base's side files and every head so far into the partial folder; the heads' record."""
        step_folder.copy_side_files(stream.base.folder, partial, self.options.dtype, adapter=plan.adapter is not None)
        return step_folder.carry_heads(partial, prev_folder, previous.heads if previous else [], plan.step, item,
                                       item_plan.heads)

    def _finish_step(self, stream: StreamPlan, plan: StepPlan, previous: StepState | None, item, item_plan, partial: Path,
                     heads: list, calibrated: Calibrated, after: Calibrated, written, final: Path) -> StepState:
        """Rank 0: state, card and the hooks' part into the partial folder, then publish it."""
        opts, method = self.options, self.method
        record = {**calibrated.record, **after.record}
        entry = {
            **item.identity(),
            "step": plan.step,
            "alignment": item_plan.alignment.describe(),
            "heads": item_plan.heads,
            "kept_modules": item_plan.kept_modules,
            "method": method.step_summary(written.scalars),
            **({"calibration": record} if record else {}),
        }
        for name, folder in {**calibrated.keep, **after.keep}.items():  # what the method carries besides its slots
            (partial / layout.STATE_DIR).mkdir(exist_ok=True)
            os.replace(folder, layout.safe_relative(partial / layout.STATE_DIR, name))
        shutil.rmtree(partial / layout.CALIBRATION_DIR, ignore_errors=True)  # statistics are not part of a step
        state = StepState(
            step=plan.step,
            method=method.name,
            params=method.params.model_dump(),
            options=opts.recorded(),
            base=stream.base.identity(),
            stream=[*(previous.stream if previous else []), entry],
            scalars=written.scalars,
            slots=list(method.slots),
            heads=heads,
            lowrank=dict(written.ranks),
            touched=sorted(plan.touched),
            output=written.adapter.summary() if written.adapter else {"format": "full"},
            weight_slot=plan.weight_slot,
        )
        if written.adapter is not None:
            base_id = stream.base.identity()
            written.adapter.write_config(partial, stream.base.config, base_id["source"], base_id.get("revision"))
        if previous is not None and is_content_digest(previous.base["fingerprint"]):
            self._check_base(previous, stream.base)  # the base was read whole by this step: its digest is complete
        step_folder.write_state_and_card(partial, state)
        staged = StepResult(plan.step, partial, state, base_folder=stream.base.folder, item=item, stream=stream)
        for hook in self.hooks:  # e.g. evaluation: part of the step, so a crash here leaves no complete step
            staged = hook.before_publish(staged)
        failpoint(f"step-{plan.step}:publish")
        layout.publish(partial, final)
        return staged.state

    def _calibrate(self, plan: StepPlan, stream: StreamPlan, item: ResolvedSource, model_folder: Path | None,
                   scratch: Path, when: str = "before") -> Calibrated:
        """The statistics the method asks for at this step: ``before`` its tensor pass (of θt, or of
        θ(t−1) in ``model_folder``), or ``after`` it (of θ(t), the partial step in ``model_folder``).
        With several ranks rank 0 calibrates (its forward passes may spread over the node's GPUs with
        ``--device-map``) into the partial folder, and every rank opens what it wrote."""
        requests = tuple(r for r in self.method.calibration if r.from_step <= plan.step <= (r.to_step or plan.step)
                         and (r.model == "merged") == (when == "after"))
        if not requests:
            return Calibrated()
        def key_map(j: int) -> dict[str, str]:
            return {kp.item_keys[j]: kp.key for kp in plan.keys if kp.merged and kp.item_keys[j]}

        more = {}
        if any(r.learn is not None and r.learn.all_items for r in requests):  # learned over every item still to merge
            more["later"] = tuple((plan.step + j - plan.item_index, stream.items[j], key_map(j))
                                  for j in range(plan.item_index + 1, len(stream.items)))
        def calibrate() -> Calibrated:
            return self.calibrator.calibrate(plan.step, requests, base=stream.base, item=item, previous_step=model_folder,
                                             key_map=key_map(plan.item_index), scratch=scratch, **more)

        if self.world.size == 1:
            return calibrate()

        def shared() -> Calibrated:  # its statistics by folder: open files do not cross processes
            done = calibrate()
            for index in done.tensors.values():
                index.close()
            return replace(done, tensors={name: index.folder for name, index in done.tensors.items()})

        done = on_main(self.world, f"calibrating step {plan.step}", shared)
        return replace(done, tensors={name: Checkpoint.open(folder) for name, folder in done.tensors.items()})
