"""Torch custom ops over the kernels: validate, allocate, launch. No autograd here (see ``function.py``), except the
C++ autograd node of the eager CUDA path's op with a gradient (``launch_causal_lm``).

Registered with ``torch.library`` so that ``torch.compile(fullgraph=True)`` treats each as one opaque node
(with a fake implementation for tracing) instead of breaking the graph. In eager mode ``function.py`` calls the
same Python implementations directly (``*_impl``): the custom-op dispatcher costs ~50-100 us of host time a call,
as much as the kernel at small shapes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .backends import kernels
from .spec import PLAIN, LossSpec
from .validation import raise_answer, start_validation

LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _new_row_stats(logits: Tensor, spec: LossSpec) -> Tensor:
    """The ``[B, T, 3]`` float32 buffer of ``spec.stats`` (an empty tensor without)."""
    if not spec.stats:
        return logits.new_empty(0, dtype=torch.float32)
    return logits.new_empty((*logits.shape[:-1], 3), dtype=torch.float32)


def _spec_kwargs(spec: LossSpec, row_stats: Tensor) -> dict:
    """The launchers' keyword arguments for ``spec``: none for plain cross-entropy (the launch as it always was)."""
    if spec.plain:
        return {}
    return {"spec": spec, "row_stats": row_stats if spec.stats else None}


def _check_layout(logits: Tensor, targets: Tensor, divisor: Tensor) -> None:
    # User-facing checks live in loss.py; these guard the kernels' assumptions against direct callers.
    if logits.dim() != 3 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be [B, T, V] with unit stride over V, got {tuple(logits.shape)} strides {logits.stride()}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16 or float32, got {logits.dtype}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"targets must be int32 or int64, got {targets.dtype}")
    if targets.device != logits.device or divisor.device != logits.device:
        raise ValueError(f"logits ({logits.device}), targets ({targets.device}) and divisor ({divisor.device}) must share a device")
    if divisor.dim() != 0 or divisor.dtype != torch.float64:
        raise ValueError("divisor must be a 0-dim float64 tensor")


def launch_fwd(
    logits: Tensor, targets: Tensor, divisor: Tensor, ignore_index: int, compute_grad: bool, validate: bool, backend: str,
    spec: LossSpec = PLAIN,
):
    """``cross_entropy_fwd_impl`` without the wait: ``(losses, grad, row_stats, pending)``, where ``pending`` is None
    or has a ``check()`` that raises on a bad target. The eager path queues more GPU work (the loss's sum) before it
    calls ``check()``, so the GPU has queued work while the host waits for the answer."""
    _check_layout(logits, targets, divisor)
    pending = start_validation(validate, targets, logits.shape[-1], ignore_index, divisor)
    losses = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if compute_grad else logits.new_empty(0)
    row_stats = _new_row_stats(logits, spec)
    kernels(backend).cross_entropy_fwd(logits, targets, divisor, losses, grad if compute_grad else None, ignore_index,
                                       None, **_spec_kwargs(spec, row_stats))
    return losses, grad, row_stats, pending


def cross_entropy_fwd_impl(
    logits: Tensor, targets: Tensor, divisor: Tensor, ignore_index: int, compute_grad: bool, validate: bool, backend: str,
    softcap: float = 0.0, label_smoothing: float = 0.0, z_loss: float = 0.0, stats: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row float32 losses ``[B, T]``; if ``compute_grad``, the gradient ``[B, T, V]`` divided by ``divisor`` (else
    an empty tensor); if ``stats``, the per-row ``[B, T, 3]`` (lse, entropy, correct) (else an empty tensor)."""
    spec = LossSpec(softcap, label_smoothing, z_loss, stats)
    losses, grad, row_stats, pending = launch_fwd(logits, targets, divisor, ignore_index, compute_grad, validate,
                                                  backend, spec)
    if pending is not None:
        pending.check()
    return losses, grad, row_stats


cross_entropy_fwd = torch.library.custom_op("fastce::cross_entropy_fwd", cross_entropy_fwd_impl, mutates_args=())


@cross_entropy_fwd.register_fake
def _(logits, targets, divisor, ignore_index, compute_grad, validate, backend, softcap=0.0, label_smoothing=0.0,
      z_loss=0.0, stats=False):
    losses = logits.new_empty(logits.shape[:-1], dtype=torch.float32)
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty(0)
    return losses, grad, _new_row_stats(logits, LossSpec(stats=stats))


def launch_fwd_inplace(
    logits: Tensor, targets: Tensor, divisor: Tensor, ignore_index: int, validate: bool, backend: str,
    spec: LossSpec = PLAIN,
):
    """``cross_entropy_fwd_inplace_impl`` without the wait: ``(losses, row_stats, pending)``, as ``launch_fwd``. The
    kernel gets the check's device-side answer as its skip flag: on a bad target it writes nothing, so the caller's
    logits survive the error, and the host need not wait for the answer before the launch."""
    _check_layout(logits, targets, divisor)
    pending = start_validation(validate, targets, logits.shape[-1], ignore_index, divisor)
    losses = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    row_stats = _new_row_stats(logits, spec)
    skip = pending.bad if pending is not None else None
    kernels(backend).cross_entropy_fwd(logits, targets, divisor, losses, logits, ignore_index, skip,
                                       **_spec_kwargs(spec, row_stats))
    return losses, row_stats, pending


def cross_entropy_fwd_inplace_impl(
    logits: Tensor, targets: Tensor, divisor: Tensor, ignore_index: int, validate: bool, backend: str,
    softcap: float = 0.0, label_smoothing: float = 0.0, z_loss: float = 0.0, stats: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-row float32 losses and row statistics (as ``cross_entropy_fwd_impl``); the gradient (divided by
    ``divisor``) overwrites ``logits``, unless a target is bad (``ValueError``, the logits untouched)."""
    spec = LossSpec(softcap, label_smoothing, z_loss, stats)
    losses, row_stats, pending = launch_fwd_inplace(logits, targets, divisor, ignore_index, validate, backend, spec)
    if pending is not None:
        pending.check()
    return losses, row_stats


cross_entropy_fwd_inplace = torch.library.custom_op(
    "fastce::cross_entropy_fwd_inplace", cross_entropy_fwd_inplace_impl, mutates_args=("logits",)
)


@cross_entropy_fwd_inplace.register_fake
def _(logits, targets, divisor, ignore_index, validate, backend, softcap=0.0, label_smoothing=0.0, z_loss=0.0,
      stats=False):
    return logits.new_empty(logits.shape[:-1], dtype=torch.float32), _new_row_stats(logits, LossSpec(stats=stats))


def launch_causal_lm(logits: Tensor, labels: Tensor, shift: bool, ignore_index: int, count: Tensor | None,
                     count_value: float, count_targets: bool, compute_grad: bool, inplace: bool, validate: bool,
                     spec: LossSpec = PLAIN):
    """The eager CUDA path's whole forward as one op: ``(loss, row_stats, divisor)``; see ``fastce_cuda::causal_lm_fwd``
    (``csrc/cross_entropy.h``). With ``compute_grad`` the op is ``fastce_cuda::causal_lm_loss``, whose C++ autograd
    node makes the loss differentiable; the gradient then overwrites the logits with ``inplace``. The label shift, the
    count rule and the check run on the device; with ``validate`` the host waits for the check's answer only, and a
    bad target or count raises ``ValueError`` here (in place, the logits are then untouched). Eager only: neither op
    has a fake implementation, and torch.compile traces ``cross_entropy_fwd`` instead."""
    if compute_grad:
        loss, row_stats, divisor, code, row = kernels("cuda").causal_lm_loss(
            logits, labels, shift, ignore_index, count, count_value, count_targets, validate, inplace, spec)
    else:
        loss, row_stats, divisor, code, row = kernels("cuda").causal_lm_fwd(
            logits, labels, shift, ignore_index, count, count_value, count_targets, validate, spec)
    if code:
        raise_answer(code, row, labels, shift, logits.shape[-1], ignore_index,
                     count if count is not None else count_value)
    return loss, row_stats, divisor


def scale_grad_impl(grad: Tensor, grad_output: Tensor, backend: str) -> None:
    """``grad *= grad_output`` row by row (``grad_output`` 0-dim or ``[B, T]``), skipping factors equal to 1 on the device."""
    if grad_output.dim() not in (0, 2):
        raise ValueError(f"grad_output must be 0-dim or [B, T], got {tuple(grad_output.shape)}")
    kernels(backend).scale_grad_(grad, grad_output.to(device=grad.device, dtype=torch.float32))


scale_grad_ = torch.library.custom_op("fastce::scale_grad_", scale_grad_impl, mutates_args=("grad",))


@scale_grad_.register_fake
def _(grad, grad_output, backend):
    return None
