"""Benchmark: what each loss option costs over plain cross-entropy, on the logits path and the fused-linear path.

    python benchmarks/bench_options.py                  # GPU: logits (4, 2048, 128256) and (4, 2048, 32000); linear
                                                        # (8192, 4096, 128256); every backend
    python benchmarks/bench_options.py --default-only   # just the default rows (e.g. for an older fastce on PYTHONPATH)

One row per (path, backend, option): forward + backward median GPU time (CUDA events, L2 flushed before each rep, the
launches queued behind a GPU sleep so that host time is not counted, validate=False, the options interleaved), bf16,
20% of targets ignored (1/8 on the linear path), and its cost over the default row of the same path and backend (the
issue's bar: at most 5% at V = 128256). Options: ``softcap=30``, ``label_smoothing=0.1``, ``z_loss=1e-4``,
``return_stats=True`` (lse, entropy, accuracy), and all of them at once. Results: ``<out>/<slug>-options.{md,json}``.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

OPTIONS = {
    "default": {},
    "softcap": {"softcap": 30.0},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-4},
    "return_stats": {"return_stats": True},
    "all": {"softcap": 30.0, "label_smoothing": 0.1, "z_loss": 1e-4, "return_stats": True},
}
LOGITS_SHAPES = [(4, 2048, 128256), (4, 2048, 32000)]
LINEAR_SHAPES = [(8192, 4096, 128256)]


def _loss(out):
    return out.loss if hasattr(out, "loss") else out


def time_all(steps: dict, reps: int) -> dict:
    """Median GPU time (ms) of each step, the steps interleaved rep by rep (drift of the machine hits all alike). Each
    rep flushes L2, then queues the step behind a ~5 ms GPU sleep: the host has queued every launch before the
    timed window opens, so the time is the kernels' alone (the steps run with validate=False: no host wait)."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    times = {key: [] for key in steps}
    for _ in range(reps):
        for key, step in steps.items():
            flush.zero_()
            torch.cuda._sleep(10_000_000)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times[key].append(start.elapsed_time(end))
    return {key: statistics.median(values) for key, values in times.items()}


def measure(path: str, shape, steps: dict, reps: int) -> list:
    for step in steps.values():
        step()  # warm-up: compiles, allocates
    medians = time_all(steps, reps)
    rows = [{"path": path, "shape": "x".join(map(str, shape)), "backend": backend, "option": name, "ms": ms}
            for (backend, name), ms in medians.items()]
    for row in rows:
        print(row, flush=True)
    return rows


def logits_rows(fastce, shape, backends, options, reps):
    B, T, V = shape
    logits = (torch.randn(B, T, V, device="cuda") * 2).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (B, T), device="cuda")
    labels[:, int(T * 0.8):] = -100
    num_items = (labels[:, 1:] != -100).sum()

    def make(backend, opts):
        def step():
            logits.grad = None
            _loss(fastce.causal_lm_loss(logits, labels, num_items_in_batch=num_items, backend=backend,
                                        validate=False, **opts)).backward()
        return step

    steps = {(backend, name): make(backend, opts) for backend in backends for name, opts in options.items()}
    return measure("logits", shape, steps, reps)


def linear_rows(fastce, shape, backends, options, reps):
    N, D, V = shape
    h = torch.randn(N, D, device="cuda").to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, D, device="cuda") * D ** -0.5 * 2).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, V, (N,), device="cuda")
    target[torch.rand(N, device="cuda") < 1 / 8] = -100

    def make(backend, opts):
        def step():
            h.grad = w.grad = None
            _loss(fastce.linear_cross_entropy(h, w, target, backend=backend, validate=False, **opts)).backward()
        return step

    steps = {(backend, name): make(backend, opts) for backend in backends for name, opts in options.items()}
    return measure("linear", shape, steps, max(3, reps // 3))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--default-only", action="store_true")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--paths", default="logits,linear")
    parser.add_argument("--tag", default="", help="label of this run in the table (e.g. 'before')")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--slug", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_options.py needs a CUDA device", file=sys.stderr)
        return 2
    import fastce

    backends = [b for b in fastce.available_backends() if b != "torch"]
    options = {"default": {}} if args.default_only else OPTIONS
    rows = []
    if "logits" in args.paths:
        for shape in LOGITS_SHAPES:
            rows += logits_rows(fastce, shape, backends, options, args.reps)
    if "linear" in args.paths and hasattr(fastce, "linear_cross_entropy"):
        for shape in LINEAR_SHAPES:
            rows += linear_rows(fastce, shape, backends, options, args.reps)
    for row in rows:
        base = next(r["ms"] for r in rows if r["option"] == "default" and r["path"] == row["path"]
                    and r["shape"] == row["shape"] and r["backend"] == row["backend"])
        row["over_default"] = row["ms"] / base - 1
        row["tag"] = args.tag
    name = torch.cuda.get_device_name()
    slug = args.slug or ("h100" if "H100" in name else "h200" if "H200" in name else "cuda")
    header = {"device": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "torch": torch.__version__, "fastce": str(Path(inspect.getfile(fastce)).parent), "tag": args.tag}
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.tag}" if args.tag else ""
    (args.out / f"{slug}-options{suffix}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    lines = [f"# Loss options: cost over the default ({name}, {header['date']}, torch {header['torch']})", "",
             "`python benchmarks/bench_options.py`: fwd+bwd GPU time (launches queued behind a GPU sleep, validate=False, "
             "options interleaved rep by rep), bf16, median with L2 flushed.", "",
             "| path | shape | backend | option | ms | over default |", "|---|---|---|---|---:|---:|"]
    lines += [f"| {r['path']} | {r['shape']} | {r['backend']} | {r['option']} | {r['ms']:.3f} | "
              f"{100 * r['over_default']:+.1f}% |" for r in rows]
    (args.out / f"{slug}-options{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
