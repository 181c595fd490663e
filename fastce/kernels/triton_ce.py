"""Triton backend: the launchers (contract: ``fastce/kernels/__init__.py``). The kernels are in
``triton_kernels.py``, composed of the building blocks of ``triton_blocks.py`` (a row's statistics, its epilogue).

``cross_entropy_fwd`` takes one of three shapes of work, chosen by ``_launch_config``:

* single chunk (V <= 16384): a program holds its whole row in registers: one read, one exp per element, one write.
* row path (many rows): a program streams its row twice. Pass 1 keeps the online statistics (float32) and reads
  the target logit; pass 2 writes the gradient, walking the row backwards so that the chunks pass 1 read last, the
  ones most likely still in L2, are read again first.
* split path (few rows, large V): the vocabulary of a row is cut into splits over several programs. Kernel A
  (``_range_stats_kernel``) writes each split's statistics, the target logit included (ignored rows are not read);
  kernel B merges a row's partials in split order (every program of the row gets the same bits) and writes its
  split's gradient; split 0 writes the loss. Kernel A has read everything, the target logit too, before kernel B
  writes, so the gradient may overwrite the logits (in-place).

``shard_stats`` is kernel A over the columns it is given: one split per row, or, for few long rows, several merged
by ``_merge_stats_kernel``. ``shard_grad`` is one pass of the gradient epilogue over each row's columns, cut into
splits over several programs (each its own column range) for few long rows.

Options (``spec``) become ``tl.constexpr`` flags of the same kernels, so plain cross-entropy compiles to kernels
without them; their scalars are rounded to float32 once, here. Any option also sets LEAN (``triton_blocks``), as
do the shard launchers: the same arithmetic in fewer instructions, which pays for the options' own. On an H100,
bf16 [4, 2048, 128256] fwd+bwd: label smoothing, z-loss and stats each ran 0.7-1.0% faster than plain (1.594 ms),
softcap 23% slower (its exp and reciprocal per element and pass; forward only +50%).
"""
from __future__ import annotations

import functools
import math
import os
import struct

import torch
import triton

from ..spec import PLAIN, LossSpec
from .triton_blocks import STATS_FIELDS
from .triton_kernels import (
    _cross_entropy_fwd_kernel,
    _merge_stats_kernel,
    _range_grad_kernel,
    _range_stats_kernel,
    _scale_grad_kernel,
    _split_finish_kernel,
)


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


def _launch_config(vocab_size: int, num_rows: int, device: torch.device, chunks_per_split: int = 2
                   ) -> tuple[int, int, int, int]:
    """(BLOCK_V, num_warps, num_splits, num_stages), from benchmarks/tune_triton.py on an H100 (benchmarks/NOTES.md).

    ``chunks_per_split``: the fewest BLOCK_V chunks a split streams (2 for two-pass kernels: a split is mostly
    start-up otherwise; 1 for shard_grad's single pass)."""
    if vocab_size <= _SINGLE_CHUNK_MAX:
        block_v = triton.next_power_of_2(max(vocab_size, 16))
        return block_v, max(1, min(16, block_v // 1024)), 1, 1
    block_v, num_warps, num_stages = 16384, 16, 1
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 4
    if num_rows >= _SPLIT_MAX_ROWS_PER_SM * sms:
        return block_v, num_warps, 1, num_stages
    wanted = triton.cdiv(_SPLIT_TARGET_PROGRAMS_PER_SM * sms, max(num_rows, 1))
    num_splits = max(1, min(wanted, _MAX_SPLITS, vocab_size // (chunks_per_split * block_v)))
    return block_v, num_warps, num_splits, num_stages


def _f32(value: float) -> float:
    """``value`` rounded to float32 (to nearest), so that the kernels get exactly this number."""
    return struct.unpack("f", struct.pack("f", value))[0]


@functools.lru_cache(maxsize=256)
def _options(spec: LossSpec, vocab_size: int) -> tuple[dict, dict]:
    """(scalars, flags) of ``spec`` for the kernels: the option scalars (unused by the plain kernels) and the
    constexpr flags that switch each option on. The target's coefficient 1 - e + e / V is rounded once, from float64:
    for V = 1 it is exactly 1, so that the gradient is exactly 0."""
    e = spec.label_smoothing
    cap = spec.softcap
    scalars = {
        "softcap": _f32(cap),
        "softcap_k": _f32(-2.0 * math.log2(math.e) / cap) if cap else 0.0,
        "label_smoothing": _f32(e),
        "smoothing_per_class": _f32(e / vocab_size) if vocab_size else 0.0,
        "target_coefficient": _f32(1.0 - e + e / vocab_size) if vocab_size else 1.0,
        "z_loss": _f32(spec.z_loss),
    }
    flags = {"SOFTCAP": cap != 0.0, "LABEL_SMOOTHING": e != 0.0, "Z_LOSS": spec.z_loss != 0.0}
    return scalars, flags


def _check_unit_stride(*tensors) -> None:
    if any(t is not None and t.stride(-1) != 1 for t in tensors):
        raise ValueError("logits and grad need unit stride over the vocabulary")


def _split_len(width: int, splits: int, block_v: int) -> tuple[int, int]:
    """(columns per split, a multiple of BLOCK_V; number of splits) for about ``splits`` splits of ``width``."""
    split_len = triton.cdiv(triton.cdiv(width, max(splits, 1)), block_v) * block_v
    return split_len, triton.cdiv(width, split_len)


def cross_entropy_fwd(logits, targets, divisor, losses, grad, ignore_index: int, skip=None, spec: LossSpec = PLAIN,
                      row_stats=None, *, num_splits: int | None = None) -> None:
    """The contract's launcher; ``num_splits`` overrides the split-path choice (tests and tuning)."""
    batch, seq_len, vocab_size = logits.shape
    num_rows = batch * seq_len
    if num_rows == 0:
        return
    _check_unit_stride(logits, grad)
    block_v, num_warps, splits, num_stages = _launch_config(vocab_size, num_rows, logits.device)
    if num_splits is not None:
        splits = num_splits
    scalars, flags = _options(spec, vocab_size)
    stats = row_stats is not None
    grad_arg = grad if grad is not None else logits  # never written when COMPUTE_GRAD is False
    skip_arg = skip if skip is not None else divisor  # never read when HAS_SKIP is False
    row_stats_arg = row_stats if stats else losses  # never written when STATS is False
    hints = _cache_hints(vocab_size)
    rows = (logits, logits.stride(0), logits.stride(1), targets, targets.stride(0), targets.stride(1))
    outputs = (divisor, losses, grad_arg, grad_arg.stride(0), grad_arg.stride(1), row_stats_arg)
    lean = stats or any(flags.values())  # plain cross-entropy keeps the kernels it always had
    constexprs = dict(BLOCK_V=block_v, COMPUTE_GRAD=grad is not None, NUM_STAGES=num_stages, CACHE_HINTS=hints,
                      HAS_SKIP=skip is not None, STATS=stats, LEAN=lean, **flags)
    if splits <= 1:
        _cross_entropy_fwd_kernel[(num_rows,)](
            *rows, *outputs, seq_len, vocab_size, ignore_index, skip_arg, **scalars,
            SINGLE_CHUNK=vocab_size <= block_v, **constexprs, num_warps=num_warps,
        )
        return
    split_len, splits = _split_len(vocab_size, splits, block_v)
    partials = torch.empty((num_rows, splits, STATS_FIELDS), dtype=torch.float32, device=logits.device)
    _range_stats_kernel[(num_rows, splits)](
        *rows, partials, seq_len, vocab_size, split_len, 0, ignore_index, scalars["softcap"], scalars["softcap_k"],
        NUM_SPLITS=splits, BLOCK_V=block_v, NUM_STAGES=num_stages, CACHE_HINTS=hints, SOFTCAP=flags["SOFTCAP"],
        SUM_X=flags["LABEL_SMOOTHING"], SUM_PX=stats, LEAN=lean, num_warps=num_warps,
    )
    _split_finish_kernel[(num_rows, splits)](
        *rows, *outputs, partials, seq_len, vocab_size, split_len, ignore_index, skip_arg, **scalars,
        NUM_SPLITS=splits, SPLITS_POW2=triton.next_power_of_2(splits), **constexprs, num_warps=num_warps,
    )


def shard_stats(logits, targets, vocab_start: int, ignore_index: int, stats, spec: LossSpec = PLAIN, *,
                num_splits: int | None = None) -> None:
    """The contract's launcher; ``num_splits`` overrides the choice of splits per row (tests and tuning)."""
    batch, seq_len, width = logits.shape
    num_rows = batch * seq_len
    if num_rows == 0:
        return
    _check_unit_stride(logits)
    if width == 0:  # no columns: every row has the statistics of nothing, the merge's identity
        stats.copy_(torch.tensor([float("-inf"), 0.0, 0.0, 0.0, 0.0], device=stats.device).expand_as(stats))
        return
    block_v, num_warps, splits, num_stages = _launch_config(width, num_rows, logits.device)
    if num_splits is not None:
        splits = num_splits
    split_len, splits = _split_len(width, splits, block_v)
    scalars, flags = _options(spec, width)
    sums = dict(SUM_X=spec.needs_sum_x, SUM_PX=spec.needs_sum_px)
    parts = stats if splits == 1 else torch.empty((num_rows, splits, STATS_FIELDS), dtype=torch.float32,
                                                  device=logits.device)
    # No cache hints: nothing reads these logits again soon (the gradient pass comes after the merge).
    _range_stats_kernel[(num_rows, splits)](
        logits, logits.stride(0), logits.stride(1), targets, targets.stride(0), targets.stride(1), parts,
        seq_len, width, split_len, vocab_start, ignore_index, scalars["softcap"], scalars["softcap_k"],
        NUM_SPLITS=splits, BLOCK_V=block_v, NUM_STAGES=num_stages, CACHE_HINTS=False, SOFTCAP=flags["SOFTCAP"],
        **sums, LEAN=True, num_warps=num_warps,
    )
    if splits > 1:
        _merge_stats_kernel[(num_rows,)](parts, stats, NUM_PARTS=splits, PARTS_POW2=triton.next_power_of_2(splits),
                                         **sums, num_warps=1)


def shard_grad(logits, targets, vocab_start: int, vocab_size: int, ignore_index: int, row, grad,
               spec: LossSpec = PLAIN, *, num_splits: int | None = None) -> None:
    """The contract's launcher; ``num_splits`` overrides the choice of splits per row (tests and tuning)."""
    batch, seq_len, width = logits.shape
    num_rows = batch * seq_len
    if num_rows == 0 or width == 0:
        return
    _check_unit_stride(logits, grad)
    block_v, num_warps, splits, num_stages = _launch_config(width, num_rows, logits.device, 1)
    if num_splits is not None:
        splits = num_splits
    split_len, splits = _split_len(width, splits, block_v)
    scalars, flags = _options(spec, vocab_size)
    _range_grad_kernel[(num_rows, splits)](
        logits, logits.stride(0), logits.stride(1), targets, targets.stride(0), targets.stride(1), row,
        grad, grad.stride(0), grad.stride(1), seq_len, width, split_len, vocab_start, ignore_index,
        scalars["softcap"], scalars["softcap_k"], scalars["smoothing_per_class"], scalars["target_coefficient"],
        scalars["z_loss"], BLOCK_V=block_v, NUM_STAGES=num_stages, **flags, LEAN=True, num_warps=num_warps,
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
