"""Backbones and task models: alignment of names, task heads kept apart, modules an item lacks."""

from __future__ import annotations

import json

import torch

from hf_contmerge import load_task_model
from support.tiny_models import bert, bert_classifier, perturb, save, vit, vit_classifier, weights


def _classifier_stream(tmp_path, backbone, classifier, labels):
    """A bare backbone base and classifiers over it (fine-tuned backbone, new head each)."""
    torch.manual_seed(0)
    base = backbone()
    base_dir = save(base, tmp_path / "base")
    items = []
    for i, n in enumerate(labels):
        torch.manual_seed(10 + i)
        model = classifier(n)
        prefix = model.base_model_prefix
        getattr(model, prefix).load_state_dict(base.state_dict(), strict=False)
        items.append(save(perturb(model, seed=20 + i), tmp_path / f"task{i}"))
    return base_dir, items


def test_bert_classifiers_over_bare_base(tmp_path, cli):
    base, items = _classifier_stream(tmp_path, bert, bert_classifier, [2, 3])
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "average", "--out", out, "--quiet")
    assert code == 0, err
    step1, step2 = out / "step-1", out / "step-2"
    # backbone names are the base's; step 1 of an average is the first fine-tune's backbone exactly
    got, ft = weights(step1), weights(items[0])
    assert set(got) == set(weights(base))
    for k, v in got.items():
        assert torch.equal(v, ft[f"bert.{k}"]), k
    # each step keeps every seen head; the state and card say where
    state = json.loads((step2 / "contmerge_state.json").read_text())
    assert [h["task"] for h in state["heads"]] == [1, 2]
    assert state["heads"][1]["keys"] == ["classifier.bias", "classifier.weight"]
    assert (step2 / "task_heads" / "task-1" / "model.safetensors").is_file()
    assert "task_heads/task-{i}" in (step2 / "README.md").read_text()
    # backbone + head 1 at step 1 is fine-tune 1 again
    x = torch.randint(0, 96, (2, 7))
    from transformers import AutoModelForSequenceClassification

    expert = AutoModelForSequenceClassification.from_pretrained(items[0]).eval()
    rebuilt = load_task_model(step1, 1).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=x).logits, expert(input_ids=x).logits)
    three = load_task_model(step2, 2)
    assert three.config.num_labels == 3 and three.classifier.weight.shape == (3, 32)


def test_vit_classifiers_without_pooler_keep_base_pooler(tmp_path, cli):
    base, items = _classifier_stream(tmp_path, vit, vit_classifier, [4, 7])
    out = tmp_path / "out"
    code, out_text, err = cli("inspect", "--base", base, "--stream", *items)
    assert code == 0, err
    assert "strips 'vit.'" in out_text and "pooler" in out_text and "classifier.weight" in out_text
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "task_arithmetic", "--set", "scaling=1",
                       "--out", out, "--quiet")
    assert code == 0, err
    b, got = weights(base), weights(out / "step-2")
    fts = [weights(i) for i in items]
    assert torch.equal(got["pooler.dense.weight"], b["pooler.dense.weight"])  # no item has a pooler
    key = "encoder.layer.1.attention.attention.query.weight"
    torch.testing.assert_close(got[key], b[key] + sum(f[f"vit.{key}"] - b[key] for f in fts))
    state = json.loads((out / "step-2" / "contmerge_state.json").read_text())
    assert state["stream"][0]["kept_modules"] == ["pooler"]
    model = load_task_model(out / "step-2", 2)
    assert model.classifier.out_features == 7
    torch.testing.assert_close(model.classifier.weight, fts[1]["classifier.weight"])


def test_heads_of_another_shape_over_a_task_base(tmp_path, cli):
    """A 5-class ViT classifier as base, 3-class fine-tunes: heads differ in shape and stay apart."""
    torch.manual_seed(0)
    base_model = vit_classifier(5)
    base = save(base_model, tmp_path / "base")
    items = []
    for i in range(2):
        m = vit_classifier(3)
        m.vit.load_state_dict(base_model.vit.state_dict())
        items.append(save(perturb(m, seed=i), tmp_path / f"ft{i}"))
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "average", "--out", out, "--quiet")
    assert code == 0, err
    got, b = weights(out / "step-2"), weights(base)
    assert torch.equal(got["classifier.weight"], b["classifier.weight"])  # the base's own head is kept
    key = "vit.layernorm.weight"
    torch.testing.assert_close(got[key], (weights(items[0])[key] + weights(items[1])[key]) / 2)
    assert load_task_model(out / "step-2", 1).classifier.out_features == 3
