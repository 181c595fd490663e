"""Probe: where the fused lm_head's time goes, and how exact its float32 logits are (benchmarks/NOTES.md, row 19).

    python benchmarks/probe_linear.py                               # GPU: 8192x4096x128256, 1/8 of targets ignored
    python benchmarks/probe_linear.py --shapes 8192x4096x32000 --reps 5
    python benchmarks/probe_linear.py --skip phases,e2e,tune,profile,precision   # parts 6, 7: the fused kernels
    python benchmarks/probe_linear.py --skip phases,e2e,tune,profile,precision,fused   # part 7 alone

1. Phases: each phase of ``fastce/linear.py`` alone, over every slab of one call on the kept rows, timed with CUDA
   events (median of reps): the forward's float32-output GEMM (beside a bf16-output one), its statistics kernel per
   backend; the backward's GEMM, its epilogue per backend (Triton writes the bf16 gradient itself, CUDA runs in place
   and a cast follows), the grad_weight GEMM, and grad_input's accumulation three ways (a float32 ``mm`` then
   ``add_``, a mixed-dtype ``addmm`` into the accumulator, a bf16 ``mm`` without any accumulation for scale).
2. End to end: ``fastce.linear_cross_entropy`` forward + backward per backend, with grad_input's accumulation as it
   was (``mm`` + ``add_``) and as it is, with slabs of 128 MiB (before), of the adaptive size and of 256 MiB; time
   and peak memory above the inputs.
3. Tuning (``--skip`` it to save time): the Triton statistics and epilogue kernels on float32 slabs of the kept rows,
   over slab widths and launch configurations (BLOCK_V, warps), each over as many slabs as cover V.
4. Profile: one call under ``torch.profiler``: GPU time per kind of kernel (GEMMs, statistics, epilogue, the rest),
   their sum against the call's span on the GPU (the gap is idle GPU: host-bound launches).
5. Precision: the float32 logits of ``torch.mm(..., out_dtype=torch.float32)`` against float64 (signed bias towards
   zero, RMS), and the mean loss over the kept rows from them, from logits whose K = D sum is split in two (an
   ``addmm`` into the first half's float32 result), and from float32 logits with the target's logit exact.
6-7. Fused and fused-grad (``--skip fused,fused-grad`` to leave them out): the fused Triton kernels alone, in
   ``probe_linear_fused.py`` (its docstring says what they time).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import fastce  # noqa: E402
from fastce import linear  # noqa: E402
from fastce.shard_ops import run_shard_grad, run_shard_stats  # noqa: E402
from bench_linear_cross_entropy import make_inputs  # noqa: E402
from probe_linear_fused import PLAIN, fused, fused_grad, timed  # noqa: E402


def phases(h, w, t, reps, log):
    rows, dim = h.shape
    vocab = w.shape[0]
    t3 = t.unsqueeze(0)
    fwd = list(linear._slabs(rows, dim, vocab, 4))
    bwd = list(linear._slabs(rows, dim, vocab, 4 + w.element_size()))
    log(f"rows {rows}, forward slabs {len(fwd)} x {fwd[0][1] - fwd[0][0]} columns, backward slabs {len(bwd)} x "
        f"{bwd[0][1] - bwd[0][0]} columns")
    width_f, width_b = fwd[0][1], bwd[0][1]
    logits_f = torch.randn(1, rows, width_f, device=h.device) * 3
    logits_b = torch.randn(1, rows, width_b, device=h.device) * 3
    grad_b = torch.empty(1, rows, width_b, device=h.device, dtype=w.dtype)
    row = torch.stack((logits_b[0].amax(-1) + 5, torch.full((rows,), 2e5, device=h.device),
                       torch.full((rows,), 1e-4, device=h.device)), dim=-1).contiguous().unsqueeze(0)
    acc = torch.zeros(rows, dim, device=h.device)
    gw = torch.empty_like(w)
    dl = (torch.randn(rows, width_b, device=h.device) * 1e-4).to(w.dtype)
    mixed_addmm = linear._mixed_addmm_supported(h.device)

    def over(slabs, body):
        return lambda: [body(lo, hi) for lo, hi in slabs]

    cases = {
        "fwd gemm, float32 out": over(fwd, lambda lo, hi: torch.mm(h, w[lo:hi].t(), out_dtype=torch.float32)),
        "fwd gemm, bf16 out": over(fwd, lambda lo, hi: torch.mm(h, w[lo:hi].t())),
        "fwd gemm, float32 out, K split in 2": over(fwd, lambda lo, hi: _split_k(h, w[lo:hi])),
    }
    for backend in fastce.available_backends():
        if backend == "torch":
            continue
        cases[f"fwd stats {backend}"] = over(fwd, lambda lo, hi, b=backend: run_shard_stats(
            logits_f[:, :, :hi - lo], t3, lo, -100, b, PLAIN))
    cases["bwd gemm, float32 out"] = over(bwd, lambda lo, hi: torch.mm(h, w[lo:hi].t(), out_dtype=torch.float32))
    if "triton" in fastce.available_backends():
        cases["bwd grad triton (writes bf16)"] = over(bwd, lambda lo, hi: run_shard_grad(
            logits_b[:, :, :hi - lo], t3, lo, vocab, -100, row, grad_b[:, :, :hi - lo], "triton", PLAIN))
    if "cuda" in fastce.available_backends():
        def cuda_grad(lo, hi):
            x = logits_b[:, :, :hi - lo]
            run_shard_grad(x, t3, lo, vocab, -100, row, x, "cuda", PLAIN)
            grad_b[:, :, :hi - lo].copy_(x)
        cases["bwd grad cuda (in place + cast)"] = over(bwd, cuda_grad)
    cases["bwd dW gemm"] = over(bwd, lambda lo, hi: torch.mm(dl[:, :hi - lo].t(), h, out=gw[lo:hi]))
    cases["bwd dX mm float32 + add_"] = over(bwd, lambda lo, hi: acc.add_(
        torch.mm(dl[:, :hi - lo], w[lo:hi], out_dtype=torch.float32)))
    if mixed_addmm:
        cases["bwd dX addmm into float32"] = over(bwd, lambda lo, hi: torch.addmm(
            acc, dl[:, :hi - lo], w[lo:hi], out_dtype=torch.float32, out=acc))
    cases["bwd dX mm bf16 (no accumulation)"] = over(bwd, lambda lo, hi: torch.mm(dl[:, :hi - lo], w[lo:hi]))
    dfull = (torch.randn(rows, vocab, device=h.device) * 1e-4).to(w.dtype)
    cases["the 3 GEMMs, whole (kept rows)"] = lambda: (torch.mm(h, w.t()), torch.mm(dfull, w), torch.mm(dfull.t(), h))
    for name, fn in cases.items():
        fn()
        log(f"  {name:42s} {timed(fn, reps):8.3f} ms")
    log(f"  (mixed-dtype addmm into the accumulator: {'yes' if mixed_addmm else 'no'})")


def _split_k(h, w):
    half = h.shape[1] // 2
    x = torch.mm(h[:, :half], w[:, :half].t(), out_dtype=torch.float32)
    return torch.addmm(x, h[:, half:], w[:, half:].t(), out_dtype=torch.float32, out=x)


def _old_accumulate(acc, a, b):
    acc.add_(torch.mm(a, b, out_dtype=torch.float32))


def end_to_end(h, w, t, reps, log):
    new_accumulate = linear._accumulate_mm
    old = 128 << 20  # the slab size before row 19
    variants = {"as before (mm + add_, 128 MiB slabs)": (_old_accumulate, old), "addmm, 128 MiB": (new_accumulate, old),
                "addmm, adaptive slabs": (new_accumulate, None), "addmm, 256 MiB": (new_accumulate, 2 * old)}
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    for backend in [b for b in fastce.available_backends() if b != "torch"]:
        for name, (accumulate, size) in variants.items():
            linear._accumulate_mm, linear._SLAB_BYTES = accumulate, size
            try:
                def step():
                    hh.grad = ww.grad = None
                    fastce.linear_cross_entropy(hh, ww, t, backend=backend).backward()
                step()
                ms = timed(step, reps)
                hh.grad = ww.grad = None
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
                log(f"  {backend:7s} {name:38s} {ms:8.3f} ms  peak {peak:.3f} GiB")
            finally:
                linear._accumulate_mm, linear._SLAB_BYTES = new_accumulate, None


def tune(h, w, t, reps, log):
    from fastce.kernels import triton_ce

    rows, vocab = h.shape[0], w.shape[0]
    t3 = t.unsqueeze(0)
    chosen = triton_ce._launch_config
    for width in (2048, 3072, 4096, 4608, 8192):
        slabs = -(-vocab // width)
        logits = torch.randn(1, rows, width, device=h.device) * 3
        grad = torch.empty(1, rows, width, device=h.device, dtype=w.dtype)
        row = torch.stack((logits[0].amax(-1) + 5, torch.full((rows,), 2e5, device=h.device),
                           torch.full((rows,), 1e-4, device=h.device)), dim=-1).contiguous().unsqueeze(0)
        results = []
        for block_v in (1024, 2048, 4096, 8192):
            if block_v > 2 * width:
                continue
            for warps in (2, 4, 8):
                triton_ce._launch_config = lambda *a, bv=block_v, nw=warps, **k: (bv, nw, 1, 1)
                try:
                    def stats():
                        for _ in range(slabs):
                            run_shard_stats(logits, t3, 0, -100, "triton", PLAIN)

                    def grads():
                        for _ in range(slabs):
                            run_shard_grad(logits, t3, 0, vocab, -100, row, grad, "triton", PLAIN)
                    stats(), grads()
                    results.append((block_v, warps, timed(stats, reps), timed(grads, reps)))
                finally:
                    triton_ce._launch_config = chosen
        stats(), grads()
        default = (timed(stats, reps), timed(grads, reps))
        best_s = min(results, key=lambda r: r[2])
        best_g = min(results, key=lambda r: r[3])
        log(f"  width {width:5d} ({slabs} slabs): stats as chosen {default[0]:.3f} ms, best {best_s[2]:.3f} ms "
            f"(BLOCK_V {best_s[0]}, {best_s[1]} warps); grad as chosen {default[1]:.3f} ms, best {best_g[3]:.3f} ms "
            f"(BLOCK_V {best_g[0]}, {best_g[1]} warps)")
        log("    " + "; ".join(f"{bv}/{nw}: {a:.2f} {b:.2f}" for bv, nw, a, b in results))


def profile(h, w, t, log, backend="triton"):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

    def step():
        hh.grad = ww.grad = None
        fastce.linear_cross_entropy(hh, ww, t, backend=backend).backward()
    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kinds: dict = {}
    first, last = float("inf"), 0.0
    for event in prof.events():
        if event.device_type != DeviceType.CUDA:
            continue
        name = event.name
        kind = ("stats" if "stats" in name else "epilogue" if "grad" in name else
                "gemm" if any(k in name.lower() for k in ("gemm", "nvjet", "cutlass", "sm90", "xmma")) else name[:60])
        total, calls = kinds.get(kind, (0.0, 0))
        kinds[kind] = (total + event.time_range.elapsed_us(), calls + 1)
        first, last = min(first, event.time_range.start), max(last, event.time_range.end)
    busy = sum(v[0] for v in kinds.values())
    log(f"  {backend}: GPU span {(last - first) / 1e3:.3f} ms, kernels {busy / 1e3:.3f} ms")
    for kind, (total, calls) in sorted(kinds.items(), key=lambda kv: -kv[1][0])[:12]:
        log(f"    {kind:60s} {total / 1e3:8.3f} ms  {calls:4d} launches")


def precision(h, w, t, log):
    kept = t != -100
    h, t = h[kept], t[kept]
    rows = max(1, (1 << 29) // (w.shape[0] * 8))
    sums = {"float64": 0.0, "float32 (mm out_dtype)": 0.0, "float32, K split in 2": 0.0,
            "float32, target logit exact": 0.0}
    bias = rms = scale = 0.0
    w64 = w.double()
    for lo in range(0, h.shape[0], rows):
        x, tt = h[lo:lo + rows], t[lo:lo + rows]
        exact = x.double() @ w64.t()
        f32 = torch.mm(x, w.t(), out_dtype=torch.float32)
        split = _split_k(x, w)
        err = f32.double() - exact
        bias += float((err * exact.sign()).sum())
        rms += float((err * err).sum())
        scale += float(exact.abs().sum())
        target_exact = exact.gather(1, tt[:, None])[:, 0]
        for name, logits in (("float64", exact), ("float32 (mm out_dtype)", f32.double()),
                             ("float32, K split in 2", split.double())):
            sums[name] += float((logits.logsumexp(-1) - logits.gather(1, tt[:, None])[:, 0]).sum())
        sums["float32, target logit exact"] += float((f32.double().logsumexp(-1) - target_exact).sum())
    n = h.shape[0] * w.shape[0]
    log(f"  float32 logits vs float64: signed error along the sign of the logit {bias / scale:+.3e} of mean |x|, "
        f"RMS {(rms / n) ** 0.5 / (scale / n):.3e} of mean |x|")
    ref = sums["float64"]
    for name, value in sums.items():
        if name != "float64":
            log(f"  loss from {name:30s} relative error {(value - ref) / ref:+.3e}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8192x4096x128256")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip", default="",
                        help="comma-separated parts to skip: phases,e2e,tune,profile,precision,fused,fused-grad")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_linear.py needs a CUDA GPU")
        return 1
    skip = set(filter(None, args.skip.split(",")))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, backends {fastce.available_backends()}")
    for spec in args.shapes.split(","):
        n, d, v = (int(x) for x in spec.split("x"))
        h, w, t = make_inputs(n, d, v, torch.bfloat16, torch.device("cuda"))
        print(f"== {n}x{d}x{v}")
        if "phases" not in skip:
            kept = t != -100
            phases(h[kept], w, t[kept], args.reps, print)
        if "e2e" not in skip:
            end_to_end(h, w, t, args.reps, print)
        if "tune" not in skip:
            kept = t != -100
            tune(h[kept], w, t[kept], args.reps, print)
        if "profile" not in skip:
            for backend in [b for b in fastce.available_backends() if b != "torch"]:
                profile(h, w, t, print, backend)
        if "precision" not in skip:
            precision(h, w, t, print)
        if "fused" not in skip:
            kept = t != -100
            fused(h[kept], w, t[kept], args.reps, print)
        if "fused-grad" not in skip:
            kept = t != -100
            fused_grad(h[kept], w, t[kept], args.reps, print)
        del h, w, t
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
