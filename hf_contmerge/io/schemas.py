"""One validation layer for every JSON file hf-contmerge reads.

Each file is read as strict UTF-8, parsed as JSON and validated by a pydantic model here; a failure
is one :class:`ContMergeError` that names the file, the field and what to do, never a traceback
from the call site that first touches a malformed value. The models type only the fields the tool
reads (``extra="allow"`` keeps the rest), and are strict: a string where a number belongs (``"16"``
for ``lora_alpha``) is refused rather than coerced, as is a non-finite number.

- safetensors header (:class:`TensorEntry`, ``__metadata__`` a flat ``str -> str`` mapping, as the
  format specifies; the byte-level checks are ``safetensors.read_header``'s);
- ``model.safetensors.index.json`` (:class:`ShardIndex`);
- ``config.json`` (:class:`ModelConfig`);
- ``adapter_config.json`` (:class:`AdapterConfig`);
- ``contmerge_state.json`` (:class:`StateFile`; the state's tensors are checked against the plan on
  resume, ``engine/run.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from ..errors import ContMergeError

M = TypeVar("M", bound=BaseModel)

NonNegInt = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(gt=0)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Schema(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


def read_json(path: Path, what: str, fix: str) -> Any:
    """``path`` parsed as JSON (strict UTF-8); a clear refusal naming ``what`` and ``fix`` otherwise."""
    try:
        raw = Path(path).read_bytes()
    except IsADirectoryError:
        raise ContMergeError(f"{what} {path} is a folder, not a file. {fix}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ContMergeError(f"{what} {path} is not UTF-8 text (byte {e.start}). {fix}") from None
    except json.JSONDecodeError as e:
        raise ContMergeError(f"{what} {path} is not valid JSON ({e}). {fix}") from None


def validate(model: type[M], data: Any, what: str, path: Path | str, fix: str) -> M:
    """``data`` validated as ``model``; a clear refusal naming the first bad field otherwise."""
    if not isinstance(data, dict):
        raise ContMergeError(f"{what} {path} must hold a JSON object, not a {_json_type(data)}. {fix}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(map(str, err["loc"])) or "(top level)"
        got = err.get("input")
        shown = f" (got {_json_type(got)} {_short(got)})" if "missing" not in err["type"] else ""
        more = f"; {len(e.errors()) - 1} more problem(s)" if len(e.errors()) > 1 else ""
        raise ContMergeError(f"{what} {path}: field `{field}`: {err['msg'].lower()}{shown}{more}. {fix}") from None


def load(model: type[M], path: Path, what: str, fix: str) -> M:
    """Read, parse and validate one JSON file."""
    return validate(model, read_json(path, what, fix), what, path, fix)


def _json_type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------ safetensors


class TensorEntry(_Schema):
    """One tensor of a safetensors header (its dtype name is checked by the reader, which knows torch's)."""

    dtype: str
    shape: list[NonNegInt]
    data_offsets: Annotated[list[NonNegInt], Field(min_length=2, max_length=2)]


_HEADER = TypeAdapter(dict[str, TensorEntry])
_METADATA = TypeAdapter(dict[str, str])  # the format's rule: a flat mapping of strings to strings


def safetensors_header(header: Any) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """A parsed safetensors header as its tensor entries and its ``__metadata__``; ``ValueError`` saying
    what is wrong otherwise (the reader, ``safetensors.read_header``, words the refusal)."""
    if not isinstance(header, dict):
        raise ValueError(f"its header is a JSON {_json_type(header)}, not an object")
    header = dict(header)
    metadata = header.pop("__metadata__", None)
    try:
        entries = _HEADER.validate_python(header, strict=True)
    except ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"header entry `{'.'.join(map(str, err['loc']))}`: {err['msg'].lower()}, "
                         f"got {_short(err.get('input'))}") from None
    try:
        return entries, _METADATA.validate_python({} if metadata is None else metadata, strict=True)
    except ValidationError:
        raise ValueError(f"header `__metadata__` must map strings to strings, got {_short(metadata)}") from None


# ------------------------------------------------------------------ model folders


class ShardIndex(_Schema):
    """``model.safetensors.index.json``: which shard file holds each tensor."""

    weight_map: Annotated[dict[str, str], Field(min_length=1)]
    metadata: dict[str, Any] | None = None


class ModelConfig(_Schema):
    """``config.json``: any object transformers reads; typed here are the fields hf-contmerge reads."""

    model_type: str | None = None
    architectures: list[str] | None = None
    auto_map: dict[str, Any] | None = None
    tie_word_embeddings: bool | None = None


class AdapterConfig(_Schema):
    """``adapter_config.json`` of a PEFT adapter; typed are the fields that decide ΔW = s·B@A.

    Defaults are PEFT's (``LoraConfig``): r 8, lora_alpha 8."""

    peft_type: str | None = None
    r: PositiveInt = 8
    lora_alpha: Finite = 8.0
    rank_pattern: dict[str, PositiveInt] | None = None
    alpha_pattern: dict[str, Finite] | None = None
    use_rslora: bool | None = None
    fan_in_fan_out: bool | None = None
    bias: str | None = None
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    init_lora_weights: bool | str | None = None


# ------------------------------------------------------------------ the state of a step


class SourceRecord(_Schema):
    """A source as a state file records it."""

    source: str
    kind: Literal["full", "lora"] = "full"
    revision: str | None = None
    fingerprint: str


class StateFile(_Schema):
    """``contmerge_state.json`` (``artifacts/state.py`` writes it)."""

    format: Literal["hf-contmerge/state"]
    format_version: PositiveInt
    step: PositiveInt
    method: str
    params: dict[str, Any]
    options: dict[str, Any]
    base: SourceRecord
    stream: list[SourceRecord]
    scalars: dict[str, Any] = {}
    slots: list[str] = []
    heads: list[dict[str, Any]] = []
    lowrank: dict[str, NonNegInt] = {}
    touched: list[str] = []
    output: dict[str, Any] = {"format": "full"}
    weight_slot: str | None = None
    evaluation: dict[str, Any] | None = None
    tool_version: str = ""

    @field_validator("stream")
    @classmethod
    def _stream_reaches_step(cls, stream: list[SourceRecord], info: Any) -> list[SourceRecord]:
        step = info.data.get("step")
        if step is not None and len(stream) != step:
            raise ValueError(f"lists {len(stream)} stream items for step {step}")
        return stream
