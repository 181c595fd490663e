"""The table behind ``backend="auto"``: fastce's Triton and CUDA backends side by side, per shape and mode, from a
results JSON of bench_cross_entropy.py.

    python benchmarks/auto_backend_table.py benchmarks/results/h100.json > benchmarks/results/auto-backend.md

The rule itself lives in fastce/backends.py; this prints what it was decided from, and marks the faster backend.
"""
import json
import sys
from pathlib import Path


def main(path: str) -> None:
    results = json.loads(Path(path).read_text())
    header, rows = results["header"], results["rows"]
    times = {}
    for row in rows:
        if row["impl"] in ("fastce-triton", "fastce-cuda") and row.get("status") == "ok":
            times[(row["rows"], row["vocab"], row["mode"], row["impl"])] = row["median_ms"]
    shapes = sorted({(n, v) for n, v, _, _ in times}, key=lambda s: (-s[0], s[1]))
    print(f"# `backend=\"auto\"` on CUDA tensors: Triton and CUDA backends side by side\n")
    print(f"From `{Path(path).name}`: {header['device']}, torch {header['torch_version']}, triton "
          f"{header['triton_version']}, {header['date']}; {header['dtype']}, end to end (loss + backward), "
          f"validate={header['validate']}, median ms. Bold: the faster; ratio = CUDA / Triton.\n")
    print("| rows × V | mode | fastce-triton | fastce-cuda | CUDA / Triton |")
    print("|---|---|---:|---:|---:|")
    for rows_, vocab in shapes:
        for mode in ("fwd+bwd", "fwd+bwd-inplace", "fwd"):
            t, c = times.get((rows_, vocab, mode, "fastce-triton")), times.get((rows_, vocab, mode, "fastce-cuda"))
            if t is None or c is None:
                continue
            cells = [f"**{x:.3f}**" if x == min(t, c) else f"{x:.3f}" for x in (t, c)]
            print(f"| {rows_} × {vocab} | {mode} | {cells[0]} | {cells[1]} | {c / t:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/h100.json")
