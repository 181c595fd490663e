"""Kernels: Triton (``triton_ce``), CUDA C++ (``cuda_ce``, built from ``csrc/``) and chunked PyTorch (``torch_ce``).

Every backend module exposes the same two out-variant launchers; they validate nothing but layout, allocate
nothing, and know nothing of autograd or transformers:

``cross_entropy_fwd(logits, targets, divisor, losses, grad, ignore_index, skip=None) -> None``
    logits   [B, T, V] float16/bfloat16/float32, any strides with ``stride(-1) == 1`` (a slice of a bigger tensor works).
    targets  [B, T] int32/int64, any strides: the class each row must predict, or ``ignore_index``.
    divisor  0-dim float64 on the logits' device: the gradient is divided by it (by 1 where it is 0).
    losses   [B, T] float32, contiguous, written for every row: ``logsumexp(row) - row[target]``; 0 for an ignored
             row; NaN for a target outside [0, V) that is not ``ignore_index`` (never read out of bounds).
    grad     None (forward only), or [B, T, V] of the logits' dtype with ``stride(-1) == 1`` -- it may be ``logits``
             itself (in-place) -- written in full: ``(softmax(row) - onehot(target)) / divisor``, 0 on ignored rows.
    skip     None, or a 0-dim bool on the logits' device: when it holds True the launch writes nothing at all (losses
             and grad keep their contents). The in-place mode passes the answer of a validation queued just before,
             so that a bad target leaves the caller's logits intact without the host waiting before the launch.

``scale_grad_(grad, grad_output) -> None``
    grad        [B, T, V] as above, multiplied in place, row by row, by ``grad_output``;
    grad_output float32, 0-dim (one factor for all rows) or [B, T]; rows whose factor is exactly 1 are not touched,
                and that is decided on the device (no host synchronisation).

All arithmetic is float32 with an online log-sum-exp over vocabulary chunks; indices are 64-bit.
"""
