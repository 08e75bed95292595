"""The model card of a step, rendered from its state alone (no network).

``huggingface_hub.ModelCard.from_template`` with ``ModelCardData``: ``base_model`` lists the Hub
ids that went in (base first), ``base_model_relation: merge``, tags ``merge``,
``continual-merging``, ``hf-contmerge`` and the method. The body (``model_cards/continual_merge.md``)
has the method and its parameters, a lineage table with resolved revisions, task heads, evaluation
results when present, and the command that reproduces the step.
"""

from __future__ import annotations

import re
import shlex
from importlib import resources

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..io.remote import SourceSpec
from ..methods.registry import method_class
from ..options import MergeOptions
from .layout import EVAL_DIR
from .state import StepState

TEMPLATE = "continual_merge.md"


def _hub_id(source: str) -> str | None:
    try:
        spec = SourceSpec.parse(source)
    except Exception:  # a local path that no longer exists: not a Hub id either
        return None
    return None if spec.is_local else spec.location


def reproduce_command(state: StepState, out: str = "OUT") -> str:
    args = ["hf-contmerge", "merge", "--base", state.base["source"], "--stream", *(s["source"] for s in state.stream)]
    args += ["--method", state.method]
    for k, v in state.params.items():
        args += ["--set", f"{k}={v}"]
    return shlex.join([*args, *MergeOptions.reproduce_flags(state.options), "--out", out])


def _compact(value: object) -> object:
    """Long lists (e.g. OPCM's projected tensors) are counted in the card; the state has them all."""
    return f"[{len(value)} entries, see contmerge_state.json]" if isinstance(value, list) and len(value) > 6 else value


def _group_key(group: str) -> tuple[int, int]:
    """Embeddings, the blocks in order, then the rest."""
    index = group.removeprefix("layer.")
    if index.isdigit():
        return (1, int(index))
    return (0, 0) if group == "embeddings" else (2, 0)


def _coefficients(values: object) -> dict | None:
    """Learned coefficients ``NAME@GROUP`` (DivMerge, TRM) as a table: one row per group, a column per name."""
    if not isinstance(values, dict):
        return None
    values = {k: v for k, v in values.items() if "@" in k}
    if not values:
        return None
    names = list(dict.fromkeys(k.split("@", 1)[0] for k in values))
    groups = list(dict.fromkeys(k.split("@", 1)[1] for k in values))
    groups.sort(key=_group_key)
    return {"names": names, "rows": [(g, [values.get(f"{n}@{g}") for n in names]) for g in groups]}


def _notes(entry: dict) -> str:
    # sorted: a step's own entry is in the method's order, earlier ones come back from JSON sorted
    notes = [f"{k}={v}" for k, v in sorted((entry.get("method") or {}).items())]
    if entry.get("calibration"):
        c = entry["calibration"]
        learned = c.get("learned")
        if learned and "objective_start" in learned:
            notes.append(f"coefficients learned on {c.get('data')} ({c.get('samples')} samples): objective "
                         f"{learned['objective_start']:.4g} → {learned['objective_end']:.4g}")
        elif learned is not None:  # a first step that only starts the buffer of past samples
            notes.append(f"{learned.get('buffer', 0)} samples of {c.get('data')} kept in the buffer")
        else:
            notes.append(f"calibrated on {c.get('data')} ({c.get('samples')} samples, {c.get('fisher')} Fisher)")
    if entry.get("alignment") not in (None, "same names"):
        notes.append(f"names {entry['alignment']}")
    if entry.get("heads"):
        notes.append(f"head kept apart ({len(entry['heads'])} tensors)")
    if entry.get("kept_modules"):
        notes.append("not in this model, base kept: " + ", ".join(entry["kept_modules"]))
    return "; ".join(notes)


_TASK_TYPE = {"classification": "text-classification", "perplexity": "text-generation", "exact-match": "text-generation",
              "choice": "multiple-choice", "label-words": "text-classification", "harness": "text-generation"}


def _cell(value: float | None, metric: str) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if metric == "perplexity" else f"{100 * value:.2f}"


EVALUATION_FORMAT = "hf-contmerge/evaluation"  # evaluation/record.py's record (read here as plain JSON: no import)


def _evaluation(data: dict | None) -> tuple[dict | None, list[EvalResult]]:
    """The card's view of a step's evaluation (a table, its summary and plots) and its model-index entries.

    The record of ``evaluation/`` (``--eval``) has a matrix; a dict from a custom ``evaluate=`` callable
    has ``description``, ``tasks`` and ``rows`` (``artifacts.folder.record_evaluation``)."""
    if not data:
        return None, []
    if data.get("format") != EVALUATION_FORMAT:
        rows = data.get("rows") or []
        view = {"description": data.get("description", ""), "columns": list(data.get("tasks", [])), "plots": [],
                "rows": [(r["name"], [_cell(v, "accuracy") for v in r["scores"]], _cell(r.get("mean"), "accuracy")) for r in rows]}
        results = [EvalResult(task_type=data.get("task_type", "text-classification"), dataset_type=t, dataset_name=t,
                              metric_type=data.get("metric", "accuracy"), metric_value=round(v, 6))
                   for t, v in zip(data.get("tasks", []), rows[-1]["scores"] if rows else []) if v is not None]
        return view, results
    tasks, s = data["tasks"], data["summary"]
    metrics = [t["metric"] for t in tasks]

    def row(name: str, scores: list, mean: float | None) -> tuple:
        return name, [_cell(v, m) for v, m in zip(scores, metrics)], _cell(mean, "accuracy")

    rows = []
    counted = [t["higher_is_better"] and t["item"] > 0 for t in tasks]
    for name, ref in (("base (each task's head)", data.get("base")), ("individual fine-tunes", data.get("finetuned"))):
        if ref is not None:
            vals = [v for v, c in zip(ref, counted) if c and v is not None]
            rows.append(row(name, ref, sum(vals) / len(vals) if vals else None))
    unseen = False
    for k, r in enumerate(data["matrix"]):
        name, cells, mean = row(f"merged, step {k + 1}", r, s["seen_average"][k])
        for c, t in enumerate(tasks):  # --eval-all: a task whose item is not merged yet at step k + 1
            if t["item"] > k + 1 and r[c] is not None:
                cells[c], unseen = f"({cells[c]})", True
        rows.append((name, cells, mean))
    parts = [f"ACC {_cell(s['acc'], 'accuracy')}"]
    if s.get("bwt") is not None:
        parts.append(f"BWT {100 * s['bwt']:+.2f}")
    if s.get("normalized_acc") is not None:
        parts.append(f"normalised ACC {100 * s['normalized_acc']:.2f}%")
    kinds = [f"{t['name']}: {t['kind']} ({t['metric']}, {t['samples']} examples of `{t['data']}`)" for t in tasks]
    description = (f"Scores (%; perplexity as is) of the merged model after every step on the tasks seen so far, each "
                   f"with its own head when heads are kept apart. After step {data['step']}: {', '.join(parts)} "
                   f"(over the tasks seen; BWT = mean over i < T of a[T][i] − a[i][i]). Tasks: " + "; ".join(kinds) + "."
                   + (" In parentheses: tasks whose item was not merged yet at that step (`--eval-all`), not in the means."
                      if unseen else ""))
    view = {"description": description, "columns": [t["name"] for t in tasks], "rows": rows,
            "plots": [f"{EVAL_DIR}/matrix.png", f"{EVAL_DIR}/progress.png"]}
    results = [EvalResult(task_type=_TASK_TYPE.get(t["kind"], "text-classification"), dataset_type=t.get("dataset") or t["name"],
                          dataset_name=t["name"], metric_type=t["metric"], metric_value=round(v, 6))
               for t, v in zip(tasks, data["matrix"][-1]) if v is not None and t["item"] <= data["step"]]
    return view, results


def render_card(state: StepState) -> str:
    cls = method_class(state.method)
    ids = [i for i in (_hub_id(state.base["source"]), *(_hub_id(s["source"]) for s in state.stream)) if i]
    title = f"Continual merge ({state.method}), step {state.step}"
    adapter = state.output.get("format") == "adapter"
    if adapter:  # a LoRA adapter of the base: the Hub's "adapter" relation; the lineage lists what went in
        ids = ids[:1] if _hub_id(state.base["source"]) else []
    evaluation, results = _evaluation(state.evaluation)
    data = ModelCardData(
        base_model=list(dict.fromkeys(ids)) or None,
        base_model_relation=("adapter" if adapter else "merge") if ids else None,
        library_name="peft" if adapter else "transformers",
        tags=["merge", "continual-merging", "hf-contmerge", state.method, *(["lora"] if adapter else [])],
        model_name=title if results else None,
        eval_results=results or None,
    )
    template = resources.files("hf_contmerge.model_cards").joinpath(TEMPLATE).read_text()
    stream = [{**s, "notes": _notes(s)} for s in state.stream]
    card = ModelCard.from_template(
        data,
        template_str=template,
        title=title,
        step=state.step,
        method=state.method,
        summary=cls.summary,
        reference=cls.reference,
        interpretation=cls.interpretation,
        experimental=cls.experimental,
        params=state.params,
        options=state.options,
        scalars={k: _compact(v) for k, v in state.scalars.items() if k != "coefficients"},
        coefficients=_coefficients(state.scalars.get("coefficients")),
        base=state.base,
        stream=stream,
        heads=state.heads,
        lowrank={"count": sum(q > 0 for q in state.lowrank.values()), "max_rank": max(state.lowrank.values(), default=0)}
        if any(state.lowrank.values()) else None,
        output=state.output,
        evaluation=evaluation,
        command=reproduce_command(state),
    )
    # The template's control lines leave runs of blank lines; Markdown needs at most one.
    return re.sub(r"\n{3,}", "\n\n", str(card)).rstrip() + "\n"
