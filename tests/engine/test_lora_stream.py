"""LoRA adapters as stream items: every method gives what the same stream of merged checkpoints gives."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from support.reference import DATA_FREE, set_flags
from support.tiny_models import weights

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


ALL = [*DATA_FREE, ("opcm", {"alpha": 0.5})]


@pytest.mark.parametrize("method,params", ALL, ids=[m for m, _ in ALL])
def test_lora_stream_equals_merged_stream(tmp_path, cli, lora_stream, method, params):
    base, adapters, merged = lora_stream
    for name, stream in (("lora", adapters), ("full", merged), ("mixed", [adapters[0], merged[1], adapters[2]])):
        code, _, err = cli("merge", "--base", base, "--stream", *stream, "--method", method, *set_flags(params),
                           "--out", tmp_path / name, "--quiet", "--chunk-mb", "0.002")
        assert code == 0, err
    tol = 1e-5 if method == "opcm" else 1e-6  # OPCM's SVDs see τ̄ with different float32 rounding
    for t in (1, 2, 3):
        full = weights(tmp_path / f"full/step-{t}")
        for name in ("lora", "mixed"):
            got = weights(tmp_path / f"{name}/step-{t}")
            for k, v in full.items():
                torch.testing.assert_close(got[k], v, atol=tol, rtol=10 * tol, msg=lambda m: f"{name} step {t} {k}: {m}")
    state = json.loads((tmp_path / "mixed/step-3/contmerge_state.json").read_text())
    assert [s["kind"] for s in state["stream"]] == ["lora", "full", "lora"]
    assert "| lora |" in (tmp_path / "mixed/step-3/README.md").read_text()


def test_dora_and_wrong_base_adapters_are_refused(tmp_path, cli, lora_stream):
    base, adapters, _ = lora_stream
    dora = tmp_path / "dora"
    import shutil

    shutil.copytree(adapters[0], dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    code, _, err = cli("merge", "--base", base, "--stream", dora, "--method", "average", "--out", tmp_path / "o", "--quiet")
    assert code == 2 and "DoRA" in err and str(dora) in err
    assert not (tmp_path / "o").exists()
    from transformers import LlamaConfig

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    wide.save_pretrained(tmp_path / "wide-base")
    code, _, err = cli("merge", "--base", tmp_path / "wide-base", "--stream", adapters[0], "--method", "average",
                       "--out", tmp_path / "o", "--quiet")
    assert code == 2 and "adapter" in err
    assert not (tmp_path / "o").exists()
    code, _, err = cli("merge", "--base", adapters[0], "--stream", adapters[1], "--method", "average", "--out", tmp_path / "o")
    assert code == 2 and "not a base" in err
