"""The CUDA C++ backend's loss options and two-phase ops on a GPU (the rest: test_cuda_backend.py): every option alone
and together, and the row statistics, on every launch path against the float64 references, with every output
poisoned first; the shard ops (statistics of column ranges merged by fastce/stats.py, the epilogue on each range) on
ranges of every alignment, in place and not, and on lm_head-sized slabs."""
import pytest
import torch

from fastce import stats as fstats
from fastce.kernels import cuda_ce
from fastce.reference import cross_entropy_grad_reference
from fastce.spec import PLAIN, LossSpec

from cuda_checks import (IGNORE, OPTION_SHAPES, OPTIONS, check_spec, cuda_ops, gpu, labels, ops, path,  # noqa: F401
                         reference_options, run, run_spec)
from helpers import assert_grad_close, gradient_terms, random_logits, requires_cuda


# -- GPU: the loss options and the row statistics --------------------------------------------------------------------


@gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", OPTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_options_losses_grad_and_stats(cuda_ops, path, option, dtype, shape):
    spec = OPTIONS[option]
    logits = random_logits(shape, dtype, "cuda")
    targets = labels(*shape)
    losses, grad, row_stats = run_spec(logits, targets, spec, divisor=3.0)
    check_spec(logits, targets, spec, losses, grad, row_stats, divisor=3.0)
    # Forward only: "auto" writes partial statistics per block on the cluster path, merged by a second kernel.
    losses, _, row_stats = run_spec(logits, targets, spec, grad=None)
    check_spec(logits, targets, spec, losses, None, row_stats)


@gpu
@requires_cuda
def test_row_stats_accuracy_and_ignored_rows(cuda_ops, path):
    """Targets made the argmax of their row count as correct (ties too), the others not; ignored rows get zeros."""
    spec = OPTIONS["all"]
    V = 5003
    logits = random_logits((3, 7, V), torch.bfloat16, "cuda")
    targets = labels(3, 7, V)
    targets[1] = IGNORE
    targets[2, 0] = V + 1  # out of range: NaN loss, correct 0
    rows = torch.arange(0, 21, 2, device="cuda")
    flat = logits.view(-1, V)
    chosen = targets.view(-1)[rows]
    keep = (chosen >= 0) & (chosen < V)
    flat[rows[keep], chosen[keep]] = 30.0
    flat[rows[keep][:1], (chosen[keep][:1] + 1) % V] = 30.0  # a tie with the target: still correct
    losses, grad, row_stats = run_spec(logits, targets, spec, divisor=2.0)
    check_spec(logits, targets, spec, losses, grad, row_stats, divisor=2.0)
    assert row_stats[..., 2].sum() >= 1 and not bool(row_stats[2, 0, 2])
    assert torch.equal(losses[1], torch.zeros_like(losses[1])) and torch.equal(grad[1], torch.zeros_like(grad[1]))


@gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("V", [5, 32003, 128256])
def test_options_in_place(cuda_ops, path, dtype, V):
    spec = OPTIONS["all"]
    logits = random_logits((2, 3, V), dtype, "cuda")[:, 1:]  # a slice: in place into a view
    before = logits.clone()
    targets = labels(2, 2, V)
    targets[0, 0] = V  # out of range: the loss is NaN, the gradient has no one-hot term
    losses, grad, row_stats = run_spec(logits, targets, spec, divisor=5.0, grad="inplace")
    assert grad is logits
    check_spec(before, targets, spec, losses, logits, row_stats, divisor=5.0)


@gpu
@requires_cuda
@pytest.mark.parametrize("option", ["smoothing", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_options_read_nothing_outside_the_rows(cuda_ops, path, option, dtype):
    """Rows of a wider buffer whose other columns are huge, one element in (no row 16-byte aligned): a read outside
    a row, or an element past its end that the sums do not leave out, would move the sum of the logits and the max
    far from the reference (with a softcap, a huge logit becomes the row's max)."""
    base = OPTIONS[option]
    spec = LossSpec(base.softcap, base.label_smoothing, base.z_loss, stats=True)
    V = 3001
    buffer = random_logits((2, 4, V + 40), dtype, "cuda")
    buffer[..., 0] = 1e30
    buffer[..., V + 1:] = 1e30
    logits = buffer[..., 1:V + 1]
    for targets in (torch.tensor([[V, -1, 2**40, 5], [-(2**40), IGNORE, V - 1, 0]], device="cuda"),
                    torch.tensor([[V, -1, 2**31 - 1, 5], [-(2**31), IGNORE, V - 1, 0]], device="cuda",
                                 dtype=torch.int32)):
        losses, grad, row_stats = run_spec(logits, targets, spec, divisor=2.0)
        assert torch.isnan(losses[0, :3]).all() and torch.isnan(losses[1, 0])
        assert not row_stats[0, :3, 2].any() and not row_stats[1, 0, 2]
        check_spec(logits, targets, spec, losses, grad, row_stats, divisor=2.0)


@gpu
@requires_cuda
@pytest.mark.parametrize("grad", ["new", "inplace", None])
def test_options_few_rows_large_vocab(cuda_ops, grad):
    """8 rows of a 256000 vocabulary: clusters of 8 blocks on sm_90 (partials forward only), else the split path."""
    spec = OPTIONS["all"]
    logits = random_logits((2, 4, 256000), torch.bfloat16, "cuda")
    before = logits.clone()
    targets = labels(2, 4, 256000)
    targets[0, 1] = 256000
    losses, grad, row_stats = run_spec(logits, targets, spec, divisor=8.0, grad=grad)
    check_spec(before, targets, spec, losses, grad, row_stats, divisor=8.0)


@gpu
@requires_cuda
def test_options_all_ignored(cuda_ops, path):
    logits = random_logits((2, 3, 5000), torch.bfloat16, "cuda")
    targets = torch.full((2, 3), IGNORE, device="cuda")
    losses, grad, row_stats = run_spec(logits, targets, OPTIONS["all"])
    assert torch.equal(losses, torch.zeros_like(losses))
    assert torch.equal(grad, torch.zeros_like(grad))
    assert torch.equal(row_stats, torch.zeros_like(row_stats))


@gpu
@requires_cuda
def test_plain_spec_takes_the_plain_kernels(cuda_ops, path):
    """spec=PLAIN is the launch without options, bit for bit; the options kernels without an option (row statistics
    alone) agree with it to rounding."""
    logits = random_logits((2, 7, 5003), torch.bfloat16, "cuda")
    targets = labels(2, 7, 5003)
    losses, grad = run(logits, targets, divisor=2.0)
    plain_losses, plain_grad, _ = run_spec(logits, targets, PLAIN, divisor=2.0)
    assert torch.equal(plain_losses, losses) and torch.equal(plain_grad, grad)
    stats_losses, stats_grad, _ = run_spec(logits, targets, OPTIONS["stats"], divisor=2.0)
    torch.testing.assert_close(stats_losses, losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats_grad, grad, rtol=torch.finfo(torch.bfloat16).eps, atol=1e-30)


@gpu
@requires_cuda
@pytest.mark.parametrize("option", ["plain", "all"])
def test_options_deterministic(cuda_ops, path, option):
    spec = OPTIONS.get(option, PLAIN)
    logits = random_logits((4, 20, 50257), torch.bfloat16, "cuda")
    targets = labels(4, 20, 50257)
    first = run_spec(logits, targets, spec)
    second = run_spec(logits, targets, spec)
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)


# -- GPU: the shard ops (statistics of column ranges, the epilogue on each range) -------------------------------------

SHARD_SPECS = {"plain": PLAIN, "all": LossSpec(softcap=3.0, label_smoothing=0.2, z_loss=0.01, stats=True)}
# (B, T, V, cuts): one range; uneven ranges starting at odd columns (misaligned slices), one a single column; ranges
# of several cluster blocks ("cluster2": 5 blocks of 2 vectors per thread; "auto": partials of 8); V = 1.
SHARD_CASES = {"one-range": (2, 3, 37, []), "uneven": (2, 5, 1001, [1, 400, 401]), "wide": (2, 3, 70001, [3, 40003]),
               "V1": (2, 2, 1, [])}


def _ranges(vocab, cuts):
    bounds = [0, *cuts, vocab]
    return list(zip(bounds[:-1], bounds[1:]))


def shard_targets(B, T, V, dtype=torch.int64):
    targets = torch.randint(0, V, (B, T), device="cuda", dtype=dtype)
    targets[0, 0] = IGNORE
    targets[-1, -1] = V + 2  # in no range: NaN loss, no one-hot, correct 0
    return targets


def capped64(logits, spec):
    x = logits.double()
    return x if not spec.softcap else spec.softcap * torch.tanh(x / spec.softcap)


@gpu
@requires_cuda
@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(SHARD_CASES))
@pytest.mark.parametrize("option", list(SHARD_SPECS))
def test_shard_stats_merge_to_the_whole_row(cuda_ops, path, option, case, dtype, target_dtype):
    spec = SHARD_SPECS[option]
    B, T, V, cuts = SHARD_CASES[case]
    logits = random_logits((B, T, V), dtype, "cuda")
    targets = shard_targets(B, T, V, target_dtype)
    ignored = targets == IGNORE
    x = capped64(logits, spec)
    parts = []
    for lo, hi in _ranges(V, cuts):
        out = fstats.empty_stats((B, T), "cuda")
        cuda_ce.shard_stats(logits[..., lo:hi], targets, lo, IGNORE, out, spec)
        assert not out.isnan().any(), "an output was left unwritten"
        identity = torch.tensor([float("-inf"), 0.0, 0.0, 0.0, 0.0], device="cuda")
        assert torch.equal(out[ignored], identity.expand_as(out[ignored]))
        here = (targets >= lo) & (targets < hi) & ~ignored
        x_t = x.gather(-1, torch.where(here, targets.long(), 0).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(out[..., 2].double(), torch.where(here, x_t, 0.0), rtol=1e-6, atol=1e-6)
        assert (out[..., 3] == 0).all() or spec.needs_sum_x
        assert (out[..., 4] == 0).all() or spec.needs_sum_px
        parts.append(out)
    losses, row_stats = fstats.finish(fstats.merge(torch.stack(parts)), targets, V, IGNORE, spec)
    check_spec(logits, targets, spec, losses, None, row_stats)


@gpu
@requires_cuda
def test_shard_stats_of_no_columns(cuda_ops):
    """An empty range (a rank's empty vocabulary shard): every row gets the identity of the merge."""
    logits = random_logits((2, 3, 8), torch.bfloat16, "cuda")[..., 5:5]
    out = fstats.empty_stats((2, 3), "cuda")
    cuda_ce.shard_stats(logits, shard_targets(2, 3, 8), 5, IGNORE, out, SHARD_SPECS["all"])
    assert torch.equal(out[..., 0], torch.full((2, 3), float("-inf"), device="cuda"))
    assert torch.equal(out[..., 1:], torch.zeros(2, 3, 4, device="cuda"))


@gpu
@requires_cuda
@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "inplace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(SHARD_CASES))
@pytest.mark.parametrize("option", list(SHARD_SPECS))
@pytest.mark.parametrize("splits", ["auto", "1", "5"])
def test_shard_grad_of_each_range(cuda_ops, monkeypatch, splits, option, case, dtype, inplace):
    """The epilogue on each range, given each whole row's float64 (max, sum) rounded to float32 and a per-row scale;
    each range in as many blocks as its length needs, in 1, or in about 5 (the only launch choice shard_grad has). A
    fresh grad beside a misaligned slice of the logits takes the scalar path."""
    monkeypatch.delenv("FASTCE_CUDA_NUM_SPLITS", raising=False)
    if splits != "auto":
        monkeypatch.setenv("FASTCE_CUDA_NUM_SPLITS", splits)
    spec = SHARD_SPECS[option]
    B, T, V, cuts = SHARD_CASES[case]
    logits = random_logits((B, T, V), dtype, "cuda")
    targets = shard_targets(B, T, V, torch.int32 if case == "uneven" else torch.int64)
    x = capped64(logits, spec)
    scale = torch.rand(B, T, device="cuda", dtype=torch.float64) + 0.5  # upstream gradient / divisor, per row
    row = torch.stack((x.amax(-1), torch.exp(x - x.amax(-1, keepdim=True)).sum(-1), scale), dim=-1).float()
    options = reference_options(spec)
    expected = cross_entropy_grad_reference(logits, targets, 1.0, IGNORE, **options) * scale.unsqueeze(-1)
    terms = gradient_terms(logits, targets, 1.0, IGNORE, **options) * scale.unsqueeze(-1)
    work = logits.clone()
    for lo, hi in _ranges(V, cuts):
        grad = work[..., lo:hi] if inplace else torch.full_like(logits[..., lo:hi], float("nan"))
        cuda_ce.shard_grad(work[..., lo:hi], targets, lo, V, IGNORE, row, grad, spec)
        assert_grad_close(grad, expected[..., lo:hi], terms64=terms[..., lo:hi])
        assert torch.equal(grad[targets == IGNORE], torch.zeros_like(grad[targets == IGNORE]))


@gpu
@requires_cuda
def test_shard_grad_of_lm_head_slabs(cuda_ops):
    """The shape the fused lm_head loss runs: float32 slabs of 16384 columns of 7168 rows, in place, and the
    statistics of the same slabs."""
    spec = SHARD_SPECS["all"]
    N, V, slab = 7168, 40000, 16384
    logits = random_logits((1, N, V), torch.float32, "cuda")
    targets = shard_targets(1, N, V)
    parts = []
    for lo in range(0, V, slab):
        out = fstats.empty_stats((1, N), "cuda")
        cuda_ce.shard_stats(logits[..., lo:lo + slab].contiguous(), targets, lo, IGNORE, out, spec)
        parts.append(out)
    merged = fstats.merge(torch.stack(parts))
    losses, row_stats = fstats.finish(merged, targets, V, IGNORE, spec)
    sample = slice(0, 700)  # the float64 references of a sample of the rows
    check_spec(logits[:, sample], targets[:, sample], spec, losses[:, sample], None, row_stats[:, sample])
    scale = torch.full((1, N), 0.25, device="cuda")
    row = torch.stack((merged[..., 0], merged[..., 1], scale), dim=-1).contiguous()
    expected = cross_entropy_grad_reference(logits[:, sample], targets[:, sample], 4.0, IGNORE,
                                            **reference_options(spec))
    terms = gradient_terms(logits[:, sample], targets[:, sample], 4.0, IGNORE, **reference_options(spec))
    for lo in range(0, V, slab):
        block = logits[..., lo:lo + slab].contiguous()
        cuda_ce.shard_grad(block, targets, lo, V, IGNORE, row, block, spec)
        assert_grad_close(block[:, sample], expected[..., lo:lo + slab], terms64=terms[..., lo:lo + slab])
