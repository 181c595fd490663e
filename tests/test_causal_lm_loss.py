"""fastce.causal_lm_loss and fastce.cross_entropy against the float64 reference, through autograd."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastce
from fastce import ops
from fastce.reference import causal_lm_loss_reference, cross_entropy_reference

from helpers import assert_grad_close, assert_loss_close, backend_params, padded_labels, random_logits


def _reference(logits, labels, **kwargs):
    x = logits.detach().double().requires_grad_()
    loss = causal_lm_loss_reference(x, labels, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


CASES = {
    # id: (B, T, V, label options)
    "T1-V1": (1, 1, 1, {}),
    "odd-V-right-pad": (3, 6, 37, {}),
    "left-pad": (3, 6, 37, {"left": True}),
    "V-1": (2, 5, 1, {}),
    "multi-chunk-V": (2, 3, 9001, {}),
    "llama-ish-V-ragged": (1, 4, 12003, {"min_len": 1}),
}


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("num_items", ["mean", "int", "tensor"])
def test_matches_float64(device, backend, dtype, case, num_items):
    B, T, V, opts = CASES[case]
    logits = random_logits((B, T, V), dtype, device).requires_grad_()
    labels = padded_labels(B, T, V, device, **opts)
    count = int((labels[:, 1:] != -100).sum()) + 3  # a step count larger than this micro-batch's own
    n = {"mean": None, "int": count, "tensor": torch.tensor(count)}[num_items]  # the tensor on the CPU on purpose
    loss = fastce.causal_lm_loss(logits, labels, V, num_items_in_batch=n, backend=backend)
    loss.backward()
    ref_loss, ref_grad = _reference(logits, labels, num_items_in_batch=count if n is not None else None)
    assert_loss_close(loss, ref_loss)
    assert logits.grad.dtype == dtype
    assert_grad_close(logits.grad, ref_grad)


@pytest.mark.parametrize("device, backend", backend_params())
def test_shift_labels_ignore_index_and_int32(device, backend):
    B, T, V = 2, 7, 53
    logits = random_logits((B, T, V), torch.bfloat16, device).requires_grad_()
    shift_labels = torch.randint(0, V, (B, T), device=device, dtype=torch.int32)
    shift_labels[1, 3:] = -1
    loss = fastce.causal_lm_loss(logits, None, V, ignore_index=-1, shift_labels=shift_labels, backend=backend)
    loss.backward()
    ref_loss, ref_grad = _reference(logits, None, ignore_index=-1, shift_labels=shift_labels)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(logits.grad, ref_grad)


@pytest.mark.parametrize("device, backend", backend_params())
def test_slice_of_logits_no_copy_and_inputs_untouched(device, backend):
    """logits[:, -k:] (rows not viewable as [N, V]) works; neither logits nor labels are modified."""
    full = random_logits((2, 10, 101), torch.bfloat16, device).requires_grad_()
    logits = full[:, -6:]
    labels = padded_labels(2, 6, 101, device)
    logits_before, labels_before = logits.detach().clone(), labels.clone()
    loss = fastce.causal_lm_loss(logits, labels, backend=backend)
    loss.backward()
    ref_loss, ref_grad = _reference(logits, labels)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(full.grad[:, -6:], ref_grad)
    assert torch.equal(full.grad[:, :-6], torch.zeros_like(full.grad[:, :-6]))
    assert torch.equal(logits.detach(), logits_before) and torch.equal(labels, labels_before)


@pytest.mark.parametrize("device, backend", backend_params())
def test_inplace_backward_writes_into_logits(device, backend):
    B, T, V = 2, 5, 300
    leaf = random_logits((B, T, V), torch.bfloat16, device).requires_grad_()
    labels = padded_labels(B, T, V, device)
    ref_loss, ref_grad = _reference(leaf, labels)
    logits = leaf * 1  # a non-leaf, like a model's output, that nothing saved for backward
    storage = logits.data_ptr()
    loss = fastce.causal_lm_loss(logits, labels, inplace_backward=True, backend=backend)
    loss.backward()
    assert_loss_close(loss, ref_loss)
    assert_grad_close(leaf.grad, ref_grad)
    assert logits.data_ptr() == storage
    assert_grad_close(logits.detach(), ref_grad)  # the logits' storage now holds the gradient


@pytest.mark.parametrize("device, backend", backend_params())
def test_inplace_backward_refuses_when_logits_were_saved(device, backend):
    """If something saved the logits for its own backward, overwriting them must raise, not corrupt."""
    leaf = random_logits((1, 4, 30), torch.float32, device).requires_grad_()
    logits = torch.tanh(leaf)  # tanh saves its output
    loss = fastce.causal_lm_loss(logits, padded_labels(1, 4, 30, device, min_len=4), inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("device, backend", backend_params())
def test_grad_output_scales_gradient(device, backend):
    B, T, V = 2, 6, 77
    logits = random_logits((B, T, V), torch.float32, device).requires_grad_()
    labels = padded_labels(B, T, V, device, min_len=2)
    (fastce.causal_lm_loss(logits, labels, backend=backend) * 2.5).backward()
    _, ref_grad = _reference(logits, labels)
    assert_grad_close(logits.grad, ref_grad * 2.5)


@pytest.mark.parametrize("device, backend", backend_params())
def test_cross_entropy_reductions(device, backend):
    N, V = 9, 131
    logits = random_logits((N, V), torch.bfloat16, device).requires_grad_()
    target = torch.randint(0, V, (N,), device=device)
    target[::4] = -100
    weights = torch.rand(N, device=device) + 0.5
    for reduction in ("mean", "sum", "none"):
        logits.grad = None
        out = fastce.cross_entropy(logits, target, reduction=reduction, backend=backend)
        x = logits.detach().double().requires_grad_()
        ref = F.cross_entropy(x, target, reduction=reduction)
        if reduction == "none":
            assert out.shape == (N,) and out.dtype == torch.float32
            torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=1e-6)
            (out * weights).sum().backward()
            (ref * weights.double()).sum().backward()
        else:
            assert_loss_close(out, ref.detach())
            out.backward()
            ref.backward()
        assert_grad_close(logits.grad, x.grad, roundings=2 if reduction == "none" else 1)


@pytest.mark.parametrize("device, backend", backend_params())
def test_deterministic(device, backend):
    logits = random_logits((3, 17, 4099), torch.bfloat16, device).requires_grad_()
    labels = padded_labels(3, 17, 4099, device)
    results = []
    for _ in range(2):
        logits.grad = None
        loss = fastce.causal_lm_loss(logits, labels, backend=backend)
        loss.backward()
        results.append((loss.detach().clone(), logits.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((str(func), args, out))
        return out


def _big_float32_outputs(log, numel):
    found = []
    for name, _, out in log.calls:
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= numel:
                found.append(name)
    return found


@pytest.mark.parametrize("device, backend", backend_params())
def test_no_float32_copy_of_the_logits(device, backend):
    B, T, V = 4, 8, 1000
    logits = random_logits((B, T, V), torch.bfloat16, device).requires_grad_()
    labels = padded_labels(B, T, V, device)
    with _OpLog() as log:
        fastce.causal_lm_loss(logits, labels, backend=backend).backward()
    assert log.calls, "the dispatch log saw nothing: the check below would pass vacuously"
    assert not _big_float32_outputs(log, B * T * V // 2), "a float32 copy of (most of) the logits was made"


@pytest.mark.parametrize("device, backend", backend_params())
def test_no_grad_work_without_grad(device, backend, monkeypatch):
    """Whichever launch takes the call (the general one, or the eager CUDA path's one op), it is told to compute a
    gradient only when autograd will need one."""
    calls = []
    real, real_direct = ops.launch_fwd, ops.launch_causal_lm

    def spy(logits, targets, divisor, ignore_index, compute_grad, *args):
        calls.append(compute_grad)
        return real(logits, targets, divisor, ignore_index, compute_grad, *args)

    def spy_direct(logits, labels, shift, ignore_index, count, count_value, count_targets, compute_grad, *args):
        calls.append(compute_grad)
        return real_direct(logits, labels, shift, ignore_index, count, count_value, count_targets, compute_grad, *args)

    monkeypatch.setattr(ops, "launch_fwd", spy)
    monkeypatch.setattr(ops, "launch_causal_lm", spy_direct)
    logits = random_logits((2, 8, 100), torch.bfloat16, device).requires_grad_()
    labels = padded_labels(2, 8, 100, device)
    fastce.causal_lm_loss(logits, labels, backend=backend).backward()
    with torch.no_grad():
        assert not fastce.causal_lm_loss(logits, labels, backend=backend).requires_grad
    assert not fastce.causal_lm_loss(logits.detach(), labels, backend=backend).requires_grad
    assert calls == [True, False, False]


@pytest.mark.parametrize("device, backend", backend_params())
def test_backward_twice_raises(device, backend):
    logits = random_logits((1, 4, 11), torch.float32, device).requires_grad_()
    loss = fastce.causal_lm_loss(logits, torch.randint(0, 11, (1, 4), device=device), backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_per_row_losses_are_float32_even_for_bf16():
    logits = random_logits((2, 3, 40), torch.bfloat16, "cpu")
    target = torch.randint(0, 40, (2, 3))
    out = fastce.cross_entropy(logits, target, reduction="none")
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    torch.testing.assert_close(out.double(), cross_entropy_reference(logits, target), rtol=1e-6, atol=1e-6)
