"""The validating reader and the streaming writer against the safetensors library and transformers."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from hf_contmerge.io.safetensors import SafetensorsFile, TensorSpec, iter_row_chunks
from hf_contmerge.io.writer import StreamingWriter, plan_shards
from support.tiny_models import carried, weights


def test_sharded_writer_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(7, 5, generator=g),
        "a.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.ids": torch.arange(6, dtype=torch.int64),
        "scalar": torch.tensor(3.5, dtype=torch.float16),
        "empty": torch.zeros(0, 4),
    }
    specs = [TensorSpec(k, tuple(v.shape), {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64",
                                             torch.float16: "F16"}[v.dtype]) for k, v in tensors.items()]
    writer = StreamingWriter.planned(tmp_path, specs, plan_shards(specs, 100))
    for key in writer.sequence:
        t = tensors[key]
        for rows in iter_row_chunks(tuple(t.shape), t.element_size(), 24):
            writer.write(key, t if rows is None else t[rows[0]:rows[1]])
    files = writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    loaded = {}
    for f in files:
        if f.suffix == ".safetensors":
            loaded.update(load_file(f))  # the safetensors library accepts what we wrote
            assert SafetensorsFile(f).metadata == {"format": "pt"}
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k


def test_append_writer_round_trip(tmp_path):
    """Shapes known only on arrival (low-rank factors): whole tensors, chunked ones, empty ones, shards."""
    g = torch.Generator().manual_seed(1)
    tensors = {
        "w::left": torch.randn(6, 3, generator=g),
        "w::right": torch.randn(3, 0, generator=g),
        "chunked": torch.randn(8, 2, generator=g).to(torch.bfloat16),
        "x::left": torch.randn(2, 9, generator=g),
    }
    writer = StreamingWriter.appended(tmp_path, [*tensors, "never.written"], max_shard_size=60, prefix="lowrank-merged",
                                      shapes={"chunked": (8, 2)})
    for key, t in tensors.items():
        for rows in ([(0, 3), (3, 8)] if key == "chunked" else [None]):
            writer.write(key, t if rows is None else t[rows[0]:rows[1]])
    files = writer.close()
    index = json.loads((tmp_path / "lowrank-merged.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and len({f for f in files if f.suffix == ".safetensors"}) > 1
    loaded = {}
    for f in files:
        if f.suffix == ".safetensors":
            loaded.update(load_file(f))
            assert set(SafetensorsFile(f).tensors) <= set(tensors)  # our validating reader accepts the padding
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k
    assert not list(tmp_path.glob(".*partial"))


def test_writers_with_nothing_planned_leave_valid_empty_files(tmp_path):
    StreamingWriter.planned(tmp_path, [], [], prefix="merged").close()
    StreamingWriter.appended(tmp_path, ["a"], prefix="lowrank-merged").close()
    assert load_file(tmp_path / "merged.safetensors") == {} and load_file(tmp_path / "lowrank-merged.safetensors") == {}


def test_reader_rows_equal_slices(tmp_path):
    t = torch.randn(9, 4, 3)
    save_file({"x": t, "y": torch.ones(2)}, tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    assert torch.equal(f.read("x"), t)
    assert torch.equal(f.read("x", (2, 7)), t[2:7])
    f.close()


def test_sharded_output_loads_with_transformers(tmp_path, streams, cli):
    from transformers import AutoModelForCausalLM

    base, items = streams("llama")
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "average", "--shard-size", "30KB",
                       "--out", out, "--quiet")
    assert code == 0, err
    step = out / "step-3"
    assert len(list(step.glob("model-*-of-*.safetensors"))) > 2 and (step / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(step)
    ref = {k: sum(weights(i)[k] for i in items) / 3 for k in weights(base)}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref[k])
    # float32 model: the carried state is the published weights themselves (compact.py), nothing beside them
    assert not load_file(step / "contmerge_state" / "merged.safetensors")
    state = carried(step, "merged")
    assert state.keys() == ref.keys() and all(torch.equal(state[k], v) for k, v in weights(step).items())
    # bfloat16: the low bits are sharded like any planned file, and give the float32 state back
    code, _, err = cli("merge", "--base", base, "--stream", *items, "--method", "average", "--shard-size", "30KB",
                       "--dtype", "bfloat16", "--out", tmp_path / "bf16", "--quiet")
    assert code == 0, err
    low = tmp_path / "bf16" / "step-3" / "contmerge_state"
    assert (low / "low16-merged.safetensors.index.json").is_file() and len(list(low.glob("low16-merged-*"))) > 1
    exact = carried(tmp_path / "bf16" / "step-3", "merged")
    assert all(torch.equal(exact[k], v) for k, v in state.items())  # the same float32 run, bit for bit


def test_sharded_input_is_read(tmp_path, streams, cli):
    from transformers import AutoModelForCausalLM

    base, items = streams("llama")
    sharded = tmp_path / "sharded-ft"
    AutoModelForCausalLM.from_pretrained(items[0]).save_pretrained(sharded, max_shard_size="20KB")
    out = tmp_path / "out"
    code, _, err = cli("merge", "--base", base, "--stream", sharded, "--method", "average", "--out", out, "--quiet")
    assert code == 0, err
    assert weights(out / "step-1").keys() == weights(items[0]).keys()
    for k, v in weights(items[0]).items():
        assert torch.equal(weights(out / "step-1")[k], v)


def test_content_digest_equals_a_direct_hash_however_the_tensors_are_read(tmp_path):
    import hashlib

    from hf_contmerge.io.checkpoint import Checkpoint

    g = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(7, 5, generator=g).to(torch.bfloat16), "a": torch.randn(3, generator=g),
               "s": torch.tensor(2.5), "i": torch.arange(6, dtype=torch.int64).reshape(2, 3), "e": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "model.safetensors")
    names = {torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        digest = hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        h.update(f"{key}\0{names[t.dtype]}\0{list(t.shape)}\0{digest}\n".encode())
    expected = "sha256:" + h.hexdigest()[:16]
    assert Checkpoint.open(tmp_path).fingerprinted().digest.hexdigest() == expected  # nothing read before: all read now
    ck = Checkpoint.open(tmp_path).fingerprinted()
    for rows in [(0, 3), (3, 7), (0, 7), (2, 4)]:  # in order, then re-reads and an out-of-order range
        ck.read("b", rows)
    ck.read("a", (1, 3))  # starts past the first row: not hashed, read again at the end
    ck.read("s")
    assert ck.digest.hexdigest() == expected
    tensors["b"][6, 4] += 1
    save_file(tensors, tmp_path / "model.safetensors")
    assert Checkpoint.open(tmp_path).fingerprinted().digest.hexdigest() != expected


def test_shared_planned_writers_write_the_bytes_of_one_writer(tmp_path, monkeypatch):
    """Two ranks' shared writers (tensors in any order, a pwrite that writes 13 bytes a call) produce
    the files, index included, of one sequential writer."""
    import os

    from hf_contmerge.io.writer import Share

    specs = [TensorSpec(f"t{i}", (7, 5), "F32") for i in range(6)]
    shards = plan_shards(specs, 300)
    assert len(shards) > 1
    torch.manual_seed(0)
    tensors = {s.key: torch.randn(7, 5) for s in specs}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = StreamingWriter.planned(tmp_path / "one", specs, shards)
    for k, t in tensors.items():
        one.write(k, t)
    one.close()
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real(fd, bytes(data[:13]), offset))
    main = StreamingWriter.planned(tmp_path / "two", specs, shards, share=Share(True, frozenset({"t0", "t3"})))
    other = StreamingWriter.planned(tmp_path / "two", specs, shards, share=Share(False, frozenset({"t1", "t2", "t4", "t5"})))
    for k in ("t3", "t0"):
        main.write(k, tensors[k])
    for k in ("t5", "t1", "t4", "t2"):
        other.write(k, tensors[k][:3])  # a tensor in two chunks
        other.write(k, tensors[k][3:])
    main.close()
    other.close()
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_writers_start_the_disk_on_what_they_wrote_every_writeback_bytes(tmp_path, monkeypatch):
    """Every ``WRITEBACK_BYTES`` a writer hands the file it writes to the disk (start_writeback), its
    buffered bytes flushed first; the files are the same bytes. The real system call is accepted here."""
    import os
    import sys

    from hf_contmerge.io import writer as wr

    if sys.platform.startswith("linux"):
        probe = tmp_path / "probe"
        probe.write_bytes(b"x" * 10000)
        fd = os.open(probe, os.O_WRONLY)
        try:
            assert wr._sync_file_range() is not None and wr._sync_file_range()(fd, 0, 0, wr.SYNC_FILE_RANGE_WRITE) == 0
        finally:
            os.close(fd)
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(wr, "WRITEBACK_BYTES", 100)
    monkeypatch.setattr(wr, "start_writeback", lambda fd: started.append((fd, os.fstat(fd).st_size)))
    specs = [TensorSpec(f"t{i}", (10, 5), "F32") for i in range(3)]  # 200 bytes each, written 40 at a time
    tensors = {s.key: torch.randn(10, 5) for s in specs}
    (tmp_path / "out").mkdir()
    writer = StreamingWriter.planned(tmp_path / "out", specs, plan_shards(specs, 10**6))
    for k in writer.sequence:
        for a in range(0, 10, 2):
            writer.write(k, tensors[k][a:a + 2])
    head = 8 + int.from_bytes((tmp_path / "out" / "model.safetensors").read_bytes()[:8], "little")
    assert [size for _, size in started] == [head + 120 * i for i in range(1, 6)]  # every third chunk, flushed
    assert len({fd for fd, _ in started}) == 1
    writer.close()
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], t) for k, t in tensors.items())
