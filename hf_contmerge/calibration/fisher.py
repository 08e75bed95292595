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
Gradients are caught by a tap on each weight as its module's forward uses it (``compose.py``:
inside Accelerate's hook, so CPU/disk offload loses none, and with offloaded weights reloaded for
the backward pass instead of kept), squared and accumulated in float32 where the device map keeps
the parameter: on its GPU, in CPU RAM for CPU-offloaded modules, and for
disk-offloaded ones in a file-backed tensor (``torch.from_file``, shared) in ``offload_dir``, so the
accumulators take no more RAM than the map gives the weights. Returned by in-memory parameter name
(tied parameters once).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from .compose import home_tensors, substituted

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


def sample_alone(batch: Mapping[str, Tensor], i: int) -> dict[str, Tensor]:
    """Sample ``i`` alone, its padding cut off (so the per-sample pass sees no batch-mates' length)."""
    one = {k: v[i : i + 1] for k, v in batch.items()}
    mask = one.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        length = int(mask[0].sum())
        one = {k: (v[:, :length] if v.dim() >= 2 and v.shape[1] == mask.shape[1] else v) for k, v in one.items()}
    return one


class _Tap(torch.autograd.Function):
    """Identity on a weight whose backward hands the weight's gradient to ``sink`` (and no further)."""

    @staticmethod
    def forward(ctx, weight: Tensor, anchor: Tensor, sink) -> Tensor:
        ctx.sink = sink
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.sink(grad)
        return None, None, None


def diagonal_fisher(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], mode: FisherMode = "per_sample",
                    device: torch.device | None = None, offload_dir: Path | None = None) -> dict[str, Tensor]:
    """The diagonal Fisher of ``model`` over ``batches``, by in-memory parameter name (float32).

    ``device``: where the inputs go (the first device of a device map). Accumulators live where the
    map keeps their parameter (see the module docstring); ``offload_dir`` holds those of disk-offloaded
    ones (without it they are in CPU RAM).

    Each weight is tapped as its module's forward uses it (``compose.substituted``): the tap's backward
    adds the square of the weight's gradient into its accumulator, so no parameter needs
    ``requires_grad`` and no model-sized gradient exists at any time; a weight used more than once in
    a pass (tied embeddings) has its partial gradients summed before the square."""
    was_training = model.training
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    flags = [p.requires_grad for _, p in named]
    for _, p in named:
        p.requires_grad_(False)
    fisher: dict[str, Tensor] = {}
    zeros = home_tensors(model, offload_dir)
    anchor = torch.zeros((), requires_grad=True)  # what makes the taps part of the graph
    uses: dict[str, int] = {}
    partial: dict[str, Tensor] = {}
    weight = 1.0
    count = 0

    def accumulate(name: str, grad: Tensor) -> None:
        acc = fisher.get(name)
        if acc is None:
            acc = fisher[name] = zeros(name, grad.shape)
        grad = grad.detach().to(acc.device, torch.float32)
        acc.addcmul_(grad, grad, value=weight)  # one fused op: no squared temporary

    def sink(name: str):
        def receive(grad: Tensor) -> None:
            if uses[name] == 1:
                accumulate(name, grad)
            elif name in partial:
                partial[name] = partial[name] + grad
            else:
                partial[name] = grad.clone()
        return receive

    def tap(name: str, p: Tensor) -> Tensor:
        uses[name] = uses.get(name, 0) + 1
        return _Tap.apply(p, anchor, sink(name))

    def step(inputs: Mapping[str, Tensor], reduce: str, w: float) -> None:
        nonlocal weight
        uses.clear()
        weight = w
        ll = own_prediction_loglik(model, inputs)
        ll = ll.mean() if reduce == "mean" else ll.sum()
        ll.backward()
        for name, grad in partial.items():  # several uses in one pass: the square of their sum
            accumulate(name, grad)
        partial.clear()

    try:
        with substituted(model, tap):
            for batch in batches:
                batch = {k: v.to(device) if device is not None else v for k, v in batch.items()}
                size = next(iter(batch.values())).shape[0]
                if mode == "batch":
                    step(batch, "mean", float(size))
                else:
                    for i in range(size):
                        step(sample_alone(batch, i), "sum", 1.0)
                count += size
    finally:
        for (_, p), flag in zip(named, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if count == 0:
        raise ValueError("no calibration samples")
    out = {}
    for name, p in named:  # every parameter, in the model's order; one no forward used has Fisher 0
        acc = fisher.get(name)
        out[name] = acc.div_(count) if acc is not None else zeros(name, p.shape)
    return out
