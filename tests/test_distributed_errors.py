"""Vocab-parallel losses on 2 and 3 CPU processes with gloo, continued (``test_distributed.py`` has the losses and
gradients): the same error on every rank for input that does not fit together, with no rank left waiting; the
number and size of the collectives and no host read on the hot path; a loss does not keep its group alive; the
Triton backend (interpreted on the CPU).

Each world size is one launch of processes running every scenario below (``distributed_helpers``); the tests only
read their results.
"""
from __future__ import annotations

import torch

import fastce
import fastce.distributed
from distributed_checks import (OPTION_SETS, V, WORLDS, Checks, _assert, _assert_rel, _bounds, _grad_close, _group,
                                _linear_inputs, _outcome, _reference_options, _shard_sizes, _shifted)
from distributed_helpers import scenario, scenario_tests
from fastce.reference import causal_lm_loss_reference, cross_entropy_reference, linear_logits_reference
from helpers import assert_loss_close, gradient_terms, padded_labels, random_logits

# --- the pytest side: one launch per world size, one test per scenario ----------------------------------------

pytest_generate_tests, test_scenario = scenario_tests(__name__, WORLDS, "errors-world")


# --- errors: the same on every rank, no rank left waiting --------------------------------------------------------

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
