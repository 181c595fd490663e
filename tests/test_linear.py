"""The fused lm_head + loss (``linear_cross_entropy``, ``causal_lm_linear_loss``) against float64, every backend."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastce
from fastce import linear as flinear
from fastce.reference import causal_lm_loss_reference, cross_entropy_reference, linear_logits_reference

from helpers import assert_loss_close, backend_params, padded_labels

OPTIONS = {"plain": {}, "all": {"softcap": 3.0, "label_smoothing": 0.15, "z_loss": 2e-3}}


@pytest.fixture
def small_slabs(monkeypatch):
    """Slabs of 256 columns (the smallest): rows are merged from several slabs even at test sizes."""
    monkeypatch.setattr(flinear, "_SLAB_BYTES", 1)


def _inputs(shape, V, dtype, device, bias=True, scale=1.0):
    *lead, D = shape
    h = (torch.randn(shape, device=device) * scale).to(dtype).requires_grad_()
    w = (torch.randn(V, D, device=device) / D ** 0.5 * 3).to(dtype).requires_grad_()
    b = (torch.randn(V, device=device) * 0.5).to(dtype).requires_grad_() if bias else None
    return h, w, b


def _reference_grads(h, w, b, loss_fn):
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (h, w, b)]
    loss = loss_fn(linear_logits_reference(*leaves))
    loss.backward()
    return loss.detach(), [t.grad if t is not None else None for t in leaves]


def _rel_err(actual, expected):
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300))


# (B, T, D, V): odd V over several slabs; V = 1; T = 1; a Llama-like ragged shape.
CASES = {"odd-V": (2, 6, 24, 1031), "V1": (2, 5, 8, 1), "T1": (3, 1, 16, 300), "ragged": (1, 9, 32, 777)}


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_causal_lm_linear_loss_matches_float64(device, backend, dtype, case, option, small_slabs):
    B, T, D, V = CASES[case]
    options = OPTIONS[option]
    h, w, b = _inputs((B, T, D), V, dtype, device)
    labels = padded_labels(B, T, V, device)
    count = int((labels[:, 1:] != -100).sum()) + 2
    loss = fastce.causal_lm_linear_loss(h, w, labels, V, torch.tensor(count), bias=b, backend=backend, **options)
    loss.backward()
    ref, (gh, gw, gb) = _reference_grads(
        h, w, b, lambda logits: causal_lm_loss_reference(logits, labels, num_items_in_batch=count, **options))
    assert_loss_close(loss, ref)
    assert h.grad.dtype == w.grad.dtype == b.grad.dtype == dtype
    # Plain PyTorch in the inputs' dtype on the same inputs bounds our error (the brief: at most ~2x its error), plus
    # the float32 rounding of terms that cancel (z-loss and smoothing with V = 1 leave gradients of ~1e-2 from terms ~1).
    plain = _plain_errors(h, w, b, labels, count, options)
    # Triton's interpreter (CPU) truncates float32 to bfloat16 instead of rounding to nearest (numpy's cast; compiled
    # Triton rounds), which alone doubles the rounding error of a bf16 gradient.
    factor = 4 if (device, backend, dtype) == ("cpu", "triton", torch.bfloat16) else 2
    for name, got, expected in (("input", h.grad, gh), ("weight", w.grad, gw), ("bias", b.grad, gb)):
        err = _rel_err(got, expected)
        bound = factor * plain[name] + 2e-5
        assert err <= bound, f"grad of {name}: relative error {err:.3g} > {bound:.3g} (plain PyTorch: {plain[name]:.3g})"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or "triton" not in fastce.available_backends(),
                    reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_triton_slab_path_matches_float64(case, option, small_slabs, monkeypatch):
    """bf16 on the Triton backend takes the fused kernels (benchmarks/NOTES.md row 24); with ``FUSED_FORWARD`` and
    ``FUSED_BACKWARD`` off it takes the slab path (float32 logits, statistics and epilogue kernels), which float32
    weights still take: the same checks against float64."""
    monkeypatch.setattr(flinear, "FUSED_FORWARD", False)
    monkeypatch.setattr(flinear, "FUSED_BACKWARD", False)
    test_causal_lm_linear_loss_matches_float64("cuda", "triton", torch.bfloat16, case, option, small_slabs)


def _plain_errors(h, w, b, labels, count, options):
    """Relative errors of plain PyTorch in the inputs' dtype (F.linear, then the loss on float32 logits)."""
    leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
    logits = F.linear(*leaves)
    smoothing = options.get("label_smoothing", 0.0)
    x = logits.float()
    if options.get("softcap"):
        x = options["softcap"] * torch.tanh(x / options["softcap"])
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    loss = F.cross_entropy(x.flatten(0, 1), shifted.flatten(), reduction="sum", label_smoothing=smoothing)
    if options.get("z_loss"):
        lse = torch.logsumexp(x, dim=-1)
        loss = loss + options["z_loss"] * (lse.square() * (shifted != -100)).sum()
    (loss / count).backward()
    _, refs = _reference_grads(h, w, b, lambda lg: causal_lm_loss_reference(lg, labels, num_items_in_batch=count,
                                                                            **options))
    return {name: _rel_err(t.grad, r) for name, t, r in zip(("input", "weight", "bias"), leaves, refs)}


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_linear_cross_entropy_reductions(device, backend, reduction, option, small_slabs):
    options = OPTIONS[option]
    N, D, V = 19, 16, 600
    h, w, b = _inputs((N, D), V, torch.float32, device, bias=False)
    target = torch.randint(0, V, (N,), device=device)
    target[[2, 7, 8]] = -100
    out = fastce.linear_cross_entropy(h, w, target, reduction=reduction, backend=backend, **options)
    upstream = torch.randn(N, device=device) if reduction == "none" else torch.tensor(1.7, device=device)
    (out * upstream).sum().backward()

    def loss_fn(logits):
        rows = cross_entropy_reference(logits, target, **options)
        if reduction == "none":
            return (rows * upstream.double()).sum()
        total = rows.sum() / ((target != -100).sum() if reduction == "mean" else 1)
        return total * float(upstream)

    ref, (gh, gw, _) = _reference_grads(h, w, None, loss_fn)
    if reduction == "none":
        assert out.shape == (N,) and out.dtype == torch.float32 and torch.equal(out[[2, 7, 8]], torch.zeros(3, device=device))
        expected = cross_entropy_reference(linear_logits_reference(h, w), target, **options)
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    else:
        assert_loss_close((out * upstream).detach(), ref)
    assert _rel_err(h.grad, gh) < 1e-5 and _rel_err(w.grad, gw) < 1e-5


@pytest.mark.parametrize("device, backend", backend_params())
def test_return_stats_and_all_ignored(device, backend, small_slabs):
    N, D, V = 12, 8, 300
    h, w, _ = _inputs((N, D), V, torch.float32, device, bias=False)
    target = torch.randint(0, V, (N,), device=device)
    target[:4] = -100
    out = fastce.linear_cross_entropy(h, w, target, backend=backend, return_stats=True, z_loss=1e-2)
    logits = linear_logits_reference(h, w)
    lse = torch.logsumexp(logits, -1)
    torch.testing.assert_close(out.lse.double(), torch.where(target == -100, 0, lse), rtol=1e-6, atol=1e-5)
    assert out.accuracy.shape == (N,) and not out.accuracy[:4].any()
    z = 1e-2 * (lse.square() * (target != -100)).sum() / (target != -100).sum()
    torch.testing.assert_close(out.z_loss.double(), z, rtol=1e-6, atol=0)
    # Every target ignored: loss 0 and zero gradients, not NaN.
    loss = fastce.linear_cross_entropy(h, w, torch.full((N,), -100, device=device), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("device, backend", backend_params())
def test_gradient_accumulation_equals_one_batch(device, backend):
    B, T, D, V = 4, 8, 16, 257
    h, w, b = _inputs((B, T, D), V, torch.float32, device)
    labels = padded_labels(B, T, V, device, min_len=1)
    count = (labels[:, 1:] != -100).sum()
    fastce.causal_lm_linear_loss(h, w, labels, bias=b, backend=backend).backward()
    full = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    total = sum(fastce.causal_lm_linear_loss(h[i:i + 2], w, labels[i:i + 2], num_items_in_batch=count, bias=b,
                                             backend=backend) for i in (0, 2))
    total.backward()
    for got, expected in zip((h.grad, w.grad, b.grad), full):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device, backend", backend_params())
def test_gradient_work_only_where_needed(device, backend, monkeypatch):
    calls = []
    real = flinear.linear_grads_impl

    def spy(*args):
        calls.append(args[7:10])  # need_input, need_weight, need_bias
        return real(*args)

    monkeypatch.setattr(flinear, "linear_grads_impl", spy)
    N, D, V = 6, 8, 50
    h, w, b = _inputs((N, D), V, torch.float32, device)
    target = torch.randint(0, V, (N,), device=device)
    with torch.no_grad():
        assert not fastce.linear_cross_entropy(h, w, target, b, backend=backend).requires_grad
    fastce.linear_cross_entropy(h.detach(), w, target, backend=backend).backward()
    fastce.linear_cross_entropy(h, w.detach(), target, b.detach(), backend=backend).backward()
    assert calls == [(False, True, False), (True, False, False)]
    assert h.grad is not None and w.grad is not None and b.grad is None


class _SizeLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_logits_tensor_is_ever_made(small_slabs):
    N, D, V = 256, 16, 4096  # the weight (and its gradient) are V * D = N * V / 16 elements
    h, w, b = _inputs((N, D), V, torch.bfloat16, "cpu")
    target = torch.randint(0, V, (N,))
    with _SizeLog() as log:
        fastce.linear_cross_entropy(h, w, target, b, backend="torch", z_loss=1e-3).backward()
    assert 0 < log.largest <= N * V // 8, f"a tensor of {log.largest} elements (logits: {N * V})"


@pytest.mark.parametrize("device, backend", backend_params())
def test_bad_input(device, backend):
    N, D, V = 4, 8, 10
    h, w, b = _inputs((N, D), V, torch.float32, device)
    target = torch.randint(0, V, (N,), device=device)
    bad = target.clone()
    bad[2] = V
    with pytest.raises(ValueError, match=r"target 10 at position \(2,\) is outside \[0, 10\)"):
        fastce.linear_cross_entropy(h, w, bad, backend=backend)
    loss = fastce.linear_cross_entropy(h, w, bad, backend=backend, validate=False)
    assert torch.isnan(loss)
    loss.backward()  # defined, no crash
    with pytest.raises(ValueError, match="D = 8"):
        fastce.linear_cross_entropy(h[:, :5], w, target, backend=backend)
    with pytest.raises(TypeError, match="same dtype"):
        fastce.linear_cross_entropy(h, w.double(), target, backend=backend)
    with pytest.raises(ValueError, match="bias"):
        fastce.linear_cross_entropy(h, w, target, b[:3], backend=backend)
    with pytest.raises(ValueError, match="do not match"):
        fastce.linear_cross_entropy(h, w, target[:3], backend=backend)
    with pytest.raises(TypeError, match="integer"):
        fastce.linear_cross_entropy(h, w, target.float(), backend=backend)
    with pytest.raises(ValueError, match="vocab_size=11"):
        fastce.causal_lm_linear_loss(h.unsqueeze(0), w, target.unsqueeze(0), vocab_size=11, backend=backend)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        fastce.causal_lm_linear_loss(h.unsqueeze(0), w, target.unsqueeze(0), num_items_in_batch=torch.tensor(-3),
                                     backend=backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tensor-core GEMMs)")
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda", "torch") if b in fastce.available_backends()])
def test_loss_within_1e6_at_a_model_width(backend):
    """At D = 4096 the float32 logits of one tensor-core GEMM come out biased towards zero, and the loss was 1.1e-6 off
    float64 (benchmarks/NOTES.md, row 20); the forward adds its products in pieces and stays within the bar."""
    torch.manual_seed(0)
    n, d, v = 1024, 4096, 8192
    h = torch.randn(n, d, device="cuda").bfloat16()
    w = (torch.randn(v, d, device="cuda") * d ** -0.5 * 2).bfloat16()
    t = torch.randint(0, v, (n,), device="cuda")
    t[::8] = -100
    loss = fastce.linear_cross_entropy(h, w, t, backend=backend)
    ref = cross_entropy_reference(h.double() @ w.double().t(), t).sum() / (t != -100).sum()
    assert abs(float(loss) - float(ref)) <= 1e-6 * abs(float(ref))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or "triton" not in fastce.available_backends(),
                    reason="needs a CUDA GPU and Triton")
def test_cuda_graph_capture_without_validation(small_slabs):
    """validate=False: the fused head (bf16 on Triton: the fused kernels, several slabs) forward and backward in one
    CUDA graph, without a host synchronisation (capture fails on one), replayed on new hidden states."""
    N, D, V = 300, 128, 1031
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, D, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(V, D, device="cuda", generator=g) / D ** 0.5 * 3).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    t[::7] = -100

    def step():
        loss = fastce.linear_cross_entropy(h, w, t, backend="triton", validate=False, label_smoothing=0.1)
        return (loss, *torch.autograd.grad(loss * 1.5, (h, w)))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compiles the kernels
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            loss, gh, gw = step()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.no_grad():
        h.copy_(torch.randn(N, D, device="cuda", generator=g))
    graph.replay()
    torch.cuda.synchronize()
    ref, (rh, rw, _) = _reference_grads(
        h, w, None, lambda logits: cross_entropy_reference(logits, t, label_smoothing=0.1).sum() / int((t != -100).sum()))
    assert_loss_close(loss, ref)
    assert _rel_err(gh, 1.5 * rh) < 1e-2 and _rel_err(gw, 1.5 * rw) < 1e-2  # bf16 gradients
