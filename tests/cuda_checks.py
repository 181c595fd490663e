"""Shared pieces of the CUDA backend's GPU tests (test_cuda_backend.py, test_cuda_options.py): the fixtures that load
the extension and force each launch path, the launch helpers that poison every output first, and the float64
checks."""
import pytest
import torch

from fastce.kernels import cuda_ce
from fastce.reference import cross_entropy_grad_reference, cross_entropy_reference, row_stats_reference
from fastce.spec import PLAIN, LossSpec

from helpers import assert_grad_close, gradient_terms, random_logits

IGNORE = -100
gpu = pytest.mark.gpu


@pytest.fixture
def ops():
    try:
        cuda_ce.load_extension()
    except RuntimeError as exc:
        pytest.skip(f"the CUDA extension is not loadable here: {exc}")
    return torch.ops.fastce_cuda


@pytest.fixture
def cuda_ops(ops):
    if cuda_ce.unavailable_reason() is not None:
        pytest.skip(cuda_ce.unavailable_reason())
    return ops


# -- GPU: the kernels against float64 ---------------------------------------------------------------------------------

# Launch paths, forced through environment variables the launcher reads at every launch: "auto" is the shape's own
# choice (the cluster path on sm_90 and newer; forward only, per-block partial stats merged by a second kernel);
# "cluster2" is the cluster path with 2 vectors per thread, so that small vocabularies span clusters of several
# blocks; "cluster2-fwd" also runs forward-only calls in clusters; "rows" is one block per row; "split" cuts each
# row's vocabulary into about 5 blocks (fewer when V is small). shard_stats takes the forward-only launch of each
# path; shard_grad cuts each range into 1 ("rows") or about 5 ("split") blocks, else as many as its length needs.
PATHS = {
    "auto": {},
    "cluster2": {"FASTCE_CUDA_CLUSTER": "2"},
    "cluster2-fwd": {"FASTCE_CUDA_CLUSTER": "2", "FASTCE_CUDA_FWD_PARTIALS": "0"},
    "rows": {"FASTCE_CUDA_CLUSTER": "0", "FASTCE_CUDA_NUM_SPLITS": "1"},
    "split": {"FASTCE_CUDA_CLUSTER": "0", "FASTCE_CUDA_NUM_SPLITS": "5"},
}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    for name in ("FASTCE_CUDA_CLUSTER", "FASTCE_CUDA_NUM_SPLITS", "FASTCE_CUDA_FWD_PARTIALS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in PATHS[request.param].items():
        monkeypatch.setenv(name, value)
    return request.param


def _outputs(logits, targets, grad, spec=PLAIN):
    """NaN-poisoned (losses, grad, row_stats) for a launch; grad: "new", "inplace" (logits), None or a tensor."""
    losses = torch.full(targets.shape, float("nan"), device=logits.device)
    if isinstance(grad, str) and grad == "new":
        grad = torch.full(logits.shape, float("nan"), dtype=logits.dtype, device=logits.device)
    elif isinstance(grad, str) and grad == "inplace":
        grad = logits
    row_stats = torch.full((*targets.shape, 3), float("nan"), device=logits.device) if spec.stats else None
    return losses, grad, row_stats


def run(logits, targets, divisor=1.0, grad="new", launchers=cuda_ce):
    """The launcher's (losses, grad), written into NaN-poisoned outputs. grad: "new", "inplace" (logits) or None."""
    losses, grad, _ = _outputs(logits, targets, grad)
    divisor = torch.tensor(divisor, dtype=torch.float64, device=logits.device)
    launchers.cross_entropy_fwd(logits, targets, divisor, losses, grad, IGNORE)
    return losses, grad


def run_spec(logits, targets, spec, divisor=1.0, grad="new"):
    """As ``run``, with the options of ``spec`` (row statistics too, for ``spec.stats``): (losses, grad, row_stats)."""
    losses, grad, row_stats = _outputs(logits, targets, grad, spec)
    divisor = torch.tensor(divisor, dtype=torch.float64, device=logits.device)
    cuda_ce.cross_entropy_fwd(logits, targets, divisor, losses, grad, IGNORE, None, spec=spec, row_stats=row_stats)
    return losses, grad, row_stats


def check(logits, targets, losses, grad, divisor=1.0):
    """losses and grad against float64, given the logits as they were before the launch."""
    check_spec(logits, targets, PLAIN, losses, grad, None, divisor)


def reference_options(spec):
    """The float64 references' keywords for ``spec``."""
    return {"softcap": spec.softcap or None, "label_smoothing": spec.label_smoothing, "z_loss": spec.z_loss}


def check_spec(logits, targets, spec, losses, grad, row_stats, divisor=1.0):
    """losses, grad and row_stats (each may be None) against float64, given the logits as they were before the
    launch: losses to 1e-6, the gradient at the rounding level of its dtype (plus float32 rounding of the terms that
    cancel, with label smoothing), lse and entropy to 1e-6 and 1e-5, correct exactly."""
    options = reference_options(spec)
    if losses is not None:
        expected = cross_entropy_reference(logits, targets, IGNORE, **options)
        assert torch.equal(torch.isnan(losses), torch.isnan(expected)), "NaN losses where the reference has none or not"
        torch.testing.assert_close(losses.double(), expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    if grad is not None:
        terms = gradient_terms(logits, targets, divisor, IGNORE, **options) if not spec.plain else None
        assert_grad_close(grad, cross_entropy_grad_reference(logits, targets, divisor, IGNORE, **options),
                          terms64=terms)
    if row_stats is not None:
        lse, entropy, correct = row_stats_reference(logits, targets, IGNORE, softcap=options["softcap"])
        torch.testing.assert_close(row_stats[..., 0].double(), lse, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(row_stats[..., 1].double(), entropy, rtol=1e-5, atol=1e-5)
        assert torch.equal(row_stats[..., 2], correct.float()), "correct must be exactly 1.0 or 0.0, as the reference"
        assert torch.equal(row_stats[targets == IGNORE], torch.zeros_like(row_stats[targets == IGNORE]))


def labels(B, T, V, device="cuda", dtype=torch.int64):
    """Random targets with one ignored row (when there are two or more)."""
    targets = torch.randint(0, V, (B, T), device=device, dtype=dtype)
    if B * T > 1:
        targets[-1, -1] = IGNORE
    return targets


def small_case(V, dtype):
    """(logits [2, 3, V], targets, divisor, losses) on the GPU."""
    return (random_logits((2, 3, V), dtype, "cuda"), labels(2, 3, V),
            torch.tensor(4.0, dtype=torch.float64, device="cuda"), torch.empty(2, 3, device="cuda"))


# (B, T, V): V=1; V smaller than a vector; odd V (no row is 16-byte aligned); T=1; a vocabulary a little over a
# vector multiple; Llama-3's 128256; more rows than SMs, so that "auto" takes the row path (without clusters);
# 65536, whose aligned rows fill whole cluster blocks exactly (2 blocks of 8 vectors x 512 threads in bf16).
SHAPES = [(1, 1, 1), (2, 3, 3), (1, 4, 127), (2, 5, 32003), (3, 1, 8200), (1, 3, 128256), (2, 160, 4000),
          (2, 2, 65536)]

# The loss options one at a time, the row statistics alone (the options kernels with no option), and all together.
OPTIONS = {
    "softcap": LossSpec(softcap=2.5),
    "smoothing": LossSpec(label_smoothing=0.1),
    "z-loss": LossSpec(z_loss=1e-3),
    "stats": LossSpec(stats=True),
    "all": LossSpec(softcap=4.0, label_smoothing=0.25, z_loss=3e-3, stats=True),
}
# (B, T, V) for the options: V=1 (the target coefficient 1 - e + e/V is exactly 1); odd V (no row 16-byte aligned);
# a vocabulary over a vector multiple; Llama-3's 128256 (clusters of 4 blocks); more rows than SMs ("auto": the row
# path without clusters); 65536 (aligned rows fill 2 cluster blocks exactly).
OPTION_SHAPES = [(2, 3, 1), (1, 4, 127), (2, 5, 32003), (1, 3, 128256), (2, 160, 4000), (2, 2, 65536)]
