"""Accuracy of a sequence-classification model on a demo task's test split.

``accuracy = (1/N) * sum_i [argmax_c logits_i,c == y_i]`` over the first ``N`` test examples
(``N = len(test)``, or ``max_examples`` when smaller). Texts are tokenised in batches, padded to the
batch's longest text and truncated at 64 tokens, the length the experts were trained with. Plain torch
on purpose: ``evaluate.load("accuracy")`` needs the network, and accuracy is one line.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_contmerge.demo.tasks import Task
from hf_contmerge.errors import ContMergeError

MAX_LENGTH = 64


def _check_head(model: PreTrainedModel, task: Task) -> None:
    """Refuse a model whose head does not have one output per task label."""
    num_labels = getattr(model.config, "num_labels", None)
    if num_labels != task.num_labels:
        raise ContMergeError(
            f"The model has {num_labels} output labels but task {task.name!r} has {task.num_labels} "
            f"({', '.join(task.labels)}); evaluate it with that task's classification head."
        )


@torch.no_grad()
def predict(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    batch_size: int = 64,
) -> torch.Tensor:
    """Predicted class index per text (``argmax`` of the logits), on the CPU."""
    device = next(model.parameters()).device
    preds = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        ).to(device)
        preds.append(model(**enc).logits.argmax(dim=-1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    batch_size: int = 64,
    max_examples: int | None = None,
) -> float:
    """Accuracy in [0, 1] of ``model`` on ``task.test`` (first ``max_examples`` if given).

    The model is put in eval mode (no dropout) and left there; gradients are off.
    """
    _check_head(model, task)
    test = task.test if max_examples is None else task.test.select(range(min(max_examples, len(task.test))))
    if len(test) == 0:
        raise ContMergeError(f"Task {task.name!r} has no test examples to evaluate (max_examples={max_examples}).")
    model.eval()
    preds = predict(model, tokenizer, list(test["text"]), batch_size)
    labels = torch.tensor(list(test["label"]))
    return (preds == labels).float().mean().item()
