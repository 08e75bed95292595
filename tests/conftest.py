"""Shared fixtures: tiny streams (built once per session), and running the CLI in-process."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# the fingerprint cache of these tests, not the user's (``io/fingerprints.py``)
os.environ.setdefault("HF_CONTMERGE_FINGERPRINT_CACHE", os.path.join(tempfile.mkdtemp(prefix="contmerge-fp-"), "fingerprints.json"))

import pytest

from support.tiny_models import make_stream


@pytest.fixture(scope="session")
def streams(tmp_path_factory):
    """``streams(family, n=3, dtype=None) -> (base_dir, [item_dirs])``, cached for the session."""
    cache: dict[tuple, tuple[Path, list[Path]]] = {}

    def get(family: str, n: int = 3, dtype=None):
        key = (family, n, dtype)
        if key not in cache:
            cache[key] = make_stream(tmp_path_factory.mktemp(f"{family}-{n}-{dtype}".replace(".", "_")), family, n, dtype)
        return cache[key]

    return get


@pytest.fixture
def cli(capsys):
    """Run ``hf-contmerge ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from hf_contmerge.cli import main

    def run(*args: object) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


from support.hub_server import hub_server  # noqa: E402,F401  (a local Hub on 127.0.0.1, see hub_server.py)
