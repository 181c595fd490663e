"""The autograd layer: one ``torch.autograd.Function`` owns forward and backward for every backend.

The gradient is produced in the forward launch, in the same pass over the logits as the loss (the loss is the
last op of a training forward, so backward always follows); backward only rescales it by ``grad_output``, and
that rescale leaves rows alone whose factor is 1, the usual case, deciding so on the device.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import ops


def _sum_over(losses: Tensor, divisor: Tensor) -> Tensor:
    # float64 sum: deterministic, and exact enough that the loss's relative error stays far below 1e-6.
    # A zero divisor divides by 1 (the sum is then 0 unless the caller's count was wrong; NaN still propagates).
    return (losses.sum(dtype=torch.float64) / torch.where(divisor == 0, 1.0, divisor)).float()


def _fwd(*args):
    """(losses, grad, pending validation or None). Under torch.compile, the custom op (one opaque node), which checks
    before it returns; in eager mode its Python implementation (no dispatcher cost), whose check the caller runs
    once it has queued the loss's sum (see ``ops.launch_fwd``)."""
    if torch.compiler.is_compiling():
        return (*ops.cross_entropy_fwd(*args), None)
    return ops.launch_fwd(*args)


def _check(pending) -> None:
    if pending is not None:
        pending.check()


def _fwd_inplace(logits, *args):
    """(losses, pending validation or None), as ``_fwd``; the gradient overwrites ``logits``."""
    if torch.compiler.is_compiling():
        return ops.cross_entropy_fwd_inplace(logits, *args), None
    losses, pending = ops.launch_fwd_inplace(logits, *args)
    # What the custom op's mutates_args would have done: anything that saved the logits for its own backward
    # now fails autograd's version check instead of reading a gradient.
    torch.autograd.graph.increment_version(logits)
    return losses, pending


def _scale_grad(*args):
    return (ops.scale_grad_ if torch.compiler.is_compiling() else ops.scale_grad_impl)(*args)


class FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, divisor, ignore_index, reduce, inplace, validate, backend):
        if inplace:
            losses, pending = _fwd_inplace(logits, targets, divisor, ignore_index, validate, backend)
            grad = logits
        else:
            losses, grad, pending = _fwd(logits, targets, divisor, ignore_index, True, validate, backend)
        ctx.save_for_backward(grad)
        ctx.backend = backend
        ctx.backward_done = False
        out = _sum_over(losses, divisor) if reduce else losses
        _check(pending)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.backward_done:
            raise RuntimeError("fastce's fused cross-entropy gradient is scaled in place: backward can run only once")
        ctx.backward_done = True
        (grad,) = ctx.saved_tensors
        _scale_grad(grad, grad_output, ctx.backend)
        return grad, None, None, None, None, None, None, None


def fused_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    divisor: Tensor,
    ignore_index: int,
    *,
    reduce: bool,
    inplace: bool,
    validate: bool,
    backend: str,
) -> Tensor:
    """``sum(row losses) / divisor`` (``reduce``) or the float32 row losses ``[B, T]`` (then ``divisor`` must be 1).

    ``logits`` ``[B, T, V]`` with unit stride over V, ``targets`` ``[B, T]`` aligned with them, ``divisor`` a
    0-dim float64 tensor on the logits' device; ``backend`` is concrete (see ``backends.resolve_backend``).
    Gradient work is done only when autograd will need it.
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        return FusedCrossEntropy.apply(logits, targets, divisor, ignore_index, reduce, inplace, validate, backend)
    losses, _, pending = _fwd(logits, targets, divisor, ignore_index, False, validate, backend)
    out = _sum_over(losses, divisor) if reduce else losses
    _check(pending)
    return out
