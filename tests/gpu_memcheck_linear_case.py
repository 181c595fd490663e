"""Small calls of the fused lm_head on the Triton backend, whose bf16 path is two Triton kernels (the forward's
``_linear_stats_kernel``, the backward's ``_linear_grad_kernel``: benchmarks/NOTES.md row 24), for compute-sanitizer
(not collected by pytest):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python tests/gpu_memcheck_linear_case.py

Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees a read one element past the input,
the weight, the bias or a slab of the gradient as out of bounds. The cases: odd vocabularies (V = 1 among them), D
not a multiple of the K step, more rows than a row tile, a row-sliced input (its row stride wider than D), slabs of
256 columns (views of the weight and of the gradient buffer), ignored rows, bias, every loss option, per-token losses
with a random upstream gradient, and an out-of-range target with ``validate=False`` (NaN loss, no read outside the
weight). Exits non-zero if a loss or gradient is off float64's (bf16 tolerances) or left unwritten; memcheck reports
any bad access on its own. Without a GPU it runs in Triton's interpreter (``TRITON_INTERPRET=1``), as a check of
the script itself.
"""
import torch

import fastce
from fastce import linear as flinear
from fastce.reference import cross_entropy_reference, linear_logits_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPTIONS = [{}, {"softcap": 3.0, "label_smoothing": 0.1, "z_loss": 1e-3}]
# (N, D, V, row-sliced input): odd V, D % 64 != 0, N over a 128-row tile, V = 1.
SHAPES = [(37, 72, 1031, False), (130, 136, 517, True), (9, 24, 1, False), (64, 128, 700, True)]


def _inputs(n, d, v, sliced, seed):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(n, d + (8 if sliced else 0), generator=g)
    x = wide.to(torch.bfloat16).to(DEVICE)[:, :d]  # sliced: row stride d + 8, 16-byte aligned rows
    w = (torch.randn(v, d, generator=g) / d ** 0.5 * 3).to(torch.bfloat16).to(DEVICE)
    b = (torch.randn(v, generator=g) * 0.5).to(torch.bfloat16).to(DEVICE)
    t = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    t[::5] = -100
    return x, w, b, t


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-300))


def run_case(n, d, v, sliced, options, reduction, seed):
    x, w, b, t = _inputs(n, d, v, sliced, seed)
    h, wt, bt = x.detach().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    out = fastce.linear_cross_entropy(h, wt, t, bt, backend="triton", reduction=reduction, **options)
    upstream = torch.rand(n, device=DEVICE) + 0.5 if reduction == "none" else None
    (out if upstream is None else (out * upstream).sum()).backward()
    _sync()
    leaves = [z.detach().double().requires_grad_() for z in (x, w, b)]
    losses = cross_entropy_reference(linear_logits_reference(*leaves), t, **options)
    ref = losses if reduction == "none" else losses.sum() / int((t != -100).sum())
    (ref if upstream is None else (ref * upstream.double()).sum()).backward()
    assert _rel(out.detach(), ref.detach()) <= 1e-5, f"loss off float64: {(n, d, v, options, reduction)}"
    for name, got, leaf in zip(("input", "weight", "bias"), (h.grad, wt.grad, bt.grad), leaves):
        assert torch.isfinite(got).all(), f"grad of {name} not written everywhere"
        assert _rel(got, leaf.grad) <= 2e-2, f"grad of {name} off float64: {(n, d, v, options, reduction)}"


def run_bad_target():
    x, w, b, t = _inputs(16, 40, 300, False, 7)
    t[3] = 300  # out of range: NaN loss with validate=False, no read outside the weight
    h = x.detach().requires_grad_()
    loss = fastce.linear_cross_entropy(h, w, t, b, backend="triton", validate=False)
    loss.backward()
    _sync()
    assert torch.isnan(loss), "an out-of-range target must give a NaN loss"


def main():
    assert flinear.FUSED_FORWARD and flinear.FUSED_BACKWARD, "the fused kernels are this case's subject"
    flinear._SLAB_BYTES = 1  # slabs of 256 columns in the backward: several per call
    seed = 0
    for n, d, v, sliced in SHAPES:
        for options in OPTIONS:
            for reduction in ("mean", "none"):
                seed += 1
                run_case(n, d, v, sliced, options, reduction, seed)
    run_bad_target()
    print("fused lm_head memcheck cases ran: compute-sanitizer's summary says whether any access was bad")


if __name__ == "__main__":
    main()
