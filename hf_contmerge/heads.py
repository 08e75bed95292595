"""Task heads: tensors that are not merged, kept per stream item in every step folder.

A classifier fine-tuned for one task (``classifier.weight`` of a ``BertForSequenceClassification``
over a bare ``BertModel`` base, or a 10-class head over a 1000-class one) has no counterpart to
merge with. Each step folder keeps every seen item's head in::

    task_heads/task-{i}/model.safetensors   the head tensors, under the item's own file names
    task_heads/task-{i}/config.json         the item's config (architecture, labels)

so that the merged backbone plus head ``i`` is the item's task model again:
``load_task_model(step_folder, i)``. Heads are small; they are carried from step to step, so the
stream items themselves are never needed again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .errors import ContMergeError
from .safetensors_io import write_small
from .sources import ResolvedSource

HEADS_DIR = "task_heads"


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
    write_small(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(item.config, indent=2, sort_keys=True) + "\n")
    arch = (item.config.get("architectures") or [None])[0]
    return {"task": task, "source": item.spec.text, "architecture": arch, "keys": keys, "path": f"{HEADS_DIR}/task-{task}"}


def load_task_model(step_folder: str | Path, task: int, **from_pretrained_kwargs):
    """The item-``task`` model: its architecture and head over the merged backbone of a step.

    Works on any step folder written by hf-contmerge (local path); an adapter step is merged onto its
    base first (a temporary copy of the backbone). Extra keyword arguments go to ``from_pretrained``.
    The head tensors must all be consumed, or an error says which were not.
    """
    step_folder = Path(step_folder)
    folder = head_dir(step_folder, task)
    if not folder.is_dir():
        raise ContMergeError(f"{step_folder} has no task head {task} (looked in {folder}).")
    if (step_folder / "adapter_config.json").is_file() and not (step_folder / "config.json").is_file():
        # an adapter step: merge it onto its base first (PEFT), then put the head on that backbone
        import tempfile

        from .api import load_step

        with tempfile.TemporaryDirectory(prefix="hf-contmerge-backbone-") as tmp:
            load_step(step_folder).save_pretrained(tmp)
            return _task_model(Path(tmp), folder, task, from_pretrained_kwargs)
    return _task_model(step_folder, folder, task, from_pretrained_kwargs)


def _task_model(backbone: Path, folder: Path, task: int, from_pretrained_kwargs: dict):
    """Task ``task``'s architecture from ``folder`` (its head) over the merged weights in ``backbone``."""
    import transformers
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(folder)
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ContMergeError(f"Task head {task} declares architecture {arch!r}, which transformers does not have.")
    from safetensors.torch import load_file

    head = load_file(folder / "model.safetensors")
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
