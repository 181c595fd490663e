import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable is read when a kernel
# is defined, so it must be set before fastce.kernels.triton_ce is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def spy(monkeypatch):
    """Records the num_items_in_batch of each call of ``fastce.loss.causal_lm_loss`` (the transformers integration
    looks it up at call time), proving that fastce computed a loss and what it was given."""
    import functools

    import fastce.loss

    real = fastce.loss.causal_lm_loss
    calls = []

    @functools.wraps(real)
    def causal_lm_loss(*args, **kwargs):
        calls.append(args[3] if len(args) > 3 else kwargs.get("num_items_in_batch"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fastce.loss, "causal_lm_loss", causal_lm_loss)
    return calls


@pytest.fixture
def linear_spy(monkeypatch):
    """Records the num_items_in_batch of each call of ``fastce.linear_loss.causal_lm_linear_loss`` (the fused
    lm_head's loss; the transformers integration looks it up at call time)."""
    import functools

    import fastce.linear_loss

    real = fastce.linear_loss.causal_lm_linear_loss
    calls = []

    @functools.wraps(real)
    def causal_lm_linear_loss(*args, **kwargs):
        calls.append(args[4] if len(args) > 4 else kwargs.get("num_items_in_batch"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fastce.linear_loss, "causal_lm_linear_loss", causal_lm_linear_loss)
    return calls
