"""Each backend's launchers against the float64 reference, with every output poisoned first (see kernels/__init__)."""
import pytest
import torch

from fastce import stats as fstats
from fastce.backends import kernels
from fastce.reference import cross_entropy_grad_reference, cross_entropy_reference, row_stats_reference
from fastce.spec import LossSpec

from helpers import assert_grad_close, backend_params, gradient_terms, random_logits

TRITON_DEVICES = [p.values[0] for p in backend_params() if p.values[1] == "triton"]


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


# The Triton kernels with options: each option alone (its constexpr flag) and all together, on the paths the tests
# through the public API reach less often (the split path; a shard's columns over several programs).
TRITON_OPTIONS = {
    "softcap": LossSpec(softcap=2.5),
    "smoothing": LossSpec(label_smoothing=0.1),
    "z-loss-stats": LossSpec(z_loss=1e-3, stats=True),
    "all": LossSpec(softcap=4.0, label_smoothing=0.25, z_loss=3e-3, stats=True),
}


def _option_kwargs(spec: LossSpec) -> dict:
    return dict(softcap=spec.softcap or None, label_smoothing=spec.label_smoothing, z_loss=spec.z_loss)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("num_splits", [1, 3], ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "inplace"])
@pytest.mark.parametrize("option", list(TRITON_OPTIONS))
def test_triton_row_and_split_paths_with_options(device, num_splits, inplace, option):
    """The streaming row path (1 split) and the split path with options, every output poisoned, also in place:
    targets in the first and the last (ragged) split, an ignored row, an out-of-range target."""
    from fastce.kernels import triton_ce

    spec = TRITON_OPTIONS[option]
    B, T, V = 2, 3, 2 * 16384 + 4099
    logits = random_logits((B, T, V), torch.bfloat16, device)
    targets = torch.randint(0, V, (B, T), device=device)
    targets[0, 0], targets[0, 1], targets[1, 0], targets[1, 2] = 3, V - 1, -100, V + 5
    options = _option_kwargs(spec)
    expected = cross_entropy_reference(logits, targets, **options)
    expected_grad = cross_entropy_grad_reference(logits, targets, 5.0, **options)
    terms = gradient_terms(logits, targets, 5.0, **options)
    lse, entropy, correct = row_stats_reference(logits, targets, softcap=options["softcap"])
    losses = torch.full((B, T), float("nan"), device=device)
    row_stats = torch.full((B, T, 3), float("nan"), device=device) if spec.stats else None
    grad = logits if inplace else torch.full_like(logits, float("nan"))
    divisor = torch.tensor(5.0, dtype=torch.float64, device=device)
    triton_ce.cross_entropy_fwd(logits, targets, divisor, losses, grad, -100, spec=spec, row_stats=row_stats,
                                num_splits=num_splits)
    torch.testing.assert_close(losses.double(), expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert_grad_close(grad, expected_grad, terms64=terms)
    if spec.stats:
        torch.testing.assert_close(row_stats[..., 0].double(), lse, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(row_stats[..., 1].double(), entropy, rtol=1e-5, atol=1e-5)
        assert torch.equal(row_stats[..., 2] != 0, correct)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("option", ["plain", "all"])
def test_triton_shard_columns_over_several_programs(device, option):
    """shard_stats and shard_grad with each row's columns cut over several programs (``num_splits``; shard_stats then
    merges the splits on the device): the statistics merge to the whole row's, the gradient is the whole row's."""
    from fastce.kernels import triton_ce

    spec = LossSpec() if option == "plain" else TRITON_OPTIONS["all"]
    options = _option_kwargs(spec)
    B, T, V, cut = 1, 3, 40000, 36001
    logits = random_logits((B, T, V), torch.float32, device)
    targets = torch.tensor([[-100, 5, V - 2]], device=device)
    parts = []
    for lo, hi, splits in ((0, cut, 3), (cut, V, 2)):
        out = fstats.empty_stats((B, T), device)
        triton_ce.shard_stats(logits[..., lo:hi], targets, lo, -100, out, spec, num_splits=splits)
        assert not out.isnan().any(), "an output was left unwritten"
        parts.append(out)
    assert torch.equal(parts[0][0, 0], torch.tensor([float("-inf"), 0.0, 0.0, 0.0, 0.0], device=device))
    merged = fstats.merge(torch.stack(parts))
    losses, row_stats = fstats.finish(merged, targets, V, -100, spec)
    torch.testing.assert_close(losses.double(), cross_entropy_reference(logits, targets, **options), rtol=1e-6,
                               atol=1e-6)
    if spec.stats:
        lse, entropy, _ = row_stats_reference(logits, targets, softcap=options["softcap"])
        torch.testing.assert_close(row_stats[..., 0].double(), lse, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(row_stats[..., 1].double(), entropy, rtol=1e-5, atol=1e-5)
    scale = torch.tensor([[1.0, 0.25, 3.0]], device=device)
    row = torch.stack((merged[..., 0], merged[..., 1], scale), dim=-1).contiguous()
    work = logits.clone()
    for lo, hi, splits in ((0, cut, 3), (cut, V, 2)):
        triton_ce.shard_grad(work[..., lo:hi], targets, lo, V, -100, row, work[..., lo:hi], spec, num_splits=splits)
    expected = cross_entropy_grad_reference(logits, targets, **options) * scale.double().unsqueeze(-1)
    terms = gradient_terms(logits, targets, **options) * scale.double().unsqueeze(-1)
    assert_grad_close(work, expected, terms64=terms)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("V, num_splits", [(301, None), (16384 + 5, None), (2 * 16384 + 5, 2)],
                         ids=["single-chunk", "row", "split"])
@pytest.mark.parametrize("option", ["plain", "all"])
def test_triton_zero_divisor(device, V, num_splits, option):
    """A divisor of 0: the gradient of rows that are not ignored is NaN, ignored rows get exact zeros; the losses are
    the usual ones."""
    from fastce.kernels import triton_ce

    spec = LossSpec() if option == "plain" else TRITON_OPTIONS["all"]
    logits = random_logits((1, 3, V), torch.bfloat16, device)
    targets = torch.tensor([[7, -100, V - 1]], device=device)
    losses = torch.full((1, 3), float("nan"), device=device)
    grad = torch.full_like(logits, 1.0)
    extra = {} if spec.plain else {"spec": spec, "row_stats": torch.empty((1, 3, 3), device=device)}
    triton_ce.cross_entropy_fwd(logits, targets, torch.tensor(0.0, dtype=torch.float64, device=device), losses, grad,
                                -100, num_splits=num_splits, **extra)
    assert grad[0, [0, 2]].isnan().all()
    assert torch.equal(grad[0, 1], torch.zeros_like(grad[0, 1]))
    expected = cross_entropy_reference(logits, targets, **_option_kwargs(spec))
    torch.testing.assert_close(losses.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("option", list(TRITON_OPTIONS))
def test_triton_one_class_gradient_is_exactly_zero(device, option):
    """V = 1: p = 1 and the target's one constant 1 - e + e / V is exactly 1, so the gradient is exactly 0 (z-loss
    aside) and so is the loss."""
    from fastce.kernels import triton_ce

    spec = TRITON_OPTIONS[option]
    logits = random_logits((2, 3, 1), torch.float32, device)
    targets = torch.zeros((2, 3), dtype=torch.int64, device=device)
    losses = torch.full((2, 3), float("nan"), device=device)
    grad = torch.full_like(logits, float("nan"))
    row_stats = torch.empty((2, 3, 3), device=device) if spec.stats else None
    triton_ce.cross_entropy_fwd(logits, targets, torch.tensor(2.0, dtype=torch.float64, device=device), losses, grad,
                                -100, spec=spec, row_stats=row_stats)
    if spec.z_loss == 0:
        assert torch.equal(grad, torch.zeros_like(grad)) and torch.equal(losses, torch.zeros_like(losses))
    else:
        z_term = spec.z_loss * (logits[..., 0].double() if not spec.softcap else
                                spec.softcap * torch.tanh(logits[..., 0].double() / spec.softcap)).square()
        torch.testing.assert_close(losses.double(), z_term, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("V, num_splits", [(301, None), (16384 + 5, None), (2 * 16384 + 5, 2)],
                         ids=["single-chunk", "row", "split"])
def test_triton_softcap_saturated_and_infinite_logits(device, V, num_splits):
    """Softcap where tanh saturates: logits of +-1e4 and -inf (a masked vocabulary entry) give x' = +-softcap, a
    slope of exactly 0 there and finite gradients; at +-30 (slope 8e-9, still exact in the float64 reference, which
    loses it to 1 - tanh**2 further out) the slope keeps its digits; a saturated target logit still has its loss."""
    from fastce.kernels import triton_ce

    spec = LossSpec(softcap=3.0, label_smoothing=0.1)
    logits = random_logits((1, 2, V), torch.float32, device)
    logits[0, :, :5] = torch.tensor([1e4, -1e4, -float("inf"), 30.0, -30.0], device=device)
    targets = torch.tensor([[0, 4]], device=device)
    losses = torch.full((1, 2), float("nan"), device=device)
    grad = torch.full_like(logits, float("nan"))
    triton_ce.cross_entropy_fwd(logits, targets, torch.tensor(1.0, dtype=torch.float64, device=device), losses, grad,
                                -100, spec=spec, num_splits=num_splits)
    options = _option_kwargs(spec)
    torch.testing.assert_close(losses.double(), cross_entropy_reference(logits, targets, **options), rtol=1e-6,
                               atol=1e-6)
    assert torch.isfinite(grad).all() and (grad[0, :, :3] == 0).all()
    assert_grad_close(grad, cross_entropy_grad_reference(logits, targets, **options),
                      terms64=gradient_terms(logits, targets, **options))
