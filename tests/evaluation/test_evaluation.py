"""Evaluation across the stream: metrics on a hand-made matrix, and scores recorded by ``--eval``
equal to accuracies and likelihoods computed directly with transformers on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from hf_contmerge.evaluation.record import Evaluation, TaskInfo, fusionbench_reports, summarise
from support.tiny_models import classifier_stream, make_stream, save_tokenizer, sentences


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Reference scores are cached per machine: each test starts with an empty cache of its own."""
    monkeypatch.setenv("HF_CONTMERGE_CACHE", str(tmp_path / "cache"))


def _info(name: str, item: int, better: bool = True) -> TaskInfo:
    return TaskInfo(name=name, item=item, data=name, kind="classification", metric="accuracy" if better else "perplexity",
                    higher_is_better=better, samples=10)


def test_acc_bwt_normalised_on_a_hand_made_matrix(tmp_path):
    m = [[0.9, None, None], [0.8, 0.7, None], [0.6, 0.5, 0.95]]
    s = summarise(m, [True, True, True], finetuned=[1.0, 0.8, 0.95])
    assert s.acc == pytest.approx((0.6 + 0.5 + 0.95) / 3)
    assert s.bwt == pytest.approx(((0.6 - 0.9) + (0.5 - 0.7)) / 2)
    assert s.normalized_acc == pytest.approx((0.6 / 1.0 + 0.5 / 0.8 + 0.95 / 0.95) / 3)
    assert s.seen_average == pytest.approx([0.9, 0.75, (0.6 + 0.5 + 0.95) / 3])
    one = summarise(m[:1], [True, True, True])
    assert one.bwt is None and one.acc == pytest.approx(0.9)
    # a lower-is-better column (perplexity) is shown, never averaged
    s2 = summarise([[0.9, 12.0], [0.7, 14.0]], [True, False])
    assert s2.acc == pytest.approx(0.7) and s2.bwt == pytest.approx(-0.2)
    # items without a task have no column: columns are items 1 and 3 of a three-item stream
    gap = summarise([[0.9, None], [0.8, None], [0.6, 0.7]], [True, True], items=[1, 3])
    assert gap.acc == pytest.approx(0.65) and gap.bwt == pytest.approx(0.6 - 0.9)
    assert gap.seen_average == pytest.approx([0.9, 0.8, 0.65])
    record = Evaluation.build(2, [_info("a", 1), _info("b", 2)], [[0.9, None], [0.7, 0.6]])
    assert Evaluation.parse(json.loads(record.model_dump_json())) == record
    files = fusionbench_reports(record, tmp_path)
    assert [f.name for f in files] == ["report_0.json", "report_1.json", "model_names.json"]
    assert json.loads(files[0].read_text()) == {"a": {"accuracy": 0.9}, "average": {"accuracy": 0.9}}
    assert json.loads(files[1].read_text())["average"]["accuracy"] == pytest.approx(0.65)
    assert json.loads(files[2].read_text()) == ["a", "b"]


def _labelled(path, texts, labels, **extra):
    rows = [{"text": t, "label": y, **{k: v[i] for k, v in extra.items()}} for i, (t, y) in enumerate(zip(texts, labels))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@torch.no_grad()
def _direct_accuracy(backbone_folder, item_folder, tokenizer_folder, texts, labels) -> float:
    """The item's architecture and head (from the item itself) over a backbone's weights, scored by hand."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(item_folder)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    item = load_file(item_folder / "model.safetensors")
    backbone = load_file(backbone_folder / "model.safetensors")
    weights = {**{k: v for k, v in item.items() if k.startswith("classifier")},
               **{("bert." + k if not k.startswith("bert.") else k): v for k, v in backbone.items() if not k.startswith("classifier")}}
    missing = model.load_state_dict(weights, strict=False).missing_keys
    assert all("position_ids" in k for k in missing), missing
    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    preds = [int(model(**tok(t, return_tensors="pt")).logits.argmax()) for t in texts]
    return sum(p == y for p, y in zip(preds, labels)) / len(labels)


def test_classifier_stream_scores_equal_direct_accuracies(tmp_path, cli):
    base, items, _ = classifier_stream(tmp_path, labels=(2, 3))
    texts = [sentences(12, seed=50), sentences(12, seed=51)]
    labels = [[i % 2 for i in range(12)], [i % 3 for i in range(12)]]
    evals = [_labelled(tmp_path / f"eval{i}.jsonl", texts[i], labels[i]) for i in range(2)]
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "task_arithmetic", "--set", "scaling=0.5",
                       "--out", out, "--eval", "--eval-data", f"first={evals[0]}", f"second={evals[1]}", "--eval-references")
    assert code == 0, err
    state = json.loads((out / "step-2" / "contmerge_state.json").read_text())
    record = Evaluation.parse(state["evaluation"])
    assert [t.name for t in record.tasks] == ["first", "second"] and record.step == 2
    for k in (1, 2):
        for i in range(k):
            want = _direct_accuracy(out / f"step-{k}", items[i], base, texts[i], labels[i])
            assert record.matrix[k - 1][i] == pytest.approx(want), (k, i)
    assert record.matrix[0][1] is None
    for i in range(2):
        assert record.finetuned[i] == pytest.approx(_direct_accuracy(items[i], items[i], base, texts[i], labels[i]))
        assert record.base[i] == pytest.approx(_direct_accuracy(base, items[i], base, texts[i], labels[i]))
    # step 1's own record is the first row; step 2 carries it
    first = Evaluation.parse(json.loads((out / "step-1" / "contmerge_state.json").read_text())["evaluation"])
    assert first.matrix == [record.matrix[0][:1]] and first.tasks == record.tasks[:1]
    # the card: model-index with the step's scores, the matrix table, plots that exist; it round-trips
    card = ModelCard.load(out / "step-2" / "README.md")
    results = {r.dataset_name: r.metric_value for r in card.data.eval_results}
    assert results == {"first": pytest.approx(record.matrix[1][0], abs=1e-6), "second": pytest.approx(record.matrix[1][1], abs=1e-6)}
    assert "| merged, step 2 |" in card.text and "individual fine-tunes" in card.text
    for png in ("matrix.png", "progress.png"):
        assert (out / "step-2" / "evaluation" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](evaluation/{png})" in card.text
    assert json.loads((out / "step-2" / "evaluation" / "report_1.json").read_text())["first"]["accuracy"] == pytest.approx(
        record.matrix[1][0])


def test_eval_all_scores_unseen_tasks_with_their_own_heads(tmp_path, cli):
    """--eval-all: the upper triangle is the step's backbone under the unseen item's head (taken from the
    stream, never written into the step); the seen cells and ACC/BWT equal a run without it, and
    `hf-contmerge eval --eval-all` afterwards (heads from the newest step) records the same."""
    base, items, _ = classifier_stream(tmp_path, labels=(2, 3, 2))
    texts = [sentences(10, seed=60 + i) for i in range(3)]
    labels = [[j % n for j in range(10)] for n in (2, 3, 2)]
    evals = [f"t{i}={_labelled(tmp_path / f'eval{i}.jsonl', texts[i], labels[i])}" for i in range(3)]
    common = ["--base", base, "--stream", *items, "--method", "task_arithmetic", "--set", "scaling=0.5", "--eval",
              "--eval-data", *evals, "--quiet"]
    for name, extra in (("seen", []), ("all", ["--eval-all"])):
        code, _, err = cli("merge", *common, "--out", tmp_path / name, *extra)
        assert code == 0, err
    read = lambda out, k: Evaluation.parse(json.loads((out / f"step-{k}" / "contmerge_state.json").read_text())["evaluation"])  # noqa: E731
    seen, full = read(tmp_path / "seen", 3), read(tmp_path / "all", 3)
    for k in range(1, 4):
        for i in range(3):
            if i < k:
                assert full.matrix[k - 1][i] == seen.matrix[k - 1][i]
            else:
                assert seen.matrix[k - 1][i] is None
                want = _direct_accuracy(tmp_path / "all" / f"step-{k}", items[i], base, texts[i], labels[i])
                assert full.matrix[k - 1][i] == pytest.approx(want), (k, i)
    assert full.summary == seen.summary
    assert not (tmp_path / "all" / "step-1" / "task_heads" / "task-2").exists()
    # at step 1, the unseen rows of the partial records match too (step 1 saw only its own item's head)
    assert read(tmp_path / "all", 1).matrix[0] == full.matrix[0]
    # the card marks the unseen cells and leaves them out of model-index
    card = ModelCard.load(tmp_path / "all" / "step-1" / "README.md")
    assert [r.dataset_name for r in card.data.eval_results] == ["t0"]
    assert f"({100 * full.matrix[0][1]:.2f})" in card.text and "not merged yet" in card.text
    code, _, err = cli("eval", tmp_path / "seen", "--eval-data", *evals, "--eval-all", "--quiet")
    assert code == 0, err
    assert read(tmp_path / "seen", 3).matrix == full.matrix


def test_evaluation_refusals_write_nothing(tmp_path, cli):
    base, items, data = classifier_stream(tmp_path, labels=(2, 3))
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "average", "--out", out, "--eval")
    assert code == 2 and "--eval needs --eval-data" in err
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "average", "--out", out,
                       "--eval", "--eval-data", data[0])
    assert code == 2 and "one --eval-data SPEC per --stream item" in err
    unlabelled = data  # calibration files: text only, no label column
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "average", "--out", out,
                       "--eval", "--eval-data", *unlabelled)
    assert code == 2 and "no label column 'label'" in err, err
    assert not any(out.glob("step-*"))


@torch.no_grad()
def _direct_loglik(model, tok, context: str, continuation: str) -> float:
    whole = tok(context + continuation)["input_ids"]
    n = len(whole) - len(tok(context)["input_ids"])
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logp[j - 1, whole[j]].item() for j in range(len(whole) - n, len(whole)))


def test_causal_lm_tasks_equal_direct_computation(tmp_path, cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, items = make_stream(tmp_path, "llama", n=2)
    save_tokenizer(base, kind="llama")
    prompts = sentences(8, seed=60)
    choices = [sentences(3, seed=70 + i, length=(1, 3)) for i in range(8)]
    answers = [i % 3 for i in range(8)]
    choice = _labelled(tmp_path / "choice.jsonl", prompts, answers, choices=choices)
    words = ["w1", "w2 w3"]
    label_words = _labelled(tmp_path / "words.jsonl", prompts, [words[i % 2] for i in range(8)])
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "task_arithmetic", "--out", out,
                       "--eval", "--eval-data", f"mc={choice}", f"lw={label_words}", "--eval-batch-size", "3")
    assert code == 0, err
    record = Evaluation.parse(json.loads((out / "step-2" / "contmerge_state.json").read_text())["evaluation"])
    assert [t.kind for t in record.tasks] == ["choice", "label-words"]
    tok = AutoTokenizer.from_pretrained(base)
    for k in (1, 2):
        model = AutoModelForCausalLM.from_pretrained(out / f"step-{k}").eval()
        mc = [max(range(3), key=lambda j: _direct_loglik(model, tok, p, " " + c[j])) for p, c in zip(prompts, choices)]
        assert record.matrix[k - 1][0] == pytest.approx(sum(a == b for a, b in zip(mc, answers)) / 8)
        if k == 2:
            cands = sorted(words)
            lw = [cands[max(range(2), key=lambda j: _direct_loglik(model, tok, p, " " + cands[j]))] for p in prompts]
            assert record.matrix[1][1] == pytest.approx(sum(a == words[i % 2] for i, a in enumerate(lw)) / 8)

    # scoring kernels against the direct computation, values not just argmaxes
    from hf_contmerge.evaluation import scoring

    model = AutoModelForCausalLM.from_pretrained(out / "step-2").eval()
    tok.pad_token = tok.pad_token or tok.eos_token
    pairs = [(p, " " + c[0]) for p, c in zip(prompts, choices)]
    got = scoring.loglikelihoods(model, tok, pairs, batch_size=3)
    assert got == pytest.approx([_direct_loglik(model, tok, p, c) for p, c in pairs], abs=1e-4)
    nll = count = 0
    for t in prompts:
        ids = tok(t)["input_ids"]
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        nll -= sum(logp[j - 1, ids[j]].item() for j in range(1, len(ids)))
        count += len(ids) - 1
    assert scoring.perplexity(model, tok, prompts, batch_size=3) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_eval_command_api_and_recipe_record_what_merge_eval_records(tmp_path, cli):
    """``hf-contmerge eval`` after a plain merge, the API with in-memory datasets, and a recipe with a
    per-item ``eval`` record the same evaluation as ``merge --eval``."""
    import datasets
    import yaml

    from hf_contmerge import ContinualMerger

    base, items, _ = classifier_stream(tmp_path, labels=(2, 3))
    texts = [sentences(10, seed=80), sentences(10, seed=81)]
    labels = [[i % 2 for i in range(10)], [(i * 2) % 3 for i in range(10)]]
    evals = [_labelled(tmp_path / f"e{i}.jsonl", texts[i], labels[i]) for i in range(2)]
    common = ["--base", base, "--stream", *items, "--method", "ties"]
    flags = ["--eval-data", f"a={evals[0]}", f"b={evals[1]}", "--eval-samples", "7", "--eval-references"]

    def record(out, k=2):
        return json.loads((out / f"step-{k}" / "contmerge_state.json").read_text())["evaluation"]

    assert cli("merge", *common, "--out", tmp_path / "with", "--eval", *flags)[0] == 0
    assert cli("merge", *common, "--out", tmp_path / "after")[0] == 0
    code, out, err = cli("eval", tmp_path / "after", *flags)
    assert code == 0, err
    assert "step 2: ACC" in out
    for k in (1, 2):
        assert record(tmp_path / "after", k) == record(tmp_path / "with", k)
    assert (tmp_path / "after" / "step-2" / "README.md").read_text() == (tmp_path / "with" / "step-2" / "README.md").read_text()

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(base), "method": "ties", "out": str(tmp_path / "recipe"), "eval": True,
                                      "eval_samples": 7, "eval_references": True,
                                      "stream": [{"source": str(items[i]), "eval": f"{n}={evals[i]}"} for i, n in enumerate("ab")]}))
    assert cli("merge", "--recipe", recipe)[0] == 0
    assert record(tmp_path / "recipe") == record(tmp_path / "with")

    merger = ContinualMerger(base=base, method="ties", out=tmp_path / "api", eval=True, eval_samples=7, eval_references=True)
    for i in range(2):
        merger.step(items[i], eval_data=datasets.Dataset.from_dict({"text": texts[i], "label": labels[i]}))
    got = record(tmp_path / "api")
    want = record(tmp_path / "with")
    assert got["matrix"] == want["matrix"] and got["finetuned"] == want["finetuned"] and got["summary"] == want["summary"]
    assert got["tasks"][0]["data"].startswith("<in-memory Dataset")


def test_lm_eval_harness_local_task_offline(tmp_path, cli, monkeypatch):
    """--eval-harness runs lm-eval's simple_evaluate on every step, on a task YAML over local files; its
    score equals the accuracy of log-likelihood choices computed directly."""
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    base, items = make_stream(tmp_path, "llama", n=2)
    save_tokenizer(base, kind="llama")
    prompts = sentences(6, seed=90)
    choices = [sentences(3, seed=91 + i, length=(1, 2)) for i in range(6)]
    data = _labelled(tmp_path / "mc.jsonl", prompts, [i % 3 for i in range(6)], choices=choices)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{text}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "task_arithmetic", "--out", out, "--eval",
                       "--eval-harness", "tiny_mc", "--eval-harness-include", tmp_path / "tasks", "--eval-references")
    assert code == 0, err
    record = Evaluation.parse(json.loads((out / "step-2" / "contmerge_state.json").read_text())["evaluation"])
    assert [(t.name, t.item, t.metric, t.samples) for t in record.tasks] == [("tiny_mc", 0, "acc", 6)]
    assert record.summary.acc is None  # lm-eval columns belong to no item: shown, not in ACC
    tok = AutoTokenizer.from_pretrained(base)
    for k, folder in ((1, out / "step-1"), (2, out / "step-2"), (0, base)):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        preds = [max(range(3), key=lambda j: _direct_loglik(model, tok, p, " " + c[j])) for p, c in zip(prompts, choices)]
        want = sum(p == i % 3 for i, p in enumerate(preds)) / 6
        assert (record.base[0] if k == 0 else record.matrix[k - 1][0]) == pytest.approx(want)
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "average", "--out", tmp_path / "o2", "--eval",
                       "--eval-harness", "no_such_task", "--eval-harness-include", tmp_path / "tasks")
    assert code == 2 and "no_such_task" in err and not (tmp_path / "o2" / "step-1").exists()


def test_run_killed_while_evaluating_leaves_no_complete_step_and_resume_scores_it(tmp_path, cli):
    import os
    import subprocess
    import sys

    base, items, _ = classifier_stream(tmp_path, labels=(2, 3))
    evals = [_labelled(tmp_path / f"e{i}.jsonl", sentences(8, seed=95 + i), [j % 2 for j in range(8)]) for i in range(2)]
    args = ["merge", "--base", base, "--stream", *items, "--method", "average", "--eval", "--eval-data", *evals, "--quiet"]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert cli(*args, "--out", ref)[0] == 0
    env = {**os.environ, "HF_CONTMERGE_FAILPOINT": "step-2:evaluate"}
    proc = subprocess.run([sys.executable, "-m", "hf_contmerge.cli", *map(str, args), "--out", str(out)], env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert (out / "step-1").is_dir() and not (out / "step-2").exists()
    code, _, err = cli(*args, "--out", out, "--resume")
    assert code == 0, err
    for name in ("contmerge_state.json", "README.md", "evaluation/report_1.json"):
        assert (out / "step-2" / name).read_bytes() == (ref / "step-2" / name).read_bytes()


def test_compare_over_three_orders_is_reproducible_and_resumes(tmp_path, cli, monkeypatch):
    import os
    import subprocess
    import sys

    base, items, _ = classifier_stream(tmp_path, labels=(2, 3, 2))
    evals = [_labelled(tmp_path / f"e{i}.jsonl", sentences(8, seed=99 + i), [j % 2 for j in range(8)]) for i in range(3)]
    args = ["compare", "--base", base, "--stream", *items, "--methods", "average", "task_arithmetic:scaling=0.5",
            "--orders", "3", "--seed", "3", "--eval", "--eval-data", *evals, "--eval-references", "--quiet"]
    code, printed, err = cli(*args, "--out", tmp_path / "a")
    assert code == 0, err
    result = json.loads((tmp_path / "a" / "compare.json").read_text())
    assert [r["permutation"] for r in result["runs"]][:3] == result["orders"] and result["orders"][0] == [0, 1, 2]
    assert len({tuple(p) for p in result["orders"]}) == 3  # distinct orders
    assert "| task_arithmetic:scaling=0.5 |" in printed and (tmp_path / "a" / "compare.png").is_file()
    # heads and tasks follow their items: order 1's final record scores each named task with its own item
    run = json.loads((Path(result["runs"][1]["out"]) / "step-3" / "contmerge_state.json").read_text())
    perm = result["orders"][1]
    assert [t["data"] for t in run["evaluation"]["tasks"]] == [str(evals[i]) for i in perm]
    assert [s["source"] for s in run["stream"]] == [str(items[i]) for i in perm]
    acc = [r["acc"] for r in result["runs"]]
    table = result["table"][0]
    assert table["acc"][0] == pytest.approx(sum(acc[:3]) / 3)
    # the papers' reference rows: the mean over the tasks of the base (with each head) and of each fine-tune
    first = Evaluation.parse(json.loads((Path(result["runs"][0]["out"]) / "step-3" / "contmerge_state.json").read_text())["evaluation"])
    refs = result["references"]
    assert refs["pretrained"]["acc"] == pytest.approx(sum(first.base) / 3)
    assert refs["individual"]["acc"] == pytest.approx(sum(first.finetuned) / 3)
    assert f"| individual fine-tunes | {100 * refs['individual']['acc']:.2f} |" in printed
    # killed in the middle of a run, then run again: the same tables
    env = {**os.environ, "HF_CONTMERGE_FAILPOINT": "step-2:publish"}
    proc = subprocess.run([sys.executable, "-m", "hf_contmerge.cli", *map(str, args), "--out", str(tmp_path / "b")], env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert cli(*args, "--out", tmp_path / "b")[0] == 0
    again = json.loads((tmp_path / "b" / "compare.json").read_text())
    strip = lambda r: [{k: v for k, v in x.items() if k != "out"} for x in r["runs"]]  # noqa: E731
    assert strip(again) == strip(result) and again["table"] == result["table"]
    # --keep-steps final: the finished runs are not merged again, lose their earlier steps, and tabulate the same
    from hf_contmerge.engine.run import Engine

    monkeypatch.setattr(Engine, "run", lambda self: pytest.fail("a finished run was merged again"))
    for _ in range(2):
        code, _, err = cli(*args, "--out", tmp_path / "b", "--keep-steps", "final")
        assert code == 0, err
        pruned = json.loads((tmp_path / "b" / "compare.json").read_text())
        assert strip(pruned) == strip(result) and pruned["references"] == result["references"]
    for r in pruned["runs"]:
        assert sorted(p.name for p in Path(r["out"]).glob("step-*")) == ["step-3"]


def test_exact_match_task_equals_one_prompt_at_a_time_generation(tmp_path, cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, items = make_stream(tmp_path, "llama", n=1)
    save_tokenizer(base, kind="llama")
    prompts = sentences(6, seed=110)
    model = AutoModelForCausalLM.from_pretrained(items[0]).eval()
    tok = AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        direct = []
        for p in prompts:
            ids = tok(p, return_tensors="pt")
            gen = model.generate(**ids, do_sample=False, max_new_tokens=4, pad_token_id=tok.pad_token_id)
            direct.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip().split("\n")[0].strip())
    # half the references are the model's own continuation of the fine-tune (which step 1 equals: average of one item)
    labels = [d if i % 2 == 0 else "w0 w0 w0 w0 w0" for i, d in enumerate(direct)]
    data = _labelled(tmp_path / "em.jsonl", prompts, labels)
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "average", "--out", out, "--eval",
                       "--eval-data", data, "--eval-kind", "exact-match", "--eval-max-new-tokens", "4", "--eval-batch-size", "4")
    assert code == 0, err
    record = Evaluation.parse(json.loads((out / "step-1" / "contmerge_state.json").read_text())["evaluation"])
    assert record.tasks[0].kind == "exact-match" and record.tasks[0].metric == "exact_match"
    assert record.matrix[0][0] == pytest.approx(sum(d == y for d, y in zip(direct, labels)) / 6)
    assert record.matrix[0][0] >= 0.5


def test_image_classifier_stream_scores_equal_direct_accuracies(tmp_path, cli):
    """ViT classifiers over a bare ViT base: images prepared with the base's image processor, each
    task scored with its own head, equal to a direct computation."""
    import datasets
    from PIL import Image
    from transformers import AutoImageProcessor, ViTImageProcessor

    from support.tiny_models import perturb, save, vit, vit_classifier

    torch.manual_seed(0)
    backbone = vit()
    base = save(backbone, tmp_path / "base")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(base)
    items = []
    for i, n in enumerate((2, 3)):
        torch.manual_seed(10 + i)
        model = vit_classifier(n)
        model.vit.load_state_dict(backbone.state_dict(), strict=False)
        items.append(save(perturb(model, seed=20 + i), tmp_path / f"task{i}"))
    g = torch.Generator().manual_seed(5)
    images = [Image.fromarray((torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(8)]
    evals = []
    for i, n in enumerate((2, 3)):
        folder = tmp_path / f"eval{i}"
        datasets.Dataset.from_dict({"image": images, "label": [j % n for j in range(8)]}).save_to_disk(str(folder))
        evals.append(folder)
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "task_arithmetic", "--out", out,
                       "--eval", "--eval-data", *evals)
    assert code == 0, err
    record = Evaluation.parse(json.loads((out / "step-2" / "contmerge_state.json").read_text())["evaluation"])
    processor = AutoImageProcessor.from_pretrained(base)
    from transformers import AutoModel, AutoModelForImageClassification

    merged = AutoModel.from_pretrained(out / "step-2").state_dict()  # the merged backbone, as transformers names it in memory
    for i, n in enumerate((2, 3)):
        model = AutoModelForImageClassification.from_pretrained(items[i]).eval()  # the item's own head
        missing = model.vit.load_state_dict(merged, strict=False)
        assert not missing.missing_keys, missing  # every backbone tensor (the classifier has no pooler)
        with torch.no_grad():
            preds = [int(model(**processor(images=[im.convert("RGB")], return_tensors="pt")).logits.argmax()) for im in images]
        assert record.tasks[i].kind == "classification"
        assert record.matrix[1][i] == pytest.approx(sum(p == j % n for j, p in enumerate(preds)) / 8)
