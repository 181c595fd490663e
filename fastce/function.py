"""The autograd layer: one ``torch.autograd.Function`` owns forward and backward for every backend; the eager CUDA
path of a reduced loss has the same node in C++ (``csrc/causal_lm_autograd.cpp``), which runs no Python.

The gradient is produced in the forward launch, in the same pass over the logits as the loss (the loss is the
last op of a training forward, so backward always follows); backward only rescales it by ``grad_output``, and
that rescale leaves rows alone whose factor is 1, the usual case, deciding so on the device.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import ops
from .spec import PLAIN, LossSpec


def _sum_over(losses: Tensor, divisor: Tensor) -> Tensor:
    """``sum(losses) / divisor`` in float64 (deterministic, and exact enough that the loss's relative error stays far
    below 1e-6), returned as float32. A zero divisor gives 0 when the sum is 0 (every target ignored), else NaN: the
    count contradicts the targets (README, "Semantics"); NaN in the losses or the divisor propagates."""
    total = losses.sum(dtype=torch.float64)
    zero = divisor == 0
    quotient = total / torch.where(zero, torch.ones_like(divisor), divisor)
    return torch.where(zero & (total != 0), torch.full_like(quotient, float("nan")), quotient).float()


def _spec_args(spec: LossSpec) -> tuple:
    return (spec.softcap, spec.label_smoothing, spec.z_loss, spec.stats)


def _fwd(*args, spec: LossSpec):
    """(losses, grad, row_stats, pending validation or None). Under torch.compile, the custom op (one opaque node),
    which checks before it returns; in eager mode its Python implementation (no dispatcher cost), whose check the
    caller runs once it has queued the loss's sum (see ``ops.launch_fwd``)."""
    if torch.compiler.is_compiling():
        return (*ops.cross_entropy_fwd(*args, *_spec_args(spec)), None)
    return ops.launch_fwd(*args, spec)


def _check(pending) -> None:
    if pending is not None:
        pending.check()


def _fwd_inplace(logits, *args, spec: LossSpec):
    """(losses, row_stats, pending validation or None), as ``_fwd``; the gradient overwrites ``logits``."""
    if torch.compiler.is_compiling():
        return (*ops.cross_entropy_fwd_inplace(logits, *args, *_spec_args(spec)), None)
    losses, row_stats, pending = ops.launch_fwd_inplace(logits, *args, spec)
    # What the custom op's mutates_args would have done: anything that saved the logits for its own backward
    # now fails autograd's version check instead of reading a gradient.
    torch.autograd.graph.increment_version(logits)
    return losses, row_stats, pending


def _scale_grad(*args):
    return (ops.scale_grad_ if torch.compiler.is_compiling() else ops.scale_grad_impl)(*args)


class FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, divisor, ignore_index, reduce, inplace, validate, backend, spec):
        if inplace:
            losses, row_stats, pending = _fwd_inplace(logits, targets, divisor, ignore_index, validate, backend,
                                                      spec=spec)
            grad = logits
        else:
            losses, grad, row_stats, pending = _fwd(logits, targets, divisor, ignore_index, True, validate, backend,
                                                    spec=spec)
        ctx.save_for_backward(grad)
        ctx.backend = backend
        ctx.backward_done = False
        ctx.mark_non_differentiable(row_stats)
        out = _sum_over(losses, divisor) if reduce else losses
        _check(pending)
        return out, row_stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_row_stats):
        return _scaled_grad(ctx, grad_output), None, None, None, None, None, None, None, None


def _scaled_grad(ctx, grad_output: Tensor) -> Tensor:
    """The gradient saved by a forward, scaled in place by ``grad_output`` (once: a second backward would scale it
    again; the C++ node raises the same)."""
    if ctx.backward_done:
        raise RuntimeError("fastce's fused cross-entropy gradient is scaled in place: backward can run only once")
    ctx.backward_done = True
    (grad,) = ctx.saved_tensors
    _scale_grad(grad, grad_output, ctx.backend)
    return grad


def direct_cross_entropy(logits: Tensor, labels: Tensor, shift: bool, ignore_index: int, count: Tensor | None,
                         count_value: float, count_targets: bool, *, inplace: bool, validate: bool,
                         spec: LossSpec = PLAIN) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, row_stats, divisor)`` of CUDA ``logits`` ``[B, T, V]`` and ``labels`` ``[B, T]`` on their device,
    shifted by one position with ``shift``; the divisor as ``api.direct_count`` gives it, returned as a 0-dim float64
    tensor; ``row_stats`` as ``fused_cross_entropy``'s. The eager CUDA path of a reduced loss: one op
    (``ops.launch_causal_lm``: shift, count rule, label check, kernels and the float64 sum). Gradient work only when
    autograd needs it; the op's autograd node is then C++ (``csrc/causal_lm_autograd.cpp``: its backward is
    ``FusedCrossEntropy``'s rescale), so that neither forward nor backward runs Python."""
    return ops.launch_causal_lm(logits, labels, shift, ignore_index, count, count_value, count_targets,
                                torch.is_grad_enabled() and logits.requires_grad, inplace, validate, spec)


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
    spec: LossSpec = PLAIN,
) -> tuple[Tensor, Tensor]:
    """``(loss, row_stats)``: ``sum(row losses) / divisor`` (``reduce``) or the float32 row losses ``[B, T]`` (then
    ``divisor`` must be 1), and the ``[B, T, 3]`` (lse, entropy, correct) of ``spec.stats`` (an empty tensor without).

    ``logits`` ``[B, T, V]`` with unit stride over V, ``targets`` ``[B, T]`` aligned with them, ``divisor`` a
    0-dim float64 tensor on the logits' device; ``backend`` is concrete (see ``backends.resolve_backend``).
    Gradient work is done only when autograd will need it.
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        return FusedCrossEntropy.apply(logits, targets, divisor, ignore_index, reduce, inplace, validate, backend, spec)
    losses, _, row_stats, pending = _fwd(logits, targets, divisor, ignore_index, False, validate, backend, spec=spec)
    out = _sum_over(losses, divisor) if reduce else losses
    _check(pending)
    return out, row_stats
