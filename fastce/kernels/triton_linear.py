"""The fused lm_head's forward in one Triton kernel (``triton_linear_kernels.py``): each row's statistics (contract:
``shard_stats`` in ``fastce/kernels/__init__.py``) straight from ``input`` and ``weight``, no logits in memory.

``linear_stats`` launches ``_linear_stats_kernel`` over (row tiles x vocabulary splits) and merges each row's splits
with ``triton_kernels._merge_stats_kernel`` (a fixed order: deterministic). Knows nothing of autograd.

**Configurations** (``CONFIGS``, ``triton.Config``s named by their parameters): BLOCK_M x BLOCK_N output tiles, BLOCK_K
steps, PIECE_K products per exact piece (0: one piece, the plain GEMM's biased sums), warps and pipeline stages.
Nothing is autotuned at a call: ``choose_config`` returns ``DEFAULT_CONFIG`` on a GPU (the fastest exact one on the
H100 in ``benchmarks/probe_linear.py``'s part "fused") and ``INTERPRET_CONFIG`` in Triton's interpreter;
``linear_stats(..., config=name)`` runs any other.

**Splits.** Programs are (row tile, split) pairs, each split a range of whole BLOCK_N tiles; the launch order runs
``group_m`` = SMs / S row tiles x all S splits as a group, about one wave: its programs read each weight tile at
about the same time (the weight comes from memory ``row_tiles / group_m`` times), and each its input tile once per
column tile, so the group's ``group_m`` input tiles (BLOCK_M x D each) must stay in L2: at most ``_L2_INPUT_BYTES``,
which bounds S from below when there are many row tiles. Within that, the busiest SM's time in tiles is
``ceil(row_tiles * S / SMs) * ceil(column_tiles / S)`` (wave quantisation and the unequal last split together), and
``choose_splits`` takes the fewest splits within 2% of the best such time (the fewer, the fewer reads of the weight).
At 7165 x 4096 x 128256 with 128 x 128 tiles on 132 SMs (56 row tiles of 1 MiB, 1002 column tiles): S >= 6, and
S = 7: 392 programs in 3 waves, 98.4% of the SMs' time busy (S = 2, one wave of 112 programs, would leave 15% idle
and hold 66 MiB of input tiles), groups of 19 row tiles, the weight read 3 times (3 GB).
"""
from __future__ import annotations

import functools
import math

import torch
import triton

from ..spec import PLAIN, LossSpec
from .triton_blocks import STATS_FIELDS
from .triton_ce import _f32, _num_sms
from .triton_kernels import _merge_stats_kernel
from .triton_linear_kernels import _linear_stats_kernel

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton before host-side tensor descriptors: the TMA configurations run with pointer loads
    TensorDescriptor = None


def _config(block_m, block_n, block_k, piece_k, num_warps, num_stages, tma=False, resident=1
            ) -> tuple[str, triton.Config]:
    """A named configuration. ``resident``: programs an SM holds at once (registers and shared memory allow), for the
    choice of splits (a launcher-only entry of ``kwargs``)."""
    assert piece_k % block_k == 0, "a piece is whole BLOCK_K steps"
    name = f"m{block_m}n{block_n}k{block_k}p{piece_k}w{num_warps}s{num_stages}" + ("-tma" if tma else "")
    return name, triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "PIECE_K": piece_k,
                                "TMA": tma, "RESIDENT": resident}, num_warps=num_warps, num_stages=num_stages)


# Hopper's. Registers and shared memory from ptxas for sm_90 (Triton 3.8), plain / with every option: the exact ones
# (PIECE_K > 0) hold two float32 tiles, the piece and the total (2 x 64 registers a thread at 128 x 128 in 8 warps):
# 254 / 255 with pointer loads, 166 / 255 with the TMA; 128 x 256 would need 2 x 128 and spill. The 64 x 128 ones in
# 4 warps (96 KiB, <= 255 registers) fit two programs on an SM, one's MMAs running through the other's epilogue and
# piece ends; with the TMA and 3 stages (72 KiB, 166 registers), three. The one-piece ones (p0) show what the pieces
# cost and how fast the tile runs without them; their loss carries the tensor cores' bias, as one cuBLAS GEMM's does
# (128 x 256 spills with the options on: a speed reference for the plain loss only). None other spills (at most one
# spilled register, in the epilogue). "-tma": operands loaded by the TMA (tensor descriptors) instead of pointers.
CONFIGS = dict((
    _config(128, 128, 64, 512, 8, 4),
    _config(128, 128, 64, 512, 8, 3),
    _config(128, 128, 64, 1024, 8, 4),
    _config(128, 128, 64, 256, 8, 4),
    _config(64, 128, 64, 512, 4, 4, resident=2),
    _config(128, 128, 64, 0, 8, 4),
    _config(128, 256, 64, 0, 8, 3),
    _config(128, 128, 64, 512, 8, 4, tma=True),
    _config(128, 128, 64, 512, 8, 3, tma=True),
    _config(64, 128, 64, 512, 4, 4, tma=True, resident=2),
    _config(64, 128, 64, 512, 4, 3, tma=True, resident=3),
    _config(128, 128, 64, 0, 8, 4, tma=True),
    _config(128, 256, 64, 0, 8, 3, tma=True),
))
# Measured on the H100 (benchmarks/NOTES.md, row 22): the fastest exact configuration, 12.55 ms at 7165 x 4096 x
# 128256 (600 TFLOP/s; cuBLAS's bf16 GEMM 9.66 ms), the pointer-load one 16.38 ms. Without the TMA here, pointer loads.
DEFAULT_CONFIG = "m128n128k64p512w8s4-tma"
# The interpreter's (CPU tests): small tiles, so that several tiles, K steps, pieces and splits occur at test sizes.
INTERPRET_CONFIG = "m32n64k32p64w4s1"
CONFIGS.update((_config(32, 64, 32, 64, 4, 1), _config(16, 32, 16, 32, 4, 1), _config(32, 64, 32, 64, 4, 1, True)))

_MAX_SPLITS = 64
_SPLITS_SLACK = 1.02  # fewer splits at up to 2% more of the busiest SM's time: fewer reads of the weight from memory
_L2_INPUT_BYTES = 24 << 20  # a launch group's input tiles, read again at every column tile: half the H100's L2
_GPU_DTYPES = (torch.bfloat16, torch.float16)


def supports(input: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear_stats`` takes these operands: bf16/fp16 of one dtype (``tl.dot`` on float32 would run on TF32,
    which is not exact; the slab path's cuBLAS GEMM serves float32), at least one vocabulary column."""
    return input.dtype in _GPU_DTYPES and weight.dtype == input.dtype and weight.shape[0] > 0 \
        and input.shape[1] > 0 and input.shape[1] == weight.shape[1]


def _tma_here(input: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the TMA configurations can take these operands here (else they run with pointer loads): Hopper or newer
    (or the interpreter), Triton's host-side tensor descriptors, rows of unit stride, 16-byte aligned."""
    if TensorDescriptor is None:
        return False
    if input.device.type == "cuda" and torch.cuda.get_device_capability(input.device)[0] < 9:
        return False
    return all(t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in (input, weight))


def choose_config(device: torch.device) -> str:
    """The configuration a call takes when none is named (see the module's docstring)."""
    return DEFAULT_CONFIG if device.type == "cuda" else INTERPRET_CONFIG


@functools.lru_cache(maxsize=1024)
def choose_splits(row_tiles: int, column_tiles: int, sms: int, row_tile_bytes: int = 0) -> int:
    """Vocabulary splits per row tile (see the module's docstring); ``row_tile_bytes``: one input tile's."""
    fewest = 1
    if row_tiles * row_tile_bytes > _L2_INPUT_BYTES:
        fewest = -(-sms * row_tile_bytes // _L2_INPUT_BYTES)
    candidates = range(min(fewest, column_tiles, _MAX_SPLITS), min(column_tiles, _MAX_SPLITS) + 1)
    times = [-(-row_tiles * splits // sms) * -(-column_tiles // splits) for splits in candidates]
    return next(splits for splits, time in zip(candidates, times) if time <= min(times) * _SPLITS_SLACK)


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def plan(rows: int, vocab: int, device: torch.device, config: str | None = None, num_splits: int | None = None,
         dim: int = 0, elem: int = 2, configs: dict | None = None) -> tuple[int, int, int]:
    """(splits, columns per split, group_m) of a launch over ``rows`` x ``dim`` inputs of ``elem`` bytes;
    ``num_splits``: about that many splits instead of ``choose_splits``'s; ``configs``: where ``config`` is named
    (the backward's kernel passes its own)."""
    cfg = (configs or CONFIGS)[config or choose_config(device)]
    row_tiles, column_tiles = triton.cdiv(rows, cfg.kwargs["BLOCK_M"]), triton.cdiv(vocab, cfg.kwargs["BLOCK_N"])
    sms = _sms(device) * cfg.kwargs["RESIDENT"]
    splits = min(num_splits or choose_splits(row_tiles, column_tiles, sms, cfg.kwargs["BLOCK_M"] * dim * elem),
                 column_tiles)
    split_len = triton.cdiv(column_tiles, splits) * cfg.kwargs["BLOCK_N"]
    splits = triton.cdiv(vocab, split_len)
    return splits, split_len, max(1, min(row_tiles, triton.cdiv(sms, splits)))


@functools.lru_cache(maxsize=64)
def _scalars(softcap: float) -> tuple[float, float]:
    return _f32(softcap), (_f32(-2.0 * math.log2(math.e) / softcap) if softcap else 0.0)


def linear_stats(input, weight, bias, targets, vocab_start: int, ignore_index: int, stats, spec: LossSpec = PLAIN, *,
                 config: str | None = None, num_splits: int | None = None, partials=None):
    """``shard_stats`` of the logits ``input @ weight.T + bias``, never written: ``stats`` ``[N, 5]`` float32
    contiguous gets each row's (m, s, x'_t, sum x', r) over the columns of ``weight`` (the ids ``[vocab_start,
    vocab_start + V)``), as ``shard_stats`` defines them.

    input [N, D] and weight [V, D] bf16/fp16 of one dtype (``supports``), any strides; bias None or [V] any float
    dtype, contiguous; targets [N] int32/int64 (whole-vocabulary ids, or ``ignore_index``). ``config``: a name in
    ``CONFIGS`` (default ``choose_config``); ``num_splits`` overrides ``choose_splits`` (tests); ``partials``: a
    ``[N, splits, 5]`` float32 buffer for the splits' records (tests poison it), else allocated here. Returns the
    launched kernel (probes read its registers and spills), or None when there was nothing to launch."""
    rows, dim = input.shape
    vocab = weight.shape[0]
    if rows == 0:
        return
    if not supports(input, weight):
        raise ValueError(f"linear_stats takes bf16/fp16 input and weight of one dtype and width, got {input.dtype} "
                         f"{tuple(input.shape)} and {weight.dtype} {tuple(weight.shape)}")
    cfg = CONFIGS[config or choose_config(input.device)]
    block_m, block_n, block_k, piece_k = (cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "PIECE_K"))
    row_tiles = triton.cdiv(rows, block_m)
    splits, split_len, group_m = plan(rows, vocab, input.device, config, num_splits, dim, input.element_size())
    if splits == 1:
        parts = stats
    elif partials is not None:
        assert partials.shape == (rows, splits, STATS_FIELDS) and partials.is_contiguous()
        parts = partials
    else:
        parts = torch.empty((rows, splits, STATS_FIELDS), dtype=torch.float32, device=input.device)
    softcap, softcap_k = _scalars(spec.softcap)
    bias = bias.contiguous() if bias is not None else None
    pieces = 0 < piece_k < dim
    tma = cfg.kwargs["TMA"] and _tma_here(input, weight)
    x_arg, w_arg = input, weight
    if tma:
        x_arg = TensorDescriptor(input, [rows, dim], [input.stride(0), 1], [block_m, block_k])
        w_arg = TensorDescriptor(weight, [vocab, dim], [weight.stride(0), 1], [block_n, block_k])
    _linear_stats_kernel[(row_tiles * splits,)](
        x_arg, input.stride(0), input.stride(1), w_arg, weight.stride(0), weight.stride(1),
        bias if bias is not None else weight, targets, targets.stride(0), parts,
        rows, vocab, dim, split_len, splits, group_m, vocab_start, ignore_index, softcap, softcap_k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PIECE_STEPS=piece_k // block_k if pieces else 0,
        EVEN_K=dim % block_k == 0, HAS_BIAS=bias is not None, SOFTCAP=spec.softcap != 0.0,
        SUM_X=spec.needs_sum_x, SUM_PX=spec.needs_sum_px, TMA=tma, INTERPRET=input.device.type != "cuda",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        _merge_stats_kernel[(rows,)](parts, stats, NUM_PARTS=splits, PARTS_POW2=triton.next_power_of_2(splits),
                                     SUM_X=spec.needs_sum_x, SUM_PX=spec.needs_sum_px, num_warps=1)
