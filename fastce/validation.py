"""Label (and count) validation: a bad target is named in a ``ValueError``; on CUDA the check overlaps the kernels.

The kernels are safe on bad input (a NaN row, no out-of-bounds read), so the check's answer may come after the
launch; in place, its device-side answer is the kernels' skip flag.
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor


def bad_targets(targets: Tensor, vocab_size: int, ignore_index: int) -> Tensor:
    return (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))


def bad_target_error(target: int, position: tuple, vocab_size: int, ignore_index: int) -> ValueError:
    return ValueError(f"target {target} at position {position} is outside [0, {vocab_size}) and is not "
                      f"ignore_index={ignore_index}")


def bad_count_error(count) -> ValueError:
    """A count tensor holding a negative, NaN or infinite number, found at the label check."""
    return ValueError(f"num_items_in_batch must be a count >= 0, got a tensor holding {float(count)}")


def raise_bad_input(targets: Tensor, vocab_size: int, ignore_index: int, divisor: Tensor | None = None) -> None:
    bad = bad_targets(targets, vocab_size, ignore_index)
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0])
        raise bad_target_error(int(targets[position]), position, vocab_size, ignore_index)
    raise bad_count_error(divisor) if divisor is not None else ValueError("bad input")


def raise_answer(code: int, row: int, labels: Tensor, shift: bool, vocab_size: int, ignore_index: int, count) -> None:
    """Raise what ``fastce_cuda::causal_lm_fwd``'s label check found: code 1, the first bad target, at ``row`` of the
    (shifted) targets; code 2, a bad count (``count`` the tensor or number it was given)."""
    if code == 1:
        b, t = divmod(row, labels.shape[1])
        raise bad_target_error(int(labels[b, t + int(shift)]), (b, t), vocab_size, ignore_index)
    raise bad_count_error(count)


def _bad_answer(targets: Tensor, vocab_size: int, ignore_index: int, divisor: Tensor | None) -> Tensor:
    """0-dim bool on the device: a target is bad, or the divisor is NaN (``loss.divisor_of`` makes a negative or NaN
    count NaN)."""
    bad = bad_targets(targets, vocab_size, ignore_index).any()
    return bad if divisor is None else bad | divisor.isnan()


def validate_targets(targets: Tensor, vocab_size: int, ignore_index: int, divisor: Tensor | None = None) -> None:
    """Raise ``ValueError`` naming the first target outside ``[0, vocab_size)`` that is not ``ignore_index`` (or the bad
    count). This reads one bool back to the host (a synchronisation); ``validate=False`` skips it, and the kernels
    then give such a row a NaN loss without reading out of bounds."""
    if bool(_bad_answer(targets, vocab_size, ignore_index, divisor)):
        raise_bad_input(targets, vocab_size, ignore_index, divisor)


class _OverlappedValidation:
    """Validation that does not leave the GPU idle: the check is queued before the kernel, its one-byte answer is
    copied to pinned memory, and the host waits for that copy only (not for the kernel) before it decides.

    The kernel is safe on bad targets (a NaN row, no out-of-bounds read), so launching it before the answer is
    known is harmless; its outputs are dropped when the check raises. In place, the answer's device copy ``bad`` is
    also the kernel's skip flag: the launch writes nothing when a target is bad, so the caller's logits survive.
    """

    # One pinned flag and one event per thread and device, reused: allocating them each call costs more.
    _buffers = threading.local()

    def __init__(self, targets: Tensor, vocab_size: int, ignore_index: int, divisor: Tensor | None):
        self.args = (targets, vocab_size, ignore_index, divisor)
        per_device = self._buffers.__dict__.setdefault("per_device", {})
        if targets.device not in per_device:
            per_device[targets.device] = (torch.empty((), dtype=torch.bool, pin_memory=True), torch.cuda.Event())
        self.flag, self.ready = per_device[targets.device]
        self.bad = _bad_answer(*self.args)  # 0-dim bool on the device: the kernels' skip flag in place
        self.flag.copy_(self.bad, non_blocking=True)
        self.ready.record()

    def check(self) -> None:
        # Poll rather than event.synchronize(): on the H100 VM a blocking wait cost ~0.6 ms of wake-up latency per
        # call, several times the wait itself (benchmarks/NOTES.md).
        while not self.ready.query():
            pass
        if bool(self.flag):
            raise_bad_input(*self.args)


def start_validation(validate: bool, targets: Tensor, vocab_size: int, ignore_index: int,
                     divisor: Tensor | None = None):
    """None, or an object whose ``check()`` raises after the launch; CPU tensors are checked at once."""
    if not validate:
        return None
    if targets.is_cuda:
        return _OverlappedValidation(targets, vocab_size, ignore_index, divisor)
    validate_targets(targets, vocab_size, ignore_index, divisor)
    return None
