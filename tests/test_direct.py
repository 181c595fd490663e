"""The eager CUDA path's one-op forward (fastce/function.py's direct_cross_entropy over fastce_cuda::causal_lm_fwd):
the label shift, the count rule, the label check and the float64 sum on the device, against float64 references."""
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
