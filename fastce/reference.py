"""Float64 references: the obvious implementations every kernel and path is checked against. Slow and memory-hungry
by design. Each takes the loss options of ``fastce.spec.LossSpec`` as keywords and computes them in float64."""
from __future__ import annotations

import torch


def _capped(logits: torch.Tensor, softcap) -> torch.Tensor:
    x = logits.double()
    return x if not softcap else softcap * torch.tanh(x / softcap)


def cross_entropy_reference(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, *, softcap=None, label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Per-row losses in float64: ``(1-e)(lse - x_t) + e(lse - mean_j x_j) + z lse**2`` of the (capped) row; 0 where
    ``target == ignore_index``. ``logits`` is ``[..., V]``, ``targets`` is ``[...]``. A target outside ``[0, V)``
    gives NaN (fastce's defined result). Differentiable."""
    x = _capped(logits, softcap)
    targets = targets.to(x.device).long()
    ignored = targets == ignore_index
    in_range = (targets >= 0) & (targets < x.shape[-1])
    safe = torch.where(in_range, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(x, dim=-1)
    loss = lse - x.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    loss = torch.where(in_range, loss, torch.full_like(loss, float("nan")))
    if label_smoothing:
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - x.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    return torch.where(ignored, torch.zeros_like(loss), loss)


def row_stats_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, *, softcap=None):
    """Float64 ``(lse, entropy, correct)`` per row, 0 on ignored rows: ``correct`` is whether the target's (capped)
    logit is a maximum of its row (ties count as correct)."""
    x = _capped(logits, softcap).detach()
    targets = targets.to(x.device).long()
    ignored = targets == ignore_index
    in_range = (targets >= 0) & (targets < x.shape[-1])
    lse = torch.logsumexp(x, dim=-1)
    log_p = x - lse.unsqueeze(-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    target_logit = x.gather(-1, torch.where(in_range, targets, 0).unsqueeze(-1)).squeeze(-1)
    correct = in_range & (target_logit >= x.amax(dim=-1))
    zero = torch.zeros_like(lse)
    return torch.where(ignored, zero, lse), torch.where(ignored, zero, entropy), correct & ~ignored


def cross_entropy_grad_reference(
    logits: torch.Tensor, targets: torch.Tensor, divisor: float = 1.0, ignore_index: int = -100, *, softcap=None,
    label_smoothing: float = 0.0, z_loss: float = 0.0,
) -> torch.Tensor:
    """Float64 gradient of the summed row losses, divided by ``divisor``, with respect to the logits: the kernels'
    gradient (see fastce/kernels). 0 on ignored rows; no one-hot term on rows whose target is outside ``[0, V)``
    (their loss is NaN, their gradient that of the loss without the target term); a zero divisor makes the
    gradient of non-ignored rows NaN."""
    x0 = logits.detach().double().requires_grad_()
    x = _capped(x0, softcap)
    targets = targets.to(x.device).long()
    in_range = ((targets >= 0) & (targets < x.shape[-1])).double()
    kept = (targets != ignore_index).double()
    lse = torch.logsumexp(x, dim=-1)
    x_t = x.gather(-1, torch.where(in_range > 0, targets, 0).unsqueeze(-1)).squeeze(-1)
    rows = lse - (1 - label_smoothing) * in_range * x_t - label_smoothing * x.mean(dim=-1) + z_loss * lse.square()
    (rows * kept).sum().backward()
    if divisor == 0:
        return x0.grad.masked_fill(kept.unsqueeze(-1) > 0, float("nan"))
    return x0.grad / divisor


def causal_lm_loss_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` in float64 (with fastce's options), with fastce's defined result for an empty
    count (0, not NaN).

    Differentiable: call it on ``logits.double().requires_grad_()`` for the float64 gradient.
    """
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    losses = cross_entropy_reference(logits, shift_labels, ignore_index, **options)
    total = losses.sum()
    if num_items_in_batch is None:
        count = (shift_labels != ignore_index).sum()
    else:
        count = torch.as_tensor(num_items_in_batch).to(total.device)
    count = count.double()
    return total / torch.where(count == 0, torch.ones_like(count), count)


def linear_logits_reference(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` in float64 (of the given, possibly bf16, values): the logits the linear references take."""
    return torch.nn.functional.linear(input.double(), weight.double(), None if bias is None else bias.double())
