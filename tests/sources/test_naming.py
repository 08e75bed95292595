"""hf_contmerge.sources.naming against what transformers' own save_pretrained writes for tiny models."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    CLIPConfig,
    Dinov2Config,
    LlamaModel,
    PretrainedConfig,
    T5Config,
)

from hf_contmerge.sources.naming import (
    file_layout,
    file_names_for,
    linear_weight_file_keys,
    linear_weight_layout,
    meta_model,
    transposed_linear_file_keys,
)
from support.tiny_configs import bert, gpt2, llama, vit


def dinov2_swiglu() -> Dinov2Config:
    return Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4,
                        use_swiglu_ffn=True, architectures=["Dinov2Model"])


def t5() -> T5Config:
    return T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
                    architectures=["T5ForConditionalGeneration"])


def clip() -> CLIPConfig:
    text = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16)
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                  patch_size=4)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=8, architectures=["CLIPModel"])


CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": llama,
    "llama_tied": lambda: llama(tied=True),
    "gpt2": gpt2,
    "bert": bert,
    "vit": vit,
    "dinov2_swiglu": dinov2_swiglu,
    "t5": t5,
    "clip": clip,
}


def real_model(config: PretrainedConfig) -> torch.nn.Module:
    """The architectures[0] class with real random weights (seeded)."""
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, config.architectures[0])(config)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layout_matches_save_pretrained(name: str, tmp_path) -> None:
    """Every in-memory tensor is found, value for value, under its mapped name in the saved file."""
    model = real_model(CONFIGS[name]())
    model.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "model.safetensors")
    memory = model.state_dict()
    layout = file_layout(CONFIGS[name]())

    assert {k: tuple(v.shape) for k, v in on_disk.items()} == dict(layout.file_shapes)
    assert set(memory) == set(layout.to_file) | set(layout.tied) | layout.fused_memory_keys
    for memory_key, file_key in layout.to_file.items():
        assert torch.equal(memory[memory_key], on_disk[file_key]), (memory_key, file_key)
        assert layout.to_memory[file_key] == memory_key
    for dropped, kept in layout.tied.items():
        assert dropped not in on_disk
        assert memory[dropped].data_ptr() == memory[kept].data_ptr()
    assert layout.fused_file_keys <= set(on_disk)
    assert not layout.fused_file_keys & set(layout.to_memory)
    # A real model (not meta) gives the same map.
    assert file_names_for(model) == file_names_for(CONFIGS[name]())


def test_vit_in_memory_names_map_to_file_names() -> None:
    names = file_names_for(vit())
    layer = "vit.encoder.layer.0"
    assert names["vit.layers.0.attention.q_proj.weight"] == f"{layer}.attention.attention.query.weight"
    assert names["vit.layers.0.attention.k_proj.bias"] == f"{layer}.attention.attention.key.bias"
    assert names["vit.layers.0.attention.v_proj.weight"] == f"{layer}.attention.attention.value.weight"
    assert names["vit.layers.0.attention.o_proj.weight"] == f"{layer}.attention.output.dense.weight"
    assert names["vit.layers.0.mlp.fc1.weight"] == f"{layer}.intermediate.dense.weight"
    assert names["vit.layers.0.mlp.fc2.weight"] == f"{layer}.output.dense.weight"
    assert names["classifier.weight"] == "classifier.weight"


def test_llama_names_are_identity_and_tied_head_is_not_written() -> None:
    assert all(k == v for k, v in file_names_for(llama()).items())
    tied = file_layout(llama(tied=True))
    assert dict(tied.tied) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in tied.file_shapes


def _llama_linear(layers: int) -> set[str]:
    projections = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                   "mlp.up_proj", "mlp.down_proj"]
    return {f"model.layers.{i}.{p}.weight" for i in range(layers) for p in projections}


def test_llama_linear_weights() -> None:
    assert linear_weight_file_keys(llama()) == _llama_linear(2) | {"lm_head.weight"}
    # Tied: lm_head is absent from the file, and embed_tokens (an embedding it shares) is not listed.
    assert linear_weight_file_keys(llama(tied=True)) == _llama_linear(2)
    assert not transposed_linear_file_keys(llama())


def test_gpt2_conv1d_weights_are_transposed_linear_weights(tmp_path) -> None:
    layout = linear_weight_layout(gpt2())
    expected = {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                            "mlp.c_proj")}
    assert layout == dict.fromkeys(expected, True)  # lm_head tied to wte: not written, not listed
    # The file really stores them (in, out): c_attn maps 16 -> 3*16, c_fc 16 -> 4*16.
    shapes = file_layout(gpt2()).file_shapes
    assert shapes["transformer.h.0.attn.c_attn.weight"] == (16, 48)
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == (16, 64)


def test_vit_linear_weights_use_file_names() -> None:
    layer = "vit.encoder.layer.0"
    expected = {f"{layer}.attention.attention.{p}.weight" for p in ("query", "key", "value")}
    expected |= {f"{layer}.attention.output.dense.weight", f"{layer}.intermediate.dense.weight",
                 f"{layer}.output.dense.weight", "classifier.weight"}
    # The patch projection is a Conv2d: 4-D, not a linear weight.
    assert linear_weight_file_keys(vit()) == expected


def test_bert_linear_weights_exclude_embeddings_and_norms() -> None:
    keys = linear_weight_file_keys(bert())
    assert "bert.encoder.layer.0.attention.self.query.weight" in keys
    assert "bert.pooler.dense.weight" in keys and "classifier.weight" in keys
    assert not {k for k in keys if "embeddings" in k or "LayerNorm" in k}
    assert len(keys) == 8  # q, k, v, attention out, intermediate, output, pooler, classifier


def test_fused_file_tensors_are_not_linear_weights() -> None:
    layout = file_layout(dinov2_swiglu())
    assert layout.fused_file_keys == {"encoder.layer.0.mlp.weights_in.weight", "encoder.layer.0.mlp.weights_in.bias"}
    assert layout.file_shapes["encoder.layer.0.mlp.weights_in.weight"][1] == 16
    assert "encoder.layer.0.mlp.weights_in.weight" not in layout.linear
    assert "encoder.layer.0.mlp.weights_out.weight" in layout.linear


def test_meta_model_class_and_device() -> None:
    model = meta_model(llama())
    assert type(model).__name__ == "LlamaForCausalLM"
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    tied = meta_model(llama(tied=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    # An architecture transformers does not define falls back to the AutoModel class of the config.
    assert type(meta_model(llama(arch="NoSuchArchitecture"))) is LlamaModel
    no_arch = llama()
    no_arch.architectures = None
    assert type(meta_model(no_arch)) is LlamaModel
