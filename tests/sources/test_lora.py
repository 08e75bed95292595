"""LoraAdapter against PEFT's own merge: base file + delta == file of merge_and_unload().save_pretrained()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig

from hf_contmerge.errors import ContMergeError
from hf_contmerge.sources.lora_adapter import AdapterError, LoraAdapter
from support.tiny_configs import bert, gpt2, llama, vit

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(config: PretrainedConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(transformers, config.architectures[0])(config)


def train_adapter(root: Path, config: PretrainedConfig, lora: LoraConfig | IA3Config,
                  safe_serialization: bool = True) -> tuple[dict, dict, Path]:
    """Base files, files of PEFT's merge_and_unload(), and the adapter folder, for random non-zero adapter weights."""
    model = _model(config)
    model.save_pretrained(root / "base")
    peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:  # LoRA factors (B starts at zero), modules_to_save copies, trained biases
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(root / "adapter", safe_serialization=safe_serialization)
    peft_model.merge_and_unload().save_pretrained(root / "merged")
    return load_file(root / "base" / "model.safetensors"), load_file(root / "merged" / "model.safetensors"), \
        root / "adapter"


def assert_reproduces_merge(adapter: LoraAdapter, base: dict, merged: dict) -> None:
    """For every file tensor: base + delta (targets), replacement (full tensors) or base equals PEFT's merge."""
    assert set(merged) == set(base)
    adapter.verify_base_copies(base.__getitem__)
    touched = set(adapter.target_file_keys()) | set(adapter.replacement_keys())
    assert touched <= set(base)
    for key, expected in merged.items():
        if key in adapter.target_file_keys():
            delta = adapter.delta(key)
            assert delta.dtype == torch.float32 and delta.abs().max() > 1e-3
            got = base[key].float() + delta
        elif key in adapter.replacement_keys():
            got = adapter.replacement(key)
            assert adapter.replacement_shape(key) == tuple(got.shape)
        else:
            got = base[key]
        assert not (key in touched and torch.equal(base[key], expected)), f"{key}: PEFT's merge left it unchanged"
        torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6, msg=key)


def _llama_targets(layers: int = 2) -> set[str]:
    return {f"model.layers.{i}.{'self_attn' if p in LLAMA_PROJECTIONS[:4] else 'mlp'}.{p}.weight"
            for i in range(layers) for p in LLAMA_PROJECTIONS}


def test_llama_linear_and_untied_lm_head(tmp_path) -> None:
    base, merged, folder = train_adapter(tmp_path, llama(), LoraConfig(r=4, lora_alpha=8, target_modules=[
        *LLAMA_PROJECTIONS, "lm_head"]))
    adapter = LoraAdapter.from_dir(folder, llama())
    assert set(adapter.target_file_keys()) == _llama_targets() | {"lm_head.weight"}
    b, a, scaling = adapter.factors("model.layers.0.self_attn.q_proj.weight")
    assert b.shape == (16, 4) and a.shape == (4, 16) and scaling == 2.0
    assert_reproduces_merge(adapter, base, merged)


def test_rslora_rank_and_alpha_patterns(tmp_path) -> None:
    lora = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=LLAMA_PROJECTIONS,
                      rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"v_proj": 3})
    base, merged, folder = train_adapter(tmp_path, llama(), lora)
    adapter = LoraAdapter.from_dir(folder, llama())
    assert adapter.rank("model.layers.0.self_attn.q_proj.weight") == 2
    assert adapter.rank("model.layers.1.mlp.down_proj.weight") == 6
    assert adapter.rank("model.layers.0.mlp.down_proj.weight") == 4
    assert adapter.factors("model.layers.0.self_attn.v_proj.weight")[2] == pytest.approx(3 / 2)  # 3 / sqrt(4)
    assert adapter.factors("model.layers.0.self_attn.q_proj.weight")[2] == pytest.approx(8 / 2 ** 0.5)
    assert_reproduces_merge(adapter, base, merged)


def test_embedding_lora(tmp_path) -> None:
    base, merged, folder = train_adapter(tmp_path, llama(), LoraConfig(r=3, lora_alpha=6, target_modules=[
        "embed_tokens", "q_proj"]))
    adapter = LoraAdapter.from_dir(folder, llama())
    b, a, _ = adapter.factors("model.embed_tokens.weight")
    assert b.shape == (40, 3) and a.shape == (3, 16)  # file layout (num_embeddings, dim)
    assert adapter.base_copy_keys() == ["model.embed_tokens.weight"]  # PEFT's save_embedding_layers copy
    assert_reproduces_merge(adapter, base, merged)
    edited = dict(base, **{"model.embed_tokens.weight": base["model.embed_tokens.weight"] + 1})
    with pytest.raises(AdapterError, match="differs from the given base"):
        adapter.verify_base_copies(edited.__getitem__)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_gpt2_conv1d_and_tied_embedding(tmp_path, fan_in_fan_out: bool) -> None:
    """PEFT sets fan_in_fan_out per module type whatever the config says; Conv1D files are (in, out)."""
    lora = LoraConfig(r=4, lora_alpha=4, fan_in_fan_out=fan_in_fan_out, target_modules=["c_attn", "c_proj", "c_fc",
                                                                                       "wte"])
    base, merged, folder = train_adapter(tmp_path, gpt2(), lora)
    adapter = LoraAdapter.from_dir(folder, gpt2())
    b, a, _ = adapter.factors("transformer.h.0.attn.c_attn.weight")
    assert b.shape == (16, 4) and a.shape == (4, 48)
    assert "transformer.wte.weight" in adapter.target_file_keys()  # lm_head is tied to it and not in the file
    assert_reproduces_merge(adapter, base, merged)


def test_bert_classifier_modules_to_save(tmp_path) -> None:
    lora = LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value", "dense"])
    base, merged, folder = train_adapter(tmp_path, bert(), lora)
    adapter = LoraAdapter.from_dir(folder, bert())
    assert adapter.replacement_keys() == ["classifier.bias", "classifier.weight"]
    assert "bert.encoder.layer.0.attention.self.query.weight" in adapter.target_file_keys()
    assert_reproduces_merge(adapter, base, merged)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_are_replacements(tmp_path, bias: str) -> None:
    base, merged, folder = train_adapter(tmp_path, bert(), LoraConfig(r=2, target_modules=["query", "dense"],
                                                                      bias=bias))
    adapter = LoraAdapter.from_dir(folder, bert())
    assert "bert.encoder.layer.0.attention.self.query.bias" in adapter.replacement_keys()
    assert ("bert.embeddings.LayerNorm.bias" in adapter.replacement_keys()) == (bias == "all")
    assert_reproduces_merge(adapter, base, merged)


VIT_LAYER = "vit.encoder.layer.0"
VIT_TARGETS = {f"{VIT_LAYER}.attention.attention.query.weight", f"{VIT_LAYER}.attention.attention.value.weight",
               f"{VIT_LAYER}.intermediate.dense.weight"}


@pytest.fixture(scope="module")
def vit_case(tmp_path_factory) -> tuple[dict, dict, Path]:
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"], modules_to_save=["classifier"])
    return train_adapter(tmp_path_factory.mktemp("vit"), vit(), lora)


def test_vit_in_memory_names_land_on_file_names(vit_case) -> None:
    base, merged, folder = vit_case
    keys = load_file(folder / "adapter_model.safetensors")
    assert "base_model.model.vit.layers.0.attention.q_proj.lora_A.weight" in keys  # PEFT writes in-memory names
    adapter = LoraAdapter.from_dir(folder, vit())
    assert set(adapter.target_file_keys()) == VIT_TARGETS
    assert adapter.replacement_keys() == ["classifier.bias", "classifier.weight"]
    assert_reproduces_merge(adapter, base, merged)


def _rewrite(folder: Path, out: Path, rename) -> Path:
    """Copy an adapter folder with its tensor keys renamed by ``rename``."""
    out.mkdir()
    (out / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    save_file({rename(k): v for k, v in load_file(folder / "adapter_model.safetensors").items()},
              out / "adapter_model.safetensors")
    return out


def _with_adapter_name(key: str) -> str:  # the names of PEFT's in-memory state_dict
    for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
        key = key.replace(f".{part}.weight", f".{part}.default.weight")
        if key.endswith(f".{part}"):
            key += ".default"
    return key.replace("classifier.", "classifier.modules_to_save.default.")


def _legacy_vit_names(key: str) -> str:  # what PEFT under transformers 4 wrote (file names)
    return (key.replace("vit.layers.0.attention.q_proj", f"{VIT_LAYER}.attention.attention.query")
            .replace("vit.layers.0.attention.v_proj", f"{VIT_LAYER}.attention.attention.value")
            .replace("vit.layers.0.mlp.fc1", f"{VIT_LAYER}.intermediate.dense"))


def _without_peft_prefix(key: str) -> str:
    return key.removeprefix("base_model.model.")


@pytest.mark.parametrize("rename", [_with_adapter_name, _legacy_vit_names, _without_peft_prefix],
                         ids=["adapter-name", "file-names", "no-prefix"])
def test_key_spellings_give_the_same_deltas(vit_case, tmp_path, rename) -> None:
    base, merged, folder = vit_case
    adapter = LoraAdapter.from_dir(_rewrite(folder, tmp_path / "variant", rename), vit())
    assert set(adapter.target_file_keys()) == VIT_TARGETS
    assert_reproduces_merge(adapter, base, merged)


def test_adapter_on_base_model_applies_to_task_model(tmp_path) -> None:
    """Keys of an adapter trained on LlamaModel (no ``model.`` prefix) land on LlamaForCausalLM's file keys."""
    base, merged, folder = train_adapter(tmp_path, llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    stripped = _rewrite(folder, tmp_path / "stripped",
                        lambda k: k.replace("base_model.model.model.", "base_model.model."))
    adapter = LoraAdapter.from_dir(stripped, llama())
    assert set(adapter.target_file_keys()) == {"model.layers.0.self_attn.q_proj.weight",
                                               "model.layers.1.self_attn.q_proj.weight"}
    assert_reproduces_merge(adapter, base, merged)


def test_pickle_needs_opt_in(tmp_path) -> None:
    base, merged, folder = train_adapter(tmp_path, llama(), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]),
                                         safe_serialization=False)
    assert (folder / "adapter_model.bin").is_file() and not (folder / "adapter_model.safetensors").exists()
    with pytest.raises(AdapterError, match="allow_pickle=True") as refused:
        LoraAdapter.from_dir(folder, llama())
    assert str(folder) in str(refused.value)
    assert_reproduces_merge(LoraAdapter.from_dir(folder, llama(), allow_pickle=True), base, merged)


def test_declared_base(tmp_path) -> None:
    *_, folder = train_adapter(tmp_path, llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert LoraAdapter.from_dir(folder, llama()).declared_base() is None
    _edit_config(folder, base_model_name_or_path="org/base-model")
    assert LoraAdapter.from_dir(folder, llama()).declared_base() == "org/base-model"


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def test_refuses_dora(tmp_path) -> None:
    *_, folder = train_adapter(tmp_path, llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(AdapterError, match="DoRA"):
        LoraAdapter.from_dir(folder, llama())


def test_refuses_other_peft_types(tmp_path) -> None:
    *_, folder = train_adapter(tmp_path, llama(), IA3Config(target_modules=["q_proj", "down_proj"],
                                                           feedforward_modules=["down_proj"]))
    with pytest.raises(AdapterError, match="IA3 PEFT adapter; only LoRA"):
        LoraAdapter.from_dir(folder, llama())


def test_refuses_wrong_base_shapes(tmp_path) -> None:
    *_, folder = train_adapter(tmp_path, llama(hidden=16), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="different base") as refused:
        LoraAdapter.from_dir(folder, llama(hidden=32))
    assert "model.layers.0.self_attn.q_proj.weight" in str(refused.value)
    assert isinstance(refused.value, ValueError) and isinstance(refused.value, ContMergeError)


def test_refuses_target_the_base_lacks(tmp_path) -> None:
    *_, folder = train_adapter(tmp_path, llama(layers=2), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match=r"model\.layers\.1\.self_attn\.q_proj.*does not exist"):
        LoraAdapter.from_dir(folder, llama(layers=1))


def test_refuses_conv2d_lora(tmp_path) -> None:
    *_, folder = train_adapter(tmp_path, vit(), LoraConfig(r=2, target_modules=["projection", "q_proj"]))
    with pytest.raises(AdapterError, match="Conv2d"):
        LoraAdapter.from_dir(folder, vit())


def test_refuses_tied_lm_head(tmp_path) -> None:
    *_, folder = train_adapter(tmp_path, llama(tied=True), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(AdapterError, match="tied to 'model.embed_tokens.weight'"):
        LoraAdapter.from_dir(folder, llama(tied=True))


@pytest.mark.parametrize(("changes", "match"), [
    ({"init_lora_weights": "pissa_niter_4"}, "path_initial_model_for_weight_conversion"),
    ({"use_qalora": True}, "use_qalora"),
    ({"some_future_option": {"enabled": True}}, "some_future_option"),
    ({"peft_type": "LOHA"}, "LOHA"),
    ({"r": 3}, "rank 2 in the weights but 3"),
])
def test_refuses_options_that_change_the_merge(tmp_path, changes: dict, match: str) -> None:
    *_, folder = train_adapter(tmp_path, llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    _edit_config(folder, **changes)
    with pytest.raises(AdapterError, match=match):
        LoraAdapter.from_dir(folder, llama())


def test_refuses_unexpected_full_tensor(tmp_path) -> None:
    *_, folder = train_adapter(tmp_path, llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.model.norm.weight"] = torch.ones(16)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="neither a LoRA factor nor part of modules_to_save"):
        LoraAdapter.from_dir(folder, llama())
