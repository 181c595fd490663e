"""Backend availability and what "auto" picks."""
from types import SimpleNamespace

import pytest
import torch

import fastce
from fastce import backends


def _cuda_logits(rows, vocab):
    """Stands in for CUDA logits (only device, numel and shape are read), so the rule is testable without a GPU."""
    return SimpleNamespace(device=torch.device("cuda"), shape=(1, rows, vocab), numel=lambda: rows * vocab)


@pytest.mark.parametrize("available, rows, major, expected", [
    ({"cuda", "triton"}, 8192, 9, "cuda"),  # the cluster path: one read per row
    ({"cuda", "triton"}, 8192, 8, "triton"),  # no clusters before sm_90
    ({"cuda", "triton"}, 512, 8, "cuda"),  # few rows: less host time per launch
    ({"triton"}, 256, 9, "triton"),
    ({"cuda"}, 8192, 8, "cuda"),
    (set(), 8192, 9, "torch"),
])
def test_auto_rule(monkeypatch, available, rows, major, expected):
    monkeypatch.setattr(backends, "unavailable_reason", lambda name: None if name in available | {"torch"} else "no")
    monkeypatch.setattr(backends, "_has_clusters", lambda device: major >= 9)
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


def test_an_extension_older_than_the_package_is_reported_not_raised():
    """A fastce._C built from an older fastce lacks the newer ops: the CUDA backend is then unavailable with a reason
    that says to reinstall, instead of an AttributeError from every call that asks which backends run."""
    from fastce.kernels import cuda_ce

    with pytest.raises(RuntimeError, match="older fastce .*no fastce_cuda::no_such_op.*reinstall"):
        cuda_ce._bind("no_such_op")
