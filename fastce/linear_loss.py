"""The fused-linear loss API: ``linear_cross_entropy`` and ``causal_lm_linear_loss`` (the lm_head and the loss in one
op; the work is in ``fastce/linear.py``). Shifting, normalisation, argument checks and the skipping of ignored rows
live here; the kernels and the slab loop stay unaware."""
from __future__ import annotations

import torch
from torch import Tensor

from .api import (check_linear, divisor_of, kept_rows, make_output, reduction_divisor, shift_targets,
                  to_every_row)
from .backends import resolve_linear_backend
from .function import _sum_over
from .linear import LinearCrossEntropyFunction, linear_stats_impl
from .spec import LossSpec, make_spec
from .stats import finish
from .validation import start_validation


def fused_linear_loss(input2d: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, divisor: Tensor,
                      ignore_index: int, *, reduce: bool, validate: bool, backend: str, spec: LossSpec
                      ) -> tuple[Tensor, Tensor]:
    """``(loss, row_stats)`` of aligned rows ``input2d`` ``[N, D]`` / ``targets`` ``[N]`` (as ``fused_cross_entropy``).

    Rows whose target is ignored cost no GEMM work: their indices are read where the label check makes the host wait
    anyway (``validate=True``, eager). With ``validate=False`` or under torch.compile nothing is read back (no host
    synchronisation: CUDA graphs), and ignored rows go through the GEMMs with a zero gradient.
    """
    vocab = weight.shape[0]
    targets = targets.long() if targets.dtype not in (torch.int32, torch.int64) else targets
    pending = None
    kept = None
    if validate and not torch.compiler.is_compiling():
        pending = start_validation(True, targets, vocab, ignore_index, divisor)
        kept = kept_rows(targets, ignore_index)  # waits for the GPU: the check's answer is in too
        if pending is not None:
            pending.check()
    rows_input, rows_targets = (input2d, targets) if kept is None else (input2d[kept], targets[kept])
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input2d, weight, bias))
    if needs_grad:
        out, row_stats = LinearCrossEntropyFunction.apply(rows_input, weight, bias, rows_targets, divisor,
                                                          ignore_index, reduce, backend, spec)
    else:
        merged = linear_stats_impl(rows_input.detach(), weight.detach(), None if bias is None else bias.detach(),
                                   rows_targets, ignore_index, backend, spec.softcap, spec.label_smoothing,
                                   spec.z_loss, spec.stats)
        losses, row_stats = finish(merged, rows_targets, vocab, ignore_index, spec)
        out = _sum_over(losses, divisor) if reduce else losses
    return to_every_row(out, row_stats, kept, targets.numel(), reduce, spec)


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool = True,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_stats: bool = False,
    process_group=None,
):
    """``F.cross_entropy(F.linear(input, weight, bias), target, ...)`` without ever holding the ``[N, V]`` logits.

    The counterpart of ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13; positionally the same:
    ``input, linear_weight, target``).

    Args:
        input: ``[N, D]`` or ``[B, T, D]`` float16/bfloat16/float32 (e.g. the last hidden states).
        weight: ``[V, D]`` of the input's dtype (e.g. ``lm_head.weight``).
        target: ``[N]`` or ``[B, T]`` integer class per row, aligned with ``input`` (no shift), or ``ignore_index``.
        bias: optional ``[V]``.
        reduction: ``"mean"`` over non-ignored targets (0 when there are none), ``"sum"``, or ``"none"`` (float32
            per row, 0 on ignored rows; its gradient is exact for any upstream gradient).
        backend, validate, softcap, label_smoothing, z_loss, return_stats, process_group: as in
            ``fastce.causal_lm_loss``. With ``process_group`` the weight is this rank's shard of the vocabulary.

    Gradients flow to ``input``, ``weight`` and ``bias``, each in its own dtype, and only to those that require
    them; under ``torch.no_grad()`` only the loss is computed (one GEMM). Memory above the inputs: the gradients,
    one vocabulary slab of logits (128 MiB) and an ``[N, D]`` float32 accumulator.

    Example::

        loss = fastce.linear_cross_entropy(hidden.view(-1, D), lm_head.weight, targets.view(-1))
    """
    spec = make_spec(softcap, label_smoothing, z_loss, return_stats)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if process_group is not None:  # checks its arguments itself, so that every rank raises the same error
        from . import distributed

        return distributed.linear_cross_entropy(input, weight, target, bias, ignore_index, reduction,
                                                process_group=process_group, backend=backend, validate=validate,
                                                spec=spec)
    check_linear(input, weight, bias, target, "target")
    target = target.to(input.device)
    backend = resolve_linear_backend(backend, input)
    flat_targets = target.reshape(-1)
    divisor = reduction_divisor(reduction, flat_targets, ignore_index)
    out, row_stats = fused_linear_loss(input.reshape(-1, input.shape[-1]), weight, bias, flat_targets, divisor,
                                       ignore_index, reduce=reduction != "none", validate=validate, backend=backend,
                                       spec=spec)
    out = out.reshape(target.shape) if reduction == "none" else out
    return make_output(out, row_stats, divisor, reduction != "none", spec, target.shape) if return_stats else out


def causal_lm_linear_loss(
    hidden_states: Tensor,
    weight: Tensor,
    labels: Tensor,
    vocab_size: int | None = None,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    backend: str = "auto",
    validate: bool = True,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_stats: bool = False,
    process_group=None,
    **kwargs,
):
    """transformers' ``ForCausalLMLoss(F.linear(hidden_states, weight, bias), labels, ...)``, fused: the logits are
    never held. Position ``t`` of ``hidden_states`` predicts ``labels[..., t + 1]`` (no shift with ``shift_labels``);
    the shift is index arithmetic on the labels, never a copy of the hidden states. ``num_items_in_batch`` and every
    other argument as in ``fastce.causal_lm_loss``: k micro-batches with the step's count equal one batch.

    Args:
        hidden_states: ``[B, T, D]`` (or ``[T, D]``), the input of the lm_head.
        weight: ``[V, D]``, the lm_head's weight (``vocab_size``, if given, must equal V, or the whole vocabulary
            with ``process_group``); ``bias``: its optional ``[V]`` bias.

    Returns:
        A float32 scalar, or a ``fastce.LossOutput`` with ``return_stats=True``.

    Example::

        loss = fastce.causal_lm_linear_loss(outputs.hidden_states[-1], model.lm_head.weight, labels,
                                            num_items_in_batch=num_items)
    """
    spec = make_spec(softcap, label_smoothing, z_loss, return_stats)
    if shift_labels is None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
        if isinstance(hidden_states, Tensor):
            labels = labels.to(hidden_states.device)
        targets, name = shift_targets(labels, ignore_index), "labels"
    else:
        targets, name = shift_labels, "shift_labels"
    if process_group is not None:  # checks its arguments itself, so that every rank raises the same error
        from . import distributed

        return distributed.causal_lm_linear_loss(hidden_states, weight, targets, vocab_size, num_items_in_batch,
                                                 ignore_index, bias=bias, process_group=process_group,
                                                 backend=backend, validate=validate, spec=spec)
    check_linear(hidden_states, weight, bias, targets, name)
    if vocab_size is not None and vocab_size != weight.shape[0]:
        raise ValueError(f"vocab_size={vocab_size} does not match the weight's {weight.shape[0]} rows")
    targets = targets.to(hidden_states.device)
    backend = resolve_linear_backend(backend, hidden_states)
    flat_targets = targets.reshape(-1)
    divisor = divisor_of(num_items_in_batch, flat_targets, ignore_index)
    loss, row_stats = fused_linear_loss(hidden_states.reshape(-1, hidden_states.shape[-1]), weight, bias,
                                        flat_targets, divisor, ignore_index, reduce=True, validate=validate,
                                        backend=backend, spec=spec)
    return make_output(loss, row_stats, divisor, True, spec, targets.shape) if return_stats else loss
