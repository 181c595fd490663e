"""Row statistics of split rows: merging partial statistics and turning merged ones into losses (O(rows) torch ops).

The kernels' ``shard_stats`` (``fastce/kernels/__init__.py``) give, per row and per column range, the float32 tuple
``(m, s, x_t, sum_x, r)``: max, sum of ``exp(x - m)``, the target logit if the target falls in the range (else 0), the
sum of the logits, and ``sum exp(x - m) (x - m)``. Ranges merge exactly: the max of the maxes, every ``s`` and ``r``
rescaled to it, the rest added. Used for lm_head vocabulary slabs and for vocabulary shards across ranks; merging is
deterministic (a fixed order over the ranges).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .spec import LossSpec

STATS_FIELDS = 5  # (m, s, x_t, sum_x, r)


def empty_stats(shape, device) -> Tensor:
    """A poisoned ``[*shape, 5]`` float32 buffer for ``shard_stats`` to fill."""
    return torch.full((*shape, STATS_FIELDS), float("nan"), dtype=torch.float32, device=device)


def merge(parts: Tensor) -> Tensor:
    """``[S, ..., 5]`` partial statistics of S disjoint column ranges -> ``[..., 5]`` of the whole rows."""
    m_i, s_i, xt_i, sx_i, r_i = parts.unbind(-1)
    m = m_i.amax(0)
    ref = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    weight = torch.exp(m_i - ref)  # exp(-inf) = 0 for empty ranges and ignored rows
    # A range whose s is 0 (nothing in it, or an ignored row) adds nothing; its (-inf) * 0 must not become NaN.
    has = s_i != 0
    s = (s_i * weight).sum(0)
    r = torch.where(has, weight * (r_i + (m_i - ref) * s_i), torch.zeros_like(r_i)).sum(0)
    return torch.stack((m, s, xt_i.sum(0), sx_i.sum(0), r), dim=-1)


def finish(merged: Tensor, targets: Tensor, vocab_size: int, ignore_index: int, spec: LossSpec):
    """Losses (and, for ``spec.stats``, lse, entropy, correct) of whole rows from their merged statistics.

    Returns ``(losses, row_stats)``: float32 ``[...]`` losses as the kernels define them (0 on ignored rows, NaN for
    a target outside ``[0, vocab_size)``), and ``[..., 3]`` (lse, entropy, correct) or None.
    """
    m, s, x_t, sum_x, r = merged.unbind(-1)
    ignored = targets == ignore_index
    valid = (targets >= 0) & (targets < vocab_size)
    log_s = torch.log(s)
    loss = torch.where(valid, (m - x_t) + log_s, torch.full_like(m, float("nan")))
    if spec.label_smoothing != 0.0:
        e = spec.label_smoothing
        loss = (1.0 - e) * loss + e * ((m - sum_x / vocab_size) + log_s)
    lse = m + log_s
    if spec.z_loss != 0.0:
        loss = loss + spec.z_loss * lse * lse
    zero = torch.zeros_like(loss)
    loss = torch.where(ignored, zero, loss)
    if not spec.stats:
        return loss, None
    correct = (valid & (x_t >= m)).to(torch.float32)
    row_stats = torch.stack((lse, log_s - r / s, correct), dim=-1)
    return loss, torch.where(ignored.unsqueeze(-1), torch.zeros_like(row_stats), row_stats)
