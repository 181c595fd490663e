"""Vocab-parallel losses (``process_group=``, DTensor logits) on 2 and 3 CPU processes with gloo, every rank against
the unsharded float64 reference: the loss (bitwise the same on every rank), each rank's slice of the logits' or
weight's gradient, the hidden states' complete gradient; uneven shards (a rank with one column, an empty logits
shard), every option, every reduction; the same error on every rank for input that does not fit together; and
the number and size of the collectives.

Each world size is one launch of processes running every scenario below (``distributed_helpers``); the tests only
read their results. Scenarios assert after their last collective (``Checks``), so a failed check never leaves
another rank waiting.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fastce
import fastce.distributed
from distributed_helpers import launch, scenario, scenario_group, scenario_names
from fastce.reference import (causal_lm_loss_reference, cross_entropy_reference, linear_logits_reference,
                              row_stats_reference)
from helpers import assert_grad_close, assert_loss_close, gradient_terms, padded_labels, random_logits

WORLDS = (2, 3)
V = 1001  # odd: uneven shards over 2 and 3 ranks


# --- the pytest side: one launch per world size, one test per scenario ----------------------------------------

_RESULTS: dict = {}


def _results(world: int, tmp_path_factory) -> dict:
    if world not in _RESULTS:
        _RESULTS[world] = launch(__name__, world, tmp_path_factory.mktemp(f"world{world}"))
    return _RESULTS[world]


def pytest_generate_tests(metafunc):  # after the module (and so every scenario below) is loaded
    if metafunc.function is test_scenario:
        metafunc.parametrize("world, name", [pytest.param(world, name, id=f"{name}-world{world}")
                                             for world in WORLDS for name in scenario_names(__name__, world)])


def test_scenario(world, name, tmp_path_factory):
    failure = _results(world, tmp_path_factory)[name]
    assert failure is None, failure


# --- worker-side utilities ------------------------------------------------------------------------------------

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


# --- causal_lm_loss and cross_entropy on logits shards ------------------------------------------------------------

# (shards, dtype, options, count): every option alone and all together with return_stats; bf16; a rank with one
# column; a rank with no column.
OPTION_SETS = {
    "plain": {},
    "softcap": {"softcap": 3.0},
    "smoothing": {"label_smoothing": 0.1},
    "z-loss": {"z_loss": 1e-3},
    "all+stats": {"softcap": 3.0, "label_smoothing": 0.15, "z_loss": 2e-3, "return_stats": True},
}
CAUSAL_CASES = [
    ("even", torch.float32, "plain", None),
    ("even", torch.float32, "softcap", "tensor"),
    ("one-column", torch.float32, "smoothing", "int"),
    ("empty", torch.float32, "z-loss", None),
    ("even", torch.float32, "all+stats", "tensor"),
    ("one-column", torch.float32, "all+stats", None),
    ("even", torch.bfloat16, "all+stats", "int"),
    ("empty", torch.bfloat16, "plain", None),
]


def _count(kind, labels):
    n = int((labels[..., 1:] != -100).sum()) + 3  # the count of a larger accumulation step
    return {None: None, "int": n, "tensor": torch.tensor(n)}[kind], n


def _backend():
    return os.environ.get("FASTCE_TEST_BACKEND", "torch")


@scenario(worlds=WORLDS)
def causal_lm_loss_matches_float64(rank, world):
    checks, fingerprints = Checks(), []
    for index, (kind, dtype, option, count_kind) in enumerate(CAUSAL_CASES):
        label = f"case {index} ({kind}, {dtype}, {option}, count {count_kind})"
        options = OPTION_SETS[option]
        B, T = 3, 7
        sizes = _shard_sizes(kind, world)
        lo, hi = _bounds(sizes, rank)
        full = random_logits((B, T, V), dtype, "cpu")
        labels = padded_labels(B, T, V, "cpu")
        count, n = _count(count_kind, labels)
        local = full[..., lo:hi].clone().requires_grad_()
        out = fastce.causal_lm_loss(local, labels, V, count, process_group=_group(), backend=_backend(), **options)
        loss = out.loss if options.get("return_stats") else out
        loss.backward()
        fingerprints.append(loss)
        ref_logits = full.double().requires_grad_()
        ref = causal_lm_loss_reference(ref_logits, labels, count, **_reference_options(options))
        ref.backward()
        targets = _shifted(labels)
        divisor = n if count is not None else int((targets != -100).sum())
        checks.run(f"{label} loss", assert_loss_close, loss, ref.detach())
        checks.run(f"{label} grad", _assert, local.grad.dtype == dtype, "gradient dtype")
        terms = gradient_terms(full, targets, divisor, **_reference_options(options))[..., lo:hi]
        checks.run(f"{label} grad", _grad_close, local.grad, ref_logits.grad[..., lo:hi], 2, terms)
        if options.get("return_stats"):
            _check_stats(checks, label, out, full, targets, divisor, options)
            fingerprints += [out.lse, out.entropy, out.z_loss]
    # shift_labels (already aligned; labels unused)
    lo, hi = _bounds(_shard_sizes("even", world), rank)
    full = random_logits((2, 5, V), torch.float32, "cpu")
    labels = padded_labels(2, 5, V, "cpu")
    local = full[..., lo:hi].clone().requires_grad_()
    loss = fastce.causal_lm_loss(local, None, shift_labels=_shifted(labels), process_group=_group(),
                                 backend=_backend())
    loss.backward()
    ref_logits = full.double().requires_grad_()
    ref = causal_lm_loss_reference(ref_logits, labels)
    ref.backward()
    checks.run("shift_labels loss", assert_loss_close, loss, ref.detach())
    checks.run("shift_labels grad", _grad_close, local.grad, ref_logits.grad[..., lo:hi])
    fingerprints.append(loss)
    _same_on_every_rank(checks, "loss and statistics bitwise equal on every rank", fingerprints)
    checks.done()


@scenario(worlds=WORLDS)
def cross_entropy_every_reduction(rank, world):
    checks, fingerprints = Checks(), []
    for reduction in ("mean", "sum", "none"):
        for option in ("plain", "all+stats"):
            for shape in ((13,), (2, 5)):  # [N, Vs] and [B, T, Vs] logits
                label = f"{reduction}, {option}, rows {shape}"
                options = OPTION_SETS[option]
                sizes = _shard_sizes("even", world)
                lo, hi = _bounds(sizes, rank)
                full = random_logits((*shape, V), torch.float32, "cpu")
                target = torch.randint(0, V, shape)
                target.view(-1)[::4] = -100
                local = full[..., lo:hi].clone().requires_grad_()
                out = fastce.cross_entropy(local, target, reduction=reduction, process_group=_group(),
                                           backend=_backend(), **options)
                result = out.loss if options.get("return_stats") else out
                upstream = torch.rand(shape) + 0.5 if reduction == "none" else torch.tensor(1.0)
                (result * upstream).sum().backward()
                fingerprints.append(result)
                ref_logits = full.double().requires_grad_()
                rows = cross_entropy_reference(ref_logits, target, **_reference_options(options))
                n = int((target != -100).sum())
                ref = {"mean": rows.sum() / n, "sum": rows.sum(), "none": rows}[reduction]
                (ref * upstream.double()).sum().backward()
                checks.run(f"{label} shape", _assert, result.shape == ref.shape, f"{result.shape} vs {ref.shape}")
                checks.run(f"{label} loss", torch.testing.assert_close, result.double(), ref.detach(), rtol=1e-6,
                           atol=1e-6)
                divisor = n if reduction == "mean" else 1
                weights = upstream.double().unsqueeze(-1) if reduction == "none" else 1.0
                terms = (gradient_terms(full, target, divisor, **_reference_options(options)) * weights)[..., lo:hi]
                checks.run(f"{label} grad", _grad_close, local.grad, ref_logits.grad[..., lo:hi], 2, terms)
                if options.get("return_stats") and reduction != "none":
                    _check_stats(checks, label, out, full, target, divisor, options)
    _same_on_every_rank(checks, "losses bitwise equal on every rank", fingerprints)
    checks.done()


@scenario(worlds=WORLDS)
def ignored_rows_and_targets_in_one_shard(rank, world):
    """Every target ignored (loss 0, gradient 0, count 0); every target in the last rank's shard (the others hold no
    target logit); a row whose target is the first id of a shard."""
    checks = Checks()
    sizes = _shard_sizes("even", world)
    lo, hi = _bounds(sizes, rank)
    full = random_logits((2, 6, V), torch.float32, "cpu")
    for label, labels, count in (
        ("all ignored", torch.full((2, 6), -100), None),
        ("all ignored, count 0", torch.full((2, 6), -100), 0),
        ("targets in the last shard", torch.randint(V - sizes[-1], V, (2, 6)), None),
        ("shard boundaries", torch.tensor([_bounds(sizes, r)[0] for r in range(world)] * 12)[:12].view(2, 6), None),
    ):
        local = full[..., lo:hi].clone().requires_grad_()
        loss = fastce.causal_lm_loss(local, labels, V, count, process_group=_group(), backend=_backend())
        loss.backward()
        ref_logits = full.double().requires_grad_()
        ref = causal_lm_loss_reference(ref_logits, labels, count)
        ref.backward()
        checks.run(f"{label} loss", assert_loss_close, loss, ref.detach())
        checks.run(f"{label} grad", _grad_close, local.grad, ref_logits.grad[..., lo:hi], 2)
    checks.done()


# --- the fused lm_head over weight shards ---------------------------------------------------------------------

LINEAR_CASES = [  # (shards, dtype, options, bias)
    ("even", torch.float32, "plain", True),
    ("one-column", torch.float32, "all+stats", True),
    ("even", torch.float32, "softcap", False),
    ("even", torch.bfloat16, "all+stats", True),
]


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


@scenario(worlds=WORLDS)
def causal_lm_linear_loss_matches_float64(rank, world):
    checks, fingerprints = Checks(), []
    for index, (kind, dtype, option, has_bias) in enumerate(LINEAR_CASES):
        label = f"case {index} ({kind}, {dtype}, {option}, bias {has_bias})"
        options = OPTION_SETS[option]
        B, T, D = 2, 7, 16
        sizes = _shard_sizes(kind, world)
        lo, hi = _bounds(sizes, rank)
        h, w, b = _linear_inputs(B, T, D, dtype, has_bias)
        labels = padded_labels(B, T, V, "cpu")
        count, n = _count("tensor", labels)
        h_local = h.clone().requires_grad_()
        w_local = w[lo:hi].clone().requires_grad_()
        b_local = b[lo:hi].clone().requires_grad_() if has_bias else None
        out = fastce.causal_lm_linear_loss(h_local, w_local, labels, V, count, bias=b_local, process_group=_group(),
                                           backend=_backend(), **options)
        loss = out.loss if options.get("return_stats") else out
        loss.backward()
        fingerprints += [loss, h_local.grad]
        leaves = [t.double().requires_grad_() if t is not None else None for t in (h, w, b)]
        logits64 = linear_logits_reference(*leaves)
        ref = causal_lm_loss_reference(logits64, labels, count, **_reference_options(options))
        ref.backward()
        checks.run(f"{label} loss", assert_loss_close, loss, ref.detach(), 1e-6 if dtype == torch.float32 else 1e-5)
        bound = 2e-5 if dtype == torch.float32 else 1e-2  # float32: GEMM round-off; bf16: one rounding of each
        checks.run(f"{label} grad input (complete)", _assert_rel, h_local.grad, leaves[0].grad, bound)
        checks.run(f"{label} grad weight (slice)", _assert_rel, w_local.grad, leaves[1].grad[lo:hi], bound)
        if has_bias:
            checks.run(f"{label} grad bias (slice)", _assert_rel, b_local.grad, leaves[2].grad[lo:hi], bound)
        if options.get("return_stats"):
            _check_stats(checks, label, out, logits64.detach(), _shifted(labels), n, options)
    _same_on_every_rank(checks, "losses and grad_input bitwise equal on every rank", fingerprints)
    checks.done()


@scenario(worlds=WORLDS)
def linear_cross_entropy_every_reduction(rank, world):
    checks = Checks()
    sizes = _shard_sizes("even", world)
    lo, hi = _bounds(sizes, rank)
    for reduction in ("mean", "sum", "none"):
        for validate in (True, False):  # False: ignored rows go through the GEMMs
            label = f"{reduction}, validate={validate}"
            h, w, b = _linear_inputs(1, 11, 12, torch.float32, True)
            h = h[0]
            target = torch.randint(0, V, (11,))
            target[::3] = -100
            h_local, w_local, b_local = (t.clone().requires_grad_() for t in (h, w[lo:hi], b[lo:hi]))
            out = fastce.linear_cross_entropy(h_local, w_local, target, b_local, reduction=reduction,
                                              process_group=_group(), backend=_backend(), validate=validate,
                                              label_smoothing=0.1)
            upstream = torch.rand(11) + 0.5 if reduction == "none" else torch.tensor(1.0)
            (out * upstream).sum().backward()
            leaves = [t.double().requires_grad_() for t in (h, w, b)]
            rows = cross_entropy_reference(linear_logits_reference(*leaves), target, label_smoothing=0.1)
            ref = {"mean": rows.sum() / int((target != -100).sum()), "sum": rows.sum(), "none": rows}[reduction]
            (ref * upstream.double()).sum().backward()
            checks.run(f"{label} loss", torch.testing.assert_close, out.double(), ref.detach(), rtol=1e-6, atol=1e-6)
            checks.run(f"{label} grad input", _assert_rel, h_local.grad, leaves[0].grad, 2e-5)
            checks.run(f"{label} grad weight", _assert_rel, w_local.grad, leaves[1].grad[lo:hi], 2e-5)
            checks.run(f"{label} grad bias", _assert_rel, b_local.grad, leaves[2].grad[lo:hi], 2e-5)
    # reduce_input_grad=False (a framework all-reduces the hidden states' gradient itself): each rank gets its
    # shard's part; their sum is the gradient.
    from fastce.spec import make_spec

    h, w, _ = _linear_inputs(2, 5, 12, torch.float32, False)
    target = torch.randint(0, V, (2, 5))
    h_local, w_local = h.clone().requires_grad_(), w[lo:hi].clone().requires_grad_()
    loss = fastce.distributed.linear_cross_entropy(h_local, w_local, target, process_group=_group(),
                                                   spec=make_spec(z_loss=1e-3), reduce_input_grad=False)
    loss.backward()
    partial = h_local.grad.clone()
    torch.distributed.all_reduce(h_local.grad, group=_group())
    leaves = [t.double().requires_grad_() for t in (h, w)]
    cross_entropy_reference(linear_logits_reference(*leaves), target, z_loss=1e-3).mean().backward()
    checks.run("reduce_input_grad=False: the sum of the parts", _assert_rel, h_local.grad, leaves[0].grad, 2e-5)
    checks.run("reduce_input_grad=False: a part", _assert, _rel_err(partial, leaves[0].grad) > 1e-3,
               "a rank's partial gradient equals the whole one")
    checks.done()


# --- DTensor logits -----------------------------------------------------------------------------------------------

@scenario(worlds=WORLDS)
def dtensor_logits(rank, world):
    """``fastce.causal_lm_loss`` / ``cross_entropy`` of DTensor logits sharded on the vocabulary, without a
    process_group; gradients reach the DTensor; and a ``ColwiseParallel`` lm_head's DTensor output (loss_parallel's
    input) trains its weight shards and the hidden states."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    checks = Checks()
    mesh = init_device_mesh("cpu", (world,))
    sizes = _shard_sizes("even", world)  # DTensor's uneven sharding is torch.chunk's
    lo, hi = _bounds(sizes, rank)
    for placement in (Shard(2), Shard(-1)):
        full = random_logits((2, 6, V), torch.float32, "cpu")
        labels = padded_labels(2, 6, V, "cpu")
        logits = distribute_tensor(full, mesh, [placement]).requires_grad_()
        loss = fastce.causal_lm_loss(logits, labels, V, z_loss=1e-3)
        loss.backward()
        ref_logits = full.double().requires_grad_()
        ref = causal_lm_loss_reference(ref_logits, labels, z_loss=1e-3)
        ref.backward()
        checks.run(f"{placement} loss", assert_loss_close, loss, ref.detach())
        checks.run(f"{placement} grad is a DTensor", _assert, type(logits.grad).__name__ == "DTensor",
                   type(logits.grad).__name__)
        # torch 2.11 hands an unevenly sharded DTensor leaf its gradient replicated (2.14: sharded); both are the
        # same DTensor, so compare the whole of it.
        checks.run(f"{placement} grad", _grad_close, logits.grad.full_tensor(), ref_logits.grad, 2)
    # cross_entropy of [N, V] DTensor logits, per-row losses
    full = random_logits((9, V), torch.float32, "cpu")
    target = torch.randint(0, V, (9,))
    logits = distribute_tensor(full, mesh, [Shard(1)]).requires_grad_()
    rows = fastce.cross_entropy(logits, target, reduction="none")
    rows.sum().backward()
    ref_logits = full.double().requires_grad_()
    ref_rows = cross_entropy_reference(ref_logits, target)
    ref_rows.sum().backward()
    checks.run("cross_entropy rows", torch.testing.assert_close, rows.double(), ref_rows.detach(), rtol=1e-6, atol=1e-6)
    checks.run("cross_entropy grad", _grad_close, logits.grad.full_tensor(), ref_logits.grad, 2)
    # A ColwiseParallel lm_head with DTensor output, as torchtitan feeds loss_parallel.
    D = 16
    head = torch.nn.Linear(D, V, bias=False)
    weight = (torch.randn(V, D) / D ** 0.5 * 3)
    with torch.no_grad():
        head.weight.copy_(weight)
    parallelize_module(head, mesh, ColwiseParallel(output_layouts=Shard(-1), use_local_output=False))
    hidden = torch.randn(2, 6, D)
    labels = padded_labels(2, 6, V, "cpu")
    h = hidden.clone().requires_grad_()
    loss = fastce.causal_lm_loss(head(h), labels, V)
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = causal_lm_loss_reference(linear_logits_reference(h64, w64), labels)
    ref.backward()
    checks.run("lm_head loss", assert_loss_close, loss, ref.detach())
    checks.run("lm_head grad weight (shard)", _assert_rel, head.weight.grad.to_local(), w64.grad[lo:hi], 2e-5)
    checks.run("lm_head grad hidden", _assert_rel, h.grad, h64.grad, 2e-5)
    # A replicated DTensor is not vocab-parallel: refused on every rank alike.
    replicated = distribute_tensor(full, mesh, [Replicate()])
    outcome = _outcome(lambda: fastce.cross_entropy(replicated, target))
    checks.run("replicated refused", _assert, outcome[0] == "ValueError" and "Shard(-1)" in outcome[1], outcome)
    checks.done()


# --- errors: the same on every rank, no rank left waiting --------------------------------------------------------

def _outcome(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc)
    return "ok", ""


def _error_cases(rank, world):
    """(name, call, expected exception type, words the message must hold): each call is made on every rank, with
    inputs that differ on one rank."""
    g, last = _group(), world - 1
    sizes = _shard_sizes("even", world)
    lo, hi = _bounds(sizes, rank)
    full = random_logits((2, 5, V), torch.float32, "cpu")
    local = full[..., lo:hi]
    labels = padded_labels(2, 5, V, "cpu")
    h, w, b = _linear_inputs(2, 5, 8, torch.float32, True)
    w_local = w[lo:hi]

    def causal(logits=local, labels=labels, vocab=V, count=None, **kw):
        return lambda: fastce.causal_lm_loss(logits, labels, vocab, count, process_group=g, **kw)

    bad_label = labels.clone()
    bad_label[0, 2] = V
    other_labels = labels.clone()
    other_labels[1, 1] = (int(labels[1, 1]) + 1) % V
    longer = random_logits((2, 6, V), torch.float32, "cpu")[..., lo:hi]
    return [
        ("shards do not add up to vocab_size", causal(vocab=V + 1), "ValueError", ["vocab_size=1002", "1001"]),
        ("label shapes differ", causal(logits=longer if rank == last else local,
                                       labels=padded_labels(2, 6, V, "cpu") if rank == last else labels),
         "ValueError", ["shapes differ"]),
        ("a bad label on every rank", causal(labels=bad_label), "ValueError", [f"target {V}", "outside"]),
        ("a bad label on one rank", causal(labels=bad_label if rank == last else labels), "ValueError",
         [f"target {V} (rank {last})"]),
        ("labels differ", causal(labels=other_labels if rank == 0 else labels), "ValueError", ["targets differ"]),
        ("a non-tensor logits on one rank", causal(logits=local.tolist() if rank == last else local), "TypeError",
         [f"rank {last} of {world}", "list"]),
        ("float labels on one rank", causal(labels=labels.float() if rank == last else labels), "TypeError",
         [f"rank {last} of {world}", "integer"]),
        ("a bad count on one rank", causal(count=-1 if rank == last else 7), "ValueError",
         [f"rank {last} of {world}", "num_items_in_batch"]),
        ("counts differ", causal(count=torch.tensor(7 + rank)), "ValueError", ["num_items_in_batch differs"]),
        ("a negative count tensor", causal(count=torch.tensor(-3)), "ValueError", ["num_items_in_batch"]),
        ("options differ", causal(z_loss=1e-3 * rank), "ValueError", ["options"]),
        ("cross_entropy: non-tensor target on one rank",
         lambda: fastce.cross_entropy(local, None if rank == last else labels, process_group=g), "TypeError",
         [f"rank {last} of {world}"]),
        ("linear: hidden sizes differ",
         lambda: fastce.linear_cross_entropy(h[..., :7] if rank == last else h, w_local[:, :7] if rank == last
                                             else w_local, labels, process_group=g), "ValueError", ["hidden"]),
        ("linear: the input needs a gradient on one rank only",
         lambda: fastce.linear_cross_entropy(h.clone().requires_grad_(rank == last), w_local.clone().requires_grad_(),
                                             labels, process_group=g), "ValueError", ["gradient on some ranks"]),
        ("linear: a bad label on one rank",
         lambda: fastce.causal_lm_linear_loss(h, w_local, bad_label if rank == last else labels, V, bias=b[lo:hi],
                                              process_group=g), "ValueError", [f"target {V} (rank {last})"]),
        # The API layer checks the fused op's arguments before it reaches fastce.distributed, so a non-tensor weight
        # on one rank is tested on the module's function (see the report on issue 10).
        ("linear: a non-tensor weight on one rank",
         lambda: fastce.distributed.linear_cross_entropy(h, "weight" if rank == last else w_local, labels,
                                                         process_group=g), "TypeError", [f"rank {last} of {world}"]),
    ]


@scenario(worlds=WORLDS)
def bad_input_raises_the_same_error_on_every_rank(rank, world):
    import fastce.distributed  # noqa: F401

    checks = Checks()
    outcomes = [(name, _outcome(call), kind, words) for name, call, kind, words in _error_cases(rank, world)]
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, [o for _, o, _, _ in outcomes], group=_group())
    for index, (name, (kind, message), expected, words) in enumerate(outcomes):
        checks.run(name, _assert, all(e[index] == (kind, message) for e in everyone),
                   f"ranks differ: {[e[index] for e in everyone]}")
        checks.run(name, _assert, kind == expected and all(w in message for w in words),
                   f"got {kind}: {message!r}; expected {expected} with {words}")
    # After all that, the group still works: a good call (the cases drew random numbers on one rank only).
    torch.manual_seed(1)
    sizes = _shard_sizes("even", world)
    lo, hi = _bounds(sizes, rank)
    full = random_logits((2, 5, V), torch.float32, "cpu")
    labels = padded_labels(2, 5, V, "cpu")
    loss = fastce.causal_lm_loss(full[..., lo:hi], labels, V, process_group=_group())
    checks.run("a good call afterwards", assert_loss_close, loss, causal_lm_loss_reference(full.double(), labels))
    checks.done()


@scenario(worlds=WORLDS)
def validate_false_bad_target_is_nan(rank, world):
    """``validate=False``: a target outside [0, V) is not raised; its row's loss is NaN on every rank."""
    checks = Checks()
    sizes = _shard_sizes("even", world)
    lo, hi = _bounds(sizes, rank)
    full = random_logits((2, 5, V), torch.float32, "cpu")
    target = torch.randint(0, V, (2, 5))
    target[1, 3] = V + 5
    rows = fastce.cross_entropy(full[..., lo:hi], target, reduction="none", process_group=_group(), validate=False)
    expected = cross_entropy_reference(full.double(), target)
    checks.run("NaN row", torch.testing.assert_close, rows.double(), expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    checks.run("NaN row", _assert, bool(rows[1, 3].isnan()), "the bad row's loss is not NaN")
    checks.done()


# --- communication: a constant number of collectives, each O(N); no host read on the hot path ------------------

@scenario(worlds=WORLDS)
def collectives_per_call(rank, world):
    import fastce.distributed_meta as meta

    dist = torch.distributed
    calls: list = []
    names = ("all_gather_single", "all_gather_into_tensor", "all_reduce", "all_gather", "broadcast", "reduce_scatter")
    real = {name: getattr(dist, name) for name in names if hasattr(dist, name)}  # all_gather_single: torch >= 2.14
    depth = [0]

    def spy(name):
        def wrapper(tensor, *args, **kwargs):
            if depth[0] == 0:  # the outermost call only (one API may call another)
                gathered = name in ("all_gather_single", "all_gather_into_tensor")
                sent = args[0] if gathered else tensor  # (output, input): what one rank sends
                calls.append(("all_gather" if gathered else name, sent.numel(), sent.dtype))
            depth[0] += 1
            try:
                return real[name](tensor, *args, **kwargs)
            finally:
                depth[0] -= 1
        return wrapper

    # Host reads of tensors (what makes the host wait for the device): none on the hot path.
    host_reads = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "nonzero")}

    def read(name):
        def wrapper(self, *args, **kwargs):
            calls.append(("host read", name))
            return host_reads[name](self, *args, **kwargs)
        return wrapper

    checks = Checks()
    meta_size = len(meta.Facts().to_list())
    sizes = [3 + r for r in range(world)]  # a group and shard sizes no other scenario cached
    vocab = sum(sizes)
    lo, hi = _bounds(sizes, rank)
    B, T, D = 2, 5, 4
    rows = B * T
    full = random_logits((B, T, vocab), torch.float32, "cpu")
    labels = torch.randint(0, vocab, (B, T))
    h, w = torch.randn(B, T, D), torch.randn(vocab, D)
    group = dist.new_group(list(range(world)))
    try:
        for name in real:
            setattr(dist, name, spy(name))
        for name in host_reads:
            setattr(torch.Tensor, name, read(name))
        observed = {}
        for label, validate in (("first, validate=False", False), ("validate=True", True),
                                ("again, validate=False", False)):
            calls.clear()
            local = full[..., lo:hi].clone().requires_grad_()
            loss = fastce.causal_lm_loss(local, labels, process_group=group, validate=validate)
            forward = list(calls)
            calls.clear()
            loss.backward()
            observed[f"logits, {label}"] = (forward, list(calls))
        calls.clear()
        h_local, w_local = h.clone().requires_grad_(), w[lo:hi].clone().requires_grad_()
        loss = fastce.causal_lm_linear_loss(h_local, w_local, labels, process_group=group, validate=False)
        forward = list(calls)
        calls.clear()
        loss.backward()
        observed["linear, validate=False"] = (forward, list(calls))
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
        for name, fn in host_reads.items():
            setattr(torch.Tensor, name, fn)
    gather_meta = ("all_gather", meta_size, torch.int64)
    metadata_read = ("host read", "tolist")  # the gathered metadata: validate=True's one host synchronisation
    expected = {
        "logits, first, validate=False": ([gather_meta, metadata_read,
                                           ("all_gather", rows * 5, torch.float32)], []),
        "logits, validate=True": ([gather_meta, metadata_read, ("all_gather", rows * 5, torch.float32)],
                                  []),
        "logits, again, validate=False": ([("all_gather", rows * 5, torch.float32)], []),
        # Offsets cached by the calls above (the same group and shard sizes): no metadata. validate=False: every
        # row goes through the GEMMs (no host read of the ignored ones).
        "linear, validate=False": ([("all_gather", rows * 5, torch.float32)],
                                   [("all_reduce", rows * D, torch.float32)]),
    }
    for label, value in expected.items():
        checks.run(label, _assert, observed.get(label) == value, f"collectives {observed.get(label)}, expected {value}")
    checks.done()


@scenario(worlds=(2,))
def losses_do_not_keep_the_group_alive(rank, world):
    """A loss and its autograd graph hold the process group weakly: a group kept alive past destroy_process_group
    until interpreter exit can abort the process there (gloo: "terminate called without an active exception")."""
    import gc
    import weakref

    group = torch.distributed.new_group(list(range(world)))
    lo, hi = _bounds(_shard_sizes("even", world), rank)
    full = random_logits((2, 5, V), torch.float32, "cpu")
    labels = padded_labels(2, 5, V, "cpu")
    local = full[..., lo:hi].clone().requires_grad_()
    kept = [fastce.causal_lm_loss(local, labels, V, process_group=group)]
    h, w, _ = _linear_inputs(2, 5, 8, torch.float32, False)
    kept.append(fastce.causal_lm_linear_loss(h.requires_grad_(), w[lo:hi].clone().requires_grad_(), labels, V,
                                             process_group=group))
    kept[0].backward()  # the linear loss keeps its graph, never run
    reference = weakref.ref(group)
    torch.distributed.destroy_process_group(group)
    del group
    gc.collect()
    assert reference() is None, "the group is still alive after destroy_process_group and del"
    assert len(kept) == 2


# --- Triton (interpreted on the CPU) ------------------------------------------------------------------------------

@scenario(worlds=(2,))
def triton_backend(rank, world):
    """The same checks on the Triton kernels' shard launchers, in Triton's interpreter, on a few cases."""
    if "triton" not in fastce.available_backends():
        raise AssertionError(f"triton is unavailable here: {fastce.unavailable_reason('triton')}")
    checks = Checks()
    sizes = _shard_sizes("one-column", world)
    lo, hi = _bounds(sizes, rank)
    for option in ("plain", "all+stats"):
        options = OPTION_SETS[option]
        full = random_logits((2, 4, V), torch.float32, "cpu")
        labels = padded_labels(2, 4, V, "cpu")
        local = full[..., lo:hi].clone().requires_grad_()
        out = fastce.causal_lm_loss(local, labels, V, process_group=_group(), backend="triton", **options)
        loss = out.loss if options.get("return_stats") else out
        loss.backward()
        ref_logits = full.double().requires_grad_()
        ref = causal_lm_loss_reference(ref_logits, labels, **_reference_options(options))
        ref.backward()
        targets = _shifted(labels)
        terms = gradient_terms(full, targets, int((targets != -100).sum()), **_reference_options(options))
        checks.run(f"{option} loss", assert_loss_close, loss, ref.detach())
        checks.run(f"{option} grad", _grad_close, local.grad, ref_logits.grad[..., lo:hi], 2, terms[..., lo:hi])
    h, w, b = _linear_inputs(2, 4, 16, torch.float32, True)
    labels = padded_labels(2, 4, V, "cpu")
    h_local, w_local, b_local = (t.clone().requires_grad_() for t in (h, w[lo:hi], b[lo:hi]))
    loss = fastce.causal_lm_linear_loss(h_local, w_local, labels, V, bias=b_local, process_group=_group(),
                                        backend="triton", label_smoothing=0.1)
    loss.backward()
    leaves = [t.double().requires_grad_() for t in (h, w, b)]
    ref = causal_lm_loss_reference(linear_logits_reference(*leaves), labels, label_smoothing=0.1)
    ref.backward()
    checks.run("linear loss", assert_loss_close, loss, ref.detach())
    checks.run("linear grad input", _assert_rel, h_local.grad, leaves[0].grad, 2e-5)
    checks.run("linear grad weight", _assert_rel, w_local.grad, leaves[1].grad[lo:hi], 2e-5)
    checks.done()
