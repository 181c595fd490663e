"""Triton backend: the loss of each row and, in the same launch, its gradient. Contract: ``fastce/kernels/__init__.py``.

Three shapes of work, chosen by ``_launch_config``:

* single chunk (V <= 16384): a program holds its whole row in registers: one read, one exp per element, one write.
* row path (many rows): a program streams its row twice. Pass 1 keeps an online log-sum-exp (float32) and reads
  the target logit; pass 2 writes ``(softmax - onehot) / divisor``, walking the row backwards so that the chunks
  pass 1 read last, the ones most likely still in L2, are read again first.
* split path (few rows, large V): the vocabulary of a row is cut into splits over several programs. Kernel A
  writes each split's (max, sum of exps); kernel B merges a row's partials in split order (every program of the row
  gets the same bits) and writes its split's gradient; split 0 writes the loss. Kernel A has read everything before
  kernel B writes, so the gradient may overwrite the logits (in-place).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

_NEG_INF = float("-inf")


@triton.jit
def _row_offsets(row, seq_len, stride_b, stride_t):
    """Element offset of row ``row`` (int64) of a [B, T, ...] tensor with the given strides."""
    b = row // seq_len
    return b * stride_b + (row - b * seq_len) * stride_t


@triton.jit
def _chunk_max_sum(x, running_max, running_sum):
    """Fold chunk ``x`` into an online (max, sum of exp(x - max)); a max still at -inf must not give exp(nan)."""
    new_max = tl.maximum(running_max, tl.max(x, axis=0))
    shift = tl.where(new_max == -float("inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
    return new_max, running_sum


@triton.jit
def _max_sum(row_logits_ptr, lo, hi, BLOCK_V: tl.constexpr, NUM_STAGES: tl.constexpr, CACHE_HINTS: tl.constexpr):
    """Online (max, sum of exps) of ``row[lo:hi]``, float32; NUM_STAGES chunks in flight (software pipelining).

    CACHE_HINTS: keep these reads in L2 (evict_last) for pass 2, which reads them once more (evict_first)."""
    cols = tl.arange(0, BLOCK_V)
    running_max = tl.full([], -float("inf"), tl.float32)
    running_sum = tl.zeros([], tl.float32)
    for start in tl.range(lo, hi, BLOCK_V, num_stages=NUM_STAGES):
        offs = start + cols
        if CACHE_HINTS:
            x = tl.load(row_logits_ptr + offs, mask=offs < hi, other=-float("inf"), eviction_policy="evict_last")
        else:
            x = tl.load(row_logits_ptr + offs, mask=offs < hi, other=-float("inf"))
        running_max, running_sum = _chunk_max_sum(x.to(tl.float32), running_max, running_sum)
    return running_max, running_sum


@triton.jit
def _write_grad(row_logits_ptr, row_grad_ptr, lo, hi, lse, target, grad_scale, BLOCK_V: tl.constexpr,
                NUM_STAGES: tl.constexpr, CACHE_HINTS: tl.constexpr):
    """grad[lo:hi] = (exp(x - lse) - onehot(target)) * grad_scale, last chunk first (see the module docstring)."""
    cols = tl.arange(0, BLOCK_V)
    num_chunks = tl.cdiv(hi - lo, BLOCK_V)
    for i in tl.range(num_chunks, num_stages=NUM_STAGES):
        offs = lo + (num_chunks - 1 - i) * BLOCK_V + cols
        mask = offs < hi
        if CACHE_HINTS:  # the last read of these logits, and a gradient nothing reads soon: neither should stay
            x = tl.load(row_logits_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        else:
            x = tl.load(row_logits_ptr + offs, mask=mask, other=0.0)
        prob = tl.exp(x.to(tl.float32) - lse)
        grad = (tl.where(offs == target, prob - 1.0, prob) * grad_scale).to(row_grad_ptr.dtype.element_ty)
        if CACHE_HINTS:
            tl.store(row_grad_ptr + offs, grad, mask=mask, eviction_policy="evict_first")
        else:
            tl.store(row_grad_ptr + offs, grad, mask=mask)


@triton.jit
def _write_zeros(row_grad_ptr, lo, hi, BLOCK_V: tl.constexpr):
    cols = tl.arange(0, BLOCK_V)
    zeros = tl.zeros([BLOCK_V], dtype=row_grad_ptr.dtype.element_ty)
    for start in range(lo, hi, BLOCK_V):
        tl.store(row_grad_ptr + start + cols, zeros, mask=start + cols < hi)


@triton.jit
def _grad_scale(divisor_ptr):
    divisor = tl.load(divisor_ptr)
    return (1.0 / tl.where(divisor == 0, 1.0, divisor)).to(tl.float32)


@triton.jit
def _loss(row_logits_ptr, lse, target, vocab_size):
    """lse - x[target]; an out-of-range target is never read: its row gets NaN, never a silent number."""
    in_range = (target >= 0) & (target < vocab_size)
    target_logit = tl.load(row_logits_ptr + tl.where(in_range, target, 0)).to(tl.float32)
    return tl.where(in_range, lse - target_logit, float("nan"))


@triton.jit
def _skipped(skip_ptr, HAS_SKIP: tl.constexpr):
    if HAS_SKIP:
        return tl.load(skip_ptr) != 0
    else:
        return False


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr,  # *[B, T, V] fp16/bf16/fp32 input; unit stride over V
    logits_stride_b,  # elements between batches of logits
    logits_stride_t,  # elements between rows of logits
    targets_ptr,  # *[B, T] int32/int64 class per row, or ignore_index
    targets_stride_b,
    targets_stride_t,
    divisor_ptr,  # *[] fp64: the gradient is divided by it (by 1 where it is 0)
    losses_ptr,  # *[B*T] fp32 output, contiguous
    grad_ptr,  # *[B, T, V] output in the logits' dtype (may be logits_ptr: in-place); unused unless COMPUTE_GRAD
    grad_stride_b,
    grad_stride_t,
    seq_len,  # T
    vocab_size,  # V
    ignore_index,
    skip_ptr,  # *[] bool: when it holds True the program writes nothing; unused unless HAS_SKIP
    BLOCK_V: tl.constexpr,  # vocabulary chunk streamed per step; SINGLE_CHUNK: the whole row
    SINGLE_CHUNK: tl.constexpr,  # V <= BLOCK_V: keep the row in registers (one read, one exp per element)
    COMPUTE_GRAD: tl.constexpr,  # False: loss only (no_grad / evaluation)
    NUM_STAGES: tl.constexpr,  # chunks of a row in flight in the streaming loops
    CACHE_HINTS: tl.constexpr,  # L2 eviction hints in the streaming loops (see _max_sum)
    HAS_SKIP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_logits_ptr = logits_ptr + _row_offsets(row, seq_len, logits_stride_b, logits_stride_t)
    row_grad_ptr = grad_ptr + _row_offsets(row, seq_len, grad_stride_b, grad_stride_t)
    target = tl.load(targets_ptr + _row_offsets(row, seq_len, targets_stride_b, targets_stride_t)).to(tl.int64)
    if _skipped(skip_ptr, HAS_SKIP):
        pass
    elif target == ignore_index:
        tl.store(losses_ptr + row, 0.0)
        if COMPUTE_GRAD:
            _write_zeros(row_grad_ptr, 0, vocab_size, BLOCK_V)
    elif SINGLE_CHUNK:
        cols = tl.arange(0, BLOCK_V)
        mask = cols < vocab_size
        x = tl.load(row_logits_ptr + cols, mask=mask, other=-float("inf")).to(tl.float32)
        row_max = tl.max(x, axis=0)
        shifted = tl.exp(x - tl.where(row_max == -float("inf"), 0.0, row_max))
        row_sum = tl.sum(shifted, axis=0)
        tl.store(losses_ptr + row, _loss(row_logits_ptr, row_max + tl.log(row_sum), target, vocab_size))
        if COMPUTE_GRAD:
            grad_scale = _grad_scale(divisor_ptr)
            prob = shifted * (1.0 / row_sum)
            grad = tl.where(cols == target, prob - 1.0, prob) * grad_scale
            tl.store(row_grad_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        row_max, row_sum = _max_sum(row_logits_ptr, 0, vocab_size, BLOCK_V, NUM_STAGES, CACHE_HINTS)
        lse = row_max + tl.log(row_sum)
        tl.store(losses_ptr + row, _loss(row_logits_ptr, lse, target, vocab_size))
        if COMPUTE_GRAD:
            _write_grad(row_logits_ptr, row_grad_ptr, 0, vocab_size, lse, target, _grad_scale(divisor_ptr), BLOCK_V,
                        NUM_STAGES, CACHE_HINTS)


@triton.jit
def _split_partials_kernel(
    logits_ptr,  # *[B, T, V] input, as in _cross_entropy_fwd_kernel
    logits_stride_b,
    logits_stride_t,
    partials_ptr,  # *[B*T, 2, NUM_SPLITS] fp32 out: (max, sum of exps) of each split
    seq_len,
    vocab_size,
    split_len,  # elements per split, a multiple of BLOCK_V
    NUM_SPLITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    CACHE_HINTS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_logits_ptr = logits_ptr + _row_offsets(row, seq_len, logits_stride_b, logits_stride_t)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, vocab_size)
    split_max, split_sum = _max_sum(row_logits_ptr, lo, hi, BLOCK_V, NUM_STAGES, CACHE_HINTS)
    tl.store(partials_ptr + row * 2 * NUM_SPLITS + split, split_max)
    tl.store(partials_ptr + row * 2 * NUM_SPLITS + NUM_SPLITS + split, split_sum)


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
    partials_ptr,  # *[B*T, 2, NUM_SPLITS] from _split_partials_kernel
    seq_len,
    vocab_size,
    split_len,
    ignore_index,
    skip_ptr,  # as in _cross_entropy_fwd_kernel
    NUM_SPLITS: tl.constexpr,
    SPLITS_POW2: tl.constexpr,  # NUM_SPLITS rounded up to a power of two (tl.arange needs one)
    BLOCK_V: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    CACHE_HINTS: tl.constexpr,
    HAS_SKIP: tl.constexpr,
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
            tl.store(losses_ptr + row, 0.0)
        if COMPUTE_GRAD:
            _write_zeros(row_grad_ptr, lo, hi, BLOCK_V)
    else:
        # Every program of the row merges the same partials in the same order: identical lse bits.
        idx = tl.arange(0, SPLITS_POW2)
        maxes = tl.load(partials_ptr + row * 2 * NUM_SPLITS + idx, mask=idx < NUM_SPLITS, other=-float("inf"))
        sums = tl.load(partials_ptr + row * 2 * NUM_SPLITS + NUM_SPLITS + idx, mask=idx < NUM_SPLITS, other=0.0)
        row_max = tl.max(maxes, axis=0)
        shift = tl.where(row_max == -float("inf"), 0.0, row_max)
        lse = row_max + tl.log(tl.sum(sums * tl.exp(maxes - shift), axis=0))
        if split == 0:
            tl.store(losses_ptr + row, _loss(row_logits_ptr, lse, target, vocab_size))
        if COMPUTE_GRAD:
            _write_grad(row_logits_ptr, row_grad_ptr, lo, hi, lse, target, _grad_scale(divisor_ptr), BLOCK_V,
                        NUM_STAGES, CACHE_HINTS)


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


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_SINGLE_CHUNK_MAX = 16384  # elements a program keeps in registers (32768 in 32 warps measured slower than 2 chunks)
_SPLIT_MAX_ROWS_PER_SM = 2  # fewer rows than this per SM: split the vocabulary
_SPLIT_TARGET_PROGRAMS_PER_SM = 8  # the split path aims for about this many programs per SM
_MAX_SPLITS = 64


_CACHE_HINTS_MIN_VOCAB = 40000


def _cache_hints(vocab_size: int) -> bool:
    """L2 eviction hints in the streaming loops, for rows long enough that pass 1's reads could leave L2 before pass 2
    re-reads them: they took (4,2048,128256) from 1.90 to 1.66-1.75 ms on the H100, while (4,2048,32000) measured
    0.66 ms with them against 0.44 ms without (benchmarks/NOTES.md, row 8). FASTCE_TRITON_CACHE_HINTS=0/1 forces
    them off/on (A/B timing)."""
    forced = os.environ.get("FASTCE_TRITON_CACHE_HINTS")
    if forced is not None:
        return forced != "0"
    return vocab_size > _CACHE_HINTS_MIN_VOCAB


def _launch_config(vocab_size: int, num_rows: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_V, num_warps, num_splits, num_stages), from benchmarks/tune_triton.py on an H100 (benchmarks/NOTES.md)."""
    if vocab_size <= _SINGLE_CHUNK_MAX:
        block_v = triton.next_power_of_2(max(vocab_size, 16))
        return block_v, max(1, min(16, block_v // 1024)), 1, 1
    block_v, num_warps, num_stages = 16384, 16, 1
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 4
    if num_rows >= _SPLIT_MAX_ROWS_PER_SM * sms:
        return block_v, num_warps, 1, num_stages
    wanted = triton.cdiv(_SPLIT_TARGET_PROGRAMS_PER_SM * sms, max(num_rows, 1))
    # Each split streams at least two chunks, or it would be mostly start-up.
    num_splits = max(1, min(wanted, _MAX_SPLITS, vocab_size // (2 * block_v)))
    return block_v, num_warps, num_splits, num_stages


def cross_entropy_fwd(logits, targets, divisor, losses, grad, ignore_index: int, skip=None, *,
                      num_splits: int | None = None) -> None:
    """The contract's launcher; ``num_splits`` overrides the split-path choice (tests and tuning)."""
    batch, seq_len, vocab_size = logits.shape
    num_rows = batch * seq_len
    if num_rows == 0:
        return
    if logits.stride(-1) != 1 or (grad is not None and grad.stride(-1) != 1):
        raise ValueError("logits and grad need unit stride over the vocabulary")
    block_v, num_warps, splits, num_stages = _launch_config(vocab_size, num_rows, logits.device)
    if num_splits is not None:
        splits = num_splits
    grad_arg = grad if grad is not None else logits  # never written when COMPUTE_GRAD is False
    skip_arg = skip if skip is not None else divisor  # never read when HAS_SKIP is False
    common = (logits, logits.stride(0), logits.stride(1))
    if splits <= 1:
        _cross_entropy_fwd_kernel[(num_rows,)](
            *common,
            targets, targets.stride(0), targets.stride(1),
            divisor, losses,
            grad_arg, grad_arg.stride(0), grad_arg.stride(1),
            seq_len, vocab_size, ignore_index, skip_arg,
            BLOCK_V=block_v, SINGLE_CHUNK=vocab_size <= block_v, COMPUTE_GRAD=grad is not None,
            NUM_STAGES=num_stages, CACHE_HINTS=_cache_hints(vocab_size), HAS_SKIP=skip is not None,
            num_warps=num_warps,
        )
        return
    split_len = triton.cdiv(triton.cdiv(vocab_size, splits), block_v) * block_v
    splits = triton.cdiv(vocab_size, split_len)
    partials = torch.empty((num_rows, 2, splits), dtype=torch.float32, device=logits.device)
    _split_partials_kernel[(num_rows, splits)](
        *common, partials, seq_len, vocab_size, split_len,
        NUM_SPLITS=splits, BLOCK_V=block_v, NUM_STAGES=num_stages, CACHE_HINTS=_cache_hints(vocab_size), num_warps=num_warps,
    )
    _split_finish_kernel[(num_rows, splits)](
        *common,
        targets, targets.stride(0), targets.stride(1),
        divisor, losses,
        grad_arg, grad_arg.stride(0), grad_arg.stride(1),
        partials, seq_len, vocab_size, split_len, ignore_index, skip_arg,
        NUM_SPLITS=splits, SPLITS_POW2=triton.next_power_of_2(splits), BLOCK_V=block_v,
        COMPUTE_GRAD=grad is not None, NUM_STAGES=num_stages, CACHE_HINTS=_cache_hints(vocab_size),
        HAS_SKIP=skip is not None, num_warps=num_warps,
    )


def scale_grad_(grad, grad_output) -> None:
    batch, seq_len, vocab_size = grad.shape
    if batch * seq_len == 0:
        return
    factor = grad_output.float()
    factor_strides = (0, 0) if factor.dim() == 0 else (factor.stride(0), factor.stride(1))
    block_v = min(4096, triton.next_power_of_2(max(vocab_size, 16)))
    _scale_grad_kernel[(batch * seq_len,)](
        grad, grad.stride(0), grad.stride(1),
        factor, *factor_strides,
        seq_len, vocab_size,
        BLOCK_V=block_v, num_warps=8 if block_v >= 4096 else 4,
    )
