"""Small launches of every CUDA kernel, for compute-sanitizer (not collected by pytest):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python tests/gpu_memcheck_case.py

Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees a read one element past a row as
out of bounds. The cases include out-of-range and ignored targets, odd vocabularies, sliced rows, in-place
gradients, every launch path (the cluster path of sm_90, with 2 and 8 vectors per thread; one block per row; the
vocabulary split over blocks), each plain and with every loss option and the row statistics, the shard ops on
column ranges of the rows (misaligned, one column wide) and scale_grad_. Exits non-zero if a result is wrong;
memcheck reports any bad access on its own.
"""
import os

import torch

from fastce import stats as fstats
from fastce.kernels import cuda_ce
from fastce.spec import LossSpec

IGNORE = -100
OPTIONS = LossSpec(softcap=3.0, label_smoothing=0.1, z_loss=1e-3, stats=True)


def run_case(B, T, V, dtype, splits, inplace, slice_rows):
    """splits: vocabulary splits per row, forced through FASTCE_CUDA_NUM_SPLITS with the cluster path off (both read
    at every launch); "cluster2" / "cluster8": the cluster path with that many vectors per thread; None: auto."""
    os.environ.pop("FASTCE_CUDA_NUM_SPLITS", None)
    os.environ.pop("FASTCE_CUDA_CLUSTER", None)
    if isinstance(splits, str):
        os.environ["FASTCE_CUDA_CLUSTER"] = splits.removeprefix("cluster")
    elif splits is not None:
        os.environ["FASTCE_CUDA_CLUSTER"] = "0"
        os.environ["FASTCE_CUDA_NUM_SPLITS"] = str(splits)
    full = torch.randn(B, T + slice_rows, V, device="cuda", dtype=torch.float32).mul_(3).to(dtype)
    logits = full[:, slice_rows:]  # rows of a slice: not 16-byte aligned when V is odd
    targets = torch.randint(0, V, (B, T), device="cuda")
    targets[0, 0] = V  # out of range (above)
    targets[-1, -1] = -1  # out of range (below), not the ignore index
    if B * T > 2:
        targets[0, 1] = IGNORE
        targets[-1, 0] = 2**40
    expected = torch.logsumexp(logits.double(), -1) - logits.double().gather(
        -1, targets.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
    losses = torch.full((B, T), float("nan"), device="cuda")
    grad = logits if inplace else torch.full_like(logits, float("nan"))
    divisor = torch.tensor(3.0, dtype=torch.float64, device="cuda")
    # With every option first (in place, that reads the logits before the plain launch overwrites them).
    options_losses = torch.full((B, T), float("nan"), device="cuda")
    row_stats = torch.full((B, T, 3), float("nan"), device="cuda")
    cuda_ce.cross_entropy_fwd(logits, targets, divisor, options_losses.clone(), None, IGNORE, spec=OPTIONS,
                              row_stats=row_stats.clone())  # forward only
    run_shards(logits, targets, V)
    options_grad = torch.full_like(logits, float("nan")) if not inplace else logits.clone()
    cuda_ce.cross_entropy_fwd(logits if not inplace else options_grad, targets, divisor, options_losses, options_grad,
                              IGNORE, spec=OPTIONS, row_stats=row_stats)
    cuda_ce.cross_entropy_fwd(logits, targets, divisor, losses, grad, IGNORE)
    cuda_ce.cross_entropy_fwd(logits, targets, divisor, losses.clone(), None, IGNORE)  # forward only
    cuda_ce.scale_grad_(grad, torch.rand(B, T, device="cuda") + 0.5)
    cuda_ce.scale_grad_(grad, torch.tensor(1.0, device="cuda"))
    torch.cuda.synchronize()
    in_range = (targets >= 0) & (targets < V)
    ignored = targets == IGNORE
    assert torch.isnan(losses[~in_range & ~ignored]).all(), "an out-of-range target must give a NaN loss"
    assert (losses[ignored] == 0).all()
    torch.testing.assert_close(losses[in_range].double(), expected[in_range], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(grad).all(), "gradient not written everywhere"
    assert torch.isnan(options_losses[~in_range & ~ignored]).all() and (options_losses[ignored] == 0).all()
    assert not torch.isnan(row_stats).any() and torch.isfinite(options_grad).all(), "an output was left unwritten"


def run_shards(logits, targets, V):
    """shard_stats and shard_grad (in place, on a copy) on column ranges: one column, a misaligned middle, the rest."""
    B, T = targets.shape
    cuts = sorted({0, min(1, V), min(V // 3 + 1, V), V})
    parts = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        out = torch.full((B, T, fstats.STATS_FIELDS), float("nan"), device="cuda")
        cuda_ce.shard_stats(logits[..., lo:hi], targets, lo, IGNORE, out, OPTIONS)
        assert not out.isnan().any(), "shard statistics left unwritten"
        parts.append(out)
    merged = fstats.merge(torch.stack(parts))
    row = torch.stack((merged[..., 0], merged[..., 1], torch.full_like(merged[..., 0], 0.5)), dim=-1).contiguous()
    work = logits.clone()
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        cuda_ce.shard_grad(work[..., lo:hi], targets, lo, V, IGNORE, row, work[..., lo:hi], OPTIONS)
        fresh = torch.full_like(logits[..., lo:hi], float("nan"))
        cuda_ce.shard_grad(logits[..., lo:hi], targets, lo, V, IGNORE, row, fresh, OPTIONS)
        assert torch.isfinite(fresh).all(), "shard gradient left unwritten"


def run_direct() -> None:
    """The eager path's one-op forward (fastce_cuda::causal_lm_fwd): shifted and unshifted, int32 and int64 labels
    that are strided, out-of-range labels without validation, a bad target and a bad count with it, counts of every
    dtype, empty batches."""
    import fastce

    for B, T, V in [(2, 5, 33), (1, 1, 1), (0, 3, 7), (3, 700, 9)]:
        logits = torch.randn(B, T + 1, V, device="cuda")[:, 1:].requires_grad_()
        labels = torch.randint(0, V, (B, 2 * T), device="cuda")[:, ::2]
        for count in (None, 5, torch.tensor(5, device="cuda"), torch.tensor(5.0, device="cuda").double(),
                      torch.tensor([5], device="cuda").int()):
            fastce.causal_lm_loss(logits, labels.int(), num_items_in_batch=count).backward()
            fastce.cross_entropy(logits.detach(), labels, reduction="sum")
        fastce.causal_lm_loss(logits, labels, return_stats=True, softcap=3.0, label_smoothing=0.1).loss.backward()
        if B and T > 1:
            wild = labels.clone()
            wild[0, -1] = 1 << 40
            loss = fastce.causal_lm_loss(logits, wild, validate=False, shift_labels=wild)
            assert torch.isnan(loss), "an out-of-range target must make the loss NaN"
            for bad in ({"labels": wild}, {"num_items_in_batch": torch.tensor(-1, device="cuda")}):
                try:
                    fastce.causal_lm_loss(logits, bad.pop("labels", labels), shift_labels=None, **bad)
                except ValueError:
                    pass
                else:
                    raise AssertionError(f"no error for {bad}")
    torch.cuda.synchronize()


def main():
    torch.manual_seed(0)
    run_direct()
    cuda_ce.load_extension()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for V, splits in [(1, 1), (7, 1), (1001, 1), (1001, 3), (40003, 1), (40003, 4), (1, "cluster2"),
                          (1001, "cluster2"), (40003, "cluster2"), (40003, "cluster8"), (70001, "cluster8")]:
            for inplace in (False, True):
                run_case(2, 3, V, dtype, splits, inplace, slice_rows=1)
    run_case(1, 1, 5, torch.bfloat16, None, False, slice_rows=0)
    run_case(2, 4, 256000, torch.bfloat16, None, True, slice_rows=0)  # few rows: clusters of 8 blocks by default
    print("memcheck cases ran: compute-sanitizer's summary above says whether any access was bad")


if __name__ == "__main__":
    main()
