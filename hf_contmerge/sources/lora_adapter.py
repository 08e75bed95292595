"""A PEFT LoRA adapter read as task vectors on the base model's **file** tensor names.

For a target module with LoRA factors ``lora_A`` (r x in) and ``lora_B`` (out x r), PEFT's merge
(``merge_and_unload``) adds

    ΔW = s · B @ A,   s = alpha / r   (or alpha / sqrt(r) with ``use_rslora``),

where ``r`` and ``alpha`` come from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches the
module name (PEFT's own ``peft.utils.other.get_pattern_key`` decides the match), else from ``r`` /
``lora_alpha``. :meth:`LoraAdapter.factors` returns ``(B', A', s)`` with ``ΔW_file = s · B' @ A'``
in the layout of the base **file** tensor:

- ``nn.Linear`` (file ``(out, in)``): ``B' = B``, ``A' = A``.
- transformers ``Conv1D`` (GPT-2, file ``(in, out)``): PEFT forces ``fan_in_fan_out=True`` for these
  and ``False`` for ``nn.Linear`` whatever the config says (``peft.tuners.lora.layer.dispatch_default``
  rewrites the flag per module), so the layout is decided from the module type, not the config flag:
  ``ΔW = (B @ A)ᵀ``, i.e. ``B' = Aᵀ`` (in x r), ``A' = Bᵀ`` (r x out).
- ``nn.Embedding`` (file ``(num_embeddings, dim)``): PEFT stores ``lora_embedding_A`` (r x num) and
  ``lora_embedding_B`` (dim x r) and adds ``(B @ A)ᵀ``: ``B' = Aᵀ``, ``A' = Bᵀ``.

Full tensors saved with the adapter (``modules_to_save``, and biases when ``bias`` is ``"all"`` or
``"lora_only"``) replace the base tensor: :meth:`LoraAdapter.replacement`.

When a target is an embedding-like layer, PEFT also saves a frozen copy of its base weight
(``<target>.base_layer.weight``, ``save_embedding_layers``) and loads it over the base. The delta is
applied to the base file tensor, which equals PEFT's merge when that copy equals the base;
:meth:`LoraAdapter.verify_base_copies` checks it (a pre-flight step: one tensor read per copy).

Adapter keys are accepted with or without the ``base_model.model.`` prefix, with or without the
adapter name (``lora_A.weight`` / ``lora_A.default.weight``), and with in-memory (transformers 5,
e.g. ViT ``vit.layers.0.attention.q_proj``) or file (``vit.encoder.layer.0.attention.attention.query``)
module names; :mod:`hf_contmerge.sources.naming` maps them to file keys. **[choice]** A name is first read
as an in-memory name (what PEFT under transformers 5 writes), then as a file name (adapters written
under transformers 4), each also with ``base_model_prefix`` added or removed (an adapter trained on
``LlamaModel`` applied to a ``LlamaForCausalLM`` base), as ``from_pretrained`` does for checkpoint keys.

Everything that would make ``ΔW ≠ s·B@A`` or that cannot be placed on a base file tensor is refused
with :class:`AdapterError` when the adapter is opened, before any tensor is merged: non-LoRA PEFT
types, DoRA, LoRA variants and options that change the merge (``lora_bias``, QALoRA, aLoRA, Arrow,
BD-LoRA, VeLoRA, MonteCLoRA, KaSA, ``layer_replication``, ``target_parameters``, trainable tokens,
options this module does not know), initialisations that rewrite the base weights (PiSSA, OLoRA,
CorDA, LoftQ, LoRA-GA: convert with ``path_initial_model_for_weight_conversion`` first), LoRA on
layer types other than Linear/Conv1D/Embedding (Conv1d/2d/3d, MultiheadAttention), targets the base
does not have, targets absent from the base files (a tied ``lm_head``) or fused into another file
tensor, factor shapes that do not fit the base tensor, and pickle files unless ``allow_pickle=True``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from ..errors import ContMergeError
from ..io import schemas
from ..io.checkpoint import load_pickle
from ..io.safetensors import read_header
from .naming import FileLayout, file_layout

__all__ = ["AdapterError", "LoraAdapter"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?$")

# Config options that do not change ΔW = s·B@A on the saved tensors (bookkeeping, target selection,
# training-time settings, initialisations that leave the base untouched once the factors are saved).
_NEUTRAL_OPTIONS = frozenset(
    {
        "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout",
        "fan_in_fan_out", "bias", "use_rslora", "modules_to_save", "init_lora_weights",
        "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "megatron_config",
        "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
        "qalora_group_size", "runtime_config", "ensure_weight_tying",
    }
)  # fmt: skip

# Options that, when set, change the merge or the model structure: why, for the message.
_REFUSED_OPTIONS = {
    "use_dora": "DoRA rescales each column by a learned magnitude, so ΔW is not s·B@A",
    "lora_bias": "the adapter also trains a bias inside lora_B",
    "use_qalora": "QALoRA pools the input before lora_A",
    "alora_invocation_tokens": "activated LoRA only acts after invocation tokens and cannot be merged",
    "arrow_config": "Arrow routes between several LoRA experts per input",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "velora_config": "VeLoRA is a different adapter variant",
    "monteclora_config": "MonteCLoRA is a different adapter variant",
    "kasa_config": "KaSA is a different adapter variant",
    "layer_replication": "layer replication changes the model structure",
    "target_parameters": "LoRA on raw parameters (e.g. MoE expert stacks) is not supported",
    "trainable_token_indices": "trainable-token deltas are not supported",
}

# init_lora_weights values whose training started from a modified base (W_res = W - s·B0@A0).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

LayerKind = Literal["linear", "conv1d", "embedding"]


class AdapterError(ContMergeError, ValueError):
    """An adapter that cannot be read as task vectors on the given base; the message says why and what to do."""


@dataclass(frozen=True)
class _Target:
    """One LoRA target: where its factors are stored and how they map onto the base file tensor."""

    file_key: str
    module: str  # the module name as the adapter spells it
    kind: LayerKind
    a_key: str
    b_key: str
    rank: int
    scaling: float


class _TensorStore:
    """Adapter tensors by key: lazily from a safetensors file (header read once), or an in-memory dict."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.path = path
        self._tensors = tensors
        if tensors is None:  # the header validated by the package's reader (a truncated file is refused clearly)
            self.shapes = {k: info.shape for k, info in read_header(path)[0].items()}
        else:
            self.shapes = {k: tuple(v.shape) for k, v in tensors.items()}

    def get(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key].clone()  # callers may modify what they get
        with safe_open(str(self.path), framework="pt") as handle:
            return handle.get_tensor(key)


class LoraAdapter:
    """A PEFT LoRA adapter as per-tensor task vectors on base file keys (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        config: Mapping[str, Any],
        store: _TensorStore,
        targets: dict[str, _Target],
        replacements: dict[str, str],
        base_copies: dict[str, str],
    ) -> None:
        self.path = path
        self.config = dict(config)
        self._store = store
        self._targets = targets
        self._replacements = replacements
        self._base_copies = base_copies

    @classmethod
    def from_dir(
        cls, path: str | Path, base_config: PretrainedConfig | FileLayout, allow_pickle: bool = False
    ) -> LoraAdapter:
        """Open the adapter folder ``path`` and check it against the base described by ``base_config``.

        ``base_config`` is the base model's config (its layout is built on the meta device and cached)
        or an already computed :class:`~hf_contmerge.naming.FileLayout`. Raises :class:`AdapterError`
        for every refused adapter (module docstring); nothing is merged before all checks pass.
        """
        path = Path(path)
        config = _read_config(path)
        _check_config(path, config)
        store = _open_tensors(path, allow_pickle)
        layout = base_config if isinstance(base_config, FileLayout) else file_layout(base_config)
        targets, replacements, base_copies = _AdapterReader(path, config, store, layout).read()
        return cls(path, config, store, targets, replacements, base_copies)

    def declared_base(self) -> str | None:
        """The ``base_model_name_or_path`` the adapter was trained on, as its config declares it."""
        return self.config.get("base_model_name_or_path") or None

    def target_file_keys(self) -> list[str]:
        """Base file keys that receive a low-rank delta, sorted."""
        return sorted(self._targets)

    def rank(self, file_key: str) -> int:
        """The LoRA rank r of the delta on ``file_key``."""
        return self._target(file_key).rank

    def factors(self, file_key: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(B, A, s)``, float32, with ``ΔW = s · B @ A`` in the base file tensor's layout.

        B is rows x r and A is r x cols of the base file tensor (so for Conv1D and embeddings they are
        PEFT's ``lora_A``ᵀ and ``lora_B``ᵀ).
        """
        target = self._target(file_key)
        lora_a = self._store.get(target.a_key).to(torch.float32)
        lora_b = self._store.get(target.b_key).to(torch.float32)
        if target.kind == "linear":
            return lora_b.contiguous(), lora_a.contiguous(), target.scaling
        # Conv1D and Embedding: PEFT adds (B @ A)ᵀ = Aᵀ @ Bᵀ.
        return lora_a.T.contiguous(), lora_b.T.contiguous(), target.scaling

    def delta(self, file_key: str) -> torch.Tensor:
        """The float32 task vector ``s · B @ A`` on ``file_key``, shaped like the base file tensor."""
        lora_b, lora_a, scaling = self.factors(file_key)
        return (lora_b @ lora_a).mul_(scaling)

    def replacement_keys(self) -> list[str]:
        """Base file keys that the adapter replaces with a full tensor (``modules_to_save``, trained biases)."""
        return sorted(self._replacements)

    def replacement_shape(self, file_key: str) -> tuple[int, ...]:
        """Shape of a replacement tensor, from the header (a task head may differ from the base's)."""
        return self._store.shapes[self._replacement_key(file_key)]

    def replacement(self, file_key: str) -> torch.Tensor:
        """The full float32 tensor that replaces the base tensor ``file_key``."""
        return self._store.get(self._replacement_key(file_key)).to(torch.float32)

    def base_copy_keys(self) -> list[str]:
        """Target file keys of which the adapter carries a frozen copy (PEFT's ``save_embedding_layers``)."""
        return sorted(self._base_copies)

    def verify_base_copies(self, read_base: Callable[[str], torch.Tensor]) -> None:
        """Check that each carried copy equals the base tensor ``read_base(file_key)``; raise AdapterError if not.

        The delta is added to the base file tensor, which is what PEFT's merge gives only when the copy
        it loads equals the base: a pre-flight check, one tensor read per copy (embeddings, lm_head).
        """
        for file_key, key in sorted(self._base_copies.items()):
            if not torch.equal(self._store.get(key).to(torch.float32), read_base(file_key).to(torch.float32)):
                raise AdapterError(
                    f"adapter {self.path} carries a copy of base tensor {file_key!r} that differs from the given "
                    "base: it was trained on another base (or one with edited embeddings). Pass the base it "
                    "declares, or merge it with PEFT (merge_and_unload) and stream the merged model instead."
                )

    def _target(self, file_key: str) -> _Target:
        if file_key not in self._targets:
            raise KeyError(f"{file_key!r} receives no LoRA delta from adapter {self.path}")
        return self._targets[file_key]

    def _replacement_key(self, file_key: str) -> str:
        if file_key not in self._replacements:
            raise KeyError(f"{file_key!r} is not replaced by adapter {self.path}")
        return self._replacements[file_key]


def _read_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json``, validated (``io/schemas.py``: r a positive integer, lora_alpha a finite number, …)."""
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterError(f"{path} is not a PEFT adapter folder: {CONFIG_NAME} is missing.")
    fix = "Save the adapter again with PEFT's save_pretrained."
    data = schemas.read_json(config_file, "adapter config", fix)
    schemas.validate(schemas.AdapterConfig, data, "adapter config", config_file, fix)
    return data


def _check_config(path: Path, config: Mapping[str, Any]) -> None:
    """Refuse every adapter configuration for which ΔW = s·B@A on the saved tensors does not hold."""
    where = f"adapter {path}"
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{where} is a {peft_type or 'untyped'} PEFT adapter; only LoRA adapters can be merged.")
    for option, reason in _REFUSED_OPTIONS.items():
        if config.get(option):
            raise AdapterError(
                f"{where} sets {option}={config[option]!r}: {reason}. Merge it into its base with PEFT "
                "(merge_and_unload, save_pretrained) and stream the merged model instead."
            )
    unknown = sorted(k for k, v in config.items() if k not in _NEUTRAL_OPTIONS and k not in _REFUSED_OPTIONS and v)
    if unknown:
        raise AdapterError(
            f"{where} sets options this version cannot verify ({', '.join(unknown)}); they may change how "
            "the adapter merges. Merge it with PEFT (merge_and_unload) and stream the merged model instead."
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterError(
            f"{where} was initialised with init_lora_weights={init!r}, which rewrites the base weights, so its "
            "factors are relative to a modified base. Save it with PEFT's save_pretrained("
            "path_initial_model_for_weight_conversion=...) to convert it to a plain LoRA first."
        )
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise AdapterError(f"{where} has bias={config.get('bias')!r}; expected 'none', 'all' or 'lora_only'.")


def _open_tensors(path: Path, allow_pickle: bool) -> _TensorStore:
    safetensors_file, pickle_file = path / SAFETENSORS_NAME, path / PICKLE_NAME
    if safetensors_file.is_file():
        return _TensorStore(safetensors_file)
    if not pickle_file.is_file():
        raise AdapterError(f"adapter {path} holds neither {SAFETENSORS_NAME} nor {PICKLE_NAME}.")
    if not allow_pickle:
        raise AdapterError(
            f"adapter {path} is stored as a pickle ({PICKLE_NAME}), which can run code when loaded. Convert it "
            "to safetensors, or pass allow_pickle=True (CLI: --allow-pickle) if you trust its source."
        )
    # weights_only=True still refuses arbitrary objects: an adapter file holds only tensors.
    return _TensorStore(pickle_file, load_pickle(pickle_file, mmap=False))


class _AdapterReader:
    """Sorts the adapter's tensors into LoRA targets and full replacements on base file keys."""

    def __init__(self, path: Path, config: Mapping[str, Any], store: _TensorStore, layout: FileLayout) -> None:
        self.path = path
        self.config = config
        self.store = store
        self.layout = layout

    def read(self) -> tuple[dict[str, _Target], dict[str, str], dict[str, str]]:
        """``(targets, replacements, base copies)``, each keyed by base file key."""
        factors: dict[str, dict[str, str]] = {}  # adapter module name -> part -> adapter key
        plain: list[tuple[str, str]] = []  # (module.param name, adapter key)
        adapter_names: set[str] = set()
        for key in self.store.shapes:
            name = key.removeprefix(PEFT_PREFIX)
            match = _LORA_KEY.match(name) or _EMBEDDING_KEY.match(name)
            if match:
                if match["adapter"]:
                    adapter_names.add(match["adapter"])
                factors.setdefault(match["module"], {})[match["part"]] = key
            elif ".lora_" in name:
                raise AdapterError(f"adapter {self.path} holds {key!r}, a LoRA tensor kind this merger cannot merge.")
            else:
                plain.append((name, key))
        if len(adapter_names) > 1:
            raise AdapterError(
                f"adapter {self.path} holds several adapters ({', '.join(sorted(adapter_names))}); save each one "
                "to its own folder with PEFT and stream them separately."
            )
        targets = self._targets(factors)
        copies = [(n, k) for n, k in plain if self._is_base_copy(n, factors)]
        full = [(_strip_wrappers(n), k) for n, k in plain if not self._is_base_copy(n, factors)]
        return targets, self._replacements(full, targets), self._base_copies(copies, targets)

    @staticmethod
    def _is_base_copy(name: str, factors: Mapping[str, object]) -> bool:
        """``<target>.base_layer.weight``: PEFT's frozen copy of a targeted embedding-like layer."""
        module, _, param = name.rpartition(".")
        return param == "weight" and module.endswith(".base_layer") and module.removesuffix(".base_layer") in factors

    def _base_copies(self, copies: list[tuple[str, str]], targets: Mapping[str, _Target]) -> dict[str, str]:
        by_module = {target.module: file_key for file_key, target in targets.items()}
        found: dict[str, str] = {}
        for name, key in copies:
            file_key = by_module[name.removesuffix(".base_layer.weight")]
            if self.store.shapes[key] != self.layout.file_shapes[file_key]:
                raise AdapterError(
                    f"adapter {self.path} carries a copy of base tensor {file_key!r} of shape {self.store.shapes[key]} "
                    f"where the base has {self.layout.file_shapes[file_key]}: the vocabulary was resized or the base "
                    "differs. Merge it with PEFT (merge_and_unload) and stream the merged model instead."
                )
            found[file_key] = key
        return found

    def _targets(self, factors: dict[str, dict[str, str]]) -> dict[str, _Target]:
        targets: dict[str, _Target] = {}
        for module, parts in sorted(factors.items()):
            target = self._target(module, parts)
            if target.file_key in targets:
                raise AdapterError(
                    f"adapter {self.path} targets base tensor {target.file_key!r} twice (under two names)."
                )
            targets[target.file_key] = target
        return targets

    def _target(self, module: str, parts: dict[str, str]) -> _Target:
        memory_key = self._memory_key(f"{module}.weight", what=f"LoRA target module {module!r}")
        file_key = self.layout.to_file[memory_key]
        kind = self._kind(module, memory_key)
        a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A", "lora_B")
        if set(parts) != {a_part, b_part}:
            raise AdapterError(
                f"adapter {self.path}: module {module!r} is a {kind} layer in the base, but the adapter holds "
                f"{sorted(parts)} for it instead of {a_part} and {b_part}; it was trained on another base."
            )
        a_key, b_key = parts[a_part], parts[b_part]
        rank = self._check_shapes(module, kind, file_key, a_key, b_key)
        return _Target(file_key, module, kind, a_key, b_key, rank, self._scaling(module, rank))

    def _kind(self, module: str, memory_key: str) -> LayerKind:
        module_type = self.layout.module_types[memory_key.rsplit(".", 1)[0]]
        if issubclass(module_type, Conv1D):
            return "conv1d"
        if issubclass(module_type, nn.Embedding):
            return "embedding"
        if issubclass(module_type, nn.Linear):
            return "linear"
        raise AdapterError(
            f"adapter {self.path} puts LoRA on {module!r}, a {module_type.__name__} layer; only LoRA on Linear, "
            "Conv1D and Embedding layers is supported. Merge it with PEFT (merge_and_unload) and stream the "
            "merged model instead."
        )

    def _check_shapes(self, module: str, kind: LayerKind, file_key: str, a_key: str, b_key: str) -> int:
        """Check the factors against the base tensor; return the rank r."""
        base_shape = self.layout.file_shapes[file_key]
        rows, cols = base_shape  # linear (out, in); conv1d (in, out); embedding (num, dim)
        a_shape, b_shape = self.store.shapes[a_key], self.store.shapes[b_key]
        rank = a_shape[0] if a_shape else -1
        b_rows, a_cols = (rows, cols) if kind == "linear" else (cols, rows)
        if a_shape != (rank, a_cols) or b_shape != (b_rows, rank):
            raise AdapterError(
                f"adapter {self.path}: LoRA factors of {module!r} have shapes A {a_shape} and B {b_shape}, which do "
                f"not fit base tensor {file_key!r} of shape {base_shape}: the adapter was trained on a different "
                "base model. Check its base_model_name_or_path and pass the matching base."
            )
        return rank

    def _scaling(self, module: str, rank: int) -> float:
        """s = alpha / r (alpha / sqrt(r) with rslora); r, alpha from PEFT's pattern rules on the module name."""
        rank_pattern = self.config.get("rank_pattern") or {}
        alpha_pattern = self.config.get("alpha_pattern") or {}
        declared_rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), self.config.get("r", 8))
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), self.config.get("lora_alpha", 8))
        if declared_rank != rank:
            raise AdapterError(
                f"adapter {self.path}: module {module!r} has rank {rank} in the weights but {declared_rank} in "
                f"{CONFIG_NAME} (r / rank_pattern); the folder mixes files from different adapters."
            )
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def _replacements(self, plain: list[tuple[str, str]], targets: Mapping[str, _Target]) -> dict[str, str]:
        replacements: dict[str, str] = {}
        for name, key in plain:
            if not self._is_declared_full_tensor(name):
                raise AdapterError(
                    f"adapter {self.path} holds {key!r}, which is neither a LoRA factor nor part of "
                    "modules_to_save or a trained bias (PEFT also saves whole embedding layers when the vocabulary "
                    "was resized); it cannot be merged. Merge it with PEFT (merge_and_unload) and stream the merged "
                    "model instead."
                )
            file_key = self.layout.to_file[self._memory_key(name, what=f"full tensor {name!r}")]
            if file_key in targets or file_key in replacements:
                raise AdapterError(f"adapter {self.path} both replaces and updates base tensor {file_key!r}.")
            replacements[file_key] = key
        return replacements

    def _is_declared_full_tensor(self, name: str) -> bool:
        """PEFT's own rules: modules_to_save matches by name suffix; bias='all'/'lora_only' saves biases."""
        module, _, param = name.rpartition(".")
        modules_to_save = self.config.get("modules_to_save") or []
        if any(module.endswith(entry) for entry in modules_to_save):
            return True
        return param == "bias" and self.config.get("bias", "none") != "none"

    def _memory_key(self, name: str, what: str) -> str:
        """The base in-memory key ``name`` stands for (module docstring: order of interpretations)."""
        layout = self.layout
        for candidate in _prefix_variants(name, layout.base_model_prefix):
            if candidate in layout.to_file or candidate in layout.tied or candidate in layout.fused_memory_keys:
                return self._written(candidate, what)
        for candidate in _prefix_variants(name, layout.base_model_prefix):
            if candidate in layout.to_memory:
                return layout.to_memory[candidate]
        raise AdapterError(
            f"adapter {self.path}: {what} does not exist in the base model ({name!r} is neither an in-memory nor "
            "a file tensor name of the base): the adapter was trained on a different base. Check its "
            "base_model_name_or_path and pass the matching base."
        )

    def _written(self, memory_key: str, what: str) -> str:
        """``memory_key`` itself if the base files hold it 1:1; refuse tied and fused tensors."""
        if memory_key in self.layout.tied:
            raise AdapterError(
                f"adapter {self.path}: {what} acts on {memory_key!r}, which is tied to "
                f"{self.layout.tied[memory_key]!r} and not stored in the base files; merging it would also change "
                "the tensor it is tied to. Merge it with PEFT (merge_and_unload) and stream the merged model instead."
            )
        if memory_key in self.layout.fused_memory_keys:
            raise AdapterError(
                f"adapter {self.path}: {what} acts on {memory_key!r}, which the base files store fused with other "
                "tensors. Merge it with PEFT (merge_and_unload) and stream the merged model instead."
            )
        return memory_key


def _strip_wrappers(name: str) -> str:
    """PEFT wrapper segments out of a saved full-tensor name: ``x.base_layer.bias`` -> ``x.bias``,
    ``x.modules_to_save.<adapter>.weight`` -> ``x.weight``."""
    parts = name.split(".")
    out: list[str] = []
    skip_next = False
    for part in parts:
        if skip_next:
            skip_next = False
        elif part == "modules_to_save":
            skip_next = True
        elif part != "base_layer":
            out.append(part)
    return ".".join(out)


def _prefix_variants(name: str, prefix: str) -> list[str]:
    """``name`` as is, then with the base-model prefix added or removed (e.g. ``model.``)."""
    if not prefix:
        return [name]
    head = f"{prefix}."
    return [name, name.removeprefix(head) if name.startswith(head) else head + name]
