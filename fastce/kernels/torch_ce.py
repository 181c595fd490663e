"""Chunked pure-PyTorch backend: any device, the CPU path. Same contract as the other kernels (see __init__)."""
from __future__ import annotations

import torch

# Rows upcast to float32 at a time are capped by this many elements (64 MiB of float32): memory stays O(chunk).
_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(seq_len: int, vocab_size: int):
    rows = max(1, _CHUNK_ELEMENTS // max(vocab_size, 1))
    for start in range(0, seq_len, rows):
        yield start, min(seq_len, start + rows)


def _grad_scale(divisor: torch.Tensor) -> torch.Tensor:
    divisor = divisor.double()
    return (1.0 / torch.where(divisor == 0, torch.ones_like(divisor), divisor)).float()


def cross_entropy_fwd(logits, targets, divisor, losses, grad, ignore_index: int, skip=None) -> None:
    if skip is not None and bool(skip):  # a host synchronisation: this backend is the plain-PyTorch fallback
        return
    batch, seq_len, vocab_size = logits.shape
    scale = _grad_scale(divisor) if grad is not None else None
    for b in range(batch):
        for start, end in _row_chunks(seq_len, vocab_size):
            # A float32 copy of one chunk only (copy=True: for float32 logits .float() would be a view, and x is modified).
            x = logits[b, start:end].to(torch.float32, copy=True)
            target = targets[b, start:end].long()
            ignored = target == ignore_index
            in_range = (target >= 0) & (target < vocab_size)
            safe_target = torch.where(in_range, target, torch.zeros_like(target)).unsqueeze(-1)
            lse = torch.logsumexp(x, dim=-1)
            loss = lse - x.gather(-1, safe_target).squeeze(-1)
            loss = torch.where(in_range, loss, torch.full_like(loss, float("nan")))
            losses[b, start:end] = torch.where(ignored, torch.zeros_like(loss), loss)
            if grad is not None:
                x.sub_(lse.unsqueeze(-1)).exp_()
                hit = (in_range & ~ignored).to(x.dtype).unsqueeze(-1)
                x.scatter_add_(-1, safe_target, -hit)
                x.mul_(scale).masked_fill_(ignored.unsqueeze(-1), 0.0)
                grad[b, start:end] = x.to(grad.dtype)


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
