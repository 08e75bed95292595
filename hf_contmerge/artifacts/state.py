"""The schema of ``contmerge_state.json``, and reading and writing it.

The JSON records everything needed to continue the stream and to say what went in: method and
parameters, the options that change bits, the base and every stream item so far (source as given,
resolved commit hash, content fingerprint, how names were aligned, heads, modules the item lacked),
the method's carried scalars, and where its carried float32 tensors are: one safetensors set per
slot in ``contmerge_state/`` (``{slot}.safetensors`` or sharded with an index), keyed by the
output's tensor names; tensors carried as low-rank factors (LoRA streams) are in
``lowrank-{slot}.safetensors`` as ``KEY::left`` and ``KEY::right`` (dense value: base + left @ right).
It never holds a token. It holds no timestamp either, so a resumed run writes the same bytes as an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import ContMergeError
from ..io import schemas
from .compact import LOW16_PREFIX, TIES_PREFIX
from .layout import STATE_DIR, STATE_FILE

FORMAT = "hf-contmerge/state"
# 2: factored slots (``lowrank-{slot}``) are kept in the method's canonical form from step 1 on
# (OPCM: SVD form); format-1 factors, from development versions only, may not be.
# 3: the method's weight slot (``weight_slot``) is carried over the published weights
# (``artifacts/compact.py``: nothing more for float32 weights, int16 low bits for bfloat16 ones);
# format-2 steps, float32 throughout, are read as before.
# 4: those low bits compressed, one zstd frame per slice (``KEY::low16[a:b]``), and so are the compressible
# slots (MagMax's τmax: ``KEY::f32[a:b]``), unless --state-compression none (format 3's layout); format-3
# steps are read as before.
# 5: each frame of low bits holds their palette coding (``KEY::pal16[a:b]``: the block's 255 most frequent codes,
# a byte an element, the rest escaped); format-4 frames are read as before.
FORMAT_VERSION = 5


@dataclass
class StepState:
    step: int
    method: str
    params: dict[str, Any]
    options: dict[str, Any]
    base: dict[str, Any]
    stream: list[dict[str, Any]]
    scalars: dict[str, Any] = field(default_factory=dict)
    slots: list[str] = field(default_factory=list)
    heads: list[dict[str, Any]] = field(default_factory=list)
    lowrank: dict[str, int] = field(default_factory=dict)  # tensors carried as factors -> their rank
    touched: list[str] = field(default_factory=list)  # tensors some item so far changed (non-zero task vector)
    output: dict[str, Any] = field(default_factory=lambda: {"format": "full"})  # what the step publishes
    weight_slot: str | None = None  # the slot carried over the published weights (format 3 on)
    evaluation: dict[str, Any] | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    tool_version: str = __version__

    def to_json(self) -> str:
        data = asdict(self)
        data["tensors"] = {"dir": STATE_DIR, "dtype": "float32", "slots": self.slots,
                           **({"compact": f"{self.weight_slot}: the published weights, plus {LOW16_PREFIX}{self.weight_slot} "
                                          "(int16 low bits: zstd frames of their palette coding KEY::pal16[a:b], "
                                          "or KEY with --state-compression none) "
                                          f"and {TIES_PREFIX}{self.weight_slot} for bfloat16 ones"}
                              if self.weight_slot else {})}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_data(cls, data: Any, where: str) -> StepState:
        """A state file's parsed JSON, validated (``io/schemas.py``); a damaged one is refused, naming the field."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ContMergeError(f"{where} is not an hf-contmerge state file.")
        version = data.get("format_version", 0)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ContMergeError(f"{where} was written by a newer hf-contmerge (format {version}); upgrade.")
        schemas.validate(schemas.StateFile, data, "state file", where, DAMAGED)
        data.pop("tensors", None)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


DAMAGED = "The step is damaged: remove that step folder (the earlier steps stay usable) and resume."


def read_state(step_folder: Path) -> StepState:
    path = Path(step_folder) / STATE_FILE
    if not path.is_file():
        raise ContMergeError(f"{step_folder} has no {STATE_FILE}; it is not an hf-contmerge step.")
    return StepState.from_data(schemas.read_json(path, "state file", DAMAGED), str(path))


def write_json_atomic(path: Path, text: str) -> None:
    """Replace a small file atomically (write beside it, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
