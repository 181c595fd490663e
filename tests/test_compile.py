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
