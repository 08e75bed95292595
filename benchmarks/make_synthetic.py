"""Write a synthetic Llama stream with 7B layer shapes: a base and N fine-tunes as HF folders.

Each folder is what ``LlamaForCausalLM.save_pretrained`` would write for a Llama-2-7B-shaped model
cut to ``--depth`` decoder layers: ``config.json`` (hidden 4096, intermediate 11008, 32 heads, 32
key/value heads, vocabulary 32000, untied embeddings, bfloat16) and sharded bf16 safetensors with
``model.safetensors.index.json``. Sizes: 524 MB of embeddings + LM head, plus 405 MB per layer.

Values (the merge cost does not depend on them, but they are kept realistic and finite):

    base:        W ~ N(0, 0.02²) for matrices (Llama's init std), 1 for RMSNorm weights
    fine-tune i: W_i = W + ε_i,  ε_i ~ N(0, 0.002²)  (norms too)

Every tensor comes from a ``torch.Generator`` seeded with a CRC32 of (seed, tensor name, folder),
so the output is deterministic for a torch version, and is generated once per tensor: the base
tensor is written to the base folder and, plus each item's noise, to every fine-tune folder. Only
one tensor (float32) is in memory at a time; shards are streamed by
``hf_contmerge.io.writer.StreamingWriter`` (huggingface_hub's shard split, one header planned up
front, data appended). A folder set that already exists with the same parameters
(``synthetic.json``, written last) is reused as is.

    python benchmarks/make_synthetic.py --depth 4 --items 4 --out /work/bench-scratch/llama-d4
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hf_contmerge.io.safetensors import TensorSpec
from hf_contmerge.io.writer import StreamingWriter, plan_shards

if TYPE_CHECKING:
    from transformers import LlamaConfig

HIDDEN, INTERMEDIATE, VOCAB, HEADS = 4096, 11008, 32000, 32
BASE_STD, NOISE_STD = 0.02, 0.002
MANIFEST = "synthetic.json"
FORMAT = 1  # bump when the generated values change


def llama_shapes(depth: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of LlamaForCausalLM (7B widths) in save_pretrained's order."""
    yield "model.embed_tokens.weight", (VOCAB, HIDDEN)
    for i in range(depth):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (HIDDEN,)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{p}.self_attn.{proj}.weight", (HIDDEN, HIDDEN)
        yield f"{p}.post_attention_layernorm.weight", (HIDDEN,)
        yield f"{p}.mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)
        yield f"{p}.mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)
        yield f"{p}.mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)
    yield "model.norm.weight", (HIDDEN,)
    yield "lm_head.weight", (VOCAB, HIDDEN)


def llama_config(depth: int) -> LlamaConfig:
    """Llama-2-7B's config with ``num_hidden_layers = depth``."""
    from transformers import LlamaConfig  # here, not at the top: a cache hit should not pay its import

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=depth,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )


def _generator(seed: int, name: str, folder: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}/{folder}".encode()))


def base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The base's float32 value of one tensor: ones for norms, N(0, BASE_STD²) for matrices."""
    if len(shape) == 1:
        return torch.ones(shape)
    return torch.randn(shape, generator=_generator(seed, name, "base")) * BASE_STD


def noise(name: str, shape: tuple[int, ...], seed: int, item: int) -> torch.Tensor:
    """Fine-tune ``item``'s offset ε_item of one tensor, N(0, NOISE_STD²)."""
    return torch.randn(shape, generator=_generator(seed, name, f"ft-{item}")) * NOISE_STD


def folder_names(items: int) -> list[str]:
    return ["base", *(f"ft-{i}" for i in range(1, items + 1))]


def params_of(args: argparse.Namespace) -> dict[str, object]:
    return {"format": FORMAT, "depth": args.depth, "items": args.items, "seed": args.seed,
            "shard_size": args.shard_size, "torch": torch.__version__}


def model_bytes(depth: int) -> int:
    """Size of one model's bf16 weights (headers excluded)."""
    return sum(math.prod(s) for _, s in llama_shapes(depth)) * 2


def generate(out: Path, depth: int, items: int, seed: int, shard_size: str) -> None:
    """Write ``out/base`` and ``out/ft-1 … ft-items``, one tensor at a time into all of them."""
    specs = [TensorSpec(n, s, "BF16") for n, s in llama_shapes(depth)]
    writers = {}
    for name in folder_names(items):
        folder = out / name
        folder.mkdir(parents=True)
        llama_config(depth).save_pretrained(folder)
        writers[name] = StreamingWriter.planned(folder, specs, plan_shards(specs, shard_size))
    for spec in specs:
        base = base_tensor(spec.key, spec.shape, seed)
        writers["base"].write(spec.key, base.to(torch.bfloat16))
        for i in range(1, items + 1):
            writers[f"ft-{i}"].write(spec.key, (base + noise(spec.key, spec.shape, seed, i)).to(torch.bfloat16))
    for w in writers.values():
        w.close()


def ensure(out: Path, depth: int, items: int, seed: int = 0, shard_size: str = "2GB") -> list[Path]:
    """The folders ``[base, ft-1, …]`` under ``out``, generated unless already there with these parameters."""
    ns = argparse.Namespace(depth=depth, items=items, seed=seed, shard_size=shard_size)
    wanted = params_of(ns)
    manifest = out / MANIFEST
    folders = [out / n for n in folder_names(items)]
    if manifest.is_file() and json.loads(manifest.read_text()) == wanted and all(f.is_dir() for f in folders):
        return folders
    if out.exists():
        shutil.rmtree(out)  # stale or partial: the manifest is written last
    out.mkdir(parents=True)
    generate(out, depth, items, seed, shard_size)
    manifest.write_text(json.dumps(wanted, indent=2) + "\n")
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, required=True, help="number of decoder layers")
    parser.add_argument("--items", type=int, required=True, help="number of fine-tunes")
    parser.add_argument("--out", type=Path, required=True, help="folder for base/ and ft-1 … ft-N/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    args = parser.parse_args()
    folders = ensure(args.out, args.depth, args.items, args.seed, args.shard_size)
    gb = model_bytes(args.depth) / 1e9
    print(f"{len(folders)} folders of {gb:.2f} GB each in {args.out}")


if __name__ == "__main__":
    main()
