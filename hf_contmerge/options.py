"""One validated options model behind the CLI, YAML recipes and the Python API.

The CLI flags are generated from these fields (``cli.py``), a recipe is a YAML mapping of the same
names, and ``ContinualMerger`` takes the same object, so the three cannot drift apart.

The options that change what a step holds are declared here, once, on their fields
(:func:`_recorded`): the state records them (:meth:`MergeOptions.recorded`), the card's reproduce
command repeats those that differ from the defaults (:meth:`MergeOptions.reproduce_flags`), and a
resume compares them (:meth:`MergeOptions.resume_conflicts`). Each says whether a resume may change it:

- ``same``: a stream keeps it: ``dtype`` (every published step of a stream in one dtype) and
  ``seed`` (the draws of data-dependent methods);
- ``free``: each step records its own value, and a resume may change it: ``shard_size`` (how the
  same tensors are cut into files), ``output_format`` and ``max_rank`` (a full model or an adapter,
  and its truncation, of the same exact carried state), and ``lowrank``: the carried state means
  the same either way (``auto`` continues a dense state dense, ``off`` expands factors to dense), so
  a changed path gives the same weights up to float32 rounding.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from .errors import ContMergeError
from .methods.registry import build_method

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes in a size such as ``5GB``, ``500MB``, ``2GiB`` or ``1000000``; KB/MB/GB/TB are decimal, as
    huggingface_hub's shard sizes are (its parser is private, so it is not imported)."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).upper() if match else None
    if unit not in SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size like 5GB, 500MB or 1000000")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def _recorded(resume: Literal["same", "free"]) -> dict[str, Any]:
    """Field marker: the option is recorded in every step's state; on resume it must stay the ``same``
    or is ``free`` to change (see the module docstring)."""
    return {"recorded": resume}


class MergeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    base: str = Field(description="base model: a local folder or a Hub repo id ORG/NAME[@REVISION]")
    stream: list[str] = Field(default_factory=list, description="fine-tunes to merge, in order (folders or Hub repo ids)")
    method: str = Field(description="merging method (see `hf-contmerge methods`)")
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters, given as --set KEY=VALUE")
    out: Path = Field(description="output folder; step-1 … step-T are written inside it")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="dtype of the written weights (auto: each tensor's base dtype)", json_schema_extra=_recorded("same")
    )
    device: str = Field("cpu", description="where kernels run: cpu, cuda, cuda:N or auto")
    shard_size: str = Field("5GB", description="largest safetensors shard, e.g. 5GB or 500MB", json_schema_extra=_recorded("free"))
    lowrank: Literal["auto", "off"] = Field(
        "auto", description="auto: carry the task vectors of LoRA streams as low-rank factors where the method has a "
        "low-rank form (opcm), with the SVD taken from the factors; off: always dense (same results up to float32 rounding)",
        json_schema_extra=_recorded("free"),
    )
    output_format: Literal["full", "adapter"] = Field(
        "full", description="full: each step is a complete model folder; adapter: a PEFT LoRA adapter of the base "
        "(LoRA-only streams through a method with a low-rank form, e.g. opcm)", json_schema_extra=_recorded("free"),
    )
    max_rank: int | None = Field(None, ge=1, description="with --output-format adapter: truncate each published "
                                 "delta to this rank (best approximation; the error is reported in the card; the "
                                 "carried state stays exact)", json_schema_extra=_recorded("free"))
    chunk_mb: float = Field(16, gt=0, le=2**20, description="slice size (MiB, float32) for elementwise kernels on large tensors")
    state_compression: Literal["zstd", "none"] = Field(
        "zstd", description="the carried state's low 16 bits beside bfloat16 weights, and MagMax's task vectors (exact "
        "either way; a resume reads both): zstd, one frame per slice, typically 0.2-0.65 of the low bits' 2 bytes and ~0.4 "
        "of MagMax's 4 a parameter, for ~2-5 ns a parameter of CPU, spread over the cores; none: stored as they are, no "
        "CPU (for a fast local disk and few cores)")
    resume: bool = Field(False, description="continue the run in --out after its last complete step")
    resume_from: str | None = Field(None, description="continue from a step published on the Hub, ORG/NAME[@REV] "
                                    "(e.g. @step-3); the --stream must start with the items that step holds")
    dry_run: bool = Field(False, description="run the pre-flight and print the plan; write nothing")
    ranks: int | None = Field(None, ge=1, description="with --dry-run: how a job of N ranks (torchrun --nproc_per_node "
                              "N) would share the next step: tensors, elements, bytes written and cost per rank")
    seed: int = Field(0, description="random seed (recorded; used by data-dependent methods)", json_schema_extra=_recorded("same"))
    data: list[str] = Field(default_factory=list, description="calibration data of data-dependent methods, one SPEC per "
                            "--stream item, in order: a dataset folder (save_to_disk)[@split], data files (.csv, .json, "
                            ".jsonl, .parquet; globs)[@split], or a Hub dataset org/name[:config][@split]")
    data_column: str | None = Field(None, description="input column of --data (default: the first of text, sentence, "
                                    "content, image, img, pixel_values, input_ids)")
    calib_samples: int = Field(256, ge=1, description="calibration samples per item (a sample seeded by --seed)")
    calib_batch_size: int = Field(8, ge=1, description="calibration batch size")
    max_length: int = Field(128, ge=1, description="most tokens of one text calibration sample")
    device_map: str | None = Field(None, description="Accelerate device map of the models calibration runs: auto, "
                                   "balanced, sequential, cpu, or a JSON map of module names to devices (default: the "
                                   "whole model on --device). divmerge and trm keep their directions beside each module's "
                                   "weights: size --max-memory for three copies of the model (divmerge form=all: one "
                                   "more per item)")
    max_memory: str | None = Field(None, description="with --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    offload_folder: Path | None = Field(None, description="with --device-map: where weights that fit nowhere are offloaded")
    dist_timeout: float = Field(1800, gt=0, description="launched on several ranks (torchrun, accelerate launch): "
                                "seconds a rank waits for the others at any point before the run fails (while rank 0 works alone, "
                                "calibrating, evaluating or publishing, the others wait as long as it keeps answering)")
    cache_teachers: bool = Field(False, description="divmerge, trm: keep each fine-tune's outputs on its calibration "
                                 "samples in HF_CONTMERGE_CACHE/teacher-outputs, so later runs over the same items "
                                 "reuse them (compare turns it on; delete the folder to reclaim the space)")
    eval: bool = Field(False, description="score every step on the --eval-data tasks of the items seen so far, before it is "
                       "published; the accuracy matrix, ACC and BWT go into its state and card")
    eval_data: list[str] = Field(default_factory=list, description="evaluation task of each --stream item, in order: "
                                 "[NAME=]SPEC with SPEC as for --data (e.g. sentiment=data/sent@test), or - for none")
    eval_kind: Literal["auto", "classification", "choice", "label-words", "exact-match", "perplexity"] = Field(
        "auto", description="how tasks are scored: auto picks classification for a model with a task head, and for a "
        "causal LM choice (a choices column), label-words (string labels), exact-match or perplexity (no labels)")
    eval_column: str | None = Field(None, description="input column of --eval-data (default: as --data-column)")
    eval_label_column: str = Field("label", description="label column of --eval-data")
    eval_choices_column: str = Field("choices", description="column of candidate strings of multiple-choice tasks")
    eval_samples: int | None = Field(None, ge=1, description="examples per task (a sample seeded by --seed; default: all)")
    eval_batch_size: int = Field(16, ge=1, description="evaluation batch size")
    eval_max_length: int = Field(512, ge=2, description="most tokens of one evaluation input")
    eval_max_new_tokens: int = Field(32, ge=1, description="tokens generated per example by exact-match tasks")
    eval_harness: list[str] = Field(default_factory=list, description="with --eval: lm-evaluation-harness tasks run on "
                                    "every step (registry names, or tasks of --eval-harness-include); needs "
                                    "pip install 'hf-contmerge[eval]'")
    eval_harness_include: Path | None = Field(None, description="a task YAML file or folder of them for --eval-harness")
    eval_references: bool = Field(False, description="with --eval: also score the base (with each task's head) and each "
                                  "fine-tune alone, as reference rows (normalised accuracy)")
    eval_all: bool = Field(False, description="with --eval: score every step on every item's task, the items not merged "
                           "yet too (forward transfer; an unseen classifier task with its fine-tune's head); ACC and BWT "
                           "still count the tasks seen so far only")
    allow_pickle: bool = Field(False, description="accept pickle (.bin) checkpoints; unpickling can run code")
    allow_nonfinite: bool = Field(False, description="write NaN/Inf values (in the base, an item, or a merged tensor) "
                                  "instead of refusing the step")
    quiet: bool = Field(False, description="no progress bars")
    verbose: bool = Field(False, description="after each step, report the bytes it read and wrote, its time and its "
                          "throughput")
    push_to: str | None = Field(None, description="Hub repo ORG/NAME to push every step to as it completes "
                                "(with --push-layout per-step: a name template containing {step})")
    private: bool = Field(False, description="create the --push-to repo as private")
    push_layout: Literal["single", "per-step"] = Field(
        "single", description="single: one repo, main = latest step, a tag per step; per-step: one repo per step"
    )
    revision_prefix: str = Field("step-", description="prefix of the tag that marks each pushed step (step-1, step-2, …)")
    push_existing: bool = Field(False, description="allow pushing into an existing repo that hf-contmerge did not create")
    push_retries: int = Field(5, ge=0, description="retries (with exponential backoff) of a failed push")
    token: SecretStr | None = Field(None, description="Hub token (default: HF_TOKEN or the saved login); never written anywhere",
                                    exclude=True)

    @field_validator("base", "stream", "resume_from", "data", "eval_data", mode="before")
    @classmethod
    def _sources(cls, v: Any) -> Any:
        """Sources and data specs given as ``os.PathLike`` (the API) are recorded as the text of their path."""
        if isinstance(v, (list, tuple)):
            return [os.fspath(x) if isinstance(x, os.PathLike) else x for x in v]
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    @field_validator("shard_size", mode="before")
    @classmethod
    def _shard_size_int(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # bytes, from a recipe or the API

    @field_validator("shard_size")
    @classmethod
    def _shard_size(cls, v: str) -> str:
        if parse_size(v) <= 0:
            raise ValueError(f"{v!r} is not a positive size")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", v):
            raise ValueError(f"{v!r} is not a device: use cpu, cuda, cuda:N or auto")
        return v

    @field_validator("push_to")
    @classmethod
    def _push_to(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-{}]+", v):
            raise ValueError(f"{v!r} is not a Hub repo id ORG/NAME")
        return v

    @model_validator(mode="after")
    def _push_layout(self) -> MergeOptions:
        if self.push_to and self.push_layout == "per-step" and "{step}" not in self.push_to:
            raise ValueError("--push-layout per-step needs a --push-to template containing {step}, e.g. org/model-step-{step}")
        return self

    @model_validator(mode="after")
    def _adapter(self) -> MergeOptions:
        if self.max_rank is not None and self.output_format != "adapter":
            raise ValueError("--max-rank applies to --output-format adapter only")
        if self.output_format == "adapter" and self.lowrank == "off":
            raise ValueError("--output-format adapter needs the low-rank path: drop --lowrank off")
        return self

    @model_validator(mode="after")
    def _device_map(self) -> MergeOptions:
        if (self.max_memory or self.offload_folder) and not self.device_map:
            raise ValueError("--max-memory and --offload-folder apply with --device-map only")
        self.device_map_value()
        self.max_memory_value()
        return self

    def device_map_value(self) -> str | dict[str, Any] | None:
        """``--device-map`` as Accelerate takes it: a strategy name, or the parsed JSON map."""
        text = self.device_map
        if text is None or not text.lstrip().startswith("{"):
            if text is not None and text not in ("auto", "balanced", "balanced_low_0", "sequential", "cpu"):
                raise ValueError(f"--device-map {text!r} is not auto, balanced, balanced_low_0, sequential, cpu or a JSON map")
            return text
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--device-map is not valid JSON ({e})") from None
        if not isinstance(value, dict) or not all(isinstance(v, (int, str)) for v in value.values()):
            raise ValueError("--device-map JSON must map module names to devices (0, 1, \"cpu\", \"disk\")")
        return value

    def max_memory_value(self) -> dict[int | str, str] | None:
        """``--max-memory 0=20GiB,cpu=64GiB`` as Accelerate takes it."""
        if not self.max_memory:
            return None
        out: dict[int | str, str] = {}
        for part in self.max_memory.split(","):
            device, sep, size = part.strip().partition("=")
            if not sep or not size or not (device.isdigit() or device in ("cpu", "disk", "mps")):
                raise ValueError(f"--max-memory {self.max_memory!r}: each entry is DEVICE=SIZE with DEVICE a GPU index or cpu "
                                 "(e.g. 0=20GiB,cpu=64GiB)")
            parse_size(size)
            out[int(device) if device.isdigit() else device] = size
        return out

    @model_validator(mode="after")
    def _data(self) -> MergeOptions:
        if self.data and len(self.data) != len(self.stream):
            raise ValueError(f"give exactly one --data SPEC per --stream item, in stream order ({len(self.data)} given "
                             f"for {len(self.stream)} items)")
        return self

    @model_validator(mode="after")
    def _eval(self) -> MergeOptions:
        if self.eval and self.stream and not self.eval_data and not self.eval_harness:
            raise ValueError("--eval needs --eval-data (one task SPEC per --stream item, - for none) or --eval-harness")
        if (self.eval_harness or self.eval_harness_include) and not self.eval:
            raise ValueError("--eval-harness applies with --eval only")
        if self.eval_all and not self.eval:
            raise ValueError("--eval-all applies with --eval only")
        if self.ranks is not None and not self.dry_run:
            raise ValueError("--ranks applies with --dry-run only (a job takes its ranks from torchrun or accelerate launch)")
        if self.eval_data and not self.eval:
            raise ValueError("--eval-data is given without --eval: add --eval to score every step")
        if self.eval_references and not self.eval:
            raise ValueError("--eval-references applies with --eval only")
        if self.eval_data and len(self.eval_data) != len(self.stream):
            raise ValueError(f"give exactly one --eval-data SPEC per --stream item, in stream order, - for none "
                             f"({len(self.eval_data)} given for {len(self.stream)} items)")
        return self

    @model_validator(mode="after")
    def _method(self) -> MergeOptions:
        build_method(self.method, self.params)  # raises ContMergeError naming the bad parameter
        return self

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)

    def token_value(self) -> str | None:
        return self.token.get_secret_value() if self.token else None

    @classmethod
    def recorded_fields(cls) -> dict[str, str]:
        """Option name -> ``same`` / ``free``, for the options every step records (field order)."""
        return {name: f.json_schema_extra["recorded"] for name, f in cls.model_fields.items()
                if isinstance(f.json_schema_extra, dict) and "recorded" in f.json_schema_extra}

    def recorded(self) -> dict[str, Any]:
        """What the state file and card record (never the token, never local-only flags)."""
        return {name: getattr(self, name) for name in self.recorded_fields()}

    @classmethod
    def reproduce_flags(cls, recorded: dict[str, Any]) -> list[str]:
        """CLI flags that reproduce ``recorded`` options (those that differ from the defaults)."""
        flags = []
        for name in cls.recorded_fields():
            value = recorded.get(name, cls.model_fields[name].default)
            if value != cls.model_fields[name].default:
                flags += ["--" + name.replace("_", "-"), str(value)]
        return flags

    def resume_conflicts(self, recorded: dict[str, Any]) -> list[str]:
        """How this run's ``same`` options differ from a step's ``recorded`` ones (a state that predates an
        option recorded its default)."""
        problems = []
        for name, resume in self.recorded_fields().items():
            before = recorded.get(name, type(self).model_fields[name].default)
            if resume == "same" and before != getattr(self, name):
                problems.append(f"--{name.replace('_', '-')} {before} there, {getattr(self, name)} now")
        return problems

    @classmethod
    def create(cls, **values: Any) -> MergeOptions:
        """Validate, turning pydantic's errors into one clear :class:`ContMergeError`."""
        try:
            return cls(**values)
        except ValidationError as e:
            problems = "; ".join(f"--{'.'.join(map(str, err['loc'])).replace('_', '-') or 'options'}: {err['msg']}" for err in e.errors())
            raise ContMergeError(f"Invalid options: {problems}.") from None


def load_recipe(path: Path) -> dict[str, Any]:
    """A YAML recipe: a mapping whose keys are MergeOptions field names (``params`` a mapping)."""
    try:
        data = yaml.safe_load(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ContMergeError(f"Recipe {path} does not exist.") from None
    except IsADirectoryError:
        raise ContMergeError(f"Recipe {path} is a folder; give the YAML file (see recipes/).") from None
    except UnicodeDecodeError as e:
        raise ContMergeError(f"Recipe {path} is not UTF-8 text (byte {e.start}); save it as UTF-8.") from None
    except yaml.YAMLError as e:
        raise ContMergeError(f"Recipe {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ContMergeError(f"Recipe {path} must be a mapping of option names to values (see recipes/).")
    if not isinstance(data.get("params", {}), dict):
        raise ContMergeError(f"Recipe {path}: `params` must be a mapping of method parameters to values "
                             f"(e.g. `params: {{scaling: 0.5}}`), not {data['params']!r}.")
    unknown = sorted(set(data) - set(MergeOptions.model_fields) - {"token"})
    if unknown:
        raise ContMergeError(f"Recipe {path} has unknown keys {unknown}; known: {sorted(MergeOptions.model_fields)}.")
    if "token" in data:
        raise ContMergeError(f"Recipe {path} contains a token. Tokens do not belong in files: use HF_TOKEN or `hf auth login`.")
    if isinstance(data.get("stream"), list) and any(isinstance(item, dict) for item in data["stream"]):
        data.update(_stream_entries(path, data))
    return data


def _stream_entries(path: Path, recipe: dict[str, Any]) -> dict[str, list[str]]:
    """A recipe stream whose items are mappings ``{source: SRC, data: SPEC}`` as the ``stream`` and
    ``data`` lists of the options (a plain string item is a source without data)."""
    if "data" in recipe and any(isinstance(i, dict) and "data" in i for i in recipe["stream"]):
        raise ContMergeError(f"Recipe {path} gives `data` both per stream item and as a list; keep one of the two.")
    if "eval_data" in recipe and any(isinstance(i, dict) and "eval" in i for i in recipe["stream"]):
        raise ContMergeError(f"Recipe {path} gives evaluation tasks both per stream item (`eval`) and as `eval_data`; keep one.")
    sources, specs, evals = [], [], []
    for n, item in enumerate(recipe["stream"], 1):
        entry = {"source": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or not isinstance(entry.get("source"), str) or set(entry) - {"source", "data", "eval"}:
            raise ContMergeError(f"Recipe {path}: stream item {n} must be a source string or a mapping with `source`, an "
                                 f"optional `data` and an optional `eval` (data spec strings), not {item!r}.")
        for key in ("data", "eval"):
            if not isinstance(entry.get(key, ""), str):
                raise ContMergeError(f"Recipe {path}: stream item {n} has `{key}: {entry[key]!r}`; give a data spec string "
                                     "(a dataset folder[@split], data files, or org/name[:config][@split]).")
        sources.append(entry["source"])
        specs.append(entry.get("data", ""))
        evals.append(entry.get("eval", "-"))
    return {"stream": sources, **({"data": specs} if any(specs) else {}),
            **({"eval_data": evals} if any(e != "-" for e in evals) else {})}
