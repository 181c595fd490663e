"""The eager CUDA path's one op (fastce/function.py's direct_cross_entropy over fastce_cuda::causal_lm_fwd, and
fastce_cuda::causal_lm_loss with its C++ autograd node when the logits need a gradient): the label shift, the count
rule, the label check and the float64 sum on the device, and the node's backward, against float64 references."""
import pytest
import torch

import fastce
from fastce import ops
from fastce.reference import causal_lm_loss_reference, cross_entropy_reference

from helpers import (assert_grad_close, assert_loss_close, gradient_terms, padded_labels, random_logits,
                     requires_cuda)

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.fixture
def taken(monkeypatch):
    """The calls that took the one-op path (its compute_grad flags)."""
    calls = []
    real = ops.launch_causal_lm

    def spy(*args):
        calls.append(args[7])
        return real(*args)

    monkeypatch.setattr(ops, "launch_causal_lm", spy)
    return calls


def _poison_allocator(numel: int) -> None:
    """Fill the caching allocator's next blocks with NaN, so that an output the op fails to write shows."""
    for _ in range(2):
        poison = torch.full((numel,), float("nan"), device="cuda")
        del poison


def _reference(logits, labels, **kwargs):
    x = logits.detach().double().requires_grad_()
    loss = causal_lm_loss_reference(x, labels, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


SHAPES = {"T1-V1": (1, 1, 1), "odd-V": (3, 7, 37), "V1": (2, 5, 1), "wide": (2, 9, 12003), "empty": (0, 4, 9),
          "many-rows": (9, 300, 65)}
COUNTS = ["mean", "int", "cpu-tensor", "cuda-int64", "cuda-float32", "cuda-int32"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("count", COUNTS)
def test_matches_float64(taken, dtype, shape, count):
    B, T, V = SHAPES[shape]
    logits = random_logits((B, T, V), dtype, "cuda").requires_grad_()
    labels = padded_labels(B, T, V, "cuda", left=shape == "many-rows")
    n = int((labels[:, 1:] != -100).sum()) + 5
    num_items = {"mean": None, "int": n, "cpu-tensor": torch.tensor(n),
                 "cuda-int64": torch.tensor(n, device="cuda"), "cuda-int32": torch.tensor([n], device="cuda").int(),
                 "cuda-float32": torch.tensor(float(n), device="cuda")}[count]
    _poison_allocator(B * T * V + 4096)
    loss = fastce.causal_lm_loss(logits, labels, V, num_items_in_batch=num_items)
    loss.backward()
    assert taken == [True]
    ref_loss, ref_grad = _reference(logits, labels, num_items_in_batch=None if count == "mean" else n)
    assert_loss_close(loss, ref_loss)
    assert logits.grad.dtype == dtype
    assert_grad_close(logits.grad, ref_grad)


@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "inplace"])
def test_shift_labels_int32_slice_and_options(taken, inplace):
    """shift_labels (no shift), int32 labels, a strided slice of the logits, the options, in place."""
    leaf = random_logits((3, 10, 301), torch.bfloat16, "cuda").requires_grad_()
    logits = (leaf * 1)[:, 2:] if inplace else leaf[:, 2:]  # in place needs a non-leaf, as model outputs are
    shift_labels = padded_labels(3, 8, 301, "cuda").int()
    opts = {"softcap": 7.0, "label_smoothing": 0.1, "z_loss": 1e-3}
    inputs = logits.detach().clone()
    loss = fastce.causal_lm_loss(logits, None, shift_labels=shift_labels, num_items_in_batch=11,
                                 inplace_backward=inplace, **opts)
    loss.backward()
    assert taken == [True]
    ref_loss, ref_grad = _reference(inputs, None, shift_labels=shift_labels.long(), num_items_in_batch=11, **opts)
    assert_loss_close(loss, ref_loss)
    terms = gradient_terms(inputs, shift_labels, 11, **opts)
    assert_grad_close(leaf.grad[:, 2:], ref_grad, terms64=terms)
    assert torch.equal(leaf.grad[:, :2], torch.zeros_like(leaf.grad[:, :2]))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_reductions(taken, reduction):
    logits = random_logits((4, 6, 77), torch.float32, "cuda").requires_grad_()
    target = padded_labels(4, 6, 77, "cuda")
    loss = fastce.cross_entropy(logits, target, reduction=reduction)
    loss.backward()
    assert taken == [True]
    x = logits.detach().double().requires_grad_()
    rows = cross_entropy_reference(x, target)
    ref = rows.sum() / ((target != -100).sum() if reduction == "mean" else 1)
    ref.backward()
    assert_loss_close(loss, ref.detach())
    assert_grad_close(logits.grad, x.grad)


@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "inplace"])
def test_bad_target_raises_naming_it_and_leaves_logits(taken, inplace):
    logits = random_logits((2, 5, 97), torch.bfloat16, "cuda").requires_grad_()
    view = logits * 1
    before = view.detach().clone()
    labels = torch.randint(0, 97, (2, 5), device="cuda")
    labels[1, 3] = 97
    with pytest.raises(ValueError, match=r"target 97 at position \(1, 2\) is outside \[0, 97\)"):
        fastce.causal_lm_loss(view, labels, inplace_backward=inplace)
    assert torch.equal(view.detach(), before)
    labels[1, 3] = -5
    with pytest.raises(ValueError, match=r"target -5 at position \(1, 2\)"):
        fastce.causal_lm_loss(logits.detach(), labels)  # forward only
    assert taken == [True, False]


@pytest.mark.parametrize("options", [{}, {"softcap": 5.0, "z_loss": 1e-2, "label_smoothing": 0.2}], ids=["plain", "all"])
def test_return_stats(taken, options):
    """lse, entropy, accuracy and the z-loss term of each position, against float64, through the one-op path."""
    B, T, V = 3, 9, 203
    logits = random_logits((B, T, V), torch.bfloat16, "cuda").requires_grad_()
    labels = padded_labels(B, T, V, "cuda")
    labels[0, 3] = int(logits[0, 2].argmax())  # one position surely predicted right
    out = fastce.causal_lm_loss(logits, labels, num_items_in_batch=13, return_stats=True, **options)
    out.loss.backward()
    assert taken == [True]
    ref_loss, _ = _reference(logits, labels, num_items_in_batch=13, **options)
    assert_loss_close(out.loss, ref_loss)
    x = logits.detach().double()
    cap = options.get("softcap")
    x = cap * torch.tanh(x / cap) if cap else x
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    kept = targets != -100
    lse = torch.logsumexp(x, -1)
    logp = x - lse.unsqueeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    correct = x.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) >= x.amax(-1)
    torch.testing.assert_close(out.lse.double(), torch.where(kept, lse, 0.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.entropy.double(), torch.where(kept, entropy, 0.0), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.accuracy, correct & kept) and bool(out.accuracy[0, 2])
    z_term = options.get("z_loss", 0.0) * torch.where(kept, lse, 0.0).square().sum() / 13
    torch.testing.assert_close(out.z_loss.double(), z_term, rtol=1e-6, atol=1e-12)


def test_bad_target_without_validation_is_nan(taken):
    logits = random_logits((2, 4, 33), torch.float32, "cuda").requires_grad_()
    labels = torch.randint(0, 33, (2, 4), device="cuda")
    labels[0, 2] = 1 << 40  # far outside: an unchecked read would fault
    loss = fastce.causal_lm_loss(logits, labels, validate=False)
    assert torch.isnan(loss)
    loss.backward()
    torch.cuda.synchronize()
    assert taken == [True]


@pytest.mark.parametrize("bad", [-3, float("nan"), float("inf")], ids=["negative", "nan", "inf"])
@pytest.mark.parametrize("where", ["cuda", "cpu"])
def test_bad_count_tensor(taken, bad, where):
    logits = random_logits((2, 4, 33), torch.float32, "cuda").requires_grad_()
    labels = torch.randint(0, 33, (2, 4), device="cuda")
    count = torch.tensor(bad, device=where)
    with pytest.raises(ValueError, match="num_items_in_batch must be a count >= 0"):
        fastce.causal_lm_loss(logits, labels, num_items_in_batch=count)
    loss = fastce.causal_lm_loss(logits, labels, num_items_in_batch=count, validate=False)
    assert torch.isnan(loss)
    with pytest.raises(ValueError, match="finite count >= 0"):
        fastce.causal_lm_loss(logits, labels, num_items_in_batch=bad)  # a number: at once, before any launch
    assert taken == [True, True]


def test_zero_count_rule(taken):
    logits = random_logits((2, 6, 21), torch.float16, "cuda").requires_grad_()
    ignored = torch.full((2, 6), -100, device="cuda")
    for zero in (0, 0.0, torch.tensor(0), torch.tensor(0, device="cuda")):
        logits.grad = None
        loss = fastce.causal_lm_loss(logits, ignored, num_items_in_batch=zero)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
        logits.grad = None
        loss = fastce.causal_lm_loss(logits, torch.randint(0, 21, (2, 6), device="cuda"), num_items_in_batch=zero)
        loss.backward()
        assert torch.isnan(loss) and torch.isnan(logits.grad[:, :-1]).all()
    assert taken == [True] * 8


def test_deterministic_and_grad_output_scales(taken):
    logits = random_logits((8, 256, 1000), torch.bfloat16, "cuda").requires_grad_()
    labels = padded_labels(8, 256, 1000, "cuda")
    first = fastce.causal_lm_loss(logits, labels)
    again = fastce.causal_lm_loss(logits.detach(), labels)
    assert torch.equal(first, again)
    (first * 2.5).backward()
    ref_loss, ref_grad = _reference(logits, labels)
    assert_grad_close(logits.grad, 2.5 * ref_grad, roundings=2)


def test_cuda_graph_capture_without_validation(taken):
    logits = random_logits((2, 16, 129), torch.float32, "cuda")
    labels = padded_labels(2, 16, 129, "cuda")
    count = torch.tensor(17, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fastce.causal_lm_loss(logits, labels, num_items_in_batch=count, validate=False)  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            loss = fastce.causal_lm_loss(logits, labels, num_items_in_batch=count, validate=False)
    torch.cuda.current_stream().wait_stream(stream)
    logits.copy_(random_logits((2, 16, 129), torch.float32, "cuda"))
    graph.replay()
    torch.cuda.synchronize()
    ref = causal_lm_loss_reference(logits.double(), labels, num_items_in_batch=17)
    assert_loss_close(loss, ref)
    with torch.cuda.stream(stream):
        graph2 = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="validate=False"):
            with torch.cuda.graph(graph2, stream=stream):
                fastce.causal_lm_loss(logits, labels, num_items_in_batch=count)
    assert taken == [False, False, False]


def test_other_calls_take_the_general_path(taken):
    logits = random_logits((2, 5, 40), torch.float32, "cuda")
    labels = padded_labels(2, 5, 40, "cuda")
    fastce.causal_lm_loss(logits, labels, backend="triton")
    fastce.causal_lm_loss(logits, labels.cpu())
    fastce.causal_lm_loss(logits[0], labels[0])
    fastce.cross_entropy(logits, labels, reduction="none")
    assert taken == []


class _NoGradient(torch.autograd.Function):
    """Identity whose backward sends nothing on: the node below it gets an undefined grad_output."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


def test_the_autograd_node_is_cpp(taken):
    """A call that needs a gradient runs no Python autograd.Function: the loss's node is the op's C++ one, and the
    other outputs need no gradient."""
    logits = random_logits((2, 5, 33), torch.float32, "cuda").requires_grad_()
    labels = padded_labels(2, 5, 33, "cuda")
    loss = fastce.causal_lm_loss(logits, labels)
    assert "CausalLmLoss" in loss.grad_fn.name()
    assert not isinstance(loss.grad_fn, torch.autograd.function.BackwardCFunction)
    loss, row_stats, divisor = ops.launch_causal_lm(logits, labels, True, -100, None, 0.0, True, True, False, True)
    assert loss.requires_grad and not row_stats.requires_grad and not divisor.requires_grad
    assert taken == [True, True]


@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "inplace"])
def test_second_backward_raises(taken, inplace):
    leaf = random_logits((2, 6, 41), torch.float32, "cuda").requires_grad_()
    labels = padded_labels(2, 6, 41, "cuda", min_len=2)
    _, ref_grad = _reference(leaf, labels)
    loss = fastce.causal_lm_loss(leaf * 1, labels, inplace_backward=inplace)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="scaled in place: backward can run only once"):
        loss.backward()
    assert_grad_close(leaf.grad, ref_grad)  # scaled and accumulated once
    assert taken == [True]


def test_inplace_bumps_the_version_unless_the_check_fails(taken):
    """In place, the node bumps the logits' version as an in-place op would: what saved them for its own backward
    then raises. A failed check writes nothing and bumps nothing."""
    leaf = random_logits((2, 5, 97), torch.bfloat16, "cuda").requires_grad_()
    labels = padded_labels(2, 5, 97, "cuda", min_len=2)
    logits = leaf * 1
    saved = logits.sin()  # sin saves its input
    version = logits._version
    loss = fastce.causal_lm_loss(logits, labels, inplace_backward=True)
    assert logits._version == version + 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + saved.sum()).backward()
    bad = labels.clone()
    bad[0, 1] = 97
    fresh = leaf * 1
    before, version = fresh.detach().clone(), fresh._version
    with pytest.raises(ValueError, match=r"target 97 at position \(0, 0\) is outside \[0, 97\)"):
        fastce.causal_lm_loss(fresh, bad, inplace_backward=True)
    assert fresh._version == version and torch.equal(fresh.detach(), before)
    assert taken == [True, True]


def test_grad_output_paths(taken):
    """grad_output other than 1, reaching the node as a view of a larger gradient (two losses stacked and weighted),
    through a float64 cast, given explicitly, zero, and undefined (scaled as zeros, as autograd.Function's
    materialised grads were)."""
    B, T, V = 2, 7, 53
    logits = random_logits((B, T, V), torch.float32, "cuda").requires_grad_()
    labels = padded_labels(B, T, V, "cuda", min_len=2)
    _, ref_grad = _reference(logits, labels)
    first, second = fastce.causal_lm_loss(logits, labels), fastce.causal_lm_loss(logits, labels)
    (torch.stack([first, second]) * torch.tensor([2.0, -0.5], device="cuda")).sum().backward()
    assert_grad_close(logits.grad, 1.5 * ref_grad, roundings=3)
    logits.grad = None
    (fastce.causal_lm_loss(logits, labels).double() * 3).backward()
    assert_grad_close(logits.grad, 3 * ref_grad, roundings=2)
    (grad,) = torch.autograd.grad(fastce.causal_lm_loss(logits, labels), logits, torch.tensor(-0.25, device="cuda"))
    assert_grad_close(grad, -0.25 * ref_grad, roundings=2)
    for zero in (fastce.causal_lm_loss(logits, labels) * 0, _NoGradient.apply(fastce.causal_lm_loss(logits, labels))):
        (grad,) = torch.autograd.grad(zero, logits)
        assert torch.equal(grad, torch.zeros_like(grad))
    assert taken == [True] * 6


def test_no_double_backward(taken):
    """As the general path's @once_differentiable backward: a gradient made with create_graph from a grad_output that
    needs a gradient raises when it is differentiated, rather than silently losing that dependence."""
    logits = random_logits((2, 5, 33), torch.float32, "cuda").requires_grad_()
    labels = padded_labels(2, 5, 33, "cuda", min_len=2)
    _, ref_grad = _reference(logits, labels)
    weight = torch.tensor(2.0, device="cuda", requires_grad=True)
    (grad,) = torch.autograd.grad(fastce.causal_lm_loss(logits, labels) * weight, logits, create_graph=True)
    assert_grad_close(grad.detach(), 2 * ref_grad, roundings=2)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()
    assert taken == [True]


def test_bad_input_messages_with_a_gradient(taken):
    """The check's answer raised through the op with a gradient: unshifted targets (cross_entropy) and a bad count."""
    logits = random_logits((3, 4, 21), torch.float16, "cuda").requires_grad_()
    target = padded_labels(3, 4, 21, "cuda")
    target[2, 1] = -7
    with pytest.raises(ValueError, match=r"target -7 at position \(2, 1\) is outside \[0, 21\) and is not "
                                         r"ignore_index=-100"):
        fastce.cross_entropy(logits, target)
    with pytest.raises(ValueError, match=r"num_items_in_batch must be a count >= 0, got a tensor holding -2.0"):
        fastce.causal_lm_loss(logits, padded_labels(3, 4, 21, "cuda"),
                              num_items_in_batch=torch.tensor(-2, device="cuda"))
    assert logits.grad is None
    assert taken == [True, True]


def test_cuda_graph_capture_of_forward_and_backward(taken):
    """validate=False: the op with its autograd node, forward and backward, captured in one CUDA graph and replayed
    on new logits."""
    B, T, V = 2, 16, 129
    logits = random_logits((B, T, V), torch.float32, "cuda").requires_grad_()
    labels = padded_labels(B, T, V, "cuda", min_len=2)
    count = torch.tensor(17, device="cuda")

    def step():
        loss = fastce.causal_lm_loss(logits, labels, num_items_in_batch=count, validate=False)
        return (loss, *torch.autograd.grad(loss * 1.5, logits))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            loss, grad = step()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.no_grad():
        logits.copy_(random_logits((B, T, V), torch.float32, "cuda"))
    graph.replay()
    torch.cuda.synchronize()
    ref_loss, ref_grad = _reference(logits, labels, num_items_in_batch=17)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, 1.5 * ref_grad, roundings=2)
    assert taken == [True, True]
