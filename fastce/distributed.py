"""Vocab-parallel losses (tensor parallel over the vocabulary), and a global token count for data parallelism.

The loss API (``fastce.causal_lm_loss``, ``cross_entropy``, ``linear_cross_entropy``, ``causal_lm_linear_loss``) calls
the functions here when given ``process_group=`` or, for the first two, a DTensor sharded on its last dimension.

**Layout.** The logits' last dimension (or the weight's rows) on each rank is a contiguous shard of the vocabulary,
shards in the group's rank order; shards may be uneven (a logits shard may even be empty, a weight shard may not).
Each rank passes only its own shard: fastce finds the offsets itself. The targets (labels) and, for the fused
lm_head, the hidden states are the same on every rank (replicated).

**Math.** A row's loss needs only its statistics (``fastce/stats.py``): each rank computes those of its columns,
the ranks exchange them (``all_gather`` of ``[N, 5]`` float32) and every rank merges the R parts in rank order, so
the loss and the statistics are bitwise the same on every rank and equal the unsharded ones. The gradient of a
shard needs only the merged ``(max, sum of exps)`` of each row and the upstream gradient: the logits' backward is
local (the epilogue on the saved logits, with the whole vocabulary's V for z-loss and label smoothing).

**Collectives per call** (N rows, R ranks, D hidden size); none is O(N * V):

========================================  ==============================================================
forward, ``validate=True``                 1 ``all_gather`` of R x 21 int64 (the metadata), 1 ``all_gather``
                                           of R x N x 5 float32 (the statistics)
forward, ``validate=False``                the statistics' ``all_gather`` only (the first call of a group and
                                           shard size also exchanges the metadata, once: offsets are cached)
backward, logits                           none
backward, fused lm_head                    1 ``all_reduce`` of N x D float32 (the hidden states' gradient)
an error found by a rank's own checks      1 more ``all_gather`` of R x 1024 bytes (its message), then raise
========================================  ==============================================================

**Errors.** With ``validate=True`` every rank raises the same error, and none is left waiting in a collective, for
input that does not fit together: shards that do not add up to ``vocab_size``, targets of different shapes or values
across ranks, a target outside ``[0, V)`` on any rank, different options or ``num_items_in_batch``, and a rank whose
own checks failed (a non-tensor argument, a wrong dtype: the message names the rank). The gathered metadata is read
back to the host, one synchronisation, as the label check of the unsharded loss makes (the fused lm_head then reads
which rows are ignored, to skip them, as the unsharded one does). With ``validate=False`` no metadata is exchanged
once a group's offsets are cached: no host synchronisation, but a rank whose own checks fail raises alone (the others
wait in the next collective until the group's timeout), a bad target gives a NaN loss, and the shard sizes must stay
what they were at the first call.

**The hidden states' gradient** (fused lm_head): each shard contributes a partial ``grad_input``; fastce all-reduces
it (in float32), so it comes back complete on every rank. A tensor-parallel framework whose own autograd already
all-reduces the input's gradient (Megatron's ``copy_to_tensor_model_parallel_region``, the identity forward / all-reduce
backward in front of a ``ColumnParallelLinear``; or a sequence-parallel gather whose backward reduce-scatters) must
not get a second all-reduce: give fastce the hidden states *before* that region, in place of the output layer (the
all-reduce is then fastce's), or keep the region and call ``fastce.distributed.linear_cross_entropy`` /
``causal_lm_linear_loss`` with ``reduce_input_grad=False`` (then each rank's gradient is its shard's partial sum).

**DTensor** logits with a ``Shard(-1)`` placement (what ``loss_parallel`` consumes, e.g. from a ``ColwiseParallel``
lm_head with ``use_local_output=False``) are unpacked by ``unpack_dtensor``: the local shard (``to_local()`` is
differentiable, so the gradient reaches the DTensor) and the process group of that mesh dimension. The loss comes
back as a plain tensor, the same on every rank.

**Data parallel**: ``global_num_items`` (below).

Eager mode only (not traced by torch.compile: the offsets are Python integers read from the metadata). The files:
this one (DTensor, the logits' autograd function, the data-parallel count), ``distributed_linear.py`` (the fused
lm_head), ``distributed_meta.py`` (the per-call protocol: metadata, errors, offsets, the statistics' exchange).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from .backends import resolve_backend
from .distributed_linear import causal_lm_linear_loss, linear_cross_entropy
from .distributed_meta import (Call, Shard, call_facts, checked_group, comm_device, is_dtensor, merged_stats,
                               row_scale, run_checks, shard_of)
from .function import _sum_over
from .api import as_rows, check_integer, divisor_of, make_output, reduction_divisor, shift_targets
from .shard_ops import run_shard_grad, run_shard_stats
from .spec import PLAIN, LossSpec
from .stats import STATS_FIELDS, finish

__all__ = ["causal_lm_loss", "cross_entropy", "linear_cross_entropy", "causal_lm_linear_loss", "global_num_items",
           "unpack_dtensor"]


# --- DTensor ----------------------------------------------------------------------------------------------------

def unpack_dtensor(logits):
    """``(local logits, process group)`` for a DTensor sharded on its last dimension; ``(logits, None)`` for anything
    that is not a DTensor. Raises ``ValueError`` for a DTensor laid out otherwise (it must be ``Shard(-1)`` on exactly
    one mesh dimension and ``Replicate()`` on the others). ``to_local()`` is differentiable: the gradient of the
    local shard reaches the DTensor."""
    if not is_dtensor(logits):
        return logits, None
    last = logits.dim() - 1
    sharded = [i for i, p in enumerate(logits.placements) if p.is_shard() and p.dim % logits.dim() == last]
    others = [p for i, p in enumerate(logits.placements) if i not in sharded and not p.is_replicate()]
    if len(sharded) != 1 or others:
        raise ValueError(
            "fastce takes DTensor logits sharded on the vocabulary (last) dimension, Shard(-1), on one mesh dimension "
            f"and replicated on the others (loss_parallel's layout), got placements {tuple(logits.placements)}"
        )
    return logits.to_local(), logits.device_mesh.get_group(sharded[0])


def _plain(targets):
    """Labels given as a DTensor (replicated, as loss_parallel takes them) as a plain tensor."""
    return targets.full_tensor() if is_dtensor(targets) else targets


def _group_of(logits, process_group):
    """``(local logits, group)``: a DTensor's local shard and its mesh group, or ``logits`` and ``process_group``."""
    local, mesh_group = unpack_dtensor(logits)
    if mesh_group is not None and process_group is not None and \
            dist.get_process_group_ranks(mesh_group) != dist.get_process_group_ranks(process_group):
        raise ValueError("process_group is not the process group of the DTensor logits' vocabulary dimension")
    return local, checked_group(process_group if process_group is not None else mesh_group)


# --- logits shards --------------------------------------------------------------------------------------------------

def _logits_rows(logits, targets, name: str):
    """``api.as_rows`` for a shard: ``[B, T, Vs]`` logits (``Vs`` may be 0) and ``[B, T]`` targets, as views."""
    logits, targets = as_rows(logits, targets, name, shard=True)
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError(f"logits must have unit stride over the vocabulary, got strides {logits.stride()}")
    return logits, targets


def _check_logits(logits, targets, name, vocab_size, num_items_in_batch, ignore_index, reduction, backend, spec):
    logits3d, targets3d = _logits_rows(logits, targets, name)
    if reduction is None:  # causal_lm_loss
        divisor = divisor_of(num_items_in_batch, targets3d, ignore_index)
    else:
        divisor = reduction_divisor(reduction, targets3d, ignore_index)
    facts = call_facts(logits3d.shape[-1], targets.shape, vocab_size, ignore_index, reduction, spec)
    return Call(logits=logits3d, targets=targets3d, divisor=divisor, ignore_index=ignore_index, facts=facts,
                backend=resolve_backend(backend, logits3d), shape=targets.shape)


def _loss_of_shard(logits, targets, divisor, ignore_index, reduce, backend, spec, shard):
    """``(loss or row losses, row_stats or an empty tensor, merged statistics)``: one ``all_gather``."""
    if shard.size == 0:  # an empty shard: the merge's identity on every row
        identity = torch.tensor([float("-inf"), 0.0, 0.0, 0.0, 0.0], device=logits.device)
        local = identity.expand(*targets.shape, STATS_FIELDS).contiguous()
    else:
        local = run_shard_stats(logits, targets, shard.start, ignore_index, backend, spec)
    merged = merged_stats(local, shard.group)
    losses, row_stats = finish(merged, targets, shard.total, ignore_index, spec)
    row_stats = losses.new_empty(0) if row_stats is None else row_stats
    return (_sum_over(losses, divisor) if reduce else losses), row_stats, merged


class VocabParallelCrossEntropy(torch.autograd.Function):
    """``(loss, row_stats)`` of a vocabulary shard of logits: the statistics in forward (one ``all_gather``), the
    epilogue on the saved logits in backward (no communication)."""

    @staticmethod
    def forward(ctx, logits, targets, divisor, ignore_index, reduce, backend, spec, shard):
        out, row_stats, merged = _loss_of_shard(logits, targets, divisor, ignore_index, reduce, backend, spec, shard)
        ctx.save_for_backward(logits, targets, merged[..., :2], divisor)
        ctx.config = (ignore_index, reduce, backend, spec, shard)
        ctx.mark_non_differentiable(row_stats)
        return out, row_stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_row_stats):
        logits, targets, m_s, divisor = ctx.saved_tensors
        ignore_index, reduce, backend, spec, shard = ctx.config
        row = torch.cat((m_s, row_scale(grad_output, divisor, reduce, targets.shape).unsqueeze(-1)), dim=-1)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        if grad.numel():
            run_shard_grad(logits, targets, shard.start, shard.total, ignore_index, row.contiguous(), grad, backend,
                           spec)
        return grad, None, None, None, None, None, None, None


def _sharded_loss(call: Call, shard: Shard, reduce: bool, spec: LossSpec):
    args = (call.logits, call.targets, call.divisor, call.ignore_index, reduce, call.backend, spec, shard)
    if torch.is_grad_enabled() and call.logits.requires_grad:
        return VocabParallelCrossEntropy.apply(*args)
    return _loss_of_shard(*args)[:2]


def causal_lm_loss(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels=None, *, process_group, backend: str = "auto", validate: bool = True,
                   spec: LossSpec = PLAIN):
    """``fastce.causal_lm_loss`` of vocab-parallel logits, called by it for ``process_group=`` (or DTensor logits,
    with ``process_group=None``).

    ``logits`` ``[B, T, Vs]`` (or ``[T, Vs]``) is this rank's shard of the vocabulary (columns in rank order over
    ``process_group``; ``Vs`` may differ between ranks, even be 0), ``labels`` / ``shift_labels`` are the same on
    every rank, ``vocab_size`` (if given) is the whole vocabulary, ``spec`` the options. Returns the loss over the
    whole vocabulary, bitwise the same on every rank (a ``LossOutput`` for ``spec.stats``); the gradient of
    ``logits`` is this rank's slice of the unsharded gradient. Collective: every rank of the group must call it.
    """
    logits, group = _group_of(logits, process_group)

    def check():
        if shift_labels is not None:
            return _check_logits(logits, _plain(shift_labels), "shift_labels", vocab_size, num_items_in_batch,
                                 ignore_index, None, backend, spec)
        plain = _plain(labels)
        if not isinstance(plain, Tensor):
            raise TypeError(f"labels must be a tensor, got {type(plain).__name__}")
        plain = plain.to(logits.device) if isinstance(logits, Tensor) else plain
        return _check_logits(logits, shift_targets(plain, ignore_index), "labels", vocab_size, num_items_in_batch,
                             ignore_index, None, backend, spec)

    call = run_checks(check)
    shard = shard_of(group, call, validate, "logits")
    loss, row_stats = _sharded_loss(call, shard, True, spec)
    return make_output(loss, row_stats, call.divisor, True, spec, call.shape) if spec.stats else loss


def cross_entropy(logits, target, ignore_index: int = -100, reduction: str = "mean", *, process_group,
                  backend: str = "auto", validate: bool = True, spec: LossSpec = PLAIN):
    """``fastce.cross_entropy`` of vocab-parallel logits ``[N, Vs]`` / ``[B, T, Vs]`` (this rank's shard) and a
    ``target`` that is the same on every rank; otherwise as ``causal_lm_loss`` above, with ``reduction`` ``"mean"``,
    ``"sum"`` or ``"none"``."""
    logits, group = _group_of(logits, process_group)
    call = run_checks(_check_logits, logits, _plain(target), "target", None, None, ignore_index, reduction, backend,
                      spec)
    shard = shard_of(group, call, validate, "logits")
    reduce = reduction != "none"
    out, row_stats = _sharded_loss(call, shard, reduce, spec)
    out = out if reduce else out.reshape(call.shape)
    return make_output(out, row_stats, call.divisor, reduce, spec, call.shape) if spec.stats else out


# --- data parallel --------------------------------------------------------------------------------------------------

def global_num_items(labels, process_group=None, *, ignore_index: int = -100, shifted: bool = True) -> Tensor:
    """The number of targets (entries other than ``ignore_index``) in ``labels`` -- one tensor, or the list of an
    accumulation step's micro-batches -- summed over the ranks of ``process_group`` (the default group for None): the
    ``num_items_in_batch`` that makes every data-parallel rank divide by the count of the whole global batch.

    ``shifted=True`` counts what ``causal_lm_loss`` sums: ``labels[..., 1:]`` (position 0 predicts nothing); use
    ``shifted=False`` for ``shift_labels`` or ``cross_entropy`` targets. One ``all_reduce`` of one int64, no host
    synchronisation (with NCCL, CPU labels are moved to the GPU and back). Without an initialised process group,
    the local count. Returns a 0-dim int64 tensor on the labels' device, the same on every rank.

    DDP (and FSDP) average the gradients over the R ranks, so scale each micro-batch's loss by R before backward:
    the step's gradient is then exactly that of one batch of all ranks' micro-batches (with ``Trainer`` and
    ``average_tokens_across_devices=True`` transformers does both itself)::

        count = fastce.distributed.global_num_items([mb["labels"] for mb in micro_batches])
        for mb in micro_batches:  # model.no_sync() on all but the last, as usual
            loss = fastce.causal_lm_loss(model(mb["input_ids"]).logits, mb["labels"], num_items_in_batch=count)
            (loss * dist.get_world_size()).backward()
        # the sum over ranks and micro-batches of `loss` is the loss of the whole global batch
    """
    batches = [labels] if isinstance(labels, Tensor) else list(labels)
    if not batches or not all(isinstance(b, Tensor) for b in batches):
        raise TypeError("labels must be a tensor or a non-empty sequence of tensors")
    for b in batches:
        check_integer(b, "labels")
        if shifted and b.dim() == 0:
            raise ValueError("labels must have a sequence dimension (shifted=True)")
    device = batches[0].device
    count = torch.zeros((), dtype=torch.int64, device=device)
    for b in batches:
        count += ((b[..., 1:] if shifted else b) != ignore_index).sum().to(device)
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise RuntimeError("process_group given, but torch.distributed is not initialized")
        return count
    group = dist.group.WORLD if process_group is None else process_group
    total = count.to(comm_device(group))
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total.to(device)
