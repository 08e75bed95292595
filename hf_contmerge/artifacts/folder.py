"""A step folder: assembled around the weights the engine wrote, read back, and loaded.

What the engine's step writer leaves in a partial step folder (weights, carried state tensors) is
completed here with the base's side files (config, generation config, tokenizer/processor files),
the task heads, ``contmerge_state.json`` and the card, before ``layout.publish`` renames it into
place. The same folder is read back by the next step (``open_slot``/``open_lowrank``), loaded as a
transformers model (``load_step``, ``load_task_model``), and given evaluation results
(``record_evaluation``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ContMergeError
from ..io.checkpoint import Checkpoint
from ..io.remote import SourceSpec
from ..sources.architecture import architecture_class
from ..sources.resolve import ResolvedSource
from .card import render_card
from .compact import CompactSlot, open_optional
from .heads import copy_heads, head_dir, task_model, write_head
from .layout import (
    ADAPTER_CONFIG,
    CARD,
    CONFIG,
    LOWRANK_PREFIX,
    MODEL_CONFIGS,
    SIDE_PATTERNS,
    SKIP_SIDE,
    STATE_DIR,
    STATE_FILE,
    safe_relative,
)
from .state import StepState, read_state, write_json_atomic

# ------------------------------------------------------------------ assembling a partial step


def copy_side_files(base_folder: Path, target: Path, dtype: str, adapter: bool = False) -> None:
    """Config, generation config, tokenizer/processor files (and small sub-configs) from the base.

    ``dtype`` other than ``auto`` is written into the copied ``config.json``. An adapter step takes
    the tokenizer/processor files only: a ``config.json`` beside ``adapter_config.json`` would make
    transformers read the folder as a full model."""
    for path in sorted(base_folder.rglob("*")):
        rel = path.relative_to(base_folder)
        if not path.is_file() or rel.parts[0].startswith(".") or rel.name in SKIP_SIDE:
            continue
        if not any(rel.match(p) for p in SIDE_PATTERNS) or (adapter and rel.name in MODEL_CONFIGS):
            continue
        dest = safe_relative(target, str(rel))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)  # follows Hub-cache symlinks: the step holds real files
    config = target / CONFIG
    if config.is_file() and dtype != "auto":
        data = json.loads(config.read_text())
        for key in ("torch_dtype", "dtype"):
            if key in data or key == "dtype":
                data[key] = dtype
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def carry_heads(target: Path, previous_step: Path | None, previous_heads: list[dict[str, Any]], step: int,
                item: ResolvedSource, head_keys: list[str]) -> list[dict[str, Any]]:
    """Every head seen so far into ``target`` (the previous step's, plus the new item's if it has one);
    what the state records about them."""
    copy_heads(previous_step, target)
    heads = list(previous_heads)
    if head_keys:
        heads.append(write_head(target, step, item, head_keys))
    return heads


def write_state_and_card(target: Path, state: StepState) -> None:
    (target / STATE_FILE).write_text(state.to_json())
    (target / CARD).write_text(render_card(state))


# ------------------------------------------------------------------ reading a step back


def open_slot(step_folder: Path, slot: str, weight_slot: str | None = None) -> CompactSlot:
    """The carried tensors of ``slot`` written with a step, float32 (``weight_slot``: the slot its
    state records as carried over the published weights; see ``compact.py``)."""
    return CompactSlot(Path(step_folder), slot, is_weight=slot == weight_slot)


def open_lowrank(step_folder: Path, slot: str) -> Checkpoint | None:
    """The factored tensors of ``slot`` (``KEY::left``, ``KEY::right``), or None if the step has none."""
    return open_optional(Path(step_folder) / STATE_DIR, LOWRANK_PREFIX + slot,
                         f"carried low-rank state {slot!r} of {step_folder}")


def record_evaluation(step_folder: Path, evaluation: dict[str, Any]) -> StepState:
    """Attach evaluation results to a complete step: rewrite its state and card atomically.

    ``evaluation``: ``{"description": str, "tasks": [names], "rows": [{"name", "scores", "mean"}],
    "metrics": {...}}``; scores are fractions in [0, 1] or None for tasks not yet seen.
    """
    state = read_state(step_folder)
    state.evaluation = evaluation
    write_json_atomic(Path(step_folder) / STATE_FILE, state.to_json())
    write_json_atomic(Path(step_folder) / CARD, render_card(state))
    return state


# ------------------------------------------------------------------ loading a step as a model


def load_step(folder: str | Path, **from_pretrained_kwargs: Any):
    """A step folder (or any HF folder) as the model class its config names (``AutoModel`` otherwise).

    A step published as a PEFT adapter (``--output-format adapter``) is loaded on the base it records
    (its local folder, or its Hub repo at the recorded commit) and merged with PEFT's
    ``merge_and_unload``, so the result is the same plain transformers model either way. Remote code
    runs only if the caller passes ``trust_remote_code=True``.
    """
    from transformers import AutoConfig, AutoModel

    folder = Path(folder) if Path(folder).is_dir() else folder
    if isinstance(folder, Path) and (folder / ADAPTER_CONFIG).is_file() and not (folder / CONFIG).is_file():
        from peft import PeftModel

        base = read_state(folder).base
        spec = SourceSpec.parse(base["source"])
        revision = {} if spec.is_local else {"revision": base.get("revision") or spec.revision}
        model = load_step(spec.location, **revision, **from_pretrained_kwargs)
        return PeftModel.from_pretrained(model, folder).merge_and_unload()
    trust = from_pretrained_kwargs.pop("trust_remote_code", False)  # never by default; never a prompt
    config = AutoConfig.from_pretrained(folder, revision=from_pretrained_kwargs.get("revision"), trust_remote_code=trust)
    cls = architecture_class(config)
    if cls is None:
        return AutoModel.from_pretrained(folder, trust_remote_code=trust, **from_pretrained_kwargs)
    return cls.from_pretrained(folder, **from_pretrained_kwargs)


def load_task_model(step_folder: str | Path, task: int, head: Path | None = None, **from_pretrained_kwargs):
    """The item-``task`` model: its architecture and head over the merged backbone of a step.

    Works on any step folder written by hf-contmerge (local path); an adapter step is merged onto its
    base first (a temporary copy of the backbone). ``head``: a head folder of the same layout from
    elsewhere (default: the step's own). Extra keyword arguments go to ``from_pretrained``.
    The head tensors must all be consumed, or an error says which were not.
    """
    step_folder = Path(step_folder)
    folder = Path(head) if head is not None else head_dir(step_folder, task)
    if not folder.is_dir():
        raise ContMergeError(f"{step_folder} has no task head {task} (looked in {folder}).")
    if (step_folder / ADAPTER_CONFIG).is_file() and not (step_folder / CONFIG).is_file():
        # an adapter step: merge it onto its base first (PEFT), then put the head on that backbone
        with tempfile.TemporaryDirectory(prefix="hf-contmerge-backbone-") as tmp:
            load_step(step_folder).save_pretrained(tmp)
            return task_model(Path(tmp), folder, task, from_pretrained_kwargs)
    return task_model(step_folder, folder, task, from_pretrained_kwargs)
