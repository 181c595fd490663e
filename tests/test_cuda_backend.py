"""The CUDA C++ backend's kernels (csrc/, fastce.kernels.cuda_ce) on a GPU.

The launchers against the float64 references (fastce/reference.py, and fastce/stats.py for merged shard statistics),
with every output poisoned (NaN) first, on every launch path (the cluster path, its forward-only partials, one block
per row, and the vocabulary split over several blocks), with and without the loss options; the shard ops on column
ranges of every alignment; the Triton launchers on the same inputs; the errors a caller's mistake raises. The
extension's registration (schemas, fakes, torch.compile, opcheck): test_cuda_extension.py.
"""
import pytest
import torch

from fastce.kernels import cuda_ce
from fastce.spec import PLAIN

from cuda_checks import (IGNORE, OPTIONS, SHAPES, check, check_spec, cuda_ops, gpu, labels, ops, path,  # noqa: F401
                         run, run_spec, small_case)
from helpers import random_logits, requires_cuda

@gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_losses_and_grad(cuda_ops, path, dtype, shape):
    logits = random_logits(shape, dtype, "cuda")
    targets = labels(*shape)
    losses, grad = run(logits, targets, divisor=3.0)
    check(logits, targets, losses, grad, divisor=3.0)
    losses_only, _ = run(logits, targets, grad=None)  # "auto" may pick another path without a gradient
    torch.testing.assert_close(losses_only, losses, rtol=1e-6, atol=1e-6, equal_nan=True)


@gpu
@requires_cuda
@pytest.mark.parametrize("option", ["plain", "all"])
@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("divisor", [0.0, 7.5])
def test_target_dtypes_and_divisor(cuda_ops, path, target_dtype, divisor, option):
    """The gradient is divided by the divisor; a zero divisor makes the gradient of every row that is not ignored
    NaN (a zero count with targets that are not ignored contradicts itself), and ignored rows still get zeros."""
    spec = OPTIONS.get(option, PLAIN)
    logits = random_logits((2, 7, 1000), torch.bfloat16, "cuda")
    targets = labels(2, 7, 1000, dtype=target_dtype)
    targets[0, 3] = 1000  # out of range: NaN loss, and with a zero divisor a NaN gradient like the other rows
    losses, grad, row_stats = run_spec(logits, targets, spec, divisor=divisor)
    if divisor == 0.0:
        kept = targets != IGNORE
        assert torch.isnan(grad[kept]).all(), "a zero divisor must make the gradient of the rows not ignored NaN"
        assert torch.equal(grad[~kept], torch.zeros_like(grad[~kept])), "ignored rows must get exact zeros"
        grad = None
    check_spec(logits, targets, spec, losses, grad, row_stats, divisor=divisor)


@gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_out_of_range_targets_give_nan_and_read_nothing_outside(cuda_ops, path, dtype):
    V = 3001
    # The rows are slices of a wider buffer whose other columns are huge: a read outside a row would move its
    # loss far from the reference. The slice also starts one element in, so no row is 16-byte aligned.
    buffer = random_logits((2, 4, V + 40), dtype, "cuda")
    buffer[..., 0] = 1e30
    buffer[..., V + 1:] = 1e30
    logits = buffer[..., 1:V + 1]
    targets = torch.tensor([[V, -1, 2**40, 5], [-(2**40), IGNORE, V - 1, 0]], device="cuda")
    losses, grad = run(logits, targets, divisor=2.0)
    assert torch.isnan(losses[0, :3]).all() and torch.isnan(losses[1, 0])
    check(logits, targets, losses, grad, divisor=2.0)
    targets32 = torch.tensor([[V, -1, 2**31 - 1, 5], [-(2**31), IGNORE, V - 1, 0]], device="cuda", dtype=torch.int32)
    losses, grad = run(logits, targets32, divisor=2.0)
    check(logits, targets32, losses, grad, divisor=2.0)


@gpu
@requires_cuda
def test_all_ignored(cuda_ops, path):
    logits = random_logits((2, 3, 5000), torch.bfloat16, "cuda")
    targets = torch.full((2, 3), IGNORE, device="cuda")
    losses, grad = run(logits, targets)
    assert torch.equal(losses, torch.zeros_like(losses))
    assert torch.equal(grad, torch.zeros_like(grad))


@gpu
@requires_cuda
@pytest.mark.parametrize("V", [4096, 4099], ids=["V4096", "V4099"])
def test_strided_rows_and_strided_grad(cuda_ops, path, V):
    """Rows of slices and transposes (two independent row strides), targets and grad with their own strides; with
    an odd V the logits and grad rows are misaligned differently, and the gradient pass goes scalar."""
    logits = random_logits((9, 2, V), torch.bfloat16, "cuda").transpose(0, 1)[:, 1:]  # [2, 8, V]
    targets = labels(8, 2, V).t()
    grad = torch.full((2, 11, V), float("nan"), dtype=torch.bfloat16, device="cuda")[:, 3:]
    losses, grad = run(logits, targets, grad=grad)
    check(logits, targets, losses, grad)


@gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("V", [5, 32003, 128256])
def test_in_place_grad(cuda_ops, path, dtype, V):
    logits = random_logits((2, 3, V), dtype, "cuda")[:, 1:]  # a slice: in place into a view
    before = logits.clone()
    targets = labels(2, 2, V)
    targets[0, 0] = V  # out of range: the loss is NaN, the row still gets softmax
    losses, grad = run(logits, targets, divisor=5.0, grad="inplace")
    assert grad is logits
    check(before, targets, losses, logits, divisor=5.0)


@gpu
@requires_cuda
@pytest.mark.parametrize("grad", ["new", "inplace", None])
def test_few_rows_large_vocab(cuda_ops, grad):
    """8 rows of a 256000 vocabulary: far fewer rows than SMs, so the default splits every row over many blocks."""
    logits = random_logits((2, 4, 256000), torch.bfloat16, "cuda")
    before = logits.clone()
    targets = labels(2, 4, 256000)
    targets[0, 1] = 256000
    losses, grad = run(logits, targets, divisor=8.0, grad=grad)
    check(before, targets, losses, grad, divisor=8.0)


@gpu
@requires_cuda
def test_deterministic(cuda_ops, path):
    logits = random_logits((4, 50, 50257), torch.bfloat16, "cuda")
    targets = labels(4, 50, 50257)
    first = run(logits, targets)
    second = run(logits, targets)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@gpu
@requires_cuda
def test_empty_rows(cuda_ops):
    for shape in [(0, 4, 10), (3, 0, 10)]:
        logits = torch.randn(shape, device="cuda")
        losses, grad = run(logits, torch.zeros(shape[:2], dtype=torch.long, device="cuda"))
        assert losses.numel() == 0 and grad.numel() == 0
        cuda_ce.scale_grad_(grad, torch.tensor(2.0, device="cuda"))


@gpu
@requires_cuda
@pytest.mark.slow
def test_more_than_2_31_elements(cuda_ops):
    """N x V > 2^31 (4.3 GB of bf16 logits): the last 16 rows lie wholly beyond element 2^31."""
    B, T, V = 2, 8200, 131075  # odd V: no row but the first is 16-byte aligned
    assert B * T * V > 2**31 + 16 * V
    logits = torch.randn(B, T, V, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, V, (B, T), device="cuda")
    targets[-1, -3] = IGNORE
    targets[-1, -1] = V - 1
    losses, grad = run(logits, targets)
    assert not torch.isnan(grad).any(), "some gradient elements were not written"
    assert torch.isnan(losses).sum() == 0
    row_sums = grad.sum(dim=-1, dtype=torch.float32)  # 0 for every row: softmax sums to 1, the one-hot to 1
    assert row_sums.abs().max() < 1e-2
    for b, t in [(0, 0), (0, T - 1), (1, 0), (1, T - 17), (1, T - 3), (1, T - 1)]:
        check(logits[b:b + 1, t:t + 1], targets[b:b + 1, t:t + 1], losses[b:b + 1, t:t + 1], grad[b:b + 1, t:t + 1])


@gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_triton(cuda_ops, dtype):
    triton_ce = pytest.importorskip("fastce.kernels.triton_ce")
    logits = random_logits((2, 70, 32003), dtype, "cuda")
    targets = labels(2, 70, 32003)
    targets[0, 0] = -5
    cuda_losses, cuda_grad = run(logits, targets, divisor=11.0)
    triton_losses, triton_grad = run(logits, targets, divisor=11.0, launchers=triton_ce)
    torch.testing.assert_close(cuda_losses, triton_losses, rtol=2e-6, atol=2e-6, equal_nan=True)
    # Each gradient is within the tolerance of tests/helpers.py of the float64 one, so within twice it of the other
    # (bf16: both round nearly the same float32 value, at most one unit in the last place apart).
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(cuda_grad, triton_grad, rtol=(128 if dtype == torch.float32 else 1) * eps, atol=1e-30)


# -- GPU: scale_grad_ ------------------------------------------------------------------------------------------------


@gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("V", [7, 4099, 128256])
def test_scale_grad_per_row(cuda_ops, dtype, V):
    grad = random_logits((3, 5, V), dtype, "cuda")[:, 1:]
    factor = (torch.rand(4, 3, device="cuda") + 0.5).t()  # [3, 4], non-contiguous
    factor[0, 1] = 1.0
    factor[2, 3] = 1.0
    # Rows with factor 1 must not be rewritten: give them a NaN payload that a rewrite would not keep.
    raw = grad.view(torch.int16) if dtype != torch.float32 else grad.view(torch.int32)
    raw[0, 1] = 0x7FA1 if dtype != torch.float32 else 0x7FA00001
    raw[2, 3] = 0x7FA1 if dtype != torch.float32 else 0x7FA00001
    before = grad.clone()
    cuda_ce.scale_grad_(grad, factor)
    expected = (before.float() * factor.unsqueeze(-1)).to(dtype)
    same = factor != 1
    assert torch.equal(grad[same], expected[same])
    assert torch.equal(raw[~same], before.view(raw.dtype)[~same])


@gpu
@requires_cuda
@pytest.mark.parametrize("value", [0.25, 1.0])
def test_scale_grad_scalar(cuda_ops, value):
    grad = random_logits((2, 6, 50257), torch.bfloat16, "cuda")
    grad.view(torch.int16)[1, 2, :9] = 0x7FA1  # NaN payload: kept only if the row is not rewritten
    before = grad.clone()
    cuda_ce.scale_grad_(grad, torch.tensor(value, device="cuda"))
    if value == 1.0:
        assert torch.equal(grad.view(torch.int16), before.view(torch.int16))
    else:
        expected = (before.float() * value).to(torch.bfloat16)
        numbers = ~torch.isnan(before)
        assert torch.equal(grad.view(torch.int16)[numbers], expected.view(torch.int16)[numbers])


# -- GPU: errors, compile, opcheck -----------------------------------------------------------------------------------


@gpu
@requires_cuda
def test_user_errors_raise(cuda_ops):
    logits, targets, divisor, losses = small_case(64, torch.bfloat16)
    with pytest.raises(RuntimeError, match="grad must have the logits' dtype"):
        cuda_ce.cross_entropy_fwd(logits, targets, divisor, losses, logits.float(), IGNORE)
    with pytest.raises(RuntimeError, match="stride"):
        cuda_ce.cross_entropy_fwd(logits.transpose(1, 2), targets[:, :1].expand(2, 64), divisor,
                                  torch.empty(2, 64, device="cuda"), None, IGNORE)
    with pytest.raises(RuntimeError, match="divisor"):
        cuda_ce.cross_entropy_fwd(logits, targets, divisor.float(), losses, None, IGNORE)
    with pytest.raises(RuntimeError, match="targets"):
        cuda_ce.cross_entropy_fwd(logits, targets.float(), divisor, losses, None, IGNORE)
    buffer = torch.empty(2 * 3 * 64 + 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="overlap"):  # grad one row after the logits, in the same memory
        cuda_ce.cross_entropy_fwd(buffer[:384].view(2, 3, 64), targets, divisor, losses, buffer[64:].view(2, 3, 64),
                                  IGNORE)
    with pytest.raises(RuntimeError, match="grad_output"):
        cuda_ce.scale_grad_(logits, torch.ones(3, 2, device="cuda"))


@gpu
@requires_cuda
def test_user_errors_raise_with_options_and_shards(cuda_ops):
    ops = cuda_ops
    logits, targets, divisor, losses = small_case(64, torch.bfloat16)
    with pytest.raises(RuntimeError, match="label_smoothing"):
        ops.cross_entropy_fwd(logits, targets, divisor, losses, None, IGNORE, None, 0.0, 1.5, 0.0)
    with pytest.raises(RuntimeError, match="softcap"):
        ops.cross_entropy_fwd(logits, targets, divisor, losses, None, IGNORE, None, float("inf"), 0.0, 0.0)
    with pytest.raises(RuntimeError, match="row_stats"):
        cuda_ce.cross_entropy_fwd(logits, targets, divisor, losses, None, IGNORE, spec=OPTIONS["all"],
                                  row_stats=torch.empty(2, 3, 3, device="cuda").transpose(0, 1).contiguous())
    stats = torch.empty(2, 3, 5, device="cuda")
    with pytest.raises(RuntimeError, match="vocab_start"):
        cuda_ce.shard_stats(logits, targets, -1, IGNORE, stats, PLAIN)
    with pytest.raises(RuntimeError, match="stats must be a contiguous"):
        cuda_ce.shard_stats(logits, targets, 0, IGNORE, torch.empty(2, 5, 3, device="cuda").transpose(1, 2), PLAIN)
    row = torch.rand(2, 3, 3, device="cuda")
    with pytest.raises(RuntimeError, match="row must be"):
        cuda_ce.shard_grad(logits, targets, 0, 64, IGNORE, row.double(), logits, PLAIN)
    with pytest.raises(RuntimeError, match="vocab_size"):
        cuda_ce.shard_grad(logits, targets, 0, 0, IGNORE, row, logits, PLAIN)
    buffer = torch.empty(2 * 3 * 64 + 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="overlap"):
        cuda_ce.shard_grad(buffer[:384].view(2, 3, 64), targets, 0, 64, IGNORE, row, buffer[64:].view(2, 3, 64), PLAIN)
