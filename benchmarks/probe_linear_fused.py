"""Probe, parts 6 and 7 of ``probe_linear.py`` (which runs them; benchmarks/NOTES.md rows 22-24): the fused lm_head's
Triton kernels alone, on the kept rows.

    python benchmarks/probe_linear.py --skip phases,e2e,tune,profile,precision             # both parts
    python benchmarks/probe_linear.py --skip phases,e2e,tune,profile,precision,fused       # part 7 alone

Part 6, fused (``--skip fused`` to leave it out): the forward as one Triton kernel (``fastce/kernels/triton_linear.py``:
GEMM tiles whose epilogue takes the row statistics) on the kept rows, alone, for each of its configurations (and
the default one with other split counts), beside cuBLAS's single GEMM (bf16 and float32 out) and the forward as
``linear_stats_impl`` runs it with ``FUSED_FORWARD`` off (float32 slabs in K pieces + statistics) and on; for
each, the mean loss's relative error against float64 and the splits it ran with.
Part 7, fused-grad (``--skip fused-grad`` to leave it out): the backward's logits GEMM with the gradient in its epilogue
as one Triton kernel (``fastce/kernels/triton_linear_grad.py``) on the kept rows, alone over the whole vocabulary
for each of its configurations (and the default one over ``FUSED_BACKWARD``'s slabs), beside cuBLAS's single GEMM
(bf16 and float32 out) and what it replaces: float32 slab GEMM + Triton ``shard_grad`` over the slabs; then
``linear_grads_impl`` (both gradients) with ``FUSED_BACKWARD`` off and on. For each gradient, its relative error
(Frobenius) against float64 on the first 256 rows.
"""
from __future__ import annotations

import torch

from fastce import linear
from fastce.shard_ops import run_shard_grad
from fastce.spec import LossSpec
from bench_linear_cross_entropy import linear_flags
from bench_linear_cross_entropy import timed as bench_timed

PLAIN = LossSpec(0.0, 0.0, 0.0)
CUDA = torch.device("cuda")


def timed(fn, reps):
    return bench_timed(fn, reps, CUDA)


def _loss_float64(h, w, t):
    """Sum over rows of the float64 loss of ``h @ w.T`` against ``t`` (no ignored rows), in row chunks."""
    rows = max(1, (1 << 29) // (w.shape[0] * 8))
    w64, total = w.double(), 0.0
    for lo in range(0, h.shape[0], rows):
        logits = h[lo:lo + rows].double() @ w64.t()
        total += float((logits.logsumexp(-1) - logits.gather(1, t[lo:lo + rows, None])[:, 0]).sum())
    return total


def _loss_of(stats, t, vocab):
    from fastce.stats import finish
    losses, _ = finish(stats, t, vocab, -100, PLAIN)
    return float(losses.double().sum())


def _launches(launch, label, log) -> bool:
    """Whether ``launch()`` runs: a configuration this GPU or Triton cannot compile is said so and skipped."""
    try:
        launch()
        return True
    except Exception as exc:
        log(f"  {label}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
        return False


def fused(h, w, t, reps, log):
    from fastce.kernels import triton_linear

    rows, dim = h.shape
    vocab = w.shape[0]
    flop = 2 * rows * dim * vocab
    ref = _loss_float64(h, w, t)
    out = torch.empty(rows, 5, device=h.device)

    def row(name, fn, stats=None, extra=""):
        fn()
        torch.cuda.synchronize()
        ms = timed(fn, reps)
        err = "" if stats is None else f"  loss rel err {(_loss_of(stats(), t, vocab) - ref) / ref:+.2e}"
        log(f"  {name:44s} {ms:8.3f} ms {flop / ms / 1e9:6.0f} TFLOP/s{err}{extra}")

    row("cuBLAS GEMM, bf16 out", lambda: torch.mm(h, w.t()))
    row("cuBLAS GEMM, float32 out", lambda: torch.mm(h, w.t(), out_dtype=torch.float32))
    for flag in (False, True):
        with linear_flags({"FUSED_FORWARD": flag}):
            result = {}

            def forward():
                result["stats"] = linear.linear_stats_impl(h, w, None, t, -100, "triton")
            row(f"linear_stats_impl, FUSED_FORWARD={flag}", forward, lambda: result["stats"])
    chosen = triton_linear.plan(rows, vocab, h.device, triton_linear.DEFAULT_CONFIG, None, dim)[0]
    runs = [(name, None) for name in triton_linear.CONFIGS if triton_linear.CONFIGS[name].kwargs["BLOCK_M"] >= 64]
    others = sorted({max(1, chosen // 2), 2 * chosen, 4 * chosen} - {chosen})
    runs += [(triton_linear.DEFAULT_CONFIG, s) for s in others]
    for name, splits in runs:
        def launch(name=name, splits=splits):
            triton_linear.linear_stats(h, w, None, t, 0, -100, out, PLAIN, config=name, num_splits=splits)
        if not _launches(launch, f"fused {name}", log):
            continue
        used = triton_linear.plan(rows, vocab, h.device, name, splits, dim)[0]
        extra = f"  splits {used}"
        row(f"fused {name}", launch, lambda: out, extra)


def fused_grad(h, w, t, reps, log):
    from fastce.kernels import triton_linear_grad

    rows, dim = h.shape
    vocab = w.shape[0]
    flop = 2 * rows * dim * vocab
    stats = linear.linear_stats_impl(h, w, None, t, -100, "triton")
    row = torch.cat((stats[:, :2], torch.full((rows, 1), 1.0 / rows, device=h.device)), dim=1).contiguous()
    probe = min(rows, 256)  # the float64 gradient of the first rows
    logits64 = h[:probe].double() @ w.double().t()
    ref = torch.softmax(logits64, -1)
    ref[torch.arange(probe, device=h.device), t[:probe]] -= 1
    ref /= rows
    del logits64

    def err(grad, extra=""):  # read after the timed runs
        return lambda: f"  grad rel err {float((grad[:probe].double() - ref).norm() / ref.norm()):.3e}{extra}"

    def row_(name, fn, extra=lambda: ""):
        fn()
        torch.cuda.synchronize()
        ms = timed(fn, reps)
        log(f"  {name:52s} {ms:8.3f} ms {flop / ms / 1e9:6.0f} TFLOP/s{extra()}")

    row_("cuBLAS GEMM, bf16 out", lambda: torch.mm(h, w.t()))
    row_("cuBLAS GEMM, float32 out", lambda: torch.mm(h, w.t(), out_dtype=torch.float32))
    old = list(linear._slabs(rows, dim, vocab, 4 + w.element_size()))
    new = list(linear._slabs(rows, dim, vocab, w.element_size()))
    full = torch.empty(rows, vocab, dtype=w.dtype, device=h.device)
    row3, t3 = row.unsqueeze(0), t.unsqueeze(0)

    def slab_path():
        for lo, hi in old:
            logits = linear._slab_logits(h, w, None, lo, hi)
            run_shard_grad(logits, t3, lo, vocab, -100, row3, full[:, lo:hi].unsqueeze(0), "triton", PLAIN)
    row_(f"float32 GEMM + shard_grad, {len(old)} slabs of {old[0][1]}", slab_path, err(full))
    default = triton_linear_grad.DEFAULT_CONFIG

    def over_slabs():
        for lo, hi in new:
            triton_linear_grad.linear_grad(h, w[lo:hi], None, t, row, lo, vocab, -100, full[:, lo:hi], PLAIN)
    row_(f"fused {default}, {len(new)} slabs of {new[0][1]}", over_slabs, err(full))
    for name in [n for n, c in triton_linear_grad.CONFIGS.items() if c.kwargs["BLOCK_M"] >= 64]:
        def launch(name=name):
            triton_linear_grad.linear_grad(h, w, None, t, row, 0, vocab, -100, full, PLAIN, config=name)
        if not _launches(launch, f"fused-grad {name}", log):
            continue
        splits = triton_linear_grad.plan(rows, vocab, h.device, name, None, dim)[0]
        row_(f"fused-grad {name}", launch, err(full, f"  splits {splits}"))
    ref_input = ref @ w.double()
    for flag in (False, True):
        with linear_flags({"FUSED_BACKWARD": flag}):
            result = {}

            def backward():
                result["g"] = linear.linear_grads_impl(h, w, None, t, row, -100, "triton", True, True, False)
            row_(f"linear_grads_impl, FUSED_BACKWARD={flag}", backward)
        got = result["g"][0][:probe].double()
        log(f"    grad_input[:{probe}] rel err vs float64: {float((got - ref_input).norm() / ref_input.norm()):.3e}")
