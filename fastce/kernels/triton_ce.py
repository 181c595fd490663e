"""Triton backend: one fused kernel computes each row's loss and, in the same launch, its gradient.

Each program owns whole rows: pass 1 streams the row once for an online log-sum-exp (float32) and the target
logit; pass 2 streams it again (partly from L2) and writes ``(softmax - onehot) / divisor`` in the logits' dtype.
The kernel can also walk rows persistently (fewer programs than rows), which the launch config currently does
not use. Same contract as the other backends (see
``fastce/kernels/__init__.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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
    num_rows,  # B * T
    seq_len,  # T
    vocab_size,  # V
    ignore_index,
    BLOCK_V: tl.constexpr,  # vocabulary chunk streamed per step
    COMPUTE_GRAD: tl.constexpr,  # False: loss only (no_grad / evaluation)
):
    # The grid may be smaller than the number of rows (persistent): each program walks rows with a stride.
    first_row = tl.program_id(0).to(tl.int64)
    row_step = tl.num_programs(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    if COMPUTE_GRAD:
        divisor = tl.load(divisor_ptr)
        grad_scale = (1.0 / tl.where(divisor == 0, 1.0, divisor)).to(tl.float32)
    for row in range(first_row, num_rows, row_step):
        b = row // seq_len
        t = row - b * seq_len
        row_logits_ptr = logits_ptr + b * logits_stride_b + t * logits_stride_t
        target = tl.load(targets_ptr + b * targets_stride_b + t * targets_stride_t).to(tl.int64)
        if target == ignore_index:
            tl.store(losses_ptr + row, 0.0)
            if COMPUTE_GRAD:
                row_grad_ptr = grad_ptr + b * grad_stride_b + t * grad_stride_t
                zeros = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
                for start in range(0, vocab_size, BLOCK_V):
                    tl.store(row_grad_ptr + start + cols, zeros, mask=start + cols < vocab_size)
        else:
            # Pass 1: online log-sum-exp, one exp per element; the running max starts at -inf, and a chunk
            # whose max is still -inf must not produce exp(-inf - -inf) = NaN, hence the safe shift.
            running_max = tl.full([], -float("inf"), tl.float32)
            running_sum = tl.zeros([], tl.float32)
            for start in range(0, vocab_size, BLOCK_V):
                offs = start + cols
                x = tl.load(row_logits_ptr + offs, mask=offs < vocab_size, other=-float("inf")).to(tl.float32)
                new_max = tl.maximum(running_max, tl.max(x, axis=0))
                shift = tl.where(new_max == -float("inf"), 0.0, new_max)
                running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
                running_max = new_max
            lse = running_max + tl.log(running_sum)
            in_range = (target >= 0) & (target < vocab_size)
            # An out-of-range target is never read: its row gets a NaN loss, never a silent number.
            target_logit = tl.load(row_logits_ptr + tl.where(in_range, target, 0)).to(tl.float32)
            tl.store(losses_ptr + row, tl.where(in_range, lse - target_logit, float("nan")))
            if COMPUTE_GRAD:
                row_grad_ptr = grad_ptr + b * grad_stride_b + t * grad_stride_t
                for start in range(0, vocab_size, BLOCK_V):
                    offs = start + cols
                    mask = offs < vocab_size
                    x = tl.load(row_logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    prob = tl.exp(x - lse)
                    grad = tl.where(offs == target, prob - 1.0, prob) * grad_scale
                    tl.store(row_grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


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
    b = row // seq_len
    t = row - b * seq_len
    factor = tl.load(factor_ptr + b * factor_stride_b + t * factor_stride_t)
    # grad_output is almost always exactly 1: then each program reads one scalar and leaves.
    if factor != 1.0:
        row_grad_ptr = grad_ptr + b * grad_stride_b + t * grad_stride_t
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, vocab_size, BLOCK_V):
            offs = start + cols
            mask = offs < vocab_size
            g = tl.load(row_grad_ptr + offs, mask=mask).to(tl.float32)
            tl.store(row_grad_ptr + offs, (g * factor).to(grad_ptr.dtype.element_ty), mask=mask)


def _launch_config(vocab_size: int, num_rows: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_V, num_warps, programs), from benchmarks/tune_triton.py on an H100 (see benchmarks/NOTES.md).

    One program per row beat a persistent grid of 1, 2 or 4 programs per SM at every standard shape: more rows
    in flight hide more memory latency than L2 reuse of pass 1's reads saves.
    """
    if vocab_size <= 40000:
        block_v, num_warps = 16384, 16
    else:
        block_v, num_warps = 8192, 8
    block_v = min(block_v, triton.next_power_of_2(max(vocab_size, 16)))
    num_warps = min(num_warps, max(1, block_v // 256))
    return block_v, num_warps, max(num_rows, 1)


def cross_entropy_fwd(logits, targets, divisor, losses, grad, ignore_index: int) -> None:
    batch, seq_len, vocab_size = logits.shape
    num_rows = batch * seq_len
    if num_rows == 0:
        return
    if logits.stride(-1) != 1 or (grad is not None and grad.stride(-1) != 1):
        raise ValueError("logits and grad need unit stride over the vocabulary")
    block_v, num_warps, programs = _launch_config(vocab_size, num_rows, logits.device)
    grad_arg = grad if grad is not None else logits  # never written when COMPUTE_GRAD is False
    _cross_entropy_fwd_kernel[(programs,)](
        logits, logits.stride(0), logits.stride(1),
        targets, targets.stride(0), targets.stride(1),
        divisor, losses,
        grad_arg, grad_arg.stride(0), grad_arg.stride(1),
        num_rows, seq_len, vocab_size, ignore_index,
        BLOCK_V=block_v, COMPUTE_GRAD=grad is not None, num_warps=num_warps,
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
