"""hf-contmerge: continual model merging for the Hugging Face stack.

Merge a stream of fine-tunes of one base model into one model, step by step and tensor by tensor,
writing a loadable Hugging Face folder (with its model card and carried state) after every step.

The public names are imported on first use, so ``import hf_contmerge`` (and the CLI's ``--help``)
costs neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_PUBLIC = {
    "ContinualMerger": "hf_contmerge.api",
    "ContinualMergeCallback": "hf_contmerge.training",
    "ContMergeError": "hf_contmerge.errors",
    "MergeOptions": "hf_contmerge.options",
    "load_step": "hf_contmerge.artifacts.folder",
    "load_task_model": "hf_contmerge.artifacts.folder",
}

if TYPE_CHECKING:
    from .api import ContinualMerger
    from .artifacts.folder import load_step, load_task_model
    from .errors import ContMergeError
    from .options import MergeOptions
    from .training import ContinualMergeCallback


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'hf_contmerge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = ["ContMergeError", "ContinualMergeCallback", "ContinualMerger", "MergeOptions", "__version__", "load_step", "load_task_model"]
