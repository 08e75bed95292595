"""Randomly corrupted safetensors headers and shard indexes (seeded, bounded): a clear refusal or a
correct merge, never a traceback (issue 16)."""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
from pathlib import Path

import pytest

from support.refusal import merge
from support.tiny_models import make_stream


@pytest.fixture(scope="module")
def fuzz_stream(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    base, items = make_stream(root, "llama", 1)
    return root, base, items[0]


def _reference(cli, root: Path, base: Path, item: Path) -> bytes:
    out = root / "reference"
    if not out.exists():
        assert merge(cli, base, [item], out)[0] == 0
    return (out / "step-1" / "model.safetensors").read_bytes()


def _check(cli, base: Path, item: Path, out: Path, reference: bytes, what: str) -> str:
    """Merge ``item``: a refusal (exit 2, one message, nothing written) or the reference bytes."""
    try:
        code, _, err = merge(cli, base, [item], out)
    except Exception as e:  # anything but a ContMergeError escapes main(): the traceback the user would see
        pytest.fail(f"{what}: {e.__class__.__name__}: {e}")
    assert "Traceback" not in err, what
    assert code in (0, 2), (what, err)
    if code == 0:
        assert (out / "step-1" / "model.safetensors").read_bytes() == reference, f"{what}: merged, but not correctly"
        return "merged"
    assert err.startswith("hf-contmerge: error: ") and not out.exists(), (what, err)
    return "refused"


def _mutate_header(data: bytes, rng: random.Random) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    head, body = bytearray(data[8 : 8 + n]), data[8 + n :]
    kind = rng.choice(["flip", "insert", "delete", "length", "truncate", "swap", "space"])
    i = rng.randrange(len(head))
    if kind == "space":  # harmless: whitespace after a separator, the length field made to fit
        seps = [j + 1 for j, c in enumerate(head) if c in b",:"]
        j = rng.choice(seps)
        head[j:j] = rng.choice([b" ", b"\n", b"\t", b"\r\n "])
        return struct.pack("<Q", len(head)) + bytes(head) + body
    if kind == "flip":
        head[i] = rng.choice([rng.randrange(256), *b'{}[]",:0123456789-. '])
    elif kind == "insert":
        head[i:i] = bytes([rng.choice(b'{}[]",:0 1a\\')])
    elif kind == "delete":
        del head[i]
    elif kind == "swap":
        j = rng.randrange(len(head))
        head[i], head[j] = head[j], head[i]
    elif kind == "length":
        return struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, n + 8, 2**63, len(data)])) + data[8:]
    else:
        return data[: rng.randrange(len(data))]
    length = n if rng.random() < 0.5 else len(head)  # the length field left as it was, or made to fit
    return struct.pack("<Q", length) + bytes(head) + body


def test_fuzzed_headers(tmp_path, cli, fuzz_stream):
    root, base, item = fuzz_stream
    reference = _reference(cli, root, base, item)
    data = (item / "model.safetensors").read_bytes()
    rng = random.Random(1616)
    outcomes = []
    for trial in range(60):
        bad = Path(shutil.copytree(item, tmp_path / f"item{trial}"))
        (bad / "model.safetensors").write_bytes(_mutate_header(data, rng))
        outcomes.append(_check(cli, base, bad, tmp_path / f"out{trial}", reference, f"header trial {trial}"))
        shutil.rmtree(bad)
    assert outcomes.count("refused") >= 30  # the corruption is real: most trials must be refused
    assert outcomes.count("merged") >= 3  # and a harmless change is merged, to the same bytes


def _random_value(rng: random.Random):
    return rng.choice([None, True, 0, -1, 1.5, math.nan, "", "model.safetensors", "../x", [], ["a"], {}, {"a": 1}])


def _mutate_index(index: dict, rng: random.Random) -> bytes:
    index = json.loads(json.dumps(index))
    kind = rng.choice(["value", "value", "drop", "top", "bytes"])
    weight_map = index["weight_map"]
    key = rng.choice(sorted(weight_map))
    if kind == "value":
        weight_map[key] = _random_value(rng)
    elif kind == "drop":
        del weight_map[key]
    elif kind == "top":
        index[rng.choice(["weight_map", "metadata"])] = _random_value(rng)
    else:
        raw = bytearray(json.dumps(index).encode())
        raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    return json.dumps(index).encode()


def test_fuzzed_shard_indexes(tmp_path, cli, fuzz_stream):
    from safetensors.torch import load_file, save_file

    root, base, item = fuzz_stream
    reference = _reference(cli, root, base, item)
    sharded = Path(shutil.copytree(item, tmp_path / "sharded"))
    sd = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    keys = list(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, sharded / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _check(cli, base, sharded, tmp_path / "clean", reference, "clean index") == "merged"
    rng = random.Random(1617)
    outcomes = []
    for trial in range(40):
        (sharded / "model.safetensors.index.json").write_bytes(_mutate_index(index, rng))
        outcomes.append(_check(cli, base, sharded, tmp_path / f"out{trial}", reference, f"index trial {trial}"))
    assert outcomes.count("refused") >= 15
    assert outcomes.count("merged") >= 3  # a dropped entry or a shard named twice: tensors are found by the headers
