"""Every refused input: exit status 2, one message naming the input and the fix, nothing written."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from support.refusal import merge as _merge
from support.refusal import refused as _refused
from support.tiny_models import bert, llama, perturb, save, weights


@pytest.fixture
def llama_stream(tmp_path, streams):
    base, items = streams("llama")
    return base, items, tmp_path / "out"


def _variant(tmp_path, name, model):
    return save(perturb(model, seed=7), tmp_path / name)


def test_shape_mismatch(tmp_path, cli, llama_stream):
    base, items, out = llama_stream
    from transformers import LlamaConfig, LlamaForCausalLM

    odd = _variant(tmp_path, "wide", LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)))
    _refused(_merge(cli, base, [items[0], odd], out), "mlp", "shape [32, 64]", "[32, 48]", "check --base")
    assert not out.exists()


def test_extra_layer_is_a_key_mismatch(tmp_path, cli, llama_stream):
    base, items, out = llama_stream
    from transformers import LlamaConfig, LlamaForCausalLM

    deep = _variant(tmp_path, "deep", LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)))
    _refused(_merge(cli, base, [deep], out), "model.layers.2.", "lacks")
    assert not out.exists()


def test_missing_tensor_inside_a_present_module(tmp_path, cli, llama_stream):
    base, items, out = llama_stream
    broken = shutil.copytree(items[0], tmp_path / "broken")
    sd = load_file(broken / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
    _refused(_merge(cli, base, [broken], out), "model.layers.1.mlp.up_proj.weight", "incomplete")
    assert not out.exists()


def test_vocab_mismatch(tmp_path, cli, llama_stream):
    base, items, out = llama_stream
    from transformers import LlamaConfig, LlamaForCausalLM

    bigger = _variant(tmp_path, "vocab", LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)))
    _refused(_merge(cli, base, [bigger], out), "vocabulary of 100", "96")


def test_other_model_type(tmp_path, cli, llama_stream):
    base, _, out = llama_stream
    other = save(bert(), tmp_path / "bert")
    _refused(_merge(cli, base, [other], out), "'bert'", "'llama'")


def test_tied_vs_untied(tmp_path, cli, llama_stream):
    base, _, out = llama_stream
    tied = save(llama(tied=True), tmp_path / "tied")
    _refused(_merge(cli, base, [tied], out), "tie_word_embeddings")


def test_truncated_file(tmp_path, cli, llama_stream):
    base, items, out = llama_stream
    cut = shutil.copytree(items[1], tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) - 100])
    _refused(_merge(cli, base, [items[0], cut], out), "truncated or corrupt", str(cut / "model.safetensors"))
    assert not out.exists()  # refused in the pre-flight, before step 1


def test_corrupt_header(tmp_path, cli, llama_stream):
    base, items, out = llama_stream
    bad = shutil.copytree(items[0], tmp_path / "bad")
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[10:20] = b"#" * 10
    (bad / "model.safetensors").write_bytes(bytes(data))
    _refused(_merge(cli, base, [bad], out), "truncated or corrupt", str(bad / "model.safetensors"))


def test_header_offsets_beyond_file(tmp_path, cli, llama_stream):
    base, items, out = llama_stream
    bad = shutil.copytree(items[0], tmp_path / "bad")
    path = bad / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 4
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])
    _refused(_merge(cli, base, [bad], out), "truncated or corrupt", key)


def test_missing_shard(tmp_path, cli, llama_stream):
    base, items, out = llama_stream
    sharded = tmp_path / "sharded"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(items[0]).save_pretrained(sharded, max_shard_size="20KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    _refused(_merge(cli, base, [sharded], out), shard.name, "missing", "incomplete")


def test_pickle_refused_without_opt_in_and_equal_with_it(tmp_path, cli, llama_stream):
    base, items, out = llama_stream
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(items[0] / "config.json", pickled)
    torch.save(load_file(items[0] / "model.safetensors"), pickled / "pytorch_model.bin")
    _refused(_merge(cli, base, [pickled], out), "pickle", "--allow-pickle", "safetensors")
    assert not out.exists()
    code, _, err = _merge(cli, base, [pickled], out, "--allow-pickle")
    assert code == 0, err
    ok = tmp_path / "ok"
    assert _merge(cli, base, [items[0]], ok)[0] == 0
    assert weights(out / "step-1").keys() == weights(ok / "step-1").keys()
    for k, v in weights(ok / "step-1").items():
        assert torch.equal(weights(out / "step-1")[k], v), k


def test_nonfinite_refused_when_met_and_allowed_on_request(tmp_path, cli, llama_stream):
    base, items, out = llama_stream
    nan = shutil.copytree(items[1], tmp_path / "nan")
    sd = load_file(nan / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.weight"][3, 4] = float("nan")
    save_file(sd, nan / "model.safetensors", metadata={"format": "pt"})
    _refused(_merge(cli, base, [items[0], nan], out), "NaN or Inf", "model.layers.0.self_attn.q_proj.weight",
             "Step 2 was not written", "--allow-nonfinite")
    assert sorted(p.name for p in out.iterdir()) == [".hf-contmerge.json", "step-1"]  # no partial left
    code, _, err = _merge(cli, base, [items[0], nan], out, "--resume", "--allow-nonfinite")
    assert code == 0, err
    assert torch.isnan(weights(out / "step-2")["model.layers.0.self_attn.q_proj.weight"]).any()


@pytest.mark.parametrize("sets,needles", [
    (["--set", "scaling=-1"], ["scaling", "greater than 0", "defaults"]),
    (["--set", "top_k=0.5"], ["top_k", "Extra inputs", "scaling=0.3"]),
    (["--set", "scaling"], ["KEY=VALUE"]),
    (["--set", "scaling=.inf"], ["scaling", "finite"]),
    (["--set", "scaling=.nan"], ["scaling", "finite"]),
])
def test_invalid_parameters(cli, llama_stream, sets, needles):
    base, items, out = llama_stream
    _refused(_merge(cli, base, items, out, *sets), *needles)
    assert not out.exists()


def test_unknown_method(cli, llama_stream):
    base, items, out = llama_stream
    _refused(_merge(cli, base, items, out, method="slerp"), "'slerp'", "task_arithmetic")


def test_invalid_options(cli, llama_stream):
    base, items, out = llama_stream
    _refused(_merge(cli, base, items, out, "--shard-size", "lots"), "--shard-size", "5GB")
    _refused(_merge(cli, base, items, out, "--device", "tpu"), "--device", "cuda")
    assert not out.exists()


def test_foreign_out_folder_is_never_overwritten(tmp_path, cli, llama_stream):
    base, items, _ = llama_stream
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    _refused(_merge(cli, base, items, out), "notes.txt", "not written by hf-contmerge")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "precious"
    ours = tmp_path / "ours"
    assert _merge(cli, base, items[:1], ours)[0] == 0
    (ours / "step-9").mkdir()
    _refused(_merge(cli, base, items, ours, "--resume"), "step-9", "contmerge_state.json")


def test_existing_steps_need_resume(tmp_path, cli, llama_stream):
    base, items, out = llama_stream
    assert _merge(cli, base, items[:1], out)[0] == 0
    _refused(_merge(cli, base, items, out), "--resume", "steps 1..1")


def test_sources_that_do_not_exist(tmp_path, cli, llama_stream):
    base, items, out = llama_stream
    _refused(_merge(cli, base, [tmp_path / "nowhere" / "model"], out), "neither an existing folder nor a Hub repo id")
    _refused(_merge(cli, base, [items[0] / "config.json"], out), "is a file")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(_merge(cli, base, [empty], out), "no model weights", "save_pretrained")


def test_missing_required_options(cli, llama_stream):
    base, items, _ = llama_stream
    _refused(cli("merge", "--base", base, "--stream", *items, "--method", "average"), "--out")


def test_recipe_errors(tmp_path, cli, llama_stream):
    base, items, out = llama_stream
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: x\nstreem: [a]\n")
    _refused(cli("merge", "--recipe", bad), "unknown keys", "streem")
    secret = tmp_path / "secret.yaml"
    secret.write_text("base: x\ntoken: hf_abc\n")
    err = _refused(cli("merge", "--recipe", secret), "token")
    assert "hf_abc" not in err
    _refused(cli("merge", "--recipe", tmp_path / "absent.yaml"), "does not exist")
