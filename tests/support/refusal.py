"""Running a merge through the CLI in-process and asserting a clean refusal (shared by the refusal tests)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any


def merge(cli, base, items, out, *extra, method: str = "task_arithmetic") -> tuple[int, str, str]:
    return cli("merge", "--base", base, "--stream", *items, "--method", method, "--out", out, "--quiet", *extra)


def refused(result: tuple[int, str, str], *needles: str) -> str:
    """Exit status 2, no traceback, and every needle in the message; returns the message."""
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    return err


def rewrite_header(path: Path, mutate: Callable[[dict[str, Any]], Any]) -> None:
    """Rewrite a safetensors file's JSON header through ``mutate`` (which may return a replacement), data kept."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    new = mutate(header)
    blob = json.dumps(header if new is None else new).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])
