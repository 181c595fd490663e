"""The loss API: shifting, normalisation by ``num_items_in_batch`` and argument checking; kernels stay unaware."""
from __future__ import annotations

import torch
from torch import Tensor

from .api import LossOutput, as_rows, direct_count, divisor_of, make_output, reduction_divisor, shift_targets
from .backends import resolve_backend, takes_cuda
from .distributed_meta import is_dtensor
from .function import direct_cross_entropy, fused_cross_entropy
from .ops import LOGIT_DTYPES
from .spec import make_spec

__all__ = ["LossOutput", "causal_lm_loss", "cross_entropy"]

_DIRECT_TARGETS = (torch.int64, torch.int32)
DIRECT = True  # False sends every call the general way (benchmarks/profile_host.py measures both)


def _direct(logits, targets, backend: str, process_group) -> bool:
    """Whether the eager one-op CUDA path (``function.direct_cross_entropy``) takes a reduced loss: plain CUDA
    tensors as the kernels take them, on the CUDA backend, outside torch.compile; the rest goes the general way."""
    return (
        DIRECT and process_group is None and not torch.compiler.is_compiling()
        and type(logits) is Tensor and type(targets) is Tensor and logits.is_cuda
        and logits.dim() == 3 and targets.dim() == 2 and targets.shape == logits.shape[:2] and logits.shape[2] >= 1
        and logits.stride(2) == 1 and logits.dtype in LOGIT_DTYPES and targets.dtype in _DIRECT_TARGETS
        and targets.device == logits.device and takes_cuda(backend, logits)
    )


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
    shift = shift_labels is None
    if _direct(logits, labels if shift else shift_labels, backend, process_group):
        if vocab_size is not None and vocab_size != logits.shape[-1]:
            raise ValueError(f"vocab_size={vocab_size} does not match the logits' last dimension {logits.shape[-1]}")
        loss, row_stats, divisor = direct_cross_entropy(
            logits, labels if shift else shift_labels, shift, ignore_index,
            *direct_count(num_items_in_batch, logits.device), inplace=inplace_backward, validate=validate, spec=spec)
        return make_output(loss, row_stats, divisor, True, spec, logits.shape[:-1]) if return_stats else loss
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
    logits3d, targets = as_rows(logits, targets, name)
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
    if reduction != "none" and _direct(logits, target, backend, process_group):
        count = (None, 0.0, True) if reduction == "mean" else (None, 1.0, False)
        loss, row_stats, divisor = direct_cross_entropy(logits, target, False, ignore_index, *count,
                                                        inplace=inplace_backward, validate=validate, spec=spec)
        return make_output(loss, row_stats, divisor, True, spec, target.shape) if return_stats else loss
    if process_group is not None or is_dtensor(logits):
        from . import distributed

        return distributed.cross_entropy(logits, target, ignore_index, reduction, process_group=process_group,
                                         backend=backend, validate=validate, spec=spec)
    logits3d, targets = as_rows(logits, target, "target")
    backend = resolve_backend(backend, logits3d)
    divisor = reduction_divisor(reduction, targets, ignore_index)
    out, row_stats = fused_cross_entropy(
        logits3d, targets, divisor, ignore_index,
        reduce=reduction != "none", inplace=inplace_backward, validate=validate, backend=backend, spec=spec,
    )
    out = out.reshape(target.shape) if reduction == "none" else out
    return make_output(out, row_stats, divisor, reduction != "none", spec, target.shape) if return_stats else out
