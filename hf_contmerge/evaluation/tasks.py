"""Evaluation tasks: one per stream item, read like calibration data and scored by its kind.

A task is given as ``[NAME=]SPEC`` with SPEC any ``--data`` form (``calibration/data.py``); NAME
defaults to the spec's folder, file or dataset name. Its examples are the first ``samples`` of a
permutation seeded with ``--seed`` (all rows when there are no more), so every step and every
reference row is scored on the same examples. Kinds, chosen by ``--eval-kind`` or, for ``auto``,
from the model and the columns:

- ``classification`` (a model with a sequence or image classification head): accuracy of
  ``argmax`` logits against the label column (integers, or label names of the head's ``label2id``);
- ``choice`` (causal LM, a ``choices`` column of strings, the label an index or the right string):
  accuracy of ``argmax_j log p(" " + choice_j | input)``;
- ``label-words`` (causal LM, string labels, at most 32 distinct): as ``choice``, the candidates
  being the task's distinct labels;
- ``exact-match`` (causal LM, string labels otherwise): the first line of a greedy continuation of
  the input equals the label, both stripped;
- ``perplexity`` (causal LM, no label column): token-weighted perplexity of the input texts; lower
  is better, so it is shown but not averaged into ACC and BWT.

Accuracy and exact match are computed by ``evaluate`` with metric scripts shipped in the package
(``metrics/``) and loaded by path, which works offline; perplexity needs no metric script (the
Hub's one loads a model by id), so it is computed in :func:`scoring.perplexity`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from ..calibration.data import COLUMNS, DataSpec, _encode, _tokenizer, modality_of, sample_rows
from ..errors import ContMergeError
from . import scoring

Kind = Literal["auto", "classification", "choice", "label-words", "exact-match", "perplexity"]
METRIC = {"classification": "accuracy", "choice": "accuracy", "label-words": "accuracy", "exact-match": "exact_match",
          "perplexity": "perplexity"}
MAX_LABEL_WORDS = 32
DELIMITER = " "  # between an input and a candidate continuation, as lm-eval's target_delimiter


@cache
def metric(name: str):
    """An ``evaluate`` metric shipped in ``metrics/NAME`` (loaded by path: no network)."""
    import evaluate

    return evaluate.load(str(Path(__file__).parent / "metrics" / name))


@dataclass(frozen=True)
class TaskSpec:
    """One item's task as given: its name and data, and how to read them."""

    name: str
    data: DataSpec
    kind: str = "auto"
    column: str | None = None
    label_column: str = "label"
    choices_column: str = "choices"
    samples: int | None = None
    seed: int = 0
    max_length: int = 512
    max_new_tokens: int = 32
    batch_size: int = 16

    @classmethod
    def parse(cls, text: str, memory: dict[str, DataSpec] | None = None, **settings: Any) -> TaskSpec:
        name, sep, spec = text.partition("=")
        if not sep or "/" in name or os.sep in name or not name:
            name, spec = "", text
        data = (memory or {}).get(spec) or DataSpec.parse(spec)
        if not name:
            location = data.location.rstrip("/").rsplit("/", 1)[-1]
            name = Path(location).stem if data.kind == "files" else location
        return cls(name=name, data=data, **settings)


@dataclass
class PreparedTask:
    """A task's examples, read once, and its resolved kind."""

    spec: TaskSpec
    kind: str
    column: str
    inputs: list[Any]
    labels: list[Any] | None
    choices: list[list[str]] | None
    fingerprint: str = ""  # datasets' fingerprint of the examples read (keys cached reference scores)

    @property
    def metric(self) -> str:
        return METRIC[self.kind]

    @property
    def higher_is_better(self) -> bool:
        return self.kind != "perplexity"


def prepare(spec: TaskSpec, model_kind: str) -> PreparedTask:
    """Read the task's examples and fix its kind for a model of ``model_kind`` (``sequence-classification``,
    ``image-classification`` or ``causal-lm``); every problem names the spec and the fix."""
    where = f"--eval-data {spec.data.text!r}"
    dataset = spec.data.load()
    names = list(dataset.column_names)
    column = spec.column or next((c for c in COLUMNS if c in names), None)
    if column is None or column not in names:
        raise ContMergeError(f"{where} has no input column {spec.column or list(COLUMNS)} (it has {names}); "
                             "name it with --eval-column.")
    if len(dataset) == 0:
        raise ContMergeError(f"{where} is empty: evaluation needs at least one example.")
    rows = sample_rows(dataset, spec.samples or len(dataset), spec.seed, spec.data)
    dataset = dataset.select(rows)
    labels = list(dataset[spec.label_column]) if spec.label_column in names else None
    choices = list(dataset[spec.choices_column]) if spec.choices_column in names else None
    kind = spec.kind
    if kind == "auto":
        if model_kind != "causal-lm":
            kind = "classification"
        elif choices is not None:
            kind = "choice"
        elif labels is None:
            kind = "perplexity"
        elif all(isinstance(x, str) for x in labels):
            kind = "label-words" if len(set(labels)) <= MAX_LABEL_WORDS else "exact-match"
        else:
            raise ContMergeError(f"{where}: the model is a causal LM and the labels are not strings; give a "
                                 f"{spec.choices_column!r} column of candidate strings (--eval-choices-column), or text labels.")
    if kind == "classification" and model_kind == "causal-lm":
        raise ContMergeError(f"{where}: --eval-kind classification needs a model with a classification head; this one is "
                             "a causal LM (use choice, label-words, exact-match or perplexity).")
    if kind != "classification" and model_kind != "causal-lm":
        raise ContMergeError(f"{where}: --eval-kind {kind} needs a causal LM; this model is a {model_kind} model.")
    if kind != "perplexity" and labels is None:
        raise ContMergeError(f"{where} has no label column {spec.label_column!r} (it has {names}); name it with "
                             "--eval-label-column.")
    if kind == "choice" and choices is None:
        raise ContMergeError(f"{where} has no choices column {spec.choices_column!r} (it has {names}).")
    inputs = list(dataset[column])
    return PreparedTask(spec, kind, column, inputs, labels, choices, str(getattr(dataset, "_fingerprint", "")))


def _label_ids(task: PreparedTask, config) -> list[int]:
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    out = []
    for y in task.labels:
        if isinstance(y, bool) or not isinstance(y, (int, str)) or (isinstance(y, str) and y not in label2id):
            raise ContMergeError(f"--eval-data {task.spec.data.text!r}: label {y!r} is neither a class index nor one of the "
                                 f"head's labels {sorted(label2id)}.")
        out.append(label2id[y] if isinstance(y, str) else y)
    return out


def _choice_index(task: PreparedTask, i: int) -> int:
    y, options = task.labels[i], task.choices[i]
    if isinstance(y, str):
        if y not in options:
            raise ContMergeError(f"--eval-data {task.spec.data.text!r}: row {i}'s label {y!r} is not one of its choices.")
        return options.index(y)
    return int(y)


def score(task: PreparedTask, model, processor_folder: Path) -> float:
    """The task's score for ``model`` (in eval mode), inputs prepared with the base's tokenizer or processor."""
    spec = task.spec
    model.eval()
    if task.kind == "classification":
        modality = modality_of(task.inputs, task.column, spec.data)
        batches = [_encode(task.inputs[s:s + spec.batch_size], modality, processor_folder, spec.max_length, spec.data)
                   for s in range(0, len(task.inputs), spec.batch_size)]
        preds = scoring.classify(model, batches)
        num_labels = getattr(model.config, "num_labels", None)
        refs = _label_ids(task, model.config)
        if num_labels is not None and any(not 0 <= r < num_labels for r in refs):
            raise ContMergeError(f"--eval-data {spec.data.text!r} has labels outside the head's {num_labels} classes: "
                                 "is it the right task for this stream item?")
        return metric("accuracy").compute(predictions=preds, references=refs)["accuracy"]
    tokenizer = _tokenizer(processor_folder, spec.data)
    if task.kind == "perplexity":
        return scoring.perplexity(model, tokenizer, task.inputs, spec.batch_size, spec.max_length)
    if task.kind == "exact-match":
        preds = scoring.greedy_continuations(model, tokenizer, task.inputs, spec.max_new_tokens, spec.batch_size, spec.max_length)
        return metric("exact_match").compute(predictions=preds, references=[str(y) for y in task.labels])["exact_match"]
    if task.kind == "label-words":
        candidates = sorted(set(task.labels))
        options = [candidates] * len(task.inputs)
        refs = [candidates.index(y) for y in task.labels]
    else:
        options = task.choices
        refs = [_choice_index(task, i) for i in range(len(task.inputs))]
    pairs = [(x, DELIMITER + c) for x, opts in zip(task.inputs, options) for c in opts]
    ll = scoring.loglikelihoods(model, tokenizer, pairs, spec.batch_size, spec.max_length)
    preds, at = [], 0
    for opts in options:
        scores = ll[at:at + len(opts)]
        preds.append(max(range(len(opts)), key=scores.__getitem__))
        at += len(opts)
    return metric("accuracy").compute(predictions=preds, references=refs)["accuracy"]


def model_kind(config) -> str:
    """What a model of this config is evaluated as: its architecture's task."""
    arch = (getattr(config, "architectures", None) or [""])[0]
    for suffix, kind in (("ForSequenceClassification", "sequence-classification"),
                         ("ForImageClassification", "image-classification"), ("ForCausalLM", "causal-lm"),
                         ("LMHeadModel", "causal-lm")):
        if arch.endswith(suffix):
            return kind
    raise ContMergeError(f"A model of architecture {arch or 'unknown'} cannot be evaluated: tasks need a sequence or image "
                         "classification head (a task head in the stream) or a causal LM.")
