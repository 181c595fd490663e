"""Loss options (softcap, label smoothing, z-loss, reduction="none", return_stats) on the logits path, every backend,
against the float64 references (fastce/reference.py)."""
import pytest
import torch

import fastce
from fastce.backends import kernels
from fastce.reference import (
    causal_lm_loss_reference,
    cross_entropy_grad_reference,
    cross_entropy_reference,
    row_stats_reference,
)
from fastce.spec import LossSpec

from helpers import assert_grad_close, assert_loss_close, backend_params, gradient_terms, padded_labels, random_logits

OPTIONS = {
    "softcap": {"softcap": 2.5},
    "smoothing": {"label_smoothing": 0.1},
    "z-loss": {"z_loss": 1e-3},
    "smoothing-1": {"label_smoothing": 1.0},
    "all": {"softcap": 4.0, "label_smoothing": 0.25, "z_loss": 3e-3},
}

# (B, T, V): T=1; V=1; odd V; a V past Triton's single-chunk limit (several chunks and a ragged tail).
SHAPES = {"T1": (2, 1, 37), "V1": (2, 4, 1), "odd-V": (3, 6, 37), "multi-chunk-V": (1, 3, 16384 + 4096 + 3)}


def _reference(logits, labels, **kwargs):
    x = logits.detach().double().requires_grad_()
    loss = causal_lm_loss_reference(x, labels, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_options_match_float64(device, backend, dtype, shape, option):
    B, T, V = SHAPES[shape]
    if shape == "multi-chunk-V" and option not in ("all", "softcap"):
        pytest.skip("the long rows run the combinations that exercise every term")
    options = OPTIONS[option]
    logits = random_logits((B, T, V), dtype, device).requires_grad_()
    labels = padded_labels(B, T, V, device)
    count = int((labels[:, 1:] != -100).sum()) + 2  # a step count larger than this micro-batch's own
    loss = fastce.causal_lm_loss(logits, labels, num_items_in_batch=torch.tensor(count), backend=backend, **options)
    loss.backward()
    ref_loss, ref_grad = _reference(logits, labels, num_items_in_batch=count, **options)
    assert_loss_close(loss, ref_loss)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    assert_grad_close(logits.grad, ref_grad, terms64=gradient_terms(logits, shifted, count, **options))


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("option", ["plain", "all"])
@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "inplace"])
def test_return_stats(device, backend, option, inplace):
    options = {} if option == "plain" else OPTIONS[option]
    B, T, V = 3, 7, 301
    logits = random_logits((B, T, V), torch.bfloat16, device)
    labels = padded_labels(B, T, V, device)
    labels[0, 1:] = -100  # a row whose every target is ignored
    # Make some targets the argmax of their row, so that accuracy is not trivially all False.
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    hits = (shifted >= 0) & (torch.rand(B, T, device=device) < 0.5)
    rows = hits.reshape(-1).nonzero().squeeze(-1)
    logits.view(-1, V)[rows, shifted.reshape(-1)[rows]] = 30.0
    x = (logits * 1).requires_grad_() if inplace else logits.clone().requires_grad_()
    pristine = x.detach().clone()
    out = fastce.causal_lm_loss(x, labels, backend=backend, return_stats=True, inplace_backward=inplace, **options)
    assert isinstance(out, fastce.LossOutput)
    lse, entropy, correct = row_stats_reference(pristine, shifted, softcap=options.get("softcap"))
    torch.testing.assert_close(out.lse.double(), lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.accuracy, correct) and correct.any() and not correct.all()
    assert out.lse.shape == out.entropy.shape == out.accuracy.shape == (B, T) and out.accuracy.dtype == torch.bool
    count = (shifted != -100).sum().double()
    z_term = options.get("z_loss", 0.0) * (lse.square() * (shifted != -100)).sum() / count
    torch.testing.assert_close(out.z_loss.double(), z_term, rtol=1e-6, atol=1e-9)
    assert out.z_loss.shape == () and out.z_loss.dtype == torch.float32  # also without a z-loss (zeros, made apart)
    ref = causal_lm_loss_reference(pristine, labels, **options)
    assert_loss_close(out.loss, ref)
    out.loss.backward()  # differentiable as without return_stats


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("option", ["plain", "all"])
def test_reduction_none_gradient_is_exact_for_any_upstream_gradient(device, backend, option):
    """(w * losses).sum().backward() with a random w: Liger's per-token gradients were wrong (their #968, #1298)."""
    options = {} if option == "plain" else OPTIONS[option]
    N, V = 13, 501
    logits = random_logits((N, V), torch.bfloat16, device).requires_grad_()
    target = torch.randint(0, V, (N,), device=device)
    target[3] = -100
    losses = fastce.cross_entropy(logits, target, reduction="none", backend=backend, **options)
    assert losses.dtype == torch.float32 and losses.shape == (N,)
    w = torch.randn(N, device=device)
    (w * losses).sum().backward()
    x = logits.detach().double().requires_grad_()
    ref = cross_entropy_reference(x, target, **options)
    torch.testing.assert_close(losses.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    (w.double() * ref).sum().backward()
    terms = gradient_terms(logits, target, **options) * w.double().abs().unsqueeze(-1)
    assert_grad_close(logits.grad, x.grad, roundings=2, terms64=terms)  # the gradient, then its rescale by w


@pytest.mark.parametrize("device, backend", backend_params())
def test_gradient_accumulation_with_options(device, backend):
    """k micro-batches with the step's count equal one batch, with every option on."""
    options = OPTIONS["all"]
    B, T, V = 4, 9, 97
    logits = random_logits((B, T, V), torch.float32, device)
    labels = padded_labels(B, T, V, device, min_len=1)
    count = (labels[:, 1:] != -100).sum()
    full = logits.clone().requires_grad_()
    fastce.causal_lm_loss(full, labels, backend=backend, **options).backward()
    parts = logits.clone().requires_grad_()
    total = sum(fastce.causal_lm_loss(parts[i:i + 1], labels[i:i + 1], num_items_in_batch=count, backend=backend,
                                      **options) for i in range(B))
    full_loss = fastce.causal_lm_loss(logits, labels, backend=backend, **options)
    total.backward()
    torch.testing.assert_close(total, full_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(parts.grad, full.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "inplace"])
def test_launcher_with_options_writes_every_output(device, backend, dtype, inplace):
    """The kernels' contract with a spec: poisoned outputs are all written (losses, gradient, row statistics)."""
    spec = LossSpec(softcap=3.0, label_smoothing=0.2, z_loss=0.01, stats=True)
    B, T, V = 2, 5, 1003
    logits = random_logits((B, T, V), dtype, device)
    targets = torch.randint(0, V, (B, T), device=device)
    targets[0, 1] = -100
    targets[1, 4] = V + 3  # out of range: NaN loss, no one-hot
    options = dict(softcap=3.0, label_smoothing=0.2, z_loss=0.01)
    expected = cross_entropy_reference(logits, targets, **options)
    expected_grad = cross_entropy_grad_reference(logits, targets, 4.0, **options)
    lse, entropy, correct = row_stats_reference(logits, targets, softcap=3.0)
    losses = torch.full((B, T), float("nan"), device=device)
    row_stats = torch.full((B, T, 3), float("nan"), device=device)
    grad = logits if inplace else torch.full_like(logits, float("nan"))
    divisor = torch.tensor(4.0, dtype=torch.float64, device=device)
    kernels(backend).cross_entropy_fwd(logits, targets, divisor, losses, grad, -100, None, spec=spec,
                                       row_stats=row_stats)
    torch.testing.assert_close(losses.double(), expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(row_stats[..., 0].double(), lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(row_stats[..., 1].double(), entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(row_stats[..., 2] != 0, correct)
    assert_grad_close(grad, expected_grad, terms64=gradient_terms(logits, targets, 4.0, **options))


@pytest.mark.parametrize("bad, match", [
    ({"softcap": -1.0}, "softcap"), ({"softcap": float("nan")}, "softcap"), ({"softcap": 0.0}, "softcap"),
    ({"label_smoothing": 1.5}, "label_smoothing"), ({"label_smoothing": -0.1}, "label_smoothing"),
    ({"label_smoothing": float("nan")}, "label_smoothing"), ({"z_loss": -1e-4}, "z_loss"),
    ({"z_loss": float("inf")}, "z_loss"),
])
def test_bad_option_values_raise(bad, match):
    logits = random_logits((2, 3, 11), torch.float32, "cpu")
    target = torch.randint(0, 11, (2, 3))
    with pytest.raises(ValueError, match=match):
        fastce.causal_lm_loss(logits, target, **bad)
    with pytest.raises(ValueError, match=match):
        fastce.cross_entropy(logits.view(6, 11), target.view(6), **bad)
    with pytest.raises(ValueError, match="reduction"):
        fastce.cross_entropy(logits.view(6, 11), target.view(6), reduction="avg")


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("z_loss", [0.0, 2e-3])
def test_per_row_z_loss_term(device, backend, z_loss):
    """reduction="none" with return_stats: the z-loss term per row, float32, z_loss * lse**2 on kept rows and 0 on
    ignored ones; zeros of the rows' shape without a z-loss."""
    N, V = 11, 257
    logits = random_logits((N, V), torch.bfloat16, device)
    target = torch.randint(0, V, (N,), device=device)
    target[[2, 7]] = -100
    out = fastce.cross_entropy(logits, target, reduction="none", backend=backend, return_stats=True, z_loss=z_loss)
    assert out.z_loss.shape == (N,) and out.z_loss.dtype == torch.float32
    lse = logits.double().logsumexp(-1)
    expected = torch.where(target != -100, z_loss * lse.square(), torch.zeros_like(lse))
    torch.testing.assert_close(out.z_loss.double(), expected, rtol=1e-6, atol=1e-9)
