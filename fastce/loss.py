"""The loss API: shifting, normalisation by ``num_items_in_batch`` and argument checking; kernels stay unaware."""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from .backends import resolve_backend
from .function import _sum_over, fused_cross_entropy
from .ops import LOGIT_DTYPES
from .spec import LossSpec, make_spec
from .distributed_meta import is_dtensor


def _as_rows(logits: Tensor, targets: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """``logits`` as ``[B, T, V]`` and ``targets`` as ``[B, T]``, as views (never copies of the logits)."""
    if not isinstance(logits, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(f"logits and {name} must be tensors, got {type(logits).__name__} and {type(targets).__name__}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16 or float32, got {logits.dtype}")
    check_integer(targets, name)
    if logits.dim() not in (2, 3) or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [B, T, V] or [N, V] with V >= 1, got {tuple(logits.shape)}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"{name} {tuple(targets.shape)} do not match logits {tuple(logits.shape)} (expected {tuple(logits.shape[:-1])})")
    if logits.dim() == 2:
        logits, targets = logits.unsqueeze(0), targets.unsqueeze(0)
    if targets.dtype not in (torch.int32, torch.int64):
        targets = targets.long()
    return logits, targets.to(logits.device)


def check_integer(targets: Tensor, name: str) -> None:
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {targets.dtype}")


def divisor_of(num_items_in_batch, targets: Tensor, ignore_index: int) -> Tensor:
    """0-dim float64 on the targets' device, built without reading anything back to the host.

    The rule (README, "Semantics"): a count > 0 divides; a count of 0 gives 0 when every target is ignored, else
    NaN (the count contradicts the targets; the gradient of those rows is NaN too: see ``_sum_over`` and the
    kernels). A negative or NaN count is an error: a Python number raises here, a tensor becomes NaN here and raises
    at the label check (``validate=True``), where the host waits anyway.
    """
    device = targets.device
    if num_items_in_batch is None:
        return (targets != ignore_index).sum().to(torch.float64)
    if isinstance(num_items_in_batch, Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must hold one number, got shape {tuple(num_items_in_batch.shape)}")
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
            raise TypeError(f"num_items_in_batch must be a real number, got a {num_items_in_batch.dtype} tensor")
        count = num_items_in_batch.detach().reshape(()).to(device=device, dtype=torch.float64, non_blocking=True)
        return torch.where(count >= 0, count, torch.full_like(count, float("nan")))  # NaN stays NaN
    if isinstance(num_items_in_batch, numbers.Real) and not isinstance(num_items_in_batch, bool):
        if not (num_items_in_batch >= 0 and math.isfinite(num_items_in_batch)):  # also NaN
            raise ValueError(f"num_items_in_batch must be a finite count >= 0, got {num_items_in_batch}")
        return torch.full((), float(num_items_in_batch), dtype=torch.float64, device=device)
    raise TypeError(f"num_items_in_batch must be None, a number or a tensor, got {type(num_items_in_batch).__name__}")


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
    z_rows = spec.z_loss * lse.double().square()
    z_term = _sum_over(z_rows, divisor) if reduce else z_rows.float()
    return LossOutput(loss, z_term.detach(), lse.detach(), entropy.detach(), correct.detach() != 0)


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    vocab_size: int | None = None,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
    *,
    backend: str = "auto",
    inplace_backward: bool = False,
    validate: bool = True,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_stats: bool = False,
    process_group=None,
    **kwargs,
):
    """Shifted cross-entropy of a causal LM: transformers' ``ForCausalLMLoss``, fused.

    Position ``t`` of ``logits`` predicts ``labels[..., t + 1]`` (no shift when ``shift_labels`` is given, which is
    then aligned with ``logits``). The loss is the sum of token losses over targets that are not ``ignore_index``,
    divided by ``num_items_in_batch`` (an int, a float or a one-element tensor on any device: pass the count of the
    whole gradient-accumulation step to make k micro-batches equal one batch), or their mean when it is None.

    Args:
        logits: ``[B, T, V]`` (or ``[T, V]``) float16/bfloat16/float32, any row strides with unit stride over V
            (``logits[:, -k:]`` works without a copy). Never upcast or copied.
        labels: ``[B, T]`` integer, any device (moved to the logits' device, as transformers does).
        vocab_size: if given, must equal ``logits.shape[-1]`` (the whole vocabulary with ``process_group``).
        num_items_in_batch: the divisor; read on the device, never synchronised. 0 gives 0 if every target is
            ignored, else NaN; a negative count raises (README, "Semantics").
        ignore_index: targets with this value contribute nothing.
        shift_labels: ``[B, T]`` labels already shifted; ``labels`` is then unused.
        backend: ``"auto"`` (the best available for the logits' device), ``"triton"``, ``"cuda"`` or ``"torch"``.
        inplace_backward: write the gradient into the logits' storage instead of a new buffer (saves
            ``B*T*V`` elements). The logits are destroyed by the forward call: do not use them afterwards (for
            example ``outputs.logits`` of a transformers model), and nothing that saved them for its own backward
            (autograd raises if something did).
        validate: check that every target is ``ignore_index`` or in ``[0, V)`` and raise ``ValueError`` if not; this
            costs one small host synchronisation. With ``False`` (for CUDA-graph capture) such a target is never
            read out of bounds and makes the loss NaN.
        softcap: cap the logits as ``softcap * tanh(logits / softcap)`` before the loss (Gemma 2/3), in the kernels.
        label_smoothing: ``(1 - e) * CE + e * mean_j(-log p_j)`` on non-ignored rows, as in ``F.cross_entropy``.
        z_loss: add ``z_loss * lse**2`` for every non-ignored row, summed and normalised like the loss.
        return_stats: return a ``fastce.LossOutput`` (loss, z_loss term, and per-position lse, entropy, accuracy)
            instead of the loss alone.
        process_group: the logits hold this rank's contiguous shard of the vocabulary, shards in rank order
            (vocab-parallel; see ``fastce.distributed``). The loss and statistics are those of the whole vocabulary
            on every rank, the gradient is this rank's slice.
        **kwargs: accepted and ignored, so the function can sit in transformers' ``LOSS_MAPPING``.

    Returns:
        A float32 scalar (or a ``LossOutput``). An empty batch, ``T <= 1`` or all targets ignored give 0 and a zero
        gradient (not NaN); NaN or Inf in the logits propagate into the loss.

    Example::

        loss = fastce.causal_lm_loss(outputs.logits, batch["labels"], num_items_in_batch=num_items)
        loss.backward()
    """
    spec = make_spec(softcap, label_smoothing, z_loss, return_stats)
    if not isinstance(labels, Tensor) and shift_labels is None:
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if process_group is not None or is_dtensor(logits):
        from . import distributed

        return distributed.causal_lm_loss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels,
                                          process_group=process_group, backend=backend, validate=validate, spec=spec)
    if vocab_size is not None and isinstance(logits, Tensor) and vocab_size != logits.shape[-1]:
        raise ValueError(f"vocab_size={vocab_size} does not match the logits' last dimension {logits.shape[-1]}")
    if shift_labels is None:
        if isinstance(logits, Tensor):
            labels = labels.to(logits.device)
        targets, name = shift_targets(labels, ignore_index), "labels"
    else:
        targets, name = shift_labels, "shift_labels"
    logits3d, targets = _as_rows(logits, targets, name)
    backend = resolve_backend(backend, logits3d)
    divisor = divisor_of(num_items_in_batch, targets, ignore_index)
    loss, row_stats = fused_cross_entropy(
        logits3d, targets, divisor, ignore_index,
        reduce=True, inplace=inplace_backward, validate=validate, backend=backend, spec=spec,
    )
    return make_output(loss, row_stats, divisor, True, spec, logits.shape[:-1]) if return_stats else loss


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    backend: str = "auto",
    inplace_backward: bool = False,
    validate: bool = True,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_stats: bool = False,
    process_group=None,
):
    """Cross-entropy of already-aligned rows, like ``F.cross_entropy`` on ``[N, V]`` (or ``[B, T, V]``) logits.

    ``reduction``: ``"mean"`` over targets that are not ``ignore_index`` (0 when there are none, not NaN),
    ``"sum"``, or ``"none"`` (float32 per row, 0 on ignored rows; its gradient is exact for any upstream gradient).
    Other arguments as in ``causal_lm_loss``.
    """
    spec = make_spec(softcap, label_smoothing, z_loss, return_stats)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if process_group is not None or is_dtensor(logits):
        from . import distributed

        return distributed.cross_entropy(logits, target, ignore_index, reduction, process_group=process_group,
                                         backend=backend, validate=validate, spec=spec)
    logits3d, targets = _as_rows(logits, target, "target")
    backend = resolve_backend(backend, logits3d)
    divisor = reduction_divisor(reduction, targets, ignore_index)
    out, row_stats = fused_cross_entropy(
        logits3d, targets, divisor, ignore_index,
        reduce=reduction != "none", inplace=inplace_backward, validate=validate, backend=backend, spec=spec,
    )
    out = out.reshape(target.shape) if reduction == "none" else out
    return make_output(out, row_stats, divisor, reduction != "none", spec, target.shape) if return_stats else out


def reduction_divisor(reduction: str, targets: Tensor, ignore_index: int) -> Tensor:
    if reduction == "mean":
        return divisor_of(None, targets, ignore_index)
    return torch.ones((), dtype=torch.float64, device=targets.device)
