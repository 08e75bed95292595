"""One explicit map between in-memory parameter names and on-disk (file) tensor names.

transformers 5 renames some modules in memory: a ViT checkpoint stores
``vit.encoder.layer.0.attention.attention.query.weight`` while ``model.state_dict()`` calls the same
tensor ``vit.layers.0.attention.q_proj.weight``; ``from_pretrained`` converts file -> memory and
``save_pretrained`` converts back. The merge engine streams tensors by **file** name; anything that
builds a model (module types for OPCM, forward passes, PEFT target modules) uses **in-memory** names.

Nothing here is hand-written per architecture. :func:`file_layout` replays the naming half of
``PreTrainedModel.save_pretrained`` with transformers' own functions on a model whose tensors live
on the meta device (no weights are allocated or touched):

1. ``state_dict()`` minus ``_keys_to_ignore_on_save``;
2. ``transformers.modeling_utils.remove_tied_weights_from_state_dict`` (a tied ``lm_head.weight`` is
   not written; the tensor it shares is written once, under the name transformers keeps);
3. ``transformers.core_model_loading.revert_weight_conversion`` (the reversed ``WeightRenaming`` /
   ``WeightConverter`` list of ``transformers.conversion_mapping``, the one ``save_pretrained`` uses).

A pure renaming hands the very same tensor object through, so each in-memory key is paired with
its file key by object identity. A ``WeightConverter`` (e.g. DINOv2 with ``use_swiglu_ffn``:
in-memory ``mlp.gate_proj`` and ``mlp.up_proj`` are written concatenated as ``mlp.weights_in``)
produces new tensors: those file keys are reported as *fused* and have no 1:1 in-memory partner.

With transformers < 5 (no conversion machinery) the map is the identity and tied duplicates are
dropped by parameter identity, keeping the first name (the embedding), as those versions save.

Linear weights (METHODS.md): the 2-D ``weight`` of an ``nn.Linear`` or of a transformers ``Conv1D``
(GPT-2; stored transposed, shape ``(in, out)``), decided from module types, never from rank.
**[choice]** A file tensor shared by several modules (tied weights) counts as a linear weight only
if every module sharing it is ``nn.Linear``/``Conv1D``: a tied ``lm_head`` is absent from the file
and its partner ``embed_tokens.weight`` is an embedding, so neither is listed; an untied ``lm_head``
is listed. Fused file tensors are never listed (they are several linear maps concatenated, or
3-D expert stacks; OPCM then treats them as "other tensors").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import transformers
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .architecture import architecture_class

try:  # transformers >= 5: the functions save_pretrained itself calls
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict
except ImportError:  # transformers 4.x: no in-memory renaming exists
    revert_weight_conversion = None
    remove_tied_weights_from_state_dict = None

__all__ = [
    "FileLayout",
    "file_layout",
    "file_names_for",
    "linear_weight_file_keys",
    "linear_weight_layout",
    "meta_model",
    "transposed_linear_file_keys",
]

ModelOrConfig = PreTrainedModel | PretrainedConfig


def meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """Build the model of ``config`` with its parameters on the meta device (no memory, no init cost).

    The class is ``config.architectures[0]`` when transformers defines it (so task heads such as
    ``lm_head`` or ``classifier`` exist), else the ``AutoModel`` class of the config. Remote code is
    never trusted. **[choice]** ``torch.device("meta")`` rather than ``accelerate.init_empty_weights``:
    the latter re-registers parameters and so unties ``lm_head`` from ``embed_tokens`` (checked with
    accelerate 1.15), which would misreport what ``save_pretrained`` writes.
    """
    cls = architecture_class(config)
    with torch.device("meta"):
        if cls is not None:
            return cls._from_config(config)
        return AutoModel.from_config(config, trust_remote_code=False)


@dataclass(frozen=True)
class FileLayout:
    """How one architecture's in-memory tensors are written to disk by ``save_pretrained``.

    Attributes:
        to_file: in-memory state_dict key -> file key, for every tensor written 1:1 (renamed or not).
        to_memory: the inverse of ``to_file``.
        file_shapes: every file key ``save_pretrained`` writes -> its shape (fused keys included).
        tied: in-memory keys that are not written because they alias another tensor -> the
            in-memory key that is written in their place.
        fused_file_keys: file keys written by a non-renaming conversion (no 1:1 in-memory partner).
        fused_memory_keys: in-memory keys consumed by those conversions.
        module_types: in-memory module path -> module class, for every module owning a parameter.
        linear: file key -> ``True`` if stored transposed (``Conv1D``, ``(in, out)``) else ``False``
            (``nn.Linear``, ``(out, in)``), for the linear weights defined in the module docstring.
        base_model_prefix: the model's ``base_model_prefix`` (e.g. ``"model"``, ``"vit"``).
    """

    to_file: Mapping[str, str]
    to_memory: Mapping[str, str]
    file_shapes: Mapping[str, tuple[int, ...]]
    tied: Mapping[str, str]
    fused_file_keys: frozenset[str]
    fused_memory_keys: frozenset[str]
    module_types: Mapping[str, type[nn.Module]]
    linear: Mapping[str, bool]
    base_model_prefix: str


def _saved_state_dict(model: PreTrainedModel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Meta stand-ins of what save_pretrained writes before renaming, and the tied keys it drops.

    Returns ``(state, tied)``: ``state`` in-memory key -> meta tensor (one fresh object per key, so
    identity tracks a key through renamings); ``tied`` dropped key -> the kept key it aliases.
    """
    full = {k: v.to("meta") for k, v in model.state_dict().items()}
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        full.pop(key, None)
    if remove_tied_weights_from_state_dict is not None:
        kept = remove_tied_weights_from_state_dict(dict(full), model)
    else:
        kept = _first_name_per_tensor(model, full)
    owner = {id(model.get_parameter_or_buffer(k)): k for k in kept}
    tied = {k: owner[id(model.get_parameter_or_buffer(k))] for k in full if k not in kept}
    return kept, tied


def _first_name_per_tensor(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 4.x fallback: keep the first name of each shared parameter object."""
    seen: set[int] = set()
    kept = {}
    for key, value in state.items():
        ident = id(model.get_parameter_or_buffer(key))
        if ident not in seen:
            seen.add(ident)
            kept[key] = value
    return kept


def _linear_layout(
    model: PreTrainedModel, to_file: Mapping[str, str], tied: Mapping[str, str]
) -> dict[str, bool]:
    """File key -> transposed flag for the weights of nn.Linear / Conv1D modules (see module docstring)."""
    kinds: dict[str, set[str]] = {}  # kept in-memory key -> kinds of every module sharing the tensor
    for path, module in model.named_modules(remove_duplicate=False):
        if module._parameters.get("weight") is None:
            continue
        key = f"{path}.weight" if path else "weight"
        kept = tied.get(key, key)
        if isinstance(module, Conv1D):
            kind = "conv1d"
        elif isinstance(module, nn.Linear):
            kind = "linear"
        else:
            kind = "other"
        kinds.setdefault(kept, set()).add(kind)
    return {
        to_file[key]: found == {"conv1d"}
        for key, found in kinds.items()
        if key in to_file and found in ({"linear"}, {"conv1d"})
    }


def _layout_of_model(model: PreTrainedModel) -> FileLayout:
    state, tied = _saved_state_dict(model)
    name_of = {id(tensor): key for key, tensor in state.items()}
    written = revert_weight_conversion(model, dict(state)) if revert_weight_conversion else dict(state)
    to_file = {name_of[id(t)]: file_key for file_key, t in written.items() if id(t) in name_of}
    fused_file = frozenset(k for k, t in written.items() if id(t) not in name_of)
    fused_memory = frozenset(set(state) - set(to_file))
    module_types = {
        path: type(module)
        for path, module in model.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    }
    return FileLayout(
        to_file=MappingProxyType(to_file),
        to_memory=MappingProxyType({v: k for k, v in to_file.items()}),
        file_shapes=MappingProxyType({k: tuple(t.shape) for k, t in written.items()}),
        tied=MappingProxyType(tied),
        fused_file_keys=fused_file,
        fused_memory_keys=fused_memory,
        module_types=MappingProxyType(module_types),
        linear=MappingProxyType(_linear_layout(model, to_file, tied)),
        base_model_prefix=model.base_model_prefix or "",
    )


_CACHE_SIZE = 8
_layout_cache: dict[str, FileLayout] = {}


def _layout_of_config(config: PretrainedConfig) -> FileLayout:
    """Layout of a config's meta model, cached by the config's full JSON text (a few entries, FIFO)."""
    key = f"{type(config).__qualname__}:{config.to_json_string(use_diff=False)}"
    if key not in _layout_cache:
        if len(_layout_cache) >= _CACHE_SIZE:
            _layout_cache.pop(next(iter(_layout_cache)))
        _layout_cache[key] = _layout_of_model(meta_model(config))
    return _layout_cache[key]


def config_from_dict(values: Mapping[str, object]) -> PretrainedConfig:
    """A transformers config from a ``config.json`` mapping (no remote code)."""
    values = dict(values)
    return transformers.AutoConfig.for_model(values.pop("model_type"), **values)


def file_layout(model_or_config: ModelOrConfig) -> FileLayout:
    """The :class:`FileLayout` of a model (any device) or of a config (built on the meta device).

    Layouts of configs are cached by their JSON text, so a stream of adapters on one base builds the
    meta model once. A model passed in is used as is: if it came from ``from_pretrained``, the
    conversions recorded at load time (``model._weight_conversions``) are the ones reverted, exactly
    as its ``save_pretrained`` would.
    """
    if isinstance(model_or_config, PreTrainedModel):
        return _layout_of_model(model_or_config)
    if isinstance(model_or_config, PretrainedConfig):
        return _layout_of_config(model_or_config)
    raise TypeError(f"expected a transformers PreTrainedModel or PretrainedConfig, got {type(model_or_config)!r}")


def file_names_for(model_or_config: ModelOrConfig) -> dict[str, str]:
    """In-memory state_dict key -> file key as ``save_pretrained`` writes it.

    Identity for most architectures; ViT/DINOv2 differ in transformers 5. Keys that are not written
    (tied duplicates, ``_keys_to_ignore_on_save``) or that are fused into another file tensor by a
    conversion are absent: see :func:`file_layout` for those.
    """
    return dict(file_layout(model_or_config).to_file)


def linear_weight_layout(model_or_config: ModelOrConfig) -> dict[str, bool]:
    """File keys of linear weights -> ``True`` when stored transposed (``Conv1D``: ``(in, out)``)."""
    return dict(file_layout(model_or_config).linear)


def linear_weight_file_keys(model_or_config: ModelOrConfig) -> set[str]:
    """File keys of the 2-D weights of ``nn.Linear`` and ``Conv1D`` modules (tied rule: module docstring)."""
    return set(file_layout(model_or_config).linear)


def transposed_linear_file_keys(model_or_config: ModelOrConfig) -> set[str]:
    """The linear weights stored transposed, ``(in, out)``: those of transformers ``Conv1D`` modules."""
    return {key for key, transposed in file_layout(model_or_config).linear.items() if transposed}
