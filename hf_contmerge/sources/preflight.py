"""Pre-flight: decide, from headers alone, what every tensor of every step will be.

Runs before a byte is written, and refuses every mismatch there:

- **Alignment.** A stream item may wrap the base's backbone (``BertForSequenceClassification``
  keys ``bert.…`` over a bare ``BertModel`` base) or be bare over a wrapped base. The item's keys
  are mapped onto the base's file names by stripping or adding one prefix; candidates are the
  configs' ``base_model_prefix`` and the keys' first components, and the mapping that matches most
  keys wins.
- **Merged tensors** are the base's floating-point tensors. Integer buffers (``position_ids``) are
  copied from the base.
- **Task heads** are tensors an item has and the base does not, outside the backbone (e.g. a
  ``classifier``), or tensors outside the backbone whose shape differs from the base's. They are
  not merged: every step keeps each seen item's head under ``task_heads/`` (see ``artifacts/heads.py``).
- **Modules the item lacks altogether** (ViT classifiers have no ``pooler``) keep the base's values
  for that item (its task vector is zero there); this is reported and written in the card.
- **Refused:** a different ``model_type`` or vocabulary size, an item key inside the backbone that the
  base lacks, a base key missing from an item when the rest of its module is present, a shape
  mismatch inside the backbone, tied vs untied embeddings, non-float values for a float tensor.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import ContMergeError
from ..io.safetensors import itemsize
from .architecture import architecture_class
from .resolve import ResolvedSource

_PREFIX_CACHE: dict[str, str | None] = {}


def config_prefix(config: dict) -> str | None:
    """``base_model_prefix`` of the config's architecture, from transformers (no weights built)."""
    arch = (config.get("architectures") or [None])[0]
    key = f"{arch}|{config.get('model_type')}"
    if key not in _PREFIX_CACHE:
        prefix = None
        try:
            cls = architecture_class(config)
            if cls is None and config.get("model_type"):
                from transformers import AutoConfig, AutoModel

                cfg_cls = type(AutoConfig.for_model(config["model_type"]))
                cls = AutoModel._model_mapping.get(cfg_cls)
            prefix = getattr(cls, "base_model_prefix", None) or None
        except Exception:  # an architecture transformers does not know: fall back to key analysis
            prefix = None
        _PREFIX_CACHE[key] = prefix
    return _PREFIX_CACHE[key]


@dataclass(frozen=True)
class Alignment:
    """How one item's file names map onto the base's: ``mode`` is identity, strip or add ``prefix``."""

    mode: str  # "identity" | "strip" | "add"
    prefix: str | None

    def to_base(self, key: str) -> str | None:
        if self.mode == "strip":
            return key[len(self.prefix) + 1 :] if key.startswith(self.prefix + ".") else None
        if self.mode == "add":
            return f"{self.prefix}.{key}"
        return key

    def in_backbone(self, item_key: str, base_prefix: str | None) -> bool:
        """Whether an item key belongs to the shared backbone (so it must exist in the base)."""
        if self.mode == "add":
            return True
        p = self.prefix if self.mode == "strip" else base_prefix
        return bool(p) and item_key.startswith(p + ".")

    def describe(self) -> str:
        return {"identity": "same names", "strip": f"strips '{self.prefix}.'", "add": f"adds '{self.prefix}.'"}[self.mode]


def align(base_keys: set[str], item_keys: list[str], prefixes: Callable[[], set[str]]) -> Alignment:
    """The alignment matching most item keys; ``prefixes()`` (the configs' ``base_model_prefix``, which
    imports the model class: seconds) is asked only when some item key is not a base key as it stands."""
    best, best_hits = Alignment("identity", None), sum(k in base_keys for k in item_keys)
    if best_hits == len(item_keys):  # nothing can match more
        return best
    candidates = set(prefixes()) | {k.split(".", 1)[0] for k in item_keys if "." in k} | {k.split(".", 1)[0] for k in base_keys if "." in k}
    for p in sorted(candidates):
        for mode in ("strip", "add"):
            a = Alignment(mode, p)
            hits = sum(1 for k in item_keys if (m := a.to_base(k)) is not None and m in base_keys)
            if hits > best_hits:
                best, best_hits = a, hits
    return best


@dataclass
class KeyPlan:
    """One output tensor: its base name, and per stream item the item's name for it (None: absent)."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    merged: bool
    item_keys: list[str | None] = field(default_factory=list)


@dataclass
class ItemPlan:
    alignment: Alignment
    heads: list[str]  # item file names stored as this item's task head
    kept_modules: list[str]  # base modules this item lacks (task vector zero there)


@dataclass
class StreamPlan:
    base: ResolvedSource
    items: list[ResolvedSource]
    keys: list[KeyPlan]
    item_plans: list[ItemPlan]

    @property
    def merged_keys(self) -> list[KeyPlan]:
        return [k for k in self.keys if k.merged]

    def report(self) -> str:
        """The human-readable pre-flight report printed by ``hf-contmerge inspect``."""
        ck = self.base.checkpoint
        total = sum(ck.info(k.key).nbytes for k in self.keys)
        dtypes = Counter(k.dtype for k in self.keys)
        fetch_base = f", {_size(self.base.download_bytes)} to download" if self.base.download_bytes else ""
        lines = [
            f"base   {self.base.spec.text}  ({_rev(self.base)}){fetch_base}",
            f"       {len(self.keys)} tensors, {_size(total)}, dtypes {dict(dtypes)}; "
            f"{len(self.merged_keys)} merged, {len(self.keys) - len(self.merged_keys)} copied (non-float)",
        ]
        for i, (item, plan) in enumerate(zip(self.items, self.item_plans), start=1):
            ick = item.checkpoint
            size = sum(ick.info(k).nbytes for k in ick.keys())
            fetch = f", {_size(item.download_bytes)} to download" if item.download_bytes else ""
            lines.append(f"step {i:<3} {item.spec.text}  ({_rev(item)}), {item.kind}, {_size(size)}{fetch}, "
                         f"names {plan.alignment.describe()}")
            if plan.heads:
                lines.append(f"       task head kept apart: {', '.join(plan.heads)}")
            if plan.kept_modules:
                lines.append(f"       not in this item, base values kept: {', '.join(plan.kept_modules)}")
        per_step = sum(_size_of(kp) for kp in self.keys)
        lines.append(f"each step writes about {_size(per_step)} of weights plus its carried float32 state")
        lines.append("pre-flight: OK")
        return "\n".join(lines)


def _size_of(kp: KeyPlan) -> int:
    return int(torch.Size(kp.shape).numel()) * itemsize(kp.dtype)


def _rev(src: ResolvedSource) -> str:
    return f"revision {src.revision[:12]}" if src.revision else "local folder"  # its fingerprint needs every byte: not here


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def _module_of(base_key: str, base_prefix: str | None) -> str:
    """The top-level module of a base key inside the backbone (``pooler`` for ``pooler.dense.weight``)."""
    if base_prefix and base_key.startswith(base_prefix + "."):
        return f"{base_prefix}.{base_key[len(base_prefix) + 1 :].split('.', 1)[0]}"
    return base_key.split(".", 1)[0]


def _check_configs(base: ResolvedSource, item: ResolvedSource) -> None:
    b, c = base.config, item.config
    label = f"stream item {item.spec.text!r}"
    if b.get("model_type") and c.get("model_type") and b["model_type"] != c["model_type"]:
        raise ContMergeError(
            f"{label} is a {c['model_type']!r} model but the base is {b['model_type']!r}. "
            "Only fine-tunes of the same base model can be merged."
        )
    bv, cv = _vocab(b), _vocab(c)
    if bv and cv and bv != cv:
        raise ContMergeError(
            f"{label} has a vocabulary of {cv} tokens but the base has {bv}. Fine-tunes that added tokens "
            "cannot be merged tensor by tensor: resize the base's embeddings the same way first, or drop this item."
        )
    bt, ct = _tied(b), _tied(c)
    if bt is not None and ct is not None and bt != ct:
        raise ContMergeError(
            f"{label} has tie_word_embeddings={ct} but the base has {bt}: the output embedding would differ in kind. "
            "Use fine-tunes saved with the base's tying."
        )


def _vocab(cfg: dict) -> int | None:
    return cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")


def _tied(cfg: dict) -> bool | None:
    return cfg.get("tie_word_embeddings", cfg.get("tie_embeddings"))


def model_names(model, keys: set[str], configs: list[dict]) -> dict[str, str]:
    """In-memory parameter name -> the name among ``keys`` it is written under, for a built model,
    matched as :func:`plan_stream` matches an item to the base (file names of the model's
    architecture, a ``base_model_prefix`` of ``configs`` or the model's stripped or added)."""
    from .naming import file_layout

    to_file = file_layout(model).to_file
    alignment = align(keys, list(to_file.values()),
                      lambda: {p for p in (*map(config_prefix, configs), config_prefix(model.config.to_dict())) if p})
    return {n: alignment.to_base(fk) for n, fk in to_file.items() if alignment.to_base(fk) in keys}


def plan_stream(base: ResolvedSource, items: list[ResolvedSource]) -> StreamPlan:
    """Check every item against the base and plan each output tensor; raise on any mismatch."""
    bck = base.checkpoint
    base_keys = bck.keys()  # file order: shard by shard, offset by offset
    base_set = set(base_keys)

    def base_prefix() -> str | None:  # only for the diagnostics of a key the base lacks (the import costs seconds)
        return config_prefix(base.config)

    keys = [KeyPlan(k, bck.info(k).shape, bck.info(k).dtype, bck.info(k).is_float) for k in base_keys]
    item_plans: list[ItemPlan] = []
    for item in items:
        _check_configs(base, item)
        label = f"stream item {item.spec.text!r}"
        ick = item.checkpoint
        alignment = align(base_set, ick.keys(), lambda: {p for p in (base_prefix(), config_prefix(item.config)) if p})
        mapped: dict[str, str] = {}
        heads: list[str] = []
        for ikey in ick.keys():
            bkey = alignment.to_base(ikey)
            if bkey is None or bkey not in base_set:
                if alignment.in_backbone(ikey, base_prefix()):
                    raise ContMergeError(
                        f"{label} has tensor {ikey!r}, which the base {base.spec.text!r} lacks. The item is not a "
                        "fine-tune of this base (different architecture or depth): check --base and the stream."
                    )
                heads.append(ikey)
                continue
            binfo, iinfo = bck.info(bkey), ick.info(ikey)
            if binfo.shape != iinfo.shape:
                if alignment.in_backbone(ikey, base_prefix()):
                    raise ContMergeError(
                        f"{label}: tensor {ikey!r} has shape {list(iinfo.shape)} but the base's {bkey!r} has "
                        f"{list(binfo.shape)}. The item is not a fine-tune of this base: check --base and the stream."
                    )
                heads.append(ikey)
                continue
            if binfo.is_float and not iinfo.is_float:
                raise ContMergeError(
                    f"{label}: tensor {ikey!r} is {iinfo.dtype} but the base's is {binfo.dtype}. Re-save the item in floating point."
                )
            mapped[bkey] = ikey
        missing = [k.key for k in keys if k.merged and k.key not in mapped]
        kept_modules = _absent_modules(missing, keys, mapped, base_prefix(), label) if missing else []
        for kp in keys:
            kp.item_keys.append(mapped.get(kp.key) if kp.merged else None)
        item_plans.append(ItemPlan(alignment, heads, kept_modules))
    return StreamPlan(base, items, keys, item_plans)


def _absent_modules(missing: list[str], keys: list[KeyPlan], mapped: dict[str, str], base_prefix: str | None, label: str) -> list[str]:
    """Allow a missing tensor only when its whole top-level module is absent from the item."""
    if not missing:
        return []
    modules: dict[str, list[str]] = {}
    for kp in keys:
        if kp.merged:
            modules.setdefault(_module_of(kp.key, base_prefix), []).append(kp.key)
    absent = []
    for module in dict.fromkeys(_module_of(k, base_prefix) for k in missing):
        present = [k for k in modules[module] if k in mapped]
        if present:
            first = next(k for k in modules[module] if k not in mapped)
            raise ContMergeError(
                f"{label} lacks tensor {first!r} that the base has, while other tensors of {module!r} are present. "
                "The checkpoint is incomplete or of another architecture: re-save it with save_pretrained."
            )
        absent.append(module)
    if len(absent) == len(modules):
        raise ContMergeError(f"{label} shares no tensor with the base. Check --base and the stream.")
    return absent
