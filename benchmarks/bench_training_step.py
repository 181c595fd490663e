"""One training step of a Llama-shaped model, with the loss of stock transformers, fastce, fastce's fused lm_head and
Liger's fused linear cross-entropy: time and peak memory.

    python benchmarks/bench_training_step.py                 # every mode, each in its own process
    python benchmarks/bench_training_step.py --mode fused    # one mode
    python benchmarks/bench_training_step.py --modes fastce,fused --profile 15   # and each one's 15 costliest kernels
    python benchmarks/bench_training_step.py --modes fused,liger --memory 12     # the 12 largest blocks at the peak

The model (random weights, bf16, ``attn_implementation="sdpa"``): 8 layers, hidden 2048, intermediate 5632, 16 heads
(8 KV heads), vocabulary 128256 (Llama 3's); a batch of 4 x 2048 random tokens whose labels are the inputs; AdamW
(``fused=True`` on a GPU). A step is forward (with the loss), backward, optimizer step and ``zero_grad``. Reported:
the median step time over ``--steps`` steps after ``--warmup`` steps, and the peak memory of a step above what is
allocated before it (weights and optimizer states), with the loss of the first step (the modes must agree).

Modes: ``stock`` (transformers' ``ForCausalLMLoss``), ``fastce`` (``fastce.patch_model(model)``: the logits kernel),
``fused`` (``fastce.patch_model(model, fuse_lm_head=True)``: the logits are never held), ``fused-slabs`` (the same
with ``fastce.linear.FUSED_FORWARD`` and ``FUSED_BACKWARD`` off: the slab path that the fused Triton kernels replaced,
benchmarks/NOTES.md row 24), ``liger`` (``liger_kernel``'s ``apply_liger_kernel_to_llama(fused_linear_cross_entropy=True)`` with its other kernels off, so
that only the loss differs). Results: ``<out>/<slug>-training-step.{md,json}``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("stock", "fastce", "fused", "fused-slabs", "liger")
GiB = 1 << 30


def build(mode: str, device, vocab: int, layers: int, hidden: int):
    import transformers

    if mode == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=False, rms_norm=False, swiglu=False, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16 if device.type == "cuda"
                                                     else torch.float32)
    if mode in ("fastce", "fused", "fused-slabs"):
        import fastce
        from fastce import linear

        if mode == "fused-slabs":  # each mode runs in its own process
            linear.FUSED_FORWARD = linear.FUSED_BACKWARD = False
        fastce.patch_model(model, fuse_lm_head=mode != "fastce")
    return model.train()


def alive_at_peak(trace: list[dict]) -> list[tuple[int, str]]:
    """(bytes, where) of the blocks allocated during a step and alive when its allocated total peaked, largest first,
    from the allocator's trace (``torch.cuda.memory._snapshot``): alloc and free events in order (blocks made before
    the step count neither when made nor when freed); "where" is the innermost Python frame of the allocation outside
    torch itself. The first entry is the peak's total and the block that reached it."""
    alive, total, best, at_peak, peak_event = {}, 0, -1, {}, None
    for event in trace:
        if event["action"] == "alloc":
            alive[event["addr"]] = event
            total += event["size"]
            if total > best:
                best, at_peak, peak_event = total, dict(alive), event
        elif event["action"] == "free_completed" and event["addr"] in alive:
            total -= alive.pop(event["addr"])["size"]

    def where(event):
        frames = [f for f in event.get("frames") or [] if f["filename"].endswith(".py")]
        inner = next((f for f in frames if "/torch/" not in f["filename"]), frames[0] if frames else None)
        return f"{'/'.join(inner['filename'].rsplit('/', 2)[-2:])}:{inner['line']} {inner['name']}" if inner else "?"

    blocks = sorted(((e["size"], where(e)) for e in at_peak.values()), reverse=True)
    return ([(best, f"in all, reached by a block from {where(peak_event)}")] if peak_event else []) + blocks


def run(mode: str, args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(mode, device, args.vocab, args.layers, args.hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(1)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device, generator=generator)

    def step():
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    first_loss = float(step())
    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = None
    if device.type == "cuda":
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if args.memory:  # the allocator's trace of this step, for the blocks alive at its peak
            torch.cuda.memory._record_memory_history(stacks="python", max_entries=1_000_000)
        step()
        sync()
        peak = (torch.cuda.max_memory_allocated() - base) / GiB
        if args.memory:
            trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
            torch.cuda.memory._record_memory_history(enabled=None)
            print(f"== {mode}: the {args.memory} largest blocks alive at the step's peak", file=sys.stderr)
            for size, where in alive_at_peak(trace)[:args.memory]:
                print(f"  {size / 2**20:9.1f} MiB  {where}", file=sys.stderr)
    if args.profile and device.type == "cuda":  # GPU time per kernel over one step, to stderr
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            sync()
        print(f"== {mode}: one step's GPU time per kernel", file=sys.stderr)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile), file=sys.stderr)
    return {"mode": mode, "ms": statistics.median(times), "peak_gib_above_weights_and_optimizer": peak,
            "first_loss": first_loss}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--slug", default=None)
    parser.add_argument("--profile", type=int, default=0, metavar="K",
                        help="also profile one step of each mode: its K costliest kernels (printed to stderr)")
    parser.add_argument("--memory", type=int, default=0, metavar="K",
                        help="and the K largest blocks alive at the measured step's peak, with where each was made")
    args = parser.parse_args(argv)
    if args.mode:  # a child: one mode, its result as the last line of output
        print(json.dumps(run(args.mode, args)))
        return
    results = []
    passthrough = [f"--{k}={getattr(args, k)}" for k in ("steps", "warmup", "vocab", "layers", "hidden", "batch", "seq",
                                                          "profile", "memory")]
    for mode in args.modes.split(","):
        proc = subprocess.run([sys.executable, __file__, "--mode", mode, *passthrough], capture_output=True, text=True)
        if (args.profile or args.memory) and "== " in proc.stderr:
            print(proc.stderr[proc.stderr.index("== "):], flush=True)
        if proc.returncode == 0:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            results.append({"mode": mode, "note": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]})
        print(results[-1], flush=True)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    slug = args.slug or ("h100" if "H100" in name else "h200" if "H200" in name else "cpu")
    from importlib.metadata import version

    header = {"device": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "torch": torch.__version__, "transformers": version("transformers"),
              "model": f"Llama, {args.layers} layers x hidden {args.hidden}, vocab {args.vocab}, bf16",
              "batch": f"{args.batch} x {args.seq} tokens"}
    try:
        header["liger_kernel"] = version("liger-kernel")
    except Exception:
        header["liger_kernel"] = None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{slug}-training-step.json").write_text(json.dumps({"header": header, "rows": results}, indent=1))
    lines = [f"# One training step: {header['model']}, {header['batch']}, AdamW", "",
             f"{name}, {header['date']}, torch {header['torch']}, transformers {header['transformers']}, "
             f"liger-kernel {header['liger_kernel']}. `python benchmarks/bench_training_step.py`", "",
             "| loss | step ms (median) | peak GiB above weights + optimizer | first loss | note |", "|---|---:|---:|---:|---|"]
    for r in results:
        peak = r.get("peak_gib_above_weights_and_optimizer")
        lines.append(f"| {r['mode']} | {r.get('ms', float('nan')):.1f} | {'–' if peak is None else f'{peak:.2f}'} | "
                     f"{r.get('first_loss', float('nan')):.6f} | {r.get('note', '')} |")
    (args.out / f"{slug}-training-step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
