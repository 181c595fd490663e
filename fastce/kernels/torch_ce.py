"""Chunked pure-PyTorch backend: any device, the CPU path. Same contract as the other kernels (see __init__).

Rows are upcast to float32 a chunk at a time, so memory stays O(chunk); each phase is one function below
(``_row_stats``, ``_write_grad``), used by the one-launch ``cross_entropy_fwd`` and by the shard launchers alike.
"""
from __future__ import annotations

import torch

from .. import stats as _stats
from ..spec import PLAIN, LossSpec

# Rows upcast to float32 at a time are capped by this many elements (64 MiB of float32): memory stays O(chunk).
_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(seq_len: int, vocab_size: int):
    rows = max(1, _CHUNK_ELEMENTS // max(vocab_size, 1))
    for start in range(0, seq_len, rows):
        yield start, min(seq_len, start + rows)


def _grad_scale(divisor: torch.Tensor) -> torch.Tensor:
    divisor = divisor.double()
    return torch.where(divisor == 0, torch.full_like(divisor, float("nan")), 1.0 / divisor).float()


def _capped(logits: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """x' as a float32 copy of ``logits`` (copy=True: for float32 logits .float() would be a view, and x' is modified)."""
    x = logits.to(torch.float32, copy=True)
    if spec.softcap:
        x.div_(spec.softcap).tanh_().mul_(spec.softcap)
    return x


def _row_stats(x: torch.Tensor, local_target: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """``[rows, 5]`` statistics (see fastce/stats.py) of the float32 rows ``x`` (x'), the target at ``local_target``
    when that lies in ``[0, x.shape[-1])``."""
    m = x.amax(dim=-1)
    ref = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    shifted = x - ref.unsqueeze(-1)
    e = shifted.exp()
    s = e.sum(dim=-1)
    here = (local_target >= 0) & (local_target < x.shape[-1])
    x_t = x.gather(-1, torch.where(here, local_target, 0).unsqueeze(-1)).squeeze(-1)
    x_t = torch.where(here, x_t, torch.zeros_like(x_t))
    zeros = torch.zeros_like(m)
    sum_x = x.sum(dim=-1) if spec.needs_sum_x else zeros
    # exp(x - m) (x - m) is 0 where exp underflows (also for x = -inf: 0 * -inf would be NaN).
    r = torch.where(e > 0, e * shifted, torch.zeros_like(e)).sum(dim=-1) if spec.needs_sum_px else zeros
    return torch.stack((m, s, x_t, sum_x, r), dim=-1)


def target_coefficient(spec: LossSpec, vocab_size: int) -> float:
    """What the epilogue subtracts at the target: ``1 - e + e / V``, rounded once (in float64, then to float32)."""
    e = spec.label_smoothing
    return float(torch.tensor(1.0 - e + e / vocab_size, dtype=torch.float64).float())


def _softcap_slope(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """d x'/d x = 1 - tanh(x / cap)**2, as 4 e / (1 + e)**2 with e = exp(-2 |x| / cap): accurate to a few ulp also where
    tanh saturates (1 - tanh**2 would cancel)."""
    e = logits.to(torch.float32).abs().mul_(-2.0 / cap).exp_()
    return e.mul_(4.0).div_((1.0 + e / 4.0).square_())


def _write_grad(x: torch.Tensor, logits: torch.Tensor, local_target: torch.Tensor, vocab_size: int, m: torch.Tensor,
                s: torch.Tensor, scale: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """The epilogue on float32 rows ``x`` (x' of ``logits``), in place: ``scale * grad_j`` of the contract, for these
    columns, evaluated as ``(p_j - c_j) + 2 z lse p_j`` (the z-loss term apart: ``(1 + 2 z lse) p_j - c_j`` would
    cancel where p_j is close to c_j)."""
    ref = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    p = x.sub_(ref.unsqueeze(-1)).exp_().mul_((1.0 / s).unsqueeze(-1))
    z_term = p * (2.0 * spec.z_loss * (m + torch.log(s))).unsqueeze(-1) if spec.z_loss else None
    here = (local_target >= 0) & (local_target < x.shape[-1])
    index = torch.where(here, local_target, 0).unsqueeze(-1)
    # The target's term as one constant (1 - e + e / V), subtracted once: with V = 1 it is exactly 1.
    target_term = p.gather(-1, index) - target_coefficient(spec, vocab_size)
    g = p.sub_(spec.label_smoothing / vocab_size) if spec.label_smoothing else p
    g.scatter_(-1, index, torch.where(here.unsqueeze(-1), target_term, g.gather(-1, index)))
    if z_term is not None:
        g.add_(z_term)
    if spec.softcap:
        g.mul_(_softcap_slope(logits, spec.softcap))
    return g.mul_(scale.unsqueeze(-1))


def cross_entropy_fwd(logits, targets, divisor, losses, grad, ignore_index: int, skip=None, spec: LossSpec = PLAIN,
                      row_stats=None) -> None:
    if skip is not None and bool(skip):  # a host synchronisation: this backend is the plain-PyTorch fallback
        return
    batch, seq_len, vocab_size = logits.shape
    scale = _grad_scale(divisor) if grad is not None else None
    for b in range(batch):
        for start, end in _row_chunks(seq_len, vocab_size):
            x = _capped(logits[b, start:end], spec)
            target = targets[b, start:end].long()
            ignored = target == ignore_index
            row = _row_stats(x, target, spec)
            loss, extra = _stats.finish(row, target, vocab_size, ignore_index, spec)
            losses[b, start:end] = loss
            if row_stats is not None:
                row_stats[b, start:end] = extra
            if grad is not None:
                g = _write_grad(x, logits[b, start:end], target, vocab_size, row[:, 0], row[:, 1],
                                scale.expand(end - start), spec)
                grad[b, start:end] = g.masked_fill_(ignored.unsqueeze(-1), 0.0).to(grad.dtype)


def shard_stats(logits, targets, vocab_start: int, ignore_index: int, stats, spec: LossSpec = PLAIN) -> None:
    batch, seq_len, width = logits.shape
    for b in range(batch):
        for start, end in _row_chunks(seq_len, width):
            target = targets[b, start:end].long()
            row = _row_stats(_capped(logits[b, start:end], spec), target - vocab_start, spec)
            identity = torch.tensor([float("-inf"), 0.0, 0.0, 0.0, 0.0], device=row.device)
            stats[b, start:end] = torch.where((target == ignore_index).unsqueeze(-1), identity, row)


def shard_grad(logits, targets, vocab_start: int, vocab_size: int, ignore_index: int, row, grad,
               spec: LossSpec = PLAIN) -> None:
    batch, seq_len, width = logits.shape
    for b in range(batch):
        for start, end in _row_chunks(seq_len, width):
            target = targets[b, start:end].long()
            m, s, scale = row[b, start:end].unbind(-1)
            rows = logits[b, start:end]
            g = _write_grad(_capped(rows, spec), rows, target - vocab_start, vocab_size, m, s, scale, spec)
            grad[b, start:end] = g.masked_fill_((target == ignore_index).unsqueeze(-1), 0.0).to(grad.dtype)


def scale_grad_(grad, grad_output) -> None:
    factor = grad_output.float()
    if factor.dim() == 0:
        # Multiplying by 1 is exact, so skipping it is only a shortcut; on the CPU reading the value costs nothing.
        if grad.device.type != "cpu" or bool(factor != 1):
            grad.mul_(factor)
        return
    batch, seq_len, _ = grad.shape
    for b in range(batch):
        for start, end in _row_chunks(seq_len, grad.shape[-1]):
            rows = grad[b, start:end]
            rows.copy_((rows.float() * factor[b, start:end].unsqueeze(-1)).to(grad.dtype))
