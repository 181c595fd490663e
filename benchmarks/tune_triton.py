"""Sweep the Triton kernel's launch configuration (BLOCK_V, num_warps, vocabulary splits) on the standard shapes.

    python benchmarks/tune_triton.py [--quick]

Prints the copy bandwidth, then fwd+bwd median time and effective bandwidth (4 bytes per bf16 logit) for each
configuration; the chosen default lives in fastce/kernels/triton_ce.py:_launch_config.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.testing

import fastce
from fastce.kernels import triton_ce


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def make_inputs(B, T, V):
    logits = (torch.randn(B, T, V, device="cuda") * 2).to(torch.bfloat16).requires_grad_()
    lengths = torch.randint(int(0.6 * T), T + 1, (B,), device="cuda")
    labels = torch.randint(0, V, (B, T), device="cuda")
    labels[torch.arange(T, device="cuda")[None] >= lengths[:, None]] = -100  # ~20% right padding
    return logits, labels, (labels[:, 1:] != -100).sum()


def time_fwd_bwd(logits, labels, num_items, **kwargs):
    def step():
        logits.grad = None
        fastce.causal_lm_loss(logits, labels, num_items_in_batch=num_items, backend="triton", **kwargs).backward()

    return triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")


def configs(B, T, V, quick):
    """(BLOCK_V, num_warps, num_splits, num_stages) candidates for one shape."""
    if V <= 32768:  # one chunk held in registers, or streamed in two
        block = triton.next_power_of_2(V)
        return [(block, w, 1, 1) for w in (16, 32)] + [(block // 2, w, 1, st) for w in (8, 16) for st in (1, 2)]
    rows = [(b, w, 1, st) for b, w, st in itertools.product([8192, 16384], [8, 16], [1, 2, 3])]
    return rows + [(16384, 16, s, 1) for s in (2, 4, 8)]


def time_kernel_only(logits, labels, config):
    """The launcher alone (no loss-API work), fwd with gradient."""
    from fastce.kernels import triton_ce as k

    B, T, V = logits.shape
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    divisor = torch.tensor(1000.0, dtype=torch.float64, device="cuda")
    losses = torch.empty(B, T, device="cuda")
    grad = torch.empty_like(logits)
    block, warps, splits, stages = config
    k._launch_config = lambda *a: (block, warps, 1, stages)
    try:
        return triton.testing.do_bench(
            lambda: k.cross_entropy_fwd(logits.detach(), targets, divisor, losses, grad, -100, num_splits=splits),
            warmup=25, rep=200, return_mode="median")
    finally:
        k._launch_config = DEFAULT_CONFIG


def host_overhead():
    """Host time per call on a tiny input, where the GPU work is negligible: what each layer costs."""
    import time

    from fastce import ops

    x = torch.randn(1, 16, 128, device="cuda").requires_grad_()
    y = torch.randint(0, 128, (1, 16), device="cuda")
    d = torch.tensor(1.0, dtype=torch.float64, device="cuda")
    losses, grad = torch.empty(1, 16, device="cuda"), torch.empty_like(x)

    def fwd_bwd(validate):
        x.grad = None
        fastce.causal_lm_loss(x, y, backend="triton", validate=validate).backward()

    cases = {
        "causal_lm_loss fwd+bwd, validate": lambda: fwd_bwd(True),
        "causal_lm_loss fwd+bwd, no validate": lambda: fwd_bwd(False),
        "op cross_entropy_fwd (grad), no validate": lambda: ops.cross_entropy_fwd(x.detach(), y, d, -100, True, False, "triton"),
        "triton launcher alone": lambda: triton_ce.cross_entropy_fwd(x.detach(), y, d, losses, grad, -100),
        "op scale_grad_": lambda: ops.scale_grad_(grad, d.float(), "triton"),
    }
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            fn()
        torch.cuda.synchronize()
        print(f"  host per call: {name}: {(time.perf_counter() - start) / 200 * 1e6:.1f} us", flush=True)


DEFAULT_CONFIG = triton_ce._launch_config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-sweep", action="store_true", help="time the default configuration only")
    parser.add_argument("--shapes", default="4x2048x32000,4x2048x128256,2x4096x151936,2x4096x256000,1x512x256000,1x1024x256000")
    args = parser.parse_args()
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    if not args.no_sweep:
        host_overhead()
    default_config = triton_ce._launch_config
    for B, T, V in shapes:
        logits, labels, num_items = make_inputs(B, T, V)
        floor_ms = B * T * V * 4 / bw * 1e3
        ms = time_fwd_bwd(logits, labels, num_items)
        with torch.no_grad():
            fwd_ms = triton.testing.do_bench(
                lambda: fastce.causal_lm_loss(logits, labels, num_items_in_batch=num_items, backend="triton"),
                warmup=25, rep=200, return_mode="median")
        print(f"\n{(B, T, V)} floor {floor_ms:.3f} ms; default {default_config(V, B * T, logits.device)}: "
              f"fwd+bwd {ms:.3f} ms ({floor_ms / ms:.0%} of copy bandwidth); "
              f"fwd only {fwd_ms:.3f} ms ({floor_ms / 2 / fwd_ms:.0%})", flush=True)
        kernel_ms = time_kernel_only(logits, labels, default_config(V, B * T, logits.device))
        print(f"  default config, kernel alone {kernel_ms:.3f} ms ({floor_ms / kernel_ms:.0%})", flush=True)
        results = []
        for config in [] if args.no_sweep else configs(B, T, V, args.quick):
            triton_ce._launch_config = lambda *a, _c=config: _c
            try:
                ms = time_fwd_bwd(logits, labels, num_items)
            except Exception as exc:  # e.g. out of registers / shared memory for a config
                print(f"  {config}: failed {type(exc).__name__}")
                continue
            finally:
                triton_ce._launch_config = default_config
            kernel_ms = time_kernel_only(logits, labels, config)
            results.append((ms, config))
            print(f"  BLOCK_V={config[0]:6d} warps={config[1]:2d} splits={config[2]:2d} stages={config[3]}: {ms:.3f} ms "
                  f"({floor_ms / ms:.0%}); kernel alone {kernel_ms:.3f} ms ({floor_ms / kernel_ms:.0%})", flush=True)
        if results:
            best = min(results)
            print(f"  best: {best[0]:.3f} ms {best[1]}", flush=True)
        del logits, labels
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
