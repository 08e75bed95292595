"""The model card of a step: metadata, lineage, Hub ids, evaluation results."""

from __future__ import annotations


def test_card_metadata_and_lineage(tmp_path, streams, cli):
    from huggingface_hub import ModelCard

    base, items = streams("bert")
    out = tmp_path / "out"
    assert cli("merge", "--base", base, "--stream", *items[:2], "--method", "ties", "--set", "top_k=0.4",
               "--out", out, "--quiet")[0] == 0
    card = ModelCard.load(out / "step-2" / "README.md")
    assert {"merge", "continual-merging", "hf-contmerge", "ties"} <= set(card.data.tags)
    text = card.text
    assert "`top_k=0.4`" in text and "`scaling=0.3`" in text
    assert str(items[0]) in text and str(items[1]) in text and "fingerprint" in text
    assert "--set top_k=0.4" in text and "arXiv 2306.01708" in text


def test_card_names_hub_models_as_base_model():
    from hf_contmerge.artifacts.card import render_card
    from hf_contmerge.artifacts.state import StepState

    state = StepState(step=2, method="average", params={}, options={"dtype": "auto"},
                      base={"source": "org/base@v1", "revision": "a" * 40, "fingerprint": "f", "kind": "full"},
                      stream=[{"source": "org/ft-1", "revision": "b" * 40, "fingerprint": "g", "kind": "full"},
                              {"source": "org/ft-2", "revision": "c" * 40, "fingerprint": "h", "kind": "full"}])
    from huggingface_hub import ModelCard

    card = ModelCard(render_card(state))
    assert card.data.base_model == ["org/base", "org/ft-1", "org/ft-2"]
    assert card.data.base_model_relation == "merge"
    assert "b" * 40 in card.text


def test_recorded_evaluation_reaches_card_metadata(tmp_path, streams, cli):
    from huggingface_hub import ModelCard

    from hf_contmerge.artifacts.folder import record_evaluation
    from hf_contmerge.artifacts.state import read_state

    base, items = streams("llama")
    out = tmp_path / "out"
    assert cli("merge", "--base", base, "--stream", *items[:2], "--method", "average", "--out", out, "--quiet")[0] == 0
    evaluation = {"description": "demo accuracy", "tasks": ["a", "b"],
                  "rows": [{"name": "experts", "scores": [0.9, 0.8], "mean": 0.85},
                           {"name": "merged, step 2", "scores": [0.7, 0.6], "mean": 0.65}]}
    record_evaluation(out / "step-2", evaluation)
    card = ModelCard.load(out / "step-2" / "README.md")
    assert [(r.dataset_name, r.metric_value) for r in card.data.eval_results] == [("a", 0.7), ("b", 0.6)]
    assert "| merged, step 2 | 70.00 | 60.00 | 65.00 |" in card.text
    assert read_state(out / "step-2").evaluation == evaluation
    assert not list((out / "step-2").glob(".*tmp*"))  # the atomic rewrite left nothing behind
