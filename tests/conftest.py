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


def _spy_on(monkeypatch, module, name: str, count_position: int) -> list:
    """Replace ``module.name`` (a loss the transformers integration looks up at call time) by a wrapper that records
    the num_items_in_batch of each call (argument ``count_position``, or the keyword), proving that it ran and what
    it was given."""
    import functools

    real = getattr(module, name)
    calls = []

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        calls.append(args[count_position] if len(args) > count_position else kwargs.get("num_items_in_batch"))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.fixture
def spy(monkeypatch):
    """The calls of ``fastce.loss.causal_lm_loss`` (see ``_spy_on``)."""
    import fastce.loss

    return _spy_on(monkeypatch, fastce.loss, "causal_lm_loss", 3)


@pytest.fixture
def linear_spy(monkeypatch):
    """The calls of ``fastce.linear_loss.causal_lm_linear_loss``, the fused lm_head's loss (see ``_spy_on``)."""
    import fastce.linear_loss

    return _spy_on(monkeypatch, fastce.linear_loss, "causal_lm_linear_loss", 4)
