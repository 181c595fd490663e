"""Backend availability and what "auto" picks."""
from types import SimpleNamespace

import pytest
import torch

import fastce
from fastce import backends


def _cuda_logits(rows, vocab, requires_grad=True):
    """Stands in for CUDA logits (only device, numel, shape and requires_grad are read), so the rule is testable
    without a GPU."""
    return SimpleNamespace(device=torch.device("cuda"), shape=(1, rows, vocab), numel=lambda: rows * vocab,
                           requires_grad=requires_grad)


@pytest.mark.parametrize("available, rows, grad, major, expected", [
    ({"cuda", "triton"}, 8192, True, 9, "cuda"),  # the cluster path: one read per row
    ({"cuda", "triton"}, 8192, False, 9, "triton"),  # forward only: Triton streams faster
    ({"cuda", "triton"}, 8192, True, 8, "triton"),  # no clusters before sm_90
    ({"cuda", "triton"}, 512, True, 8, "cuda"),  # few rows: less host time per launch
    ({"cuda", "triton"}, 512, False, 9, "cuda"),
    ({"triton"}, 256, True, 9, "triton"),
    ({"cuda"}, 8192, False, 8, "cuda"),
    (set(), 8192, True, 9, "torch"),
])
def test_auto_rule(monkeypatch, available, rows, grad, major, expected):
    monkeypatch.setattr(backends, "unavailable_reason", lambda name: None if name in available | {"torch"} else "no")
    monkeypatch.setattr(backends, "_has_clusters", lambda device: major >= 9)
    assert backends.resolve_backend("auto", _cuda_logits(rows, 128256, grad)) == expected


def test_auto_without_grad_mode(monkeypatch):
    """Under no_grad the loss needs no gradient, whatever requires_grad says."""
    monkeypatch.setattr(backends, "unavailable_reason", lambda name: None)
    monkeypatch.setattr(backends, "_has_clusters", lambda device: True)
    assert backends.resolve_backend("auto", _cuda_logits(8192, 128256)) == "cuda"
    with torch.no_grad():
        assert backends.resolve_backend("auto", _cuda_logits(8192, 128256)) == "triton"


def test_auto_on_cpu_is_torch():
    assert backends.resolve_backend("auto", torch.empty(2, 3, 5)) == "torch"


def test_torch_always_available_and_reasons_are_sentences():
    assert "torch" in fastce.available_backends()
    for name in backends.BACKENDS:
        reason = fastce.unavailable_reason(name)
        assert reason is None or (isinstance(reason, str) and len(reason) > 10)
    with pytest.raises(ValueError, match="unknown backend"):
        fastce.unavailable_reason("fast")
