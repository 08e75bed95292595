"""Malformed inputs, numerics, options and the API, tried as a careless or hostile user would (issue 16).

Every case: exit status 2, a message naming the input (and the field), no traceback, and no new
step in --out (a new --out is not left behind at all).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from support.refusal import merge, refused, rewrite_header
from support.tiny_models import weights

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def stream(tmp_path, streams):
    base, items = streams("llama")
    return base, items, tmp_path / "out"


def copy(folder: Path, dest: Path) -> Path:
    return Path(shutil.copytree(folder, dest))


def sharded(folder: Path, dest: Path) -> Path:
    """``folder``'s weights as a two-shard checkpoint with its index."""
    dest = copy(folder, dest)
    sd = load_file(dest / "model.safetensors")
    (dest / "model.safetensors").unlink()
    keys = list(sd)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, ks in halves.items():
        save_file({k: sd[k] for k in ks}, dest / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: n for n, ks in halves.items() for k in ks}}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


# ------------------------------------------------------------------ safetensors headers


@pytest.mark.parametrize("mutate,needles", [
    (lambda h: h[Q].update(dtype=["F32"]), [Q, "dtype"]),
    (lambda h: h.update(__metadata__="format=pt"), ["__metadata__", "strings to strings"]),
    (lambda h: h.update(__metadata__=["pt"]), ["__metadata__"]),
    (lambda h: h.update(__metadata__={"format": "pt", "nested": {"a": "b"}}), ["__metadata__", "strings to strings"]),
    (lambda h: h[Q].update(shape="32x32"), [Q, "shape"]),
    (lambda h: h[Q].update(data_offsets=[0]), [Q, "data_offsets"]),
    (lambda h: h[Q].pop("dtype") and None, [Q, "dtype", "required"]),
    (lambda h: [h], ["list, not an object"]),
])
def test_malformed_safetensors_header(tmp_path, cli, stream, mutate, needles):
    base, items, out = stream
    bad = copy(items[0], tmp_path / "bad")
    rewrite_header(bad / "model.safetensors", mutate)
    refused(merge(cli, base, [bad], out), str(bad / "model.safetensors"), "truncated or corrupt", *needles)
    assert not out.exists()


# ------------------------------------------------------------------ shard index


@pytest.mark.parametrize("weight_map,needles", [
    (["model-00001-of-00002.safetensors"], ["weight_map", "valid dictionary"]),
    ("model-00001-of-00002.safetensors", ["weight_map", "valid dictionary"]),
    ({Q: 1}, [f"weight_map.{Q}", "valid string", "integer 1"]),
    ({Q: ["a"]}, [f"weight_map.{Q}", "valid string"]),
    ({Q: None}, [f"weight_map.{Q}", "null"]),
    ({}, ["weight_map", "at least 1"]),
])
def test_malformed_shard_index(tmp_path, cli, stream, weight_map, needles):
    base, items, out = stream
    bad = sharded(items[0], tmp_path / "bad")
    (bad / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    refused(merge(cli, base, [bad], out), "model.safetensors.index.json", "shard index", *needles, "save_pretrained")
    assert not out.exists()


def test_shard_index_not_utf8_and_not_json(tmp_path, cli, stream):
    base, items, out = stream
    bad = sharded(items[0], tmp_path / "bad")
    (bad / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"\xff\xfe": "x"}}')
    refused(merge(cli, base, [bad], out), "model.safetensors.index.json", "not UTF-8")
    (bad / "model.safetensors.index.json").write_text('{"weight_map": ')
    refused(merge(cli, base, [bad], out), "model.safetensors.index.json", "not valid JSON")
    assert not out.exists()


def test_sharded_item_merges_like_the_single_file(tmp_path, cli, stream):
    base, items, out = stream
    assert merge(cli, base, [sharded(items[0], tmp_path / "sharded")], out)[0] == 0
    assert merge(cli, base, [items[0]], tmp_path / "single")[0] == 0
    assert (out / "step-1" / "model.safetensors").read_bytes() == (tmp_path / "single" / "step-1" / "model.safetensors").read_bytes()


# ------------------------------------------------------------------ config.json


@pytest.mark.parametrize("role", ["base", "item"])
@pytest.mark.parametrize("content,needles", [
    ("[1, 2]", ["must hold a JSON object, not a list"]),
    ('"llama"', ["must hold a JSON object, not a string"]),
    ('{"model_type": 3}', ["model_type", "valid string"]),
    ('{"architectures": "LlamaForCausalLM"}', ["architectures", "valid list"]),
    ('{"model_type": ', ["not valid JSON"]),
])
def test_malformed_config(tmp_path, cli, stream, role, content, needles):
    base, items, out = stream
    if role == "base":
        base = copy(base, tmp_path / "bad")
        (base / "config.json").write_text(content)
        target = base
    else:
        target = copy(items[0], tmp_path / "bad")
        (target / "config.json").write_text(content)
    refused(merge(cli, base, [target if role == "item" else items[0]], out), str(target / "config.json"), *needles)
    assert not out.exists()


# ------------------------------------------------------------------ adapters


@pytest.fixture
def adapter(tmp_path, stream):
    from peft import LoraConfig

    from support.tiny_models import save_lora

    base, _, _ = stream
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    return save_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 3, tmp_path / "lora", 0.05)


@pytest.mark.parametrize("edit,needles", [
    (lambda c: "{not json", ["not valid JSON"]),
    (lambda c: json.dumps([c]), ["must hold a JSON object, not a list"]),
    (lambda c: json.dumps({**c, "lora_alpha": "16"}), ["lora_alpha", "valid number", 'string "16"']),
    (lambda c: json.dumps({**c, "r": 0}), ["`r`", "greater than 0"]),
    (lambda c: json.dumps({**c, "lora_alpha": float("nan")}), ["lora_alpha", "finite"]),
    (lambda c: json.dumps({**c, "rank_pattern": {"q_proj": "4"}}), ["rank_pattern.q_proj", "valid integer"]),
])
def test_malformed_adapter_config(cli, stream, adapter, edit, needles):
    base, _, out = stream
    path = adapter / "adapter_config.json"
    path.write_text(edit(json.loads(path.read_text())))
    refused(merge(cli, base, [adapter], out), str(path), *needles, "save_pretrained")
    assert not out.exists()


def test_truncated_adapter_weights(cli, stream, adapter):
    base, _, out = stream
    path = adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-50])
    refused(merge(cli, base, [adapter], out), str(path), "truncated or corrupt")
    assert not out.exists()


# ------------------------------------------------------------------ pickles that ask for code


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["full", "adapter"])
def test_malicious_pickle_refused_even_with_the_opt_in(tmp_path, cli, stream, adapter, kind):
    base, items, out = stream
    marker = tmp_path / "ran"
    if kind == "full":
        bad = tmp_path / "evil"
        bad.mkdir()
        shutil.copy(items[0] / "config.json", bad)
        path = bad / "pytorch_model.bin"
    else:
        bad = adapter
        (bad / "adapter_model.safetensors").unlink()
        path = bad / "adapter_model.bin"
    torch.save({Q: torch.zeros(2), "evil": _Evil(marker)}, path)
    refused(merge(cli, base, [bad], out, "--allow-pickle"), str(path), "unsafe even with --allow-pickle")
    assert not marker.exists() and not out.exists()


# ------------------------------------------------------------------ the state of a step, on --resume


@pytest.fixture
def opcm_step(cli, stream):
    base, items, out = stream
    assert merge(cli, base, items[:1], out, method="opcm")[0] == 0
    return base, items, out, out / "step-1" / "contmerge_state.json"


def _edit_state(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    new = edit(data)  # a list replaces the whole file; anything else is the result of an edit in place
    path.write_text(json.dumps(new if isinstance(new, list) else data))


@pytest.mark.parametrize("edit,needles", [
    (lambda d: [d], ["not an hf-contmerge state file"]),
    (lambda d: d.pop("base"), ["`base`", "required"]),
    (lambda d: d.pop("stream") and None, ["`stream`", "required"]),
    (lambda d: d.update(step="1"), ["`step`", "valid integer"]),
    (lambda d: d["base"].pop("fingerprint"), ["base.fingerprint", "required"]),
    (lambda d: d.update(stream=[]), ["`stream`", "0 stream items for step 1"]),
    (lambda d: d["scalars"].pop("lambda"), ["lambda", "lacks"]),
    (lambda d: d["scalars"].update(norm_sum="big"), ["norm_sum", "not a float"]),
])
def test_damaged_state_refused_on_resume(cli, opcm_step, edit, needles):
    base, items, out, path = opcm_step
    _edit_state(path, edit)
    refused(merge(cli, base, items[:2], out, "--resume", method="opcm"), *needles)
    assert sorted(p.name for p in out.iterdir()) == [".hf-contmerge.json", "step-1"]


def test_state_tensor_missing_or_of_the_wrong_shape(cli, opcm_step):
    """The tiny models are float32, so the carried ``merged`` slot is the published weights themselves
    (``artifacts/compact.py``): damaging those damages the state."""
    base, items, out, _ = opcm_step
    assert Q not in load_file(out / "step-1" / "contmerge_state" / "merged.safetensors")
    path = out / "step-1" / "model.safetensors"
    slot = load_file(path)
    saved = dict(slot)
    slot[Q] = slot[Q][:, :5].contiguous()
    save_file(slot, path)
    refused(merge(cli, base, items[:2], out, "--resume", method="opcm"), Q, "expected float32 [32, 32]", "F32 [32, 5]")
    del slot[Q]
    save_file(slot, path)
    refused(merge(cli, base, items[:2], out, "--resume", method="opcm"), Q, "holds nothing")
    save_file(saved, path)
    assert merge(cli, base, items[:2], out, "--resume", method="opcm")[0] == 0  # repaired: resume finishes


# ------------------------------------------------------------------ recipes


def test_recipe_folder_not_utf8_and_params_not_a_mapping(tmp_path, cli, stream):
    base, items, out = stream
    refused(cli("merge", "--recipe", tmp_path), "is a folder")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"base: caf\xe9\n")
    refused(cli("merge", "--recipe", latin), "not UTF-8")
    listed = tmp_path / "listed.yaml"
    listed.write_text(f"base: {base}\nstream: [{items[0]}]\nmethod: task_arithmetic\nout: {out}\nparams: [0.5]\n")
    refused(cli("merge", "--recipe", listed, "--set", "scaling=0.5"), "`params` must be a mapping")
    assert not out.exists()


# ------------------------------------------------------------------ numerics


def test_nonfinite_base_refused(tmp_path, cli, stream):
    base, items, out = stream
    bad = copy(base, tmp_path / "nanbase")
    sd = load_file(bad / "model.safetensors")
    sd[Q][0, 0] = float("inf")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    refused(merge(cli, bad, items[:1], out), "the base", Q, "NaN or Inf", "--allow-nonfinite")
    assert not out.exists()
    assert merge(cli, bad, items[:1], out, "--allow-nonfinite")[0] == 0


def test_overflow_in_the_kernel_refused(cli, stream):
    base, items, out = stream
    err = refused(merge(cli, base, items[:1], out, "--set", "scaling=1e39"), "arithmetic overflowed float32", "Step 1 was not written")
    assert "tensor '" in err
    assert not out.exists()


def test_output_dtype_range_refused(tmp_path, cli, stream):
    base, items, out = stream
    big = copy(items[0], tmp_path / "big")
    sd = load_file(big / "model.safetensors")
    sd[Q][1, 1] = 1e5
    save_file(sd, big / "model.safetensors", metadata={"format": "pt"})
    refused(merge(cli, base, [big], out, "--dtype", "float16", "--set", "scaling=1"), Q, "range of float16", "65504", "bfloat16")
    assert not out.exists()
    assert merge(cli, base, [big], out, "--dtype", "bfloat16", "--set", "scaling=1")[0] == 0


# ------------------------------------------------------------------ options


def test_shards_smaller_than_a_tensor(tmp_path, cli, stream):
    base, items, out = stream
    code, _, err = merge(cli, base, items[:2], out, "--shard-size", "1KB")
    assert code == 0, err
    index = json.loads((out / "step-2" / "model.safetensors.index.json").read_text())
    assert merge(cli, base, items[:2], tmp_path / "whole")[0] == 0
    ref = weights(tmp_path / "whole" / "step-2")
    got = weights(out / "step-2")
    assert got.keys() == ref.keys() == index["weight_map"].keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "step-2")  # transformers reads the shards


def test_size_and_chunk_options(tmp_path, cli, stream):
    base, items, out = stream
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {base}\nstream: [{items[0]}]\nmethod: average\nout: {out}\nshard_size: 1000000\n")
    assert cli("merge", "--recipe", recipe, "--quiet")[0] == 0
    refused(merge(cli, base, items[:1], tmp_path / "o2", "--chunk-mb", "inf"), "--chunk-mb", "finite")
    refused(merge(cli, base, items[:1], tmp_path / "o2", "--chunk-mb", "nan"), "--chunk-mb")
    assert not (tmp_path / "o2").exists()


def test_out_dangling_link_and_out_inside_a_source(tmp_path, cli, stream):
    base, items, _ = stream
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    refused(merge(cli, base, items[:1], link), "symbolic link", "does not exist")
    assert not (tmp_path / "gone").exists()
    inside_base = copy(base, tmp_path / "base")
    before = sorted(p.name for p in inside_base.iterdir())
    refused(merge(cli, inside_base, items[:1], inside_base / "runs"), "inside the --base folder")
    item = copy(items[0], tmp_path / "item")
    refused(merge(cli, inside_base, [item], item), "inside the --stream item folder")
    assert sorted(p.name for p in inside_base.iterdir()) == before


# ------------------------------------------------------------------ the disk


def _failing(exc: OSError):
    def fail(*args, **kwargs):
        raise exc
    return fail


@pytest.mark.parametrize("where,exc,needle", [
    ("writer", OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
    ("claim", OSError(errno.EROFS, "Read-only file system", "out"), "read-only"),
    ("partial", PermissionError(errno.EACCES, "Permission denied", "out/.step-2.partial"), "permission denied"),
])
def test_disk_errors_keep_earlier_steps(cli, stream, monkeypatch, where, exc, needle):
    base, items, out = stream
    assert merge(cli, base, items[:1], out)[0] == 0
    before = (out / "step-1" / "model.safetensors").read_bytes()
    from hf_contmerge.artifacts import layout
    from hf_contmerge.io.writer import StreamingWriter

    target = {"writer": (StreamingWriter, "write"), "claim": (layout, "claim"), "partial": (layout, "new_partial")}[where]
    monkeypatch.setattr(*target, _failing(exc))
    refused(merge(cli, base, items[:2], out, "--resume"), needle, "--resume", "intact")
    assert sorted(p.name for p in out.iterdir()) == [".hf-contmerge.json", "step-1"]
    assert (out / "step-1" / "model.safetensors").read_bytes() == before
    monkeypatch.undo()
    assert merge(cli, base, items[:2], out, "--resume")[0] == 0


def test_out_under_a_file_is_refused(tmp_path, cli, stream):
    base, items, _ = stream
    (tmp_path / "file").write_text("x")
    refused(merge(cli, base, items[:1], tmp_path / "file" / "out"), "cannot be created")


# ------------------------------------------------------------------ the Python API


def test_api_takes_paths_and_notices_a_deleted_out(tmp_path, stream):
    from hf_contmerge import ContinualMerger
    from hf_contmerge.errors import ContMergeError

    base, items, out = stream
    merger = ContinualMerger(base=Path(base), method="task_arithmetic", out=out)
    result = merger.step(Path(items[0]))
    assert result.state.stream[0]["source"] == str(items[0])
    shutil.rmtree(out)
    with pytest.raises(ContMergeError, match="changed under this merger"):
        merger.step(items[1])
    assert merger.history == [str(items[0])] and not out.exists()


# ------------------------------------------------------------------ a changed base on resume


def test_changed_base_is_noticed_on_resume(tmp_path, cli, stream):
    _, items, out = stream
    base = copy(stream[0], tmp_path / "base")
    assert merge(cli, base, items[:1], out)[0] == 0
    recorded = json.loads((out / "step-1" / "contmerge_state.json").read_text())["base"]["fingerprint"]
    assert recorded.startswith("sha256:")
    sd = load_file(base / "model.safetensors")
    flat = sd["model.embed_tokens.weight"].view(-1)
    flat[100:1100] = 7.0  # 1000 values inside the file: a sampled fingerprint would miss them
    save_file(sd, base / "model.safetensors", metadata={"format": "pt"})
    refused(merge(cli, base, items[:2], out, "--resume"), f"The base {str(base)!r}", "content changed", recorded)
    assert sorted(p.name for p in out.iterdir()) == [".hf-contmerge.json", "step-1"]


def test_the_same_weights_saved_otherwise_are_the_same_base(tmp_path, cli, stream):
    base, items, out = stream
    assert merge(cli, base, items[:1], out)[0] == 0
    resharded = sharded(base, tmp_path / "resharded")
    assert merge(cli, resharded, items[:2], out, "--resume")[0] == 2  # the base is given as another path: refused
    state = out / "step-1" / "contmerge_state.json"
    data = json.loads(state.read_text())
    data["base"]["source"] = str(resharded)  # the user moved the base: same tensors, other files
    state.write_text(json.dumps(data))
    code, _, err = merge(cli, resharded, items[:2], out, "--resume")
    assert code == 0, err


def test_a_step_with_a_legacy_fingerprint_resumes_on_its_base(tmp_path, cli, stream):
    from hf_contmerge.io.checkpoint import Checkpoint, legacy_fingerprint

    _, items, out = stream
    base = copy(stream[0], tmp_path / "base")
    assert merge(cli, base, items[:1], out)[0] == 0
    state = out / "step-1" / "contmerge_state.json"
    data = json.loads(state.read_text())
    data["base"]["fingerprint"] = legacy_fingerprint(Checkpoint.open(base))  # what 0.1 recorded
    state.write_text(json.dumps(data))
    code, _, err = merge(cli, base, items[:2], out, "--resume")
    assert code == 0, err
    sd = load_file(base / "model.safetensors")
    sd["model.norm.weight"] += 1  # the header and the samples notice a change near the end of the file
    save_file(sd, base / "model.safetensors", metadata={"format": "pt"})
    refused(merge(cli, base, items, out, "--resume"), "content changed")
