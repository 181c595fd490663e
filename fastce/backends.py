"""Which kernel backend runs: what is available on this machine, and what ``"auto"`` picks."""
from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "cuda", "torch")

# "auto" on CUDA tensors, from benchmarks/results/auto-backend.md (H100, bf16, end to end). On sm_90 and newer, the
# CUDA backend: its cluster path reads each row once (fwd+bwd 1.50 vs 1.66 ms at 4x2048x128256), forward only it is
# level with Triton's kernel, and its C++ launch costs less host time. On older GPUs, where the CUDA backend has no
# cluster path, Triton, except for at most _AUTO_CUDA_MAX_ROWS rows (host-bound shapes).
_AUTO_CUDA_MAX_ROWS = 512
_CLUSTER_MIN_MAJOR = 9  # compute capability of the CUDA backend's cluster path (thread-block clusters)


_TRITON_IMPORT_ERROR: list = []  # filled once; a plain list rather than lru_cache, which torch.compile warns about


def _triton_reason() -> str | None:
    if not _TRITON_IMPORT_ERROR:
        try:
            import triton  # noqa: F401

            _TRITON_IMPORT_ERROR.append(None)
        except Exception as exc:  # pragma: no cover - depends on the machine
            _TRITON_IMPORT_ERROR.append(f"triton is not importable ({exc})")
    if _TRITON_IMPORT_ERROR[0] is not None:
        return _TRITON_IMPORT_ERROR[0]
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU, slowly)"
    return None


def _cuda_reason() -> str | None:
    try:
        from .kernels import cuda_ce
    except ImportError as exc:
        return f"the CUDA backend module is missing ({exc})"
    return cuda_ce.unavailable_reason()


def unavailable_reason(backend: str) -> str | None:
    """None when ``backend`` can run here, else a sentence saying why not."""
    if backend == "torch":
        return None
    if backend == "triton":
        return _triton_reason()
    if backend == "cuda":
        return _cuda_reason()
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} or 'auto'")


def available_backends() -> list[str]:
    """The backends that can run on this machine (``"torch"`` always can); see ``resolve_backend`` for "auto"."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def _has_clusters(device: torch.device) -> bool:
    """Whether the CUDA backend takes its cluster path on ``device`` (thread-block clusters: sm_90 and newer)."""
    return torch.cuda.get_device_capability(device)[0] >= _CLUSTER_MIN_MAJOR


def _cuda_first(logits: torch.Tensor, clusters: bool) -> bool:
    """"auto"'s order on CUDA tensors: the CUDA backend first where it has its cluster path, or for few rows."""
    return clusters or logits.numel() // max(logits.shape[-1], 1) <= _AUTO_CUDA_MAX_ROWS


def resolve_backend(backend: str, logits: torch.Tensor) -> str:
    """The concrete backend for ``logits``; raises ``ValueError`` naming the reason if it cannot run."""
    if backend == "auto":
        if logits.device.type != "cuda":
            return "torch"
        preferred = ("cuda", "triton") if _cuda_first(logits, _has_clusters(logits.device)) else ("triton", "cuda")
        for name in preferred:
            if unavailable_reason(name) is None:
                return name
        return "torch"
    reason = unavailable_reason(backend)
    if reason is not None:
        raise ValueError(f"fastce backend {backend!r} is unavailable: {reason}")
    if backend in ("cuda", "triton") and logits.device.type != "cuda":
        if not (backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError(f"fastce backend {backend!r} needs CUDA tensors, got logits on {logits.device}")
    return backend


def resolve_linear_backend(backend: str, input: torch.Tensor) -> str:
    """``resolve_backend`` for the fused lm_head (``input`` its hidden states): there "auto" puts Triton first on CUDA
    tensors. Its kernels there run on float32 slabs of short rows, where Triton's statistics and epilogue are the
    faster ones, and its epilogue writes the bfloat16 gradient itself (the CUDA backend's runs in place, then a cast):
    at 8192x4096x128256 one call took 49.5 ms against 57.5 (benchmarks/NOTES.md, row 19)."""
    if backend == "auto" and input.device.type == "cuda" and unavailable_reason("triton") is None:
        return "triton"
    return resolve_backend(backend, input)


_CUDA_ON_DEVICE: dict = {}  # device index -> (CUDA backend available, cluster path): what resolve_backend asks


def takes_cuda(backend: str, logits: torch.Tensor) -> bool:
    """Whether ``resolve_backend(backend, logits)`` gives "cuda" for these CUDA logits, from a per-device cache (the
    eager path asks at every call; False where it would raise or pick another backend)."""
    if backend not in ("auto", "cuda"):
        return False
    known = _CUDA_ON_DEVICE.get(logits.device.index)
    if known is None:
        known = _CUDA_ON_DEVICE[logits.device.index] = (_cuda_reason() is None, _has_clusters(logits.device))
    available, clusters = known
    return available and (backend == "cuda" or _cuda_first(logits, clusters))


_KERNELS: dict = {}  # backend -> its launchers' module: looked up at every launch


def kernels(backend: str):
    """The module holding ``backend``'s launchers (see ``fastce/kernels/__init__.py``)."""
    module = _KERNELS.get(backend)
    if module is not None:
        return module
    if backend == "torch":
        from .kernels import torch_ce as module
    elif backend == "triton":
        from .kernels import triton_ce as module
    elif backend == "cuda":
        from .kernels import cuda_ce as module
    else:
        raise ValueError(f"unknown backend {backend!r}")
    _KERNELS[backend] = module
    return module
