"""The method registry: name -> where its class lives. One file per method; register it with one line here.

Entries are ``"module:Class"`` strings, imported on first use, so listing the names (the CLI's
``--help``, choices) costs no torch import. A class may also be registered directly
(``REGISTRY[name] = cls``, e.g. by a plugin or a test).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..errors import ContMergeError

if TYPE_CHECKING:
    from .base import Method

REGISTRY: dict[str, str | type[Method]] = {
    "average": "hf_contmerge.methods.average:Average",
    "task_arithmetic": "hf_contmerge.methods.task_arithmetic:TaskArithmetic",
    "ties": "hf_contmerge.methods.ties:Ties",
    "magmax": "hf_contmerge.methods.magmax:MagMax",
    "opcm": "hf_contmerge.methods.opcm:OPCM",
    "fisher": "hf_contmerge.methods.fisher:FisherMerge",
    "became": "hf_contmerge.methods.became:Became",
    "divmerge": "hf_contmerge.methods.divmerge:DivMerge",
    "trm": "hf_contmerge.methods.trm:TRM",
}


def method_names() -> list[str]:
    return list(REGISTRY)


def method_class(name: str) -> type[Method]:
    try:
        entry = REGISTRY[name]
    except KeyError:
        raise ContMergeError(
            f"Unknown method {name!r}. Available: {', '.join(REGISTRY)} (see `hf-contmerge methods`)."
        ) from None
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry


def build_method(name: str, params: dict[str, Any]) -> Method:
    """Instantiate ``name`` with validated ``params`` (a clear error names the bad parameter)."""
    cls = method_class(name)
    try:
        return cls(cls.Params(**params))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'params'}: {err['msg']}" for err in e.errors())
        known = ", ".join(f"{k}={f.default!r}" for k, f in cls.Params.model_fields.items()) or "none"
        raise ContMergeError(
            f"Invalid parameters for method {name!r}: {problems}. Its parameters (defaults): {known}."
        ) from None
