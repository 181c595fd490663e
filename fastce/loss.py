"""The loss API: shifting, normalisation by ``num_items_in_batch`` and argument checking; kernels stay unaware."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .backends import resolve_backend
from .function import fused_cross_entropy
from .ops import LOGIT_DTYPES


def _as_rows(logits: Tensor, targets: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """``logits`` as ``[B, T, V]`` and ``targets`` as ``[B, T]``, as views (never copies of the logits)."""
    if not isinstance(logits, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(f"logits and {name} must be tensors, got {type(logits).__name__} and {type(targets).__name__}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16 or float32, got {logits.dtype}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {targets.dtype}")
    if logits.dim() not in (2, 3) or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [B, T, V] or [N, V] with V >= 1, got {tuple(logits.shape)}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"{name} {tuple(targets.shape)} do not match logits {tuple(logits.shape)} (expected {tuple(logits.shape[:-1])})")
    if logits.dim() == 2:
        logits, targets = logits.unsqueeze(0), targets.unsqueeze(0)
    if targets.dtype not in (torch.int32, torch.int64):
        targets = targets.long()
    return logits, targets.to(logits.device)


def _divisor(num_items_in_batch, targets: Tensor, ignore_index: int) -> Tensor:
    """0-dim float64 on the logits' device, built without reading anything back to the host."""
    device = targets.device
    if num_items_in_batch is None:
        return (targets != ignore_index).sum().to(torch.float64)
    if isinstance(num_items_in_batch, Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must hold one number, got shape {tuple(num_items_in_batch.shape)}")
        return num_items_in_batch.detach().reshape(()).to(device=device, dtype=torch.float64, non_blocking=True)
    if isinstance(num_items_in_batch, numbers.Real) and not isinstance(num_items_in_batch, bool):
        if num_items_in_batch < 0:
            raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch}")
        return torch.full((), float(num_items_in_batch), dtype=torch.float64, device=device)
    raise TypeError(f"num_items_in_batch must be None, a number or a tensor, got {type(num_items_in_batch).__name__}")


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
    **kwargs,
) -> Tensor:
    """Shifted cross-entropy of a causal LM: transformers' ``ForCausalLMLoss``, fused.

    Position ``t`` of ``logits`` predicts ``labels[..., t + 1]`` (no shift when ``shift_labels`` is given, which is
    then aligned with ``logits``). The loss is the sum of token losses over targets that are not ``ignore_index``,
    divided by ``num_items_in_batch`` (an int, a float or a one-element tensor on any device: pass the count of the
    whole gradient-accumulation step to make k micro-batches equal one batch), or their mean when it is None.

    Args:
        logits: ``[B, T, V]`` (or ``[T, V]``) float16/bfloat16/float32, any row strides with unit stride over V
            (``logits[:, -k:]`` works without a copy). Never upcast or copied.
        labels: ``[B, T]`` integer, any device (moved to the logits' device, as transformers does).
        vocab_size: if given, must equal ``logits.shape[-1]``.
        num_items_in_batch: the divisor; read on the device, never synchronised.
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
        **kwargs: accepted and ignored, so the function can sit in transformers' ``LOSS_MAPPING``.

    Returns:
        A float32 scalar. An empty batch, ``T <= 1`` or all targets ignored give 0 and a zero gradient (not NaN);
        NaN or Inf in the logits propagate into the loss.

    Example::

        loss = fastce.causal_lm_loss(outputs.logits, batch["labels"], num_items_in_batch=num_items)
        loss.backward()
    """
    if not isinstance(labels, Tensor) and shift_labels is None:
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if vocab_size is not None and isinstance(logits, Tensor) and vocab_size != logits.shape[-1]:
        raise ValueError(f"vocab_size={vocab_size} does not match the logits' last dimension {logits.shape[-1]}")
    if shift_labels is None:
        if labels.dim() == 0:
            raise ValueError("labels must have a sequence dimension")
        if isinstance(logits, Tensor):
            labels = labels.to(logits.device)
        # The shift is index arithmetic on the labels (O(B*T) integers); the logits are never shifted or copied.
        targets = torch.full_like(labels, ignore_index)
        targets[..., :-1] = labels[..., 1:]
        name = "labels"
    else:
        targets, name = shift_labels, "shift_labels"
    logits3d, targets = _as_rows(logits, targets, name)
    backend = resolve_backend(backend, logits3d)
    divisor = _divisor(num_items_in_batch, targets, ignore_index)
    return fused_cross_entropy(
        logits3d, targets, divisor, ignore_index,
        reduce=True, inplace=inplace_backward, validate=validate, backend=backend,
    )


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    backend: str = "auto",
    inplace_backward: bool = False,
    validate: bool = True,
) -> Tensor:
    """Cross-entropy of already-aligned rows, like ``F.cross_entropy`` on ``[N, V]`` (or ``[B, T, V]``) logits.

    ``reduction``: ``"mean"`` over targets that are not ``ignore_index`` (0 when there are none, not NaN),
    ``"sum"``, or ``"none"`` (float32 per row, 0 on ignored rows). Other arguments as in ``causal_lm_loss``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    logits3d, targets = _as_rows(logits, target, "target")
    backend = resolve_backend(backend, logits3d)
    if reduction == "mean":
        divisor = _divisor(None, targets, ignore_index)
    else:
        divisor = torch.ones((), dtype=torch.float64, device=logits3d.device)
    out = fused_cross_entropy(
        logits3d, targets, divisor, ignore_index,
        reduce=reduction != "none", inplace=inplace_backward, validate=validate, backend=backend,
    )
    return out.reshape(target.shape) if reduction == "none" else out
