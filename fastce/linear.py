"""The fused lm_head + cross-entropy: ``input @ weight.T (+ bias)`` and the loss, no ``[N, V]`` tensor ever in full.

The vocabulary is cut into slabs as wide as the workspace allows (``_slab_columns``); each phase of the loss runs slab
by slab:

* forward, one GEMM: each slab's logits, in float32 (so the loss is exact to float32 rounding; on tensor cores in
  pieces of K, see ``_EXACT_K``), reduced at once to its rows' partial statistics by the kernels' ``shard_stats``;
  ``fastce/stats.py`` merges them into each row's statistics, whence the losses. Nothing of size V survives the slab.
  With ``FUSED_FORWARD`` (on: benchmarks/NOTES.md row 24), the Triton backend's forward on bf16/fp16 is one kernel
  instead (``fastce/kernels/triton_linear.py``): GEMM tiles whose epilogue takes the statistics, no logits in memory.
* backward, three GEMMs: each slab's float32 logits again; the epilogue (``shard_grad``) turns them into the gradient
  of the logits in the weight's dtype (rounded once, from float32 logits), scaled per row by the upstream gradient;
  then ``grad_weight[slab] = dlogits.T @ input`` (one GEMM over all rows: float32 accumulation, one rounding, no
  round-off growing with the number of slabs) and ``grad_input += dlogits @ weight[slab]`` into a float32
  accumulator (in the GEMM's epilogue where the device has a mixed-dtype ``addmm``). With ``FUSED_BACKWARD`` (on:
  NOTES row 24), the Triton backend's first GEMM and the epilogue are one kernel on bf16/fp16
  (``fastce/kernels/triton_linear_grad.py``): no float32 slab, so slabs of the gradient alone, 3x wider.

So the memory above the inputs is the gradients plus one slab and an ``[N, D]`` float32 accumulator, and a gradient
is exact for any upstream gradient, per-token losses included. The price is the forward GEMM done twice (4 GEMMs in
all, where logits held in memory would need 3): benchmarks/NOTES.md.

Both phases are custom ops (``fastce::linear_stats``, ``fastce::linear_grads``), so ``torch.compile`` sees two
opaque nodes. This module knows nothing of shifting, reductions' divisors or transformers: ``linear_loss.py`` does.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from . import stats as _stats
from .backends import kernels
from .function import _sum_over
from .shard_ops import run_shard_grad, run_shard_stats
from .spec import LossSpec

# The workspace above the gradients: one slab of logits (float32, and in the backward their gradient in the weight's
# dtype too) and grad_input's [rows, D] float32 accumulator, within 300 MB (the bar; the rows gathered from the
# input are paid for by grad_input, which the slab loop does not hold yet). Slabs of 128 MiB became this rule in
# benchmarks/NOTES.md, row 19.
_WORKSPACE_BYTES = 300 * 10**6
_SLAB_MIN_BYTES, _SLAB_MAX_BYTES = 32 << 20, 256 << 20
_SLAB_MARGIN = 16 << 20
_SLAB_BYTES: int | None = None  # a fixed slab size instead of the rule (tests: 1 gives the narrowest slabs)
_SLAB_ALIGN = 256  # columns: whole GEMM tiles
# The fused backward's slabs are also capped at this many waves of its kernel's tiles (benchmarks/NOTES.md, rows 25
# and 29): under the byte rule alone they would be 3x the slab path's width at small D, memory that buys no speed;
# 16 waves cost 3-4% at D = 4096, 20 nothing.
_SLAB_WAVES = 20


def _slab_bytes(rows: int, dim: int) -> int:
    if _SLAB_BYTES is not None:
        return _SLAB_BYTES
    free = _WORKSPACE_BYTES - rows * dim * 4 - _SLAB_MARGIN
    return min(_SLAB_MAX_BYTES, max(_SLAB_MIN_BYTES, free))


def _slab_columns(rows: int, dim: int, vocab: int, elem: int, cap: int | None = None) -> int:
    columns = _slab_bytes(rows, dim) // max(rows * elem, 1)
    if cap is not None and _SLAB_BYTES is None:
        columns = min(columns, cap)
    columns = max(_SLAB_ALIGN, columns // _SLAB_ALIGN * _SLAB_ALIGN)
    return min(vocab, columns)


def _slabs(rows: int, dim: int, vocab: int, elem: int, cap: int | None = None):
    width = _slab_columns(rows, dim, vocab, elem, cap)
    for start in range(0, vocab, width):
        yield start, min(vocab, start + width)


_MIXED_MM: dict = {}  # device type -> whether torch.mm(..., out_dtype=torch.float32) runs there


def _mixed_mm_supported(device: torch.device) -> bool:
    if device.type not in _MIXED_MM:
        try:
            a = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
            torch.mm(a, a, out_dtype=torch.float32)
            _MIXED_MM[device.type] = True
        except (RuntimeError, TypeError, NotImplementedError):
            _MIXED_MM[device.type] = False
    return _MIXED_MM[device.type]


_MIXED_ADDMM: dict = {}  # device type -> whether torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc) runs there


def _mixed_addmm_supported(device: torch.device) -> bool:
    if device.type not in _MIXED_ADDMM:
        try:
            a = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
            acc = torch.ones(1, 1, dtype=torch.float32, device=device)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _MIXED_ADDMM[device.type] = float(acc) == 2.0
        except (RuntimeError, TypeError, NotImplementedError):
            _MIXED_ADDMM[device.type] = False
    return _MIXED_ADDMM[device.type]


# Where tensor cores make the float32 logits (the mixed-dtype GEMM), their sums are not rounded to nearest: over
# D = 4096 products the logits came out shrunk towards zero by about 3.7e-6 of |x|, and the loss 1.1e-6 off float64,
# over the bar. Cut into pieces of at most _EXACT_K products, each piece's own GEMM, the pieces added in float32 (an
# addmm into the first one's result), half the bias: 5.4e-7 (benchmarks/NOTES.md, row 20). The forward's logits only:
# the loss is their sum; the backward's gradient is at bf16 rounding anyway.
_EXACT_K = 2048


def _mm_float32(a: Tensor, b: Tensor, exact: bool = False) -> Tensor:
    """``a @ b`` as float32, from operands of any float dtype: one GEMM with float32 output where the device has it
    (cuBLAS), in pieces of at most ``_EXACT_K`` products if ``exact``; else on float32 copies (the CPU path)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b.float())
    if not _mixed_mm_supported(a.device):
        return torch.mm(a.float(), b.float())
    depth = a.shape[1]
    pieces = -(-depth // _EXACT_K) if exact and _mixed_addmm_supported(a.device) else 1
    step = -(-depth // (pieces * 64)) * 64  # 16-byte aligned slices
    out = torch.mm(a[:, :step], b[:step], out_dtype=torch.float32)
    for lo in range(step, depth, step):
        torch.addmm(out, a[:, lo:lo + step], b[lo:lo + step], out_dtype=torch.float32, out=out)
    return out


def _slab_logits(input: Tensor, weight: Tensor, bias: Tensor | None, lo: int, hi: int, exact: bool = False) -> Tensor:
    """``[1, N, hi - lo]`` float32 logits of the vocabulary slab ``[lo, hi)``; ``exact``: the forward's (see
    ``_EXACT_K``)."""
    logits = _mm_float32(input, weight[lo:hi].t(), exact)
    if bias is not None:
        logits += bias[lo:hi].float()
    return logits.unsqueeze(0)


# The Triton backend's fused kernels (_fused), on since benchmarks/NOTES.md row 24 (both on: 5-6% less time end to
# end at D = 2048/4096, V = 32000-256000 on the H100, the same peak memory); False gives the slab path.
FUSED_FORWARD = True  # the forward is one kernel, GEMM tiles + statistics
FUSED_BACKWARD = True  # the backward's logits GEMM writes the gradient in its epilogue


def _fused(flag: bool, input: Tensor, weight: Tensor, backend: str) -> bool:
    """Whether a phase takes its fused Triton kernel (``fastce/kernels/triton_linear.py``, ``triton_linear_grad.py``):
    its ``flag`` on, the Triton backend, bf16/fp16 operands of one dtype, on a GPU or in Triton's interpreter (CPU
    tensors with TRITON_INTERPRET=1)."""
    if not flag or backend != "triton":
        return False
    if input.device.type != "cuda" and not (input.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    from .kernels import triton_linear

    return triton_linear.supports(input, weight)


def linear_stats_impl(input: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int,
                      backend: str, softcap: float = 0.0, label_smoothing: float = 0.0, z_loss: float = 0.0,
                      stats: bool = False, vocab_start: int = 0) -> Tensor:
    """``[N, 5]`` merged statistics (fastce/stats.py) of the rows of ``input @ weight.T + bias``, slab by slab (or in
    one kernel that never writes the logits: ``FUSED_FORWARD``). The weight's rows are the vocabulary ids
    ``[vocab_start, vocab_start + V)`` (a shard of a larger vocabulary)."""
    spec = LossSpec(softcap, label_smoothing, z_loss, stats)
    rows, vocab = input.shape[0], weight.shape[0]
    if rows and _fused(FUSED_FORWARD, input, weight, backend):
        from .kernels import triton_linear

        merged = torch.empty((rows, _stats.STATS_FIELDS), dtype=torch.float32, device=input.device)
        triton_linear.linear_stats(input, weight, bias, targets, vocab_start, ignore_index, merged, spec)
        return merged
    parts = []
    for lo, hi in _slabs(rows, input.shape[1], vocab, 4):
        logits = _slab_logits(input, weight, bias, lo, hi, exact=True)
        parts.append(run_shard_stats(logits, targets.unsqueeze(0), vocab_start + lo, ignore_index, backend, spec))
    if not parts:
        return torch.zeros((rows, _stats.STATS_FIELDS), dtype=torch.float32, device=input.device)
    return _stats.merge(torch.stack(parts))[0]


linear_stats = torch.library.custom_op("fastce::linear_stats", linear_stats_impl, mutates_args=())


@linear_stats.register_fake
def _(input, weight, bias, targets, ignore_index, backend, softcap=0.0, label_smoothing=0.0, z_loss=0.0, stats=False,
      vocab_start=0):
    return input.new_empty((input.shape[0], _stats.STATS_FIELDS), dtype=torch.float32)


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with ``acc`` float32: accumulated in float32 whatever the operands' dtype. Where the device
    has a mixed-dtype ``addmm`` (cuBLAS), one GEMM whose epilogue adds into ``acc``: no float32 product written,
    read back and added (3 passes over ``[N, D]`` float32 per slab)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b.float())
    elif _mixed_addmm_supported(a.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif _mixed_mm_supported(a.device):
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.addmm_(a.float(), b.float())


def linear_grads_impl(input: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, row: Tensor,
                      ignore_index: int, backend: str, need_input: bool, need_weight: bool, need_bias: bool,
                      softcap: float = 0.0, label_smoothing: float = 0.0, z_loss: float = 0.0, vocab_start: int = 0,
                      vocab_size: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients (input, weight, bias; an empty tensor for each not needed) of ``sum_n scale_n * loss_n`` given
    each row's merged ``(m, s, scale)`` in ``row`` ``[N, 3]``. For a shard of a larger vocabulary: the weight's rows
    are the ids ``[vocab_start, vocab_start + V)`` of ``vocab_size`` in all (0: the weight's V); ``grad_input`` is
    then this shard's part of the sum."""
    spec = LossSpec(softcap, label_smoothing, z_loss)
    rows, vocab = input.shape[0], weight.shape[0]
    total = vocab_size or vocab
    acc = torch.zeros(input.shape, dtype=torch.float32, device=input.device) if need_input else None
    grad_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    grad_bias = torch.empty_like(bias) if need_bias else weight.new_empty(0)
    row3 = row.unsqueeze(0).contiguous()
    targets3 = targets.unsqueeze(0)
    in_place = weight.dtype == torch.float32
    casts = getattr(kernels(backend), "SHARD_GRAD_CASTS", True)  # else: the epilogue in place, then a cast
    fused = rows > 0 and _fused(FUSED_BACKWARD, input, weight, backend)  # no float32 slab: only the gradient's
    if fused:
        from .kernels import triton_linear_grad
    buffer = None
    elem = weight.element_size() if fused else 4 + (0 if in_place else weight.element_size())
    # the fused kernel's slab (its gradient only, 2 bytes an element) is no wider than _SLAB_WAVES waves of its tiles
    cap = triton_linear_grad.slab_columns(rows, input.device, _SLAB_WAVES) if fused else None
    for lo, hi in _slabs(rows, input.shape[1], vocab, elem, cap):
        if buffer is None:  # the gradient in the weight's dtype, for the GEMMs; one buffer for every slab
            buffer = input.new_empty(0) if in_place else weight.new_empty(rows * (hi - lo))
        if fused:  # one kernel: the logits GEMM, the gradient in its epilogue
            grad = buffer[:rows * (hi - lo)].view(1, rows, hi - lo)
            triton_linear_grad.linear_grad(input, weight[lo:hi], None if bias is None else bias[lo:hi], targets, row,
                                           vocab_start + lo, total, ignore_index, grad[0], spec)
        else:
            logits = _slab_logits(input, weight, bias, lo, hi)
            grad = logits if in_place else buffer[:logits.numel()].view(logits.shape)
            if in_place or casts:
                run_shard_grad(logits, targets3, vocab_start + lo, total, ignore_index, row3, grad, backend, spec)
            else:
                run_shard_grad(logits, targets3, vocab_start + lo, total, ignore_index, row3, logits, backend, spec)
                grad.copy_(logits)
            del logits
        dlogits = grad[0]
        if need_weight:
            torch.mm(dlogits.t(), input, out=grad_weight[lo:hi])
        if need_bias:
            grad_bias[lo:hi] = dlogits.sum(0, dtype=torch.float32)
        if need_input:
            _accumulate_mm(acc, dlogits, weight[lo:hi])
    buffer = grad = dlogits = None  # the slab's gradient freed before grad_input's cast, not held to the return
    grad_input = acc.to(input.dtype) if need_input else input.new_empty(0)
    return grad_input, grad_weight, grad_bias


linear_grads = torch.library.custom_op("fastce::linear_grads", linear_grads_impl, mutates_args=())


@linear_grads.register_fake
def _(input, weight, bias, targets, row, ignore_index, backend, need_input, need_weight, need_bias, softcap=0.0,
      label_smoothing=0.0, z_loss=0.0, vocab_start=0, vocab_size=0):
    return (torch.empty_like(input) if need_input else input.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            torch.empty_like(bias) if need_bias else weight.new_empty(0))


def _op(op, impl):
    return op if torch.compiler.is_compiling() else impl


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``(loss, row_stats)`` of ``input @ weight.T + bias`` against ``targets``: ``sum(row losses) / divisor``
    (``reduce``) or the float32 row losses, and the ``[N, 3]`` (lse, entropy, correct) of ``spec.stats``."""

    @staticmethod
    def forward(ctx, input, weight, bias, targets, divisor, ignore_index, reduce, backend, spec):
        merged = _op(linear_stats, linear_stats_impl)(input, weight, bias, targets, ignore_index, backend,
                                                      spec.softcap, spec.label_smoothing, spec.z_loss, spec.stats)
        losses, row_stats = _stats.finish(merged, targets, weight.shape[0], ignore_index, spec)
        if row_stats is None:
            row_stats = losses.new_empty(0)
        ctx.save_for_backward(input, weight, bias, targets, merged[:, :2], divisor)
        ctx.config = (ignore_index, reduce, backend, spec)
        ctx.mark_non_differentiable(row_stats)
        return (_sum_over(losses, divisor) if reduce else losses), row_stats

    @staticmethod
    def backward(ctx, grad_output, _grad_row_stats):
        input, weight, bias, targets, m_s, divisor = ctx.saved_tensors
        ignore_index, reduce, backend, spec = ctx.config
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        if not (need_input or need_weight or need_bias):
            return (None,) * 9
        if reduce:
            scale = (grad_output.double() / torch.where(divisor == 0, float("nan"), divisor)).float()
            scale = scale.expand(input.shape[0])
        else:
            scale = grad_output.float()
        row = torch.cat((m_s, scale.unsqueeze(-1)), dim=-1)
        grads = _op(linear_grads, linear_grads_impl)(
            input, weight, bias, targets, row, ignore_index, backend, need_input, need_weight,
            bool(need_bias and bias is not None), spec.softcap, spec.label_smoothing, spec.z_loss)
        grad_input, grad_weight, grad_bias = (g if need else None for g, need in zip(grads, ctx.needs_input_grad))
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None
