"""Code shipped with a model never runs, and nothing asks whether it may."""

from __future__ import annotations

import io
import json
import shutil
import sys

import pytest

from hf_contmerge import load_step


def _with_custom_code(src, dst, marker):
    """A copy of ``src`` whose config maps its classes to a Python file that leaves ``marker`` when run."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (dst / "config.json").write_text(json.dumps(config))
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig as EvilConfig\n"
    (dst / "configuration_evil.py").write_text(code)
    (dst / "modeling_evil.py").write_text(code)
    return dst


@pytest.mark.parametrize("where", ["base", "item"])
def test_a_model_with_custom_code_is_refused_without_a_prompt(tmp_path, cli, streams, monkeypatch, where):
    base, items = streams("llama", n=1)
    marker = tmp_path / "ran.txt"
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\n"))  # a prompt would read this and run the code
    if where == "base":
        base = _with_custom_code(base, tmp_path / "custom", marker)
    else:
        items = [_with_custom_code(items[0], tmp_path / "custom", marker)]
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "average", "--out", tmp_path / "out")
    assert code == 2 and "needs custom code" in err and "auto_map" in err and "Traceback" not in err, err
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert sys.stdin.read() == "y\ny\n"  # nobody asked


def test_loading_a_folder_with_custom_code_runs_none(tmp_path, streams, monkeypatch):
    """``load_step`` builds transformers' own class for the config's model type, never the shipped one."""
    base, _ = streams("llama", n=1)
    marker = tmp_path / "ran.txt"
    folder = _with_custom_code(base, tmp_path / "custom", marker)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    assert type(load_step(folder)).__name__ == "LlamaForCausalLM"
    assert not marker.exists() and sys.stdin.read() == "y\n"
