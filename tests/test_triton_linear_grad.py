"""The fused lm_head's backward kernel (fastce/kernels/triton_linear_grad.py): the gradient of a vocabulary slab's
logits straight from the input and the weight (shard_grad's contract), against float64. On the CPU it runs in
Triton's interpreter with small tiles (several tiles, K steps and splits at these sizes); the GPU tests run the H100
configurations at a model's width."""
import os

import pytest
import torch

import fastce
from fastce import linear as flinear
from fastce.reference import (cross_entropy_grad_reference, cross_entropy_reference, linear_logits_reference,
                              _capped)
from fastce.spec import LossSpec

from helpers import linear_inputs, strided_linear_inputs

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("needs a CUDA device or Triton's interpreter", allow_module_level=True)
triton_linear_grad = pytest.importorskip("fastce.kernels.triton_linear_grad")

OPTIONS = {"plain": {}, "all": {"softcap": 3.0, "label_smoothing": 0.15, "z_loss": 2e-3},
           "smooth-z": {"label_smoothing": 0.1, "z_loss": 1e-2}}
CPU = [pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1"))]
GPU = [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs a CUDA device")])]


def _spec(options):
    return LossSpec(options.get("softcap", 0.0), options.get("label_smoothing", 0.0), options.get("z_loss", 0.0))


def _rows(logits, scale, softcap):
    """[N, 3] float32 (m, s, scale) of whole rows of float64 logits."""
    x = _capped(logits, softcap)
    m = x.amax(-1)
    s = (x - m[:, None]).exp().sum(-1)
    return torch.stack((m, s, scale.double()), dim=-1).float()


def _expected(logits, t, scale, options, ignore_index=-100):
    grad = cross_entropy_grad_reference(logits, t, ignore_index=ignore_index, **options)
    return grad * scale.double().to(grad.device)[:, None]


def _run(x, w, b, t, row, vocab_start, vocab_size, options, ignore_index=-100, extra=8, **kwargs):
    """The launcher into a NaN-poisoned buffer ``extra`` columns wider than the slab; those must stay NaN."""
    N, Vs = x.shape[0], w.shape[0]
    buffer = torch.full((N, Vs + extra), float("nan"), dtype=x.dtype, device=x.device)
    grad = buffer[:, :Vs]
    triton_linear_grad.linear_grad(x, w, b, t, row, vocab_start, vocab_size, ignore_index, grad, _spec(options),
                                   **kwargs)
    assert buffer[:, Vs:].isnan().all(), "a column past the slab was written"
    return grad


def _assert_grad_close(got, expected, dtype, scale):
    """Elementwise at the gradient's rounding: the interpreter truncates to bf16 (2 ulp); plus float32's absolute
    error of the terms that cancel (p_t - 1 with p_t near 1, ~1e-7 of a term ~1, times the row's scale)."""
    got, expected = got.double().cpu(), expected.cpu()
    ulp = torch.finfo(dtype).eps * 2
    bound = ulp * expected.abs() + 2e-6 * scale.double().abs().cpu()[:, None]
    bad = ~((got - expected).abs() <= bound)
    assert not bad.any(), (f"{int(bad.sum())} elements off, worst at {bad.nonzero()[0].tolist()}: "
                           f"{got[bad][0].item()} vs {expected[bad][0].item()}")


# (N, D, Vs, config, splits, extra columns): D = 72 and 200 are not multiples of BLOCK_K (a masked last K step); odd
# N and Vs; Vs = 1; N = 1; small tiles in many splits (several launch groups); one split; the TMA (tensor descriptors:
# zeros past every end; its gradient stored through one where the buffer's rows are 16-byte aligned: 700 + 12 bf16).
CASES = {
    "odd": (70, 72, 701, None, None, 8),
    "wide-K": (33, 200, 517, None, None, 3),
    "one-split": (17, 64, 300, None, 1, 8),
    "V1": (5, 16, 1, None, None, 8),
    "N1": (1, 40, 129, None, None, 8),
    "small-tiles": (45, 48, 700, "m16n32k16p0w4s1", 5, 8),
    "tma": (50, 72, 700, "m32n64k32p0w4s1-tma", None, 12),
    "tma-unaligned": (9, 20, 100, "m32n64k32p0w4s1-tma", None, 3),  # rows of 40 bytes: pointer loads and stores
}


@pytest.mark.parametrize("device", CPU)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_grad_matches_float64(device, case, option):
    N, D, V, config, splits, extra = CASES[case]
    options = OPTIONS[option]
    dtype = torch.float16 if case == "wide-K" else torch.bfloat16
    x, w, b, t = linear_inputs(N, D, V, dtype, device, bias=option != "plain")
    ignored = N - 2 if N > 3 else N // 2
    t[ignored] = -100
    scale = torch.linspace(-2.0, 3.0, N)
    if N > 3:
        t[0], t[1] = V + 2, -5  # out of range: no one-hot term
        scale[N - 1] = 0.0
    logits = linear_logits_reference(x, w, b)
    row = _rows(logits, scale, options.get("softcap"))
    grad = _run(x, w, b, t, row, 0, V, options, config=config, num_splits=splits, extra=extra)
    _assert_grad_close(grad, _expected(logits, t, scale, options), dtype, scale)
    assert torch.equal(grad[ignored].float(), torch.zeros(V)), "an ignored row's gradient is not 0"


@pytest.mark.parametrize("device", CPU)
@pytest.mark.parametrize("option", ["plain", "all"])
def test_slab_of_a_larger_vocabulary(device, option):
    """The weight's rows are the ids [vocab_start, vocab_start + Vs) of V: targets in this slab (at its edges and at
    tile edges), in another slab, a custom ignore_index; every slab's gradient is the whole row's columns."""
    N, D, V = 30, 48, 900
    options = OPTIONS[option]
    x, w, b, t = linear_inputs(N, D, V, torch.bfloat16, device)
    t[:12] = torch.tensor([333, 334, 396, 397, 460, 899, 898, 332, 0, 7, 7, 461])
    scale = torch.full((N,), 0.5)
    logits = linear_logits_reference(x, w, b)
    row = _rows(logits, scale, options.get("softcap"))
    expected = _expected(logits, t, scale, options, ignore_index=7)
    for lo, hi in ((0, 333), (333, V)):
        grad = _run(x, w[lo:hi], b[lo:hi], t, row, lo, V, options, ignore_index=7, num_splits=2)
        _assert_grad_close(grad, expected[:, lo:hi], torch.bfloat16, scale)


@pytest.mark.parametrize("device", CPU)
def test_strided_input_and_int32_targets(device):
    N, D, V = 20, 40, 200
    x, w, b, t = strided_linear_inputs(N, D, V, device)
    scale = torch.ones(N)
    logits = linear_logits_reference(x, w, b)
    row = _rows(logits, scale, 3.0)
    grad = _run(x, w, b, t, row, 0, V, OPTIONS["all"])
    _assert_grad_close(grad, _expected(logits, t, scale, OPTIONS["all"]), torch.bfloat16, scale)


def _float64_grads(h, w, b, loss_fn):
    leaves = [v.detach().double().requires_grad_() if v is not None else None for v in (h, w, b)]
    loss_fn(linear_logits_reference(*leaves)).backward()
    return [v.grad if v is not None else None for v in leaves]


def _rel_err(actual, expected):
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300))


@pytest.mark.parametrize("device", CPU + GPU)
@pytest.mark.parametrize("option", ["plain", "all"])
@pytest.mark.parametrize("slabs", ["bytes", "waves"])
def test_linear_cross_entropy_with_fused_backward(device, option, slabs, monkeypatch):
    """The public ops with FUSED_BACKWARD on and slabs of 256 columns, made by the byte rule (``_SLAB_BYTES``) or by
    the cap of one wave of tiles (``_SLAB_WAVES``; on the CPU, 4 "SMs" of 32 x 64 tiles: 256 columns once aligned):
    the backward takes the kernel (spied on) once a slab, the gradients are float64's within 2x plain PyTorch's bf16
    error (4x in the interpreter, which truncates to bf16). The forward is the slab path's (FUSED_FORWARD off), so
    that the backward alone differs from the slab path."""
    from test_linear import _plain_errors  # noqa: PLC0415 (plain PyTorch's errors, as test_linear measures them)

    monkeypatch.setattr(flinear, "FUSED_BACKWARD", True)
    monkeypatch.setattr(flinear, "FUSED_FORWARD", False)
    if slabs == "bytes":
        monkeypatch.setattr(flinear, "_SLAB_BYTES", 1)
    else:
        monkeypatch.setattr(flinear, "_SLAB_WAVES", 1)
    calls = []
    real = triton_linear_grad.linear_grad
    monkeypatch.setattr(triton_linear_grad, "linear_grad", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    options = OPTIONS[option]
    B, T, D, V = 2, 9, 40, 700
    g = torch.Generator().manual_seed(1)
    h = torch.randn(B, T, D, generator=g).bfloat16().to(device).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D ** 0.5 * 3).bfloat16().to(device).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).bfloat16().to(device).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    labels[0, 3] = labels[1, 5] = -100
    labels[0, 4], labels[1, 1] = 255, 256  # targets on a slab's edges
    count = int((labels[:, 1:] != -100).sum())
    loss = fastce.causal_lm_linear_loss(h, w, labels, V, torch.tensor(count), bias=b, backend="triton", **options)
    loss.backward()
    width = flinear._slab_columns(count, D, V, 2, triton_linear_grad.slab_columns(count, h.device, flinear._SLAB_WAVES))
    assert len(calls) == -(-V // width) and (device != "cpu" or width == 256), "not one fused backward a slab"
    from fastce.reference import causal_lm_loss_reference

    refs = _float64_grads(h, w, b, lambda lg: causal_lm_loss_reference(lg, labels, num_items_in_batch=count,
                                                                        **options))
    plain = _plain_errors(h, w, b, labels, count, options)
    factor = 4 if device == "cpu" else 2
    for name, got, expected in zip(("input", "weight", "bias"), (h.grad, w.grad, b.grad), refs):
        err = _rel_err(got, expected)
        assert err <= factor * plain[name] + 2e-5, f"grad of {name}: {err:.3g} (plain PyTorch {plain[name]:.3g})"

    # linear_cross_entropy, no bias, mean over the kept rows
    calls.clear()
    x, w2, _, t = linear_inputs(26, 40, 333, torch.bfloat16, device, bias=False)
    t[[2, 9]] = -100
    x, w2 = x.requires_grad_(), w2.requires_grad_()
    fastce.linear_cross_entropy(x, w2, t, backend="triton", **options).backward()
    assert calls
    gx, gw, _ = _float64_grads(x, w2, None, lambda lg: cross_entropy_reference(lg, t, **options).sum() / 24)
    assert _rel_err(x.grad, gx) < 2e-2 and _rel_err(w2.grad, gw) < 2e-2


# GPU: a model's width, the compiled configurations; the one accumulator's tensor-core bias must not show at bf16.
def _gpu_case(device, N=1024, D=4096, V=8192, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(N, D, device=device, generator=g).bfloat16()
    w = (torch.randn(V, D, device=device, generator=g) * D ** -0.5 * 2).bfloat16()
    t = torch.randint(0, V, (N,), device=device, generator=g)
    t[::9] = -100
    return x, w, t


@pytest.mark.parametrize("device", GPU)
@pytest.mark.parametrize("config", [n for n, c in triton_linear_grad.CONFIGS.items() if c.kwargs["BLOCK_M"] >= 64])
def test_gpu_grad_error_at_model_width(device, config):
    """Against float64: no worse than the slab path's (cuBLAS float32 logits + shard_grad, bf16 out) by more than 10%,
    and better than plain bf16 PyTorch (bf16 logits)."""
    from fastce.shard_ops import run_shard_grad

    x, w, t = _gpu_case(device)
    logits = x.double() @ w.double().t()
    scale = torch.full((x.shape[0],), 1.0 / 1000, device=device)
    row = _rows(logits, scale, None)
    expected = _expected(logits, t, scale, {})
    del logits
    grad = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=device)
    triton_linear_grad.linear_grad(x, w, None, t, row, 0, w.shape[0], -100, grad, LossSpec(), config=config)
    slab = torch.empty_like(grad)
    run_shard_grad(torch.mm(x, w.t(), out_dtype=torch.float32).unsqueeze(0), t.unsqueeze(0), 0, w.shape[0], -100,
                   row.unsqueeze(0), slab.unsqueeze(0), "triton", LossSpec())
    p = torch.softmax((x @ w.t()).float(), -1)  # plain PyTorch: bf16 logits
    p[torch.arange(len(t), device=device), t.clamp_min(0)] -= 1
    plain = (p * scale[:, None] * (t != -100)[:, None]).to(x.dtype)
    err, err_slab, err_plain = (_rel_err(v, expected) for v in (grad, slab, plain))
    assert err <= 1.1 * err_slab and err <= err_plain, f"{config}: {err:.3g} (slab {err_slab:.3g}, plain {err_plain:.3g})"


@pytest.mark.parametrize("device", GPU)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_grad_matches_float64(device, option, dtype):
    """Odd sizes on the GPU configuration: masked K (D = 1000), partial tiles, ignored and out-of-range targets."""
    N, D, V = 333, 1000, 5001
    options = OPTIONS[option]
    x, w, b, t = linear_inputs(N, D, V, dtype, device, bias=option != "plain")
    t[[0, 100]] = -100
    t[5] = V
    t[6], t[7] = 0, V - 1
    scale = torch.linspace(-1.0, 1.0, N, device=device)
    logits = linear_logits_reference(x, w, b)
    row = _rows(logits, scale, options.get("softcap"))
    grad = _run(x, w, b, t, row, 0, V, options, extra=64)
    expected = _expected(logits, t, scale, options)
    assert _rel_err(grad, expected) <= 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("device", GPU)
def test_gpu_linear_cross_entropy_with_fused_backward(device, monkeypatch):
    """Gradients with FUSED_BACKWARD on against off and float64 (1024 x 4096 x 8192)."""
    x, w, t = _gpu_case(device)
    grads = {}
    for flag in (False, True):
        monkeypatch.setattr(flinear, "FUSED_BACKWARD", flag)
        h, v = x.clone().requires_grad_(), w.clone().requires_grad_()
        fastce.linear_cross_entropy(h, v, t, backend="triton").backward()
        grads[flag] = (h.grad, v.grad)
    gx, gw, _ = _float64_grads(x, w, None, lambda lg: cross_entropy_reference(lg, t).sum() / int((t != -100).sum()))
    for i, ref in enumerate((gx, gw)):
        assert _rel_err(grads[True][i], ref) <= 1.1 * _rel_err(grads[False][i], ref) + 1e-6


@pytest.mark.parametrize("device", CPU)
@pytest.mark.parametrize("option", ["plain", "all"])
def test_linear_grads_impl_fused_matches_slab_path(device, option, monkeypatch):
    """``linear_grads_impl`` for a vocabulary shard (ids [100, 100 + V) of V + 250), per-row scales (0 and negative
    among them), ignored rows, a target in another shard: FUSED_BACKWARD on and off give the same gradients to bf16
    rounding (twice the interpreter's truncation), and the fused one the float64 gradient of the shard's logits."""
    options = OPTIONS[option]
    N, D, V, start, total = 37, 56, 600, 100, 850
    x, w, b, t = linear_inputs(N, D, V, torch.bfloat16, device)
    t += start
    t[[3, 20]] = -100
    t[4] = 5  # in another shard
    scale = torch.linspace(-1.0, 2.0, N)
    scale[7] = 0.0
    logits = linear_logits_reference(x, w, b)
    other = torch.randn(N, total - V, dtype=torch.float64) * 2  # the other shards' logits
    whole = torch.cat((other[:, :start], logits, other[:, start:]), dim=1)
    row = _rows(whole, scale, options.get("softcap"))
    monkeypatch.setattr(flinear, "_SLAB_BYTES", 1)
    grads = {}
    for flag in (False, True):
        monkeypatch.setattr(flinear, "FUSED_BACKWARD", flag)
        grads[flag] = flinear.linear_grads_impl(x, w, b, t, row, -100, "triton", True, True, True,
                                                vocab_start=start, vocab_size=total, **options)
    dlogits = _expected(whole, t, scale, options)[:, start:start + V]
    refs = {"input": dlogits @ w.double(), "weight": dlogits.t() @ x.double(), "bias": dlogits.sum(0)}
    for name, got, slab in zip(refs, grads[True], grads[False]):
        err, err_slab = _rel_err(got, refs[name]), _rel_err(slab, refs[name])
        assert err <= 2 * err_slab + 1e-5, f"grad of {name}: fused {err:.3g}, slab path {err_slab:.3g}"
