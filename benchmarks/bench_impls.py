"""The benchmark suite's implementations (fastce per backend, transformers, F.cross_entropy, torch.compile, Liger,
QuACK) and one measurement of one of them (benchmarks/bench_cross_entropy.py)."""
from __future__ import annotations

import inspect
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from bench_harness import IGNORE_INDEX, Feed, L2Flush, grad_errors, peak_extra_bytes, synchronize, time_reps


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
