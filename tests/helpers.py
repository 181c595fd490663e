"""Shared test utilities: random inputs (never zeros), tolerances, and which backends run here."""
from __future__ import annotations

import os

import pytest
import torch

import fastce

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Gradient tolerance "at the rounding level of the dtype": relative to each reference element one unit in the last
# place (eps), plus the spacing of the smallest subnormals for elements that underflow.
# For float32 the gradient exp(x - lse) carries the float32 error of its argument times |x - lse| (up to ~30 for
# these inputs), hence 64 eps; bf16/fp16 results are dominated by their own final rounding.
GRAD_RTOL = {torch.float32: 64 * torch.finfo(torch.float32).eps, torch.bfloat16: torch.finfo(torch.bfloat16).eps,
             torch.float16: torch.finfo(torch.float16).eps}
GRAD_ATOL = {torch.float32: 1e-30, torch.bfloat16: 1e-38, torch.float16: 2.0**-24}


def backends_for(device: str) -> list[str]:
    """Backends to test on ``device``: on the CPU the Triton kernels run in Triton's interpreter."""
    names = [b for b in fastce.available_backends() if b != "cuda" or device == "cuda"]
    if device == "cuda":
        return [b for b in names if b in ("triton", "cuda", "torch")]
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return [b for b in names if b == "torch" or (b == "triton" and interpreted)]


def backend_params():
    return [pytest.param(d, b, id=f"{d}-{b}", marks=[pytest.mark.gpu] if d == "cuda" else [])
            for d in DEVICES for b in backends_for(d)]


def random_logits(shape, dtype, device, scale=3.0) -> torch.Tensor:
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)


def padded_labels(batch, seq_len, vocab, device, *, left=False, ignore_index=-100, min_len=0) -> torch.Tensor:
    """Random labels with a random number of padded (ignored) positions per row, at the right (or left) end."""
    labels = torch.randint(0, vocab, (batch, seq_len), device=device)
    for b in range(batch):
        keep = int(torch.randint(min(min_len, seq_len), seq_len + 1, ()))
        if left:
            labels[b, : seq_len - keep] = ignore_index
        else:
            labels[b, keep:] = ignore_index
    return labels


def gradient_terms(logits, targets, divisor=1.0, ignore_index=-100, *, softcap=None, label_smoothing=0.0,
                   z_loss=0.0) -> torch.Tensor:
    """Float64 magnitude of the terms whose difference a gradient element is (``(1 + 2z lse) p_j``, ``e / V``, the
    target's ``1 - e``, times the softcap's slope, over the divisor): float32 arithmetic is exact to a few ulp of
    these, not of their difference, which cancels where ``p_j`` is close to ``e / V``."""
    x = logits.detach().double()
    xc = x if not softcap else softcap * torch.tanh(x / softcap)
    lse = torch.logsumexp(xc, dim=-1, keepdim=True)
    V = x.shape[-1]
    terms = torch.exp(xc - lse) * (1 + 2 * z_loss * lse.abs()) + label_smoothing / V
    targets = targets.to(x.device).long()
    in_range = (targets >= 0) & (targets < V)
    terms = terms.scatter_add(-1, torch.where(in_range, targets, 0).unsqueeze(-1),
                              in_range.double().unsqueeze(-1) * (1 - label_smoothing))
    if softcap:
        terms = terms * (1 - torch.tanh(x / softcap).square())
    return terms.masked_fill((targets == ignore_index).unsqueeze(-1), 0.0) / divisor


def assert_grad_close(actual: torch.Tensor, expected64: torch.Tensor, roundings: int = 1,
                      terms64: torch.Tensor | None = None) -> None:
    """``roundings``: how many times the value was rounded to its dtype (2 when backward rescales it). ``terms64``:
    ``gradient_terms`` of the inputs, for gradients whose terms cancel (label smoothing)."""
    dtype = actual.dtype
    assert actual.shape == expected64.shape, f"gradient shape {tuple(actual.shape)} vs {tuple(expected64.shape)}"
    if actual.numel() == 0:
        return
    assert torch.isfinite(actual).all(), "non-finite gradient"
    err = (actual.double() - expected64).abs()
    bound = roundings * (GRAD_RTOL[dtype] * expected64.abs() + GRAD_ATOL[dtype])
    if terms64 is not None:
        bound = bound + 64 * torch.finfo(torch.float32).eps * terms64.abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"{dtype} gradient off at flat index {int(worst)}: got {actual.flatten()[worst].item()}, "
        f"expected {expected64.flatten()[worst].item()}"
    )


def assert_loss_close(actual: torch.Tensor, expected64: torch.Tensor, rtol: float = 1e-6) -> None:
    assert actual.dtype == torch.float32
    a, e = actual.double().item(), expected64.item()
    assert abs(a - e) <= rtol * abs(e) + 1e-12, f"loss {a} vs float64 {e} (rel {abs(a - e) / max(abs(e), 1e-300):.3g})"


def linear_inputs(N, D, V, dtype, device, bias=True, seed=0):
    """(input [N, D], weight [V, D], bias [V] or None, targets [N]) of a fused lm_head, random from ``seed`` (made on
    the CPU, so the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(dtype).to(device)
    w = (torch.randn(V, D, generator=g) / D ** 0.5 * 3).to(dtype).to(device)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).to(device) if bias else None
    t = torch.randint(0, V, (N,), generator=g).to(device)
    return x, w, b, t


def strided_linear_inputs(N, D, V, device):
    """bf16 ``linear_inputs`` with strides no kernel may assume away: the input [N, D] with stride 2 over K, the weight
    [V, D] with strides (1, V), int32 targets of stride 2; and the bias [V]."""
    base, _, b, t = linear_inputs(N, 2 * D, V, torch.bfloat16, device)
    x = base[:, ::2]  # stride over K: 2
    w = torch.randn(D, V).to(torch.bfloat16).to(device).t()  # [V, D] with stride (1, V)
    t = torch.stack((t.int(), t.int()), dim=1)[:, 0]  # stride 2
    return x, w, b, t
