"""Continual merging inside training scripts: a ``transformers.TrainerCallback``.

    from hf_contmerge import ContinualMergeCallback

    merge = ContinualMergeCallback(base="path/or/org/base", out="runs/cl", method="became")
    for task in tasks:
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=task.num_labels)
        merge.load_merged(model)                     # θ(t−1), the merge so far (nothing before task 1)
        merge.next_task(task.name, data=task.texts)  # this task's calibration data (a Dataset or a spec)
        Trainer(model=model, args=args, train_dataset=task.train, callbacks=[merge]).train()
        # OUT/step-t is written, and `model` now holds θ(t) (with its own task head)

At the end of each training (``on_train_end``) the trained model θt is saved (safetensors) and
merged with the model the task started from, θ(t−1), by :class:`~hf_contmerge.api.ContinualMerger`:
the same pre-flight, engine, step folder, state and card as ``hf-contmerge merge``, so a run can be
continued from the CLI and the CLI over the saved fine-tunes gives the same steps (tested). Then the
merged weights are copied back into the model, so the next task trains from θ(t). BECAME is the
default, as in its paper (the merge sits between tasks of one training run); any registered method
can be named. Heads the pre-flight keeps apart (a new classifier per task) stay the model's own.

Choices:

- The merge's base is the model training started from (``base``), as for the CLI: task arithmetic
  and friends take task vectors against it, BECAME and Fisher merge θt with θ(t−1).
- The trained model is saved to ``finetunes/task-{t}-{name}`` (default ``OUT-finetunes``, beside
  ``OUT``: the output folder holds steps only) and
  deleted once merged unless ``keep_finetunes=True``; the state and card name that folder as the
  item, so a kept folder lets anyone redo the step with the CLI.
- With several processes (DDP) the main process merges, the others wait at a barrier and then load
  the merged weights. Parameters sharded by DeepSpeed ZeRO-3 or FSDP are refused (the callback
  reads and writes whole tensors), and so are PEFT models: merge a LoRA run after training
  (``hf-contmerge merge`` takes adapters as stream items).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .api import ContinualMerger
from .artifacts import layout
from .artifacts.state import read_state
from .errors import ContMergeError
from .io.checkpoint import Checkpoint
from .io.schemas import read_json

DataArg = Any  # a datasets.Dataset, or a data spec as for --data (str / os.PathLike)


class ContinualMergeCallback(TrainerCallback):
    """Merge every finished training into a continual merge in ``out``, and load the result back.

    Keyword arguments beyond those named are :class:`~hf_contmerge.options.MergeOptions` fields, as for
    :class:`ContinualMerger` (``dtype``, ``push_to``, ``calib_samples``, ``device_map``, ``resume`` …).
    ``data``: the calibration data of each task in order (data-dependent methods), or give it per task
    with :meth:`next_task`.
    """

    def __init__(self, base: str | os.PathLike[str], out: str | os.PathLike[str], method: str = "became",
                 params: dict[str, Any] | None = None, *, data: Sequence[DataArg] | None = None,
                 finetunes: str | os.PathLike[str] | None = None, keep_finetunes: bool = False, load_back: bool = True,
                 **options: Any):
        self.merger = ContinualMerger(base=base, method=method, out=out, params=params, **options)
        self.data = list(data) if data is not None else None
        out = self.merger.options.out
        self.finetunes = Path(finetunes) if finetunes is not None else out.with_name(out.name + "-finetunes")
        self.keep_finetunes, self.load_back = keep_finetunes, load_back
        self._name: str | None = None
        self._task_data: DataArg | None = None

    # ------------------------------------------------------------------ what a script calls
    @property
    def steps(self) -> int:
        return self.merger.steps

    @property
    def last_step_folder(self) -> Path | None:
        return self.merger.last_step_folder

    def next_task(self, name: str | None = None, data: DataArg | None = None) -> None:
        """Name the next training's task (the saved fine-tune's folder) and give its calibration data."""
        self._name, self._task_data = name, data

    def load_merged(self, model: torch.nn.Module) -> torch.nn.Module:
        """Copy the latest step's merged weights into ``model`` (same base; its own head is kept). Before
        the first step: nothing to copy. Returns ``model``."""
        if self.last_step_folder is not None:
            copy_merged_weights(model, self.last_step_folder, self.merger.options.base)
        return model

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Refuse what the merge at the end could not take, before any training is spent."""
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise ContMergeError("ContinualMergeCallback reads and writes whole parameter tensors, and this Trainer shards "
                                 "them (DeepSpeed or FSDP). Train with plain data parallelism, or merge the saved fine-tunes "
                                 "with `hf-contmerge merge` afterwards.")
        if model is not None and hasattr(model, "peft_config"):
            raise ContMergeError("ContinualMergeCallback merges full models, and this one is a PEFT model. Merge LoRA "
                                 "adapters after training with `hf-contmerge merge` (it takes adapters as stream items).")
        if self.merger.method_needs_data and self._data_for(self.steps + 1) is None:
            raise ContMergeError(f"Method {self.merger.options.method!r} needs calibration data for task {self.steps + 1}: "
                                 "call next_task(name, data=...) before training (a Dataset or a data spec), or pass "
                                 "data=[...] to ContinualMergeCallback.")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ContMergeError("internal: the Trainer did not hand its model to ContinualMergeCallback.on_train_end.")
        from accelerate import PartialState

        ranks = PartialState()
        t = self.steps + 1
        if ranks.is_main_process:
            name = re.sub(r"[^\w.-]", "_", self._name) if self._name else None
            folder = self.finetunes / (f"task-{t}-{name}" if name else f"task-{t}")
            if folder.exists():
                raise ContMergeError(f"{folder} already exists; the trained model of task {t} would overwrite it. Move it "
                                     "away, or give ContinualMergeCallback another finetunes folder. Nothing was written.")
            model.save_pretrained(folder, safe_serialization=True)
            try:
                self.merger.step(folder, data=self._data_for(t))
            finally:
                if not self.keep_finetunes:
                    shutil.rmtree(folder, ignore_errors=True)
        ranks.wait_for_everyone()
        if not ranks.is_main_process:  # the main process merged: learn what it wrote
            self.merger.history = [s["source"] for s in read_state(layout.step_dir(self.merger.options.out, t)).stream]
        if self.load_back:
            self.load_merged(model)
        self._name, self._task_data = None, None

    def _data_for(self, task: int) -> DataArg | None:
        if self._task_data is not None:
            return self._task_data
        if self.data is not None and task <= len(self.data):
            return self.data[task - 1]
        return None


@torch.no_grad()
def copy_merged_weights(model: torch.nn.Module, step_folder: Path, base: str) -> list[str]:
    """Copy the merged tensors of ``step_folder`` into ``model``, tensor by tensor; returns the model's
    parameter names that were set. Names are matched as the pre-flight matches an item to the base
    (file names of the model's architecture, a ``base_model_prefix`` stripped or added); a tensor of
    another shape (a task head over the base's) is the model's own and is left alone."""
    from .sources.preflight import model_names

    if (step_folder / layout.ADAPTER_CONFIG).is_file() and not (step_folder / layout.CONFIG).is_file():
        raise ContMergeError(f"{step_folder} is published as an adapter (--output-format adapter), so it holds no merged "
                             "weights to load into the model. Use --output-format full with ContinualMergeCallback.")
    with ExitStack() as stack:
        merged = Checkpoint.open(step_folder)
        stack.callback(merged.close)
        step_config = read_json(step_folder / layout.CONFIG, "the step's config.json", "the step folder is damaged: merge it again")
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        done = []
        for name, out_key in model_names(model, set(merged.keys()), [step_config]).items():
            target = tensors.get(name)
            if target is None or tuple(merged.info(out_key).shape) != tuple(target.shape):
                continue
            target.copy_(merged.read(out_key))
            done.append(name)
    if not done:
        raise ContMergeError(f"None of the model's tensors matches the merged weights in {step_folder} (base {base!r}): "
                             "the model is not of that base.")
    return done
