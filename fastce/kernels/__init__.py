"""Kernels: Triton (``triton_ce``), CUDA C++ (``cuda_ce``, built from ``csrc/``) and chunked PyTorch (``torch_ce``).

Every backend module exposes the same out-variant launchers; they validate nothing but layout, allocate nothing but
small workspaces, and know nothing of autograd, transformers or torch.distributed.

**Two phases.** Every kernel computes a row in two phases: the row's *statistics*, then an *epilogue* that turns
them into the loss and the gradient. The statistics of disjoint column ranges of a row merge exactly (``max``;
``sum`` rescaled to the larger max; sums add), so a row may be split over blocks, lm_head vocabulary slabs or ranks:
``shard_stats`` gives the statistics of one range, ``fastce/stats.py`` merges them, ``shard_grad`` runs the epilogue
on one range. ``cross_entropy_fwd`` does both phases in one launch when the whole row is at hand.

**Options** (``spec``, a ``fastce.spec.LossSpec``; ``PLAIN`` takes each backend's default path, unchanged):
with ``x`` a row of logits, ``t`` its target, ``V`` the whole row's length,

    x'      = softcap * tanh(x / softcap)             (x itself when softcap == 0)
    m, s    = max(x'), sum_j exp(x'_j - m)            lse = m + log(s),  p_j = exp(x'_j - m) / s
    loss    = (1 - e) * (lse - x'_t) + e * (lse - sum_j x'_j / V) + z * lse**2        (e = label_smoothing, z = z_loss)
    grad_j  = ((p_j - c_j) + 2 z lse p_j) * (1 - (x'_j / softcap)**2),   c_j = (1 - e) [j == t] + e / V
              (the last factor only with a softcap: d x'/d x). Evaluated in that order, with the target's c_t = 1 - e
              + e / V one constant rounded once (exactly 1 for V = 1), and the slope as 4 u / (1 + u)**2 with
              u = exp(-2 |x_j| / softcap): the other forms cancel.

and, for ``spec.stats``: ``entropy = lse - sum_j p_j x'_j = log(s) - sum_j p_j (x'_j - m)`` and ``correct = x'_t >= m`` (the target is an argmax; ties
count as correct). Ignored rows (``target == ignore_index``) have loss 0, gradient 0 and statistics 0. A target
outside ``[0, V)`` that is not ``ignore_index`` gives a NaN loss, a gradient without the one-hot term, and is never
read out of bounds. All arithmetic is float32 (losses are taken as ``(m - x'_t) + log(s)``, never ``lse - x'_t``);
indices are 64-bit.

``cross_entropy_fwd(logits, targets, divisor, losses, grad, ignore_index, skip=None, spec=PLAIN, row_stats=None)``
    logits    [B, T, V] float16/bfloat16/float32, any strides with ``stride(-1) == 1`` (a slice of a bigger tensor works).
    targets   [B, T] int32/int64, any strides: the class each row must predict, or ``ignore_index``.
    divisor   0-dim float64 on the logits' device: the gradient is divided by it; where it is 0, the gradient of
              non-ignored rows is NaN (a zero count with targets that are not ignored contradicts itself).
    losses    [B, T] float32, contiguous, written for every row (see above).
    grad      None (forward only), or [B, T, V] of the logits' dtype with ``stride(-1) == 1`` -- it may be ``logits``
              itself (in-place) -- written in full: ``grad_j / divisor`` as above, 0 on ignored rows.
    skip      None, or a 0-dim bool on the logits' device: when it holds True the launch writes nothing at all (losses
              and grad keep their contents). The in-place mode passes the answer of a validation queued just before,
              so that a bad target leaves the caller's logits intact without the host waiting before the launch.
    spec      the options (above).
    row_stats None, or [B, T, 3] float32 contiguous, written for every row when given: (lse, entropy, correct as
              1.0/0.0); zeros on ignored rows. Only asked for with ``spec.stats``.

``scale_grad_(grad, grad_output) -> None``
    grad        [B, T, V] as above, multiplied in place, row by row, by ``grad_output``;
    grad_output float32, 0-dim (one factor for all rows) or [B, T]; rows whose factor is exactly 1 are not touched,
                and that is decided on the device (no host synchronisation).

``shard_stats(logits, targets, vocab_start, ignore_index, stats, spec=PLAIN) -> None``
    logits    [B, T, Vs] as above: the columns ``[vocab_start, vocab_start + Vs)`` of rows whose other columns live
              elsewhere (another slab of an lm_head, another rank's vocabulary shard).
    targets   [B, T] as above, in whole-row (global) vocabulary ids.
    stats     [B, T, 5] float32 contiguous, written for every row, over x' of these columns:
              (m, s, x'_t if vocab_start <= t < vocab_start + Vs else 0, sum_j x'_j if ``spec.label_smoothing``
              else 0, sum_j exp(x'_j - m) (x'_j - m) if ``spec.stats`` else 0). Ignored rows: (-inf, 0, 0, 0, 0), the
              identity of the merge.

Triton only, in ``triton_linear``: ``linear_stats(input, weight, bias, targets, vocab_start, ignore_index, stats,
spec=PLAIN)`` is ``shard_stats`` of the logits ``input @ weight.T + bias`` (the fused lm_head's forward), computed tile
by tile in a GEMM's epilogue and never written.

``shard_grad(logits, targets, vocab_start, vocab_size, ignore_index, row, grad, spec=PLAIN) -> None``
    logits, targets, vocab_start as in ``shard_stats``; ``vocab_size`` is V, the whole row's length.
    row       [B, T, 3] float32 contiguous: (m, s, scale) of each whole row -- the merged statistics, and the factor
              its gradient is multiplied by (upstream gradient / divisor).
    grad      [B, T, Vs] float16/bfloat16/float32 (the logits' dtype or another: float32 logits may give a bfloat16
              gradient, unless the module sets ``SHARD_GRAD_CASTS = False``), ``stride(-1) == 1``; it may be
              ``logits`` itself (same dtype): ``scale * grad_j`` (as above, for the columns of this range), 0 on
              ignored rows.

Triton only, in ``triton_linear_grad``: ``linear_grad(input, weight, bias, targets, row, vocab_start, vocab_size,
ignore_index, grad, spec=PLAIN)`` is ``shard_grad`` of the logits ``input @ weight.T + bias`` into ``grad`` ``[N, Vs]``
(bf16/fp16, unit column stride, any row stride; its other columns untouched), computed tile by tile in the epilogue
of the GEMM (the fused lm_head's backward), the logits never written.
"""
