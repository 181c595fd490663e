"""Benchmark: the fused lm_head + cross-entropy (``fastce.linear_cross_entropy``) against its peers and cuBLAS.

    python benchmarks/bench_linear_cross_entropy.py            # GPU: N=8192, D=4096, V in 32000/128256/256000
    python benchmarks/bench_linear_cross_entropy.py --quick    # fewer reps
    python benchmarks/bench_linear_cross_entropy.py --shapes 8192x4096x128256 --impls fastce,gemms

Per (implementation, shape): forward + backward from bf16 hidden states ``[N, D]`` and weight ``[V, D]`` (random
normal, never zeros), targets random with 1/8 of them ``-100`` (ignored); the median time over reps, each timed alone
with CUDA events; the peak memory above the inputs during one call (gradients included); and, once per shape, the
errors against float64 (the loss's relative error; the relative L2 error of grad_input and grad_weight), beside those
of plain PyTorch in bf16 on the same inputs.

Implementations: ``fastce`` (``backend="auto"``) and ``fastce-<backend>`` for each available backend (on a GPU also
``fastce-triton-slabs``: Triton with ``fastce.linear.FUSED_FORWARD`` and ``FUSED_BACKWARD`` off, the slab path of
float32 logits that the fused kernels replaced, benchmarks/NOTES.md row 24; the flags are set around the whole step),
``fastce-logits`` (``F.linear`` then fastce's logits kernel), ``eager`` (``F.linear`` then transformers'
``ForCausalLMLoss`` on the aligned targets), ``liger`` (``LigerFusedLinearCrossEntropyLoss``), ``cce`` (Apple's
``cut_cross_entropy.linear_cross_entropy``) when
importable, and ``gemms`` / ``gemms-kept``: the three cuBLAS GEMMs alone (``h @ W.T``, ``dL @ W``, ``dL.T @ h``) over
all N rows and over the 7/8 not ignored: the issue's bar is 1.05x the latter. Writes ``<out>/<slug>-linear.{md,json}``
and ``<slug>-linear.png`` (time and memory against V).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fastce  # noqa: E402
from fastce.reference import cross_entropy_reference  # noqa: E402

IGNORE_FRACTION = 1 / 8
GPU_SHAPES = [(8192, 4096, 32000), (8192, 4096, 128256), (8192, 4096, 256000)]
CPU_SHAPES = [(256, 64, 1000), (256, 64, 5003)]
GiB = 1 << 30


def make_inputs(n, d, v, dtype, device, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, d, device=device, generator=generator).to(dtype)
    w = (torch.randn(v, d, device=device, generator=generator) * d ** -0.5 * 2).to(dtype)
    target = torch.randint(0, v, (n,), device=device, generator=generator)
    target[torch.rand(n, device=device, generator=generator) < IGNORE_FRACTION] = -100
    return h, w, target


def _fastce(backend):
    return lambda h, w, t: fastce.linear_cross_entropy(h, w, t, backend=backend)


class _Flagged:
    """``fn`` to be measured with module flags of ``fastce.linear`` set (``FUSED_FORWARD``, ``FUSED_BACKWARD``, NOTES
    rows 22-23): ``measure_shape`` sets them around the whole step, backward included, and restores them."""

    def __init__(self, fn, **flags):
        self.fn, self.flags = fn, flags

    def __call__(self, h, w, t):
        return self.fn(h, w, t)


@contextlib.contextmanager
def linear_flags(flags: dict):
    from fastce import linear

    saved = {name: getattr(linear, name) for name in flags}
    try:
        for name, value in flags.items():
            setattr(linear, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(linear, name, value)


def _fastce_logits(h, w, t):
    return fastce.cross_entropy(F.linear(h, w), t)


def _eager(h, w, t):
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(F.linear(h, w), None, w.shape[0], shift_labels=t)


def _liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda h, w, t: loss(w, h, t)


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    return lambda h, w, t: linear_cross_entropy(h, w, t)


def implementations(device) -> dict:
    impls = {"fastce": _fastce("auto")}  # what a user gets; then each backend by name
    for backend in fastce.available_backends():
        impls[f"fastce-{backend}"] = _fastce(backend)
    if device.type == "cuda" and "triton" in fastce.available_backends():
        impls["fastce-triton-slabs"] = _Flagged(_fastce("triton"), FUSED_FORWARD=False, FUSED_BACKWARD=False)
        # the fused backward's slabs by the byte rule alone, without the cap of _SLAB_WAVES (NOTES row 25)
        impls["fastce-triton-wide"] = _Flagged(_fastce("triton"), _SLAB_WAVES=1 << 30)
    impls["fastce-logits"] = _fastce_logits
    impls["eager"] = _eager
    for name, make in (("liger", _liger), ("cce", _cce)):
        try:
            impls[name] = make()
        except Exception as exc:  # not installed here: say so in the table
            impls[name] = exc
    return impls


def gemm_step(h, w, dlogits):
    """The three GEMMs of an lm_head's forward and backward, nothing else."""
    torch.mm(h, w.t())
    torch.mm(dlogits, w)
    torch.mm(dlogits.t(), h)


def timed(fn, reps, device):
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra(fn, device, prepare):
    """Peak memory of ``fn()`` above what is allocated after ``prepare()`` (which frees the last call's gradients: they
    count as extra, as the issue's bar does)."""
    if device.type != "cuda":
        return None
    prepare()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def reference(h, w, t):
    """float64 loss and grads (input, weight), in row chunks to bound memory."""
    h64, w64 = h.double(), w.double()
    count = (t != -100).sum().double()
    loss = torch.zeros((), dtype=torch.float64, device=h.device)
    gh = torch.zeros_like(h64)
    gw = torch.zeros_like(w64)
    rows = max(1, (1 << 28) // (w.shape[0] * 8))
    for lo in range(0, h.shape[0], rows):
        x = h64[lo:lo + rows]
        logits = (x @ w64.t()).requires_grad_()
        losses = cross_entropy_reference(logits, t[lo:lo + rows])
        (losses.sum() / count).backward()
        loss += losses.sum().detach() / count
        gh[lo:lo + rows] = logits.grad @ w64
        gw += logits.grad.t() @ x
    return loss, gh, gw


def rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-300))


def measure_shape(shape, impls, args, device, dtype, log):
    n, d, v = shape
    h, w, t = make_inputs(n, d, v, dtype, device)
    kept = int((t != -100).sum())
    rows = []
    ref = reference(h, w, t) if not args.no_check else None
    for name, fn in impls.items():
        if args.impls and not any(name == p or name.startswith(p + "-") for p in args.impls):
            continue
        row = {"impl": name, "N": n, "D": d, "V": v, "kept_rows": kept}
        if isinstance(fn, Exception):
            row["note"] = f"unavailable: {type(fn).__name__}: {fn}"[:200]
            rows.append(row)
            continue
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

        def clear():
            hh.grad = ww.grad = None

        def step():
            clear()
            fn(hh, ww, t).backward()

        try:
            with linear_flags(getattr(fn, "flags", {})):
                step()  # correctness call (also warm-up)
                if ref is not None:
                    out = fn(hh.detach(), ww.detach(), t)
                    row["loss_rel_err"] = abs(float(out) - float(ref[0])) / abs(float(ref[0]))
                    row["grad_input_rel_err"] = rel(hh.grad, ref[1])
                    row["grad_weight_rel_err"] = rel(ww.grad, ref[2])
                for _ in range(args.warmup):
                    step()
                row["ms"] = timed(step, args.reps, device)
                peak = peak_extra(step, device, clear)
                row["peak_extra_gib"] = None if peak is None else peak / GiB
        except Exception as exc:  # an implementation that fails a shape (e.g. out of memory) gets a note
            row["note"] = f"failed: {type(exc).__name__}: {exc}"[:200]
        hh.grad = ww.grad = None
        torch.cuda.empty_cache() if device.type == "cuda" else None
        rows.append(row)
        log(f"{shape} {name}: {row.get('ms', '-')} ms, {row.get('peak_extra_gib', '-')} GiB {row.get('note', '')}")
    if not args.impls or "gemms" in args.impls:
        for name, m in (("gemms", n), ("gemms-kept", kept)):
            dl = torch.randn(m, v, device=device, dtype=dtype)
            hk = h[:m].contiguous()
            gemm_step(hk, w, dl)
            ms = timed(lambda: gemm_step(hk, w, dl), args.reps, device)
            tflops = 3 * 2 * m * d * v / (ms * 1e-3) / 1e12
            rows.append({"impl": name, "N": n, "D": d, "V": v, "kept_rows": m, "ms": ms, "tflops": tflops})
            del dl
            log(f"{shape} {name}: {ms:.3f} ms ({tflops:.0f} TFLOP/s)")
    if ref is not None and device.type == "cuda":  # plain PyTorch in bf16: the accuracy bar is 2x its error
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        F.cross_entropy(F.linear(hh, ww).float(), t).backward()
        rows.append({"impl": "plain-bf16-errors", "N": n, "D": d, "V": v,
                     "grad_input_rel_err": rel(hh.grad, ref[1]), "grad_weight_rel_err": rel(ww.grad, ref[2])})
    return rows


def write(out: Path, slug: str, header: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{slug}-linear.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    lines = [f"# Fused linear cross-entropy: {header['device']}", "",
             f"{header['date']}; torch {header['torch']}, triton {header['triton']}; bf16, 1/8 of targets ignored, "
             "fwd+bwd, median of reps; peak = memory above the inputs during one call (gradients included).", "",
             "| N×D×V | impl | ms | × GEMMs (kept rows) | peak GiB | loss rel err | grad_in rel err | grad_W rel err | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for shape in sorted({(r["N"], r["D"], r["V"]) for r in rows}):
        group = [r for r in rows if (r["N"], r["D"], r["V"]) == shape]
        base = next((r.get("ms") for r in group if r["impl"] == "gemms-kept"), None)

        def f(x, spec):
            return "–" if x is None else format(x, spec)

        for r in group:
            ratio = r["ms"] / base if base and r.get("ms") else None
            lines.append(f"| {'×'.join(map(str, shape))} | {r['impl']} | {f(r.get('ms'), '.2f')} | {f(ratio, '.3f')} | "
                         f"{f(r.get('peak_extra_gib'), '.2f')} | {f(r.get('loss_rel_err'), '.1e')} | "
                         f"{f(r.get('grad_input_rel_err'), '.2e')} | {f(r.get('grad_weight_rel_err'), '.2e')} | "
                         f"{r.get('note', '')} |")
    (out / f"{slug}-linear.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for impl in sorted({r["impl"] for r in rows if r.get("ms")}):
        pts = sorted((r["V"], r["ms"], r.get("peak_extra_gib")) for r in rows if r["impl"] == impl and r.get("ms"))
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        if any(p[2] is not None for p in pts) and not impl.startswith("gemms"):
            ax_m.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=impl)
    ax_t.set(xlabel="V", ylabel="fwd+bwd ms", title="time (N=8192, D=4096)")
    ax_m.set(xlabel="V", ylabel="GiB above inputs", title="peak memory")
    ax_t.legend(fontsize=7)
    ax_m.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{slug}-linear.png", dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", help="comma-separated NxDxV")
    parser.add_argument("--impls", help="comma-separated names (prefixes match variants)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-check", action="store_true", help="skip the float64 errors")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--slug", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.impls = args.impls.split(",") if args.impls else None
    args.reps = args.reps or ((5 if args.quick else 12) if device.type == "cuda" else 2)
    shapes = ([tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes
              else GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    slug = args.slug or ("h100" if "H100" in name else "h200" if "H200" in name else device.type)
    import triton  # noqa: F401

    header = {"device": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "torch": torch.__version__, "triton": getattr(sys.modules.get("triton"), "__version__", None)}
    for module in ("liger_kernel", "cut_cross_entropy", "transformers"):
        try:
            from importlib.metadata import version

            header[module] = version(module.replace("_", "-"))
        except Exception:
            header[module] = None
    impls = implementations(device)
    rows = []
    for shape in shapes:
        rows += measure_shape(shape, impls, args, device, dtype, lambda m: print(m, flush=True))
        write(args.out, slug, header, rows)
    print((args.out / f"{slug}-linear.md").read_text())


if __name__ == "__main__":
    main()
