"""The fused lm_head's backward logits GEMM in one Triton kernel (``triton_linear_grad_kernels.py``): the gradient of
the logits of a vocabulary slab (contract: ``shard_grad`` in ``fastce/kernels/__init__.py``) straight from ``input``
and ``weight``, in the weight's dtype, no float32 logits in memory. Knows nothing of autograd.

``linear_grad`` launches ``_linear_grad_kernel`` over (row tiles x vocabulary splits), planned as the forward's
(``triton_linear.plan``: splits that fill the SMs' waves, row tiles grouped so that the input tiles stay in L2).

**Configurations** (``CONFIGS``, named as ``triton_linear``'s, all with one accumulator: PIECE_K = 0): the forward's
one-piece tiles, 128 x 256 TMA first (9.50 ms at 7165 x 4096 x 128256 in the forward, 792 TFLOP/s, faster than
cuBLAS's 9.66; benchmarks/NOTES.md, row 22). Nothing is autotuned at a call: ``choose_config`` returns
``DEFAULT_CONFIG`` on a GPU (unmeasured in this kernel: the forward's fastest tile) and ``INTERPRET_CONFIG`` in
Triton's interpreter; ``linear_grad(..., config=name)`` runs any other. The TMA ones also store the gradient tile
through a tensor descriptor where the gradient's rows are 16-byte aligned (else pointer stores).
"""
from __future__ import annotations

import torch
import triton

from ..spec import PLAIN, LossSpec
from . import triton_linear
from .triton_ce import _options
from .triton_linear import TensorDescriptor, _config, _tma_here, supports
from .triton_linear_grad_kernels import _linear_grad_kernel

# Shared memory of the TMA ones at 128 x 256: 48 KiB a stage of operands, and the gradient tile's store (64 KiB
# bf16) goes through shared memory too: 3 stages 208 KiB, 4 would not fit the H100's 227 KiB (hence 2 and 3).
CONFIGS = dict((
    _config(128, 256, 64, 0, 8, 3, tma=True),
    _config(128, 256, 64, 0, 8, 2, tma=True),
    _config(128, 128, 64, 0, 8, 4, tma=True),
    _config(128, 128, 64, 0, 4, 4, tma=True),
    _config(64, 256, 64, 0, 4, 4, tma=True),
    _config(64, 128, 64, 0, 4, 4, tma=True, resident=2),
    _config(128, 256, 64, 0, 8, 3),
    _config(128, 128, 64, 0, 8, 4),
))
DEFAULT_CONFIG = "m128n256k64p0w8s3-tma"  # not measured yet in this kernel: the forward's fastest one-piece tile
# The interpreter's (CPU tests): small tiles, so that several tiles, K steps and splits occur at test sizes.
INTERPRET_CONFIG = "m32n64k32p0w4s1"
CONFIGS.update((_config(32, 64, 32, 0, 4, 1), _config(16, 32, 16, 0, 4, 1), _config(32, 64, 32, 0, 4, 1, True)))


def choose_config(device: torch.device) -> str:
    return DEFAULT_CONFIG if device.type == "cuda" else INTERPRET_CONFIG


def plan(rows: int, vocab: int, device: torch.device, config: str | None = None, num_splits: int | None = None,
         dim: int = 0, elem: int = 2) -> tuple[int, int, int]:
    """(splits, columns per split, group_m): ``triton_linear.plan`` with this kernel's configurations."""
    return triton_linear.plan(rows, vocab, device, config or choose_config(device), num_splits, dim, elem, CONFIGS)


def slab_columns(rows: int, device: torch.device, waves: int, config: str | None = None) -> int:
    """The columns of a slab that gives each SM ``waves`` of this kernel's tiles over ``rows`` rows (whole tiles):
    wider slabs cost memory and gain little, the last wave's idle share being at most ``1 / waves`` already."""
    cfg = CONFIGS[config or choose_config(device)]
    row_tiles = triton.cdiv(max(rows, 1), cfg.kwargs["BLOCK_M"])
    sms = triton_linear._sms(device) * cfg.kwargs["RESIDENT"]
    return triton.cdiv(waves * sms, row_tiles) * cfg.kwargs["BLOCK_N"]


def _tma_store_here(grad: torch.Tensor) -> bool:
    return grad.stride(1) == 1 and (grad.stride(0) * grad.element_size()) % 16 == 0 and grad.data_ptr() % 16 == 0


def linear_grad(input, weight, bias, targets, row, vocab_start: int, vocab_size: int, ignore_index: int, grad,
                spec: LossSpec = PLAIN, *, config: str | None = None, num_splits: int | None = None) -> None:
    """``shard_grad`` of the logits ``input @ weight.T + bias``, never written: ``grad`` ``[N, Vs]`` gets
    ``scale * grad_j`` of each row over the columns of ``weight`` (the ids ``[vocab_start, vocab_start + Vs)`` of
    ``vocab_size`` in all), 0 on ignored rows, in its own dtype; its other columns (a wider buffer) are not touched.

    input [N, D] and weight [Vs, D] bf16/fp16 of one dtype (``supports``), any strides; bias None or [Vs] any float
    dtype; targets [N] int32/int64 (whole-vocabulary ids, or ``ignore_index``), any stride; row [N, 3] float32: (m, s,
    scale) of each whole row; grad [N, Vs] float16/bfloat16 with ``stride(1) == 1``. ``config``: a name in
    ``CONFIGS`` (default ``choose_config``); ``num_splits`` overrides the plan's splits (tests)."""
    rows, dim = input.shape
    vocab = weight.shape[0]
    if rows == 0 or vocab == 0:
        return
    if not supports(input, weight):
        raise ValueError(f"linear_grad takes bf16/fp16 input and weight of one dtype and width, got {input.dtype} "
                         f"{tuple(input.shape)} and {weight.dtype} {tuple(weight.shape)}")
    if grad.shape != (rows, vocab) or grad.stride(1) != 1 or grad.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"grad must be [{rows}, {vocab}] bf16/fp16 with unit column stride, got {grad.dtype} "
                         f"{tuple(grad.shape)} strides {grad.stride()}")
    cfg = CONFIGS[config or choose_config(input.device)]
    block_m, block_n, block_k = (cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    row_tiles = triton.cdiv(rows, block_m)
    splits, split_len, group_m = plan(rows, vocab, input.device, config, num_splits, dim, input.element_size())
    scalars, flags = _options(spec, vocab_size)
    row = row.contiguous()
    bias = bias.contiguous() if bias is not None else None
    tma = cfg.kwargs["TMA"] and _tma_here(input, weight)
    tma_store = tma and _tma_store_here(grad)
    x_arg, w_arg, g_arg = input, weight, grad
    if tma:
        x_arg = TensorDescriptor(input, [rows, dim], [input.stride(0), 1], [block_m, block_k])
        w_arg = TensorDescriptor(weight, [vocab, dim], [weight.stride(0), 1], [block_n, block_k])
    if tma_store:
        g_arg = TensorDescriptor(grad, [rows, vocab], [grad.stride(0), 1], [block_m, block_n])
    _linear_grad_kernel[(row_tiles * splits,)](
        x_arg, input.stride(0), input.stride(1), w_arg, weight.stride(0), weight.stride(1),
        bias if bias is not None else weight, targets, targets.stride(0), row, g_arg, grad.stride(0),
        rows, vocab, dim, split_len, splits, group_m, vocab_start, ignore_index,
        scalars["softcap"], scalars["softcap_k"], scalars["smoothing_per_class"], scalars["target_coefficient"],
        scalars["z_loss"], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=dim % block_k == 0,
        HAS_BIAS=bias is not None, **flags, TMA=tma, TMA_STORE=tma_store, INTERPRET=input.device.type != "cuda",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
