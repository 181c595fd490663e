"""The fused backward's slab cap (``fastce.linear._SLAB_WAVES``, benchmarks/NOTES.md rows 25 and 29), A/B in one run:
fwd+bwd of ``fastce.linear_cross_entropy`` (Triton, both fused kernels) at each cap, the caps interleaved rep by rep
(GPU drift hits all alike), median ms and the peak memory above the inputs, with the slab width each cap gives.

    python benchmarks/probe_slab_cap.py --shapes 8192x4096x128256,8192x2048x128256 --waves 16,20,0 --reps 25

``--waves 0``: no cap (the byte rule alone).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastce  # noqa: E402
from bench_linear_cross_entropy import make_inputs, peak_extra  # noqa: E402
from fastce import linear  # noqa: E402

GiB = 2 ** 30


def width(rows: int, dim: int, vocab: int, waves: int) -> int:
    from fastce.kernels import triton_linear_grad

    cap = triton_linear_grad.slab_columns(rows, torch.device("cuda"), waves) if waves else None
    return linear._slab_columns(rows, dim, vocab, 2, cap)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8192x4096x128256,8192x2048x128256")
    parser.add_argument("--waves", default="16,20,0")
    parser.add_argument("--reps", type=int, default=25)
    args = parser.parse_args(argv)
    saved = linear._SLAB_WAVES
    caps = [int(w) for w in args.waves.split(",")]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; fwd+bwd ms (median of {args.reps}, caps "
          f"interleaved), peak GiB above the inputs")
    for shape in args.shapes.split(","):
        n, d, v = (int(x) for x in shape.split("x"))
        h, w, t = make_inputs(n, d, v, torch.bfloat16, torch.device("cuda"))
        kept = int((t != -100).sum())
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

        def clear():
            hh.grad = ww.grad = None

        def step():
            clear()
            fastce.linear_cross_entropy(hh, ww, t, backend="triton").backward()

        times, peaks = {c: [] for c in caps}, {}
        try:
            for rep in range(args.reps + 2):
                for cap in caps:
                    linear._SLAB_WAVES = cap or (1 << 30)
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize()
                    start.record()
                    step()
                    end.record()
                    torch.cuda.synchronize()
                    if rep >= 2:  # two warm-up rounds
                        times[cap].append(start.elapsed_time(end))
            for cap in caps:
                linear._SLAB_WAVES = cap or (1 << 30)
                peaks[cap] = peak_extra(step, hh.device, clear) / GiB
        finally:
            linear._SLAB_WAVES = saved
        for cap in caps:
            columns = width(kept, d, v, cap)
            print(f"{shape} waves={cap or 'none':>4}: slab {columns} columns ({-(-v // columns)} slabs), "
                  f"{statistics.median(times[cap]):.2f} ms, peak {peaks[cap]:.3f} GiB")


if __name__ == "__main__":
    main()
