"""CUDA C++ backend: launchers for the kernels in ``csrc/``, which run as the ops ``torch.ops.fastce_cuda.*``.

Same contract as the other backends (see ``fastce/kernels/__init__.py``). The ops live in the compiled library
``fastce._C``, which ``setup.py`` builds when a CUDA toolchain is present at install time. Importing this module
loads and compiles nothing; ``load_extension()`` (called by the launchers and by ``unavailable_reason()``) imports
``fastce._C`` or, if it was not built but a GPU, nvcc and the ``csrc/`` sources are here, compiles it just in time
(once: torch caches the build).

Launch paths: on sm_90 and newer, the cluster path (one thread-block cluster per row, the row held in registers and
read once); elsewhere, or where a row needs more than 16 blocks, the row path (one block per row, two passes) or the
split path (few rows: each row's vocabulary over several blocks). ``shard_stats`` takes the forward-only launches of
the same paths; ``shard_grad`` is one elementwise pass (the split path's second kernel, given each row's statistics).
Plain cross-entropy runs kernels compiled without the options; a spec that is not plain, or row statistics, run
their options variants on the same paths. Launch tuning, read from the environment at every launch (defaults come
from the compute capability, the SM count and the L2 size): ``FASTCE_CUDA_CLUSTER=0`` turns the cluster path off,
``=2`` / ``=8`` forces its 16-byte vectors per thread; ``FASTCE_CUDA_FWD_PARTIALS=0`` runs forward-only rows of
several blocks in clusters rather than as partial statistics merged by a second kernel;
``FASTCE_CUDA_NUM_SPLITS=n`` cuts each row's vocabulary into about n blocks (1: one block per row; also the splits
of ``shard_grad``), and ``FASTCE_CUDA_ROW_BLOCKS_PER_SM=n`` sets the blocks per SM of the one-block-per-row path.
"""
from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path

import torch

from ..spec import PLAIN, LossSpec

_CSRC = Path(__file__).resolve().parents[2] / "csrc"  # present in a source checkout or an editable install

# What load_extension found: None before it ran, "" once the ops are loaded, else why they cannot be. A plain
# global rather than functools.lru_cache, which torch.compile warns about.
_load_error: str | None = None
_has_cuda: list = []  # torch.cuda.is_available(), asked once: backend="auto" asks at every call
# The eager path's two ops as overloads, bound once the library is loaded: they run at every training step, and
# torch.ops' attribute and overload lookups cost host time at each call.
_causal_lm_fwd = _causal_lm_loss = None


def load_extension() -> None:
    """Load the ``fastce_cuda`` ops and register their fake implementations, once.

    Raises ``RuntimeError`` saying why the ops cannot be loaded; the outcome is remembered, so a failed
    just-in-time build is not retried at every call.
    """
    global _load_error, _causal_lm_fwd, _causal_lm_loss
    if _load_error is None:
        try:
            _import_or_build()
            _register_fakes()
            _causal_lm_fwd, _causal_lm_loss = _bind("causal_lm_fwd"), _bind("causal_lm_loss")
            _load_error = ""
        except (ImportError, OSError, RuntimeError) as exc:
            _load_error = str(exc)
    if _load_error:
        raise RuntimeError(_load_error)


def _bind(name: str):
    """The op's default overload; an extension built from an older fastce lacks the newer ops: say so, not crash."""
    try:
        return getattr(torch.ops.fastce_cuda, name).default
    except AttributeError:
        raise RuntimeError(f"fastce._C was built from an older fastce (it has no fastce_cuda::{name}): reinstall "
                           "fastce to rebuild it") from None


def unavailable_reason() -> str | None:
    """None when the CUDA backend can run here; otherwise a sentence saying why not."""
    try:
        load_extension()
    except RuntimeError as exc:
        return str(exc)
    if not _has_cuda:
        _has_cuda.append(torch.cuda.is_available())
    if not _has_cuda[0]:
        return "no CUDA device (torch.cuda.is_available() is False): fastce._C is loaded, but its kernels need a GPU"
    return None


def cross_entropy_fwd(logits, targets, divisor, losses, grad, ignore_index: int, skip=None, spec: LossSpec = PLAIN,
                      row_stats=None) -> None:
    load_extension()
    if spec.plain and row_stats is None:  # the op's defaults: the plain kernels
        torch.ops.fastce_cuda.cross_entropy_fwd(logits, targets, divisor, losses, grad, ignore_index, skip)
        return
    torch.ops.fastce_cuda.cross_entropy_fwd(logits, targets, divisor, losses, grad, ignore_index, skip, spec.softcap,
                                            spec.label_smoothing, spec.z_loss, row_stats)


def causal_lm_fwd(logits, labels, shift: bool, ignore_index: int, count, count_value: float, count_targets: bool,
                  validate: bool, spec: LossSpec = PLAIN):
    """``(loss, row_stats, divisor, code, row)`` of the eager path's one-op forward without a gradient
    (``fastce_cuda::causal_lm_fwd``; see ``csrc/cross_entropy.h``). Not part of the backend contract: the CUDA
    backend's shortcut for small batches, as ``causal_lm_loss``."""
    load_extension()
    loss, _, row_stats, divisor, code, row = _causal_lm_fwd(
        logits, labels, shift, ignore_index, count, count_value, count_targets, validate, False, False, spec.stats,
        spec.softcap, spec.label_smoothing, spec.z_loss)
    return loss, row_stats, divisor, code, row


def causal_lm_loss(logits, labels, shift: bool, ignore_index: int, count, count_value: float, count_targets: bool,
                   validate: bool, inplace: bool, spec: LossSpec = PLAIN):
    """``causal_lm_fwd`` with the gradient (``fastce_cuda::causal_lm_loss``): the loss is differentiable through the
    op's C++ autograd node (``csrc/causal_lm_autograd.cpp``), which holds the gradient (in the logits with
    ``inplace``) and scales it in backward."""
    load_extension()
    return _causal_lm_loss(logits, labels, shift, ignore_index, count, count_value, count_targets, validate, inplace,
                           spec.stats, spec.softcap, spec.label_smoothing, spec.z_loss)


def shard_stats(logits, targets, vocab_start: int, ignore_index: int, stats, spec: LossSpec = PLAIN) -> None:
    load_extension()
    torch.ops.fastce_cuda.shard_stats(logits, targets, vocab_start, ignore_index, stats, spec.softcap,
                                      spec.label_smoothing, spec.z_loss, spec.stats)


# shard_grad's gradient must have the logits' dtype here (no mixed-dtype kernel variants): a caller that wants float32
# logits to give a bfloat16 gradient runs it in place and casts (fastce/linear.py).
SHARD_GRAD_CASTS = False


def shard_grad(logits, targets, vocab_start: int, vocab_size: int, ignore_index: int, row, grad,
               spec: LossSpec = PLAIN) -> None:
    load_extension()
    torch.ops.fastce_cuda.shard_grad(logits, targets, vocab_start, vocab_size, ignore_index, row, grad, spec.softcap,
                                     spec.label_smoothing, spec.z_loss)


def scale_grad_(grad, grad_output) -> None:
    load_extension()
    torch.ops.fastce_cuda.scale_grad_(grad, grad_output)


def _import_or_build() -> None:
    try:
        importlib.import_module("fastce._C")  # runs the library's TORCH_LIBRARY registrations
        return
    except ModuleNotFoundError:
        not_built = "fastce._C was not built (no CUDA toolchain at install time, or FASTCE_SKIP_CUDA_BUILD=1)"
    except ImportError as exc:
        raise RuntimeError(
            f"fastce._C is installed but cannot be loaded ({exc}); it was probably built against another torch: "
            "reinstall fastce"
        ) from exc
    reason = _just_in_time_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"{not_built}; {reason}")
    _build_just_in_time()


def _just_in_time_unavailable_reason() -> str | None:
    if os.environ.get("FASTCE_SKIP_CUDA_BUILD", "0") == "1":
        return "FASTCE_SKIP_CUDA_BUILD=1 also turns off building it just in time"
    if not torch.cuda.is_available():
        return "it is built just in time only where CUDA is available"
    if not (_CSRC / "cross_entropy.cu").is_file():
        return f"its sources ({_CSRC}) are not part of this install: reinstall fastce from source with nvcc present"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolchain was found to build it just in time: set CUDA_HOME to the folder holding bin/nvcc"
    return None


def _build_just_in_time() -> None:
    from torch.utils import cpp_extension

    warnings.warn(
        "fastce: the CUDA extension fastce._C was not built at install time; compiling it now for this GPU "
        "(a few minutes, once: torch caches the build)",
        stacklevel=4,
    )
    cpp_extension.load(
        name="fastce_cuda_jit",
        sources=[str(path) for path in sorted(_CSRC.glob("*.cpp")) + sorted(_CSRC.glob("*.cu"))],
        extra_include_paths=[str(_CSRC)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        is_python_module=False,  # loaded as a plain library: its static initialisers register the ops
    )


def _check_rows(logits, targets) -> None:
    torch._check(logits.dim() == 3, lambda: f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    torch._check(
        tuple(targets.shape) == tuple(logits.shape[:2]),
        lambda: f"targets must be [B, T] = {tuple(logits.shape[:2])}, got {tuple(targets.shape)}",
    )


def _check_grad(grad, logits) -> None:
    torch._check(
        grad.dtype == logits.dtype and tuple(grad.shape) == tuple(logits.shape),
        lambda: f"grad must match the logits' dtype and shape, got {grad.dtype} {tuple(grad.shape)}",
    )


def _check_fields(tensor, logits, fields: int, name: str) -> None:
    """A float32 [B, T, fields] tensor of per-row values (row_stats, stats, row)."""
    expected = (*logits.shape[:2], fields)
    torch._check(
        tensor.dtype == torch.float32 and tuple(tensor.shape) == tuple(expected),
        lambda: f"{name} must be float32 {tuple(expected)}, got {tensor.dtype} {tuple(tensor.shape)}",
    )


def _check_options(softcap, label_smoothing, z_loss) -> None:
    torch._check(softcap >= 0.0, lambda: f"softcap must be 0 (none) or > 0, got {softcap}")
    torch._check(0.0 <= label_smoothing <= 1.0, lambda: f"label_smoothing must be in [0, 1], got {label_smoothing}")
    torch._check(z_loss >= 0.0, lambda: f"z_loss must be >= 0, got {z_loss}")


def _register_fakes() -> None:
    """Fake implementations for tracing (torch.compile, FakeTensorMode, meta tensors). The ops write into their
    arguments and return nothing, so a fake only checks what the CUDA launcher checks about shapes and dtypes."""

    @torch.library.register_fake("fastce_cuda::cross_entropy_fwd")
    def _(logits, targets, divisor, losses, grad, ignore_index, skip=None, softcap=0.0, label_smoothing=0.0,
          z_loss=0.0, row_stats=None):
        _check_rows(logits, targets)
        torch._check(
            losses.dtype == torch.float32 and tuple(losses.shape) == tuple(logits.shape[:2]),
            lambda: f"losses must be float32 [B, T], got {losses.dtype} {tuple(losses.shape)}",
        )
        if grad is not None:
            _check_grad(grad, logits)
        _check_options(softcap, label_smoothing, z_loss)
        if row_stats is not None:
            _check_fields(row_stats, logits, 3, "row_stats")

    @torch.library.register_fake("fastce_cuda::shard_stats")
    def _(logits, targets, vocab_start, ignore_index, stats, softcap, label_smoothing, z_loss, want_entropy):
        _check_rows(logits, targets)
        _check_fields(stats, logits, 5, "stats")
        torch._check(vocab_start >= 0, lambda: f"vocab_start must be >= 0, got {vocab_start}")
        _check_options(softcap, label_smoothing, z_loss)

    @torch.library.register_fake("fastce_cuda::shard_grad")
    def _(logits, targets, vocab_start, vocab_size, ignore_index, row, grad, softcap, label_smoothing, z_loss):
        _check_rows(logits, targets)
        _check_fields(row, logits, 3, "row")
        _check_grad(grad, logits)
        torch._check(vocab_start >= 0, lambda: f"vocab_start must be >= 0, got {vocab_start}")
        torch._check(vocab_size >= 1, lambda: f"vocab_size must be >= 1, got {vocab_size}")
        _check_options(softcap, label_smoothing, z_loss)

    @torch.library.register_fake("fastce_cuda::scale_grad_")
    def _(grad, grad_output):
        torch._check(grad.dim() == 3, lambda: f"grad must be [B, T, V], got shape {tuple(grad.shape)}")
        torch._check(
            grad_output.dtype == torch.float32
            and (grad_output.dim() == 0 or tuple(grad_output.shape) == tuple(grad.shape[:2])),
            lambda: f"grad_output must be float32, 0-dim or [B, T], got {grad_output.dtype} {tuple(grad_output.shape)}",
        )
