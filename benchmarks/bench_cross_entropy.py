"""Benchmark suite: fastce's shifted cross-entropy against the losses people use today.

One command runs everything that is installed, on whatever device is there::

    python benchmarks/bench_cross_entropy.py            # full suite (GPU: standard shapes + sweeps for the plots)
    python benchmarks/bench_cross_entropy.py --quick    # standard shapes only, fewer reps, no sweeps

What is measured, per (implementation, mode, shape), from unshifted ``[B, T, V]`` logits requiring grad (bf16 on a
GPU, float32 on the CPU; random normal x 2), ~20% padding (labels = -100 at the right end of rows of random lengths)
and ``num_items_in_batch`` passed as a device tensor, as transformers' Trainer does:

* ``fwd+bwd``: loss + ``backward()``; ``fwd+bwd-inplace``: the same with ``inplace_backward=True``; ``fwd``: loss
  under ``torch.no_grad()``. Before every rep, outside the timed region, the logits are made afresh from a pristine
  leaf by ``_GradSink``, which stands in for the LM head: its backward receives the gradient and keeps it (for the
  error check, and so that it counts in the peak memory) as the head's matmul would consume it. A plain leaf would
  misreport the in-place mode: ``AccumulateGrad`` copies a gradient that aliases the leaf before storing it in
  ``.grad``. ``--leaf-grad`` measures that way instead (the logits restored by ``copy_`` before each rep).
* median time over reps, each rep timed alone with CUDA events, L2 flushed before it (like ``triton.testing.do_bench``);
* effective bandwidth: ``B*T*V*elem_size`` bytes (fwd) or twice that (fwd+bwd: read the logits, write the gradient)
  over the median time, and its fraction of the device's measured copy bandwidth;
* peak extra memory: ``max_memory_allocated`` during one call minus what was allocated before it (logits and
  labels already there, the gradient counted as extra);
* errors against the float64 reference ``fastce.reference.causal_lm_loss_reference``, computed once per shape in
  row chunks: relative error of the loss, max-abs and relative-L2 error of the gradient.

Implementations: fastce for each backend of ``fastce.available_backends()`` (default and in-place), transformers'
eager ``ForCausalLMLoss``, ``F.cross_entropy`` on the shifted float32 copy (the obvious user code), ``torch.compile``
of ``ForCausalLMLoss`` (GPU only unless named in ``--impls``), and Liger / QuACK when importable (they need the
shifted contiguous copy, which is included in their time).

Outputs (at most 6 files, all in ``--out``, named after the device): ``<slug>.json``, ``<slug>.csv``, ``<slug>.md``,
``<slug>-time-vs-v.png``, ``<slug>-time-vs-n.png``, ``<slug>-memory.png``. JSON and CSV are rewritten after every shape,
so a run that is cut short still leaves its results.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import inspect
import json
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NoReturn

import torch
import torch.nn.functional as F

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


# ----------------------------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------------------------
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Impl:
    name: str
    mode: str
    make: Callable[[], LossFn]  # called once per shape (torch.compile recompiles per shape: static shapes)
    inplace: bool = False  # the gradient overwrites the logits (restore them before each rep)


def _fastce_loss(fastce, backend: str, inplace: bool, validate: bool) -> LossFn:
    def loss_fn(logits, labels, num_items):
        return fastce.causal_lm_loss(logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=num_items,
                                     backend=backend, inplace_backward=inplace, validate=validate)
    return loss_fn


def _torch_f32_loss(logits, labels, num_items):
    # The obvious user code: shift, upcast, mean over the targets that are not ignored (== sum / num_items here).
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def _shifted_copy(logits, labels):
    # A real copy, even when the slice is already contiguous (B == 1): Liger writes its gradient into its input.
    vocab = logits.shape[-1]
    shifted = logits[:, :-1].clone(memory_format=torch.contiguous_format).view(-1, vocab)
    return shifted, labels[:, 1:].reshape(-1)


def _liger_loss() -> LossFn:
    from liger_kernel.transformers import LigerCrossEntropyLoss

    module = LigerCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")

    def loss_fn(logits, labels, num_items):
        shifted, targets = _shifted_copy(logits, labels)
        return module(shifted, targets) / num_items
    return loss_fn


def _quack_loss() -> LossFn:
    from quack.cross_entropy import cross_entropy

    params = inspect.signature(cross_entropy).parameters
    if "ignore_index" not in params:
        raise RuntimeError("this quack version has no ignore_index")
    kwargs = {"ignore_index": IGNORE_INDEX}
    if "reduction" in params:
        kwargs["reduction"] = "none"

    def loss_fn(logits, labels, num_items):
        shifted, targets = _shifted_copy(logits, labels)
        return cross_entropy(shifted, targets, **kwargs).sum() / num_items
    return loss_fn


def build_impls(fastce, device: torch.device, impl_filter: list[str] | None, mode_filter: list[str] | None,
                validate: bool) -> tuple[list[Impl], dict[str, str]]:
    """The implementations to run, in run order, and {name: reason} for those that cannot run here."""
    skipped: dict[str, str] = {}
    impls: list[Impl] = []
    on_gpu = device.type == "cuda"

    def wanted(name: str, explicit_only: bool = False) -> bool:
        if impl_filter is None:
            return not explicit_only
        return any(name == token or (not explicit_only and name.startswith(token + "-")) for token in impl_filter)

    backends = []
    if fastce is None:
        skipped["fastce"] = "fastce is not importable"
    for backend in fastce.backends.BACKENDS if fastce is not None else ():
        reason = fastce.unavailable_reason(backend)
        if not on_gpu and backend != "torch":  # its kernels want CUDA tensors (Triton's interpreter: too slow here)
            reason = "the suite runs it on a CUDA device only" + (f"; fastce: {reason}" if reason else "")
        if reason is None:
            backends.append(backend)
        elif wanted(f"fastce-{backend}"):
            skipped[f"fastce-{backend}"] = reason
    for backend in backends:
        name = f"fastce-{backend}"
        if wanted(name):
            impls.append(Impl(name, "fwd+bwd", lambda b=backend: _fastce_loss(fastce, b, False, validate)))
            impls.append(Impl(name, "fwd+bwd-inplace", lambda b=backend: _fastce_loss(fastce, b, True, validate),
                              inplace=True))

    for name, make, module in (("liger", _liger_loss, "liger_kernel"), ("quack", _quack_loss, "quack")):
        if not wanted(name):
            continue
        if not on_gpu:
            skipped[name] = "GPU only"
            continue
        try:
            __import__(module)
        except Exception as exc:  # not installed, or installed but broken here
            skipped[name] = f"not importable ({type(exc).__name__}: {exc})".splitlines()[0]
            continue
        impls.append(Impl(name, "fwd+bwd", make))

    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except Exception as exc:
        ForCausalLMLoss = None
        skipped["hf-eager"] = skipped["hf-compile"] = f"transformers not importable ({type(exc).__name__})"

    def hf_eager():
        return lambda logits, labels, num_items: ForCausalLMLoss(
            logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=num_items, ignore_index=IGNORE_INDEX)

    def hf_compile():
        torch._dynamo.reset()  # a fresh static-shape compile per shape, clear of the recompile limit
        compiled = torch.compile(ForCausalLMLoss, dynamic=False)
        return lambda logits, labels, num_items: compiled(
            logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=num_items, ignore_index=IGNORE_INDEX)

    if ForCausalLMLoss is not None and wanted("hf-eager"):
        impls.append(Impl("hf-eager", "fwd+bwd", hf_eager))
    if wanted("torch-f32"):
        impls.append(Impl("torch-f32", "fwd+bwd", lambda: _torch_f32_loss))
    if ForCausalLMLoss is not None and wanted("hf-compile", explicit_only=not on_gpu):
        impls.append(Impl("hf-compile", "fwd+bwd", hf_compile))
    elif ForCausalLMLoss is not None and not on_gpu and impl_filter is None:
        skipped["hf-compile"] = "skipped on the CPU unless named in --impls"

    for backend in backends:
        name = f"fastce-{backend}"
        if wanted(name):
            impls.append(Impl(name, "fwd", lambda b=backend: _fastce_loss(fastce, b, False, validate)))
    if ForCausalLMLoss is not None and wanted("hf-eager"):
        impls.append(Impl("hf-eager", "fwd", hf_eager))
    if wanted("torch-f32"):
        impls.append(Impl("torch-f32", "fwd", lambda: _torch_f32_loss))

    if mode_filter is not None:
        impls = [impl for impl in impls if impl.mode in mode_filter]
    return impls, skipped


# ----------------------------------------------------------------------------------------------------------------
# One measurement
# ----------------------------------------------------------------------------------------------------------------
def measure(impl: Impl, loss_fn: LossFn, feed: Feed, reference: tuple[float, torch.Tensor] | None,
            device: torch.device, reps: int, warmup: int, flush: L2Flush) -> dict:
    """Correctness call, warm-up, one memory call, then ``reps`` timed calls. Returns the measured fields."""
    labels, num_items = feed.inputs.labels, feed.inputs.num_items
    backward = impl.mode != "fwd"
    row: dict = {}

    if backward:
        def step():
            loss_fn(feed.logits, labels, num_items).backward()
    else:
        def step():
            with torch.no_grad():
                loss_fn(feed.logits, labels, num_items)

    # 1. Correctness (also the first warm-up: compilation and autotuning happen here).
    feed.prepare()
    with torch.set_grad_enabled(backward):
        loss = loss_fn(feed.logits, labels, num_items)
    if backward:
        loss.backward()
    row["loss"] = float(loss.detach().double())
    del loss
    grad = feed.grad() if backward else None
    if backward and grad is None:
        raise RuntimeError("backward produced no gradient for the logits")
    if reference is not None:
        ref_loss, ref_grad = reference
        row["loss_rel_err"] = abs(row["loss"] - ref_loss) / max(abs(ref_loss), 1e-300)
        if backward:
            row["grad_max_abs_err"], row["grad_rel_err"] = grad_errors(grad, ref_grad)
    if impl.inplace:
        # False: the gradient was written elsewhere, or copied out of the logits' storage on its way.
        row["grad_aliases_logits"] = grad.untyped_storage().data_ptr() == feed.logits.untyped_storage().data_ptr()
    else:
        row["logits_intact"] = bool(torch.equal(feed.logits.detach(), feed.inputs.pristine))
        if not row["logits_intact"]:
            feed.reset(restore=True)
    del grad

    # 2. Warm-up, 3. peak memory of one call, 4. timed reps.
    for _ in range(warmup):
        feed.prepare()
        step()
    row["peak_extra_bytes"] = peak_extra_bytes(step, feed.prepare, device)
    times = time_reps(step, feed.prepare, reps, device, flush)
    feed.reset()  # no gradient left over, and the leaf pristine, for the next implementation
    synchronize(device)
    row.update(median_ms=statistics.median(times), min_ms=min(times),
               p90_ms=sorted(times)[min(len(times) - 1, int(0.9 * len(times)))], reps=len(times))
    return row


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------
CSV_FIELDS = ["impl", "mode", "batch", "seq_len", "vocab", "rows", "dtype", "sets", "status", "median_ms", "min_ms",
              "p90_ms", "reps", "bytes", "gbps", "frac_of_copy", "peak_extra_bytes", "peak_extra_gib", "loss",
              "ref_loss", "loss_rel_err", "grad_max_abs_err", "grad_rel_err", "grad_aliases_logits", "logits_intact"]


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_csv(out: Path, slug: str, header: dict, rows: list[dict]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"{slug}.json", out / f"{slug}.csv"
    payload = {"header": header, "rows": [{k: _clean(v) for k, v in row.items()} for row in rows]}
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    with csv_path.open("w", newline="") as handle:
        for key, value in header.items():
            handle.write(f"# {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}\n")
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if _clean(row.get(k)) is None else row.get(k)) for k in CSV_FIELDS})
    return [json_path, csv_path]


def _fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _time_cell(row: dict) -> str:
    return _fmt(row.get("median_ms"), ".3f") if row["status"] == "ok" else row["status"].split(":")[0]


def write_markdown(out: Path, slug: str, header: dict, rows: list[dict]) -> Path:
    lines = [f"# fastce benchmark: {header['device']}", ""]
    versions = " · ".join(f"{name} {header.get(name + '_version')}" for name in
                          ("torch", "triton", "transformers", "fastce", "liger", "quack")
                          if header.get(name + "_version"))
    lines += [f"{versions} · CUDA {header.get('cuda_version')} · {header['date']}", "",
              f"Copy bandwidth ({header['copy_bytes'] / GiB:.2g} GiB copy, read + write): "
              f"**{header['copy_gbps']:.0f} GB/s**. Logits {header['dtype']}, {PAD_FRACTION:.0%} padding, "
              f"num_items_in_batch a device tensor; fastce validate={header['validate']}.", "",
              f"Time: {header['timing']}. GB/s: B·T·V·elem bytes for fwd, "
              "twice that for fwd+bwd (read logits, write gradient). Peak: memory allocated above the logits and "
              "labels during one call, the gradient included. Errors: against the float64 reference; grad err is "
              "the relative L2 norm.", ""]
    shape_keys: list[tuple] = []
    for row in rows:
        key = (row["batch"], row["seq_len"], row["vocab"])
        if key not in shape_keys:
            shape_keys.append(key)
    for key in shape_keys:
        shape_rows = [r for r in rows if (r["batch"], r["seq_len"], r["vocab"]) == key]
        if "standard" not in shape_rows[0]["sets"]:
            continue
        lines += [f"## B={key[0]}, T={key[1]}, V={key[2]} ({shape_rows[0]['dtype']})", "",
                  "| impl | mode | time (ms) | GB/s | % of copy | peak extra (GiB) | loss rel. err | grad rel. err |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in shape_rows:
            lines.append(f"| {r['impl']} | {r['mode']} | {_time_cell(r)} | {_fmt(r.get('gbps'), '.0f')} | "
                         f"{_fmt(None if r.get('frac_of_copy') is None else 100 * r['frac_of_copy'], '.0f')} | "
                         f"{_fmt(r.get('peak_extra_gib'), '.2f')} | {_fmt(r.get('loss_rel_err'), '.1e')} | "
                         f"{_fmt(r.get('grad_rel_err'), '.1e')} |")
        lines.append("")
    if len(shape_keys) > 1:
        labels = ["×".join(str(x) for x in key) for key in shape_keys]
        lines += ["## Median time (ms) on every shape (B×T×V)", "",
                  "| impl | mode | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
        for name, mode in dict.fromkeys((r["impl"], r["mode"]) for r in rows):
            cells = []
            for key in shape_keys:
                match = [r for r in rows if (r["impl"], r["mode"]) == (name, mode)
                         and (r["batch"], r["seq_len"], r["vocab"]) == key]
                cells.append(_time_cell(match[0]) if match else "")
            lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    if header.get("skipped_impls"):
        lines += ["Not run: " + "; ".join(f"{k} ({v})" for k, v in header["skipped_impls"].items()) + ".", ""]
    path = out / f"{slug}.md"
    path.write_text("\n".join(lines))
    return path


def write_plots(out: Path, slug: str, header: dict, rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["mode"] != "fwd"]
    series = list(dict.fromkeys((r["impl"], r["mode"]) for r in ok))
    copy_bps = header["copy_gbps"] * 1e9
    paths = []

    def floor_ms(rows_, vocab, elem):  # the bytes floor at the measured copy bandwidth
        return 2 * rows_ * vocab * elem / copy_bps * 1e3

    def draw(ax, points_of, x_of, floor_of, xs):
        for name, mode in series:
            points = sorted((x_of(r), r["median_ms"]) for r in points_of(name, mode))
            if len(points) >= 2:
                ax.plot(*zip(*points), marker="o", label=f"{name} ({mode})" if mode != "fwd+bwd" else name)
        ax.plot(xs, [floor_of(x) for x in xs], "k--", linewidth=1, label="copy-bandwidth floor")
        ax.set_yscale("log")
        ax.set_ylabel("fwd+bwd time (ms)")
        ax.grid(True, which="both", alpha=0.3)

    elem = {"bfloat16": 2, "float16": 2, "float32": 4}.get(header["dtype"], 2)
    by_rows: dict[int, set] = {}
    for r in ok:
        by_rows.setdefault(r["rows"], set()).add(r["vocab"])
    if by_rows and max(len(v) for v in by_rows.values()) >= 2:
        n_rows = max(by_rows, key=lambda n: (len(by_rows[n]), n))
        vocabs = sorted(by_rows[n_rows])
        fig, ax = plt.subplots(figsize=(8, 5))
        draw(ax, lambda name, mode: [r for r in ok if (r["impl"], r["mode"]) == (name, mode) and r["rows"] == n_rows],
             lambda r: r["vocab"], lambda v: floor_ms(n_rows, v, elem), vocabs)
        ax.set_xlabel("vocabulary size V")
        ax.set_title(f"{header['device']}: time vs V, N = B·T = {n_rows} rows, {header['dtype']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / f"{slug}-time-vs-v.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    by_vocab: dict[int, set] = {}
    for r in ok:
        by_vocab.setdefault(r["vocab"], set()).add(r["rows"])
    vocabs = sorted((v for v in by_vocab if len(by_vocab[v]) >= 2), key=lambda v: (-len(by_vocab[v]), -v))[:2]
    if vocabs:
        fig, axes = plt.subplots(1, len(vocabs), figsize=(7 * len(vocabs), 5), squeeze=False)
        for ax, vocab in zip(axes[0], sorted(vocabs)):
            ns = sorted(by_vocab[vocab])
            draw(ax, lambda name, mode: [r for r in ok if (r["impl"], r["mode"]) == (name, mode)
                                         and r["vocab"] == vocab],
                 lambda r: r["rows"], lambda n: floor_ms(n, vocab, elem), ns)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("rows N = B·T")
            ax.set_title(f"time vs N, V = {vocab}")
            ax.legend(fontsize=7)
        fig.suptitle(f"{header['device']} ({header['dtype']})")
        fig.tight_layout()
        paths.append(out / f"{slug}-time-vs-n.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    mem = [r for r in rows if "standard" in r["sets"] and r["mode"] != "fwd"]
    if any(r.get("peak_extra_gib") is not None for r in mem):
        keys = list(dict.fromkeys((r["batch"], r["seq_len"], r["vocab"]) for r in mem))
        mem_series = list(dict.fromkeys((r["impl"], r["mode"]) for r in mem))
        width = 0.8 / len(mem_series)
        fig, ax = plt.subplots(figsize=(max(8, 2.5 * len(keys)), 5))
        for i, (name, mode) in enumerate(mem_series):
            xs, ys = [], []
            for j, key in enumerate(keys):
                match = [r for r in mem if (r["impl"], r["mode"]) == (name, mode)
                         and (r["batch"], r["seq_len"], r["vocab"]) == key]
                if not match:
                    continue
                x = j + (i - (len(mem_series) - 1) / 2) * width
                if match[0].get("peak_extra_gib") is not None:
                    xs.append(x)
                    ys.append(match[0]["peak_extra_gib"])
                elif not match[0]["status"].startswith("skipped"):  # OOM or error: say so where the bar would be
                    ax.text(x, 0, match[0]["status"].split(":")[0], rotation=90, ha="center", va="bottom", fontsize=6)
            bars = ax.bar(xs, ys, width=width, label=f"{name} ({mode})" if mode != "fwd+bwd" else name)
            ax.bar_label(bars, fmt="%.1f", fontsize=6)
        ax.set_xticks(range(len(keys)), ["×".join(str(x) for x in key) for key in keys])
        ax.set_ylabel("peak extra memory, fwd+bwd (GiB)")
        ax.set_title(f"{header['device']}: memory above logits + labels ({header['dtype']})")
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        paths.append(out / f"{slug}-memory.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def _import_fastce():
    try:
        import fastce
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))  # run from a checkout that is not installed
        try:
            import fastce
        except ImportError:
            return None
    return fastce


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except Exception:
        return None
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version
            version = dist_version(module_name.replace("_", "-"))
        except Exception:
            version = "unknown"
    return str(version)


IMPL_NAMES = ("fastce-triton", "fastce-cuda", "fastce-torch", "hf-eager", "hf-compile", "torch-f32", "liger", "quack")


def usage_error(message: str) -> NoReturn:
    """A mistake on the command line or a request this machine cannot serve: one line on stderr, exit code 2."""
    print(f"{Path(__file__).name}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def resolve_device(text: str) -> torch.device:
    """``--device`` as a torch device; a usage error if it is not one, or names a CUDA device that is not here."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        usage_error(f"--device {text}: not a device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device here"
            usage_error(f"--device {text}: {why} (torch {torch.__version__}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            usage_error(f"--device {text}: there are only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        usage_error(f"--device {text}: the suite runs on cpu or cuda")
    return device


def nothing_to_run(device: torch.device, impl_filter: list[str] | None, mode_filter: list[str] | None,
                   skipped: dict[str, str]) -> str:
    """Why ``build_impls`` found nothing to measure: what was asked for, and why each part of it cannot run."""
    asked = f"--impls {','.join(impl_filter)}" if impl_filter else "the default implementations"
    if mode_filter:
        asked += f" in --modes {','.join(mode_filter)}"
    reasons = [f"{name}: {reason}" for name, reason in skipped.items()]
    if not reasons:
        reasons.append("none of them has a mode in --modes" if mode_filter else "nothing matched")
    return f"nothing to measure on {device} for {asked}. " + "; ".join(reasons)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="standard shapes only, fewer reps, no sweeps")
    parser.add_argument("--sweep-impls", default="fastce,hf-eager",
                        help="comma-separated name prefixes of the implementations also run on the sweep shapes")
    parser.add_argument("--shapes", help="comma-separated BxTxV list (replaces the default shapes and sweeps)")
    parser.add_argument("--impls", help="comma-separated names or prefixes: fastce, fastce-triton, fastce-cuda, "
                                        "fastce-torch, hf-eager, hf-compile, torch-f32, liger, quack")
    parser.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="logits dtype (default bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default benchmarks/results)")
    parser.add_argument("--slug", help="file-name prefix (default from the device name, e.g. h100)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 reference and error columns")
    parser.add_argument("--no-validate", action="store_true", help="call fastce with validate=False (no host sync)")
    parser.add_argument("--leaf-grad", action="store_true",
                        help="pass the leaf itself and read .grad (AccumulateGrad then copies an in-place gradient)")
    parser.add_argument("--reps", type=int, help="timed reps per measurement (default 20 GPU, 5 CPU; --quick 8/2)")
    parser.add_argument("--warmup", type=int, help="untimed calls after the correctness call (default 3; --quick 1)")
    parser.add_argument("--max-minutes", type=float, help="skip what is left after this long (default 7 on GPU, "
                                                          "0 = no limit); results so far are always written")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Run the suite; returns the path of the JSON results."""
    args = parse_args(argv)
    started = time.perf_counter()
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    reps = args.reps or ((8 if args.quick else 20) if on_gpu else (2 if args.quick else 5))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    max_minutes = args.max_minutes if args.max_minutes is not None else (7.0 if on_gpu else 0.0)
    shapes = parse_shapes(args.shapes) if args.shapes else default_shapes(device, args.quick)
    split = lambda text: [t.strip() for t in text.split(",") if t.strip()] if text else None  # noqa: E731
    mode_filter = split(args.modes)
    if mode_filter and set(mode_filter) - set(MODES):
        usage_error(f"--modes: unknown {sorted(set(mode_filter) - set(MODES))}; choose from {MODES}")
    unknown = [token for token in split(args.impls) or []
               if not any(name == token or name.startswith(token + "-") for name in IMPL_NAMES)]
    if unknown:
        usage_error(f"--impls: unknown {unknown}; use names or prefixes of {', '.join(IMPL_NAMES)}")

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    fastce = _import_fastce()
    reference_fn = None
    if fastce is not None and not args.no_check:
        from fastce.reference import causal_lm_loss_reference as reference_fn
    impls, skipped = build_impls(fastce, device, split(args.impls), mode_filter, validate=not args.no_validate)
    if not impls:
        usage_error(nothing_to_run(device, split(args.impls), mode_filter, skipped))
    slug = args.slug or device_slug(device)

    log(f"device {device_name(device)} ({device}), logits {dtype}, {len(shapes)} shapes, {reps} reps, "
        f"{len(impls)} measurements per shape")
    for name, reason in skipped.items():
        log(f"not run: {name}: {reason}")
    copy_gbps, copy_bytes = measure_copy_bandwidth(device, args.quick)
    log(f"copy bandwidth: {copy_gbps:.0f} GB/s ({copy_bytes / GiB:.2g} GiB device-to-device, read + write)")

    header = {
        "device": device_name(device), "device_slug": slug, "device_type": device.type,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if on_gpu else None,
        "total_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / GiB, 1) if on_gpu else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "python_version": platform.python_version(), "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda, "triton_version": _version("triton"),
        "transformers_version": _version("transformers"),
        "fastce_version": getattr(fastce, "__version__", None) if fastce else None,
        "fastce_path": str(Path(fastce.__file__).parent) if fastce else None,
        "liger_version": _version("liger_kernel") if "liger" not in skipped else None,
        "quack_version": _version("quack") if "quack" not in skipped else None,
        "fastce_backends": list(fastce.available_backends()) if fastce else [],
        "copy_gbps": copy_gbps, "copy_bytes": copy_bytes, "dtype": str(dtype).replace("torch.", ""),
        "reps": reps, "warmup": warmup, "validate": not args.no_validate, "pad_fraction": PAD_FRACTION,
        "gradient_to": "leaf .grad (--leaf-grad)" if args.leaf_grad else "_GradSink (stands in for lm_head)",
        "timing": "median of per-rep CUDA-event times, L2 flushed before each rep" if on_gpu else
                  "median of per-rep perf_counter times",
        "skipped_impls": skipped, "argv": list(argv) if argv is not None else sys.argv[1:],
    }
    flush = L2Flush(device)
    sweep_prefixes = [p for p in args.sweep_impls.split(",") if p]
    elem = torch.empty((), dtype=dtype).element_size()
    rows: list[dict] = []
    for shape_index, shape in enumerate(shapes):
        base = {"batch": shape.batch, "seq_len": shape.seq_len, "vocab": shape.vocab, "rows": shape.rows,
                "dtype": header["dtype"], "sets": ";".join(shape.sets)}
        inputs = reference = None
        over_budget = lambda: max_minutes and time.perf_counter() - started > 60 * max_minutes  # noqa: E731
        try:
            if not over_budget():
                inputs = make_inputs(shape, dtype, device, args.seed + shape_index, args.leaf_grad)
        except torch.cuda.OutOfMemoryError:
            log(f"shape {shape.label()}: OOM while making the inputs")
            free_memory(device)
        if inputs is not None and reference_fn is not None:
            try:
                reference = compute_reference(inputs, reference_fn, device)
                base["ref_loss"] = reference[0]
            except Exception as exc:  # the timings are still worth having without the error columns
                log(f"shape {shape.label()}: no float64 reference ({type(exc).__name__}: {exc})")
                free_memory(device)
        if inputs is not None:
            log(f"shape {shape.label()} ({', '.join(shape.sets)}): "
                f"{int(inputs.num_items)} targets of {shape.batch * (shape.seq_len - 1)}")
        for impl in impls:
            if "standard" not in shape.sets and not any(impl.name.startswith(p) for p in sweep_prefixes):
                continue  # the sweeps are for the plots of fastce (and eager, for scale)
            row = {"impl": impl.name, "mode": impl.mode, **base}
            if over_budget():
                row["status"] = f"skipped: time budget of {max_minutes:g} min"
            elif inputs is None:
                row["status"] = "OOM: inputs"
            else:
                feed = Feed(inputs, impl.inplace, args.leaf_grad)
                try:
                    row.update(measure(impl, impl.make(), feed, reference, device, reps, warmup, flush))
                    row["status"] = "ok"
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "OOM"
                except Exception as exc:  # one broken implementation must not end the suite
                    row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if row["status"] != "ok":
                    feed.reset(restore=True)
                    free_memory(device)
                del feed
            if row["status"] == "ok":
                nbytes = shape.rows * shape.vocab * elem * (1 if impl.mode == "fwd" else 2)
                row.update(bytes=nbytes, gbps=nbytes / (row["median_ms"] * 1e-3) / 1e9)
                row["frac_of_copy"] = row["gbps"] / copy_gbps
                if row.get("peak_extra_bytes") is not None:
                    row["peak_extra_gib"] = row["peak_extra_bytes"] / GiB
            rows.append(row)
            log(_progress_line(shape, row))
        del inputs, reference
        free_memory(device)
        write_json_csv(args.out, slug, header, rows)

    header["wall_s"] = round(time.perf_counter() - started, 1)
    paths = write_json_csv(args.out, slug, header, rows)
    paths.append(write_markdown(args.out, slug, header, rows))
    if not args.no_plots:
        try:
            paths += write_plots(args.out, slug, header, rows)
        except Exception as exc:  # a plotting problem must not lose the numbers
            log(f"plots failed: {type(exc).__name__}: {exc}")
    log(f"done in {header['wall_s']:.0f}s; wrote " + ", ".join(str(p) for p in paths))
    return paths[0]


def _progress_line(shape: Shape, row: dict) -> str:
    text = f"{shape.label():>16} {row['impl']:<14} {row['mode']:<16}"
    if row["status"] != "ok":
        return f"{text} {row['status']}"
    text += f" {row['median_ms']:9.3f} ms {row['gbps']:7.0f} GB/s {100 * row['frac_of_copy']:4.0f}% copy"
    if row.get("peak_extra_gib") is not None:
        text += f"  peak +{row['peak_extra_gib']:.2f} GiB"
    if row.get("loss_rel_err") is not None:
        text += f"  loss err {row['loss_rel_err']:.1e}"
    if row.get("grad_rel_err") is not None:
        text += f"  grad err {row['grad_rel_err']:.1e}"
    if row.get("grad_aliases_logits") is False:
        text += "  (grad copied out of the logits)"
    if row.get("logits_intact") is False:
        text += "  (LOGITS MODIFIED)"
    return text


if __name__ == "__main__":
    main()
