"""The compact carried state (state formats 3 to 5): exact for every float32 value, and what a step writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import zstandard
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_contmerge.artifacts import compact
from hf_contmerge.artifacts.compact import TIE, TieCollector, decode_low16, encode_low16, pack_ties, ties_between
from hf_contmerge.errors import ContMergeError
from support.tiny_models import carried, weights


def _values() -> torch.Tensor:
    """Random float32 of many magnitudes and signs, plus the hard cases: both kinds of exact tie,
    values that round across a power of two, zeros, subnormals, the largest bfloat16-safe values."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.logspace(-30, 30, 4096).float()
    hard = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000,  # ties: even (down) and odd (up) high halves
                         0x3F7FFFFF, 0x407FFF80, 0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x7F7F7FFF, 0xFF7F0000],
                        dtype=torch.int64).to(torch.int32).view(torch.float32)
    return torch.cat([x, hard])


@pytest.mark.parametrize("block", [None, 7])
def test_low_bits_over_the_rounded_weight_give_back_every_float32_bit(monkeypatch, block):
    """Exact for every value; ``block`` 7: the same in blocks that cut the tensor anywhere."""
    if block:
        monkeypatch.setattr(compact, "CHUNK", block)
    x = _values()
    published = x.to(torch.bfloat16)
    low, mask = encode_low16(x, published)
    assert low.dtype == torch.int16 and mask.dtype == torch.bool and mask.shape == x.shape
    ties = mask.nonzero().flatten()
    for given in (mask, ties, mask.to(torch.uint8)):  # a mask, indices (kept while few), a bitmask's 0/1 read
        assert torch.equal(decode_low16(published, low, given).view(torch.int32), x.view(torch.int32))
    bits = x.view(torch.int32)
    tie_down = [i for i in range(len(x)) if (int(bits[i]) & 0xFFFF) == 0x8000 and not (int(bits[i]) >> 16) & 1]
    assert ties.tolist() == tie_down and len(tie_down) == 2  # the two even-high ties of the hard cases
    assert all(int(low[i]) == TIE for i in tie_down)
    # the ties rounded up share the code and are not listed
    assert {int(low[4096 + 1]), int(low[4096 + 3])} == {TIE} and not {4096 + 1, 4096 + 3} & set(ties.tolist())


def test_slices_decode_alone_with_their_offset():
    x = _values()[:4100].reshape(41, 100)
    x.view(-1)[[250, 2501]] = torch.tensor([0x3F808000, 0x40008000], dtype=torch.int32).view(torch.float32)  # ties down
    published = x.to(torch.bfloat16)
    parts = [encode_low16(x[a:b], published[a:b]) for a, b in ((0, 10), (10, 30), (30, 41))]
    ties = torch.cat([t.flatten().nonzero().flatten() + a * 100 for (_, t), a in zip(parts, (0, 10, 30))])
    assert ties.tolist() == [250, 2501, 4096, 4098]  # and the hard cases' two ties rounded down
    low = torch.cat([lo for lo, _ in parts])
    for a, b in ((0, 41), (2, 3), (25, 26), (24, 41)):
        inside = ties[(ties >= a * 100) & (ties < b * 100)] - a * 100
        assert torch.equal(decode_low16(published[a:b], low[a:b], inside).view(torch.int32), x[a:b].view(torch.int32))


@pytest.mark.parametrize("count", [3, 400])
def test_ties_are_kept_as_indices_while_few_and_as_a_bitmask_else(count):
    numel = 1000 * 7 + 3
    found = torch.randperm(numel, generator=torch.Generator().manual_seed(count))[:count].sort().values
    stored = pack_ties(found, numel)
    assert stored.dtype == (torch.int64 if count == 3 else torch.uint8)
    # gathered slice by slice (the step's way; 400 ties cross from indices to the bitmask on the way)
    for as_mask in (False, True):  # indices, or the slices' bitmask bytes (as encode_bf16 gives them)
        collector = TieCollector(numel)
        for a, b in ((0, 1000), (1000, 1001), (1001, 5000), (5000, 6400), (6400, numel)):  # aligned or not
            inside = found[(found >= a) & (found < b)] - a
            if as_mask:
                mask = torch.zeros(b - a, dtype=torch.bool)
                mask[inside] = True
                collector.add_packed(compact.pack_mask(mask), inside.numel(), a)
            else:
                collector.add(inside, a)
        assert collector.count == count and torch.equal(collector.stored(), stored), as_mask
    if stored.dtype == torch.uint8:  # the bitmask, against one built bit by bit
        want = [0] * -(-numel // 8)
        for i in found.tolist():
            want[i // 8] |= 1 << (i % 8)
        assert stored.numel() == -(-numel // 8) and stored.tolist() == want
    for start, stop in ((0, numel), (5, 13), (999, 4004), (numel - 1, numel), (8, 8)):
        want = found[(found >= start) & (found < stop)] - start
        got = ties_between(stored, start, stop)
        if stored.dtype == torch.uint8:  # a 0/1 mask of the slice
            assert got.dtype == torch.uint8 and got.numel() == stop - start and bool((got <= 1).all())
            got = got.nonzero().flatten()
        assert torch.equal(got, want), (start, stop)


def test_many_ties_come_as_a_mask_and_decode_exactly():
    """The mean of two bfloat16 tensors is a tie wherever their last bits differ: the ties rounded down come
    as a bool mask of the slice, which decodes (and packs, from any slice cut) like indices."""
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(6000, generator=g).to(torch.bfloat16).float() for _ in range(2))
    x = (a + b) / 2
    published = x.to(torch.bfloat16)
    low, ties = encode_low16(x, published)
    assert ties.dtype == torch.bool and ties.shape == (6000,) and 300 < int(ties.sum()) < 3000
    assert torch.equal(decode_low16(published, low, ties).view(torch.int32), x.view(torch.int32))
    indices = ties.nonzero().flatten()
    assert torch.equal(decode_low16(published, low, indices).view(torch.int32), x.view(torch.int32))
    stored = pack_ties(indices, 6000)
    assert torch.equal(compact.pack_mask(ties), stored)
    collector = TieCollector(6000)
    for start, stop in ((0, 2048), (2048, 3001), (3001, 6000)):  # the middle cut is not on a byte
        mask = encode_low16(x[start:stop], published[start:stop])[1]
        collector.add_packed(compact.pack_mask(mask), int(mask.sum()), start)
    assert torch.equal(collector.stored(), stored)
    for start, stop in ((0, 6000), (3, 17), (2048, 3001)):
        got = ties_between(stored, start, stop)
        assert torch.equal(decode_low16(published[start:stop], low[start:stop], got).view(torch.int32),
                           x[start:stop].view(torch.int32))


def test_encoding_reads_the_tie_direction_from_the_published_bits():
    """The code is the float32's low half as it stands; only at the ties does the published value say which
    way rounding went, whatever rule chose it: a weight rounded half-up there decodes exactly too."""
    x = _values()
    bits = x.view(torch.int32)
    up = x.to(torch.bfloat16).view(torch.int16).clone()
    at_ties = (bits & 0xFFFF) == 0x8000
    up[at_ties] = ((bits[at_ties] >> 16) + 1).to(torch.int16)  # every tie away from the high half
    low, ties = encode_low16(x, up.view(torch.bfloat16))
    assert torch.equal(low, (bits & 0xFFFF).to(torch.int16).view(x.shape)) and not ties.any()
    assert torch.equal(decode_low16(up.view(torch.bfloat16), low, ties).view(torch.int32), bits)


def test_compressed_codes_come_back_exactly_and_structured_ones_shrink():
    """A zstd frame per slice gives its int16 codes back; random codes cost their 2 bytes and a few
    bytes of frame, the codes of a scaled sum of bfloat16 task vectors (task arithmetic's state) far less."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(-32768, 32768, (1 << 16,), generator=g, dtype=torch.int32).to(torch.int16)
    base = (torch.randn(1 << 16, generator=g) * 0.02).bfloat16().float()
    taus = [(base + torch.randn(1 << 16, generator=g) * 0.002).bfloat16().float() - base for _ in range(2)]
    state = base + 0.3 * taus[0] + 0.3 * taus[1]
    structured, _ = encode_low16(state, state.to(torch.bfloat16))
    for codes in (noise, structured, noise[:0], noise[:1]):
        frame = compact.compress_low16(codes)
        assert frame.dtype == torch.uint8 and torch.equal(compact.decompress_low16(frame, codes.numel(), "block"), codes)
    assert compact.compress_low16(noise).numel() <= 2 * noise.numel() + 64
    assert compact.compress_low16(structured).numel() < 0.8 * 2 * structured.numel()
    frame = compact.compress_low16(structured).clone()
    frame[frame.numel() // 2] ^= 0xFF  # a flipped byte: the frame's checksum (or its decoder) refuses it
    with pytest.raises(ContMergeError, match="damaged"):
        compact.decompress_low16(frame, structured.numel(), "block")
    with pytest.raises(ContMergeError, match="damaged"):
        compact.decompress_low16(compact.compress_low16(structured), structured.numel() - 1, "block")
    # a compressed float32 slot: every bit pattern (signs of both halves, NaN, Inf, -0) comes back
    bits = torch.cat([torch.randint(-2**31, 2**31, (4096,), generator=g, dtype=torch.int64),
                      torch.tensor([0x7FC00000, 0x7F800000, 0x80000000, 0x0000FFFF, 0xFFFF8000])]).to(torch.int32)
    for values in (bits.view(torch.float32), torch.stack(taus).reshape(-1)[:4096]):
        back = compact.decompress_f32(compact.compress_f32(values), values.numel(), "block")
        assert torch.equal(back.view(torch.int32), values.view(torch.int32))
    assert compact.compress_f32(taus[0]).numel() < 0.6 * 4 * taus[0].numel()  # bf16 differences: mostly-zero low halves


def _structured_codes(n: int, seed: int = 0) -> torch.Tensor:
    """The int16 codes of a scaled sum of bfloat16 task vectors (task arithmetic's state)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).bfloat16().float()
    taus = [(base + torch.randn(n, generator=g) * 0.002).bfloat16().float() - base for _ in range(2)]
    state = base + 0.3 * taus[0] + 0.3 * taus[1]
    return encode_low16(state, state.to(torch.bfloat16))[0]


def test_palette_coded_codes_come_back_exactly_in_fewer_bytes_than_plain_frames():
    """Format 5's blocks (``pal16``): each code as its index in the block's palette of 255, the others
    escaped. Every code comes back (random ones, nearly all escaped, cost their 2 bytes and ~1 % of
    indices); the codes of a task-arithmetic state take far fewer bytes than a zstd frame of the codes
    themselves (format 4), since few distinct codes make up most of them; damaged blocks are refused."""
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(-32768, 32768, (1 << 16,), generator=g, dtype=torch.int32).to(torch.int16)
    structured = _structured_codes(1 << 16)
    for codes in (noise, structured, noise[:0], noise[:1], structured[:255], torch.full((300,), compact.TIE, dtype=torch.int16)):
        frame = compact.compress_codes(codes)
        assert frame.dtype == torch.uint8 and torch.equal(compact.decompress_codes(frame, codes.numel(), "block"), codes)
    assert compact.compress_codes(noise).numel() <= 1.02 * 2 * noise.numel() + 1024  # the indices of the few not escaped
    plain, coded = compact.compress_low16(structured).numel(), compact.compress_codes(structured).numel()
    assert coded < 0.8 * plain, (coded, plain)
    frame = compact.compress_codes(structured).clone()
    frame[frame.numel() // 2] ^= 0xFF
    with pytest.raises(ContMergeError, match="damaged"):
        compact.decompress_codes(frame, structured.numel(), "block")
    for numel in (structured.numel() - 1, structured.numel() + 1):  # the size the block's name gives is off
        with pytest.raises(ContMergeError, match="damaged"):
            compact.decompress_codes(compact.compress_codes(structured), numel, "block")
    payload = compact.palette(noise)
    short = zstandard.ZstdCompressor().compress(payload[:-2].numpy())  # one escaped code missing
    with pytest.raises(ContMergeError, match="calls for .* codes outside its palette"):
        compact.decompress_codes(torch.frombuffer(bytearray(short), dtype=torch.uint8), noise.numel(), "block")


def test_a_weight_that_is_not_the_carried_slot_is_caught(tmp_path, streams, cli, monkeypatch):
    """A method that says its weight is its slot (``weight_slot``) but publishes something else would make
    the low bits meaningless: the step refuses to write rather than carry a state it cannot give back."""
    from hf_contmerge.methods.task_arithmetic import TaskArithmetic

    monkeypatch.setattr(TaskArithmetic, "weight_slot", "merged")
    monkeypatch.setattr(TaskArithmetic, "weight", lambda self, ctx, base, slots: slots["merged"] * 1.5)
    base, items = streams("llama", n=1, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="is not the carried slot 'merged'"):
        cli("merge", "--base", base, "--stream", *items, "--method", "task_arithmetic", "--out", tmp_path / "out", "--quiet")
    assert not (tmp_path / "out" / "step-1").exists()


def _merge(cli, base, items, out, method, *flags):
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", method, "--out", out, "--quiet", *flags)
    assert code == 0, err


def _bytes(folder):
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("method", ["average", "task_arithmetic"])
def test_a_bf16_stream_carries_its_state_exactly_in_four_bytes_a_parameter(tmp_path, streams, cli, method, compression):
    """bf16 in and out over 4 steps: the carried float32 state, read back from the published weights and
    their low bits (compressed or not), is bit for bit the state of the same run published in float32
    (where the state is the weights themselves); each step writes at most 2× its published weights.
    ``average`` of bfloat16 values makes many exact ties, so the tie list is exercised."""
    base, items = streams("llama", n=4, dtype=torch.bfloat16)
    _merge(cli, base, items, tmp_path / "bf16", method, "--state-compression", compression)
    with safe_open(tmp_path / "bf16/step-2/contmerge_state/low16-merged.safetensors", "pt") as f:
        names = set(f.keys())
    assert names == ({k for k in names if "::pal16[" in k} if compression == "zstd" else set(weights(tmp_path / "bf16/step-2")))
    _merge(cli, base, items, tmp_path / "f32", method, "--dtype", "float32")
    for t in range(1, 5):
        step, wide = tmp_path / f"bf16/step-{t}", tmp_path / f"f32/step-{t}"
        state = json.loads((step / "contmerge_state.json").read_text())
        assert state["format_version"] == 5 and state["weight_slot"] == "merged"
        assert not load_file(step / "contmerge_state" / "merged.safetensors")  # nothing float32 beside the weights
        assert not load_file(wide / "contmerge_state" / "merged.safetensors") and not list(
            (wide / "contmerge_state").glob("low16-*"))
        exact, published = carried(step, "merged"), weights(step)
        reference = weights(wide)
        assert exact.keys() == {k for k, v in reference.items() if v.is_floating_point()}
        for k, v in exact.items():
            assert v.dtype == torch.float32 and torch.equal(v.view(torch.int32), reference[k].view(torch.int32)), (t, k)
            assert torch.equal(published[k], v.to(torch.bfloat16)), (t, k)
        model = _bytes(step) - _bytes(step / "contmerge_state")
        headers = 4096 * (1 + len(list((step / "contmerge_state").glob("*.safetensors"))))
        # ties as a bitmask (1/8 byte a parameter, 1/16 of the bf16 model) where they abound: the mean of two bf16 models
        assert _bytes(step) <= 2 * model * (1.0625 if (method, t) == ("average", 2) else 1) + headers, (t, _bytes(step), model)
    if method == "average":
        ties = load_file(tmp_path / "bf16/step-2/contmerge_state/ties-merged.safetensors")
        assert any(v.dtype == torch.uint8 for v in ties.values())


def test_a_format_2_step_is_read_and_continued_bit_identically(tmp_path, streams, cli):
    """A step written before the compact state (float32 slot file, format 2) is resumed as before."""
    base, items = streams("llama", n=3, dtype=torch.bfloat16)
    _merge(cli, base, items, tmp_path / "whole", "task_arithmetic")
    _merge(cli, base, items[:2], tmp_path / "old", "task_arithmetic")
    step = tmp_path / "old/step-2"
    dense = carried(step, "merged")
    for p in (step / "contmerge_state").iterdir():
        p.unlink()
    save_file(dense, step / "contmerge_state" / "merged.safetensors")
    _continue_as_format(tmp_path, cli, base, items, "task_arithmetic", 2)


def _continue_as_format(tmp_path, cli, base, items, method, version) -> None:
    """``old/step-2``, its files rewritten as a format-``version`` step, marked so and resumed alone: step 3
    must be the uninterrupted run's (``whole``), byte for byte."""
    step = tmp_path / "old/step-2"
    state = json.loads((step / "contmerge_state.json").read_text())
    state["format_version"] = version
    if version < 3:  # before the compact state
        state.pop("weight_slot")
    (step / "contmerge_state.json").write_text(json.dumps(state))
    shutil.rmtree(tmp_path / "old/step-1")
    _merge(cli, base, items, tmp_path / "old", method, "--resume")
    new, ref = tmp_path / "old/step-3", tmp_path / "whole/step-3"
    for p in sorted(ref.rglob("*.safetensors")):
        assert p.read_bytes() == (new / p.relative_to(ref)).read_bytes(), p


def test_verbose_reports_what_a_step_moved_and_average_skips_the_base(tmp_path, streams, cli):
    """--verbose: each step's bytes read (every tensor the engine read) and written. ``average`` reads
    no base tensor once the base's fingerprint is known (step 2 on: the reads of step 1 computed it),
    so its step 2 reads one model less than task arithmetic's, and publishes the same kind of folder."""
    import re

    base, items = streams("llama", n=2, dtype=torch.bfloat16)
    read = {}
    for method in ("average", "task_arithmetic"):
        code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", method, "--out", tmp_path / method,
                           "--quiet", "--verbose")
        assert code == 0, err
        found = {s: (float(r), float(w)) for s, r, w in re.findall(r"step (\d): read ([\d.]+) GB, wrote ([\d.]+) GB", err)}
        assert found.keys() == {"1", "2"}, err
        step2 = tmp_path / method / "step-2"
        assert found["2"][1] * 1e9 == pytest.approx(sum(p.stat().st_size for p in step2.rglob("*") if p.is_file()), abs=1e3)
        # less the previous step's ties and compressed low bits, which it reads too (as many bytes as the method's made)
        prev = (tmp_path / method / "step-1" / "contmerge_state").glob("*-merged.safetensors")
        read[method] = found["2"][0] * 1e9 - sum(v.numel() * v.element_size() for p in prev for v in load_file(p).values())
    model = sum(v.numel() * v.element_size() for p in Path(base).glob("*.safetensors") for v in load_file(p).values())
    assert read["task_arithmetic"] - read["average"] == pytest.approx(model, abs=2e3)  # GB are printed to the KB


def test_slices_that_cut_the_written_blocks_read_exactly(tmp_path, streams, cli):
    """Written in slices of one size (``--chunk-mb``), read in any rows: the blocks that hold them are
    decoded (the last one kept) and cut, bit for bit the state read whole."""
    from hf_contmerge.artifacts.folder import open_slot

    base, items = streams("llama", n=2, dtype=torch.bfloat16)
    _merge(cli, base, items, tmp_path / "out", "average", "--chunk-mb", "0.004")
    slot = open_slot(tmp_path / "out/step-2", "merged", "merged")
    try:
        blocks = [k for k in slot.low.keys() if k.startswith("lm_head.weight::pal16[")]
        assert len(blocks) > 2  # the tensor was written in slices
        whole = slot.read("lm_head.weight")
        rows = whole.shape[0]
        for a, b in ((0, rows), (1, 2), (3, rows - 1), (rows - 1, rows), (0, 1)):
            assert torch.equal(slot.read("lm_head.weight", (a, b)).view(torch.int32), whole[a:b].view(torch.int32)), (a, b)
    finally:
        slot.close()


def _rewrite_low16(step: Path, change) -> None:
    """Rewrite a step's low16 file: ``change(tensors)`` edits its tensors by name, in place."""
    path = step / "contmerge_state" / "low16-merged.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_damaged_low_bits_are_refused_and_nothing_is_written(tmp_path, streams, cli):
    """A corrupt frame or a missing block of the previous step: --resume names the step and writes nothing."""
    base, items = streams("llama", n=3, dtype=torch.bfloat16)
    for damage in ("corrupt", "missing"):
        out = tmp_path / damage
        _merge(cli, base, items[:2], out, "task_arithmetic")

        def change(tensors, damage=damage):
            name = next(k for k in tensors if k.startswith("lm_head.weight::pal16["))
            if damage == "corrupt":
                tensors[name][len(tensors[name]) // 2] ^= 0xFF
            else:
                del tensors[name]
        _rewrite_low16(out / "step-2", change)
        before = sorted(p for p in out.rglob("*"))
        code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "task_arithmetic", "--out", out,
                           "--quiet", "--resume")
        assert code != 0 and "step-2" in err and "damaged" in err, err
        assert sorted(p for p in out.rglob("*")) == before


def test_a_format_3_step_is_read_and_continued_bit_identically(tmp_path, streams, cli):
    """A step whose low bits are one uncompressed int16 tensor per weight (format 3) is resumed as before."""
    base, items = streams("llama", n=3, dtype=torch.bfloat16)
    _merge(cli, base, items, tmp_path / "whole", "average")
    _merge(cli, base, items[:2], tmp_path / "old", "average")
    step = tmp_path / "old/step-2"

    def uncompress(tensors):
        for key, spans in _palette_blocks(tensors).items():
            codes = [compact.decompress_codes(tensors.pop(k), b - a, k) for a, b, k in spans]
            tensors[key] = torch.cat(codes).reshape(weights(step)[key].shape)
    _rewrite_low16(step, uncompress)
    _continue_as_format(tmp_path, cli, base, items, "average", 3)


def _palette_blocks(tensors) -> dict[str, list[tuple[int, int, str]]]:
    """A format-5 low16 file's blocks (``KEY::pal16[a:b]``) by tensor, in order: (a, b, name) each."""
    found: dict[str, list[tuple[int, int, str]]] = {}
    for name in tensors:
        key, span = name.split("::pal16[")
        a, b = span.rstrip("]").split(":")
        found.setdefault(key, []).append((int(a), int(b), name))
    return {k: sorted(v) for k, v in found.items()}


@pytest.mark.parametrize("method", ["average", "task_arithmetic"])
def test_a_format_4_step_is_read_and_continued_bit_identically(tmp_path, streams, cli, method):
    """A step whose low bits are zstd frames of the plain int16 codes (format 4, ``KEY::low16[a:b]``) is
    resumed as before: the next step is the uninterrupted run's, byte for byte."""
    base, items = streams("llama", n=3, dtype=torch.bfloat16)
    _merge(cli, base, items, tmp_path / "whole", method)
    _merge(cli, base, items[:2], tmp_path / "old", method)

    def recode(tensors):
        for key, spans in _palette_blocks(tensors).items():
            for a, b, name in spans:
                codes = compact.decompress_codes(tensors.pop(name), b - a, name)
                tensors[f"{key}::low16[{a}:{b}]"] = compact.compress_low16(codes)
    _rewrite_low16(tmp_path / "old/step-2", recode)
    assert all("::low16[" in k for k in load_file(tmp_path / "old/step-2/contmerge_state/low16-merged.safetensors"))
    _continue_as_format(tmp_path, cli, base, items, method, 4)


def test_a_resume_may_change_the_state_compression(tmp_path, streams, cli):
    """Steps 1–2 compressed, step 3 not, step 4 compressed again: the same published bytes and carried
    state as a run compressed throughout (the option changes how the low bits are stored, not them)."""
    base, items = streams("llama", n=4, dtype=torch.bfloat16)
    _merge(cli, base, items, tmp_path / "zstd", "task_arithmetic")
    _merge(cli, base, items[:2], tmp_path / "mixed", "task_arithmetic")
    _merge(cli, base, items[:3], tmp_path / "mixed", "task_arithmetic", "--resume", "--state-compression", "none")
    _merge(cli, base, items, tmp_path / "mixed", "task_arithmetic", "--resume")
    assert "::" not in "".join(load_file(tmp_path / "mixed/step-3/contmerge_state/low16-merged.safetensors"))
    for t in (3, 4):
        ref, got = tmp_path / f"zstd/step-{t}", tmp_path / f"mixed/step-{t}"
        for p in sorted(ref.glob("*.safetensors")):
            assert p.read_bytes() == (got / p.name).read_bytes(), p
        assert all(torch.equal(a.view(torch.int32), b.view(torch.int32))
                   for a, b in zip(carried(ref, "merged").values(), carried(got, "merged").values()))


def test_magmax_carries_its_task_vectors_compressed_and_exact(tmp_path, streams, cli):
    """MagMax's τmax (``compressible_slots``): float32 blocks, bit for bit the uncompressed run's τmax, in
    well under its 4 bytes a parameter (differences of bf16 models: the low halves are mostly zero); the
    published weights are the same bytes, and a resume may switch between the two layouts."""
    base, items = streams("llama", n=3, dtype=torch.bfloat16)
    _merge(cli, base, items, tmp_path / "zstd", "magmax")
    _merge(cli, base, items, tmp_path / "none", "magmax", "--state-compression", "none")
    _merge(cli, base, items[:2], tmp_path / "mixed", "magmax", "--state-compression", "none")
    _merge(cli, base, items, tmp_path / "mixed", "magmax", "--resume")
    for t in (1, 2, 3):
        z, n = tmp_path / f"zstd/step-{t}", tmp_path / f"none/step-{t}"
        names = list(load_file(z / "contmerge_state/tau_max.safetensors"))
        assert names and all("::f32[" in k for k in names)
        exact, wide = carried(z, "tau_max"), carried(n, "tau_max")
        assert exact.keys() == wide.keys() and all(torch.equal(exact[k].view(torch.int32), v.view(torch.int32)) for k, v in wide.items())
        assert all(exact[k].shape == v.shape for k, v in wide.items())
        size = [(d / "contmerge_state/tau_max.safetensors").stat().st_size for d in (z, n)]
        assert size[0] < 0.75 * size[1], size
        for p in sorted(n.glob("*.safetensors")):
            assert p.read_bytes() == (z / p.name).read_bytes(), p
    mixed, ref = tmp_path / "mixed/step-3", tmp_path / "zstd/step-3"
    for p in sorted(ref.rglob("*.safetensors")):
        assert p.read_bytes() == (mixed / p.relative_to(ref)).read_bytes(), p
