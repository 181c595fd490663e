"""Host time of one fwd+bwd call, where it goes: a tiny input (GPU work negligible), timed, then under cProfile.

    python benchmarks/profile_host.py [--backends cuda,triton] [--top 25]

Evidence for the host-overhead rows of benchmarks/NOTES.md. The GPU is never the bottleneck here, so the time per
call is what the host spends in Python, the dispatcher and launches.
"""
import argparse
import cProfile
import pstats
import time

import torch

import fastce


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="cuda,triton")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    x = torch.randn(1, 16, 128, device="cuda").requires_grad_()
    labels = torch.randint(0, 128, (1, 16), device="cuda")
    num_items = (labels[:, 1:] != -100).sum()
    for backend in args.backends.split(","):
        for validate in (True, False):
            def call():
                x.grad = None
                fastce.causal_lm_loss(x, labels, 128, num_items_in_batch=num_items, backend=backend,
                                      validate=validate).backward()

            for _ in range(30):
                call()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.calls):
                call()
            torch.cuda.synchronize()
            per_call = (time.perf_counter() - start) / args.calls * 1e6
            print(f"== {backend}, validate={validate}: {per_call:.0f} us per fwd+bwd call", flush=True)
            if validate:
                continue
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.calls):
                call()
            torch.cuda.synchronize()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
