"""Probe the CUDA backend's kernels alone at (4, 2048, 128256) bf16: blocks per SM, forward-only vs with gradient.

    python benchmarks/probe_cuda.py            # then, for counters: ncu --set basic -k regex:rows -c 2 python ...

Evidence for benchmarks/NOTES.md; the launcher reads FASTCE_CUDA_ROW_BLOCKS_PER_SM at every launch.
"""
import os

import torch
import triton.testing

from fastce.kernels import cuda_ce


def main():
    B, T, V = 4, 2048, 128256
    logits = (torch.randn(B, T, V, device="cuda") * 2).to(torch.bfloat16)
    targets = torch.randint(0, V, (B, T), device="cuda")
    targets[:, -400:] = -100
    divisor = torch.tensor(1000.0, dtype=torch.float64, device="cuda")
    losses = torch.empty(B, T, device="cuda")
    grad = torch.empty_like(logits)
    floor_ms = B * T * V * 4 / 3.0e12 * 1e3
    for blocks in ["", "1", "2", "3", "4"]:
        os.environ["FASTCE_CUDA_ROW_BLOCKS_PER_SM"] = blocks
        with_grad = triton.testing.do_bench(
            lambda: cuda_ce.cross_entropy_fwd(logits, targets, divisor, losses, grad, -100), return_mode="median")
        forward = triton.testing.do_bench(
            lambda: cuda_ce.cross_entropy_fwd(logits, targets, divisor, losses, None, -100), return_mode="median")
        print(f"blocks/SM {blocks or 'default'}: fwd+grad {with_grad:.3f} ms ({floor_ms / with_grad:.0%} of 3.0 TB/s), "
              f"fwd only {forward:.3f} ms ({floor_ms / 2 / forward:.0%})", flush=True)


if __name__ == "__main__":
    main()
