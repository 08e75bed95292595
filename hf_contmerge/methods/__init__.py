"""The method registry: name -> class. One file per method; add a method by adding it here."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ..errors import ContMergeError
from .average import Average
from .base import Method, MethodParams, TensorContext
from .magmax import MagMax
from .opcm import OPCM
from .task_arithmetic import TaskArithmetic
from .ties import Ties

REGISTRY: dict[str, type[Method]] = {m.name: m for m in (Average, TaskArithmetic, Ties, MagMax, OPCM)}


def method_class(name: str) -> type[Method]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ContMergeError(
            f"Unknown method {name!r}. Available: {', '.join(REGISTRY)} (see `hf-contmerge methods`)."
        ) from None


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


__all__ = ["REGISTRY", "Method", "MethodParams", "TensorContext", "build_method", "method_class"]
