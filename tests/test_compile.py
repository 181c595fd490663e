"""torch.compile(fullgraph=True) traces through causal_lm_loss (custom ops, no graph break); opcheck on the ops."""
import pytest
import torch

import fastce
from fastce import ops

from helpers import assert_grad_close, assert_loss_close, backend_params, padded_labels, random_logits


def _train_step(logits, labels, num_items, backend, inplace=False):
    # logits * 1.0 stands in for the LM head: the loss gets a non-leaf, which in-place mode may overwrite.
    return fastce.causal_lm_loss(logits * 1.0, labels, num_items_in_batch=num_items, backend=backend,
                                 inplace_backward=inplace)


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "inplace"])
def test_compile_fullgraph_matches_eager(device, backend, inplace):
    torch._dynamo.reset()
    compiler = "inductor" if device == "cuda" else "aot_eager"  # inductor on the CPU would need minutes of C++ builds
    step = torch.compile(_train_step, fullgraph=True, backend=compiler, dynamic=False)
    B, T, V = 2, 9, 203
    labels = padded_labels(B, T, V, device, min_len=2)
    num_items = (labels[:, 1:] != -100).sum() + 1
    logits = random_logits((B, T, V), torch.bfloat16, device).requires_grad_()
    eager = logits.detach().clone().requires_grad_()
    loss = step(logits, labels, num_items, backend, inplace)
    loss.backward()
    ref = _train_step(eager, labels, num_items, backend)
    ref.backward()
    assert_loss_close(loss, ref.detach().double())
    assert_grad_close(logits.grad, eager.grad.double())


@pytest.mark.parametrize("device, backend", backend_params())
def test_opcheck(device, backend):
    logits = random_logits((2, 3, 37), torch.float32, device)
    targets = torch.randint(0, 37, (2, 3), device=device)
    divisor = torch.tensor(4.0, dtype=torch.float64, device=device)
    torch.library.opcheck(ops.cross_entropy_fwd, (logits, targets, divisor, -100, True, True, backend))
    torch.library.opcheck(ops.cross_entropy_fwd, (logits, targets, divisor, -100, False, True, backend))
    torch.library.opcheck(ops.cross_entropy_fwd_inplace, (logits.clone(), targets, divisor, -100, True, backend))
    torch.library.opcheck(ops.scale_grad_, (logits.clone(), torch.tensor(0.5, device=device), backend))


@pytest.mark.parametrize("device, backend", backend_params())
def test_opcheck_options_and_two_phase_ops(device, backend):
    from fastce import linear, shard_ops

    logits = random_logits((2, 3, 37), torch.float32, device)
    targets = torch.randint(0, 37, (2, 3), device=device)
    divisor = torch.tensor(4.0, dtype=torch.float64, device=device)
    options = (3.0, 0.1, 1e-3, True)  # softcap, label_smoothing, z_loss, stats
    torch.library.opcheck(ops.cross_entropy_fwd, (logits, targets, divisor, -100, True, True, backend, *options))
    torch.library.opcheck(ops.cross_entropy_fwd_inplace,
                          (logits.clone(), targets, divisor, -100, True, backend, *options))
    torch.library.opcheck(shard_ops.shard_stats, (logits[..., 5:20], targets, 5, -100, backend, *options))
    row = torch.rand(2, 3, 3, device=device) + 1
    torch.library.opcheck(shard_ops.shard_grad_, (logits[..., 5:20], targets, 5, 37, -100, row,
                                                  torch.empty_like(logits[..., 5:20]), backend, *options[:3]))
    h, w, b = torch.randn(6, 8, device=device), torch.randn(37, 8, device=device), torch.randn(37, device=device)
    flat = targets.view(-1)
    torch.library.opcheck(linear.linear_stats, (h, w, b, flat, -100, backend, *options))
    row = torch.rand(6, 3, device=device) + 1
    torch.library.opcheck(linear.linear_grads, (h, w, b, flat, row, -100, backend, True, True, True, *options[:3]))


def _linear_step(h, w, target, backend):
    return fastce.linear_cross_entropy(h * 1.0, w, target, backend=backend, softcap=5.0, z_loss=1e-3)


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("path", ["logits-options", "linear"])
def test_compile_fullgraph_options_and_linear(device, backend, path):
    torch._dynamo.reset()
    compiler = "inductor" if device == "cuda" else "aot_eager"
    if path == "linear":
        fn = _linear_step
        h = torch.randn(12, 16, device=device).requires_grad_()
        w = torch.randn(301, 16, device=device).requires_grad_()
        target = torch.randint(0, 301, (12,), device=device)
        target[3] = -100
        args = [h, w, target, backend]
        leaves = (h, w)
    else:
        def fn(logits, labels, backend):
            return fastce.causal_lm_loss(logits * 1.0, labels, backend=backend, softcap=4.0, label_smoothing=0.1,
                                         z_loss=1e-3)
        logits = random_logits((2, 9, 203), torch.bfloat16, device).requires_grad_()
        args = [logits, padded_labels(2, 9, 203, device, min_len=2), backend]
        leaves = (logits,)
    compiled = torch.compile(fn, fullgraph=True, backend=compiler, dynamic=False)
    loss = compiled(*args)
    loss.backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    ref = fn(*args)
    ref.backward()
    assert_loss_close(loss, ref.detach().double())
    for got, t in zip(grads, leaves):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-6)
