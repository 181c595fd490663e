"""Torch custom ops over the kernels: validate, allocate, launch. No autograd here (see ``function.py``).

Registered with ``torch.library`` so that ``torch.compile(fullgraph=True)`` treats each as one opaque node
(with a fake implementation for tracing) instead of breaking the graph. In eager mode ``function.py`` calls the
same Python implementations directly (``*_impl``): the custom-op dispatcher costs ~50-100 us of host time a call,
as much as the kernel at small shapes.
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor

from .backends import kernels

LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


def _bad_targets(targets: Tensor, vocab_size: int, ignore_index: int) -> Tensor:
    return (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))


def _raise_bad_target(targets: Tensor, vocab_size: int, ignore_index: int) -> None:
    bad = _bad_targets(targets, vocab_size, ignore_index)
    position = tuple(int(i) for i in bad.nonzero()[0])
    raise ValueError(
        f"target {int(targets[position])} at position {position} is outside [0, {vocab_size}) "
        f"and is not ignore_index={ignore_index}"
    )


def validate_targets(targets: Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raise ``ValueError`` naming the first target outside ``[0, vocab_size)`` that is not ``ignore_index``.

    This reads one bool back to the host (a synchronisation); ``validate=False`` skips it, and the kernels then
    give such a row a NaN loss without reading out of bounds.
    """
    if bool(_bad_targets(targets, vocab_size, ignore_index).any()):
        _raise_bad_target(targets, vocab_size, ignore_index)


class _OverlappedValidation:
    """Validation that does not leave the GPU idle: the check is queued before the kernel, its one-byte answer is
    copied to pinned memory, and the host waits for that copy only (not for the kernel) before it decides.

    The kernel is safe on bad targets (a NaN row, no out-of-bounds read), so launching it before the answer is
    known is harmless; its outputs are dropped when the check raises. In place, the answer's device copy ``bad`` is
    also the kernel's skip flag: the launch writes nothing when a target is bad, so the caller's logits survive.
    """

    # One pinned flag and one event per thread and device, reused: allocating them each call costs more.
    _buffers = threading.local()

    def __init__(self, targets: Tensor, vocab_size: int, ignore_index: int):
        self.args = (targets, vocab_size, ignore_index)
        per_device = self._buffers.__dict__.setdefault("per_device", {})
        if targets.device not in per_device:
            per_device[targets.device] = (torch.empty((), dtype=torch.bool, pin_memory=True), torch.cuda.Event())
        self.flag, self.ready = per_device[targets.device]
        self.bad = _bad_targets(*self.args).any()  # 0-dim bool on the device: the kernels' skip flag in place
        self.flag.copy_(self.bad, non_blocking=True)
        self.ready.record()

    def check(self) -> None:
        # Poll rather than event.synchronize(): on the H100 VM a blocking wait cost ~0.6 ms of wake-up latency per
        # call, several times the wait itself (benchmarks/NOTES.md).
        while not self.ready.query():
            pass
        if bool(self.flag):
            _raise_bad_target(*self.args)


def _start_validation(validate: bool, targets: Tensor, vocab_size: int, ignore_index: int):
    """None, or an object whose ``check()`` raises after the launch; CPU tensors are checked at once."""
    if not validate:
        return None
    if targets.is_cuda:
        return _OverlappedValidation(targets, vocab_size, ignore_index)
    validate_targets(targets, vocab_size, ignore_index)
    return None


def launch_fwd(
    logits: Tensor, targets: Tensor, divisor: Tensor, ignore_index: int, compute_grad: bool, validate: bool, backend: str
):
    """``cross_entropy_fwd_impl`` without the wait: ``(losses, grad, pending)``, where ``pending`` is None or has a
    ``check()`` that raises on a bad target. The eager path queues more GPU work (the loss's sum) before it calls
    ``check()``, so the GPU has queued work while the host waits for the answer."""
    _check_layout(logits, targets, divisor)
    pending = _start_validation(validate, targets, logits.shape[-1], ignore_index)
    losses = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if compute_grad else logits.new_empty(0)
    kernels(backend).cross_entropy_fwd(logits, targets, divisor, losses, grad if compute_grad else None, ignore_index)
    return losses, grad, pending


def cross_entropy_fwd_impl(
    logits: Tensor, targets: Tensor, divisor: Tensor, ignore_index: int, compute_grad: bool, validate: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """Per-row float32 losses ``[B, T]`` and, if ``compute_grad``, the gradient ``[B, T, V]`` divided by ``divisor``
    (else an empty tensor)."""
    losses, grad, pending = launch_fwd(logits, targets, divisor, ignore_index, compute_grad, validate, backend)
    if pending is not None:
        pending.check()
    return losses, grad


cross_entropy_fwd = torch.library.custom_op("fastce::cross_entropy_fwd", cross_entropy_fwd_impl, mutates_args=())


@cross_entropy_fwd.register_fake
def _(logits, targets, divisor, ignore_index, compute_grad, validate, backend):
    losses = logits.new_empty(logits.shape[:-1], dtype=torch.float32)
    return losses, logits.new_empty(logits.shape) if compute_grad else logits.new_empty(0)


def launch_fwd_inplace(
    logits: Tensor, targets: Tensor, divisor: Tensor, ignore_index: int, validate: bool, backend: str
):
    """``cross_entropy_fwd_inplace_impl`` without the wait: ``(losses, pending)``, as ``launch_fwd``. The kernel
    gets the check's device-side answer as its skip flag: on a bad target it writes nothing, so the caller's logits
    survive the error, and the host need not wait for the answer before the launch."""
    _check_layout(logits, targets, divisor)
    pending = _start_validation(validate, targets, logits.shape[-1], ignore_index)
    losses = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    skip = pending.bad if pending is not None else None
    kernels(backend).cross_entropy_fwd(logits, targets, divisor, losses, logits, ignore_index, skip)
    return losses, pending


def cross_entropy_fwd_inplace_impl(
    logits: Tensor, targets: Tensor, divisor: Tensor, ignore_index: int, validate: bool, backend: str
) -> Tensor:
    """Per-row float32 losses; the gradient (divided by ``divisor``) overwrites ``logits``, unless a target is bad
    (``ValueError``, the logits untouched)."""
    losses, pending = launch_fwd_inplace(logits, targets, divisor, ignore_index, validate, backend)
    if pending is not None:
        pending.check()
    return losses


cross_entropy_fwd_inplace = torch.library.custom_op(
    "fastce::cross_entropy_fwd_inplace", cross_entropy_fwd_inplace_impl, mutates_args=("logits",)
)


@cross_entropy_fwd_inplace.register_fake
def _(logits, targets, divisor, ignore_index, validate, backend):
    return logits.new_empty(logits.shape[:-1], dtype=torch.float32)


def scale_grad_impl(grad: Tensor, grad_output: Tensor, backend: str) -> None:
    """``grad *= grad_output`` row by row (``grad_output`` 0-dim or ``[B, T]``), skipping factors equal to 1 on the device."""
    if grad_output.dim() not in (0, 2):
        raise ValueError(f"grad_output must be 0-dim or [B, T], got {tuple(grad_output.shape)}")
    kernels(backend).scale_grad_(grad, grad_output.to(device=grad.device, dtype=torch.float32))


scale_grad_ = torch.library.custom_op("fastce::scale_grad_", scale_grad_impl, mutates_args=("grad",))


@scale_grad_.register_fake
def _(grad, grad_output, backend):
    return None
