"""The fused lm_head's forward kernel (fastce/kernels/triton_linear.py): row statistics straight from the input and the
weight, against float64. On the CPU it runs in Triton's interpreter with small tiles (several tiles, K steps, exact
pieces and splits even at these sizes); the GPU tests run the H100 configurations at a model's width."""
import os

import pytest
import torch

import fastce
from fastce import linear as flinear
from fastce import stats as fstats
from fastce.reference import cross_entropy_reference, linear_logits_reference, row_stats_reference
from fastce.spec import LossSpec

from helpers import assert_loss_close, linear_inputs, strided_linear_inputs

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("needs a CUDA device or Triton's interpreter", allow_module_level=True)
triton_linear = pytest.importorskip("fastce.kernels.triton_linear")

OPTIONS = {"plain": {}, "all": {"softcap": 3.0, "label_smoothing": 0.15, "z_loss": 2e-3}}
CPU = [pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1"))]
GPU = [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs a CUDA device")])]


def _spec(options, stats=True):
    return LossSpec(options.get("softcap", 0.0), options.get("label_smoothing", 0.0), options.get("z_loss", 0.0), stats)


def _run(x, w, b, t, spec, vocab_start=0, ignore_index=-100, **kwargs):
    """The launcher on poisoned outputs: the merged [N, 5] statistics, every record written."""
    N, V = x.shape[0], w.shape[0]
    splits, _, _ = triton_linear.plan(N, V, x.device, kwargs.get("config"), kwargs.get("num_splits"), x.shape[1],
                                      x.element_size())
    out = fstats.empty_stats((N,), x.device)
    partials = fstats.empty_stats((N, splits), x.device) if splits > 1 else None
    triton_linear.linear_stats(x, w, b, t, vocab_start, ignore_index, out, spec, partials=partials, **kwargs)
    assert not out.isnan().any(), "a statistic was left unwritten"
    if partials is not None:
        assert not partials.isnan().any(), "a split's record was left unwritten"
    return out


def _check(out, x, w, b, t, options, vocab_size=None, ignore_index=-100):
    """Losses and row statistics from the merged statistics against float64."""
    spec = _spec(options)
    V = vocab_size or w.shape[0]
    losses, row_stats = fstats.finish(out, t, V, ignore_index, spec)
    logits = linear_logits_reference(x, w, b)
    expected = cross_entropy_reference(logits, t, ignore_index, **options)
    torch.testing.assert_close(losses.double(), expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    lse, entropy, correct = row_stats_reference(logits, t, ignore_index, softcap=options.get("softcap"))
    torch.testing.assert_close(row_stats[:, 0].double(), lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(row_stats[:, 1].double(), entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(row_stats[:, 2] != 0, correct)


# (N, D, V, config, splits): D = 72 is not a multiple of BLOCK_K (masked K steps, a short last piece); D = 64 is one
# piece of the 64-product pieces (the one-piece path); D = 160 is three pieces; odd V and N; V = 1; N = 1; many
# splits of small tiles (several launch groups); one split; the TMA's tensor descriptors (zeros past every end).
CASES = {
    "odd": (70, 72, 1001, None, None),
    "one-piece": (33, 64, 517, None, None),
    "three-pieces": (17, 160, 300, None, 1),
    "V1": (5, 16, 1, None, None),
    "N1": (1, 40, 129, None, None),
    "small-tiles": (45, 48, 700, "m16n32k16p32w4s1", 5),
    "tma": (50, 72, 700, "m32n64k32p64w4s1-tma", None),
    "tma-unaligned": (9, 20, 100, "m32n64k32p64w4s1-tma", None),  # rows of 40 bytes: pointer loads instead
}


@pytest.mark.parametrize("device", CPU)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_stats_match_float64(device, case, option):
    N, D, V, config, splits = CASES[case]
    x, w, b, t = linear_inputs(N, D, V, torch.bfloat16, device, bias=option == "all")
    t[N // 2] = -100  # ignored
    if N > 3:
        t[1] = V + 2  # out of range: NaN loss, no target logit
    out = _run(x, w, b, t, _spec(OPTIONS[option]), config=config, num_splits=splits)
    assert torch.equal(out[N // 2], torch.tensor([float("-inf"), 0, 0, 0, 0])), "an ignored row is not the identity"
    if N > 3:
        assert out[1, 2] == 0, "a target outside the vocabulary has a target logit"
    _check(out, x, w, b, t, OPTIONS[option])


@pytest.mark.parametrize("device", CPU)
def test_targets_at_tile_and_split_edges(device):
    """Targets on the first and last column of tiles (64 columns) and splits, and the last column of V."""
    N, D, V = 24, 32, 640
    x, w, b, t = linear_inputs(N, D, V, torch.float16, device)
    edges = torch.tensor([0, 63, 64, 127, 128, 191, 192, 255, 256, 319, 320, 383, 384, 447, 448, 511, 512, 575, 576,
                          638, 639, 639, 0, 1])
    t.copy_(edges)
    out = _run(x, w, b, t, _spec({}), num_splits=3)  # splits of 4, 4 and 2 tiles
    _check(out, x, w, b, t, {})


@pytest.mark.parametrize("device", CPU)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_vocab_shards_merge_to_the_whole_row(device, option):
    """Two shards of the vocabulary (the weight's rows are the ids [vocab_start, vocab_start + V)), merged: targets
    in either shard, a custom ignore_index."""
    N, D, V, cut = 30, 48, 900, 333
    x, w, b, t = linear_inputs(N, D, V, torch.bfloat16, device, bias=True)
    t[3] = 7  # ignore_index below
    spec = _spec(OPTIONS[option])
    parts = [_run(x, w[lo:hi], b[lo:hi], t, spec, vocab_start=lo, ignore_index=7) for lo, hi in ((0, cut), (cut, V))]
    _check(fstats.merge(torch.stack(parts)), x, w, b, t, OPTIONS[option], vocab_size=V, ignore_index=7)


@pytest.mark.parametrize("device", CPU)
def test_strided_input_and_int32_targets(device):
    N, D, V = 20, 40, 200
    x, w, _, t = strided_linear_inputs(N, D, V, device)
    out = _run(x, w, None, t, _spec(OPTIONS["all"]))
    _check(out, x, w, None, t, OPTIONS["all"])


@pytest.mark.parametrize("device", CPU)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_linear_cross_entropy_with_fused_forward(device, option, monkeypatch):
    """The public op with FUSED_FORWARD on: its forward takes the kernel (spied on), the loss and the backward (slab
    path: FUSED_BACKWARD off) are float64's."""
    monkeypatch.setattr(flinear, "FUSED_FORWARD", True)
    monkeypatch.setattr(flinear, "FUSED_BACKWARD", False)
    calls = []
    real = triton_linear.linear_stats
    monkeypatch.setattr(triton_linear, "linear_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    options = OPTIONS[option]
    N, D, V = 26, 40, 333
    x, w, b, t = linear_inputs(N, D, V, torch.bfloat16, device)
    t[[2, 9]] = -100
    h, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fastce.linear_cross_entropy(h, w, t, bias=b, backend="triton", **options)
    loss.backward()
    assert calls, "the fused forward did not run"
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = cross_entropy_reference(linear_logits_reference(hd, wd, b), t, **options).sum() / 24
    ref.backward()
    assert_loss_close(loss.detach(), ref.detach())
    assert float((h.grad.double() - hd.grad).norm() / hd.grad.norm()) < 2e-2  # bf16 gradients
    assert float((w.grad.double() - wd.grad).norm() / wd.grad.norm()) < 2e-2


def test_splits_fill_the_waves():
    mib = 1 << 20  # a 128-row tile of D = 4096 in bf16
    assert triton_linear.choose_splits(56, 1002, 132, mib) == 7  # 7165 x 128256 in 128 x 128 tiles on an H100
    assert triton_linear.choose_splits(64, 1002, 132, mib) == 6  # not 2 (one wave, but 64 MiB of input tiles at once)
    assert triton_linear.choose_splits(64, 1002, 132, 0) == 2
    assert triton_linear.choose_splits(8, 64, 132, mib) == 16  # 1024 x 8192: one wave of 128 programs
    assert triton_linear.choose_splits(3, 1, 132, mib) == 1
    for row_tiles, column_tiles in ((1, 5), (56, 1002), (512, 2004), (2, 3), (400, 3)):
        splits = triton_linear.choose_splits(row_tiles, column_tiles, 132, mib)
        assert 1 <= splits <= column_tiles
        assert row_tiles * mib <= 24 * mib or splits == column_tiles or -(-132 // splits) * mib <= 24 * mib


# GPU: a model's width, where the tensor cores' bias shows. cuBLAS's GEMM in pieces of 4096 / 2048 / 1024 products was
# 1.4e-6 / 7.1e-7 / 2.7e-7 off float64 at 1024 x 4096 x 8192 (benchmarks/NOTES.md, row 20): the bar of 2e-7 wants
# pieces of at most 512 (the p1024 configuration is there to be timed, not for this bar).
def _loss_rel_err(x, w, t, config):
    out = torch.empty(x.shape[0], 5, device=x.device)
    triton_linear.linear_stats(x, w, None, t, 0, -100, out, LossSpec(), config=config)
    losses, _ = fstats.finish(out, t, w.shape[0], -100, LossSpec())
    total = losses.double().sum()
    ref = cross_entropy_reference(linear_logits_reference(x, w), t).sum()
    return float((total - ref) / ref)


@pytest.mark.parametrize("device", GPU)
@pytest.mark.parametrize("config", [n for n, c in triton_linear.CONFIGS.items()
                                    if 0 < c.kwargs["PIECE_K"] <= 512 and c.kwargs["BLOCK_M"] >= 64])
@pytest.mark.parametrize("shape", [(1024, 4096, 8192), (2048, 8192, 4096)], ids=str)
def test_loss_exact_at_model_width(device, config, shape):
    N, D, V = shape
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, D, device=device, generator=g).bfloat16()
    w = (torch.randn(V, D, device=device, generator=g) * D ** -0.5 * 2).bfloat16()
    t = torch.randint(0, V, (N,), device=device, generator=g)
    err = _loss_rel_err(x, w, t, config)
    assert abs(err) <= 2e-7, f"{config}: loss relative error {err:.3g} against float64"


@pytest.mark.parametrize("device", GPU)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_stats_match_float64(device, option, dtype):
    """Odd sizes on the GPU configuration: masked K (D = 1000), partial tiles, ignored and out-of-range targets."""
    N, D, V = 333, 1000, 5001
    x, w, b, t = linear_inputs(N, D, V, dtype, device, bias=option == "all")
    t[[0, 100]] = -100
    t[5] = V
    t[6], t[7] = 0, V - 1
    out = _run(x, w, b, t, _spec(OPTIONS[option]))
    _check(out, x, w, b, t, OPTIONS[option])


@pytest.mark.parametrize("device", GPU)
def test_gpu_linear_cross_entropy_with_fused_forward(device, monkeypatch):
    monkeypatch.setattr(flinear, "FUSED_FORWARD", True)
    N, D, V = 1024, 4096, 8192
    x, w, _, t = linear_inputs(N, D, V, torch.bfloat16, device, bias=False)
    t[::7] = -100
    loss = fastce.linear_cross_entropy(x, w, t, backend="triton")
    ref = cross_entropy_reference(linear_logits_reference(x, w), t).sum() / int((t != -100).sum())
    assert abs(float(loss.double() - ref) / float(ref)) <= 5e-7  # the float32 loss adds its own rounding
