"""Triton kernels of the Triton backend, each a composition of the building blocks in ``triton_blocks.py``; the
launchers that choose among them are in ``triton_ce.py`` (its docstring says which runs when).

Pointer arguments are commented on the first kernel that takes them. Option scalars (unused unless their flag is
set): ``softcap`` and ``softcap_k`` (-2 log2(e) / softcap), ``label_smoothing`` (e), ``smoothing_per_class`` (e / V),
``target_coefficient`` (1 - e + e / V, rounded once on the host), ``z_loss``. The flags and LEAN are described in
``triton_blocks.py``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_blocks import (
    _chunk_sums,
    _grad_scale,
    _grad_terms,
    _max_shift,
    _read_target,
    _merge_stats,
    _row_offsets,
    _row_stats,
    _skipped,
    _softcapped,
    _store_ignored_row,
    _store_row,
    _store_stats,
    _target_logit,
    _write_grad,
    _write_target_grad,
    _write_zeros,
)


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr,  # *[B, T, V] fp16/bf16/fp32 input; unit stride over V
    logits_stride_b,  # elements between batches of logits
    logits_stride_t,  # elements between rows of logits
    targets_ptr,  # *[B, T] int32/int64 class per row, or ignore_index
    targets_stride_b,
    targets_stride_t,
    divisor_ptr,  # *[] fp64: the gradient is divided by it (NaN where it is 0)
    losses_ptr,  # *[B*T] fp32 output, contiguous
    grad_ptr,  # *[B, T, V] output in the logits' dtype (may be logits_ptr: in-place); unused unless COMPUTE_GRAD
    grad_stride_b,
    grad_stride_t,
    row_stats_ptr,  # *[B*T, 3] fp32 output (lse, entropy, correct), contiguous; unused unless STATS
    seq_len,  # T
    vocab_size,  # V
    ignore_index,
    skip_ptr,  # *[] bool: when it holds True the program writes nothing; unused unless HAS_SKIP
    softcap, softcap_k, label_smoothing, smoothing_per_class, target_coefficient, z_loss,  # options' scalars
    BLOCK_V: tl.constexpr,  # vocabulary chunk streamed per step; SINGLE_CHUNK: the whole row
    SINGLE_CHUNK: tl.constexpr,  # V <= BLOCK_V: keep the row in registers (one read, one exp per element)
    COMPUTE_GRAD: tl.constexpr,  # False: loss only (no_grad / evaluation)
    NUM_STAGES: tl.constexpr,  # chunks of a row in flight in the streaming loops
    CACHE_HINTS: tl.constexpr,  # L2 eviction hints in the streaming loops (see _row_stats)
    HAS_SKIP: tl.constexpr,
    SOFTCAP: tl.constexpr,  # the options (see triton_blocks)
    LABEL_SMOOTHING: tl.constexpr,
    Z_LOSS: tl.constexpr,
    STATS: tl.constexpr,
    LEAN: tl.constexpr,  # leaner forms of the same arithmetic (triton_blocks' docstring): set with any option
):
    row = tl.program_id(0).to(tl.int64)
    row_logits_ptr = logits_ptr + _row_offsets(row, seq_len, logits_stride_b, logits_stride_t)
    row_grad_ptr = grad_ptr + _row_offsets(row, seq_len, grad_stride_b, grad_stride_t)
    target = tl.load(targets_ptr + _row_offsets(row, seq_len, targets_stride_b, targets_stride_t)).to(tl.int64)
    if _skipped(skip_ptr, HAS_SKIP):
        pass
    elif target == ignore_index:
        _store_ignored_row(losses_ptr, row_stats_ptr, row, STATS)
        if COMPUTE_GRAD:
            _write_zeros(row_grad_ptr, 0, vocab_size, BLOCK_V)
    elif SINGLE_CHUNK:
        cols = tl.arange(0, BLOCK_V)
        mask = cols < vocab_size
        x = tl.load(row_logits_ptr + cols, mask=mask, other=-float("inf")).to(tl.float32)
        slope = x
        if SOFTCAP:
            x, slope = _softcapped(x, softcap, softcap_k)
            x = tl.where(mask, x, -float("inf"))
        row_max = tl.max(x, axis=0)
        exps, row_sum, sum_x, r = _chunk_sums(x, mask, _max_shift(row_max), LABEL_SMOOTHING, STATS, LEAN)
        target_logit, valid = _target_logit(row_logits_ptr, target, vocab_size, softcap, softcap_k, SOFTCAP)
        log_sum = tl.log(row_sum)
        _store_row(losses_ptr, row_stats_ptr, row, row_max, row_sum, log_sum, target_logit, valid, sum_x, r,
                   vocab_size, label_smoothing, z_loss, LABEL_SMOOTHING, Z_LOSS, STATS)
        lse = row_max + log_sum
        if COMPUTE_GRAD:
            grad_scale = _grad_scale(divisor_ptr)
            z_factor = 2.0 * z_loss * lse
            if LEAN:  # the one-hot term afterwards, as in _write_grad
                target_x, here = _read_target(row_logits_ptr, target, 0, vocab_size)
                is_target = False
            else:
                is_target = cols == target
            grad = _grad_terms(exps * (1.0 / row_sum), is_target, slope, grad_scale, z_factor, target_coefficient,
                               smoothing_per_class, SOFTCAP, LABEL_SMOOTHING, Z_LOSS)
            tl.store(row_grad_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
            if LEAN:
                _write_target_grad(row_grad_ptr, target, here, target_x, lse, grad_scale, z_factor,
                                   target_coefficient, smoothing_per_class, softcap, softcap_k, SOFTCAP,
                                   LABEL_SMOOTHING, Z_LOSS)
    else:
        row_max, row_sum, sum_x, r = _row_stats(row_logits_ptr, 0, vocab_size, softcap, softcap_k, BLOCK_V,
                                                NUM_STAGES, CACHE_HINTS, SOFTCAP, LABEL_SMOOTHING, STATS, LEAN)
        target_logit, valid = _target_logit(row_logits_ptr, target, vocab_size, softcap, softcap_k, SOFTCAP)
        log_sum = tl.log(row_sum)
        _store_row(losses_ptr, row_stats_ptr, row, row_max, row_sum, log_sum, target_logit, valid, sum_x, r,
                   vocab_size, label_smoothing, z_loss, LABEL_SMOOTHING, Z_LOSS, STATS)
        lse = row_max + log_sum
        if COMPUTE_GRAD:
            _write_grad(row_logits_ptr, row_grad_ptr, 0, vocab_size, lse, target, _grad_scale(divisor_ptr),
                        2.0 * z_loss * lse, target_coefficient, smoothing_per_class, softcap, softcap_k,
                        BLOCK_V, NUM_STAGES, CACHE_HINTS, SOFTCAP, LABEL_SMOOTHING, Z_LOSS, LEAN)


@triton.jit
def _range_stats_kernel(
    logits_ptr,  # *[B, T, W] input, as in _cross_entropy_fwd_kernel: the columns [vocab_start, vocab_start + W)
    logits_stride_b,
    logits_stride_t,
    targets_ptr,  # *[B, T] targets in whole-row ids
    targets_stride_b,
    targets_stride_t,
    stats_ptr,  # *[B*T, NUM_SPLITS, 5] fp32 out: the statistics of each split of each row (fastce/stats.py)
    seq_len,
    width,  # W
    split_len,  # columns per split, a multiple of BLOCK_V
    vocab_start,
    ignore_index,
    softcap, softcap_k,
    NUM_SPLITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    CACHE_HINTS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SUM_X: tl.constexpr,  # also sum x' (label smoothing)
    SUM_PX: tl.constexpr,  # also sum exp(x' - m)(x' - m) (the entropy)
    LEAN: tl.constexpr,
):
    """Statistics of one split of a row: the split path's partials, and shard_stats. An ignored row is not read: it
    gets the identity of the merge (-inf, 0, 0, 0, 0)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    out_ptr = stats_ptr + (row * NUM_SPLITS + split) * 5
    target = tl.load(targets_ptr + _row_offsets(row, seq_len, targets_stride_b, targets_stride_t)).to(tl.int64)
    if target == ignore_index:
        _store_stats(out_ptr, -float("inf"), 0.0, 0.0, 0.0, 0.0)
    else:
        lo = split * split_len
        hi = tl.minimum(lo + split_len, width)
        row_logits_ptr = logits_ptr + _row_offsets(row, seq_len, logits_stride_b, logits_stride_t)
        split_max, split_sum, sum_x, r = _row_stats(row_logits_ptr, lo, hi, softcap, softcap_k, BLOCK_V, NUM_STAGES,
                                                    CACHE_HINTS, SOFTCAP, SUM_X, SUM_PX, LEAN)
        target_logit, _ = _target_logit(row_logits_ptr + lo, target - vocab_start - lo, hi - lo, softcap, softcap_k,
                                        SOFTCAP)
        _store_stats(out_ptr, split_max, split_sum, target_logit, sum_x, r)


@triton.jit
def _merge_stats_kernel(
    parts_ptr,  # *[B*T, NUM_PARTS, 5] fp32: statistics of the splits of each row (_range_stats_kernel)
    stats_ptr,  # *[B*T, 5] fp32 out: merged
    NUM_PARTS: tl.constexpr,
    PARTS_POW2: tl.constexpr,  # NUM_PARTS rounded up to a power of two (tl.arange needs one)
    SUM_X: tl.constexpr,
    SUM_PX: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_max, row_sum, target_logit, sum_x, r = _merge_stats(parts_ptr + row * NUM_PARTS * 5, NUM_PARTS, PARTS_POW2,
                                                            SUM_X, SUM_PX)
    _store_stats(stats_ptr + row * 5, row_max, row_sum, target_logit, sum_x, r)


@triton.jit
def _split_finish_kernel(
    logits_ptr,  # *[B, T, V] input
    logits_stride_b,
    logits_stride_t,
    targets_ptr,  # *[B, T] targets
    targets_stride_b,
    targets_stride_t,
    divisor_ptr,  # *[] fp64
    losses_ptr,  # *[B*T] fp32 out (written by split 0)
    grad_ptr,  # *[B, T, V] gradient out (may alias logits)
    grad_stride_b,
    grad_stride_t,
    row_stats_ptr,  # *[B*T, 3] fp32 out (written by split 0); unused unless STATS
    partials_ptr,  # *[B*T, NUM_SPLITS, 5] from _range_stats_kernel (it read the target logit: in-place safe)
    seq_len,
    vocab_size,
    split_len,
    ignore_index,
    skip_ptr,  # as in _cross_entropy_fwd_kernel
    softcap, softcap_k, label_smoothing, smoothing_per_class, target_coefficient, z_loss,
    NUM_SPLITS: tl.constexpr,
    SPLITS_POW2: tl.constexpr,  # NUM_SPLITS rounded up to a power of two (tl.arange needs one)
    BLOCK_V: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    CACHE_HINTS: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    SOFTCAP: tl.constexpr,
    LABEL_SMOOTHING: tl.constexpr,
    Z_LOSS: tl.constexpr,
    STATS: tl.constexpr,
    LEAN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_logits_ptr = logits_ptr + _row_offsets(row, seq_len, logits_stride_b, logits_stride_t)
    row_grad_ptr = grad_ptr + _row_offsets(row, seq_len, grad_stride_b, grad_stride_t)
    target = tl.load(targets_ptr + _row_offsets(row, seq_len, targets_stride_b, targets_stride_t)).to(tl.int64)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, vocab_size)
    if _skipped(skip_ptr, HAS_SKIP):
        pass
    elif target == ignore_index:
        if split == 0:
            _store_ignored_row(losses_ptr, row_stats_ptr, row, STATS)
        if COMPUTE_GRAD:
            _write_zeros(row_grad_ptr, lo, hi, BLOCK_V)
    else:
        # Every program of the row merges the same partials in the same order: identical bits.
        row_max, row_sum, target_logit, sum_x, r = _merge_stats(partials_ptr + row * NUM_SPLITS * 5, NUM_SPLITS,
                                                                SPLITS_POW2, LABEL_SMOOTHING, STATS)
        log_sum = tl.log(row_sum)
        if split == 0:
            valid = (target >= 0) & (target < vocab_size)
            _store_row(losses_ptr, row_stats_ptr, row, row_max, row_sum, log_sum, target_logit, valid, sum_x, r,
                       vocab_size, label_smoothing, z_loss, LABEL_SMOOTHING, Z_LOSS, STATS)
        if COMPUTE_GRAD:
            lse = row_max + log_sum
            _write_grad(row_logits_ptr, row_grad_ptr, lo, hi, lse, target, _grad_scale(divisor_ptr),
                        2.0 * z_loss * lse, target_coefficient, smoothing_per_class, softcap, softcap_k,
                        BLOCK_V, NUM_STAGES, CACHE_HINTS, SOFTCAP, LABEL_SMOOTHING, Z_LOSS, LEAN)


@triton.jit
def _range_grad_kernel(
    logits_ptr,  # *[B, T, W] input: the columns [vocab_start, vocab_start + W) of whole rows of V
    logits_stride_b,
    logits_stride_t,
    targets_ptr,  # *[B, T] targets in whole-row ids
    targets_stride_b,
    targets_stride_t,
    row_ptr,  # *[B*T, 3] fp32: (m, s, scale) of each whole row
    grad_ptr,  # *[B, T, W] gradient out (may alias logits)
    grad_stride_b,
    grad_stride_t,
    seq_len,
    width,
    split_len,  # columns per program, a multiple of BLOCK_V
    vocab_start,
    ignore_index,
    softcap, softcap_k, smoothing_per_class, target_coefficient, z_loss,
    BLOCK_V: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    SOFTCAP: tl.constexpr,
    LABEL_SMOOTHING: tl.constexpr,
    Z_LOSS: tl.constexpr,
    LEAN: tl.constexpr,
):
    """shard_grad: the gradient epilogue on one split of a row, in one pass (the statistics are given)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_grad_ptr = grad_ptr + _row_offsets(row, seq_len, grad_stride_b, grad_stride_t)
    target = tl.load(targets_ptr + _row_offsets(row, seq_len, targets_stride_b, targets_stride_t)).to(tl.int64)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, width)
    if target == ignore_index:
        _write_zeros(row_grad_ptr, lo, hi, BLOCK_V)
    else:
        row_logits_ptr = logits_ptr + _row_offsets(row, seq_len, logits_stride_b, logits_stride_t)
        row_max = tl.load(row_ptr + row * 3)
        row_sum = tl.load(row_ptr + row * 3 + 1)
        scale = tl.load(row_ptr + row * 3 + 2)
        lse = row_max + tl.log(row_sum)
        _write_grad(row_logits_ptr, row_grad_ptr, lo, hi, lse, target - vocab_start, scale, 2.0 * z_loss * lse,
                    target_coefficient, smoothing_per_class, softcap, softcap_k, BLOCK_V, NUM_STAGES, False, SOFTCAP,
                    LABEL_SMOOTHING, Z_LOSS, LEAN)


@triton.jit
def _scale_grad_kernel(
    grad_ptr,  # *[B, T, V] gradient, scaled in place; unit stride over V
    grad_stride_b,
    grad_stride_t,
    factor_ptr,  # *[B, T] fp32 factor per row (strides 0 for a single factor)
    factor_stride_b,
    factor_stride_t,
    seq_len,
    vocab_size,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    factor = tl.load(factor_ptr + _row_offsets(row, seq_len, factor_stride_b, factor_stride_t))
    # grad_output is almost always exactly 1: then each program reads one scalar and leaves.
    if factor != 1.0:
        row_grad_ptr = grad_ptr + _row_offsets(row, seq_len, grad_stride_b, grad_stride_t)
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, vocab_size, BLOCK_V):
            offs = start + cols
            mask = offs < vocab_size
            g = tl.load(row_grad_ptr + offs, mask=mask).to(tl.float32)
            tl.store(row_grad_ptr + offs, (g * factor).to(grad_ptr.dtype.element_ty), mask=mask)
