"""Each backend's launchers against the float64 reference, with every output poisoned first (see kernels/__init__)."""
import pytest
import torch

from fastce.backends import kernels
from fastce.reference import cross_entropy_grad_reference, cross_entropy_reference

from helpers import assert_grad_close, backend_params, random_logits


# (B, T, V): V=1; odd V; a V above the Triton kernels' 8192-wide vocabulary chunk (several chunks, a ragged tail).
SHAPES = [(1, 1, 1), (2, 3, 37), (1, 5, 1000), (2, 2, 8193 + 4096 + 7)]


@pytest.mark.parametrize("device", [p.values[0] for p in backend_params() if p.values[1] == "triton"])
@pytest.mark.parametrize("num_splits", [1, 2, 5], ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "inplace"])
def test_triton_row_and_split_paths(device, num_splits, inplace):
    """V above the single-chunk limit: the streaming row path (1 split) and the split path, also in place."""
    from fastce.kernels import triton_ce

    B, T, V = 2, 3, 32768 + 8192 * 3 + 5
    logits = random_logits((B, T, V), torch.bfloat16, device)
    targets = torch.randint(0, V, (B, T), device=device)
    targets[1, 0] = -100
    targets[0, 2] = V - 1  # the last element of the last (ragged) split
    reference_grad = cross_entropy_grad_reference(logits, targets, 7.0, -100)
    expected = cross_entropy_reference(logits, targets)
    losses = torch.full((B, T), float("nan"), device=device)
    grad = logits if inplace else torch.full_like(logits, float("nan"))
    divisor = torch.tensor(7.0, dtype=torch.float64, device=device)
    triton_ce.cross_entropy_fwd(logits, targets, divisor, losses, grad, -100, num_splits=num_splits)
    torch.testing.assert_close(losses.double(), expected, rtol=1e-6, atol=1e-6)
    assert_grad_close(grad, reference_grad)


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32], ids=str)
def test_fwd_writes_every_output(device, backend, dtype, shape, target_dtype):
    B, T, V = shape
    ignore_index = -7
    logits = random_logits(shape, dtype, device)
    targets = torch.randint(0, V, (B, T), device=device, dtype=target_dtype)
    targets[0, -1] = ignore_index
    divisor = torch.tensor(3.0, dtype=torch.float64, device=device)
    losses = torch.full((B, T), float("nan"), device=device)
    grad = torch.full(shape, float("nan"), dtype=dtype, device=device)
    kernels(backend).cross_entropy_fwd(logits, targets, divisor, losses, grad, ignore_index)
    expected = cross_entropy_reference(logits, targets, ignore_index)
    torch.testing.assert_close(losses.double(), expected, rtol=1e-6, atol=1e-6)
    assert_grad_close(grad, cross_entropy_grad_reference(logits, targets, 3.0, ignore_index))


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("grad_mode", ["new", "inplace", "none"])
def test_skip_flag(device, backend, grad_mode):
    """skip=True: nothing is written (poisoned outputs stay poisoned, in-place logits stay intact); False: as usual."""
    logits = random_logits((2, 3, 1000), torch.bfloat16, device)
    before = logits.clone()
    targets = torch.randint(0, 1000, (2, 3), device=device)
    targets[1, 1] = -100
    divisor = torch.tensor(2.0, dtype=torch.float64, device=device)
    for flag in (True, False):
        losses = torch.full((2, 3), float("nan"), device=device)
        grad = {"new": torch.full_like(logits, float("nan")), "inplace": logits, "none": None}[grad_mode]
        skip = torch.tensor(flag, device=device)
        kernels(backend).cross_entropy_fwd(logits, targets, divisor, losses, grad, -100, skip)
        if flag:
            assert torch.isnan(losses).all()
            assert grad is None or (torch.isnan(grad).all() if grad_mode == "new" else torch.equal(grad, before))
        else:
            torch.testing.assert_close(losses.double(), cross_entropy_reference(before, targets), rtol=1e-6, atol=1e-6)
            if grad is not None:
                assert_grad_close(grad, cross_entropy_grad_reference(before, targets, 2.0, -100))


@pytest.mark.parametrize("device", [p.values[0] for p in backend_params() if p.values[1] == "triton"])
def test_triton_skip_flag_split_path(device):
    from fastce.kernels import triton_ce

    logits = random_logits((1, 2, 32768 + 5), torch.bfloat16, device)
    before = logits.clone()
    targets = torch.tensor([[3, 32768 + 4]], device=device)
    losses = torch.full((1, 2), float("nan"), device=device)
    divisor = torch.tensor(1.0, dtype=torch.float64, device=device)
    triton_ce.cross_entropy_fwd(logits, targets, divisor, losses, logits, -100, torch.tensor(True, device=device),
                                num_splits=2)
    assert torch.isnan(losses).all() and torch.equal(logits, before)


@pytest.mark.parametrize("device, backend", backend_params())
def test_fwd_strided_rows_and_loss_only(device, backend):
    """Rows of a slice (two row strides, no copy); forward-only leaves no gradient work behind."""
    full = random_logits((3, 9, 301), torch.bfloat16, device)
    logits = full[:, 4:]  # not viewable as [N, V]
    targets = torch.randint(0, 301, (3, 5), device=device)[:, ::1]
    losses = torch.full((3, 5), float("nan"), device=device)
    divisor = torch.tensor(1.0, dtype=torch.float64, device=device)
    kernels(backend).cross_entropy_fwd(logits, targets.t().contiguous().t(), divisor, losses, None, -100)
    torch.testing.assert_close(losses.double(), cross_entropy_reference(logits, targets), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device, backend", backend_params())
def test_fwd_out_of_range_target_is_nan_not_a_read(device, backend):
    V = 50
    # The logits are a slice of a larger buffer whose neighbouring elements are huge: a read out of the row's
    # bounds would show up as a finite (wrong) loss, but the defined result is NaN.
    buffer = random_logits((1, 4, 3 * V), torch.float32, device)
    buffer[..., V:] = 1e30
    logits = buffer[..., :V]
    targets = torch.tensor([[V, -1, 2 * V, 3]], device=device)
    losses = torch.full((1, 4), 123.0, device=device)
    grad = torch.full((1, 4, V), float("nan"), device=device)
    divisor = torch.tensor(1.0, dtype=torch.float64, device=device)
    kernels(backend).cross_entropy_fwd(logits, targets, divisor, losses, grad, -100)
    assert torch.isnan(losses[0, :3]).all()
    torch.testing.assert_close(losses[0, 3].double(), cross_entropy_reference(logits, targets)[0, 3])
    # Rows with a bad target get softmax / divisor (no one-hot): finite, never read from outside the row.
    torch.testing.assert_close(grad[0, :3].double(), torch.softmax(logits[0, :3].double(), -1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per-row"])
def test_scale_grad(device, backend, per_row):
    grad = random_logits((2, 3, 77), torch.bfloat16, device)
    if per_row:
        factor = torch.rand(2, 3, device=device) + 0.5
        factor[1, 2] = 1.0
    else:
        factor = torch.tensor(0.37, device=device)
    expected = grad.double() * (factor.unsqueeze(-1) if per_row else factor).double()
    kernels(backend).scale_grad_(grad, factor)
    # One rounding of the exact product (Triton's interpreter truncates where the GPU rounds to nearest).
    assert_grad_close(grad, expected)


@pytest.mark.parametrize("device, backend", backend_params())
def test_scale_grad_by_one_keeps_every_bit(device, backend):
    grad = random_logits((2, 3, 77), torch.bfloat16, device)
    grad[0, 0, :5] = torch.tensor([-0.0, float("inf"), -float("inf"), 1e-40, -3.0])
    before = grad.clone()
    kernels(backend).scale_grad_(grad, torch.tensor(1.0, device=device))
    assert torch.equal(grad.view(torch.int16), before.view(torch.int16))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (and ~9 GB)")
def test_triton_64bit_offsets():
    """N*V >= 2**31 elements: offsets of late rows overflow 32 bits; they must be computed in 64 bits."""
    from fastce.kernels import triton_ce

    B, T, V = 2, 8192, 131075  # 2.1e9 elements, an odd V
    assert B * T * V >= 2**31
    logits = random_logits((B, T, V), torch.bfloat16, "cuda")
    targets = torch.randint(0, V, (B, T), device="cuda")
    targets[1, -3] = -100
    losses = torch.full((B, T), float("nan"), device="cuda")
    grad = torch.full_like(logits, float("nan"))
    divisor = torch.tensor(123.0, dtype=torch.float64, device="cuda")
    triton_ce.cross_entropy_fwd(logits, targets, divisor, losses, grad, -100)
    assert not torch.isnan(losses).any() and not torch.isnan(grad).any()  # every element written
    for b, t in [(0, 0), (1, 0), (1, T - 4), (1, T - 3), (1, T - 1)]:  # rows past 2**31 elements among them
        row = (slice(b, b + 1), slice(t, t + 1))
        expected = cross_entropy_reference(logits[row], targets[row])
        torch.testing.assert_close(losses[row].double(), expected, rtol=1e-6, atol=1e-6)
        assert_grad_close(grad[row], cross_entropy_grad_reference(logits[row], targets[row], 123.0))
