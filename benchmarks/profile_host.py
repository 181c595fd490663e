"""Host time of one fwd+bwd call, where it goes: a tiny input (GPU work negligible), timed, then under cProfile; and
the end-to-end time of a small real shape against its kernels' time.

    python benchmarks/profile_host.py [--backends auto,general,triton] [--top 25] [--e2e 4x2048x32000]

Evidence for the host-overhead rows of benchmarks/NOTES.md. On the tiny input the GPU is never the bottleneck, so the
time per call is what the host spends in Python, the dispatcher and launches. The machine's own speed is printed
beside it: plain PyTorch's ``F.cross_entropy`` fwd+bwd and one ``x + 1`` on the same host, in the same run (the VM's
host speed varies from run to run). Backend ``general``: "auto" with the eager CUDA path's one-op forward turned off
(``fastce.loss.DIRECT = False``), the path every call took before it. ``--e2e BxTxV``: calls in a row at that bf16 shape (validate=True, the default),
wall time per call against the GPU time of its kernels (torch.profiler), whose ratio issue 12 bounds by 1.3.
"""
import argparse
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

import fastce


def per_call_us(call, calls: int) -> float:
    for _ in range(30):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def calibration(calls: int) -> None:
    x = torch.randn(16, 128, device="cuda", requires_grad=True)
    t = torch.randint(0, 128, (16,), device="cuda")

    def plain():
        x.grad = None
        F.cross_entropy(x, t).backward()

    y = x.detach()
    print(f"== host speed: F.cross_entropy fwd+bwd {per_call_us(plain, calls):.0f} us per call, one x + 1 "
          f"{per_call_us(lambda: y + 1, calls):.1f} us", flush=True)


def end_to_end(shape: str, calls: int, name: str) -> None:
    B, T, V = (int(n) for n in shape.split("x"))
    x = (torch.randn(B, T, V, device="cuda") * 3).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (B, T), device="cuda")
    labels[:, -T // 8:] = -100

    def call():
        x.grad = None
        fastce.causal_lm_loss(x, labels, V).backward()

    wall = per_call_us(call, calls)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    kernels = sum(e.self_device_time_total for e in prof.key_averages()) / calls
    print(f"== end to end {shape} bf16, {name}, validate=True: {wall:.0f} us per fwd+bwd call, its kernels {kernels:.0f} us "
          f"(ratio {wall / kernels:.2f})", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="auto,general,triton")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--e2e", default="4x2048x32000", help="BxTxV, or '' for none")
    args = parser.parse_args()
    calibration(args.calls)
    x = torch.randn(1, 16, 128, device="cuda").requires_grad_()
    labels = torch.randint(0, 128, (1, 16), device="cuda")
    num_items = (labels[:, 1:] != -100).sum()
    for name in args.backends.split(","):
        backend = "auto" if name == "general" else name
        fastce.loss.DIRECT = name != "general"
        for validate in (True, False):
            def call():
                x.grad = None
                fastce.causal_lm_loss(x, labels, 128, num_items_in_batch=num_items, backend=backend,
                                      validate=validate).backward()

            print(f"== {name}, validate={validate}: {per_call_us(call, args.calls):.0f} us per fwd+bwd call",
                  flush=True)
            if not validate or args.top <= 0:
                continue
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.calls):
                call()
            torch.cuda.synchronize()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
    if args.e2e:
        for direct in (True, False):
            fastce.loss.DIRECT = direct
            end_to_end(args.e2e, max(args.calls // 10, 10), "auto" if direct else "general")


if __name__ == "__main__":
    main()
