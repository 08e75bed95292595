"""Publishing a step that stayed low-rank as a PEFT LoRA adapter (``--output-format adapter``).

A continual merge of LoRA adapters through a method with a low-rank form (OPCM) keeps every linear
weight's merged task vector as factors ``L @ R``; the merged model is ``base + L @ R`` there and the
base everywhere else, except tensors some adapter replaced or changed densely (``modules_to_save``,
embedding LoRA, a linear weight whose factors stopped being smaller). Such a step is published as:

- ``adapter_model.safetensors``: per factored linear weight ``lora_A`` (q x in) and ``lora_B``
  (out x q) with ``B @ A`` equal to the merged delta, balanced as ``B = U·√s``, ``A = √s·Vᵀ`` from
  the delta's SVD (transposed for ``Conv1D``, which PEFT handles with ``fan_in_fan_out``); the
  densely changed tensors in full, their modules listed in ``modules_to_save``. Keys are PEFT's
  (``base_model.model.<in-memory name>``), written by this package's append writer.
- ``adapter_config.json`` from ``peft.LoraConfig``: ``r`` the largest rank, ``rank_pattern`` for the
  others, ``lora_alpha``/``alpha_pattern`` equal to the ranks (scaling 1), ``target_modules`` the
  exact module names, ``base_model_name_or_path`` the base as given.

``--max-rank K`` truncates each delta to its best rank-K approximation (Eckart-Young) in the
published adapter only; the carried state stays exact, so later steps are unaffected. The dropped
part is reported per step: ``sqrt(Σ dropped energy / Σ energy)`` over all truncated weights (the
relative Frobenius error of the adapter's delta) and the largest per-weight relative error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ContMergeError
from ..methods.lowrank import LowRank
from .layout import ADAPTER_CONFIG

if TYPE_CHECKING:  # naming imports transformers' model classes: only when an adapter is written
    from ..sources.naming import FileLayout

PREFIX = "base_model.model."
TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSeq2SeqLM": "SEQ_2_SEQ_LM", "ForConditionalGeneration": "SEQ_2_SEQ_LM"}


def _module(memory_key: str) -> str:
    return memory_key.rsplit(".", 1)[0]


@dataclass(frozen=True)
class AdapterPlan:
    """What one step's adapter holds, planned before the step from the keys it may write."""

    layout: FileLayout
    lora_keys: frozenset[str]  # factored linear weights (file keys) published as lora_A / lora_B
    dense_keys: frozenset[str]  # file keys published in full (their modules in modules_to_save)
    max_rank: int | None

    @classmethod
    def plan(cls, layout: FileLayout, factored: set[str], touched: set[str], max_rank: int | None) -> AdapterPlan:
        """``factored``: keys carried as factors this step; ``touched``: keys some item so far changed.

        A factored linear weight is published as LoRA factors; any other touched key (dense, or a
        factored embedding) in full, and so is every factored key of a module that also has such a
        key (a module is either a LoRA target or saved whole in PEFT).
        """
        unknown = sorted(k for k in touched | factored if k not in layout.to_memory)
        if unknown:
            raise ContMergeError(
                f"--output-format adapter: tensor {unknown[0]!r} has no in-memory module name in the base "
                "architecture (a fused or renamed tensor), so it cannot be written as a PEFT adapter. Use --output-format full."
            )
        lora = {k for k in factored if k in layout.linear}  # PEFT's Linear/Conv1D LoRA; embeddings go in full
        dense = touched - lora
        saved = {_module(layout.to_memory[k]) for k in dense}
        moved = {k for k in lora if _module(layout.to_memory[k]) in saved}
        return cls(layout, frozenset(lora - moved), frozenset(dense | moved), max_rank)

    def names(self) -> list[str]:
        """Every tensor name the adapter file may hold (the append writer reserves its header for them)."""
        lora = [f"{PREFIX}{_module(self.layout.to_memory[k])}.lora_{ab}.weight" for k in sorted(self.lora_keys) for ab in "AB"]
        return lora + [PREFIX + self.layout.to_memory[k] for k in sorted(self.dense_keys)]

    def published_name(self, key: str) -> str | None:
        """The name ``key`` is published under: PEFT's name of a densely saved tensor; None for a LoRA
        target (published as factors) or a tensor the adapter leaves at the base."""
        return PREFIX + self.layout.to_memory[key] if key in self.dense_keys else None

    @property
    def modules_to_save(self) -> list[str]:
        return sorted({_module(self.layout.to_memory[k]) for k in self.dense_keys})


@dataclass
class AdapterExport:
    """The adapter being written in one step: its plan, and what the written factors add up to."""

    plan: AdapterPlan
    # weight key -> (its module and published rank, or None if its delta is zero; its energy; the energy dropped),
    # in the order the weights were written (plan order: the sums below do not depend on the number of ranks)
    parts: dict[str, tuple[tuple[str, int] | None, float, float]] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        """module -> published rank."""
        return dict(p[0] for p in self.parts.values() if p[0] is not None)

    @property
    def energy(self) -> float:
        return sum(p[1] for p in self.parts.values())

    @property
    def dropped(self) -> float:
        return sum(p[2] for p in self.parts.values())

    @property
    def worst(self) -> float:
        """The largest per-weight relative Frobenius error of the truncation."""
        return max((math.sqrt(d / e) for _, e, d in self.parts.values() if e > 0), default=0.0)

    def lora_tensors(self, key: str, delta: LowRank, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
        """``lora_A`` and ``lora_B`` of one factored weight (none if its delta is zero), truncation recorded."""
        max_rank, layout = self.plan.max_rank, self.plan.layout
        exact, _ = delta.compressed()
        energy = exact.norm_sq_of_svd_form()
        kept, dropped = exact.compressed(max_rank) if max_rank is not None and exact.rank > max_rank else (exact, 0.0)
        self.parts[key] = (None, energy, dropped)
        if kept.rank == 0:
            return []
        # balance the singular values over both factors (the same range in bf16/fp16)
        u, s, vh = kept.svd_of_svd_form()
        root = s.sqrt()
        left, right = u * root, vh * root[:, None]
        if layout.linear.get(key, False):  # Conv1D stores (in, out): PEFT adds (B @ A)ᵀ
            lora_b, lora_a = right.mT, left.mT
        else:
            lora_b, lora_a = left, right
        module = _module(layout.to_memory[key])
        self.parts[key] = ((module, left.shape[1]), energy, dropped)
        return [(f"{PREFIX}{module}.lora_A.weight", lora_a.contiguous().to(dtype)),
                (f"{PREFIX}{module}.lora_B.weight", lora_b.contiguous().to(dtype))]

    def summary(self) -> dict[str, Any]:
        """What the state and the card record about this adapter."""
        return {
            "format": "adapter",
            "rank": max(self.ranks.values(), default=0),
            "max_rank": self.plan.max_rank,
            "lora_modules": len(self.ranks),
            "modules_to_save": self.plan.modules_to_save,
            "truncation_relative_error": math.sqrt(self.dropped / self.energy) if self.energy > 0 else 0.0,
            "truncation_worst_weight": self.worst,
        }

    def write_config(self, folder: Path, base_config: dict[str, Any], base_source: str, base_revision: str | None) -> None:
        """``adapter_config.json`` through PEFT's own ``LoraConfig``."""
        from peft import LoraConfig

        r = max(self.ranks.values(), default=1)
        pattern = {m: q for m, q in self.ranks.items() if q != r}
        arch = (base_config.get("architectures") or [""])[0]
        task_type = next((t for suffix, t in TASK_TYPES.items() if arch.endswith(suffix)), None)
        config = LoraConfig(
            r=r,
            lora_alpha=r,
            rank_pattern=pattern,
            alpha_pattern=dict(pattern),
            target_modules=sorted(self.ranks) or None,
            modules_to_save=self.plan.modules_to_save or None,
            fan_in_fan_out=any(self.plan.layout.linear.get(k, False) for k in self.plan.lora_keys),
            lora_dropout=0.0,
            bias="none",
            task_type=task_type,
            base_model_name_or_path=base_source,
            revision=base_revision,
            inference_mode=True,
        )
        # written here rather than by ``config.save_pretrained``: PEFT turns target_modules into a set and
        # writes it in set order, which changes with the interpreter's hash seed (a step must not)
        values = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
        (folder / ADAPTER_CONFIG).write_text(json.dumps(values, indent=2, sort_keys=True))
