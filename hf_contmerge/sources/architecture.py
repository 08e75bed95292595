"""The model class a config names: ``architectures[0]`` when transformers defines it.

One helper for everything that builds a model from a config (the meta model of ``naming.py``, the
pre-flight's ``base_model_prefix``, loading a step or a task model). Remote code is never trusted:
a class transformers does not define gives None, and callers fall back to ``AutoModel`` or refuse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def architecture_class(config: Mapping[str, Any] | Any) -> type | None:
    """The ``transformers`` class named by a config (a ``config.json`` mapping or a ``PretrainedConfig``), or None."""
    # imported here: a data-free step never asks, and importing transformers costs its process ~0.3 s
    import transformers  # a lazy module: the model class's own module is imported on first attribute access

    names = config.get("architectures") if isinstance(config, Mapping) else getattr(config, "architectures", None)
    name = (names or [None])[0]
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None
