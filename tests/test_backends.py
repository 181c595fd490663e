"""Backend availability and what "auto" picks."""
from types import SimpleNamespace

import pytest
import torch

import fastce
from fastce import backends


def _cuda_logits(rows, vocab):
    """Stands in for CUDA logits (only device, numel and shape are read), so the rule is testable without a GPU."""
    return SimpleNamespace(device=torch.device("cuda"), shape=(1, rows, vocab), numel=lambda: rows * vocab)


@pytest.mark.parametrize("available, rows, expected", [
    ({"cuda", "triton"}, 8192, "triton"),
    ({"cuda", "triton"}, 512, "cuda"),
    ({"triton"}, 256, "triton"),
    ({"cuda"}, 8192, "cuda"),
    (set(), 8192, "torch"),
])
def test_auto_rule(monkeypatch, available, rows, expected):
    monkeypatch.setattr(backends, "unavailable_reason", lambda name: None if name in available | {"torch"} else "no")
    assert backends.resolve_backend("auto", _cuda_logits(rows, 128256)) == expected


def test_auto_on_cpu_is_torch():
    assert backends.resolve_backend("auto", torch.empty(2, 3, 5)) == "torch"


def test_torch_always_available_and_reasons_are_sentences():
    assert "torch" in fastce.available_backends()
    for name in backends.BACKENDS:
        reason = fastce.unavailable_reason(name)
        assert reason is None or (isinstance(reason, str) and len(reason) > 10)
    with pytest.raises(ValueError, match="unknown backend"):
        fastce.unavailable_reason("fast")
