"""DivMerge and TRM: divergences, learned coefficients against an independent in-memory optimisation,
reductions to task arithmetic, the objectives going down, device maps, resume, bounded caches."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from hf_contmerge.calibration.data import DataSpec, load_calibration
from hf_contmerge.calibration.divergence import js, kl
from support.refusal import merge, refused
from support.tiny_models import classifier_stream, llama, perturb, save, save_tokenizer, sentences, weights

FLAGS = ["--calib-samples", "6", "--calib-batch-size", "3", "--max-length", "16"]


def _state(out, step):
    return json.loads((out / f"step-{step}" / "contmerge_state.json").read_text())


# ------------------------------------------------------------------ divergences
def test_js_and_kl_against_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g) * torch.tensor([0.1, 1, 5, 30, 80])[:, None]  # up to near-one-hot
    other = torch.randn(5, 7, generator=g) * 3
    lp, lq = torch.log_softmax(logits, -1), torch.log_softmax(other, -1)
    p, q = lp.double().exp(), lq.double().exp()
    m = (p + q) / 2
    ref_kl = (p * (p.log() - q.log())).nan_to_num().sum(-1)
    ref_js = 0.5 * ((p * (p / m).log()).nan_to_num().sum(-1) + (q * (q / m).log()).nan_to_num().sum(-1))
    torch.testing.assert_close(kl(lp, lq).double(), ref_kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(js(lp, lq).double(), ref_js, rtol=1e-4, atol=1e-6)
    assert torch.equal(js(lp, lq), js(lq, lp))  # symmetric
    assert torch.all(js(lp, lq) > 0) and torch.all(js(lp, lq) <= math.log(2) + 1e-6)
    assert torch.all(js(lp, lp) == 0) and torch.all(kl(lp, lp) == 0)
    hard = torch.log_softmax(torch.tensor([[0.0, -1e4, -1e4]]), -1)  # p with exact zeros: finite, no NaN
    assert torch.isfinite(js(hard, lq[:1, :3])).all() and torch.isfinite(kl(hard, lq[:1, :3])).all()


# ------------------------------------------------------------------ reductions and the objective
def test_all_at_once_with_fixed_coefficients_is_task_arithmetic(tmp_path, cli):
    base, items, data = classifier_stream(tmp_path, labels=(2, 3), scale=0.05)
    fixed = ["--set", "form=all", "--set", "granularity=task", "--set", "epochs=0", "--set", "init=0.4"]
    assert merge(cli, base, items, tmp_path / "dm", "--data", *data, *FLAGS, *fixed, method="divmerge")[0] == 0
    assert merge(cli, base, items, tmp_path / "ta", "--set", "scaling=0.4")[0] == 0
    for t in (1, 2):
        assert (tmp_path / "dm" / f"step-{t}/model.safetensors").read_bytes() == \
            (tmp_path / "ta" / f"step-{t}/model.safetensors").read_bytes()
    assert _state(tmp_path / "dm", 2)["scalars"]["coefficients"] == pytest.approx({"task1@all": 0.4, "task2@all": 0.4})  # float32


@pytest.mark.parametrize("family", ["classifier", "causal-lm"])
def test_continual_divmerge_lowers_its_objective_and_applies_what_it_learned(tmp_path, cli, family):
    if family == "classifier":
        base, items, data = classifier_stream(tmp_path, labels=(2, 3), scale=0.05)
    else:
        base, items, data = _llama_stream(tmp_path)
    out = tmp_path / "out"
    code, _, err = merge(cli, base, items, out, "--data", *data, *FLAGS, "--set", "gen_tokens=4", method="divmerge")
    assert code == 0, err
    learned = _state(out, 2)["stream"][1]["calibration"]["learned"]
    assert learned["objective_end"] < learned["objective_start"]  # below the task-arithmetic start (0.5, 0.5)
    # θ(t−1) is read through the outputs it served: task 1's head for classifiers, the LM head otherwise
    assert learned.get("previous_through_heads") == ([1] if family == "classifier" else None)
    coefficients = _state(out, 2)["scalars"]["coefficients"]
    assert len(coefficients) == 2 * len(learned["groups"]) and any(abs(v - 0.5) > 1e-3 for v in coefficients.values())
    b, t1, t2 = weights(base), weights(out / "step-1"), weights(items[1])
    prefix = "bert." if family == "classifier" else ""
    got = weights(out / "step-2")
    for key in b:
        if not b[key].is_floating_point():
            continue
        group = _group(key)
        old, new = coefficients[f"old@{group}"], coefficients[f"new@{group}"]
        want = b[key] + old * (t1[key] - b[key]) + new * (t2[prefix + key] - b[key])
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6)
    assert not any(p.name.startswith(".step") for p in out.iterdir())
    assert not (out / "step-2" / "_calibration").exists()  # teacher caches and placed models are gone


def _group(key: str) -> str:
    """An independent reading of the layer groups for the tiny models' names."""
    m = re.search(r"(?:layer|layers)\.(\d+)\.", key)
    if m:
        return f"layer.{m.group(1)}"
    if "embed" in key:
        return "embeddings"
    return "head" if key.startswith("lm_head") else "other"


def _llama_stream(tmp_path):
    torch.manual_seed(0)
    model = llama()
    base = save_tokenizer(save(model, tmp_path / "base"), kind="llama")
    items, data = [], []
    for i in range(2):
        torch.manual_seed(0)
        items.append(save(perturb(llama(), seed=3 + i, scale=0.05), tmp_path / f"ft{i}"))
        path = tmp_path / f"d{i}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(6, seed=40 + i)))
        data.append(path)
    return base, items, data


def test_all_at_once_equals_a_direct_in_memory_optimisation(tmp_path, cli):
    """form=all over two classifiers against the same optimisation written plainly with
    ``torch.func.functional_call``: teachers, seeded batches, JS, Adam."""
    from transformers import BertForSequenceClassification

    from hf_contmerge.calibration.fisher import sample_alone

    base, items, data = classifier_stream(tmp_path, labels=(2, 3), scale=0.05)
    out = tmp_path / "out"
    assert merge(cli, base, items, out, "--data", *data, *FLAGS, "--set", "form=all", "--set", "epochs=2",
                 method="divmerge")[0] == 0
    got = _state(out, 2)["scalars"]["coefficients"]

    b = {k: v for k, v in weights(base).items() if v.is_floating_point()}
    taus = [{k: weights(i)["bert." + k] - b[k] for k in b} for i in items]
    groups = sorted({_group(k) for k in b}, key=lambda g: (g != "embeddings", g))
    coef = torch.nn.Parameter(torch.full((2, len(groups)), 0.5))
    models, samples, teachers = [], [], []
    for item, spec in zip(items, data):
        model = BertForSequenceClassification.from_pretrained(item).eval()
        batches = load_calibration(DataSpec.parse(str(spec)), base, column=None, samples=6, seed=0, batch_size=3,
                                   max_length=16, model_kind="text").batches
        rows = [sample_alone(x, i) for x in batches for i in range(x["input_ids"].shape[0])]
        with torch.no_grad():
            teachers.append([torch.softmax(model(**r).logits[0], -1) for r in rows])
        models.append(model)
        samples.append(rows)

    def student(j, rows):
        theta = {"bert." + k: v + sum(coef[i, groups.index(_group(k))] * taus[i][k] for i in range(2)) for k, v in b.items()}
        longest = max(r["input_ids"].shape[1] for r in rows)
        batch = {k: torch.cat([torch.nn.functional.pad(r[k], (0, longest - r[k].shape[1])) for r in rows]) for k in rows[0]}
        return torch.softmax(torch.func.functional_call(models[j], theta, args=(), kwargs=batch).logits, -1)

    def js_ref(p, q):
        m = (p + q) / 2
        return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)

    optimiser = torch.optim.Adam([coef], lr=1e-2)
    g = torch.Generator().manual_seed((0 * 1_000_003 + 1) % 2**63)
    for _ in range(2):
        orders = [torch.randperm(6, generator=g).tolist() for _ in range(2)]
        for batch in range(math.ceil(6 / 4)):
            optimiser.zero_grad()
            loss = 0
            for j in range(2):
                idx = [orders[j][(batch * 4 + i) % 6] for i in range(4)]
                q = student(j, [samples[j][i] for i in idx])
                loss = loss + torch.stack([js_ref(teachers[j][i], q[n]) for n, i in enumerate(idx)]).mean()
            loss.backward()
            optimiser.step()
    want = {f"task{j + 1}@{grp}": float(coef[j, n]) for j in range(2) for n, grp in enumerate(groups)}
    assert got.keys() == want.keys()
    for k in want:
        assert abs(got[k] - want[k]) < 2e-4, (k, got[k], want[k])


# ------------------------------------------------------------------ TRM
def test_trm_lowers_its_objective_and_its_weights_switch_its_terms(tmp_path, cli):
    base, items, data = classifier_stream(tmp_path, labels=(2, 3), scale=0.05)

    def run(name, *sets):
        out = tmp_path / name
        code, _, err = merge(cli, base, items, out, "--data", *data, *FLAGS, *sum((["--set", s] for s in sets), []), method="trm")
        assert code == 0, err
        return _state(out, 2)

    full = run("full")
    learned = full["stream"][1]["calibration"]["learned"]
    assert learned["objective_end"] < learned["objective_start"]
    assert 0 < learned["init"]["c1"] < 1 and learned["init"]["c0"] == 0  # BECAME's λ* for d1, 0 for d0
    align = run("align", "beta=0", "gamma=0", "epochs=0")["stream"][1]["calibration"]["learned"]["objective_start"]
    consistent = run("consistent", "beta=1", "gamma=0", "epochs=0")["stream"][1]["calibration"]["learned"]["objective_start"]
    unsaturated = run("hinge-off", "beta=0", "gamma=5", "saturation=1.0", "epochs=0")
    saturated = run("hinge-on", "beta=0", "gamma=5", "saturation=0.01", "epochs=0")
    assert consistent > align  # the consistency KL adds to the objective
    assert unsaturated["stream"][1]["calibration"]["learned"]["objective_start"] == align  # the hinge at 1.0 is 0
    assert saturated["stream"][1]["calibration"]["learned"]["objective_start"] > align
    card = (tmp_path / "full" / "step-2" / "README.md").read_text()
    assert "Experimental" in card and "Learned coefficients" in card and "| layer.0 |" in card


# ------------------------------------------------------------------ device maps, resume, caches
def test_offloaded_divmerge_learns_the_same_coefficients(tmp_path, cli):
    base, items, data = _llama_stream(tmp_path)
    plain, mapped = tmp_path / "plain", tmp_path / "mapped"
    args = ["--data", *data, *FLAGS, "--set", "gen_tokens=3", "--set", "epochs=2"]
    assert merge(cli, base, items, plain, *args, method="divmerge")[0] == 0
    code, _, err = merge(cli, base, items, mapped, *args, "--device-map", "auto", "--max-memory", "cpu=60KB",
                         "--offload-folder", tmp_path / "offload", method="divmerge")
    assert code == 0, err
    a, b = _state(plain, 2)["scalars"]["coefficients"], _state(mapped, 2)["scalars"]["coefficients"]
    assert a.keys() == b.keys()
    assert all(abs(a[k] - b[k]) < 1e-4 for k in a), (a, b)


def test_resume_is_bit_identical_and_caches_are_bounded(tmp_path, cli):
    base, items, data = classifier_stream(tmp_path, labels=(2, 3, 2), scale=0.05)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert merge(cli, base, items, whole, "--data", *data, *FLAGS, method="divmerge")[0] == 0
    assert merge(cli, base, items[:2], parts, "--data", *data[:2], *FLAGS, method="divmerge")[0] == 0
    assert merge(cli, base, items, parts, "--data", *data, *FLAGS, "--resume", method="divmerge")[0] == 0
    for f in sorted(p.relative_to(whole) for p in (whole / "step-3").rglob("*.safetensors")):
        assert (whole / f).read_bytes() == (parts / f).read_bytes(), f
    assert _state(whole, 3)["scalars"] == _state(parts, 3)["scalars"]

    refused(merge(cli, base, items, tmp_path / "tiny", "--data", *data, *FLAGS, "--set", "cache_bytes=10", method="divmerge"),
            "cache_bytes=10", "Nothing was written")
    assert not (tmp_path / "tiny").exists()  # refused before step 1: the bound is checked from configs and sample counts


def test_a_buffer_of_past_samples_is_carried_bounded_and_scored(tmp_path, cli):
    base, items, data = _llama_stream(tmp_path)
    third = tmp_path / "d2.jsonl"
    third.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(6, seed=50)))
    items = [*items, save(perturb(weights_model(base), seed=9, scale=0.05), tmp_path / "ft2")]
    data = [*data, third]
    args = ["--data", *data, *FLAGS, "--set", "gen_tokens=3", "--set", "epochs=1"]
    out = tmp_path / "buf"
    assert merge(cli, base, items, out, *args, "--set", "buffer=4", method="divmerge")[0] == 0
    from safetensors.torch import load_file

    for step, tasks in ((1, [1, 1, 1, 1]), (2, [1, 1, 2, 2]), (3, [1, 2, 3])):  # an equal share per task, 4 at most
        folder = out / f"step-{step}" / "contmerge_state" / "buffer"
        got = [int(load_file(folder / f"{i}.safetensors")["task"][0]) for i in range(len(list(folder.iterdir())))]
        assert got == tasks, (step, got)
    learned = _state(out, 3)["stream"][2]["calibration"]["learned"]
    assert learned["buffer_used"] == 4 and learned["buffer"] == 3
    plain = tmp_path / "plain"
    assert merge(cli, base, items, plain, *args, method="divmerge")[0] == 0
    assert _state(out, 2)["scalars"]["coefficients"] != _state(plain, 2)["scalars"]["coefficients"]  # the buffer is scored
    # resume continues from the buffer the last step carries, bit for bit
    parts = tmp_path / "parts"
    assert merge(cli, base, items[:2], parts, "--data", *data[:2], *args[len(data) + 1:], "--set", "buffer=4",
                 method="divmerge")[0] == 0
    assert merge(cli, base, items, parts, *args, "--set", "buffer=4", "--resume", method="divmerge")[0] == 0
    assert (parts / "step-3/model.safetensors").read_bytes() == (out / "step-3/model.safetensors").read_bytes()
    # with a head per task, buffered samples are scored through their own task's head
    cbase, citems, cdata = classifier_stream(tmp_path / "c", labels=(2, 3, 2), scale=0.05)
    heads = tmp_path / "heads"
    assert merge(cli, cbase, citems, heads, "--data", *cdata, *FLAGS, "--set", "buffer=4", "--set", "epochs=1",
                 method="divmerge")[0] == 0
    learned = _state(heads, 3)["stream"][2]["calibration"]["learned"]
    assert learned["previous_through_heads"] == [1, 2] and learned["buffer_used"] == 4


def test_cached_teacher_outputs_are_reused_and_change_no_byte(tmp_path, cli, monkeypatch):
    """--cache-teachers: a second run over the same items computes no fine-tune outputs (only θ(t−1)'s),
    and every run, the buffer's task ids included, is bit-identical to one without the cache."""
    from hf_contmerge.calibration import learned

    monkeypatch.setenv("HF_CONTMERGE_CACHE", str(tmp_path / "cache"))
    base, items, data = _llama_stream(tmp_path)
    args = ["--data", *data, *FLAGS, "--set", "gen_tokens=3", "--set", "epochs=1", "--set", "buffer=4"]
    assert merge(cli, base, items, tmp_path / "plain", *args, method="divmerge")[0] == 0
    calls = []
    real = learned._teacher_targets
    monkeypatch.setattr(learned, "_teacher_targets", lambda *a, **k: calls.append(a[3].name) or real(*a, **k))
    for run in ("cold", "warm"):
        calls.clear()
        assert merge(cli, base, items, tmp_path / run, *args, "--cache-teachers", method="divmerge")[0] == 0
        item_calls = [c for c in calls if c.endswith("-item")]
        assert item_calls == (["teacher-0-item", "teacher-0-item"] if run == "cold" else []), (run, calls)
        for f in sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*.safetensors")):
            assert (tmp_path / run / f).read_bytes() == (tmp_path / "plain" / f).read_bytes(), (run, f)
    assert len(list((tmp_path / "cache" / "teacher-outputs").iterdir())) == 2  # one per fine-tune


def weights_model(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder)


def test_the_api_runs_the_all_at_once_form_over_the_whole_stream(tmp_path, cli):
    from hf_contmerge import ContinualMerger, ContMergeError

    base, items, data = classifier_stream(tmp_path, labels=(2, 3), scale=0.05)
    params = {"form": "all", "epochs": 1}
    merger = ContinualMerger(base=base, method="divmerge", params=params, out=tmp_path / "api", calib_samples=6,
                             calib_batch_size=3, max_length=16)
    with pytest.raises(ContMergeError, match="whole stream at once"):
        merger.step(items[0], data=data[0])
    assert not (tmp_path / "api").exists()
    merger.run(items, data=data)
    assert merge(cli, base, items, tmp_path / "cli", "--data", *data, *FLAGS, "--set", "form=all", "--set", "epochs=1",
                 method="divmerge")[0] == 0
    for t in (1, 2):
        assert (tmp_path / "api" / f"step-{t}/model.safetensors").read_bytes() == \
            (tmp_path / "cli" / f"step-{t}/model.safetensors").read_bytes()
