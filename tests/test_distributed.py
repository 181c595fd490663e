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

import torch

import fastce
import fastce.distributed
from distributed_checks import (OPTION_SETS, V, WORLDS, Checks, _assert, _assert_rel, _backend, _bounds,
                                _check_stats, _count, _grad_close, _group, _linear_inputs, _outcome, _rel_err,
                                _reference_options, _same_on_every_rank, _shard_sizes, _shifted)
from distributed_helpers import scenario, scenario_tests
from fastce.reference import causal_lm_loss_reference, cross_entropy_reference, linear_logits_reference
from helpers import assert_loss_close, gradient_terms, padded_labels, random_logits


# --- the pytest side: one launch per world size, one test per scenario ----------------------------------------

pytest_generate_tests, test_scenario = scenario_tests(__name__, WORLDS, "world")


# --- causal_lm_loss and cross_entropy on logits shards ------------------------------------------------------------

# (shards, dtype, options, count): every option alone and all together with return_stats; bf16; a rank with one
# column; a rank with no column.
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
