"""Custom ops of the two phases on a column range of rows: ``shard_stats`` and ``shard_grad_`` (contract in
``fastce/kernels/__init__.py``). Used where a row's vocabulary is not in one tensor: the lm_head's vocabulary slabs
(``fastce/linear.py``) and vocabulary shards across ranks (``fastce/distributed.py``).

As in ``ops.py``, each is registered with ``torch.library`` for torch.compile, and eager callers use the Python
implementations directly (``*_impl``) to save the dispatcher's host time.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .backends import kernels
from .spec import LossSpec
from .stats import STATS_FIELDS


def _check(logits: Tensor, targets: Tensor) -> None:
    if logits.dim() != 3 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be [B, T, V] with unit stride over V, got {tuple(logits.shape)} strides {logits.stride()}")
    if targets.shape != logits.shape[:-1] or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int32/int64 {tuple(logits.shape[:-1])}, got {targets.dtype} {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"logits ({logits.device}) and targets ({targets.device}) must share a device")


def shard_stats_impl(logits: Tensor, targets: Tensor, vocab_start: int, ignore_index: int, backend: str,
                     softcap: float = 0.0, label_smoothing: float = 0.0, z_loss: float = 0.0,
                     stats: bool = False) -> Tensor:
    """``[B, T, 5]`` float32 statistics of the columns ``[vocab_start, vocab_start + Vs)`` of each row."""
    _check(logits, targets)
    out = torch.empty((*logits.shape[:-1], STATS_FIELDS), dtype=torch.float32, device=logits.device)
    if out.numel():
        kernels(backend).shard_stats(logits, targets, vocab_start, ignore_index, out,
                                     LossSpec(softcap, label_smoothing, z_loss, stats))
    return out


shard_stats = torch.library.custom_op("fastce::shard_stats", shard_stats_impl, mutates_args=())


@shard_stats.register_fake
def _(logits, targets, vocab_start, ignore_index, backend, softcap=0.0, label_smoothing=0.0, z_loss=0.0, stats=False):
    return logits.new_empty((*logits.shape[:-1], STATS_FIELDS), dtype=torch.float32)


def shard_grad_impl(logits: Tensor, targets: Tensor, vocab_start: int, vocab_size: int, ignore_index: int, row: Tensor,
                    grad: Tensor, backend: str, softcap: float = 0.0, label_smoothing: float = 0.0,
                    z_loss: float = 0.0) -> None:
    """``grad`` (may be ``logits``) = the gradient of the columns ``[vocab_start, vocab_start + Vs)``, scaled per row by
    ``row[..., 2]``, given the merged ``(m, s)`` of each whole row in ``row[..., :2]``."""
    _check(logits, targets)
    if row.shape != (*logits.shape[:-1], 3) or row.dtype != torch.float32 or not row.is_contiguous():
        raise ValueError(f"row must be a contiguous float32 {(*logits.shape[:-1], 3)}, got {row.dtype} {tuple(row.shape)}")
    if grad.shape != logits.shape or grad.dtype not in (torch.float16, torch.bfloat16, torch.float32) \
            or grad.stride(-1) != 1:
        raise ValueError("grad must be a float16/bfloat16/float32 tensor of the logits' shape, with unit stride over V")
    if grad.numel():
        kernels(backend).shard_grad(logits, targets, vocab_start, vocab_size, ignore_index, row, grad,
                                    LossSpec(softcap, label_smoothing, z_loss))


shard_grad_ = torch.library.custom_op("fastce::shard_grad_", shard_grad_impl, mutates_args=("grad",))


@shard_grad_.register_fake
def _(logits, targets, vocab_start, vocab_size, ignore_index, row, grad, backend, softcap=0.0, label_smoothing=0.0,
      z_loss=0.0):
    return None


def run_shard_stats(logits: Tensor, targets: Tensor, vocab_start: int, ignore_index: int, backend: str,
                    spec: LossSpec) -> Tensor:
    """``shard_stats`` through the custom op under torch.compile, its implementation in eager mode."""
    op = shard_stats if torch.compiler.is_compiling() else shard_stats_impl
    return op(logits, targets, vocab_start, ignore_index, backend, spec.softcap, spec.label_smoothing, spec.z_loss,
              spec.stats)


def run_shard_grad(logits: Tensor, targets: Tensor, vocab_start: int, vocab_size: int, ignore_index: int, row: Tensor,
                   grad: Tensor, backend: str, spec: LossSpec) -> None:
    """``shard_grad_`` as ``run_shard_stats`` runs ``shard_stats``."""
    op = shard_grad_ if torch.compiler.is_compiling() else shard_grad_impl
    op(logits, targets, vocab_start, vocab_size, ignore_index, row, grad, backend, spec.softcap, spec.label_smoothing,
       spec.z_loss)
