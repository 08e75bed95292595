"""Scoring kernels: functions of a model, its tokenizer or processor, and inputs; no state.

- :func:`classify`: ``argmax_c logits[c]`` per example (sequence or image classification).
- :func:`loglikelihoods`: ``log p(continuation | context) = sum_j log softmax(logits)[t_j]`` over the
  continuation's tokens. As lm-evaluation-harness does, the pair is tokenised whole and the
  continuation is what follows the context's own tokens (so a merge across the boundary is
  scored as the model reads it); the context is cut from the left to fit ``max_length``.
- :func:`greedy_continuations`: the first line of a greedy continuation, ``max_new_tokens`` long.
- :func:`perplexity`: ``exp(sum NLL / sum predicted tokens)`` over texts (token-weighted).

Batches are right-padded with an attention mask, except generation (left-padded, so every row's
next token is at the end); with a model spread by a device map, inputs go to its first device.
"""

from __future__ import annotations

import math

import torch


def input_device(model) -> torch.device:
    """The calibrator's rule (first module of a device map), else where the weights are."""
    from ..calibration.calibrator import input_device as mapped

    return mapped(model, next(model.parameters()).device)


@torch.no_grad()
def classify(model, batches: list[dict[str, torch.Tensor]]) -> list[int]:
    device = input_device(model)
    preds: list[int] = []
    for batch in batches:
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        preds.extend(logits.argmax(dim=-1).tolist())
    return preds


def _pair_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of ``context + continuation`` and how many of them are the continuation's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:  # lm-eval: trailing spaces of the context belong to the continuation
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return whole, max(len(whole) - len(ctx), 1)


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8, max_length: int = 2048) -> list[float]:
    """``log p(continuation | context)`` of every pair. Pairs whose continuation is one token and whose
    context tokens are the same share one forward pass of those tokens, as lm-eval groups multiple-choice
    requests: the candidates of a choice or label-words task cost one pass, not one each."""
    device = input_device(model)
    encoded = [(ids[-max_length:], min(n, max_length - 1)) for ids, n in (_pair_tokens(tokenizer, c, x) for c, x in pairs)]
    out: list[float | None] = [None] * len(encoded)
    shared: dict[tuple[int, ...], list[int]] = {}  # context tokens -> pairs continued by one token
    single = []
    for i, (ids, n) in enumerate(encoded):
        if n == 1 and len(ids) > 1:
            shared.setdefault(tuple(ids[:-1]), []).append(i)
        else:
            single.append(i)
    contexts = list(shared)
    for start in range(0, len(contexts), batch_size):
        rows = [list(c) for c in contexts[start:start + batch_size]]
        logp = _forward(model, tokenizer, rows, device)
        for r, row in enumerate(rows):
            for i in shared[contexts[start + r]]:
                out[i] = logp[r, len(row) - 1, encoded[i][0][-1]].item()
    for start in range(0, len(single), batch_size):
        chunk = [encoded[i] for i in single[start:start + batch_size]]
        logp = _forward(model, tokenizer, [row for row, _ in chunk], device)
        for r, (row, n) in enumerate(chunk):
            positions = torch.arange(len(row) - n, len(row))
            out[single[start + r]] = logp[r, positions - 1, torch.tensor(row)[positions]].sum().item()
    return out


def _forward(model, tokenizer, rows: list[list[int]], device) -> torch.Tensor:
    """Log-probabilities (float32, CPU) of right-padded token rows, padding masked out."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
    return torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), dim=-1).cpu()


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 8,
                         max_length: int = 2048) -> list[str]:
    device = input_device(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        out: list[str] = []
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length).to(device)
            gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out.extend(t.strip().split("\n", 1)[0].strip() for t in texts)
        return out
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], batch_size: int = 8, max_length: int = 2048) -> float:
    device = input_device(model)
    nll, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), dim=-1).cpu()
        target = mask[:, 1:].bool()
        token_logp = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        nll -= token_logp[target].sum().item()
        count += int(target.sum())
    return math.exp(nll / count) if count else float("nan")
