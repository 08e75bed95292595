"""hf-contmerge: continual model merging for the Hugging Face stack.

Merge a stream of fine-tunes of one base model into one model, step by step and tensor by tensor,
writing a loadable Hugging Face folder (with its model card and carried state) after every step.
"""

__version__ = "0.1.0"

from .api import ContinualMerger, load_step  # noqa: E402
from .errors import ContMergeError  # noqa: E402
from .heads import load_task_model  # noqa: E402
from .options import MergeOptions  # noqa: E402

__all__ = ["ContMergeError", "ContinualMerger", "MergeOptions", "load_step", "load_task_model", "__version__"]
