"""Tiny random models built from configs, and fine-tune look-alikes of them, saved as HF folders.

A "fine-tune" here is the base with seeded noise added to every float tensor (and, for task
models, a new head): what matters to a merger is the files, not how they were trained.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)


def llama(tied: bool = False) -> torch.nn.Module:
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


def gpt2() -> torch.nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def bert_config(**kw) -> BertConfig:
    return BertConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=64, **kw)


def bert() -> torch.nn.Module:
    return BertModel(bert_config())


def bert_classifier(num_labels: int) -> torch.nn.Module:
    return BertForSequenceClassification(bert_config(num_labels=num_labels))


def vit_config(**kw) -> ViTConfig:
    return ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
                     patch_size=8, **kw)


def vit() -> torch.nn.Module:
    return ViTModel(vit_config())


def vit_classifier(num_labels: int) -> torch.nn.Module:
    return ViTForImageClassification(vit_config(num_labels=num_labels))


def clip() -> torch.nn.Module:
    text = CLIPTextConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=32)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              image_size=16, patch_size=8)
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))


FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": llama,
    "llama_tied": lambda: llama(tied=True),
    "gpt2": gpt2,
    "bert": bert,
    "vit": vit,
    "clip": clip,
}


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """A fine-tune look-alike: the same model with seeded noise added to every float parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def save(model: torch.nn.Module, folder: Path, dtype: torch.dtype | None = None) -> Path:
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    return folder


def make_stream(tmp: Path, family: str, n: int = 3, dtype: torch.dtype | None = None) -> tuple[Path, list[Path]]:
    """Save a base and ``n`` fine-tune look-alikes of one family; returns their folders."""
    torch.manual_seed(0)
    base = FAMILIES[family]()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    base_dir = save(base, tmp / f"{family}-base", dtype)
    items = []
    for i in range(n):
        base.load_state_dict(state)
        items.append(save(perturb(base, seed=100 + i), tmp / f"{family}-ft{i}", dtype))
    base.load_state_dict(state)
    return base_dir, items


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved folder, by file name (single or sharded)."""
    folder = Path(folder)
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


def carried(step_folder: Path, slot: str) -> dict[str, torch.Tensor]:
    """A step's carried slot, float32, by tensor name, however it is stored (``artifacts/compact.py``)."""
    import json

    from hf_contmerge.artifacts.folder import open_slot

    state = json.loads((Path(step_folder) / "contmerge_state.json").read_text())
    index = open_slot(step_folder, slot, state.get("weight_slot"))
    try:
        return {k: index.read(k) for k in index.keys()}
    finally:
        index.close()


def save_lora(base: torch.nn.Module, config, seed: int, folder: Path, scale: float) -> Path:
    """A PEFT LoRA adapter of ``base`` (``config``: a ``peft.LoraConfig``) with seeded N(0, scale²)
    trainable tensors, saved by PEFT itself; ``base`` is not modified."""
    import copy

    from peft import get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(folder)
    return folder



WORDS = [f"w{i}" for i in range(90)]


def save_tokenizer(folder: Path, kind: str = "bert") -> Path:
    """A tiny word-level tokenizer (the 90 words ``w0`` … ``w89`` plus special tokens, ids < 96) saved
    into ``folder``, so text calibration data can be encoded for the tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if kind == "bert" else ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate([*specials, *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    names = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token") if kind == "bert" else \
        ("pad_token", "unk_token", "bos_token", "eos_token")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **dict(zip(names, specials)))
    tokenizer.save_pretrained(folder)
    return folder


def sentences(n: int, seed: int, length: tuple[int, int] = (3, 12)) -> list[str]:
    """``n`` random sentences of the tiny tokenizer's words, of varied lengths (so batches are padded)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(length[0], length[1] + 1, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)))
    return out


def classifier_stream(tmp: Path, labels: tuple[int, ...] = (2, 3), texts: int = 9, scale: float = 0.02
                      ) -> tuple[Path, list[Path], list[Path]]:
    """A bare BERT base with the tiny tokenizer, one sequence classifier per entry of ``labels`` over it
    (its backbone a perturbed copy of the base's, its head its own), and a JSON-lines file of ``texts``
    random sentences per classifier (its calibration data)."""
    import json

    torch.manual_seed(0)
    backbone = bert()
    base = save_tokenizer(save(backbone, tmp / "base"))
    items, data = [], []
    for i, n in enumerate(labels):
        torch.manual_seed(10 + i)
        model = bert_classifier(n)
        model.bert.load_state_dict(backbone.state_dict(), strict=False)
        items.append(save(perturb(model, seed=20 + i, scale=scale), tmp / f"task{i}"))
        path = tmp / f"task{i}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(texts, seed=30 + i)))
        data.append(path)
    return base, items, data
