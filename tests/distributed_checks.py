"""Worker-side checks shared by the distributed test modules (each runs inside the processes that
``distributed_helpers.launch`` starts): collecting failures until a scenario's last collective, shard bounds,
float64 comparisons, inputs."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from distributed_helpers import scenario_group
from fastce.reference import row_stats_reference
from helpers import assert_grad_close

WORLDS = (2, 3)
V = 1001  # odd: uneven shards over 2 and 3 ranks


class Checks:
    """Failures collected, raised together at the end of a scenario (after its last collective)."""

    def __init__(self):
        self.failures: list[str] = []

    def run(self, label: str, check, *args, **kwargs) -> None:
        try:
            check(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the other ranks must not be left waiting
            self.failures.append(f"{label}: {type(exc).__name__}: {exc}")

    def done(self) -> None:
        if self.failures:
            raise AssertionError(f"{len(self.failures)} check(s) failed:\n" + "\n".join(self.failures))


def _group():
    return scenario_group()


def _bounds(sizes, rank):
    return sum(sizes[:rank]), sum(sizes[:rank + 1])


def _shard_sizes(kind: str, world: int, vocab: int = V) -> list[int]:
    """Shard sizes of ``vocab`` over ``world`` ranks: ``even`` (torch.chunk's, as DTensor), ``one-column`` (ranks of a
    single column), ``empty`` (a rank with no column; logits only)."""
    if kind == "even":
        return [c.numel() for c in torch.arange(vocab).chunk(world)]
    if kind == "one-column":
        return [1, vocab - (world - 1)] + [1] * (world - 2)
    if kind == "empty":
        rest = _shard_sizes("even", world - 1, vocab)
        return rest[:1] + [0] + rest[1:]
    raise ValueError(kind)


def _shifted(labels, ignore_index=-100):
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _same_on_every_rank(checks: Checks, label: str, values: list[torch.Tensor]) -> None:
    """One all_gather: the float32 values of every rank must be bitwise equal."""
    mine = torch.cat([v.detach().float().reshape(-1) for v in values]) if values else torch.zeros(0)
    everyone = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(everyone, mine, group=_group())
    bits = [t.view(torch.int32) for t in everyone]
    checks.run(label, lambda: _assert(all(torch.equal(b, bits[0]) for b in bits), "values differ across ranks"))


def _assert(condition, message):
    assert condition, message


def _grad_close(actual, expected64, roundings=2, terms64=None):
    """``assert_grad_close`` that also takes the empty gradient of an empty shard."""
    assert actual.shape == expected64.shape, f"gradient shape {tuple(actual.shape)}, expected {tuple(expected64.shape)}"
    if actual.numel():
        assert_grad_close(actual, expected64, roundings, terms64)


def _reference_options(options):
    return {k: v for k, v in options.items() if k != "return_stats"}


def _check_stats(checks, label, out, logits, targets, divisor, options):
    """The ``LossOutput`` fields against float64: per-row lse, entropy, accuracy and the z-loss term."""
    lse, entropy, correct = row_stats_reference(logits, targets, softcap=options.get("softcap"))
    checks.run(f"{label} lse", torch.testing.assert_close, out.lse.double(), lse, rtol=1e-6, atol=1e-5)
    checks.run(f"{label} entropy", torch.testing.assert_close, out.entropy.double(), entropy, rtol=1e-5, atol=1e-5)
    checks.run(f"{label} accuracy", _assert, torch.equal(out.accuracy, correct), "accuracy differs")
    z_term = options.get("z_loss", 0.0) * lse.square().sum() / divisor
    checks.run(f"{label} z-loss term", torch.testing.assert_close, out.z_loss.double(), z_term, rtol=1e-6, atol=1e-9)


OPTION_SETS = {
    "plain": {},
    "softcap": {"softcap": 3.0},
    "smoothing": {"label_smoothing": 0.1},
    "z-loss": {"z_loss": 1e-3},
    "all+stats": {"softcap": 3.0, "label_smoothing": 0.15, "z_loss": 2e-3, "return_stats": True},
}


def _count(kind, labels):
    n = int((labels[..., 1:] != -100).sum()) + 3  # the count of a larger accumulation step
    return {None: None, "int": n, "tensor": torch.tensor(n)}[kind], n


def _backend():
    return os.environ.get("FASTCE_TEST_BACKEND", "torch")


def _rel_err(actual, expected):
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300))


def _assert_rel(actual, expected, bound):
    err = _rel_err(actual, expected)
    assert err <= bound, f"relative error {err:.3g} > {bound:.3g}"


def _linear_inputs(B, T, D, dtype, bias):
    h = torch.randn(B, T, D).to(dtype)
    w = (torch.randn(V, D) / D ** 0.5 * 3).to(dtype)
    b = (torch.randn(V) * 0.5).to(dtype) if bias else None
    return h, w, b


def _outcome(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc)
    return "ok", ""
