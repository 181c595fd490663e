"""Probe the kernels alone, bf16: the CUDA backend's cluster path and row path beside Triton, with and without gradient.

    python benchmarks/probe_cuda.py              # the installed extension, the standard shapes and a few-rows shape
    python benchmarks/probe_cuda.py --variants   # row-path variants of threads per block and unroll, built just in time

Evidence for benchmarks/NOTES.md; the launcher reads FASTCE_CUDA_CLUSTER at every launch. For counters:
ncu --set basic -k regex:cluster -c 2 python ...
"""
import os
import subprocess
import sys
from pathlib import Path

import torch
import triton.testing

VARIANTS = [(512, 4), (512, 8), (256, 4), (256, 8), (1024, 2)]  # (threads per block, 16-byte vectors in flight)
CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _variant_library(threads: int, unroll: int) -> None:
    """Builds (cached) and loads csrc/ with other kernel constants; its ops replace nothing: run one per process."""
    from torch.utils import cpp_extension

    flags = [f"-DFASTCE_CUDA_THREADS={threads}", f"-DFASTCE_CUDA_UNROLL={unroll}"]
    cpp_extension.load(
        name=f"fastce_probe_t{threads}_u{unroll}",
        sources=[str(p) for p in sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.cu"))],
        extra_include_paths=[str(CSRC)], extra_cflags=["-O3", *flags], extra_cuda_cflags=["-O3", *flags],
        is_python_module=False,
    )


def _child(threads: int, unroll: int, build_only: bool) -> None:
    _variant_library(threads, unroll)
    if build_only:
        return
    launch = torch.ops.fastce_cuda.cross_entropy_fwd
    B, T, V = 4, 2048, 128256
    logits = (torch.randn(B, T, V, device="cuda") * 2).to(torch.bfloat16)
    targets = torch.randint(0, V, (B, T), device="cuda")
    targets[:, -400:] = -100
    divisor = torch.tensor(1000.0, dtype=torch.float64, device="cuda")
    losses, grad = torch.empty(B, T, device="cuda"), torch.empty_like(logits)
    launch(logits, targets, divisor, losses, grad, -100)
    rows = slice(0, 1), slice(0, 64)  # a check that the variant computes the same function
    x = logits[rows].double()
    expected = torch.logsumexp(x, -1) - x.gather(-1, targets[rows].clamp_min(0).unsqueeze(-1)).squeeze(-1)
    expected = torch.where(targets[rows] == -100, 0.0, expected)
    error = ((losses[rows].double() - expected).abs() / expected.abs().clamp_min(1e-30)).max().item()
    floor_ms = B * T * V * 4 / 3.0e12 * 1e3
    with_grad = triton.testing.do_bench(lambda: launch(logits, targets, divisor, losses, grad, -100),
                                        return_mode="median")
    forward = triton.testing.do_bench(lambda: launch(logits, targets, divisor, losses, None, -100), return_mode="median")
    print(f"threads {threads:4d} unroll {unroll:2d}: fwd+grad {with_grad:.3f} ms ({floor_ms / with_grad:.0%} of 3.0 TB/s), "
          f"fwd only {forward:.3f} ms ({floor_ms / 2 / forward:.0%}); loss rel err {error:.1e}", flush=True)


def variants() -> None:
    script = str(Path(__file__).resolve())
    builds = [subprocess.Popen([sys.executable, script, "--child", str(t), str(u), "--build-only"]) for t, u in VARIANTS]
    for build in builds:
        build.wait()
    for threads, unroll in VARIANTS:
        subprocess.run([sys.executable, script, "--child", str(threads), str(unroll)], check=False)


SHAPES = [(4, 2048, 32000), (4, 2048, 128256), (2, 4096, 151936), (2, 4096, 256000), (1, 512, 256000)]
# CUDA launch paths (environment read at every launch): the cluster path (sm_90 default, or as FASTCE_CUDA_CLUSTER
# was set for this run), and the row/split paths.
PATHS = {"cuda cluster": {"FASTCE_CUDA_CLUSTER": os.environ.get("FASTCE_CUDA_CLUSTER", ""),
                          "FASTCE_CUDA_FWD_PARTIALS": ""},
         "cuda fwd-in-clusters": {"FASTCE_CUDA_FWD_PARTIALS": "0"},
         "cuda rows": {"FASTCE_CUDA_CLUSTER": "0", "FASTCE_CUDA_FWD_PARTIALS": ""}}


def main():
    """Kernels alone (preallocated outputs, L2 flushed by do_bench): CUDA cluster path, CUDA row path, Triton."""
    from fastce.kernels import cuda_ce, triton_ce

    copy_gbps = _copy_gbps()
    print(f"copy bandwidth {copy_gbps:.0f} GB/s; '%' = fraction of it; fwd+grad moves 2 x the logits' bytes, "
          f"fwd only 1 x (ignored rows, ~20%, are not read)", flush=True)
    for B, T, V in SHAPES:
        logits = (torch.randn(B, T, V, device="cuda") * 2).to(torch.bfloat16)
        targets = torch.randint(0, V, (B, T), device="cuda")
        targets[:, -(T // 5):] = -100
        divisor = torch.tensor(1000.0, dtype=torch.float64, device="cuda")
        losses = torch.empty(B, T, device="cuda")
        grad = torch.empty_like(logits)
        nbytes = logits.numel() * logits.element_size()
        for name, env in [*PATHS.items(), ("triton", {})]:
            os.environ.update(env)
            launcher = triton_ce if name == "triton" else cuda_ce
            times = {}
            for mode, g in [("fwd+grad", grad), ("fwd", None)]:
                times[mode] = triton.testing.do_bench(
                    lambda: launcher.cross_entropy_fwd(logits, targets, divisor, losses, g, -100), return_mode="median")
            line = "  ".join(f"{mode} {ms:.3f} ms {nbytes * (2 if mode == 'fwd+grad' else 1) / ms / 1e6 / copy_gbps:4.0%}"
                             for mode, ms in times.items())
            print(f"{B}x{T}x{V:<7d} {name:13s} {line}", flush=True)
        del logits, grad
    os.environ.pop("FASTCE_CUDA_CLUSTER", None)
    os.environ.pop("FASTCE_CUDA_FWD_PARTIALS", None)


def _copy_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / ms / 1e6


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(int(sys.argv[2]), int(sys.argv[3]), "--build-only" in sys.argv)
    elif "--variants" in sys.argv:
        variants()
    else:
        main()
