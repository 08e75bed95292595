"""The low-bits codec (artifacts/compact.py) per element: the compiled kernel (artifacts/codec.c) against the
torch ops it replaces, side by side in one process, on one core (the engine gives its kernels one thread on
a 2-core machine), and the frames of the low bits: zstd on the codes (state format 4) against zstd on their
palette coding (format 5), as a step writes and reads them (zstd's workers on every core).

The state is a continual task-arithmetic merge of bfloat16 models (base + 0.3 · Σ task vectors, float32), the
shape of a 7B ``mlp.down_proj`` slice the engine encodes at once (16 MiB of float32: 4M elements). Each
figure is the best of ``--repeats`` runs (the fastest is the one least disturbed by the rest of the machine).

``--real DIR`` adds the codes of real fine-tunes: the offline demo's three MiniLM experts (fine-tuned once per
machine, as ``hf-contmerge demo`` does) and their base, cast to bfloat16 (as 7B models are published) into
DIR, merged there by task arithmetic and by the running mean (3 steps each), and every step's frames measured.

    python benchmarks/bench_codec.py [--elements 4194304] [--repeats 15] [--real DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch

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


def bf16_stream(folder: Path) -> tuple[Path, list[Path]]:
    """The demo's base and experts (built if not cached) as bfloat16 copies in ``folder``."""
    from safetensors.torch import load_file, save_file

    from hf_contmerge.demo.experts import BASE_MODEL_DIR, build_experts
    from hf_contmerge.demo.tasks import load_tasks

    copies = []
    for src in [BASE_MODEL_DIR(), *build_experts(load_tasks())]:
        dst = folder / src.name
        if not dst.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.pt", "*.h5", "onnx", "openvino"))
            for f in src.glob("*.safetensors"):
                save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(f).items()},
                          dst / f.name, metadata={"format": "pt"})
        copies.append(dst)
    return copies[0], copies[1:]


def frames(codes: list[torch.Tensor], repeats: int) -> tuple[float, float, float, float, float, float]:
    """The blocks ``codes`` as format-4 and format-5 frames: the bytes (÷ the codes' 2 a code), the compression
    and the decompression ns an element of each."""
    n = sum(c.numel() for c in codes)
    out = []
    for compress, decompress in ((compact.compress_low16, compact.decompress_low16),
                                 (compact.compress_codes, compact.decompress_codes)):
        made = [compress(c) for c in codes]
        out += [sum(f.numel() for f in made) / (2 * n),
                best(lambda compress=compress: [compress(c) for c in codes], repeats) / n * 1e9,
                best(lambda d=decompress, made=made: [d(f, c.numel(), "bench") for f, c in zip(made, codes)], repeats) / n * 1e9]
    return tuple(out)


def step_codes(step: Path) -> list[torch.Tensor]:
    """The int16 codes of a step's weight slot, block by block, whatever their frames."""
    from safetensors.torch import load_file

    files = sorted((step / "contmerge_state").glob(f"{compact.LOW16_PREFIX}merged*.safetensors"))
    blocks = {name: frame for f in files for name, frame in load_file(f).items() if compact.parse_block(name)}
    return [compact.decode_block(name, blocks[name], name) for name in sorted(blocks, key=compact.parse_block)]


def real_rows(folder: Path, repeats: int) -> None:
    from hf_contmerge.cli import main as cli

    folder.mkdir(parents=True, exist_ok=True)
    base, items = bf16_stream(folder / "models")
    print(f"\nReal fine-tunes: the demo's {len(items)} MiniLM experts and base in bfloat16 ({folder}); each step's "
          f"low bits as format-4 and format-5 frames, zstd's workers on {os.cpu_count()} cores, best of {repeats}")
    print("| method | step | codes | order-0 entropy ÷ 16 bits | format 4 bytes ÷ codes | compress ns/el | decompress ns/el "
          "| format 5 bytes ÷ codes | compress ns/el | decompress ns/el |\n|---|---|---|---|---|---|---|---|---|---|")
    for method in ("task_arithmetic", "average"):
        out = folder / method
        if not (out / f"step-{len(items)}").is_dir():
            shutil.rmtree(out, ignore_errors=True)
            if cli(["merge", "--base", str(base), "--stream", *map(str, items), "--method", method, "--out", str(out), "--quiet"]):
                raise SystemExit(f"the {method} merge of {folder} failed")
        for t in range(2, len(items) + 1):
            codes = step_codes(out / f"step-{t}")
            flat = torch.cat(codes).to(torch.int32) + 32768
            p = torch.bincount(flat, minlength=65536).double() / flat.numel()
            entropy = float(-(p[p > 0] * p[p > 0].log2()).sum()) / 16
            a, b, c, d, e, f = frames(codes, repeats)
            print(f"| {method} | {t} | {flat.numel()} | {entropy:.3f} | {a:.3f} | {b:.2f} | {c:.2f} | {d:.3f} | {e:.2f} | {f:.2f} |")


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
    ap.add_argument("--real", type=Path, help="also measure real fine-tunes' codes, made in this folder (see above)")
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
    a, b, c, d, e, f = frames([low], max(3, args.repeats // 3))
    print("\nThe same codes as the frames a step stores (zstd's workers on every core): format 4 (the codes) "
          f"{a:.3f} of their bytes, compress {b:.2f} ns/element, decompress {c:.2f}; format 5 (palette-coded) {d:.3f}, "
          f"compress {e:.2f}, decompress {f:.2f}.")
    if args.real is not None:
        real_rows(args.real, max(3, args.repeats // 5))


if __name__ == "__main__":
    main()
