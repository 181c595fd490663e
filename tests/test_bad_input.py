"""Bad input gets a clear error or a defined result; never a silent wrong loss or a read out of bounds."""
import pytest
import torch

import fastce

from helpers import backend_params, padded_labels, random_logits, requires_cuda


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("bad", [97, 1000, -5])
def test_label_out_of_range_raises_naming_it(device, backend, bad):
    logits = random_logits((2, 4, 97), torch.bfloat16, device)
    labels = torch.randint(0, 97, (2, 4), device=device)
    labels[1, 2] = bad
    with pytest.raises(ValueError, match=rf"target {bad} at position \(1, 1\) is outside \[0, 97\)"):
        fastce.causal_lm_loss(logits, labels, backend=backend)


@pytest.mark.parametrize("device, backend", backend_params())
def test_label_out_of_range_in_place_raises_and_keeps_the_logits(device, backend):
    """In place, the check is answered after the launch; the kernel is told on the device to write nothing."""
    logits = random_logits((2, 4, 97), torch.bfloat16, device).requires_grad_()
    labels = torch.randint(0, 97, (2, 4), device=device)
    labels[0, 3] = 97
    logits_view = logits * 1  # a non-leaf, as model outputs are: in-place needs no leaf
    before = logits_view.detach().clone()
    with pytest.raises(ValueError, match=r"target 97 at position \(0, 2\)"):
        fastce.causal_lm_loss(logits_view, labels, backend=backend, inplace_backward=True)
    assert torch.equal(logits_view.detach(), before)


@pytest.mark.parametrize("device, backend", backend_params())
def test_label_out_of_range_without_validation_is_nan(device, backend):
    logits = random_logits((2, 4, 97), torch.float32, device).requires_grad_()
    labels = torch.randint(0, 97, (2, 4), device=device)
    labels[1, 2] = 1 << 40  # far outside: an unchecked read would fault or return garbage
    loss = fastce.causal_lm_loss(logits, labels, validate=False, backend=backend)
    assert torch.isnan(loss)
    loss.backward()  # defined, no crash


def test_shape_and_type_errors():
    logits = random_logits((2, 5, 11), torch.float32, "cpu")
    labels = torch.randint(0, 11, (2, 5))
    with pytest.raises(ValueError, match=r"labels \(2, 4\) do not match logits \(2, 5, 11\)"):
        fastce.causal_lm_loss(logits, labels[:, :4])
    with pytest.raises(ValueError, match="vocab_size=12 does not match"):
        fastce.causal_lm_loss(logits, labels, vocab_size=12)
    with pytest.raises(TypeError, match="logits must be float16, bfloat16 or float32"):
        fastce.causal_lm_loss(labels.unsqueeze(-1).expand(2, 5, 11), labels)
    with pytest.raises(TypeError, match="integer"):
        fastce.causal_lm_loss(logits, labels.float())
    with pytest.raises(ValueError, match="V >= 1"):
        fastce.causal_lm_loss(logits[..., :0], labels)
    with pytest.raises(ValueError, match="num_items_in_batch must hold one number"):
        fastce.causal_lm_loss(logits, labels, num_items_in_batch=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="unknown backend"):
        fastce.causal_lm_loss(logits, labels, backend="fast")
    with pytest.raises(ValueError, match="reduction"):
        fastce.cross_entropy(logits[0], labels[0], reduction="avg")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message seen on a machine without CUDA")
def test_gpu_backend_on_cpu_machine_says_why():
    logits = random_logits((1, 3, 5), torch.float32, "cpu")
    with pytest.raises(ValueError, match="'cuda' is unavailable|needs CUDA tensors"):
        fastce.causal_lm_loss(logits, torch.randint(0, 5, (1, 3)), backend="cuda")


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("shape", [(0, 5, 7), (3, 1, 7), (2, 0, 7)], ids=["empty-batch", "T1", "T0"])
@pytest.mark.parametrize("num_items", [None, 0], ids=["mean", "zero"])
def test_nothing_to_predict_is_zero_not_nan(device, backend, shape, num_items):
    logits = random_logits(shape, torch.bfloat16, device).requires_grad_()
    labels = torch.randint(0, 7, shape[:2], device=device)
    loss = fastce.causal_lm_loss(logits, labels, num_items_in_batch=num_items, backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("device, backend", backend_params())
def test_all_ignored_rows_are_zero_not_nan(device, backend):
    logits = random_logits((2, 6, 33), torch.float16, device).requires_grad_()
    labels = torch.full((2, 6), -100, device=device)
    for num_items in (None, 0, torch.tensor(0)):
        logits.grad = None
        loss = fastce.causal_lm_loss(logits, labels, num_items_in_batch=num_items, backend=backend)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_propagate(device, backend, poison):
    logits = random_logits((2, 4, 19), torch.bfloat16, device)
    labels = padded_labels(2, 4, 19, device, min_len=4)
    logits[1, 0, labels[1, 1]] = poison  # at the target: -inf there is a real infinite loss, not a masked token
    loss = fastce.causal_lm_loss(logits, labels, backend=backend)
    assert not torch.isfinite(loss)


@pytest.mark.parametrize("device, backend", backend_params())
def test_masked_vocabulary_is_not_nan(device, backend):
    """-inf on part of the vocabulary (a masked, padded vocabulary) is legitimate and must not produce NaN."""
    logits = random_logits((1, 3, 20000), torch.float32, device).requires_grad_()
    mask = torch.zeros(20000, dtype=torch.bool, device=device)
    mask[:9000] = True  # the first vocabulary chunk entirely -inf
    masked = logits.masked_fill(mask, -float("inf"))
    labels = torch.randint(9000, 20000, (1, 3), device=device)
    loss = fastce.causal_lm_loss(masked, labels, backend=backend)
    ref = torch.nn.functional.cross_entropy(masked[0, :-1].double(), labels[0, 1:])
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.gpu
@requires_cuda
def test_labels_on_another_device_are_moved():
    logits = random_logits((2, 5, 31), torch.bfloat16, "cuda")
    labels = torch.randint(0, 31, (2, 5))
    loss = fastce.causal_lm_loss(logits, labels, num_items_in_batch=torch.tensor(7))
    expected = fastce.causal_lm_loss(logits, labels.cuda(), num_items_in_batch=7)
    assert loss.device.type == "cuda" and torch.equal(loss, expected)


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("bad", [-3, float("nan"), float("inf")], ids=["negative", "nan", "inf"])
def test_bad_count_tensor_raises_or_is_nan(device, backend, bad):
    """A count tensor that is negative, NaN or infinite: ValueError at the label check, NaN without validation (an
    infinite count is no count: it would silently make the loss 0)."""
    logits = random_logits((2, 5, 13), torch.float32, device).requires_grad_()
    labels = torch.randint(0, 13, (2, 5), device=device)
    count = torch.tensor(bad, device=device)
    with pytest.raises(ValueError, match="num_items_in_batch must be a count >= 0"):
        fastce.causal_lm_loss(logits, labels, num_items_in_batch=count, backend=backend)
    assert torch.isnan(fastce.causal_lm_loss(logits, labels, num_items_in_batch=count, backend=backend, validate=False))


def test_direct_count_arguments():
    """How the eager CUDA path's one op is given the divisor (fastce.api.direct_count), and its checks."""
    from fastce.api import direct_count

    cpu = torch.device("cpu")
    assert direct_count(None, cpu) == (None, 0.0, True)
    assert direct_count(7, cpu) == (None, 7.0, False)
    assert direct_count(torch.tensor([9]), cpu) == (None, 9.0, False)  # a CPU tensor is read on the host
    assert direct_count(torch.tensor(-3), cpu) == (None, -3.0, False)  # ... and obeys the tensor rule on the device
    for number in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite count >= 0"):
            direct_count(number, cpu)
    with pytest.raises(ValueError, match="hold one number"):
        direct_count(torch.tensor([1, 2]), cpu)
    with pytest.raises(TypeError, match="real number"):
        direct_count(torch.tensor(True), cpu)
    with pytest.raises(TypeError, match="None, a number or a tensor"):
        direct_count("12", cpu)
