"""Triton building blocks of a row's two phases (contract: ``fastce/kernels/__init__.py``), shared by every kernel
in ``triton_kernels.py``: the fused kernels and the shard kernels call the same ``@triton.jit`` functions.

* statistics: ``_chunk_sums`` are a chunk's sums (of exps, of x', of exp(x' - max)(x' - max)), ``_fold_chunk``
  folds them into the online statistics of a row; ``_row_stats`` streams a column range through it;
  ``_merge_stats`` merges the statistics of a row's column ranges (the split path's partials, a shard's splits).
* epilogue: ``_store_row`` writes the loss (and the row statistics) from the merged statistics; ``_grad_terms`` is
  the gradient of a chunk of columns from its probabilities, ``_grad_of_logits`` from its logits, and
  ``_write_grad`` streams a column range through it.

Options are ``tl.constexpr`` flags (SOFTCAP, LABEL_SMOOTHING, Z_LOSS, and SUM_X / SUM_PX for the sums only they
need): with every flag off these compile to the plain kernels, the options' scalars unused.

LEAN picks leaner forms of the same arithmetic: exp as exp2 (``_exp``), and the one-hot term written once after a
range's pass instead of a compare and select per element (``_write_grad``): about 4 fewer instructions an element
in the gradient pass, 3 in the statistics pass. Every option takes it, to make room for its own work, and so do the
shard kernels; the plain fused kernels keep the forms they were measured with (benchmarks/NOTES.md).
"""
from __future__ import annotations

import triton
import triton.language as tl

STATS_FIELDS = 5  # (m, s, x'_t, sum x', sum exp(x' - m)(x' - m)), as fastce/stats.py


@triton.jit
def _row_offsets(row, seq_len, stride_b, stride_t):
    """Element offset of row ``row`` (int64) of a [B, T, ...] tensor with the given strides."""
    b = row // seq_len
    return b * stride_b + (row - b * seq_len) * stride_t


@triton.jit
def _skipped(skip_ptr, HAS_SKIP: tl.constexpr):
    if HAS_SKIP:
        return tl.load(skip_ptr) != 0
    else:
        return False


@triton.jit
def _grad_scale(divisor_ptr):
    """1 / divisor as float32; NaN for a zero divisor (the contract's rule for rows that are not ignored)."""
    divisor = tl.load(divisor_ptr)
    zero = divisor == 0
    return tl.where(zero, float("nan"), 1.0 / tl.where(zero, 1.0, divisor)).to(tl.float32)


@triton.jit
def _exp(x, LEAN: tl.constexpr):
    """exp(x). LEAN: as exp2(x log2(e)), the arithmetic of tl.exp but with results below 2**-126 flushed to 0
    (tl.exp keeps float32 subnormal results, at 3 more instructions an element)."""
    if LEAN:
        return tl.exp2(x * 1.4426950408889634)
    else:
        return tl.exp(x)


@triton.jit
def _softcapped(x, softcap, softcap_k):
    """(x', (d x'/d x) / 4) of x' = softcap * tanh(x / softcap), from e = exp(-2|x| / softcap) (``softcap_k`` is
    -2 log2(e) / softcap) and q = 1 / (1 + e): tanh|x / softcap| = (1 - e) / (1 + e) = 2q - 1, and the slope
    1 - tanh**2 = 4 e q**2, accurate also where tanh saturates (1 - t*t would cancel there).

    q comes from rsqrt(1 + e)**2 (2 instructions, a division takes 5), 1 + e being in [1, 2]. x' is off by a few
    softcap * eps (float32 epsilon) in absolute terms: a few ulp of the largest x', nothing to a softmax."""
    e = tl.exp2(tl.abs(x) * softcap_k)
    r = tl.math.rsqrt(1.0 + e)
    q = r * r
    y = (2.0 * softcap) * q - softcap
    return tl.where(x < 0, -y, y), e * q * q


@triton.jit
def _cap_chunk(x, mask, softcap, softcap_k, SOFTCAP: tl.constexpr):
    """x' of a chunk loaded with masked lanes at -inf; they stay -inf (tanh(-inf) is -1, not -inf)."""
    if SOFTCAP:
        x, _ = _softcapped(x, softcap, softcap_k)
        x = tl.where(mask, x, -float("inf"))
    return x


@triton.jit
def _finite(shifted):
    """``x - max`` with -inf raised to the lowest float32: its products with exp(x - max) = 0 (or with a sum of 0, for
    an empty range) are then 0, not NaN. One max instruction, only where the entropy's sums are asked for."""
    return tl.maximum(shifted, -3.4028234663852886e38)


@triton.jit
def _chunk_sums(x, mask, shift, SUM_X: tl.constexpr, SUM_PX: tl.constexpr, LEAN: tl.constexpr):
    """(exp(x - shift), its sum, sum x (SUM_X), sum exp(x - shift)(x - shift) (SUM_PX)) of chunk ``x`` (x', masked
    lanes -inf); the sums not asked for are 0."""
    shifted = x - shift
    exps = _exp(shifted, LEAN)
    sum_x = tl.zeros([], tl.float32)
    r = tl.zeros([], tl.float32)
    if SUM_X:
        sum_x = tl.sum(tl.where(mask, x, 0.0), axis=0)
    if SUM_PX:
        r = tl.sum(exps * _finite(shifted), axis=0)
    return exps, tl.sum(exps, axis=0), sum_x, r


@triton.jit
def _max_shift(row_max):
    """What exps are taken relative to: the max, or 0 while it is -inf (which must not give exp(nan))."""
    return tl.where(row_max == -float("inf"), 0.0, row_max)


@triton.jit
def _fold_chunk(x, mask, run_max, run_sum, run_sum_x, run_r, SUM_X: tl.constexpr, SUM_PX: tl.constexpr,
                LEAN: tl.constexpr):
    """Fold chunk ``x`` (x', masked lanes -inf) into the online statistics (max, sum exp(x - max), sum x,
    r = sum exp(x - max)(x - max)).

    r is kept relative to the running max (every term <= 0: no cancellation) and rescaled with it: relative to a new
    max M it is exp(m - M) (r + (m - M) s)."""
    new_max = tl.maximum(run_max, tl.max(x, axis=0))
    shift = _max_shift(new_max)
    rescale = _exp(run_max - shift, LEAN)
    _, chunk_sum, chunk_sum_x, chunk_r = _chunk_sums(x, mask, shift, SUM_X, SUM_PX, LEAN)
    if SUM_PX:
        run_r = rescale * (run_r + _finite(run_max - shift) * run_sum) + chunk_r
    if SUM_X:
        run_sum_x += chunk_sum_x
    run_sum = run_sum * rescale + chunk_sum
    return new_max, run_sum, run_sum_x, run_r


@triton.jit
def _row_stats(row_logits_ptr, lo, hi, softcap, softcap_k, BLOCK_V: tl.constexpr, NUM_STAGES: tl.constexpr,
               CACHE_HINTS: tl.constexpr, SOFTCAP: tl.constexpr, SUM_X: tl.constexpr, SUM_PX: tl.constexpr,
               LEAN: tl.constexpr):
    """Online (max, sum of exps, sum x', sum exp(x' - max)(x' - max)) of x' over ``row[lo:hi]``, float32; the last
    two are 0 unless SUM_X / SUM_PX. NUM_STAGES chunks in flight (software pipelining).

    CACHE_HINTS: keep these reads in L2 (evict_last) for the gradient pass, which reads them once more."""
    cols = tl.arange(0, BLOCK_V)
    run_max = tl.full([], -float("inf"), tl.float32)
    run_sum = tl.zeros([], tl.float32)
    run_sum_x = tl.zeros([], tl.float32)
    run_r = tl.zeros([], tl.float32)
    for start in tl.range(lo, hi, BLOCK_V, num_stages=NUM_STAGES):
        offs = start + cols
        mask = offs < hi
        if CACHE_HINTS:
            x = tl.load(row_logits_ptr + offs, mask=mask, other=-float("inf"), eviction_policy="evict_last")
        else:
            x = tl.load(row_logits_ptr + offs, mask=mask, other=-float("inf"))
        x = _cap_chunk(x.to(tl.float32), mask, softcap, softcap_k, SOFTCAP)
        run_max, run_sum, run_sum_x, run_r = _fold_chunk(x, mask, run_max, run_sum, run_sum_x, run_r, SUM_X, SUM_PX,
                                                         LEAN)
    return run_max, run_sum, run_sum_x, run_r


@triton.jit
def _target_logit(row_logits_ptr, local_target, width, softcap, softcap_k, SOFTCAP: tl.constexpr):
    """x' at ``local_target`` if it lies in [0, width), else 0 (and then nothing is read): (x'_t, whether here)."""
    here = (local_target >= 0) & (local_target < width)
    x = tl.load(row_logits_ptr + tl.where(here, local_target, 0), mask=here, other=0.0).to(tl.float32)
    if SOFTCAP:
        x, _ = _softcapped(x, softcap, softcap_k)
    return tl.where(here, x, 0.0), here


@triton.jit
def _store_stats(stats_ptr, run_max, run_sum, target_logit, sum_x, r):
    """One 5-field statistics record (fastce/stats.py's layout)."""
    tl.store(stats_ptr + 0, run_max)
    tl.store(stats_ptr + 1, run_sum)
    tl.store(stats_ptr + 2, target_logit)
    tl.store(stats_ptr + 3, sum_x)
    tl.store(stats_ptr + 4, r)


@triton.jit
def _merge_stats(stats_ptr, NUM_PARTS: tl.constexpr, PARTS_POW2: tl.constexpr, SUM_X: tl.constexpr,
                 SUM_PX: tl.constexpr):
    """Merge NUM_PARTS consecutive 5-field records (disjoint column ranges of one row) in a fixed order, so that every
    program merging them gets the same bits: (m, s, x'_t, sum x', r) of the union (fastce/stats.py's merge)."""
    idx = tl.arange(0, PARTS_POW2) * 5
    has = idx < NUM_PARTS * 5
    maxes = tl.load(stats_ptr + idx, mask=has, other=-float("inf"))
    sums = tl.load(stats_ptr + idx + 1, mask=has, other=0.0)
    row_max = tl.max(maxes, axis=0)
    shift = _max_shift(row_max)
    weight = tl.exp(maxes - shift)
    row_sum = tl.sum(sums * weight, axis=0)
    target_logit = tl.sum(tl.load(stats_ptr + idx + 2, mask=has, other=0.0), axis=0)  # one range holds it, or none
    sum_x = tl.zeros([], tl.float32)
    r = tl.zeros([], tl.float32)
    if SUM_X:
        sum_x = tl.sum(tl.load(stats_ptr + idx + 3, mask=has, other=0.0), axis=0)
    if SUM_PX:
        parts_r = tl.load(stats_ptr + idx + 4, mask=has, other=0.0)
        r = tl.sum(weight * (parts_r + _finite(maxes - shift) * sums), axis=0)
    return row_max, row_sum, target_logit, sum_x, r


@triton.jit
def _store_row(losses_ptr, row_stats_ptr, row, row_max, row_sum, log_sum, target_logit, valid, sum_x, r, vocab_size,
               label_smoothing, z_loss, LABEL_SMOOTHING: tl.constexpr, Z_LOSS: tl.constexpr, STATS: tl.constexpr):
    """The loss epilogue: the loss of a row from its whole-row statistics (``log_sum`` = log(row_sum)), and (STATS)
    its (lse, entropy, correct).

    The loss is (m - x'_t) + log(s), never lse - x'_t (that would lose the bits of a small loss to lse's rounding);
    an out-of-range target (``valid`` False) gives NaN."""
    loss = tl.where(valid, (row_max - target_logit) + log_sum, float("nan"))
    if LABEL_SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * ((row_max - sum_x / vocab_size) + log_sum)
    lse = row_max + log_sum
    if Z_LOSS:
        loss += z_loss * lse * lse
    tl.store(losses_ptr + row, loss)
    if STATS:
        tl.store(row_stats_ptr + row * 3, lse)
        tl.store(row_stats_ptr + row * 3 + 1, log_sum - r / row_sum)
        tl.store(row_stats_ptr + row * 3 + 2, tl.where(valid & (target_logit >= row_max), 1.0, 0.0))


@triton.jit
def _store_ignored_row(losses_ptr, row_stats_ptr, row, STATS: tl.constexpr):
    tl.store(losses_ptr + row, 0.0)
    if STATS:
        tl.store(row_stats_ptr + row * 3, 0.0)
        tl.store(row_stats_ptr + row * 3 + 1, 0.0)
        tl.store(row_stats_ptr + row * 3 + 2, 0.0)


@triton.jit
def _grad_terms(prob, is_target, slope, grad_scale, z_factor, target_coefficient, smoothing_per_class,
                SOFTCAP: tl.constexpr, LABEL_SMOOTHING: tl.constexpr, Z_LOSS: tl.constexpr):
    """The gradient epilogue: ((p_j - c_j) + 2 z lse p_j) * slope_j * scale (``z_factor`` = 2 z lse), in that order:
    (1 + 2 z lse) p_j - c_j would cancel where p_j is close to c_j. c_j is the target's one constant 1 - e + e / V
    (exactly 1 without smoothing, and for V = 1) and e / V elsewhere (0 without smoothing). With SOFTCAP, ``slope``
    is a quarter of the slope (see _softcapped); the 4 goes with the scalar scale."""
    if LABEL_SMOOTHING:
        grad = tl.where(is_target, prob - target_coefficient, prob - smoothing_per_class)
    else:
        grad = tl.where(is_target, prob - 1.0, prob)
    if Z_LOSS:
        grad = grad + z_factor * prob
    if SOFTCAP:
        grad = grad * slope
        grad_scale = grad_scale * 4.0
    return grad * grad_scale


@triton.jit
def _grad_of_logits(x, is_target, lse, grad_scale, z_factor, target_coefficient, smoothing_per_class, softcap,
                    softcap_k, SOFTCAP: tl.constexpr, LABEL_SMOOTHING: tl.constexpr, Z_LOSS: tl.constexpr,
                    LEAN: tl.constexpr):
    """_grad_terms of logits ``x`` as loaded (a chunk, or the target's one logit), p = exp(x' - lse)."""
    x = x.to(tl.float32)
    slope = x
    if SOFTCAP:
        x, slope = _softcapped(x, softcap, softcap_k)
    return _grad_terms(_exp(x - lse, LEAN), is_target, slope, grad_scale, z_factor, target_coefficient,
                       smoothing_per_class, SOFTCAP, LABEL_SMOOTHING, Z_LOSS)


@triton.jit
def _read_target(row_logits_ptr, target, lo, hi):
    """LEAN: (the logit at ``target`` if it lies in [lo, hi), whether it does), read by every thread before any
    thread writes the range (which may overwrite it: in-place)."""
    here = (target >= lo) & (target < hi)
    x = tl.load(row_logits_ptr + tl.where(here, target, lo), mask=here, other=0.0)
    tl.debug_barrier()
    return x, here


@triton.jit
def _write_target_grad(row_grad_ptr, target, here, target_x, lse, grad_scale, z_factor, target_coefficient,
                       smoothing_per_class, softcap, softcap_k, SOFTCAP: tl.constexpr, LABEL_SMOOTHING: tl.constexpr,
                       Z_LOSS: tl.constexpr):
    """LEAN: the target's element, with its one-hot term, written over what the range's pass wrote there (without
    it); the barrier orders it after that pass's stores."""
    tl.debug_barrier()
    grad = _grad_of_logits(target_x, True, lse, grad_scale, z_factor, target_coefficient, smoothing_per_class,
                           softcap, softcap_k, SOFTCAP, LABEL_SMOOTHING, Z_LOSS, True)
    tl.store(row_grad_ptr + tl.where(here, target, 0), grad.to(row_grad_ptr.dtype.element_ty), mask=here)


@triton.jit
def _write_grad(row_logits_ptr, row_grad_ptr, lo, hi, lse, target, grad_scale, z_factor, target_coefficient,
                smoothing_per_class, softcap, softcap_k, BLOCK_V: tl.constexpr, NUM_STAGES: tl.constexpr,
                CACHE_HINTS: tl.constexpr, SOFTCAP: tl.constexpr, LABEL_SMOOTHING: tl.constexpr, Z_LOSS: tl.constexpr,
                LEAN: tl.constexpr):
    """grad[lo:hi] = _grad_of_logits of the range, last chunk first: the chunks the statistics pass read last, the
    ones most likely still in L2, are read again first. ``target`` is a column of this range's coordinates (none
    matches when it lies elsewhere).

    The one-hot term: without LEAN, a compare and a select per element (the plain kernels, as measured); LEAN, the
    pass writes every element without it and the target's element is written once more, with it, at the end."""
    if LEAN:
        target_x, here = _read_target(row_logits_ptr, target, lo, hi)
    cols = tl.arange(0, BLOCK_V)
    num_chunks = tl.cdiv(hi - lo, BLOCK_V)
    for i in tl.range(num_chunks, num_stages=NUM_STAGES):
        offs = lo + (num_chunks - 1 - i) * BLOCK_V + cols
        mask = offs < hi
        if CACHE_HINTS:  # the last read of these logits, and a gradient nothing reads soon: neither should stay
            x = tl.load(row_logits_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        else:
            x = tl.load(row_logits_ptr + offs, mask=mask, other=0.0)
        if LEAN:
            is_target = False
        else:
            is_target = offs == target
        grad = _grad_of_logits(x, is_target, lse, grad_scale, z_factor, target_coefficient, smoothing_per_class,
                               softcap, softcap_k, SOFTCAP, LABEL_SMOOTHING, Z_LOSS, LEAN)
        grad = grad.to(row_grad_ptr.dtype.element_ty)
        if CACHE_HINTS:
            tl.store(row_grad_ptr + offs, grad, mask=mask, eviction_policy="evict_first")
        else:
            tl.store(row_grad_ptr + offs, grad, mask=mask)
    if LEAN:
        _write_target_grad(row_grad_ptr, target, here, target_x, lse, grad_scale, z_factor, target_coefficient,
                           smoothing_per_class, softcap, softcap_k, SOFTCAP, LABEL_SMOOTHING, Z_LOSS)


@triton.jit
def _write_zeros(row_grad_ptr, lo, hi, BLOCK_V: tl.constexpr):
    cols = tl.arange(0, BLOCK_V)
    zeros = tl.zeros([BLOCK_V], dtype=row_grad_ptr.dtype.element_ty)
    for start in range(lo, hi, BLOCK_V):
        tl.store(row_grad_ptr + start + cols, zeros, mask=start + cols < hi)
