r"""The diagonal Fisher of a model on calibration inputs (METHODS.md, "The diagonal Fisher, exactly").

The model is in eval mode (dropout off). For input x_n, ŷ_n is the model's own argmax prediction:
a classifier's class, or for a causal LM the argmax next token at every position of the text given
the true prefix, with log p(ŷ | x) summed over the sample's positions. Since ŷ is the argmax,
``log p(ŷ | x)`` is the maximum of the log-softmax, whose gradient is that of the predicted entry.

- ``per_sample``: ``F = (1/N) Σ_n (∇θ log p(ŷ_n | x_n))²``, one backward pass per sample;
- ``batch`` (BECAME's code): ``F = (1/N) Σ_b |b| · (∇θ (1/|b|) Σ_{n∈b} log p(ŷ_n | x_n))²``.

Padding changes neither: positions outside the attention mask are not summed, batches are padded
on the right (a causal LM's real tokens never see later pads) and a per-sample pass takes each
sample alone, unpadded. **[choice]** For a causal LM every real position counts, the last one
included (its prediction is the next token after the text; it has a prefix like any other).
Gradients are taken with ``torch.autograd.grad`` for every floating-point parameter, accumulated in
float32 on the parameter's own device. Returned by in-memory parameter name (tied parameters once).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

FisherMode = Literal["per_sample", "batch"]


def own_prediction_loglik(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """``log p(ŷ_n | x_n)`` for every sample of ``batch`` (shape ``(B,)``), ŷ the model's own argmax."""
    logits = model(**batch).logits.float()
    logp = torch.log_softmax(logits, dim=-1).amax(dim=-1)  # log-probability of the argmax, per position
    if logp.dim() == 1:  # a classifier: one prediction per sample
        return logp
    mask = batch.get("attention_mask")
    if mask is None:
        return logp.sum(dim=1)
    return (logp * mask.to(logp.device, logp.dtype)).sum(dim=1)


def _slice(batch: Mapping[str, Tensor], i: int) -> dict[str, Tensor]:
    """Sample ``i`` alone, its padding cut off (so the per-sample pass sees no batch-mates' length)."""
    one = {k: v[i : i + 1] for k, v in batch.items()}
    mask = one.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        length = int(mask[0].sum())
        one = {k: (v[:, :length] if v.dim() >= 2 and v.shape[1] == mask.shape[1] else v) for k, v in one.items()}
    return one


def diagonal_fisher(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], mode: FisherMode = "per_sample",
                    device: torch.device | None = None) -> dict[str, Tensor]:
    """The diagonal Fisher of ``model`` over ``batches``, by in-memory parameter name (float32)."""
    was_training = model.training
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    flags = [p.requires_grad for _, p in named]
    for _, p in named:
        p.requires_grad_(True)
    params = [p for _, p in named]
    fisher = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    count = 0
    try:
        for batch in batches:
            batch = {k: v.to(device) if device is not None else v for k, v in batch.items()}
            size = next(iter(batch.values())).shape[0]
            if mode == "batch":
                grads = torch.autograd.grad(own_prediction_loglik(model, batch).mean(), params, allow_unused=True)
                _accumulate(fisher, grads, float(size))
            else:
                for i in range(size):
                    grads = torch.autograd.grad(own_prediction_loglik(model, _slice(batch, i)).sum(), params, allow_unused=True)
                    _accumulate(fisher, grads, 1.0)
            count += size
    finally:
        for (_, p), flag in zip(named, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if count == 0:
        raise ValueError("no calibration samples")
    return {name: f.div_(count) for (name, _), f in zip(named, fisher)}


def _accumulate(fisher: list[Tensor], grads: tuple[Tensor | None, ...], weight: float) -> None:
    with torch.no_grad():
        for f, g in zip(fisher, grads):
            if g is not None:  # a parameter the output does not depend on (e.g. an unused head): its Fisher is 0
                f.add_(g.detach().float().square().to(f.device), alpha=weight)
