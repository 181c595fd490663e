"""The fused lm_head's backward logits GEMM as one Triton kernel: GEMM tiles of ``input @ weight.T (+ bias)`` whose
epilogue turns each tile of float32 logits into the gradient of the logits (contract: ``shard_grad`` in
``fastce/kernels/__init__.py``) and stores it in the weight's dtype, so that no float32 logit is ever written. The
launcher and its configurations are in ``triton_linear_grad.py``.

The forward sibling's structure (``triton_linear_kernels.py``): a program owns BLOCK_M rows and a *split* (a range of
whole BLOCK_N tiles), one flat loop walks its tiles and, within each, K in BLOCK_K steps, so that the software
pipeline runs across tile boundaries; the launch order groups row tiles so that their input tiles and the weight tiles
stay in L2. Unlike the forward there are no exact K pieces: the gradient is rounded to bf16/fp16 anyway, so one
``tl.dot`` accumulator (which lets 128 x 256 tiles fit in registers). At a tile's last K step: the bias, then
``triton_blocks._grad_of_logits`` (softcap and its slope, p = exp(x' - lse), the one-hot and smoothing
coefficients, the z-loss term, the row's scale; LEAN exp) with the target's one-hot term as a compare and select per
element (the LEAN shard kernel's "write the target once more afterwards" has no place in a register tile). Ignored
rows get 0; rows past N and columns past the slab are not written.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_blocks import _grad_of_logits
from .triton_linear_kernels import _next_step, _operand_tiles, _program_tile, _split_steps, _tile_rows


@triton.jit
def _linear_grad_kernel(
    x_ptr,  # *[N, D] bf16/fp16: the input rows (TMA: its tensor descriptor, blocks [BLOCK_M, BLOCK_K])
    stride_xn, stride_xk,
    w_ptr,  # *[Vs, D] of the input's dtype: the weight slab, its rows the ids [vocab_start, vocab_start + Vs) (TMA:
    # its tensor descriptor, blocks [BLOCK_N, BLOCK_K])
    stride_wv, stride_wk,
    bias_ptr,  # *[Vs] any float dtype; unused unless HAS_BIAS
    targets_ptr,  # *[N] int32/int64, whole-vocabulary ids or ignore_index
    stride_t,
    row_ptr,  # *[N, 3] fp32 contiguous: (m, s, scale) of each whole row
    grad_ptr,  # *[N, Vs] bf16/fp16 out, unit column stride (TMA_STORE: its tensor descriptor, blocks [BLOCK_M, BLOCK_N])
    stride_gn,
    num_rows, vocab, dim,  # N, Vs, D
    split_len,  # columns per split, a multiple of BLOCK_N
    num_splits,
    group_m,  # row tiles per group of the launch order
    vocab_start, ignore_index,
    softcap, softcap_k, smoothing_per_class, target_coefficient, z_loss,  # as triton_ce._options
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # D % BLOCK_K == 0: no mask over K
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, LABEL_SMOOTHING: tl.constexpr, Z_LOSS: tl.constexpr,
    TMA: tl.constexpr,  # x_ptr and w_ptr are tensor descriptors (Hopper's TMA; the strides then unused)
    TMA_STORE: tl.constexpr,  # grad_ptr is a tensor descriptor too (it clips rows and columns past its ends)
    INTERPRET: tl.constexpr,  # running in Triton's interpreter (CPU tensors)
):
    row_tile, split = _program_tile(num_rows, num_splits, group_m, BLOCK_M)
    # local_t: the target's column in this slab, -1 where it lies elsewhere (another slab, or outside the vocabulary:
    # then the gradient has no one-hot term, as the contract says).
    _, row_ok, safe_rows, targets, local_t = _tile_rows(targets_ptr, stride_t, row_tile, num_rows, vocab_start, vocab,
                                                        ignore_index, BLOCK_M)
    x_rows = x_ptr  # TMA: unused
    if not TMA:
        x_rows = x_ptr + safe_rows[:, None] * stride_xn  # rows past N read row 0
    kept = row_ok & (targets != ignore_index)
    row_max = tl.load(row_ptr + safe_rows * 3, mask=kept, other=0.0)
    row_sum = tl.load(row_ptr + safe_rows * 3 + 1, mask=kept, other=1.0)
    scale = tl.load(row_ptr + safe_rows * 3 + 2, mask=kept, other=0.0)
    lse = row_max + tl.log(row_sum)
    z_factor = 2.0 * z_loss * lse
    if not TMA_STORE:
        g_rows = grad_ptr + safe_rows[:, None] * stride_gn

    lo, hi, k_steps, steps = _split_steps(split, split_len, vocab, dim, BLOCK_N, BLOCK_K)
    rk = tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    col0 = lo - BLOCK_N  # only scalars cross the loop's iterations besides the tile (_next_step)
    kk = -1
    for _step in range(0, steps):
        kk, col0 = _next_step(kk, col0, k_steps, BLOCK_N)
        cols = col0 + rn
        a, b = _operand_tiles(x_ptr, x_rows, stride_xk, w_ptr, stride_wv, stride_wk, row_tile, col0, cols, lo, hi, kk,
                              rk, dim, BLOCK_M, BLOCK_K, EVEN_K, TMA, INTERPRET)
        acc = tl.dot(a, tl.trans(b), acc)
        if kk == k_steps - 1:  # the tile's logits are done: their gradient, stored in the weight's dtype
            logits = acc
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            col_ok = cols < hi
            if HAS_BIAS:
                logits += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            grad = _grad_of_logits(logits, cols[None, :] == local_t[:, None], lse[:, None], scale[:, None],
                                   z_factor[:, None], target_coefficient, smoothing_per_class, softcap, softcap_k,
                                   SOFTCAP, LABEL_SMOOTHING, Z_LOSS, True)
            grad = tl.where(kept[:, None], grad, 0.0)
            if TMA_STORE:
                grad_ptr.store([row_tile * BLOCK_M, col0], grad.to(grad_ptr.dtype))
            else:
                tl.store(g_rows + cols[None, :], grad.to(grad_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & col_ok[None, :])
