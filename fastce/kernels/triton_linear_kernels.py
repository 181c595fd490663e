"""The fused lm_head's forward as one Triton kernel: GEMM tiles of ``input @ weight.T (+ bias)`` whose epilogue folds
each tile into its rows' online statistics (contract: ``shard_stats`` in ``fastce/kernels/__init__.py``), so that no
logit is ever written to memory. The launcher and its configurations are in ``triton_linear.py``.

A program owns BLOCK_M rows and a *split*, a contiguous range of vocabulary columns. One flat loop walks its
BLOCK_N-column tiles and, within each tile, the K dimension in BLOCK_K steps (a single loop, as Triton's persistent
matmul tutorial writes it, so that the software pipeline runs across tile boundaries instead of draining and
refilling at each tile). At a tile's last K step the float32 logits tile gets the bias, the softcap, and is folded
into the per-row (max, sum of exps, target logit, sum x', sum exp(x' - m)(x' - m)) with the arithmetic of
``triton_blocks`` (LEAN forms); at the end of the split the program writes one ``[BLOCK_M, 5]`` record per row.

**Exactness.** Tensor cores do not round their float32 sums to nearest: over K = 4096 products the logits come out
shrunk towards zero by ~3.7e-6 of |x| (benchmarks/NOTES.md, row 20), the loss 1.1e-6 off float64. So the K loop
accumulates each piece of PIECE_K products in its own ``tl.dot`` accumulator and adds the finished piece into a
float32 total with an ordinary (round-to-nearest) add on the CUDA cores, as DeepSeek-V3 promotes its FP8 sums. The
bias then grows with PIECE_K, not with K (cuBLAS in pieces of 1024 products: 2.7e-7 off float64 at D = 4096).
Cost: a second [BLOCK_M, BLOCK_N] float32 tile in registers (64 more a thread at 128 x 128 in 8 warps: why the exact
configurations stop at 128 x 128), and at each piece's end the tensor cores idle while the warps wait for the last
MMA, add the piece (64 adds a thread) and zero its registers (64 moves: the reset is also the next MMA's
accumulate flag, but the registers are materialised): ~200 instructions a thread every PIECE_K / BLOCK_K steps, read
from sm_90 SASS, so perhaps 5-10% at PIECE_K = 512 with one program an SM (the configurations with two or three
programs an SM run one's MMAs through the other's piece ends and epilogues). PIECE_STEPS = 0: one piece (the plain
GEMM's accumulation, and its bias).

Written for Triton's Hopper pipeline (checked on Triton 3.8's TTGIR and SASS for sm_90): the accumulator is reset
inside the piece's ``if``, which keeps one MMA in flight across steps (a ``tl.where`` on the dot's input made every
step wait for its MMA), and only scalars besides the tiles and the row statistics cross iterations (a column-index
vector in the MMA's layout is 32 registers, kept once per pipeline stage: it spilled).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_blocks import _exp, _finite, _max_shift, _softcapped


@triton.jit
def _fold_tile(x, col_ok, run_max, run_sum, run_sum_x, run_r, SUM_X: tl.constexpr, SUM_PX: tl.constexpr):
    """``triton_blocks._fold_chunk`` on a [BLOCK_M, BLOCK_N] tile of x' (masked columns -inf): one online step per
    row, LEAN forms."""
    new_max = tl.maximum(run_max, tl.max(x, axis=1))
    shift = _max_shift(new_max)
    rescale = _exp(run_max - shift, True)
    shifted = x - shift[:, None]
    exps = _exp(shifted, True)
    if SUM_PX:
        run_r = rescale * (run_r + _finite(run_max - shift) * run_sum) + tl.sum(exps * _finite(shifted), axis=1)
    if SUM_X:
        run_sum_x += tl.sum(tl.where(col_ok[None, :], x, 0.0), axis=1)
    run_sum = run_sum * rescale + tl.sum(exps, axis=1)
    return new_max, run_sum, run_sum_x, run_r


@triton.jit
def _program_tile(num_rows, num_splits, group_m, BLOCK_M: tl.constexpr):
    """(row tile, split) of this program. Launch order: groups of group_m row tiles x every split, row tile fastest, so
    that the programs running at once share a few weight tiles (one per split, read by group_m programs at about the
    same time) and group_m input tiles: both stay in L2. The forward's and the backward's kernels (both launched by
    ``triton_linear.plan``'s numbers)."""
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(num_rows, BLOCK_M)
    per_group = group_m * num_splits
    first = (pid // per_group) * group_m
    size = tl.minimum(row_tiles - first, group_m)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _tile_rows(targets_ptr, stride_t, row_tile, num_rows, vocab_start, vocab, ignore_index, BLOCK_M: tl.constexpr):
    """The program's rows (rows, row_ok, safe_rows: rows past N as row 0, int64) and their targets: the ids, and each
    one's column in this weight (its rows the ids [vocab_start, vocab_start + vocab)), -1 where it lies elsewhere
    (another slab or shard, or outside the vocabulary): int32, one compare an element. The forward's and the
    backward's kernels."""
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    safe_rows = tl.where(row_ok, rows, 0).to(tl.int64)
    targets = tl.load(targets_ptr + safe_rows * stride_t, mask=row_ok, other=ignore_index).to(tl.int64)
    local_t = targets - vocab_start
    local_t = tl.where((local_t >= 0) & (local_t < vocab), local_t, -1).to(tl.int32)
    return rows, row_ok, safe_rows, targets, local_t


@triton.jit
def _split_steps(split, split_len, vocab, dim, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The split's columns [lo, hi), the K steps of a tile and the flat loop's steps (tiles x K steps)."""
    lo = split * split_len
    hi = tl.minimum(lo + split_len, vocab)
    k_steps = tl.cdiv(dim, BLOCK_K)
    return lo, hi, k_steps, tl.cdiv(hi - lo, BLOCK_N) * k_steps


@triton.jit
def _next_step(kk, col0, k_steps, BLOCK_N: tl.constexpr):
    """The flat loop's next (K step, tile's first column), K steps fastest; start from (-1, lo - BLOCK_N). Only such
    scalars cross the loop's iterations besides the tiles and the rows' statistics: a column index vector in the MMA's
    layout is 32 registers a thread, and the pipeline would keep one per stage in flight."""
    kk = tl.where(kk == k_steps - 1, 0, kk + 1)
    return kk, tl.where(kk == 0, col0 + BLOCK_N, col0)


@triton.jit
def _operand_tiles(x_ptr, x_rows, stride_xk, w_ptr, stride_wv, stride_wk, row_tile, col0, cols, lo, hi, kk, rk, dim,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr,
                   INTERPRET: tl.constexpr):
    """K step ``kk`` of the tile at (row_tile, col0): the input's [BLOCK_M, BLOCK_K] and the weight's [BLOCK_N, BLOCK_K]
    operands. TMA: copies through the tensor descriptors x_ptr, w_ptr (rows, columns and K past the tensors' ends read
    as 0); else pointer loads from the input's row pointers ``x_rows`` (rows past N read row 0) and the weight's
    columns ``cols`` (past ``hi``: column ``lo``)."""
    if TMA:
        a = x_ptr.load([row_tile * BLOCK_M, kk * BLOCK_K])
        b = w_ptr.load([col0, kk * BLOCK_K])
    else:
        w_cols = w_ptr + tl.where(cols < hi, cols, lo).to(tl.int64)[:, None] * stride_wv
        offs_k = kk * BLOCK_K + rk
        if EVEN_K:
            a = tl.load(x_rows + offs_k[None, :] * stride_xk)
            b = tl.load(w_cols + offs_k[None, :] * stride_wk)
        else:
            a = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=offs_k[None, :] < dim, other=0.0)
            b = tl.load(w_cols + offs_k[None, :] * stride_wk, mask=offs_k[None, :] < dim, other=0.0)
    if INTERPRET:  # Triton's interpreter multiplies bf16 as the integers it stores them in: exact float32 instead
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b


@triton.jit
def _linear_stats_kernel(
    x_ptr,  # *[N, D] bf16/fp16: the input rows (TMA: its tensor descriptor, blocks [BLOCK_M, BLOCK_K])
    stride_xn, stride_xk,
    w_ptr,  # *[V, D] of the input's dtype: the weight, its rows the ids [vocab_start, vocab_start + V) (TMA: its
    # tensor descriptor, blocks [BLOCK_N, BLOCK_K])
    stride_wv, stride_wk,
    bias_ptr,  # *[V] any float dtype; unused unless HAS_BIAS
    targets_ptr,  # *[N] int32/int64, whole-vocabulary ids or ignore_index
    stride_t,
    parts_ptr,  # *[N, num_splits, 5] fp32 out, contiguous: the statistics of each split of each row
    num_rows, vocab, dim,  # N, V, D
    split_len,  # columns per split, a multiple of BLOCK_N
    num_splits,
    group_m,  # row tiles per group of the launch order (see below)
    vocab_start, ignore_index,
    softcap, softcap_k,  # as in triton_kernels; unused unless SOFTCAP
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PIECE_STEPS: tl.constexpr,  # K steps per exact piece (PIECE_K / BLOCK_K); 0: one piece
    EVEN_K: tl.constexpr,  # D % BLOCK_K == 0: no mask over K
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SUM_X: tl.constexpr, SUM_PX: tl.constexpr,
    TMA: tl.constexpr,  # x_ptr and w_ptr are tensor descriptors (Hopper's TMA; the strides then unused)
    INTERPRET: tl.constexpr,  # running in Triton's interpreter (CPU tensors)
):
    row_tile, split = _program_tile(num_rows, num_splits, group_m, BLOCK_M)
    rows, row_ok, safe_rows, targets, local_t = _tile_rows(targets_ptr, stride_t, row_tile, num_rows, vocab_start,
                                                           vocab, ignore_index, BLOCK_M)
    x_rows = x_ptr  # TMA: unused
    if not TMA:
        x_rows = x_ptr + safe_rows[:, None] * stride_xn  # rows past N read row 0
    # Tiles never cross a split's end (splits are whole tiles), so only the last tile of V has columns past hi.
    lo, hi, k_steps, steps = _split_steps(split, split_len, vocab, dim, BLOCK_N, BLOCK_K)
    rk = tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)

    run_max = tl.full([BLOCK_M], -float("inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    run_xt = tl.zeros([BLOCK_M], tl.float32)
    run_sum_x = tl.zeros([BLOCK_M], tl.float32)
    run_r = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    col0 = lo - BLOCK_N  # only scalars cross the loop's iterations (_next_step)
    kk = -1
    for _step in range(0, steps):
        kk, col0 = _next_step(kk, col0, k_steps, BLOCK_N)
        cols = col0 + rn
        a, b = _operand_tiles(x_ptr, x_rows, stride_xk, w_ptr, stride_wv, stride_wk, row_tile, col0, cols, lo, hi, kk,
                              rk, dim, BLOCK_M, BLOCK_K, EVEN_K, TMA, INTERPRET)
        acc = tl.dot(a, tl.trans(b), acc)
        if PIECE_STEPS > 0:
            if (kk % PIECE_STEPS == PIECE_STEPS - 1) | (kk == k_steps - 1):  # a piece is done: add it exactly
                total += acc
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if kk == k_steps - 1:  # the tile's logits are done: fold them into the rows' statistics
            if PIECE_STEPS > 0:
                logits = total
                total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            else:
                logits = acc
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            col_ok = cols < hi
            if HAS_BIAS:
                logits += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if SOFTCAP:
                logits, _slope = _softcapped(logits, softcap, softcap_k)
            x = tl.where(col_ok[None, :], logits, -float("inf"))
            hit = cols[None, :] == local_t[:, None]
            run_xt += tl.sum(tl.where(hit, x, 0.0), axis=1)
            run_max, run_sum, run_sum_x, run_r = _fold_tile(x, col_ok, run_max, run_sum, run_sum_x, run_r, SUM_X,
                                                            SUM_PX)

    # Ignored rows get the merge's identity (-inf, 0, 0, 0, 0); rows past N are not written.
    ignored = targets == ignore_index
    out = parts_ptr + (rows.to(tl.int64) * num_splits + split) * 5
    tl.store(out + 0, tl.where(ignored, -float("inf"), run_max), mask=row_ok)
    tl.store(out + 1, tl.where(ignored, 0.0, run_sum), mask=row_ok)
    tl.store(out + 2, tl.where(ignored, 0.0, run_xt), mask=row_ok)
    tl.store(out + 3, tl.where(ignored, 0.0, run_sum_x), mask=row_ok)
    tl.store(out + 4, tl.where(ignored, 0.0, run_r), mask=row_ok)
