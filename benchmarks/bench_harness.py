"""The benchmark suite's harness (benchmarks/bench_cross_entropy.py): shapes, inputs and the float64 reference,
timing with the L2 flushed, peak memory, the copy bandwidth."""
from __future__ import annotations

import gc
import math
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"
IGNORE_INDEX = -100
PAD_FRACTION = 0.2

# (B, T, V): Llama-2 (32000), Llama-3 (128256), Qwen2 (151936), Gemma (256000) vocabularies.
GPU_STANDARD_SHAPES = [(4, 2048, 32000), (4, 2048, 128256), (2, 4096, 151936), (2, 4096, 256000)]
# Time vs V at N = B*T = 8192 rows (the standard shapes already give four of the five points).
GPU_SWEEP_V = [32000, 65536, 128256, 151936, 256000]
GPU_SWEEP_V_ROWS = 8192
# Time vs N at V = 128256 and 256000: a single row of N tokens below 8192, the standard shape at 8192.
GPU_SWEEP_N = [256, 512, 1024, 2048, 8192]
GPU_SWEEP_N_VOCABS = [128256, 256000]
# CPU: small, V = 1000 aligned and 5003 (odd, prime), two N for V = 5003 and two V for N = 128 so both plots exist.
CPU_SHAPES = [(2, 64, 1000), (2, 64, 5003), (2, 128, 5003)]

MODES = ("fwd+bwd", "fwd+bwd-inplace", "fwd")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
GiB = 1 << 30


# ----------------------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Shape:
    batch: int
    seq_len: int
    vocab: int
    sets: list[str] = field(default_factory=list)  # "standard", "sweep-v", "sweep-n"

    @property
    def rows(self) -> int:
        return self.batch * self.seq_len

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.batch, self.seq_len, self.vocab)

    def label(self) -> str:
        return f"{self.batch}x{self.seq_len}x{self.vocab}"


def _rows_to_bt(rows: int) -> tuple[int, int]:
    # Sweep points below 8192 rows are one sequence; 8192 is the standard 4x2048 (or 2x4096 when that one exists).
    return (1, rows) if rows < 8192 else (rows // 2048, 2048)


def default_shapes(device: torch.device, quick: bool) -> list[Shape]:
    if device.type != "cuda":
        return [Shape(*s, sets=["standard"]) for s in CPU_SHAPES]
    shapes: dict[tuple[int, int, int], Shape] = {}

    def add(key, tag):
        shapes.setdefault(key, Shape(*key)).sets.append(tag)

    for key in GPU_STANDARD_SHAPES:
        add(key, "standard")
    if quick:
        return list(shapes.values())
    for vocab in GPU_SWEEP_V:
        existing = [s for s in shapes.values() if s.rows == GPU_SWEEP_V_ROWS and s.vocab == vocab]
        add(existing[0].key if existing else (*_rows_to_bt(GPU_SWEEP_V_ROWS), vocab), "sweep-v")
    for vocab in GPU_SWEEP_N_VOCABS:
        for rows in GPU_SWEEP_N:
            existing = [s for s in shapes.values() if s.rows == rows and s.vocab == vocab]
            add(existing[0].key if existing else (*_rows_to_bt(rows), vocab), "sweep-n")
    return list(shapes.values())


def parse_shapes(text: str) -> list[Shape]:
    shapes = []
    for item in text.replace(";", ",").split(","):
        item = item.strip().lower()
        if not item:
            continue
        match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", item)
        if not match:
            raise SystemExit(f"--shapes: expected BxTxV items separated by commas (e.g. 4x2048x32000), got {item!r}")
        shapes.append(Shape(*(int(g) for g in match.groups()), sets=["standard"]))
    return shapes


# ----------------------------------------------------------------------------------------------------------------
# Device helpers: synchronisation, timing, L2 flush, memory, copy bandwidth
# ----------------------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class L2Flush:
    """Overwrites a buffer larger than the L2 cache before every timed rep (as triton.testing.do_bench does)."""

    def __init__(self, device: torch.device):
        self.buffer = torch.empty(256 << 20, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()


def time_reps(step: Callable[[], None], prepare: Callable[[], None], reps: int, device: torch.device,
              flush: L2Flush) -> list[float]:
    """Milliseconds of ``step`` alone, once per rep; ``prepare`` and the L2 flush run before each rep, untimed."""
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends):
            prepare()
            flush()
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]
    times = []
    for _ in range(reps):
        prepare()
        begin = time.perf_counter()
        step()
        times.append((time.perf_counter() - begin) * 1e3)
    return times


def peak_extra_bytes(step: Callable[[], None], prepare: Callable[[], None], device: torch.device) -> int | None:
    """Peak memory allocated by one ``step`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    prepare()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure_copy_bandwidth(device: torch.device, quick: bool = False) -> tuple[float, int]:
    """(GB/s, bytes copied per rep): bytes read + written by a large copy over its median time."""
    nbytes = 2 * GiB if device.type == "cuda" else (64 << 20 if quick else 256 << 20)
    reps = 10 if quick else 20
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    # No L2 flush: 2 GiB is forty times the L2 cache of the largest GPUs.
    times = time_reps(lambda: dst.copy_(src), lambda: None, reps, device, lambda: None)
    src = dst = None  # noqa: F841 - free the buffers before the suite starts
    free_memory(device)
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9, nbytes


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'NVIDIA GeForce RTX 4090' -> 'rtx-4090'; any CPU -> 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    words = [w for w in re.split(r"[^a-z0-9]+", device_name(device).lower())
             if w and w not in ("nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct")]
    if not words:
        return "gpu"
    if words[0] in ("rtx", "gtx") and len(words) > 1:
        return f"{words[0]}-{words[1]}"
    return words[0]


# ----------------------------------------------------------------------------------------------------------------
# Inputs and the float64 reference
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    leaf: torch.Tensor  # [B, T, V] leaf requiring grad
    pristine: torch.Tensor  # its values, never modified (the leaf itself, detached, unless --leaf-grad)
    labels: torch.Tensor  # [B, T] int64, IGNORE_INDEX at the right end of each row
    num_items: torch.Tensor  # 0-dim int64 on the device: the count of shifted targets that are not ignored


class _GradSink(torch.autograd.Function):
    """Stands in for the LM head: gives the loss a fresh copy of the logits and takes their gradient.

    backward stores the gradient in ``box`` and passes nothing on, as lm_head's matmul would consume it; so an
    in-place gradient stays in the logits' storage, as in training.
    """

    @staticmethod
    def forward(ctx, source, box):
        ctx.box = box
        return source.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.box["grad"] = grad
        return None, None


class Feed:
    """The logits one rep works on, and the gradient it produced. ``prepare`` runs before each rep, untimed."""

    def __init__(self, inputs: Inputs, inplace: bool, leaf_grad: bool):
        self.inputs, self.inplace, self.leaf_grad = inputs, inplace, leaf_grad
        self.box: dict = {}
        self.logits = inputs.leaf

    def prepare(self) -> None:
        self.reset()
        if not self.leaf_grad:
            self.logits = _GradSink.apply(self.inputs.leaf, self.box)

    def reset(self, restore: bool = False) -> None:
        """Drop the last gradient and logits copy; with --leaf-grad, restore the leaf if it may have been written."""
        self.box.clear()
        self.inputs.leaf.grad = None
        self.logits = self.inputs.leaf
        if self.leaf_grad and (self.inplace or restore):
            with torch.no_grad():
                self.inputs.leaf.copy_(self.inputs.pristine)

    def grad(self) -> torch.Tensor | None:
        return self.inputs.leaf.grad if self.leaf_grad else self.box.get("grad")


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int, leaf_grad: bool) -> Inputs:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    logits = torch.randn(shape.batch, shape.seq_len, shape.vocab, dtype=dtype, device=device, generator=gen)
    logits.mul_(2.0)  # a spread like a trained LM head's, and never zeros
    labels = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len), device=device, generator=gen)
    # Padding fraction per row uniform in [0.1, 0.3], re-centred so that the batch averages PAD_FRACTION exactly.
    cpu_gen = torch.Generator().manual_seed(seed)
    fractions = 0.1 + 0.2 * torch.rand(shape.batch, generator=cpu_gen, dtype=torch.float64)
    fractions = (fractions + PAD_FRACTION - fractions.mean()).clamp(0.0, 0.9)
    lengths = (shape.seq_len * (1.0 - fractions)).round().long().clamp(min=1).to(device)
    positions = torch.arange(shape.seq_len, device=device)
    labels.masked_fill_(positions[None, :] >= lengths[:, None], IGNORE_INDEX)
    num_items = (labels[:, 1:] != IGNORE_INDEX).sum()
    pristine = logits.clone() if leaf_grad else logits
    return Inputs(logits.requires_grad_(True), pristine.detach(), labels, num_items)


def _chunk_rows(vocab: int, chunk_bytes: int, elem: int) -> int:
    return max(1, chunk_bytes // (vocab * elem))


def compute_reference(inputs: Inputs, reference_fn, device: torch.device) -> tuple[float, torch.Tensor]:
    """(loss, gradient as float32) of the float64 reference, computed in row chunks.

    The shifted targets are passed explicitly (``shift_labels``), so any slice of rows is a valid call; with
    ``num_items_in_batch`` fixed, the loss is the sum of the chunks' losses and the gradient their concatenation.
    The gradient is kept on the device when it takes less than a quarter of the free memory, else on the host.
    """
    logits = inputs.pristine
    batch, seq_len, vocab = logits.shape
    rows = batch * seq_len
    shift_labels = torch.full_like(inputs.labels, IGNORE_INDEX)
    shift_labels[:, :-1] = inputs.labels[:, 1:]
    flat_logits, flat_targets = logits.reshape(rows, vocab), shift_labels.reshape(rows)
    store = device
    if device.type == "cuda" and rows * vocab * 4 > 0.25 * torch.cuda.mem_get_info(device)[0]:
        store = torch.device("cpu")
    ref_grad = torch.empty(rows, vocab, dtype=torch.float32, device=store)
    total = torch.zeros((), dtype=torch.float64, device=device)
    step = _chunk_rows(vocab, 512 << 20, 8)
    for start in range(0, rows, step):
        end = min(rows, start + step)
        x = flat_logits[start:end].double().unsqueeze(0).requires_grad_(True)
        targets = flat_targets[start:end].unsqueeze(0)
        loss = reference_fn(x, targets, num_items_in_batch=inputs.num_items, ignore_index=IGNORE_INDEX,
                            shift_labels=targets)
        loss.backward()
        total += loss.detach()
        ref_grad[start:end].copy_(x.grad[0])
        del x, loss
    return float(total), ref_grad.view(batch, seq_len, vocab)


def grad_errors(grad: torch.Tensor, ref_grad: torch.Tensor) -> tuple[float, float]:
    """(max |grad - ref|, ||grad - ref||_2 / ||ref||_2), computed in row chunks to bound the temporaries."""
    vocab = grad.shape[-1]
    grad, ref_grad = grad.detach().reshape(-1, vocab), ref_grad.reshape(-1, vocab)
    max_abs = torch.zeros((), dtype=torch.float32, device=grad.device)
    sq_diff = torch.zeros((), dtype=torch.float64, device=grad.device)
    sq_ref = torch.zeros((), dtype=torch.float64, device=grad.device)
    step = _chunk_rows(vocab, 256 << 20, 4)
    for start in range(0, grad.shape[0], step):
        ref = ref_grad[start:start + step].to(grad.device, non_blocking=True)
        diff = grad[start:start + step].float() - ref
        max_abs = torch.maximum(max_abs, diff.abs().max())
        sq_diff += diff.double().square().sum()
        sq_ref += ref.double().square().sum()
        del ref, diff
    return float(max_abs), math.sqrt(float(sq_diff) / max(float(sq_ref), 1e-300))
