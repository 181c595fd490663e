"""The two-phase launchers of every backend (``shard_stats``, ``shard_grad``; contract in fastce/kernels/__init__.py):
the statistics of column ranges merged by fastce/stats.py, and the epilogue on each range, against float64."""
import pytest
import torch

from fastce import stats as fstats
from fastce.backends import kernels
from fastce.reference import cross_entropy_grad_reference, cross_entropy_reference, row_stats_reference
from fastce.spec import LossSpec

from helpers import assert_grad_close, backend_params, gradient_terms, random_logits

OPTIONS = {"plain": {}, "all": {"softcap": 3.0, "label_smoothing": 0.2, "z_loss": 0.01}}


def _ranges(vocab: int, cuts: list[int]) -> list[tuple[int, int]]:
    bounds = [0, *cuts, vocab]
    return list(zip(bounds[:-1], bounds[1:]))


def _targets(B, T, V, device, dtype=torch.int64):
    targets = torch.randint(0, V, (B, T), device=device, dtype=dtype)
    targets[0, 0] = -100  # ignored
    targets[-1, -1] = V + 2  # out of range of every shard: NaN loss, no one-hot
    return targets


# (B, T, V, cuts): one range; uneven ranges, one of them a single column; a range past Triton's single chunk.
CASES = {"one-range": (2, 3, 37, []), "uneven": (2, 5, 1001, [1, 400, 401]), "long": (1, 3, 20000, [3, 19000])}


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_stats_merge_to_the_whole_row(device, backend, dtype, case, option):
    B, T, V, cuts = CASES[case]
    options = OPTIONS[option]
    spec = LossSpec(options.get("softcap", 0.0), options.get("label_smoothing", 0.0), options.get("z_loss", 0.0),
                    stats=True)
    logits = random_logits((B, T, V), dtype, device)
    targets = _targets(B, T, V, device, torch.int32 if case == "uneven" else torch.int64)
    parts = []
    for lo, hi in _ranges(V, cuts):
        out = fstats.empty_stats((B, T), device)
        kernels(backend).shard_stats(logits[..., lo:hi], targets, lo, -100, out, spec)
        assert not out.isnan().any(), "an output was left unwritten"
        parts.append(out)
    merged = fstats.merge(torch.stack(parts))
    losses, row_stats = fstats.finish(merged, targets, V, -100, spec)
    expected = cross_entropy_reference(logits, targets, **options)
    torch.testing.assert_close(losses.double(), expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    lse, entropy, correct = row_stats_reference(logits, targets, softcap=options.get("softcap"))
    torch.testing.assert_close(row_stats[..., 0].double(), lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(row_stats[..., 1].double(), entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(row_stats[..., 2] != 0, correct)


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "inplace"])
def test_grad_of_each_range(device, backend, dtype, case, option, inplace):
    B, T, V, cuts = CASES[case]
    options = OPTIONS[option]
    spec = LossSpec(options.get("softcap", 0.0), options.get("label_smoothing", 0.0), options.get("z_loss", 0.0))
    logits = random_logits((B, T, V), dtype, device)
    targets = _targets(B, T, V, device)
    x = logits.double()
    x = x if "softcap" not in options else options["softcap"] * torch.tanh(x / options["softcap"])
    scale = torch.rand(B, T, device=device, dtype=torch.float64) + 0.5  # upstream gradient / divisor, per row
    row = torch.stack((x.amax(-1), torch.exp(x - x.amax(-1, keepdim=True)).sum(-1), scale), dim=-1).float()
    expected = cross_entropy_grad_reference(logits, targets, **options) * scale.unsqueeze(-1)
    terms = gradient_terms(logits, targets, **options) * scale.unsqueeze(-1)
    work = logits.clone()
    for lo, hi in _ranges(V, cuts):
        grad = work[..., lo:hi] if inplace else torch.full_like(logits[..., lo:hi], float("nan"))
        kernels(backend).shard_grad(work[..., lo:hi], targets, lo, V, -100, row.contiguous(), grad, spec)
        assert_grad_close(grad, expected[..., lo:hi], terms64=terms[..., lo:hi])
