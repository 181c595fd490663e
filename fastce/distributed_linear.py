"""The fused lm_head over a vocabulary shard of its weight (``fastce.linear_cross_entropy`` and
``causal_lm_linear_loss`` with ``process_group=``): the hidden states are replicated, each rank holds the rows
``[start, start + Vs)`` of the weight (and bias). Forward: this shard's statistics slab by slab
(``linear.linear_stats_impl`` with ``vocab_start``), one ``all_gather`` of ``[N, 5]``, the merge. Backward: the
shard's gradients (``linear.linear_grads_impl`` with ``vocab_start`` and the whole vocabulary's size), and one
``all_reduce`` of the hidden states' partial gradients. See ``fastce/distributed.py`` for the whole story.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .backends import resolve_linear_backend
from .distributed_meta import Call, Shard, call_facts, checked_group, merged_stats, row_scale, run_checks, shard_of
from .function import _sum_over
from .linear import linear_grads, linear_grads_impl, linear_stats, linear_stats_impl
from .api import check_linear, divisor_of, kept_rows, make_output, reduction_divisor, to_every_row
from .spec import PLAIN, LossSpec
from .stats import finish


def _op(op, impl):
    """The custom op under torch.compile, its implementation in eager mode (as ``linear.py`` does)."""
    return op if torch.compiler.is_compiling() else impl


def _loss_of_shard(input, weight, bias, targets, divisor, ignore_index, reduce, backend, spec, shard):
    """``(loss or row losses, row_stats or an empty tensor, merged statistics)``: one ``all_gather``."""
    local = _op(linear_stats, linear_stats_impl)(input, weight, bias, targets, ignore_index, backend, spec.softcap,
                                                 spec.label_smoothing, spec.z_loss, spec.stats, shard.start)
    merged = merged_stats(local, shard.group)
    losses, row_stats = finish(merged, targets, shard.total, ignore_index, spec)
    row_stats = losses.new_empty(0) if row_stats is None else row_stats
    return (_sum_over(losses, divisor) if reduce else losses), row_stats, merged


class VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """``(loss, row_stats)`` of ``input @ weight.T + bias`` with ``weight`` / ``bias`` this rank's vocabulary shard."""

    @staticmethod
    def forward(ctx, input, weight, bias, targets, divisor, ignore_index, reduce, backend, spec, shard,
                reduce_input_grad):
        out, row_stats, merged = _loss_of_shard(input, weight, bias, targets, divisor, ignore_index, reduce, backend,
                                                spec, shard)
        ctx.save_for_backward(input, weight, bias, targets, merged[:, :2], divisor)
        ctx.config = (ignore_index, reduce, backend, spec, shard, reduce_input_grad)
        ctx.mark_non_differentiable(row_stats)
        return out, row_stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_row_stats):
        input, weight, bias, targets, m_s, divisor = ctx.saved_tensors
        ignore_index, reduce, backend, spec, shard, reduce_input_grad = ctx.config
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        row = torch.cat((m_s, row_scale(grad_output, divisor, reduce, targets.shape).unsqueeze(-1)), dim=-1)
        grad_input, grad_weight, grad_bias = _op(linear_grads, linear_grads_impl)(
            input, weight, bias, targets, row.contiguous(), ignore_index, backend, need_input, need_weight,
            bool(need_bias and bias is not None), spec.softcap, spec.label_smoothing, spec.z_loss, shard.start,
            shard.total)
        if need_input and reduce_input_grad:
            # Summed in float32: each partial was rounded once to the input's dtype, the sum is rounded once more
            # (not once per rank), and every rank gets the same bits.
            total = grad_input.float()  # a new tensor either way: linear_grads allocated it
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=shard.group)
            grad_input = total.to(input.dtype)
        return (grad_input if need_input else None, grad_weight if need_weight else None,
                grad_bias if need_bias else None, *(None,) * 8)


def _check(input, weight, bias, targets, name, vocab_size, num_items_in_batch, ignore_index, reduction, backend, spec,
           reduce_input_grad):
    check_linear(input, weight, bias, targets, name)
    targets = targets.to(input.device)
    flat = targets.reshape(-1)
    flat = flat if flat.dtype in (torch.int32, torch.int64) else flat.long()
    if reduction is None:  # causal_lm_linear_loss
        divisor = divisor_of(num_items_in_batch, flat, ignore_index)
    else:
        divisor = reduction_divisor(reduction, flat, ignore_index)
    # Whether backward all-reduces: it must be the same on every rank (the metadata compares it).
    input_grad = torch.is_grad_enabled() and input.requires_grad and reduce_input_grad
    facts = call_facts(weight.shape[0], targets.shape, vocab_size, ignore_index, reduction, spec,
                       hidden=weight.shape[1], input_grad=input_grad)
    return Call(input=input.reshape(-1, input.shape[-1]), weight=weight, bias=bias, targets=flat, divisor=divisor,
                ignore_index=ignore_index, facts=facts, backend=resolve_linear_backend(backend, input),
                shape=targets.shape)


def _sharded_loss(call: Call, shard: Shard, reduce: bool, validate: bool, spec: LossSpec, reduce_input_grad: bool):
    """As ``linear_loss.fused_linear_loss``: with ``validate=True`` ignored rows are left out of the GEMMs (read on
    the host, which waited for the metadata anyway; the same rows on every rank: the targets were compared)."""
    input2d, targets = call.input, call.targets
    kept = kept_rows(targets, call.ignore_index) if validate else None
    rows_input, rows_targets = (input2d, targets) if kept is None else (input2d[kept], targets[kept])
    args = (rows_input, call.weight, call.bias, rows_targets, call.divisor, call.ignore_index, reduce, call.backend,
            spec, shard)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input2d, call.weight, call.bias)):
        out, row_stats = VocabParallelLinearCrossEntropy.apply(*args, reduce_input_grad)
    else:
        with torch.no_grad():
            out, row_stats, _ = _loss_of_shard(*args)
    return to_every_row(out, row_stats, kept, targets.numel(), reduce, spec)


def linear_cross_entropy(input, weight, target, bias=None, ignore_index: int = -100, reduction: str = "mean", *,
                         process_group, backend: str = "auto", validate: bool = True, spec: LossSpec = PLAIN,
                         reduce_input_grad: bool = True):
    """``fastce.linear_cross_entropy`` with ``weight`` ``[Vs, D]`` (and ``bias`` ``[Vs]``) this rank's shard of the
    vocabulary's rows, in rank order over ``process_group`` (``Vs >= 1``, may differ between ranks); ``input``
    ``[N, D]`` / ``[B, T, D]`` and ``target`` the same on every rank; ``spec`` the options.

    The loss is the whole vocabulary's, bitwise the same on every rank (a ``LossOutput`` for ``spec.stats``);
    ``weight`` and ``bias`` get their slices of the unsharded gradients; ``input`` gets the complete gradient on every
    rank (all-reduced in float32), or with ``reduce_input_grad=False`` this shard's partial sum, for a framework whose
    autograd all-reduces it itself (Megatron's ``copy_to_tensor_model_parallel_region``: never both). Collective.
    """
    group = checked_group(process_group)
    call = run_checks(_check, input, weight, bias, target, "target", None, None, ignore_index, reduction, backend,
                      spec, reduce_input_grad)
    shard = shard_of(group, call, validate, "weight")
    reduce = reduction != "none"
    out, row_stats = _sharded_loss(call, shard, reduce, validate, spec, reduce_input_grad)
    out = out if reduce else out.reshape(call.shape)
    return make_output(out, row_stats, call.divisor, reduce, spec, call.shape) if spec.stats else out


def causal_lm_linear_loss(hidden_states, weight, targets, vocab_size=None, num_items_in_batch=None,
                          ignore_index: int = -100, *, bias=None, process_group, backend: str = "auto",
                          validate: bool = True, spec: LossSpec = PLAIN, reduce_input_grad: bool = True):
    """``fastce.causal_lm_linear_loss`` with ``weight`` (and ``bias``) this rank's vocabulary shard. ``targets`` are
    the shifted labels ``[B, T]`` (the API layer shifts them), the same on every rank; ``vocab_size`` (if given) is
    the whole vocabulary. Gradients as in ``linear_cross_entropy`` above. Collective."""
    group = checked_group(process_group)
    call = run_checks(_check, hidden_states, weight, bias, targets, "labels", vocab_size, num_items_in_batch,
                      ignore_index, None, backend, spec, reduce_input_grad)
    shard = shard_of(group, call, validate, "weight")
    loss, row_stats = _sharded_loss(call, shard, True, validate, spec, reduce_input_grad)
    return make_output(loss, row_stats, call.divisor, True, spec, call.shape) if spec.stats else loss
