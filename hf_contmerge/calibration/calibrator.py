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
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..engine.calibration import Calibrated
from ..errors import ContMergeError
from ..io.checkpoint import Checkpoint
from ..io.safetensors import TensorSpec
from ..io.writer import StreamingWriter, plan_shards
from ..methods.base import CalibrationRequest
from ..options import MergeOptions
from ..sources.resolve import ResolvedSource
from .data import CalibrationSet, DataSpec, load_calibration
from .fisher import diagonal_fisher

logger = logging.getLogger(__name__)


class DataCalibrator:
    """Fisher statistics of each stream item on its own calibration data (``--data``)."""

    def __init__(self, options: MergeOptions, device: torch.device):
        self.options, self.device = options, device
        if not options.data:
            raise ContMergeError(f"Method {options.method!r} needs calibration data: give one --data SPEC per --stream item "
                                 "(a dataset folder, data files, or a Hub dataset; see --help).")
        # every spec checked before any work ("" stands for an item merged earlier, whose data is not read again)
        self.specs = [DataSpec.parse(text) if text else None for text in options.data]
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

    def calibrate(self, step: int, requests: tuple[CalibrationRequest, ...], *, base: ResolvedSource, item: ResolvedSource,
                  previous_step: Path | None, key_map: Mapping[str, str], scratch: Path) -> Calibrated:
        opts = self.options
        if step not in self.sets:
            self.prepare({step: item}, base)
        data, spec = self.sets[step], self.specs[step - 1]
        tensors, record = {}, {}
        for request in requests:
            if request.model == "item":
                model, what = load_item_model(item, base), repr(item.spec.text)
            elif request.model == "merged" and previous_step is not None:
                model, what = load_merged_model(previous_step, step), f"the merged model of step {step}"
            else:
                raise ContMergeError(f"internal: calibration on the {request.model!r} model is not provided by this calibrator.")
            model.to(self.device)
            logger.info(f"step {step}: Fisher ({request.fisher}) of {what} on {data.rows} samples of {spec.text!r}")
            fisher = diagonal_fisher(model, data.batches, request.fisher, self.device)
            by_output = output_names(model, fisher, key_map)
            del model, fisher
            if not by_output:
                raise ContMergeError(f"step {step}: the Fisher of {item.spec.text!r} covers none of the merged tensors; its "
                                     "parameters could not be matched to the base's file names.")
            tensors[request.statistic] = _write(scratch / request.statistic, by_output, opts.shard_bytes)
            record = {**data.describe(), "fisher": request.fisher, "batch_size": opts.calib_batch_size,
                      "max_length": opts.max_length, "seed": opts.seed}
        return Calibrated(tensors=tensors, record=record)


def make_calibrator(options: MergeOptions) -> DataCalibrator | None:
    """The calibrator a run of ``options`` needs: one when its method asks for calibration, else None."""
    from ..engine.run import resolve_device
    from ..methods.registry import build_method

    if not build_method(options.method, options.params).calibration:
        return None
    return DataCalibrator(options, resolve_device(options.device))


def load_merged_model(folder: Path, step: int):
    """The merged model of a (partial) step folder as the model of task ``step``: its backbone with that
    task's head when the head is kept apart, else the step's own model class; float32."""
    from ..artifacts.folder import load_step, load_task_model
    from ..artifacts.heads import head_dir

    if head_dir(folder, step).is_dir():
        return load_task_model(folder, step, dtype=torch.float32)
    return load_step(folder, dtype=torch.float32)


def load_item_model(item: ResolvedSource, base: ResolvedSource):
    """The stream item as the model that scores its own task, float32, on the CPU (the caller moves it)."""
    from transformers import AutoConfig

    from ..sources.architecture import architecture_class

    if item.kind == "lora":
        from peft import PeftModel

        model = load_item_model(base, base)
        return PeftModel.from_pretrained(model, item.folder, is_trainable=False).merge_and_unload()
    folder = item.ensure_local()
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    cls = architecture_class(config)
    if cls is None:
        raise ContMergeError(f"{item.spec.text!r}: calibration needs the model class its config names "
                             f"({(config.architectures or ['none'])[0]}), which transformers does not have.")
    return cls.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)


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
            out[key_map[file_key]] = value.detach().to("cpu", torch.float32).contiguous()
    return out


def _write(folder: Path, tensors: dict[str, torch.Tensor], shard_bytes: int) -> Checkpoint:
    """Float32 statistics as safetensors (the streaming writer), opened as a checkpoint."""
    folder.mkdir(parents=True)
    specs = [TensorSpec(k, tuple(t.shape), "F32") for k, t in tensors.items()]
    writer = StreamingWriter.planned(folder, specs, plan_shards(specs, shard_bytes, "model"), "model")
    for spec in specs:
        t = tensors[spec.key]
        if not math.isfinite(float(t.sum())):
            raise ContMergeError(f"the Fisher of tensor {spec.key!r} is not finite: the model's outputs overflow on the "
                                 "calibration data. Check the data and the model.")
        writer.write(spec.key, t)
    writer.close()
    return Checkpoint.open(folder)


