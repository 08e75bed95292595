"""OPCM on real Llama weights (SmolLM2-135M-Instruct, from a registry package; see real_llama.py).

Two LoRA adapters made with PEFT on the real base: the factored path equals the dense path, the
OPCM norm invariant holds against PEFT's own merges, the tied embedding stays tied (no
``lm_head.weight`` written), and the published steps load in transformers and run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from support.real_llama import smollm2_folder
from support.tiny_models import save_lora

TARGETS = (["q_proj", "v_proj", "down_proj"], ["q_proj", "o_proj", "up_proj"])


@pytest.fixture(scope="module")
def real_stream(tmp_path_factory) -> tuple[Path, list[Path]]:
    base = smollm2_folder()
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    root = tmp_path_factory.mktemp("smollm2")
    items = [
        save_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=t, task_type="CAUSAL_LM"), seed=10 + i,
                  folder=root / f"lora-{i}", scale=0.02)
        for i, t in enumerate(TARGETS)
    ]
    return base, items


def _merge(cli, base: Path, items: list[Path], out: Path, *extra: str) -> None:
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "opcm", "--out", out, "--quiet", *extra)
    assert code == 0, err


def _peft_task_vector_norm(base: Path, adapter: Path, base_sd: dict[str, torch.Tensor]) -> float:
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).merge_and_unload()
    sd = merged.state_dict()
    return math.sqrt(sum(float((sd[k].double() - v.double()).pow(2).sum()) for k, v in base_sd.items()))


@pytest.mark.slow
def test_opcm_lora_stream_on_real_llama(tmp_path, real_stream, cli) -> None:
    base, items = real_stream
    _merge(cli, base, items, tmp_path / "lr")
    _merge(cli, base, items, tmp_path / "dense", "--lowrank", "off")
    b = load_file(base / "model.safetensors")
    assert "lm_head.weight" not in b  # SmolLM2 ties its embeddings: the file has none
    state = json.loads((tmp_path / "lr/step-2/contmerge_state.json").read_text())
    assert state["lowrank"]["model.layers.0.self_attn.q_proj.weight"] == 16  # two rank-8 adapters
    assert state["lowrank"]["model.layers.29.mlp.down_proj.weight"] == 8
    assert json.loads((tmp_path / "dense/step-2/contmerge_state.json").read_text())["lowrank"] == {}

    lr, dense = load_file(tmp_path / "lr/step-2/model.safetensors"), load_file(tmp_path / "dense/step-2/model.safetensors")
    assert set(lr) == set(dense) == set(b)
    for k in b:
        torch.testing.assert_close(lr[k], dense[k], atol=2e-6, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    assert not torch.equal(lr["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(lr["model.layers.0.self_attn.k_proj.weight"], b["model.layers.0.self_attn.k_proj.weight"])

    # OPCM's invariant, against PEFT's own merges: ‖θ(2) − θ0‖ = mean(‖τ1‖, ‖τ2‖)
    norms = [_peft_task_vector_norm(base, a, b) for a in items]
    dist = math.sqrt(sum(float((lr[k].double() - v.double()).pow(2).sum()) for k, v in b.items()))
    assert dist == pytest.approx(sum(norms) / 2, rel=1e-4)

    # the published step loads in transformers and runs; its logits moved away from the base's
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345]])
    with torch.no_grad():
        got = LlamaForCausalLM.from_pretrained(tmp_path / "lr/step-2", dtype=torch.float32)(ids).logits
        ref = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)(ids).logits
    assert torch.isfinite(got).all() and not torch.allclose(got, ref)
