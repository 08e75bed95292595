"""One validated options model behind the CLI, YAML recipes and the Python API.

The CLI flags are generated from these fields (``cli.py``), a recipe is a YAML mapping of the same
names, and ``ContinualMerger`` takes the same object, so the three cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from huggingface_hub.serialization._base import parse_size_to_int
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from .errors import ContMergeError

OUTPUT_DTYPES = ("auto", "float32", "float16", "bfloat16")


class MergeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str = Field(description="base model: a local folder or a Hub repo id ORG/NAME[@REVISION]")
    stream: list[str] = Field(default_factory=list, description="fine-tunes to merge, in order (folders or Hub repo ids)")
    method: str = Field(description="merging method (see `hf-contmerge methods`)")
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters, given as --set KEY=VALUE")
    out: Path = Field(description="output folder; step-1 … step-T are written inside it")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="dtype of the written weights (auto: each tensor's base dtype)"
    )
    device: str = Field("cpu", description="where kernels run: cpu, cuda, cuda:N or auto")
    shard_size: str = Field("5GB", description="largest safetensors shard, e.g. 5GB or 500MB")
    lowrank: Literal["auto", "off"] = Field(
        "auto", description="auto: carry the task vectors of LoRA streams as low-rank factors where the method has a "
        "low-rank form (opcm), with the SVD taken from the factors; off: always dense (same results up to float32 rounding)"
    )
    output_format: Literal["full", "adapter"] = Field(
        "full", description="full: each step is a complete model folder; adapter: a PEFT LoRA adapter of the base "
        "(LoRA-only streams through a method with a low-rank form, e.g. opcm)"
    )
    max_rank: int | None = Field(None, ge=1, description="with --output-format adapter: truncate each published "
                                 "delta to this rank (best approximation; the error is reported in the card; the "
                                 "carried state stays exact)")
    chunk_mb: float = Field(16, gt=0, description="slice size (MiB, float32) for elementwise kernels on large tensors")
    resume: bool = Field(False, description="continue the run in --out after its last complete step")
    resume_from: str | None = Field(None, description="continue from a step published on the Hub, ORG/NAME[@REV] "
                                    "(e.g. @step-3); the --stream must start with the items that step holds")
    dry_run: bool = Field(False, description="run the pre-flight and print the plan; write nothing")
    seed: int = Field(0, description="random seed (recorded; used by data-dependent methods)")
    allow_pickle: bool = Field(False, description="accept pickle (.bin) checkpoints; unpickling can run code")
    allow_nonfinite: bool = Field(False, description="accept NaN/Inf values in stream items instead of refusing")
    quiet: bool = Field(False, description="no progress bars")
    push_to: str | None = Field(None, description="Hub repo ORG/NAME to push every step to as it completes "
                                "(with --push-layout per-step: a name template containing {step})")
    private: bool = Field(False, description="create the --push-to repo as private")
    push_layout: Literal["single", "per-step"] = Field(
        "single", description="single: one repo, main = latest step, a tag per step; per-step: one repo per step"
    )
    revision_prefix: str = Field("step-", description="prefix of the tag that marks each pushed step (step-1, step-2, …)")
    push_existing: bool = Field(False, description="allow pushing into an existing repo that hf-contmerge did not create")
    push_retries: int = Field(5, ge=0, description="retries (with exponential backoff) of a failed push")
    token: SecretStr | None = Field(None, description="Hub token (default: HF_TOKEN or the saved login); never written anywhere", exclude=True)

    @field_validator("shard_size")
    @classmethod
    def _shard_size(cls, v: str) -> str:
        try:
            if parse_size_to_int(v) <= 0:
                raise ValueError
        except (ValueError, TypeError):
            raise ValueError(f"{v!r} is not a size like 5GB, 500MB or 1000000") from None
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", v):
            raise ValueError(f"{v!r} is not a device: use cpu, cuda, cuda:N or auto")
        return v

    @field_validator("push_to")
    @classmethod
    def _push_to(cls, v: str | None) -> str | None:
        import re

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
    def _method(self) -> MergeOptions:
        from .methods import build_method

        build_method(self.method, self.params)  # raises ContMergeError naming the bad parameter
        return self

    @property
    def shard_bytes(self) -> int:
        return parse_size_to_int(self.shard_size)

    def token_value(self) -> str | None:
        return self.token.get_secret_value() if self.token else None

    def recorded(self) -> dict[str, Any]:
        """What the state file and card record (never the token, never local-only flags)."""
        return {"dtype": self.dtype, "shard_size": self.shard_size, "seed": self.seed, "lowrank": self.lowrank,
                "output_format": self.output_format, "max_rank": self.max_rank}

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
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ContMergeError(f"Recipe {path} does not exist.") from None
    except yaml.YAMLError as e:
        raise ContMergeError(f"Recipe {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ContMergeError(f"Recipe {path} must be a mapping of option names to values (see recipes/).")
    unknown = sorted(set(data) - set(MergeOptions.model_fields) - {"token"})
    if unknown:
        raise ContMergeError(f"Recipe {path} has unknown keys {unknown}; known: {sorted(MergeOptions.model_fields)}.")
    if "token" in data:
        raise ContMergeError(f"Recipe {path} contains a token. Tokens do not belong in files: use HF_TOKEN or `hf auth login`.")
    return data
