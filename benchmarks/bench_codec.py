"""The low-bits codec (artifacts/compact.py) per element: the compiled kernel (artifacts/codec.c) against the
torch ops it replaces, side by side in one process, on one core (the engine gives its kernels one thread on
a 2-core machine), and zstd's cost on the same codes for scale.

The state is a continual task-arithmetic merge of bfloat16 models (base + 0.3 · Σ task vectors, float32), the
shape of a 7B ``mlp.down_proj`` slice the engine encodes at once (16 MiB of float32: 4M elements). Each
figure is the best of ``--repeats`` runs (the fastest is the one least disturbed by the rest of the machine).

    python benchmarks/bench_codec.py [--elements 4194304] [--repeats 15]
"""

from __future__ import annotations

import argparse
import time

import torch
import zstandard

from hf_contmerge.artifacts import compact, native
from hf_contmerge.engine.allocator import keep_freed_memory


def state(n: int, models: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    merged = base.float()
    for _ in range(models):
        item = (base.float() + torch.randn(n, generator=g) * 1e-3).to(torch.bfloat16)
        merged += 0.3 * (item.float() - base.float())
    return merged


def best(f, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elements", type=int, default=1 << 22)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as a merge process: slice buffers reused, not faulted in afresh
    x, n = state(args.elements), args.elements
    lib = native.library()
    if lib is None:
        raise SystemExit("no compiled codec here (no C compiler, or HF_CONTMERGE_NATIVE=0): nothing to compare")
    encoded = compact.encode_bf16(x)
    published, low, bits, count = encoded
    stored = compact.pack_ties(compact.packed_indices(bits), n)

    def torch_decode():
        return compact.decode_low16(published, low, compact.ties_between(stored, 0, n))

    rows = {
        "encode (round, finite check, low bits, ties)": (lambda: compact.encode_bf16_torch(x), lambda: compact.encode_bf16(x)),
        "decode (published + low bits + ties)": (torch_decode, lambda: compact.decode_state(published, low, stored, 0)),
    }
    print(f"{n} elements, ties {count / n:.3f} of them ({'bitmask' if stored.dtype == torch.uint8 else 'indices'}), "
          f"torch {torch.__version__}, one thread, best of {args.repeats}")
    print("| pass | torch ops ns/element | compiled ns/element | torch ÷ compiled |\n|---|---|---|---|")
    for name, (slow, fast) in rows.items():
        a, b = best(slow, args.repeats) / n * 1e9, best(fast, args.repeats) / n * 1e9
        print(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.1f} |")
    frame = compact.compress_low16(low)
    one = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters.from_level(
        1, hash_log=12, write_checksum=True, threads=0))
    z = best(lambda: one.compress(low.numpy()), args.repeats) / n * 1e9
    d = best(lambda: compact.decompress_low16(frame, n, "bench"), args.repeats) / n * 1e9
    print(f"\nFor scale, zstd on the same codes (one thread, as stored: {frame.numel() / (2 * n):.2f} of their bytes): "
          f"compress {z:.2f} ns/element, decompress {d:.2f}.")


if __name__ == "__main__":
    main()
