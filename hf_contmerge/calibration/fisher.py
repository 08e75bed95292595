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
Gradients are taken with ``torch.autograd.grad`` with respect to the parameter tensors each forward
used (recorded as it runs, so Accelerate's CPU/disk offload loses none), accumulated in float32 on
the parameter's own device (the CPU under a device map). Returned by in-memory parameter name (tied
parameters once).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
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


@contextmanager
def _capture(model: nn.Module) -> Iterator[list[tuple[str, Tensor]]]:
    """The parameter tensors each forward actually uses, by name, collected into the yielded list.

    Resident parameters are the module's own; under an Accelerate device map with CPU/disk offload a
    module's weights are loaded just before its forward (``_hf_hook.pre_forward``) and put back on the
    meta device after it, so the tensors in the autograd graph exist only during that call. A wrapper
    of the module's ``_old_forward`` (the forward Accelerate's hook calls between the two) records
    them there; other modules are recorded by a forward pre-hook. Gradients are then taken with
    respect to the recorded tensors, so offloading loses none."""
    used: list[tuple[str, Tensor]] = []
    canonical = {id(p): n for n, p in model.named_parameters()}  # tied parameters: one name
    undo = []
    for path, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue

        def record(module=module, path=path) -> None:
            for n, p in module.named_parameters(recurse=False):
                if p.is_floating_point() and p.device.type != "meta":
                    used.append((canonical.get(id(p), f"{path}.{n}" if path else n), p))

        if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward"):
            inner = module._old_forward

            def forward(*args, _inner=inner, _record=record, **kwargs):
                _record()
                return _inner(*args, **kwargs)

            module._old_forward = forward
            undo.append(lambda module=module, inner=inner: setattr(module, "_old_forward", inner))
        else:
            handle = module.register_forward_pre_hook(lambda _m, _a, _record=record: _record())
            undo.append(handle.remove)
    try:
        yield used
    finally:
        for restore in undo:
            restore()


def diagonal_fisher(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], mode: FisherMode = "per_sample",
                    device: torch.device | None = None) -> dict[str, Tensor]:
    """The diagonal Fisher of ``model`` over ``batches``, by in-memory parameter name (float32).

    ``device``: where the inputs go (the first device of a device map). Accumulators live on their
    parameter's device, or on the CPU for offloaded parameters."""
    was_training = model.training
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    flags = [p.requires_grad for _, p in named]
    for _, p in named:
        p.requires_grad_(True)
    fisher: dict[str, Tensor] = {}
    count = 0
    try:
        with _capture(model) as used:
            def step(inputs: Mapping[str, Tensor], reduce: str, weight: float) -> None:
                used.clear()
                ll = own_prediction_loglik(model, inputs)
                ll = ll.mean() if reduce == "mean" else ll.sum()
                seen: dict[int, tuple[str, Tensor]] = {}
                for name, t in used:
                    seen.setdefault(id(t), (name, t))
                names, tensors = zip(*seen.values()) if seen else ((), ())
                grads = torch.autograd.grad(ll, list(tensors), allow_unused=True)
                with torch.no_grad():
                    for name, t, g in zip(names, tensors, grads):
                        if g is None:  # a parameter the output does not depend on (e.g. an unused head): Fisher 0
                            continue
                        acc = fisher.get(name)
                        if acc is None:
                            acc = fisher[name] = torch.zeros(t.shape, dtype=torch.float32, device=_home(model, name, t))
                        g = g.detach().to(acc.device, torch.float32)
                        acc.addcmul_(g, g, value=weight)  # one fused op: no squared temporary

            for batch in batches:
                batch = {k: v.to(device) if device is not None else v for k, v in batch.items()}
                size = next(iter(batch.values())).shape[0]
                if mode == "batch":
                    step(batch, "mean", float(size))
                else:
                    for i in range(size):
                        step(_slice(batch, i), "sum", 1.0)
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
        out[name] = acc.div_(count) if acc is not None else torch.zeros(p.shape, dtype=torch.float32, device=_home(model, name, p))
    return out


def _home(model: nn.Module, name: str, t: Tensor) -> torch.device:
    """Where a parameter's Fisher accumulates: its own device, the CPU when it is offloaded (meta)."""
    return torch.device("cpu") if t.device.type == "meta" or getattr(model, "hf_device_map", None) else t.device
