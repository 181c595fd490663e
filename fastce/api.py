"""Pieces every loss function shares (the logits and fused-linear APIs, and their vocab-parallel forms): argument
checks, the label shift, the count rule of ``num_items_in_batch``, and the statistics tuple of ``return_stats``."""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from .function import _sum_over
from .ops import LOGIT_DTYPES
from .spec import LossSpec


def as_rows(logits: Tensor, targets: Tensor, name: str, shard: bool = False) -> tuple[Tensor, Tensor]:
    """``logits`` as ``[B, T, V]`` and ``targets`` as ``[B, T]``, as views (never copies of the logits). ``shard``: the
    logits are one rank's vocabulary shard, which may be empty."""
    if not isinstance(logits, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(f"logits and {name} must be tensors, got {type(logits).__name__} and {type(targets).__name__}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16 or float32, got {logits.dtype}")
    check_integer(targets, name)
    if logits.dim() not in (2, 3) or (logits.shape[-1] == 0 and not shard):
        what = "[B, T, Vs] or [N, Vs] (this rank's vocabulary shard)" if shard else "[B, T, V] or [N, V] with V >= 1"
        raise ValueError(f"logits must be {what}, got {tuple(logits.shape)}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"{name} {tuple(targets.shape)} do not match logits {tuple(logits.shape)} (expected {tuple(logits.shape[:-1])})")
    if logits.shape[-1] == 1 and logits.stride(-1) != 1:  # one column: any stride is a unit stride
        logits = logits.as_strided(logits.shape, (*logits.stride()[:-1], 1))
    if logits.dim() == 2:
        logits, targets = logits.unsqueeze(0), targets.unsqueeze(0)
    if targets.dtype not in (torch.int32, torch.int64):
        targets = targets.long()
    return logits, targets.to(logits.device)


def check_integer(targets: Tensor, name: str) -> None:
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {targets.dtype}")


def check_linear(input: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, name: str) -> None:
    """Clear errors for the shapes, dtypes and devices of the fused-linear ops' arguments."""
    for label, t in (("input", input), ("weight", weight), (name, targets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{label} must be a tensor, got {type(t).__name__}")
    if input.dtype not in LOGIT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16 or float32, got {input.dtype}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight ({weight.dtype}) and input ({input.dtype}) must have the same dtype")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, D] with V >= 1, got {tuple(weight.shape)}")
    if input.dim() not in (2, 3) or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"input must be [N, D] or [B, T, D] with D = {weight.shape[1]} (the weight's), got "
                         f"{tuple(input.shape)}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be a [{weight.shape[0]}] tensor of the weight's dtype {weight.dtype}, got "
                         f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")
    check_integer(targets, name)
    if targets.shape != input.shape[:-1]:
        raise ValueError(f"{name} {tuple(targets.shape)} do not match input {tuple(input.shape)} (expected "
                         f"{tuple(input.shape[:-1])})")
    devices = {t.device for t in (input, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"input, weight and bias must share a device, got {sorted(map(str, devices))}")


def divisor_of(num_items_in_batch, targets: Tensor, ignore_index: int) -> Tensor:
    """0-dim float64 on the targets' device, built without reading anything back to the host.

    The rule (README, "Semantics"): a count > 0 divides; a count of 0 gives 0 when every target is ignored, else
    NaN (the count contradicts the targets; the gradient of those rows is NaN too: see ``_sum_over`` and the
    kernels). A negative, NaN or infinite count is an error: a Python number raises here, a tensor becomes NaN here
    and raises at the label check (``validate=True``), where the host waits anyway.
    """
    device = targets.device
    if num_items_in_batch is None:
        return (targets != ignore_index).sum().to(torch.float64)
    if isinstance(num_items_in_batch, Tensor):
        count = count_tensor(num_items_in_batch).reshape(()).to(device=device, dtype=torch.float64, non_blocking=True)
        return torch.where((count >= 0) & (count < math.inf), count, torch.full_like(count, float("nan")))
    return torch.full((), count_number(num_items_in_batch), dtype=torch.float64, device=device)


def count_tensor(num_items_in_batch: Tensor) -> Tensor:
    """The count tensor, detached, once its shape and dtype are checked (its value is read on the device)."""
    if num_items_in_batch.numel() != 1:
        raise ValueError(f"num_items_in_batch must hold one number, got shape {tuple(num_items_in_batch.shape)}")
    if num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
        raise TypeError(f"num_items_in_batch must be a real number, got a {num_items_in_batch.dtype} tensor")
    # A count rarely needs a gradient; detaching one that does not would cost a dispatcher call at every step.
    return num_items_in_batch.detach() if num_items_in_batch.requires_grad else num_items_in_batch


def count_number(num_items_in_batch) -> float:
    """A count given as a Python number, checked (a negative, NaN or infinite one raises at once)."""
    if isinstance(num_items_in_batch, numbers.Real) and not isinstance(num_items_in_batch, bool):
        if not (num_items_in_batch >= 0 and math.isfinite(num_items_in_batch)):  # also NaN
            raise ValueError(f"num_items_in_batch must be a finite count >= 0, got {num_items_in_batch}")
        return float(num_items_in_batch)
    raise TypeError(f"num_items_in_batch must be None, a number or a tensor, got {type(num_items_in_batch).__name__}")


def direct_count(num_items_in_batch, device) -> tuple:
    """``(count, count_value, count_targets)``, the divisor as ``fastce_cuda::causal_lm_fwd`` takes it: a tensor on
    ``device`` read there (None if not one), else a number, else (None given) the count of targets that are not
    ignored. The checks and the count rule are ``divisor_of``'s; a CPU tensor is read on the host (no
    synchronisation), and its value obeys the tensor rule."""
    if num_items_in_batch is None:
        return None, 0.0, True
    if isinstance(num_items_in_batch, Tensor):
        count = count_tensor(num_items_in_batch)
        where = count.device
        if where.type == "cpu":
            return None, float(count), False
        if where != device:
            count = count.to(device)
        if count.dtype not in (torch.int64, torch.int32, torch.float32, torch.float64):
            count = count.double()
        return count, 0.0, False
    return None, count_number(num_items_in_batch), False


def reduction_divisor(reduction: str, targets: Tensor, ignore_index: int) -> Tensor:
    if reduction == "mean":
        return divisor_of(None, targets, ignore_index)
    return torch.ones((), dtype=torch.float64, device=targets.device)


def shift_targets(labels: Tensor, ignore_index: int) -> Tensor:
    """The targets of positions ``[..., t]``: ``labels[..., t + 1]``, ``ignore_index`` at the last position. Index
    arithmetic on the labels (O(B*T) integers): the logits or hidden states are never shifted or copied."""
    if labels.dim() == 0:
        raise ValueError("labels must have a sequence dimension")
    targets = torch.full_like(labels, ignore_index)
    targets[..., :-1] = labels[..., 1:]
    return targets


class LossOutput(NamedTuple):
    """What ``return_stats=True`` returns: the loss and, without a second pass over the logits, statistics of each
    row (position) of the loss's input. Per-row tensors have the rows' shape (``[B, T]`` or ``[N]``), are detached,
    and are 0 (``False``) on rows whose target is ignored.

    loss:     the loss, exactly as without ``return_stats`` (differentiable).
    z_loss:   the z-loss term alone (``z_loss * lse**2``, reduced and normalised like the loss; per row for
              ``reduction="none"``), for logging; 0 when ``z_loss=0``.
    lse:      float32 log-sum-exp of each row's (capped) logits.
    entropy:  float32 entropy of each row's predicted distribution, ``-sum_j p_j log p_j``.
    accuracy: bool, whether the target is an argmax of its row (ties count as correct); ``accuracy[mask].float()
              .mean()`` is the token accuracy.
    """

    loss: Tensor
    z_loss: Tensor
    lse: Tensor
    entropy: Tensor
    accuracy: Tensor


def make_output(loss: Tensor, row_stats: Tensor, divisor: Tensor, reduce: bool, spec: LossSpec, shape) -> LossOutput:
    """``LossOutput`` from the kernels' ``[..., 3]`` (lse, entropy, correct) rows."""
    lse, entropy, correct = row_stats.reshape(*shape, 3).unbind(-1)
    if spec.z_loss == 0.0:  # none asked: zeros, without the dozen small kernels of the sum below
        z_term = lse.new_zeros(() if reduce else lse.shape)
    else:
        z_rows = spec.z_loss * lse.double().square()
        z_term = _sum_over(z_rows, divisor) if reduce else z_rows.float()
    return LossOutput(loss, z_term.detach(), lse.detach(), entropy.detach(), correct.detach() != 0)


def kept_rows(targets: Tensor, ignore_index: int) -> Tensor | None:
    """Indices of the rows whose target is not ignored, or None when every row is kept (no gather needed). Reads a
    count back to the host: only where the host waits anyway (the label check)."""
    kept = (targets != ignore_index).nonzero().squeeze(-1)
    return None if kept.numel() == targets.numel() else kept


def to_every_row(out: Tensor, row_stats: Tensor, kept: Tensor | None, rows: int, reduce: bool, spec: LossSpec):
    """``(out, row_stats)`` of the kept rows back on every row (ignored rows 0), where they are per row."""
    if kept is not None:
        if not reduce:
            out = out.new_zeros(rows).index_copy(0, kept, out)
        if spec.stats:
            row_stats = row_stats.new_zeros((rows, 3)).index_copy(0, kept, row_stats)
    return out, row_stats

