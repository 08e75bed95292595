r"""Learned merge coefficients (DivMerge, TRM): a differentiable merged model, an objective, Adam.

The merged model is composed on the fly,

    θ = θ_anchor + Σ_k Γ[k, g(n)] · d_k          for every merged tensor n,

with directions d_k (``item-base`` = θt − θ0, ``previous-base`` = θ(t−1) − θ0, ``item-previous`` =
θt − θ(t−1)) and one coefficient per direction and group g (``granularity="task"``: one group;
``"layer"``: :func:`layer_group`). Only the coefficients are trained. The student is the item's own
task model (its head kept apart by the pre-flight stays its own) loaded with the anchor as its
backbone, placed like any calibration model (``--device-map``, ``--max-memory``, offload); each
merged weight ``p`` is replaced, while its module runs, by ``p + Σ_k Γ_k·d_k`` (``compose.py``), the
directions held in the base's dtype where the map keeps that module (GPU, CPU, or a file for disk),
the composed weight rebuilt for the backward pass rather than kept. So a merge fits where a forward
pass with (1 + number of directions) copies of the weights fits.

Teachers (the fine-tune θt with its head; the merge so far θ(t−1) with the outputs it already
served: the LM head, or, in a stream with a head per task, each past task's head, the previous
teacher's weight shared among them) are run once per step, and their output distributions cached
on disk in the step's scratch folder (bounded by ``cache_bytes``; removed with the step's other
calibration files): for a classifier the class distribution of every sample; for a causal LM the
teacher's greedy continuation of ``gen_tokens`` tokens and its next-token distributions along it,
the student being scored on the same tokens. The fine-tune's own outputs depend on nothing but the
fine-tune (and the base, for an adapter), the samples and where they run, so they are also kept per
machine (``HF_CONTMERGE_CACHE/teacher-outputs``, keyed by those) when the sources' fingerprints are
known without reading them: every run and task order of a ``compare`` computes them once.

A task is one stream item with its data: one for the continual forms, every item of the stream for
DivMerge's all-at-once form (each with its own student, the directions shared). Objective, per
batch: Σ_tasks Σ_terms weight · mean over the task's samples of the divergence from the term's
teacher (``divergence.py``; for an LM averaged over the continuation's positions), plus, for TRM's
responsiveness, ``weight · relu(mean_n max_c q(c|x_n) − threshold)`` on the student's predictions
of the first term. Adam (``lr``), ``epochs`` passes of ⌈largest task / ``batch_per_task``⌉ batches,
each with ``batch_per_task`` samples of every task (a smaller task's cycle round), drawn in a
seeded order (``--seed`` and the step), so a rerun is bit-identical. The objective over all
samples is measured before and after (recorded with the coefficients).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import ContMergeError
from ..io.checkpoint import TensorIndex
from ..methods.learning import Direction, LearnSpec, Term, layer_group
from ..sources.preflight import model_names
from .compose import Substitution, home_tensors, substituted
from .divergence import divergence


@dataclass
class Task:
    """One task of a learned merge: its item (a loader of its task model with a given backbone, its
    tensors by file name, its merged names) and its calibration samples (unpadded)."""

    load: Callable[[TensorIndex | None, Path], nn.Module]  # backbone from an index by output name (None: its own)
    weights: TensorIndex
    key_map: Mapping[str, str]  # item file name -> output name, for every merged tensor
    samples: list[dict[str, Tensor]]
    old_heads: list[OldHead] = field(default_factory=list)  # the merge so far has other outputs than this item
    identity: str | None = None  # what its teacher's outputs depend on besides the samples (None: not cached)


@dataclass
class OldHead:
    """An output the merge so far already served (a past task's head): θ(t−1) through it is the
    ``previous`` teacher, on this task's inputs, instead of θ(t−1) through the new task's head."""

    task: int
    teacher: Callable[[], nn.Module]  # θ(t−1) with this head
    student: Callable[[str], nn.Module]  # the anchor ("base" or "previous") with this head


@dataclass
class Models:
    """What every task shares: the base and the merge so far (by output name), where inputs go."""

    base: TensorIndex
    previous: TensorIndex | None
    input_device: Callable[[nn.Module], torch.device]
    buffer_in: Path | None = None  # the previous step's buffer of past samples (LearnSpec.buffer)
    buffer_out: Path | None = None  # where this step's buffer is written (kept in the step's state)


@dataclass
class Learned:
    coefficients: dict[str, float]
    record: dict[str, Any] = field(default_factory=dict)


class _Compose(torch.autograd.Function):
    """``p + Σ_k c_k·d_k`` whose backward gives the coefficients' gradients ⟨grad, d_k⟩ and holds only
    references to the directions where they live (no copies on the execution device)."""

    @staticmethod
    def forward(ctx, p: Tensor, c: Tensor, *directions: Tensor) -> Tensor:
        ctx.directions = directions
        return _composed(p, c, directions)

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = torch.stack([(grad * d.to(grad.device, grad.dtype)).sum() for d in ctx.directions])
        return (None, g, *([None] * len(ctx.directions)))


def _composed(p: Tensor, c: Tensor, directions: Sequence[Tensor]) -> Tensor:
    out = p.detach().clone()
    for k, d in enumerate(directions):
        out.add_(d.to(out.device, out.dtype), alpha=float(c[k]))
    return out


def _names(model: nn.Module, key_map: Mapping[str, str]) -> dict[str, str]:
    """In-memory parameter name -> output name, for the model's merged parameters."""
    from ..sources.naming import file_layout

    to_file = file_layout(model).to_file
    return {n: key_map[to_file[n]] for n, _ in model.named_parameters() if to_file.get(n) in key_map}


def _direction(kind: Direction, base: Tensor, item: Tensor | None, prev: Tensor | None) -> Tensor:
    if kind == "item-base":
        return item - base
    if kind == "previous-base":
        return prev - base
    return item - prev


def _batch(samples: list[dict[str, Tensor]], device: torch.device) -> dict[str, Tensor]:
    """Unpadded samples as one right-padded batch (padding masked; a causal LM's real tokens never see it)."""
    longest = max(s["input_ids"].shape[1] for s in samples) if "input_ids" in samples[0] else None
    out: dict[str, Tensor] = {}
    for key in samples[0]:
        parts = []
        for s in samples:
            v = s[key]
            if longest is not None and v.dim() == 2 and v.shape[1] != longest:
                v = torch.nn.functional.pad(v, (0, longest - v.shape[1]))
            parts.append(v)
        out[key] = torch.cat(parts).to(device)
    return out


class _Targets:
    """One teacher's outputs, cached on disk: per sample its inputs and teacher log-probabilities (a
    causal LM: along the teacher's greedy continuation, from position ``start``)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.count = 0
        folder.mkdir(parents=True)

    def add(self, inputs: dict[str, Tensor], logp: Tensor, start: int, task: int = 0) -> None:
        save_file({**{f"in.{k}": v.contiguous().cpu() for k, v in inputs.items()}, "logp": logp.float().contiguous().cpu(),
                   "start": torch.tensor([start]), "task": torch.tensor([task])}, self.folder / f"{self.count}.safetensors")
        self.count += 1

    def get(self, i: int) -> tuple[dict[str, Tensor], Tensor, int]:
        data = load_file(self.folder / f"{i}.safetensors")
        return {k[3:]: v for k, v in data.items() if k.startswith("in.")}, data["logp"], int(data["start"][0])

    def task(self, i: int) -> int:
        return int(load_file(self.folder / f"{i}.safetensors")["task"][0])

    @classmethod
    def open(cls, folder: Path) -> _Targets:
        targets = cls.__new__(cls)
        targets.folder, targets.count = folder, len(list(folder.glob("*.safetensors")))
        if any(not (folder / f"{i}.safetensors").is_file() for i in range(targets.count)):
            raise ContMergeError(f"{folder}: the buffer of past samples is damaged (its files are not 0..N-1). Remove "
                                 "that step folder and resume.")
        return targets


class _Subset:
    """Some of a cache's samples (a buffer's, of one task)."""

    def __init__(self, targets: _Targets, indices: list[int]):
        self.targets, self.indices, self.count = targets, indices, len(indices)

    def get(self, i: int) -> tuple[dict[str, Tensor], Tensor, int]:
        return self.targets.get(self.indices[i])


def _write_buffer(old: _Targets | None, new: _Targets, task: int, size: int, out: Path) -> int:
    """The buffer after this step: the past samples and task ``task``'s, at most ``size`` in all, an equal
    share for every task (the first ones of each, in task order). Returns how many were kept."""
    entries = [(old.task(i), old, i) for i in range(old.count)] if old is not None else []
    entries += [(task, new, i) for i in range(new.count)]
    tasks = sorted({t for t, _, _ in entries})
    share = max(1, size // len(tasks))
    kept = [e for t in tasks for e in [x for x in entries if x[0] == t][:share]][:size]
    out.mkdir(parents=True)
    for n, (_, source, i) in enumerate(kept):
        shutil.copyfile(source.folder / f"{i}.safetensors", out / f"{n}.safetensors")
    return len(kept)


def _causal(model: nn.Module) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (getattr(model.config, "architectures", None) or []))


@torch.no_grad()
def _teacher_targets(model: nn.Module, samples: list[dict[str, Tensor]], spec: LearnSpec, folder: Path,
                     device: torch.device, task: int = 0) -> _Targets:
    targets = _Targets(folder)
    model.eval()
    for s in samples:
        s = {k: v.to(device) for k, v in s.items()}
        if _causal(model):
            length = s["input_ids"].shape[1]
            pad = model.generation_config.pad_token_id
            pad = pad if pad is not None else (model.generation_config.eos_token_id or 0)
            pad = pad[0] if isinstance(pad, list) else pad
            seq = model.generate(**s, max_new_tokens=spec.gen_tokens, min_new_tokens=spec.gen_tokens, do_sample=False,
                                 pad_token_id=pad)
            inputs = {"input_ids": seq, "attention_mask": torch.ones_like(seq)}
            logits = model(**inputs).logits[0, length - 1 : seq.shape[1] - 1]
            targets.add(inputs, torch.log_softmax(logits.float(), -1), length - 1, task)
        else:
            targets.add(s, torch.log_softmax(model(**s).logits.float(), -1)[0], 0, task)
    return targets


def _item_targets(task: Task, spec: LearnSpec, folder: Path, models: Models, task_id: int, scratch: Path) -> _Targets:
    """The fine-tune's outputs on its samples, from the per-machine cache when it has them (see the module
    docstring); stored with task id 0 and rewritten with ``task_id`` (the buffer keeps it)."""
    import hashlib
    import json
    import os

    from .._version import __version__
    from ..io.fingerprints import cache_root

    def compute() -> _Targets:
        model = task.load(None, scratch / "teacher-model")
        try:
            return _teacher_targets(model, task.samples, spec, folder, models.input_device(model), task_id)
        finally:
            del model
            shutil.rmtree(scratch / "teacher-model", ignore_errors=True)

    if task.identity is None:
        return compute()
    digest = hashlib.sha256(json.dumps([__version__, task.identity, spec.gen_tokens]).encode())
    for s in task.samples:
        for k in sorted(s):
            digest.update(k.encode() + str(tuple(s[k].shape)).encode() + s[k].contiguous().cpu().numpy().tobytes())
    cached = cache_root() / "teacher-outputs" / digest.hexdigest()[:24]
    if not cached.is_dir():
        targets = compute()
        tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i in range(targets.count):
            data = load_file(targets.folder / f"{i}.safetensors")
            save_file({**data, "task": torch.tensor([0])}, tmp / f"{i}.safetensors")
        try:
            os.rename(tmp, cached)  # complete or absent; a concurrent run's copy wins alike
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        return targets
    stored = _Targets.open(cached)
    targets = _Targets(folder)
    for i in range(stored.count):
        data = load_file(cached / f"{i}.safetensors")
        save_file({**data, "task": torch.tensor([task_id])}, folder / f"{i}.safetensors")
    targets.count = stored.count
    return targets


def cache_bytes(spec: LearnSpec, config: Mapping[str, Any], samples: int) -> int:
    """Bytes the teachers' cached outputs of one task take (float32 log-probabilities), from the item's
    ``config.json``: samples × continuation tokens × vocabulary for a causal LM, × labels otherwise."""
    teachers = len({t.teacher for t in spec.terms})
    arch = (config.get("architectures") or [""])[0]
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size") or 0
        return teachers * samples * spec.gen_tokens * vocab * 4
    return teachers * samples * max(len(config.get("id2label") or {}), 2) * 4


def learn_coefficients(spec: LearnSpec, tasks: Sequence[Task], models: Models, *, step: int, seed: int,
                       scratch: Path) -> Learned:
    """Learn ``spec``'s coefficients on the tasks' samples (see the module docstring)."""
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        return _learn(spec, tasks, models, step=step, seed=seed, scratch=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # teacher caches, placed models, offloaded directions


def _learn(spec: LearnSpec, tasks: Sequence[Task], models: Models, *, step: int, seed: int, scratch: Path) -> Learned:
    if spec.all_items:  # one direction θi − θ0 per task, coefficients task1, task2, … (steps of the run from this one)
        spec = replace(spec, directions=tuple((f"task{step + j}", "item-base", j) for j in range(len(tasks))),
                       init=(spec.init[0],) * len(tasks))
    needs_previous = spec.anchor == "previous" or any("previous" in kind for _, kind, _ in spec.directions) or \
        any(t.teacher == "previous" for t in spec.terms)
    if needs_previous and models.previous is None:  # a first step: nothing to learn; its samples start the buffer
        first = _item_targets(tasks[0], spec, scratch / "teacher-0-item", models, step, scratch)
        kept = _write_buffer(None, first, step, spec.buffer, models.buffer_out)
        return Learned({}, {"buffer": kept})
    # 1. teachers, once: their outputs cached on disk (bounded), and for TRM their Fishers
    targets: dict[tuple[int, str], _Targets] = {}
    fishers: dict[str, dict[str, Tensor]] = {}
    buffered = None
    if spec.buffer:
        if models.buffer_in is None or not models.buffer_in.is_dir():
            raise ContMergeError(f"step {step}: the previous step has no buffer of past samples ({models.buffer_in}), and "
                                 "this run keeps one (buffer > 0): it was made with another buffer setting or is damaged.")
        buffered = _Targets.open(models.buffer_in)
    for j, task in enumerate(tasks):
        scored = {t.teacher for t in spec.terms}
        through_old = "previous" in scored and bool(task.old_heads)  # θ(t−1) scored through the heads it served
        fisher_of = spec.init_became and j == 0
        for teacher in [t for t in ("item", "previous") if fisher_of or (t in scored and not (t == "previous" and through_old))]:
            if teacher == "item" and not fisher_of:
                targets[j, teacher] = _item_targets(task, spec, scratch / f"teacher-{j}-{teacher}", models, step + j, scratch)
                continue
            model = task.load(models.previous if teacher == "previous" else None, scratch / "teacher-model")
            if fisher_of:
                fishers[teacher] = _fisher(model, task.samples, models)
            if teacher in scored and not (teacher == "previous" and through_old):  # (else loaded for its Fisher only)
                targets[j, teacher] = _teacher_targets(model, task.samples, spec, scratch / f"teacher-{j}-{teacher}",
                                                       models.input_device(model), step + j)
            del model
            shutil.rmtree(scratch / "teacher-model", ignore_errors=True)
        if through_old:
            for old in task.old_heads:
                model = old.teacher()
                targets[j, f"previous@{old.task}"] = _teacher_targets(model, task.samples, spec,
                                                                       scratch / f"teacher-{j}-previous-{old.task}",
                                                                       models.input_device(model), old.task)
                del model

    # 2. students: each task's model over the anchor; the directions, shared, where the first keeps them
    anchor = models.previous if spec.anchor == "previous" else models.base
    students = [task.load(anchor, scratch / f"student-{j}") for j, task in enumerate(tasks)]
    names = [_names(s, task.key_map) for s, task in zip(students, tasks)]
    if not any(names):
        raise ContMergeError(f"step {step}: none of the model's parameters is a merged tensor; nothing to learn.")
    merged_outs = {out for n in names for out in n.values()}
    views: list[tuple[int, str, int]] = []  # (task, targets key, student index): θ(t−1)'s old heads
    for j, task in enumerate(tasks):
        if "previous" in {t.teacher for t in spec.terms} and task.old_heads:
            for old in task.old_heads:
                students.append(old.student(spec.anchor))
                names.append(model_names(students[-1], merged_outs, []))
                views.append((j, f"previous@{old.task}", len(students) - 1))
    outs = sorted(merged_outs)
    groups = sorted({layer_group(out, spec.granularity) for out in outs}, key=_group_order)
    column = {g: i for i, g in enumerate(groups)}
    home = home_tensors(students[0], scratch / "directions")
    first = {out: name for name, out in names[0].items()}
    directions: dict[str, list[Tensor]] = {}
    to_item = [{o: ik for ik, o in task.key_map.items()} for task in tasks]
    uses_previous = any("previous" in kind for _, kind, _ in spec.directions)
    for out in outs:  # each source tensor read once, every direction made from it
        base = models.base.read(out).to(torch.float32)
        prev = models.previous.read(out).to(torch.float32) if uses_previous else None
        items = {j: tasks[j].weights.read(to_item[j][out]).to(torch.float32)
                 for j in {j for _, kind, j in spec.directions if kind.startswith("item")}}
        held = []
        for _, kind, j in spec.directions:
            t = home(first.get(out, out), base.shape, _torch_dtype(models.base.info(out).dtype))
            held.append(t.copy_(_direction(kind, base, items.get(j), prev)))
        directions[out] = held

    init = torch.tensor(spec.init, dtype=torch.float32)
    if spec.init_became:
        fnew = {names[0][n]: f for n, f in fishers["item"].items() if n in names[0]}
        fold = {names[0][n]: f for n, f in fishers["previous"].items() if n in names[0]}
        init[0] = _became_lambda(fnew, fold, directions)
    coef = nn.Parameter(init[:, None].repeat(1, len(groups)).contiguous())

    # 3. the objective, with every student's merged weights composed from the coefficients. A stream is
    # (student, its terms with their teachers' cached outputs) over one set of samples: each task, and
    # the buffer of past samples (scored by the first student: a buffer needs one shared output)
    streams = [(j, [(term, targets[j, term.teacher]) for term in spec.terms if (j, term.teacher) in targets])
               for j in range(len(tasks))]
    for j, key, index in views:  # the previous teacher's weight shared by the heads it is read through
        term = next(t for t in spec.terms if t.teacher == "previous")
        share = sum(1 for v in views if v[0] == j)
        streams.append((index, [(Term("previous", term.divergence, term.weight / share), targets[j, key])]))
    buffer_streams: list[_Subset] = []
    if buffered is not None and buffered.count:  # each past task's samples through its own head (or the shared output)
        view_of = {int(key.split("@")[1]): index for j, key, index in views if j == 0}
        by_task: dict[int, list[int]] = {}
        for i in range(buffered.count):
            by_task.setdefault(buffered.task(i), []).append(i)
        for task_id, indices in sorted(by_task.items()):
            if view_of and task_id not in view_of:
                raise ContMergeError(f"step {step}: the buffer holds samples of task {task_id}, whose head the previous "
                                     "step does not have. The step folder is damaged: remove it and resume.")
            buffer_streams.append(_Subset(buffered, indices))
            streams.append((view_of.get(task_id, 0), [(Term("item", spec.terms[0].divergence, 1.0 / len(by_task)),
                                                       buffer_streams[-1])]))

    def objective(indices: Sequence[Sequence[int]]) -> Tensor:
        total = torch.zeros(())
        for (j, terms), rows_j in zip(streams, indices):
            student = students[j]
            device = models.input_device(student)
            for n, (term, cached) in enumerate(terms):
                rows = [cached.get(i) for i in rows_j]
                logits = student(**_batch([r[0] for r in rows], device)).logits.float()
                parts, top = [], []
                for b, (_, lp, start) in enumerate(rows):
                    lq = torch.log_softmax(logits[b, start : start + lp.shape[0]] if logits.dim() == 3 else logits[b], -1)
                    parts.append(divergence(term.divergence, lp.to(lq.device), lq).mean())
                    top.append(lq.exp().amax(-1).mean())
                total = total + term.weight * torch.stack(parts).mean().cpu()
                if n == 0 and j < len(tasks) and spec.saturation_weight > 0 and not isinstance(cached, _Subset):
                    # TRM's responsiveness: no saturated predictions
                    total = total + spec.saturation_weight * torch.relu(torch.stack(top).mean() - spec.saturation_threshold).cpu()
        return total

    sizes = [len(t.samples) for t in tasks] + [len(tasks[j].samples) for j, _, _ in views] + \
        [b.count for b in buffer_streams]
    batches = math.ceil(max(sizes) / spec.batch_per_task)

    def rows_of(orders: list[list[int]], b: int) -> list[list[int]]:
        """Batch ``b``: ``batch_per_task`` samples of every stream (a smaller one's cycle round)."""
        return [[order[(b * spec.batch_per_task + i) % len(order)] for i in range(min(spec.batch_per_task, len(order)))]
                for order in orders]

    with ExitStack() as stack:
        for j, student in enumerate(students):
            student.eval()
            for p in student.parameters():
                p.requires_grad_(False)
            state_box: list[Substitution] = []
            state = stack.enter_context(substituted(student, _composer(names[j], directions, coef, column, spec, state_box),
                                                    rebuild_saved=True))
            state_box.append(state)

        def full() -> float:
            """The objective over every sample, in order (a task's mean over its own samples)."""
            with torch.no_grad():
                plain = [list(range(n)) for n in sizes]
                weights = [min(spec.batch_per_task, max(sizes) - b * spec.batch_per_task) for b in range(batches)]
                return sum(float(objective(rows_of(plain, b))) * w for b, w in enumerate(weights)) / max(sizes)

        start = full()
        optimiser = torch.optim.Adam([coef], lr=spec.lr)
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)
        history = []
        for _ in range(spec.epochs):
            orders = [torch.randperm(n, generator=g).tolist() for n in sizes]
            losses = []
            for b in range(batches):
                optimiser.zero_grad(set_to_none=True)
                loss = objective(rows_of(orders, b))
                loss.backward()
                optimiser.step()
                losses.append(float(loss.detach()))
            history.append(sum(losses) / len(losses))
        end = full()
    values = coef.detach()
    coefficients = {f"{label}@{group}": float(values[k, column[group]])
                    for k, (label, _, _) in enumerate(spec.directions) for group in groups}
    record = {"objective_start": start, "objective_end": end, "epoch_losses": history, "groups": groups,
              "init": {label: float(init[k]) for k, (label, _, _) in enumerate(spec.directions)}}
    if views:
        record["previous_through_heads"] = sorted({int(key.split("@")[1]) for _, key, _ in views})
    if spec.buffer:
        record["buffer"] = _write_buffer(buffered, targets[0, "item"], step, spec.buffer, models.buffer_out)
        record["buffer_used"] = buffered.count
    return Learned(coefficients, record)



def _composer(names: Mapping[str, str], directions: Mapping[str, list[Tensor]], coef: Tensor, column: Mapping[str, int],
              spec: LearnSpec, state_box: list[Substitution]) -> Callable[[str, Tensor], Tensor | None]:
    """The substitute of one student: each merged weight ``p`` (the anchor) as ``p + Σ_k Γ_k,g·d_k``,
    registered to be rebuilt (from a reload of ``p`` when it is offloaded) for the backward pass."""

    def compose(name: str, p: Tensor) -> Tensor | None:
        out = names.get(name)
        if out is None:
            return None
        held = directions[out]
        c = coef[:, column[layer_group(out, spec.granularity)]]
        state = state_box[0]
        again = state.rebuild.get(p.untyped_storage().data_ptr())
        w = _Compose.apply(p, c.to(p.device), *held)
        source = again if again is not None else (lambda: p)
        state.recompute(w, lambda: _composed(source(), c.detach(), held))
        return w

    return compose


def _group_order(group: str) -> tuple[int, int, str]:
    if group.startswith("layer."):
        return (1, int(group.split(".")[1]), group)
    return ({"embeddings": 0, "head": 3}.get(group, 2), 0, group)


def _torch_dtype(name: str) -> torch.dtype:
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(name, torch.float32)


def _fisher(model: nn.Module, samples: list[dict[str, Tensor]], models: Models) -> dict[str, Tensor]:
    """The batch-form diagonal Fisher of ``model`` on the samples (for a BECAME λ*), by in-memory name."""
    from .fisher import diagonal_fisher

    batches = [_batch(samples[s : s + 8], torch.device("cpu")) for s in range(0, len(samples), 8)]
    return diagonal_fisher(model, batches, "batch", models.input_device(model))


def _became_lambda(fnew: Mapping[str, Tensor], fold: Mapping[str, Tensor], directions: Mapping[str, list[Tensor]]) -> float:
    """λ* = Σ Fnew·δ² / Σ (Fnew + Fold)·δ², δ the first direction (θt − θ(t−1)); 0 when the denominator is."""
    num = den = 0.0
    for out, held in directions.items():
        d2 = held[0].to(torch.float32).square()
        a = float((fnew[out].to(d2.device) * d2).sum(dtype=torch.float64)) if out in fnew else 0.0
        b = float((fold[out].to(d2.device) * d2).sum(dtype=torch.float64)) if out in fold else 0.0
        num, den = num + a, den + a + b
    return num / den if den > 0 and math.isfinite(den) else 0.0
