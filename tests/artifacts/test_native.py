"""The compiled low-bits codec (artifacts/codec.c) computes the bits of compact.py's torch ops, for every
float32 pattern, every slice length and every bit offset of the ties; without a compiler the torch ops run."""

from __future__ import annotations

import shutil

import pytest
import torch

from hf_contmerge.artifacts import compact, native
from hf_contmerge.artifacts.compact import decode_low16, decode_state, encode_bf16, encode_low16, pack_mask, pack_ties
from hf_contmerge.errors import ContMergeError

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")


def _patterns(n: int, seed: int) -> torch.Tensor:
    """``n`` finite float32 whose bfloat16 rounding is finite: random bit patterns (every exponent, both
    signs, subnormals), with exact ties of both parities spread through them."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    bits[torch.rand(n, generator=g) < 0.3] &= ~0xFFFF  # low half zero, then some made exact ties
    bits[torch.rand(n, generator=g) < 0.3] |= 0x8000
    x = bits.view(torch.float32)
    x[~torch.isfinite(x) | ~torch.isfinite(x.to(torch.bfloat16))] = 1.0
    return x


def _torch_encode(x: torch.Tensor):
    published = x.to(torch.bfloat16)
    low, mask = encode_low16(x, published)
    return published, low.reshape(-1), pack_mask(mask), int(mask.sum())


@needs_cc
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 255, 256, 257, 4099])
def test_compiled_encode_is_the_torch_ops_bit_for_bit(n):
    assert native.library() is not None
    x = _patterns(n, seed=n)
    got, want = encode_bf16(x), _torch_encode(x)
    assert got is not None
    assert torch.equal(got[0].view(torch.int16), want[0].view(torch.int16))
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]) and got[3] == want[3]
    assert n < 256 or 0 < got[3] < n  # ties present, not everywhere: the bitmask is exercised


@needs_cc
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 0x7F7FFFFF])
@pytest.mark.parametrize("at", [0, 300, 4098])
def test_compiled_encode_refuses_what_is_not_finite_in_bfloat16(bad, at):
    """NaN, ±Inf, and the largest float32, which rounds to a bfloat16 infinity: refused like the torch path."""
    x = _patterns(4099, seed=1)
    x[at] = torch.tensor([bad], dtype=torch.int64).to(torch.int32).view(torch.float32) if isinstance(bad, int) else bad
    assert encode_bf16(x) is None
    with pytest.MonkeyPatch.context() as m:
        m.setattr(native, "library", lambda: None)
        assert encode_bf16(x) is None


@needs_cc
@pytest.mark.parametrize("start", [0, 3, 8, 13, 1000])
@pytest.mark.parametrize("sparse", [False, True])
def test_compiled_decode_gives_back_every_bit_at_any_offset(start, sparse):
    """A slice [start, start + m) of a tensor, its ties stored as the tensor's bitmask or (few) as indices."""
    numel, m = 4099, 2051
    x = _patterns(numel, seed=7)
    if sparse:  # random low halves: ties are rare, stored as indices
        x = torch.randn(numel, generator=torch.Generator().manual_seed(3))
        x.view(torch.int32)[[5, 1500, 2500]] = torch.tensor([0x3F808000, 0xBF808000, 0x40008000]).to(torch.int32)
    published, low, bits, count = _torch_encode(x)
    stored = pack_ties(compact.packed_indices(bits), numel)
    assert (stored.dtype == torch.int64) == sparse and count > 0
    sl = slice(start, start + m)
    rows = published[sl].reshape(-1, 1)  # any shape: the result has it
    got = decode_state(rows, low[sl], stored, start)
    assert got.shape == rows.shape
    assert torch.equal(got.view(-1).view(torch.int32), x[sl].view(torch.int32))
    want = decode_low16(rows, low[sl], compact.ties_between(stored, start, start + m))
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_collector_takes_packed_slices_as_it_takes_masks():
    """Slices whose offsets are and are not whole bytes, ties few then many: what is stored is the same."""
    numel = 6000
    x = _patterns(numel, seed=11)
    x[:3000] = torch.randn(3000, generator=torch.Generator().manual_seed(2))  # few ties first: indices, then a bitmask
    _, _, whole, _ = _torch_encode(x)
    want = pack_ties(compact.packed_indices(whole), numel)
    collector = compact.TieCollector(numel)
    for a, b in ((0, 1000), (1000, 2997), (2997, 3000), (3000, 4096), (4096, 6000)):
        _, _, bits, count = _torch_encode(x[a:b])
        collector.add_packed(bits, count, a)
    assert torch.equal(collector.stored(), want) and want.dtype == torch.uint8


def test_without_a_compiler_the_torch_ops_run(monkeypatch, tmp_path):
    """No compiler, or one that fails: no library, nothing half-built left in the cache, the same bits."""
    monkeypatch.setenv("HF_CONTMERGE_CACHE", str(tmp_path))
    x = _patterns(1000, seed=5)
    try:
        for cc in ("/nonexistent/cc", "false"):
            monkeypatch.setenv("CC", cc)
            native.library.cache_clear()
            assert native.library() is None
            got, want = encode_bf16(x), _torch_encode(x)
            assert all(torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a,
                                   b.view(torch.int16) if b.dtype == torch.bfloat16 else b) for a, b in zip(got[:3], want[:3]))
        assert not any(p.is_file() for p in tmp_path.rglob("*"))
        monkeypatch.setenv("HF_CONTMERGE_NATIVE", "0")
        monkeypatch.delenv("CC")
        native.library.cache_clear()
        assert native.library() is None
    finally:
        native.library.cache_clear()  # the next test builds (or loads) the real one again


@pytest.mark.parametrize("damage", ["codes", "dtype", "ties"])
def test_codes_or_ties_that_do_not_fit_are_refused_before_any_buffer_is_read(damage):
    """A damaged step (fewer codes than weights, codes of another dtype, a bitmask shorter than the tensor):
    refused with the remedy, on either codec path (the compiled one reads raw buffers)."""
    x = _patterns(4099, seed=9)
    published, low, bits, _ = _torch_encode(x)
    if damage == "codes":
        low = low[:-1]
    elif damage == "dtype":
        low = low.to(torch.int32)
    else:
        bits = bits[:-2]
    for path in ("compiled", "torch"):
        with pytest.MonkeyPatch.context() as m:
            if path == "torch":
                m.setattr(native, "library", lambda: None)
            with pytest.raises(ContMergeError, match="damaged.*Remove that step folder"):
                decode_state(published[8:], low[8:], bits, 8)


def _palette_cases():
    g = torch.Generator().manual_seed(3)
    few = torch.randint(-3, 4, (4099,), generator=g, dtype=torch.int32).to(torch.int16)
    spread = torch.randint(-32768, 32768, (4099,), generator=g, dtype=torch.int32).to(torch.int16)
    level = (torch.arange(3000, dtype=torch.int32) % 300 - 150).to(torch.int16)  # 300 codes, equal counts: order by code
    skewed = (torch.randn(1 << 20 | 3, generator=g) * 40).round().clamp(-32768, 32767).to(torch.int16)  # sampled counts
    return {"empty": few[:0], "one": few[:1], "254": spread[:254], "255": spread[:255], "256": spread[:256], "few": few,
            "spread": spread, "level": level, "ends": torch.tensor([-32768, 32767, 0, -32768], dtype=torch.int16),
            "skewed": skewed}


@needs_cc
@pytest.mark.parametrize("case", list(_palette_cases()))
def test_compiled_palette_is_the_torch_ops_byte_for_byte_and_the_specified_order(case):
    """The block's palette bytes (table, indices, escapes) from the compiled codec are the torch path's, and
    the table is the specified one, computed here from a plain count: most frequent first, equal counts in
    ascending code order, unseen codes last in ascending order (counted on every (n >> 18)-th code)."""
    from collections import Counter

    codes = _palette_cases()[case]
    got = compact.palette(codes)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(native, "library", lambda: None)
        want = compact.palette(codes)
        back = compact.unpalette(got, codes.numel(), "block")  # the torch decoder on the compiled bytes
    assert torch.equal(got, want)
    assert torch.equal(back, codes) and torch.equal(compact.unpalette(got, codes.numel(), "block"), codes)
    stride = max(1, codes.numel() >> compact.PALETTE_SAMPLE_LOG)
    counts = Counter(codes[::stride].tolist())
    ranked = sorted(counts, key=lambda c: (-counts[c], c))
    ranked += [c for c in range(-32768, 32768) if c not in counts][: compact.PALETTE - len(ranked)]
    assert got[: 2 * compact.PALETTE].view(torch.int16).tolist() == ranked[: compact.PALETTE]
    inside = set(ranked[: compact.PALETTE])
    assert int((got[2 * compact.PALETTE : 2 * compact.PALETTE + codes.numel()] == compact.ESCAPE).sum()) == sum(
        c not in inside for c in codes.tolist())


@pytest.mark.parametrize("path", ["compiled", "torch"])
@pytest.mark.parametrize("damage", ["fewer", "more"])
def test_palette_bytes_with_other_escapes_than_their_indices_call_for_are_refused(path, damage):
    """A damaged block whose escaped codes are fewer (the compiled decoder must not read past them) or more
    than its indices call for: refused with the remedy, on either path."""
    if path == "compiled" and native.library() is None:
        pytest.skip("no C compiler on this machine")
    codes = _palette_cases()["spread"]
    payload = compact.palette(codes)
    payload = payload[:-2] if damage == "fewer" else torch.cat([payload, payload[-2:]])
    with pytest.MonkeyPatch.context() as m:
        if path == "torch":
            m.setattr(native, "library", lambda: None)
        with pytest.raises(ContMergeError, match="outside its palette.*damaged.*Remove that step folder"):
            compact.unpalette(payload, codes.numel(), "block")
