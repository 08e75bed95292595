"""The diagonal Fisher against independent per-sample autograd references (METHODS.md, exactly)."""

from __future__ import annotations

import pytest
import torch

from hf_contmerge.calibration.fisher import diagonal_fisher
from support.reference import fisher_batch, fisher_per_sample, unpadded
from support.tiny_models import bert_classifier, llama


def _batches(seed: int, n: int = 6, batch: int = 3, vocab: int = 90) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of random token ids, of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 10, (n,), generator=g).tolist()
    out = []
    for start in range(0, n, batch):
        chunk = lengths[start : start + batch]
        ids = torch.zeros(len(chunk), max(chunk), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, k in enumerate(chunk):
            ids[i, :k] = torch.randint(5, vocab, (k,), generator=g)
            mask[i, :k] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture(params=["classifier", "causal-lm", "causal-lm-tied"])
def model(request):
    """A classifier, a causal LM, and one whose LM head is its embedding (one weight used twice per
    pass: the square of the summed gradient, not the sum of squares)."""
    torch.manual_seed(3)
    return {"classifier": lambda: bert_classifier(3), "causal-lm": llama, "causal-lm-tied": lambda: llama(tied=True)}[request.param]()


def _assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name].double(), value, rtol=1e-4, atol=1e-12 + 1e-6 * float(value.abs().max()),
                                   msg=lambda m: f"{name}: {m}")


def test_per_sample_fisher_equals_the_autograd_reference(model):
    batches = _batches(0)
    expected = fisher_per_sample(model, unpadded(batches))
    assert any(float(v.abs().max()) > 0 for v in expected.values())
    _assert_equal(diagonal_fisher(model, batches, "per_sample"), expected)


def test_batch_fisher_equals_its_definition(model):
    batches = _batches(1)
    _assert_equal(diagonal_fisher(model, batches, "batch"), fisher_batch(model, batches))


def test_padding_and_batch_mates_do_not_change_the_per_sample_fisher(model):
    batches = _batches(2, n=6, batch=3)
    alone = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in unpadded(batches)]
    _assert_equal(diagonal_fisher(model, batches, "per_sample"),
                  {k: v.double() for k, v in diagonal_fisher(model, alone, "per_sample").items()})


def test_the_model_is_left_as_it_was(model):
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    diagonal_fisher(model, _batches(4), "per_sample")
    assert model.training
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", ["per_sample", "batch"])
def test_fisher_under_a_device_map_with_cpu_and_disk_offload_equals_the_unmapped_one(tmp_path, mode, monkeypatch):
    """Accelerate loads offloaded weights only for their module's forward: the recorded tensors keep
    every gradient, so a model offloaded to CPU and disk gives the Fisher of the resident model."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(5)
    llama().save_pretrained(tmp_path / "m")
    resident = LlamaForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    mapped = LlamaForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32, device_map="auto",
                                              max_memory={"cpu": "60KB"}, offload_folder=tmp_path / "offload")
    assert "disk" in set(mapped.hf_device_map.values())  # the forced offload happened
    batches = _batches(6)
    expected = {k: v.double() for k, v in diagonal_fisher(resident, batches, mode).items()}
    from hf_contmerge.calibration import compose

    reloads = []
    real = compose._reload
    monkeypatch.setattr(compose, "_reload", lambda *a: reloads.append(a[1]) or real(*a))
    got = diagonal_fisher(mapped, batches, mode, torch.device("cpu"), offload_dir=tmp_path / "acc")
    _assert_equal(got, expected)
    # the backward pass reloaded offloaded weights from the offload instead of keeping the forward's copies
    assert reloads and {n.rsplit(".", 1)[-1] for n in reloads} >= {"weight"}
    # the accumulators of disk-offloaded modules are files there (not RAM), one per parameter, float32
    on_disk = [n for n, p in mapped.named_parameters()
               if mapped.hf_device_map.get(max((m for m in mapped.hf_device_map if n.startswith(m + ".") or m == ""), key=len)) == "disk"]
    files = sorted((tmp_path / "acc").iterdir())
    assert on_disk and len(files) == len(on_disk)
    assert sum(f.stat().st_size for f in files) == 4 * sum(dict(mapped.named_parameters())[n].numel() for n in on_disk)
