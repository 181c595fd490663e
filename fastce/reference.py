"""Float64 reference: the obvious implementation every kernel is checked against. Slow and memory-hungry by design."""
from __future__ import annotations

import torch


def cross_entropy_reference(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Per-row losses in float64: ``logsumexp(row) - row[target]``; 0 where ``target == ignore_index``.

    ``logits`` is ``[..., V]``, ``targets`` is ``[...]``. A target outside ``[0, V)`` gives NaN (fastce's defined result).
    """
    x = logits.double()
    targets = targets.to(x.device).long()
    ignored = targets == ignore_index
    in_range = (targets >= 0) & (targets < x.shape[-1])
    safe = torch.where(in_range, targets, torch.zeros_like(targets))
    loss = torch.logsumexp(x, dim=-1) - x.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    loss = torch.where(in_range, loss, torch.full_like(loss, float("nan")))
    return torch.where(ignored, torch.zeros_like(loss), loss)


def cross_entropy_grad_reference(
    logits: torch.Tensor, targets: torch.Tensor, divisor: float = 1.0, ignore_index: int = -100
) -> torch.Tensor:
    """Float64 ``(softmax - onehot(target)) / divisor`` per row: the kernels' gradient (see fastce/kernels).

    0 on ignored rows; no one-hot on rows whose target is outside ``[0, V)``; a zero divisor divides by 1.
    """
    x = logits.double()
    targets = targets.to(x.device).long()
    in_range = (targets >= 0) & (targets < x.shape[-1])
    onehot = torch.zeros_like(x).scatter_(
        -1, torch.where(in_range, targets, 0).unsqueeze(-1), in_range.double().unsqueeze(-1)
    )
    grad = (torch.softmax(x, dim=-1) - onehot) / (divisor if divisor != 0 else 1.0)
    return grad.masked_fill((targets == ignore_index).unsqueeze(-1), 0.0)


def causal_lm_loss_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` in float64, with fastce's defined result for an empty count (0, not NaN).

    Differentiable: call it on ``logits.double().requires_grad_()`` for the float64 gradient.
    """
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    losses = cross_entropy_reference(logits, shift_labels, ignore_index)
    total = losses.sum()
    if num_items_in_batch is None:
        count = (shift_labels != ignore_index).sum()
    else:
        count = torch.as_tensor(num_items_in_batch).to(total.device)
    count = count.double()
    return total / torch.where(count == 0, torch.ones_like(count), count)
