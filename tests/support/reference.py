"""Independent in-memory references for the data-free methods, written from METHODS.md.

They work on whole state dicts, all at once, with no engine, no slices and no carried files, and
share no code with ``hf_contmerge.methods``: agreement between the two is the test.
"""

from __future__ import annotations

import math

import torch

StateDict = dict[str, torch.Tensor]


def _f(sd: StateDict) -> StateDict:
    return {k: v.double() for k, v in sd.items() if v.is_floating_point()}


def average(base: StateDict, items: list[StateDict], **_) -> list[StateDict]:
    items = [_f(x) for x in items]
    return [{k: sum(x[k] for x in items[:t]) / t for k in items[0]} for t in range(1, len(items) + 1)]


def task_arithmetic(base: StateDict, items: list[StateDict], scaling: float = 0.3) -> list[StateDict]:
    b, items = _f(base), [_f(x) for x in items]
    return [{k: b[k] + scaling * sum(x[k] - b[k] for x in items[:t]) for k in b} for t in range(1, len(items) + 1)]


def magmax(base: StateDict, items: list[StateDict], scaling: float = 0.5) -> list[StateDict]:
    b, items = _f(base), [_f(x) for x in items]
    out = []
    for t in range(1, len(items) + 1):
        merged = {}
        for k in b:
            taus = torch.stack([x[k] - b[k] for x in items[:t]])
            # the newest of the largest magnitudes wins ties: scan from the newest
            best = taus[-1].clone()
            for tau in reversed(taus[:-1]):
                best = torch.where(tau.abs() > best.abs(), tau, best)
            merged[k] = b[k] + scaling * best
        out.append(merged)
    return out


def _ties_pair(a: torch.Tensor, b: torch.Tensor, top_k: float) -> torch.Tensor:
    def trim(x):
        flat = x.abs().flatten()
        keep = int(flat.numel() * top_k)
        if keep >= flat.numel():
            return x
        thr = torch.sort(flat, descending=True).values[max(keep, 1) - 1]
        return x * (x.abs() >= thr)

    ta, tb = trim(a), trim(b)
    sign = torch.sign(ta + tb)
    sign[sign == 0] = 1
    return ta * (torch.sign(ta) == sign) + tb * (torch.sign(tb) == sign)


def ties(base: StateDict, items: list[StateDict], scaling: float = 0.3, top_k: float = 0.2) -> list[StateDict]:
    # float32 like the carried state: which entry is the k-th largest must not hinge on rounding
    b = {k: v.float() for k, v in _f(base).items()}
    items = [{k: v.float() for k, v in _f(x).items()} for x in items]
    merged = {k: b[k] + scaling * (items[0][k] - b[k]) for k in b}
    out = [merged]
    for x in items[1:]:
        merged = {k: merged[k] + scaling * _ties_pair(merged[k] - b[k], x[k] - b[k], top_k) for k in b}
        out.append(merged)
    return out


REFERENCES = {"average": average, "task_arithmetic": task_arithmetic, "magmax": magmax, "ties": ties}


# The data-free methods with the non-default parameters the streamed tests use, and their --set flags.
DATA_FREE = [
    ("average", {}),
    ("task_arithmetic", {"scaling": 0.4}),
    ("ties", {"scaling": 0.5, "top_k": 0.3}),
    ("magmax", {"scaling": 0.7}),
]


def set_flags(params: dict) -> list[str]:
    return [a for k, v in params.items() for a in ("--set", f"{k}={v}")]


def opcm_reference(base, items, linear, alpha=0.5, zero_diagonal=True):
    """METHODS.md's OPCM, literally: full SVD, P = UᵀτV, zero the block (and diagonal), global λ."""
    b = {k: v.double() for k, v in base.items() if v.is_floating_point()}
    fts = [{k: v.double() for k, v in x.items() if k in b} for x in items]
    norm = lambda d: math.sqrt(sum(float(v.pow(2).sum()) for v in d.values()))  # noqa: E731
    merged, lam = dict(fts[0]), 1.0
    norms = [norm({k: fts[0][k] - b[k] for k in b})]
    out = [merged]
    for x in fts[1:]:
        tau = {k: x[k] - b[k] for k in b}
        norms.append(norm(tau))
        mean = sum(norms) / len(norms)
        unscaled = {}
        for k in b:
            tb, t = merged[k] - b[k], tau[k]
            if k in linear:
                u, s, vh = torch.linalg.svd(tb, full_matrices=True)
                ratio = torch.cumsum(s, 0) / s.sum()
                r = int(torch.nonzero(ratio > alpha)[0]) if bool((ratio > alpha).any()) else 0
                p = u.T @ t @ vh.T
                p[:r, :r] = 0
                if zero_diagonal:
                    p.diagonal().zero_()
                t = u @ p @ vh
            unscaled[k] = lam * tb + t
        lam = norm(unscaled) / mean
        merged = {k: b[k] + unscaled[k] / lam for k in b}
        out.append(merged)
    return out, norms


def unpadded(batches):
    """Every sample of right-padded ``batches`` alone, its padding cut off: ``input_ids`` of shape (1, L)."""
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            yield b["input_ids"][i : i + 1, : int(b["attention_mask"][i].sum())]


def own_loglik(model, ids: torch.Tensor) -> torch.Tensor:
    """log p(ŷ | x) of one unpadded sample, written out: argmax class, or argmax next token summed over positions."""
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].double(), dim=-1)
    return logp.gather(-1, logp.argmax(dim=-1, keepdim=True)).sum()


def _squared_grads(model, groups, reduce) -> dict[str, torch.Tensor]:
    """Σ over ``groups`` (lists of unpadded samples) of |group|·(∇ reduce(log-likelihoods))², over N; float64."""
    model.eval()
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    count = 0
    for group in groups:
        model.zero_grad()
        reduce(torch.stack([own_loglik(model, ids) for ids in group])).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                total[n] += len(group) * p.grad.double() ** 2
        count += len(group)
    model.zero_grad()
    return {n: t / count for n, t in total.items()}


def fisher_per_sample(model, samples) -> dict[str, torch.Tensor]:
    """METHODS.md's per-sample diagonal Fisher, written out: for each unpadded sample ``input_ids`` (1, L),
    the squared gradient of log p(ŷ | x) (argmax class, or argmax next token summed over positions), averaged."""
    return _squared_grads(model, ([ids] for ids in samples), torch.sum)


def fisher_batch(model, batches) -> dict[str, torch.Tensor]:
    """BECAME's batch form, written out: per batch, the squared gradient of the batch mean of log p(ŷ | x)
    (each sample's log-likelihood from its unpadded ids), times the batch size; over N."""
    return _squared_grads(model, (list(unpadded([b])) for b in batches), torch.mean)
