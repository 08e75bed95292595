r"""Divergences between output distributions, from log-probabilities, computed stably in log-space.

For distributions p (the teacher) and q (the student) over the last dimension, given as
log-probabilities ``lp``, ``lq`` (``log_softmax`` of logits):

    KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)
    JS(p ‖ q) = ½ KL(p ‖ m) + ½ KL(q ‖ m),   m = ½ (p + q),
    log m = a + log(½ (e^(lp−a) + e^(lq−a))),  a = max(lp, lq)

``log m`` never underflows to −inf where either p or q is non-zero, equals ``lp`` bit for bit
where ``lq == lp`` (so JS(p ‖ p) is exactly 0), and terms with p_c = 0 are 0
(``xlogy``-style: ``p·(lp − lm)`` with ``p = exp(lp) = 0``). JS is symmetric, 0 exactly for equal
inputs, and at most log 2. Results are per row (every dimension but the last kept).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..methods.learning import Divergence


def kl(lp: Tensor, lq: Tensor) -> Tensor:
    """KL(p ‖ q) per row, from log-probabilities."""
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


def js(lp: Tensor, lq: Tensor) -> Tensor:
    """JS(p ‖ q) per row, from log-probabilities."""
    top = torch.maximum(lp, lq)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # both −inf: m is 0 there, and so are p, q
    lm = top + torch.log(0.5 * (torch.exp(lp - top) + torch.exp(lq - top)))  # exactly lp where lq == lp
    return 0.5 * (kl(lp, lm) + kl(lq, lm))


def divergence(kind: Divergence, lp: Tensor, lq: Tensor) -> Tensor:
    """``js`` or ``kl`` of teacher ``lp`` from student ``lq``, per row."""
    return js(lp, lq) if kind == "js" else kl(lp, lq)
