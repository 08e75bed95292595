"""Tiny configs (no weights) shared by the naming and LoRA tests: names, shapes and module types."""

from __future__ import annotations

from transformers import BertConfig, GPT2Config, LlamaConfig, ViTConfig


def llama(hidden: int = 16, layers: int = 2, tied: bool = False, arch: str = "LlamaForCausalLM") -> LlamaConfig:
    return LlamaConfig(vocab_size=40, hidden_size=hidden, intermediate_size=24, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied, architectures=[arch])


def gpt2() -> GPT2Config:
    return GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0,
                      architectures=["GPT2LMHeadModel"])


def bert() -> BertConfig:
    return BertConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                      max_position_embeddings=32, num_labels=3, architectures=["BertForSequenceClassification"])


def vit() -> ViTConfig:
    return ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, image_size=8,
                     patch_size=4, num_labels=3, architectures=["ViTForImageClassification"])
