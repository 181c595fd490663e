"""k micro-batches with the step's num_items_in_batch equal one full batch; the mean of means does not."""
import pytest
import torch

import fastce

from helpers import assert_loss_close, backend_params, padded_labels, random_logits
from fastce.reference import causal_lm_loss_reference


def _uneven_batch(device, B=8, T=12, V=97):
    logits = random_logits((B, T, V), torch.float32, device)
    labels = padded_labels(B, T, V, device, min_len=2)
    labels[0, 3:] = -100  # one very short row, one full row: the micro-batches get very different counts
    labels[1] = torch.randint(0, V, (T,), device=device)
    return logits, labels


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("k", [2, 4, 8])
def test_micro_batches_equal_full_batch(device, backend, k):
    logits, labels = _uneven_batch(device)
    full = logits.clone().requires_grad_()
    full_loss = fastce.causal_lm_loss(full, labels, backend=backend)
    full_loss.backward()

    num_items = (labels[:, 1:] != -100).sum()  # what Trainer passes: the count over the whole step
    parts = logits.clone().requires_grad_()
    total = torch.zeros((), device=device)
    for chunk, chunk_labels in zip(parts.chunk(k), labels.chunk(k)):
        micro = fastce.causal_lm_loss(chunk, chunk_labels, num_items_in_batch=num_items, backend=backend)
        micro.backward()  # gradients accumulate into parts.grad
        total = total + micro.detach()

    ref = causal_lm_loss_reference(logits.double(), labels)
    assert_loss_close(full_loss, ref)
    assert_loss_close(total, ref)
    torch.testing.assert_close(parts.grad, full.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("device, backend", backend_params())
def test_mean_of_means_differs(device, backend):
    """The bug fastce exists to avoid: averaging per-micro-batch means weights short micro-batches' tokens more."""
    logits, labels = _uneven_batch(device)
    full_loss = fastce.causal_lm_loss(logits, labels, backend=backend)
    means = [fastce.causal_lm_loss(c, l, backend=backend) for c, l in zip(logits.chunk(4), labels.chunk(4))]
    mean_of_means = torch.stack(means).mean()
    assert abs(mean_of_means.item() - full_loss.item()) > 1e-3 * abs(full_loss.item())
