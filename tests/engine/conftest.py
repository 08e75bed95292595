"""Fixtures of the engine tests: a LoRA stream of a tiny Llama, with PEFT's merges of it."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import LlamaForCausalLM

from support.tiny_models import llama, save_lora

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def lora_stream(tmp_path_factory):
    """A tiny Llama base, three LoRA adapters of it (different ranks/targets), and PEFT's merges of them."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = llama()
    base.save_pretrained(root / "base")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    configs = [
        LoraConfig(r=4, lora_alpha=8, target_modules=PROJ),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "lm_head"], use_rslora=True),
        LoraConfig(r=3, lora_alpha=3, target_modules=["down_proj", "embed_tokens"]),
    ]
    adapters, merged = [], []
    for i, cfg in enumerate(configs):
        adapters.append(save_lora(base, cfg, 10 + i, root / f"adapter{i}", 0.05))
        model = LlamaForCausalLM(base.config)
        model.load_state_dict(state)
        PeftModel.from_pretrained(model, adapters[-1]).merge_and_unload().save_pretrained(root / f"merged{i}")
        merged.append(root / f"merged{i}")
    return root / "base", adapters, merged
