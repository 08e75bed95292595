"""Task heads: tensors that are not merged, kept per stream item in every step folder.

A classifier fine-tuned for one task (``classifier.weight`` of a ``BertForSequenceClassification``
over a bare ``BertModel`` base, or a 10-class head over a 1000-class one) has no counterpart to
merge with. Each step folder keeps every seen item's head in::

    task_heads/task-{i}/model.safetensors   the head tensors, under the item's own file names
    task_heads/task-{i}/config.json         the item's config (architecture, labels)

so that the merged backbone plus head ``i`` is the item's task model again:
``load_task_model(step_folder, i)`` (``folder.py``). Heads are small; they are carried from step to step, so the
stream items themselves are never needed again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import ContMergeError
from ..io.safetensors import write_small
from ..sources.architecture import architecture_class
from ..sources.resolve import ResolvedSource
from .layout import CONFIG, HEADS_DIR, WEIGHTS_PREFIX


def head_dir(step_folder: Path, task: int) -> Path:
    return Path(step_folder) / HEADS_DIR / f"task-{task}"


def copy_heads(previous_step: Path | None, target: Path) -> None:
    if previous_step is not None and (previous_step / HEADS_DIR).is_dir():
        shutil.copytree(previous_step / HEADS_DIR, target / HEADS_DIR, dirs_exist_ok=True)


def write_head(target: Path, task: int, item: ResolvedSource, keys: list[str]) -> dict:
    """Store ``keys`` of ``item`` as head ``task``; returns what the state records about it."""
    folder = head_dir(target, task)
    folder.mkdir(parents=True)
    tensors = {k: item.checkpoint.read(k) for k in keys}
    write_small(folder / f"{WEIGHTS_PREFIX}.safetensors", tensors)
    (folder / CONFIG).write_text(json.dumps(item.config, indent=2, sort_keys=True) + "\n")
    arch = (item.config.get("architectures") or [None])[0]
    return {"task": task, "source": item.spec.text, "architecture": arch, "keys": keys, "path": f"{HEADS_DIR}/task-{task}"}


def task_model(backbone: Path, folder: Path, task: int, from_pretrained_kwargs: dict):
    """Task ``task``'s architecture from ``folder`` (its head) over the merged weights in ``backbone``."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    arch, cls = (config.architectures or [None])[0], architecture_class(config)
    if cls is None:
        raise ContMergeError(f"Task head {task} declares architecture {arch!r}, which transformers does not have.")
    head = load_file(folder / f"{WEIGHTS_PREFIX}.safetensors")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is "newly initialised" until we load it below
    try:
        model = cls.from_pretrained(backbone, config=config, ignore_mismatched_sizes=True, **from_pretrained_kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    unknown = [k for k in head if k not in params]
    if unknown:
        raise ContMergeError(f"Task head {task} has tensors {unknown} that {arch} does not have.")
    with torch.no_grad():
        for k, v in head.items():
            params[k].copy_(v.to(params[k].dtype))
    return model
