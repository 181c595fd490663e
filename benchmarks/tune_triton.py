"""Sweep the Triton kernel's launch configuration (BLOCK_V, num_warps, programs per SM) on the standard shapes.

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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    shapes = [(4, 2048, 32000), (4, 2048, 128256), (2, 4096, 256000), (1, 512, 256000)]
    blocks = [4096, 8192, 16384]
    warps = [8, 16] if args.quick else [4, 8, 16]
    per_sm = [1, 2, 4, 0]  # 0: one program per row (no persistent loop)
    default_config = triton_ce._launch_config
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for B, T, V in shapes:
        logits, labels, num_items = make_inputs(B, T, V)
        floor_ms = B * T * V * 4 / bw * 1e3
        ms = time_fwd_bwd(logits, labels, num_items)
        print(f"\n{(B, T, V)} floor {floor_ms:.3f} ms; default config {default_config(V, B * T, logits.device)}: "
              f"{ms:.3f} ms ({floor_ms / ms:.0%} of copy bandwidth)", flush=True)
        results = []
        for block_v, num_warps, k in itertools.product(blocks, warps, per_sm):
            programs = B * T if k == 0 else min(B * T, k * sms)
            triton_ce._launch_config = lambda *a, _c=(block_v, num_warps, programs): _c
            try:
                ms = time_fwd_bwd(logits, labels, num_items)
            except Exception as exc:  # e.g. out of registers / shared memory for a config
                print(f"  BLOCK_V={block_v:6d} warps={num_warps:2d} programs/SM={k}: failed {type(exc).__name__}")
                continue
            finally:
                triton_ce._launch_config = default_config
            results.append((ms, block_v, num_warps, k))
            print(f"  BLOCK_V={block_v:6d} warps={num_warps:2d} programs/SM={k or 'rows'}: {ms:.3f} ms "
                  f"({floor_ms / ms:.0%})", flush=True)
        best = min(results)
        print(f"  best: {best[0]:.3f} ms BLOCK_V={best[1]} warps={best[2]} programs/SM={best[3] or 'rows'}", flush=True)
        del logits, labels
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
