"""Calibration data specs: every kind of source loads, and every unusable one is a clear refusal."""

from __future__ import annotations

import json

import pytest

from hf_contmerge.calibration.data import DataSpec, load_calibration
from hf_contmerge.errors import ContMergeError
from support.tiny_models import save_tokenizer, sentences


@pytest.fixture
def tokenizer_folder(tmp_path):
    return save_tokenizer(tmp_path / "tok")


def _load(spec: str, folder, **kw):
    args = {"column": None, "samples": 4, "seed": 0, "batch_size": 3, "max_length": 16, "model_kind": "text", **kw}
    return load_calibration(DataSpec.parse(spec), folder, **args)


def test_every_kind_of_source(tmp_path, tokenizer_folder):
    import datasets

    texts = sentences(10, seed=0)
    datasets.Dataset.from_dict({"text": texts, "label": [0] * 10}).save_to_disk(tmp_path / "ds")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"sentence": texts[:5]}),
                          "validation": datasets.Dataset.from_dict({"sentence": texts[5:]})}).save_to_disk(tmp_path / "dd")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in texts))
    (tmp_path / "b.csv").write_text("text,label\n" + "".join(f"{t},1\n" for t in texts))
    for spec, column, rows in [(str(tmp_path / "ds"), "text", 4), (f"{tmp_path / 'dd'}@validation", "sentence", 4),
                               (str(tmp_path / "a.jsonl"), "content", 4), (str(tmp_path / "*.csv"), "text", 4)]:
        data = _load(spec, tokenizer_folder)
        assert (data.column, data.rows, data.modality) == (column, rows, "text")
        assert [b["input_ids"].shape[0] for b in data.batches] == [3, 1]
        assert all(b["attention_mask"].shape == b["input_ids"].shape for b in data.batches)
    # the sample is seeded: the same rows for the same seed, others for another
    first, again, other = (_load(str(tmp_path / "ds"), tokenizer_folder, seed=s).batches[0]["input_ids"] for s in (1, 1, 2))
    assert first.equal(again) and not (first.shape == other.shape and first.equal(other))


@pytest.mark.parametrize("make,spec,needle", [
    (lambda p: None, "{p}/nowhere.csv", "no such file"),
    (lambda p: None, "not a spec", "neither a dataset folder"),
    (lambda p: (p / "e.jsonl").write_text(""), "{p}/e.jsonl", "could not be loaded"),
    (lambda p: (p / "n.jsonl").write_text(json.dumps({"label": 1}) + "\n"), "{p}/n.jsonl", "none of the columns"),
    (lambda p: (p / "z.jsonl").write_text(json.dumps({"text": "w1"}) + "\n"), "{p}/z.jsonl@test", "could not be loaded"),
    (lambda p: None, "nobody/no-such-dataset", "offline"),
])
def test_unusable_data_is_refused(tmp_path, tokenizer_folder, make, spec, needle):
    make(tmp_path)
    with pytest.raises(ContMergeError, match=needle):
        _load(spec.format(p=tmp_path), tokenizer_folder)


def test_column_split_and_modality_checks(tmp_path, tokenizer_folder):
    import datasets

    datasets.Dataset.from_dict({"text": sentences(3, seed=1)}).save_to_disk(tmp_path / "ds")
    datasets.Dataset.from_dict({"text": ["w1"]}).filter(lambda _: False).save_to_disk(tmp_path / "empty")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["w1"]})}).save_to_disk(tmp_path / "dd")
    with pytest.raises(ContMergeError, match="no column 'prompt'"):
        _load(str(tmp_path / "ds"), tokenizer_folder, column="prompt")
    with pytest.raises(ContMergeError, match="is empty"):
        _load(str(tmp_path / "empty"), tokenizer_folder)
    with pytest.raises(ContMergeError, match="no split 'test'"):
        _load(f"{tmp_path / 'dd'}@test", tokenizer_folder)
    with pytest.raises(ContMergeError, match="takes images"):
        _load(str(tmp_path / "ds"), tokenizer_folder, model_kind="image")
    with pytest.raises(ContMergeError, match="no tokenizer"):
        _load(str(tmp_path / "ds"), tmp_path)
