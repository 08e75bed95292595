"""ContinualMergeCallback: merging inside transformers' Trainer writes the steps the CLI writes over the
same trained models and data, and the model trains each next task from the merge so far."""

from __future__ import annotations

import json

import pytest
import torch

from hf_contmerge import ContinualMergeCallback, ContMergeError
from support.refusal import merge as cli_merge
from support.tiny_models import bert, save, save_tokenizer, sentences, weights

CALIB = {"calib_samples": 6, "calib_batch_size": 3, "max_length": 16}
FLAGS = ["--calib-samples", "6", "--calib-batch-size", "3", "--max-length", "16"]


def _trainer(model, tokenizer, texts, labels, tmp, callback):
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    train = Dataset.from_dict({"text": texts, "label": labels})
    train = train.map(lambda b: tokenizer(b["text"], truncation=True, max_length=16), batched=True, remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp / "trainer"), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3,
                             report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True,
                             seed=0)
    return Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
                   callbacks=[callback])


def _backbone(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.bert.state_dict().items()}


@pytest.mark.parametrize("method", ["became", "task_arithmetic"])
def test_callback_writes_the_cli_steps_and_trains_each_task_from_the_merge(tmp_path, cli, method):
    from datasets import Dataset
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    base = save_tokenizer(save(bert(), tmp_path / "base"))
    tokenizer = AutoTokenizer.from_pretrained(base)
    out = tmp_path / "cb"
    params = {"scaling": 0.7} if method == "task_arithmetic" else {}
    callback = ContinualMergeCallback(base=base, out=out, method=method, params=params, keep_finetunes=True, quiet=True, **CALIB)
    data_folders = []
    for t, num_labels in enumerate((2, 3)):
        torch.manual_seed(5 + t)
        model = BertForSequenceClassification.from_pretrained(base, num_labels=num_labels)
        callback.load_merged(model)
        start = weights(out / f"step-{t}") if t else weights(base)
        assert all(torch.equal(_backbone(model)[k], v) for k, v in start.items()), "the task does not start from θ(t−1)"
        texts = sentences(8, seed=40 + t)
        calibration = Dataset.from_dict({"text": texts})
        data_folders.append(tmp_path / f"data{t}")
        calibration.save_to_disk(str(data_folders[-1]))
        # task 1's data in memory, task 2's as a spec: both forms reach the same calibrator
        callback.next_task(f"task {t}", data=calibration if t == 0 else str(data_folders[-1]))
        before = _backbone(model)
        _trainer(model, tokenizer, texts, [i % num_labels for i in range(8)], tmp_path, callback).train()
        merged = weights(out / f"step-{t + 1}")
        now = _backbone(model)
        assert all(torch.equal(now[k], v) for k, v in merged.items()), "the model does not hold the merged weights"
        assert any(not torch.equal(before[k], v) for k, v in merged.items())

    finetunes = sorted((tmp_path / "cb-finetunes").iterdir())
    assert [f.name for f in finetunes] == ["task-1-task_0", "task-2-task_1"]
    sets = [a for k, v in params.items() for a in ("--set", f"{k}={v}")]
    code, _, err = cli_merge(cli, base, finetunes, tmp_path / "cli", *FLAGS, "--data", *data_folders, *sets, method=method)
    assert code == 0, err
    for t in (1, 2):
        ours, theirs = out / f"step-{t}", tmp_path / "cli" / f"step-{t}"
        files = sorted(p.relative_to(ours) for p in ours.rglob("*.safetensors"))
        assert files == sorted(p.relative_to(theirs) for p in theirs.rglob("*.safetensors"))
        for f in files:  # weights, carried state (F̄ for became) and heads, bit for bit
            assert (ours / f).read_bytes() == (theirs / f).read_bytes(), f"step-{t}/{f} differs"
        mine, cli_state = (json.loads((d / "contmerge_state.json").read_text()) for d in (ours, theirs))
        assert mine["scalars"] == cli_state["scalars"]


def test_callback_refuses_before_training_what_it_could_not_merge(tmp_path):
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    base = save_tokenizer(save(bert(), tmp_path / "base"))
    tokenizer = AutoTokenizer.from_pretrained(base)
    callback = ContinualMergeCallback(base=base, out=tmp_path / "cb", method="became", quiet=True)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=2)
    before = _backbone(model)
    trainer = _trainer(model, tokenizer, sentences(4, seed=1), [0, 1, 0, 1], tmp_path, callback)
    with pytest.raises(ContMergeError, match="needs calibration data for task 1"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in _backbone(model).items()), "training ran before the refusal"
    assert not (tmp_path / "cb").exists()

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(BertForSequenceClassification.from_pretrained(base, num_labels=2), LoraConfig(target_modules=["query"]))
    callback = ContinualMergeCallback(base=base, out=tmp_path / "cb2", method="task_arithmetic", quiet=True)
    with pytest.raises(ContMergeError, match="PEFT model"):
        _trainer(lora, tokenizer, sentences(4, seed=1), [0, 1, 0, 1], tmp_path, callback).train()
