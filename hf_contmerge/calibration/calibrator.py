"""The run's :class:`~hf_contmerge.engine.calibration.Calibrator` for data-dependent methods.

At a step that asks for a statistic of the new fine-tune (``CalibrationRequest(model="item")``):
the item is built as the model that scores its own task (its full folder: a classifier with its
own head, a causal LM with its LM head; a LoRA adapter merged onto the base with PEFT), in float32
on ``--device``; its calibration data (``--data``, the spec of this stream item) is made into
inputs with the base's tokenizer or image processor (``data.py``); the diagonal Fisher is taken
(``fisher.py``). The statistics are renamed from the model's in-memory names to its file names
(``sources/naming.file_layout``) and then to the output's names (the step plan's alignment of the
item to the base, so a head kept apart is left out), written as float32 safetensors into the
partial step folder, and handed to the tensor pass as a checkpoint read a tensor at a time. A
tensor the statistics do not cover (a fused tensor with no 1:1 in-memory partner, a module the
item lacks) gets none; the method decides what that means (``fisher`` floors it).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..artifacts.layout import STATE_DIR
from ..engine.calibration import Calibrated
from ..errors import ContMergeError
from ..io.checkpoint import Checkpoint, TensorIndex
from ..io.safetensors import TensorSpec, finite
from ..io.writer import StreamingWriter, plan_shards
from ..methods.base import CalibrationRequest
from ..options import MergeOptions
from ..sources.resolve import ResolvedSource
from .data import CalibrationSet, DataSpec, load_calibration
from .fisher import diagonal_fisher

logger = logging.getLogger(__name__)
BUFFER = "buffer"  # contmerge_state/buffer/: a learned merge's past samples (LearnSpec.buffer)


class DataCalibrator:
    """Fisher statistics of each stream item on its own calibration data (``--data``)."""

    def __init__(self, options: MergeOptions, device: torch.device, datasets: Mapping[str, DataSpec] | None = None):
        self.options, self.device = options, device
        if not options.data:
            raise ContMergeError(f"Method {options.method!r} needs calibration data: give one --data SPEC per --stream item "
                                 "(a dataset folder, data files, or a Hub dataset; see --help).")
        # every spec checked before any work ("" stands for an item merged earlier, whose data is not read again);
        # ``datasets``: the API's in-memory Datasets, by the text that stands for them in options.data
        known = dict(datasets or {})
        self.specs = [(known.get(text) or DataSpec.parse(text)) if text else None for text in options.data]
        self.sets: dict[int, CalibrationSet] = {}  # step -> its encoded data (prepare)

    def prepare(self, steps: Mapping[int, ResolvedSource], base: ResolvedSource) -> None:
        """Load, sample and encode the data of every step to come, before any is written: a missing column,
        an empty split, data the model cannot take or a dataset that does not load is refused now."""
        opts = self.options
        for step, item in steps.items():
            spec = self.specs[step - 1]
            if spec is None:
                raise ContMergeError(f"step {step} needs calibration data, and none was given for {item.spec.text!r}.")
            self.sets[step] = load_calibration(spec, base.ensure_local(), column=opts.data_column, samples=opts.calib_samples,
                                               seed=opts.seed, batch_size=opts.calib_batch_size, max_length=opts.max_length,
                                               model_kind=config_kind(item.config))
            self._check_cache(step, item, self.sets[step].rows)

    def calibrate(self, step: int, requests: tuple[CalibrationRequest, ...], *, base: ResolvedSource, item: ResolvedSource,
                  previous_step: Path | None, key_map: Mapping[str, str], scratch: Path,
                  later: Sequence[tuple[int, ResolvedSource, Mapping[str, str]]] = ()) -> Calibrated:
        opts = self.options
        if step not in self.sets:
            self.prepare({step: item}, base)
        data, spec = self.sets[step], self.specs[step - 1]
        tensors, record = {}, {}
        scalars: dict[str, float] = {}
        keep: dict[str, Path] = {}
        placement = self._placement()
        for request in requests:
            if request.learn is not None:
                buffer = scratch / f"{request.statistic}-buffer"
                learned = self._learn(request.learn, step, base, [(step, item, key_map), *later], previous_step, placement,
                                      scratch / request.statistic, buffer)
                scalars.update(learned.coefficients)
                record = {**record, **data.describe(), "learned": learned.record, "seed": opts.seed}
                if request.learn.buffer:
                    keep[BUFFER] = buffer
                continue
            folder = scratch / f"{request.statistic}-model"
            if request.model == "item":
                model, what = load_item_model(item, base, placement, folder, opts.shard_bytes), repr(item.spec.text)
            elif request.model == "merged" and previous_step is not None:
                model = load_merged_model(previous_step, step, placement, folder, key_map, opts.shard_bytes)
                what = f"the merged model of step {step}"
            else:
                raise ContMergeError(f"internal: calibration on the {request.model!r} model is not provided by this calibrator.")
            inputs = input_device(model, self.device)
            if not placement:
                model.to(self.device)
            logger.info(f"step {step}: Fisher ({request.fisher}) of {what} on {data.rows} samples of {spec.text!r}")
            fisher = diagonal_fisher(model, data.batches, request.fisher, inputs, offload_dir=scratch / f"{request.statistic}-acc")
            by_output = output_names(model, fisher, key_map)
            del model, fisher
            shutil.rmtree(folder, ignore_errors=True)  # a model written for the device map: not needed any more
            if not by_output:
                raise ContMergeError(f"step {step}: the Fisher of {item.spec.text!r} covers none of the merged tensors; its "
                                     "parameters could not be matched to the base's file names.")
            tensors[request.statistic] = _write(scratch / request.statistic, by_output, opts.shard_bytes)
            del by_output
            shutil.rmtree(scratch / f"{request.statistic}-acc", ignore_errors=True)  # disk-offloaded accumulators
            record = {**data.describe(), "fisher": request.fisher, "batch_size": opts.calib_batch_size,
                      "max_length": opts.max_length, "seed": opts.seed}
        return Calibrated(tensors=tensors, scalars=scalars, record=record, keep=keep)

    def _check_cache(self, step: int, item: ResolvedSource, rows: int) -> None:
        """A learned merge's teacher outputs must fit their bound (``cache_bytes``): checked before any step."""
        from ..methods.registry import build_method
        from .learned import cache_bytes

        for request in build_method(self.options.method, self.options.params).calibration:
            if request.learn is None or not request.from_step <= step <= (request.to_step or step):
                continue
            need = cache_bytes(request.learn, item.config, rows)
            total = need * (len(self.specs) if request.learn.all_items else 1)
            if total > request.learn.cache_bytes:
                raise ContMergeError(
                    f"step {step}: the teachers' cached outputs would take {total / 1e9:.3g} GB (samples × continuation "
                    f"tokens × outputs, float32), above cache_bytes={request.learn.cache_bytes}. Lower --calib-samples or "
                    "gen_tokens, or raise --set cache_bytes=N. Nothing was written.")

    def _learn(self, spec, step: int, base: ResolvedSource, items: Sequence[tuple[int, ResolvedSource, Mapping[str, str]]],
               previous_step: Path | None, placement: Mapping[str, Any], scratch: Path, buffer: Path):
        """Learned coefficients (``calibration/learned.py``) over ``items`` (step, item, key map): the
        first alone, or every one for ``spec.all_items``, each on its own calibration data."""
        from .fisher import sample_alone
        from .learned import Models, Task, learn_coefficients

        opts = self.options
        tasks = []
        for s, item, key_map in items if spec.all_items else items[:1]:
            if s not in self.sets:
                self.prepare({s: item}, base)
            samples = [sample_alone(b, i) for b in self.sets[s].batches for i in range(next(iter(b.values())).shape[0])]
            old = self._old_heads(previous_step, base) if not spec.all_items else []
            identity = None
            if opts.cache_teachers:  # what the fine-tune's outputs depend on besides the samples: both models, where
                # they run (a local checkpoint's digest not known yet reads its tensors now: opt-in, for compare)
                identity = repr([base.fingerprint, item.fingerprint, str(self.device), sorted(map(str, placement.items()))])
            tasks.append(Task(partial(self._task_model, item, base, key_map, placement), item.checkpoint, key_map, samples, old,
                              identity))
        previous = Checkpoint.open(previous_step) if previous_step is not None else None
        buffer_in = previous_step / STATE_DIR / BUFFER if previous_step is not None else None
        models = Models(base.checkpoint, previous, lambda model: input_device(model, self.device), buffer_in, buffer)
        try:
            return learn_coefficients(spec, tasks, models, step=step, seed=opts.seed, scratch=scratch)
        finally:
            if previous is not None:
                previous.close()

    def _old_heads(self, previous_step: Path | None, base: ResolvedSource) -> list:
        """The heads the merge so far served (``task_heads/`` of the previous step), each as θ(t−1) with
        that head (a teacher) and as a loader of the anchor with it (a student). Classifier-sized: loaded
        whole on ``--device``."""
        from ..artifacts.heads import head_dir, task_model
        from ..artifacts.state import read_state
        from .learned import OldHead

        if previous_step is None:
            return []
        anchors = {"base": base.ensure_local(), "previous": previous_step}

        def load(backbone: Path, task: int):
            return task_model(backbone, head_dir(previous_step, task), task, {"dtype": torch.float32}).to(self.device)

        return [OldHead(h["task"], partial(load, previous_step, h["task"]),
                        lambda anchor, task=h["task"]: load(anchors[anchor], task))
                for h in read_state(previous_step).heads if head_dir(previous_step, h["task"]).is_dir()]

    def _task_model(self, item: ResolvedSource, base: ResolvedSource, key_map: Mapping[str, str], placement: Mapping[str, Any],
                    backbone: TensorIndex | None, folder: Path):
        """``item``'s task model (its own head), float32, with the merged tensors taken from ``backbone``
        (by output name; None: the item's own), placed as ``placement`` says or on ``--device``."""
        if backbone is None:
            model = load_item_model(item, base, placement, folder, self.options.shard_bytes)
        elif placement:
            ck = item.checkpoint
            sources = {k: (backbone, key_map[k]) if k in key_map else (ck, k) for k in ck.keys()}
            config = (base.ensure_local() if item.kind == "lora" else item.ensure_local()) / "config.json"
            model = _from_written(sources, config, folder, placement, self.options.shard_bytes)
        else:
            model = load_item_model(item, base)
            from ..sources.naming import file_layout

            to_file = file_layout(model).to_file
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if to_file.get(name) in key_map:
                        p.copy_(backbone.read(key_map[to_file[name]]))
        if not placement:
            model.to(self.device)
        return model

    def _placement(self) -> dict[str, Any]:
        """``from_pretrained``'s Accelerate arguments for ``--device-map`` (none without one)."""
        opts = self.options
        if not opts.device_map:
            return {}
        out: dict[str, Any] = {"device_map": opts.device_map_value()}
        if opts.max_memory:
            out["max_memory"] = opts.max_memory_value()
        if opts.offload_folder:
            out["offload_folder"] = str(opts.offload_folder)
        return out


def input_device(model, default: torch.device) -> torch.device:
    """Where a model's inputs go: the device of the first module of its device map, else ``default``."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return default
    first = next(iter(device_map.values()))
    return torch.device("cpu") if first in ("cpu", "disk") else torch.device(f"cuda:{first}" if isinstance(first, int) else first)


def make_calibrator(options: MergeOptions, datasets: Mapping[str, DataSpec] | None = None) -> DataCalibrator | None:
    """The calibrator a run of ``options`` needs: one when its method asks for calibration, else None.
    ``datasets``: in-memory data (``DataSpec.memory``) by the text ``options.data`` gives for it."""
    from ..engine.run import resolve_device
    from ..methods.registry import build_method

    if not build_method(options.method, options.params).calibration:
        return None
    return DataCalibrator(options, resolve_device(options.device), datasets)


def load_merged_model(folder: Path, step: int, placement: Mapping[str, Any], scratch: Path, key_map: Mapping[str, str],
                      shard_bytes: int):
    """The merged model of a (partial) step folder as the model of task ``step``: its backbone with that
    task's head when the head is kept apart, else the step's own model class; float32, placed as
    ``placement`` says. With a device map and a head, backbone and head are first written together
    under the task model's file names into ``scratch`` (``from_pretrained`` places what it loads)."""
    from ..artifacts.folder import load_step, load_task_model
    from ..artifacts.heads import head_dir

    heads = head_dir(folder, step)
    if not heads.is_dir():
        return load_step(folder, dtype=torch.float32, **placement)
    if not placement:
        return load_task_model(folder, step, dtype=torch.float32)
    to_item = {out: name for name, out in key_map.items()}
    backbone, head = Checkpoint.open(folder), Checkpoint.open(heads)
    sources = {to_item[k]: (backbone, k) for k in backbone.keys() if k in to_item}
    sources.update({k: (head, k) for k in head.keys()})
    return _from_written(sources, heads / "config.json", scratch, placement, shard_bytes)


def load_item_model(item: ResolvedSource, base: ResolvedSource, placement: Mapping[str, Any] | None = None,
                    scratch: Path | None = None, shard_bytes: int = 5 * 10**9):
    """The stream item as the model that scores its own task, float32 (placed as ``placement`` says; the
    caller moves an unplaced one). A LoRA adapter is merged onto the base: with PEFT in memory, or,
    under a device map, written as the merged tensors the engine reads (base + s·B@A) into ``scratch``."""
    placement = dict(placement or {})
    if item.kind == "lora":
        if placement:
            ck = item.checkpoint
            return _from_written({k: (ck, k) for k in ck.keys()}, base.ensure_local() / "config.json", scratch, placement,
                                 shard_bytes)
        from peft import PeftModel

        model = load_item_model(base, base)
        return PeftModel.from_pretrained(model, item.folder, is_trainable=False).merge_and_unload()
    return _load(item.ensure_local(), repr(item.spec.text), placement)


def _load(folder: Path, what: str, placement: Mapping[str, Any]):
    """The model class ``folder``'s config names, loaded float32 and placed (never remote code)."""
    from transformers import AutoConfig

    from ..sources.architecture import architecture_class

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    cls = architecture_class(config)
    if cls is None:
        raise ContMergeError(f"{what}: calibration needs the model class its config names "
                             f"({(config.architectures or ['none'])[0]}), which transformers does not have.")
    return cls.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False, **placement)


def _from_written(sources: Mapping[str, tuple[Any, str]], config: Path, folder: Path, placement: Mapping[str, Any],
                  shard_bytes: int):
    """Write ``sources`` (file name -> (checkpoint, its key)) with ``config`` into ``folder``, float tensors
    as float32, one tensor at a time; load that folder as its config's model class, placed."""
    folder.mkdir(parents=True)
    shutil.copyfile(config, folder / "config.json")
    specs = []
    for name, (ck, key) in sources.items():
        info = ck.info(key)
        specs.append(TensorSpec(name, info.shape, "F32" if info.is_float or info.dtype == "F32" else info.dtype))

    def tensor(spec: TensorSpec) -> torch.Tensor:
        ck, key = sources[spec.key]
        t = ck.read(key)
        return t.to(torch.float32) if spec.dtype == "F32" else t

    _write_tensors(folder, specs, tensor, shard_bytes)
    return _load(folder, str(config), placement)


def config_kind(config: Mapping[str, Any]) -> str:
    """``causal-lm``, ``image`` or ``text`` from a model's ``config.json`` (what the data is checked against)."""
    arch = (config.get("architectures") or [""])[0]
    if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        return "causal-lm"
    return "image" if "image_size" in config and "vocab_size" not in config else "text"


def output_names(model, fisher: Mapping[str, torch.Tensor], key_map: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """In-memory names -> the model's file names (``file_layout``) -> the output's names (``key_map``:
    the item's file key of every merged output tensor)."""
    from ..sources.naming import file_layout

    to_file = file_layout(model).to_file
    out = {}
    for name, value in fisher.items():
        file_key = to_file.get(name)
        if file_key in key_map and tuple(value.shape) != ():
            out[key_map[file_key]] = value.detach()  # where it accumulated: moved to the CPU one at a time by _write
    return out


def _write(folder: Path, tensors: dict[str, torch.Tensor], shard_bytes: int) -> Checkpoint:
    """Float32 statistics as safetensors (the streaming writer), opened as a checkpoint."""
    folder.mkdir(parents=True)

    def tensor(spec: TensorSpec) -> torch.Tensor:
        t = tensors[spec.key].to("cpu", torch.float32).contiguous()
        if not finite(t):
            raise ContMergeError(f"the Fisher of tensor {spec.key!r} is not finite: the model's outputs overflow on the "
                                 "calibration data. Check the data and the model.")
        return t

    _write_tensors(folder, [TensorSpec(k, tuple(t.shape), "F32") for k, t in tensors.items()], tensor, shard_bytes)
    return Checkpoint.open(folder)


def _write_tensors(folder: Path, specs: list[TensorSpec], tensor: Callable[[TensorSpec], torch.Tensor], shard_bytes: int) -> None:
    """``specs`` into ``folder`` as HF-named safetensors shards, one tensor (``tensor(spec)``) at a time."""
    writer = StreamingWriter.planned(folder, specs, plan_shards(specs, shard_bytes, "model"), "model")
    for spec in specs:
        writer.write(spec.key, tensor(spec))
    writer.close()
