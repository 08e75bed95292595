"""Every data-free method, streamed tensor by tensor over files, equals an in-memory reference."""

from __future__ import annotations

import pytest
import torch

from support.reference import DATA_FREE, REFERENCES, set_flags
from support.tiny_models import FAMILIES, weights
from support.tiny_models import carried as carried_slot


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method,params", DATA_FREE, ids=[m for m, _ in DATA_FREE])
def test_streamed_equals_reference(tmp_path, streams, cli, family, method, params):
    base, items = streams(family)
    out = tmp_path / "out"
    # a tiny slice budget makes elementwise kernels run on many dim-0 slices of each tensor
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", method, *set_flags(params),
                       "--out", out, "--quiet", "--chunk-mb", "0.002")
    assert code == 0, err
    base_sd = weights(base)
    expected = REFERENCES[method](base_sd, [weights(i) for i in items], **params)
    for t, ref in enumerate(expected, start=1):
        got = weights(out / f"step-{t}")
        assert set(got) == set(base_sd)
        for k, v in base_sd.items():
            if not v.is_floating_point():
                assert torch.equal(got[k], v), k  # buffers are copied, not merged
                continue
            assert got[k].dtype == v.dtype
            torch.testing.assert_close(got[k].double(), ref[k].double(), atol=2e-6, rtol=1e-5, msg=lambda m: f"step {t} {k}: {m}")


@pytest.mark.parametrize("method,params", DATA_FREE, ids=[m for m, _ in DATA_FREE])
def test_bf16_stream_carries_float32_state(tmp_path, streams, cli, method, params):
    """bf16 in, bf16 out, but the carried state stays float32: no rounding build-up over the stream."""
    base, items = streams("llama", n=4, dtype=torch.bfloat16)
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", method, *set_flags(params), "--out", out, "--quiet")
    assert code == 0, err
    ref = REFERENCES[method](weights(base), [weights(i) for i in items], **params)[-1]
    final = out / "step-4"
    slot = "tau_max" if method == "magmax" else "merged"
    carried = carried_slot(final, slot)
    got = weights(final)
    base_sd = weights(base)
    for k, v in ref.items():
        assert got[k].dtype == torch.bfloat16
        if method == "magmax":
            state_weight = base_sd[k].float() + params["scaling"] * carried[k]
        else:
            state_weight = carried[k]
        assert carried[k].dtype == torch.float32
        torch.testing.assert_close(state_weight.double(), v.double(), atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")
        assert torch.equal(got[k], state_weight.to(torch.bfloat16)), k


def test_dtype_option_writes_requested_dtype(tmp_path, streams, cli):
    base, items = streams("llama")
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", base, "--stream", *items[:1], "--method", "average", "--dtype", "bfloat16",
                       "--out", out, "--quiet")
    assert code == 0, err
    got = weights(out / "step-1")
    assert {v.dtype for v in got.values()} == {torch.bfloat16}
    assert torch.equal(got["model.norm.weight"], weights(items[0])["model.norm.weight"].to(torch.bfloat16))
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out / "step-1").dtype == torch.bfloat16
