"""OPCM on LoRA streams in factored form (--lowrank auto) against the dense path (--lowrank off).

The two paths are the same maths (METHODS.md OPCM; the diagonal removal restricted to τ̄'s
non-zero singular directions in both), so every step's weights and λ must agree to float32
rounding; the factored state must be what the state files say, become dense exactly when the
factors stop being smaller, and resume bit-identically.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from hf_contmerge.artifacts.state import FORMAT_VERSION
from support.tiny_models import carried, llama, perturb, save, save_lora, weights

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 4


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> tuple[Path, list[Path], Path]:
    """A tiny Llama base (k/v_proj 16 x 32, so rank 12 is no longer worth factoring there), four
    rank-4 LoRA adapters on every projection, and one full fine-tune."""
    root = tmp_path_factory.mktemp("lowrank")
    torch.manual_seed(0)
    base = llama()
    base.save_pretrained(root / "base")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    config = LoraConfig(r=RANK, lora_alpha=8, target_modules=PROJ)
    out = [save_lora(base, config, 100 + i, root / f"adapter{i}", 0.1) for i in range(4)]
    fine_tune = LlamaForCausalLM(base.config)
    fine_tune.load_state_dict(state)
    full = save(perturb(fine_tune, seed=7), root / "full")
    return root / "base", out, full


def _run(cli, base: Path, stream: list[Path], out: Path, *extra: object) -> None:
    code, _, err = cli("merge", "--base", base, "--stream", *stream, "--method", "opcm", "--out", out, "--quiet",
                       "--dtype", "float32", "--chunk-mb", "0.001", *extra)
    assert code == 0, err


def _state(folder: Path) -> dict:
    return json.loads((folder / "contmerge_state.json").read_text())


def _assert_same(a: Path, b: Path, steps: int) -> None:
    for t in range(1, steps + 1):
        wa, wb = weights(a / f"step-{t}"), weights(b / f"step-{t}")
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=2e-6, rtol=1e-4, msg=lambda m: f"step {t} {k}: {m}")
        la, lb = _state(a / f"step-{t}")["scalars"]["lambda"], _state(b / f"step-{t}")["scalars"]["lambda"]
        assert la == pytest.approx(lb, rel=1e-5)


def test_factored_equals_dense_and_densifies_when_factors_stop_being_smaller(tmp_path, cli, adapters):
    base, items, _ = adapters
    _run(cli, base, items[:3], tmp_path / "lr")
    _run(cli, base, items[:3], tmp_path / "dense", "--lowrank", "off")
    _assert_same(tmp_path / "lr", tmp_path / "dense", 3)

    linear = {f"model.layers.{i}.{m}.{p}.weight" for i in range(2) for m, ps in
              (("self_attn", PROJ[:4]), ("mlp", PROJ[4:])) for p in ps} | {"lm_head.weight"}
    s1, s2, s3 = (_state(tmp_path / f"lr/step-{t}") for t in (1, 2, 3))
    embed = "model.embed_tokens.weight"  # not a linear weight: plain rule, on factors too
    assert set(s1["lowrank"]) == linear | {embed} and s1["lowrank"][embed] == 0  # lm_head, embed: untouched, rank 0
    assert s1["lowrank"]["lm_head.weight"] == 0 and s1["lowrank"]["model.layers.0.self_attn.q_proj.weight"] == RANK
    # unscaled = λ τ̄ + τ' spans τ̄'s columns and the new B's: rank 2r after step 2, generically
    assert s2["lowrank"]["model.layers.0.mlp.up_proj.weight"] == 2 * RANK
    # step 3 bound 3r = 12: 12·(16 + 32) ≥ 16·32 for k/v_proj (densified), 12·(32 + 32) < 32·32 for q_proj
    kv = {k for k in linear if "k_proj" in k or "v_proj" in k}
    assert set(s3["lowrank"]) == (linear | {embed}) - kv
    assert s3["lowrank"]["model.layers.1.self_attn.q_proj.weight"] == 3 * RANK

    state_dir = tmp_path / "lr/step-3/contmerge_state"
    factors, dense = load_file(state_dir / "lowrank-merged.safetensors"), carried(tmp_path / "lr/step-3", "merged")
    assert set(factors) == {k + s for k in (linear | {embed}) - kv for s in ("::left", "::right")}
    assert not (linear - kv) & set(dense) and kv <= set(dense)
    # the carried factors are the merged task vector: θ(3) − θ0 = L @ R
    theta3, theta0 = weights(tmp_path / "lr/step-3"), weights(base)
    k = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(factors[k + "::left"] @ factors[k + "::right"], theta3[k] - theta0[k], atol=1e-6, rtol=1e-4)
    assert not any((tmp_path / "dense/step-3/contmerge_state").glob("lowrank-*"))
    assert _state(tmp_path / "dense/step-3")["lowrank"] == {}


def test_full_item_in_a_lora_stream_makes_tensors_dense_from_then_on(tmp_path, cli, adapters):
    base, items, full = adapters
    stream = [items[0], full, items[1]]
    _run(cli, base, stream, tmp_path / "lr")
    _run(cli, base, stream, tmp_path / "dense", "--lowrank", "off")
    _assert_same(tmp_path / "lr", tmp_path / "dense", 3)
    assert _state(tmp_path / "lr/step-1")["lowrank"] and not _state(tmp_path / "lr/step-2")["lowrank"]
    assert not _state(tmp_path / "lr/step-3")["lowrank"]


def test_factored_resume_is_bit_identical(tmp_path, cli, adapters):
    base, items, _ = adapters
    _run(cli, base, items, tmp_path / "once")
    _run(cli, base, items[:2], tmp_path / "twice")
    _run(cli, base, items, tmp_path / "twice", "--resume")
    for rel in ("step-4/model.safetensors", "step-4/contmerge_state/lowrank-merged.safetensors",
                "step-4/contmerge_state/merged.safetensors", "step-4/contmerge_state.json"):
        assert (tmp_path / "once" / rel).read_bytes() == (tmp_path / "twice" / rel).read_bytes(), rel


def test_factors_of_an_older_state_format_are_refused(tmp_path, cli, adapters):
    base, items, _ = adapters
    _run(cli, base, items[:1], tmp_path / "o")
    path = tmp_path / "o/step-1/contmerge_state.json"
    text = path.read_text()
    current = f'"format_version": {FORMAT_VERSION}'
    assert current in text
    path.write_text(text.replace(current, '"format_version": 1'))
    code, _, err = cli("merge", "--base", base, "--stream", *items[:2], "--method", "opcm", "--out", tmp_path / "o",
                       "--quiet", "--resume", "--dtype", "float32")
    assert code == 2 and "state format 1" in err and not (tmp_path / "o/step-2").exists()


def test_dense_previous_step_continues_dense(tmp_path, cli, adapters):
    """A run begun with --lowrank off and resumed with auto keeps dense state (never guesses factors)."""
    base, items, _ = adapters
    _run(cli, base, items[:1], tmp_path / "o", "--lowrank", "off")
    _run(cli, base, items[:2], tmp_path / "o", "--resume")
    assert _state(tmp_path / "o/step-2")["lowrank"] == {}
    _run(cli, base, items[:2], tmp_path / "ref", "--lowrank", "off")
    _assert_same(tmp_path / "o", tmp_path / "ref", 2)


def test_factored_run_resumed_dense(tmp_path, cli, adapters):
    """--lowrank may change on resume: a factored state resumed with off is expanded, and goes on dense."""
    base, items, _ = adapters
    _run(cli, base, items[:2], tmp_path / "o")
    _run(cli, base, items[:3], tmp_path / "o", "--resume", "--lowrank", "off")
    assert _state(tmp_path / "o/step-3")["lowrank"] == {} and _state(tmp_path / "o/step-3")["options"]["lowrank"] == "off"
    _run(cli, base, items[:3], tmp_path / "ref")
    _assert_same(tmp_path / "o", tmp_path / "ref", 3)


# ---------------------------------------------------------------- --output-format adapter
def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """What a user gets: PEFT loads the published adapter on the base and merges it."""
    from peft import PeftModel

    model = LlamaForCausalLM.from_pretrained(base)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def test_adapter_output_loads_in_peft_as_the_full_merge(tmp_path, cli, adapters):
    base, items, _ = adapters
    _run(cli, base, items[:3], tmp_path / "full")
    _run(cli, base, items[:3], tmp_path / "ad", "--output-format", "adapter")
    for t in (1, 3):
        step = tmp_path / f"ad/step-{t}"
        assert (step / "adapter_config.json").is_file() and (step / "adapter_model.safetensors").is_file()
        assert not (step / "config.json").exists() and not (step / "model.safetensors").exists()
        got, want = _peft_merged(base, step), weights(tmp_path / f"full/step-{t}")
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, atol=2e-6, rtol=1e-4, msg=lambda m: f"step {t} {k}: {m}")
    state = _state(tmp_path / "ad/step-3")
    # k/v_proj densified at step 3 (rank bound 12 on 16 x 32): published in full as modules_to_save
    assert state["output"]["format"] == "adapter" and len(state["output"]["modules_to_save"]) == 4
    assert all(m.endswith(("k_proj", "v_proj")) for m in state["output"]["modules_to_save"])
    assert state["output"]["rank"] == 3 * RANK and state["output"]["truncation_relative_error"] == 0.0
    card = (tmp_path / "ad/step-3/README.md").read_text()
    assert "library_name: peft" in card and "PEFT LoRA adapter" in card


def test_max_rank_truncates_the_published_adapter_only(tmp_path, cli, adapters):
    base, items, _ = adapters
    _run(cli, base, items[:2], tmp_path / "exact", "--output-format", "adapter")
    _run(cli, base, items[:2], tmp_path / "cut", "--output-format", "adapter", "--max-rank", "3")
    rel = "step-2/contmerge_state/lowrank-merged.safetensors"
    assert (tmp_path / "exact" / rel).read_bytes() == (tmp_path / "cut" / rel).read_bytes()  # state stays exact
    cut = load_file(tmp_path / "cut/step-2/adapter_model.safetensors")
    assert max(t.shape[0] for k, t in cut.items() if "lora_A" in k) == 3
    exact_w, cut_w, theta0 = _peft_merged(base, tmp_path / "exact/step-2"), _peft_merged(base, tmp_path / "cut/step-2"), weights(base)
    lora = [k for k in theta0 if k.endswith("proj.weight")]
    err = sum(float((cut_w[k] - exact_w[k]).double().square().sum()) for k in lora)
    energy = sum(float((exact_w[k] - theta0[k]).double().square().sum()) for k in lora)
    reported = _state(tmp_path / "cut/step-2")["output"]
    assert reported["max_rank"] == 3 and reported["truncation_relative_error"] == pytest.approx((err / energy) ** 0.5, rel=1e-3)
    assert 0 < reported["truncation_relative_error"] <= reported["truncation_worst_weight"] < 1
    assert "truncated" in (tmp_path / "cut/step-2/README.md").read_text()


def test_adapter_output_with_embedding_lora_and_modules_to_save(tmp_path, cli, lora_stream):
    """Embedding LoRA (not a linear weight) is published in full: modules_to_save."""
    base, adapters_, merged = lora_stream
    _run(cli, base, adapters_, tmp_path / "ad", "--output-format", "adapter")
    _run(cli, base, merged, tmp_path / "full")
    got, want = _peft_merged(base, tmp_path / "ad/step-3"), weights(tmp_path / "full/step-3")
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    assert _state(tmp_path / "ad/step-3")["output"]["modules_to_save"] == ["model.embed_tokens"]


@pytest.mark.parametrize("args,message", [
    (("--method", "average", "--output-format", "adapter"), "has no low-rank form"),
    (("--method", "opcm", "--max-rank", "2"), "--max-rank applies to --output-format adapter only"),
    (("--method", "opcm", "--output-format", "adapter", "--lowrank", "off"), "drop --lowrank off"),
])
def test_adapter_output_refusals(tmp_path, cli, adapters, args, message):
    base, items, _ = adapters
    code, _, err = cli("merge", "--base", base, "--stream", *items[:2], *args, "--out", tmp_path / "o", "--quiet")
    assert code == 2 and message in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_adapter_output_refuses_to_continue_a_dense_run(tmp_path, cli, adapters):
    base, items, _ = adapters
    _run(cli, base, items[:1], tmp_path / "o", "--lowrank", "off")
    code, _, err = cli("merge", "--base", base, "--stream", *items[:2], "--method", "opcm", "--output-format", "adapter",
                       "--out", tmp_path / "o", "--quiet", "--resume", "--dtype", "float32")
    assert code == 2 and "carries its state dense" in err and not (tmp_path / "o/step-2").exists()


def test_adapter_output_refuses_a_full_checkpoint_in_the_stream(tmp_path, cli, adapters):
    base, items, full = adapters
    code, _, err = cli("merge", "--base", base, "--stream", items[0], full, "--method", "opcm",
                       "--output-format", "adapter", "--out", tmp_path / "o", "--quiet")
    assert code == 2 and str(full) in err and "full checkpoint" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_api_loads_an_adapter_step_as_the_merged_model(tmp_path, cli, adapters):
    """ContinualMerger(output_format="adapter").model() and load_step give the merged transformers model."""
    from hf_contmerge import ContinualMerger, load_step

    base, items, _ = adapters
    merger = ContinualMerger(base=str(base), method="opcm", out=tmp_path / "api", output_format="adapter", dtype="float32")
    merger.run([str(i) for i in items[:2]])
    _run(cli, base, items[:2], tmp_path / "full")
    want = weights(tmp_path / "full/step-2")
    for model in (merger.model(), load_step(tmp_path / "api/step-2")):
        assert type(model).__name__ == "LlamaForCausalLM"
        got = model.state_dict()
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, atol=2e-6, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def test_max_rank_may_change_on_resume(tmp_path, cli, adapters):
    """--max-rank changes only what a step publishes; the carried state is exact, so a resume may change it."""
    base, items, _ = adapters
    out = tmp_path / "o"
    _run(cli, base, items[:2], out, "--output-format", "adapter", "--max-rank", "6")
    _run(cli, base, items[:3], out, "--resume", "--output-format", "adapter", "--max-rank", "3")
    assert [_state(out / f"step-{t}")["output"]["max_rank"] for t in (2, 3)] == [6, 3]
    assert json.loads((out / "step-3" / "adapter_config.json").read_text())["r"] <= 3
    _run(cli, base, items[:3], tmp_path / "ref", "--output-format", "adapter", "--max-rank", "3")
    for name in ("contmerge_state/lowrank-merged.safetensors", "adapter_model.safetensors"):
        assert (out / "step-3" / name).read_bytes() == (tmp_path / "ref" / "step-3" / name).read_bytes(), name
