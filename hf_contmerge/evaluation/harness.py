"""LLM evaluation as LLM users already run it: lm-evaluation-harness on a step's model.

``lm_eval.simple_evaluate`` with its HF model wrapper (``HFLM``) around the loaded step (so an
adapter step, merged onto its base, and a device-mapped model work the same), on tasks from
lm-eval's registry or the user's own task YAML files / folder (``--eval-harness-include``). Each
task gives one column: its first reported metric (``acc`` before ``acc_norm`` for multiple choice,
as lm-eval lists them) and lm-eval's ``higher_is_better`` for it. Seeds are ``--seed``; no bootstrap
(stderr is not reported). Registry tasks read their data through ``datasets``: offline, the data
must be in the local cache, or the task must read local files (``dataset_path: json`` with
``data_files``). Optional dependency: ``pip install 'hf-contmerge[eval]'``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ContMergeError


@dataclass(frozen=True)
class HarnessScore:
    task: str
    metric: str
    value: float
    higher_is_better: bool
    samples: int


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ContMergeError("--eval-harness needs lm-evaluation-harness: pip install 'hf-contmerge[eval]' "
                             "(or pip install lm-eval).") from None
    return lm_eval, TaskManager


def task_manager(include: Path | None):
    _, TaskManager = _lm_eval()
    if include is not None and not Path(include).exists():
        raise ContMergeError(f"--eval-harness-include {include} does not exist; give a task YAML file or a folder of them.")
    return TaskManager(include_path=str(include) if include else None)


def check_tasks(tasks: list[str], include: Path | None) -> None:
    """Refuse task names lm-eval does not know, before anything is computed."""
    known = set(task_manager(include).all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ContMergeError(f"--eval-harness tasks {unknown} are not in lm-eval's registry nor in "
                             f"{include or 'an --eval-harness-include folder'}; list them with `lm-eval ls tasks`.")


def run_harness(model, tokenizer, tasks: list[str], include: Path | None, *, limit: int | None, batch_size: int,
                seed: int) -> list[HarnessScore]:
    lm_eval, _ = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), tasks=list(tasks),
                                  task_manager=task_manager(include), limit=limit, log_samples=False, bootstrap_iters=0,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    scores = []
    for task in tasks:
        results = out["results"].get(task, {})
        metrics = [(k, v) for k, v in results.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))]
        if not metrics:
            raise ContMergeError(f"lm-eval reported no metric for --eval-harness task {task!r}.")
        key, value = metrics[0]
        name = key.split(",", 1)[0]
        better = bool(out.get("higher_is_better", {}).get(task, {}).get(name, True))
        samples = int(out.get("n-samples", {}).get(task, {}).get("effective", results.get("sample_len", 0)) or 0)
        scores.append(HarnessScore(task, name, float(value), better, samples))
    return scores
