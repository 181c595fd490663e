"""The CUDA C++ backend (csrc/, fastce.kernels.cuda_ce).

On any machine where fastce._C is built: the library loads, the op schemas are the documented ones, and the fake
implementations trace (meta tensors, FakeTensorMode, torch.export). On a GPU: the launchers against a float64
reference, with every output poisoned (NaN) first, on both launch paths (one block per row, and the vocabulary
split over several blocks), plus the Triton launchers on the same inputs, torch.compile and opcheck.
"""
import subprocess
import sys

import pytest
import torch

from fastce.kernels import cuda_ce
from fastce.reference import cross_entropy_grad_reference, cross_entropy_reference

from helpers import assert_grad_close, random_logits, requires_cuda

IGNORE = -100
CROSS_ENTROPY_SCHEMA = (
    "fastce_cuda::cross_entropy_fwd(Tensor logits, Tensor targets, Tensor divisor, Tensor(a!) losses, "
    "Tensor(b!)? grad, int ignore_index, Tensor? skip=None) -> ()"
)
SCALE_GRAD_SCHEMA = "fastce_cuda::scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()"

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


# -- any machine -----------------------------------------------------------------------------------------------------


def test_import_builds_and_loads_nothing():
    code = (
        "import sys, fastce; from fastce.kernels import cuda_ce; "
        "assert 'fastce._C' not in sys.modules and cuda_ce._load_error is None"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unavailable_reason_is_none_or_a_sentence():
    reason = cuda_ce.unavailable_reason()
    assert reason is None or (isinstance(reason, str) and len(reason) > 20)
    if not torch.cuda.is_available():
        assert reason is not None


def test_unbuilt_extension_says_so(monkeypatch):
    def missing(name, *args, **kwargs):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(cuda_ce, "_load_error", None)
    monkeypatch.setattr(cuda_ce.importlib, "import_module", missing)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = cuda_ce.unavailable_reason()
    assert reason is not None and "fastce._C was not built" in reason
    with pytest.raises(RuntimeError, match="was not built"):
        cuda_ce.cross_entropy_fwd(None, None, None, None, None, IGNORE)


def test_op_schemas(ops):
    assert str(ops.cross_entropy_fwd.default._schema) == CROSS_ENTROPY_SCHEMA
    assert str(ops.scale_grad_.default._schema) == SCALE_GRAD_SCHEMA


def _meta_args(B=2, T=3, V=11, dtype=torch.bfloat16, device="meta"):
    return (
        torch.empty(B, T, V, dtype=dtype, device=device),
        torch.empty(B, T, dtype=torch.int64, device=device),
        torch.empty((), dtype=torch.float64, device=device),
        torch.empty(B, T, dtype=torch.float32, device=device),
        torch.empty(B, T, V, dtype=dtype, device=device),
    )


def test_fakes_on_meta_tensors(ops):
    logits, targets, divisor, losses, grad = _meta_args()
    assert ops.cross_entropy_fwd(logits, targets, divisor, losses, grad, IGNORE) is None
    assert ops.cross_entropy_fwd(logits, targets, divisor, losses, None, IGNORE) is None
    assert ops.scale_grad_(grad, torch.empty(2, 3, device="meta")) is None
    assert ops.scale_grad_(grad, torch.empty((), device="meta")) is None


def test_fakes_check_shapes(ops):
    logits, targets, divisor, losses, grad = _meta_args()
    with pytest.raises(RuntimeError, match="targets"):
        ops.cross_entropy_fwd(logits, targets[:, :2], divisor, losses, grad, IGNORE)
    with pytest.raises(RuntimeError, match="losses"):
        ops.cross_entropy_fwd(logits, targets, divisor, losses.double(), grad, IGNORE)
    with pytest.raises(RuntimeError, match="grad"):
        ops.cross_entropy_fwd(logits, targets, divisor, losses, grad.float(), IGNORE)
    with pytest.raises(RuntimeError, match="grad_output"):
        ops.scale_grad_(grad, torch.empty(3, 2, device="meta"))


def test_fakes_under_fake_tensor_mode(ops):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits, targets, divisor, losses, grad = _meta_args(device="cpu")
        ops.cross_entropy_fwd(logits, targets, divisor, losses, grad, IGNORE)
        ops.scale_grad_(grad, torch.empty((), dtype=torch.float32))
        assert grad.shape == logits.shape and losses.dtype == torch.float32


def test_export_functionalizes_both_mutations(ops):
    """torch.export traces with the fakes (no kernel runs) and turns both mutations into functional outputs,
    as torch.compile does: the schema's optional mutable grad is understood."""

    class Step(torch.nn.Module):
        def forward(self, logits, targets, divisor, losses, grad):
            ops.cross_entropy_fwd(logits, targets, divisor, losses, grad, IGNORE)
            ops.cross_entropy_fwd(logits, targets, divisor, losses, None, IGNORE)
            ops.scale_grad_(grad, divisor.float())
            return losses, grad

    args = (torch.randn(2, 3, 11), torch.zeros(2, 3, dtype=torch.long), torch.tensor(2.0, dtype=torch.float64),
            torch.empty(2, 3), torch.empty(2, 3, 11))
    graph = torch.export.export(Step(), args).run_decompositions().graph_module.code
    assert graph.count("auto_functionalized") >= 3 and "fastce_cuda.cross_entropy_fwd" in graph


def test_cpu_tensors_are_not_dispatched(ops):
    logits, targets, divisor, losses, grad = _meta_args(device="cpu")
    with pytest.raises(NotImplementedError):
        ops.cross_entropy_fwd(logits, targets, divisor, losses, grad, IGNORE)


# -- GPU: the kernels against float64 ---------------------------------------------------------------------------------

# Launch paths, forced through environment variables the launcher reads at every launch: "auto" is the shape's own
# choice (the cluster path on sm_90 and newer; forward only, per-block partial stats merged by a second kernel);
# "cluster2" is the cluster path with 2 vectors per thread, so that small vocabularies span clusters of several
# blocks; "cluster2-fwd" also runs forward-only calls in clusters; "rows" is one block per row; "split" cuts each
# row's vocabulary into about 5 blocks (fewer when V is small).
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


def reference_grad(logits, targets, divisor, ignore_index=IGNORE):
    return cross_entropy_grad_reference(logits, targets, divisor, ignore_index)


def run(logits, targets, divisor=1.0, grad="new", launchers=cuda_ce):
    """The launcher's (losses, grad), written into NaN-poisoned outputs. grad: "new", "inplace" (logits) or None."""
    losses = torch.full(targets.shape, float("nan"), device=logits.device)
    if grad == "new":
        grad = torch.full(logits.shape, float("nan"), dtype=logits.dtype, device=logits.device)
    elif grad == "inplace":
        grad = logits
    divisor = torch.tensor(divisor, dtype=torch.float64, device=logits.device)
    launchers.cross_entropy_fwd(logits, targets, divisor, losses, grad, IGNORE)
    return losses, grad


def check(logits, targets, losses, grad, divisor=1.0):
    """losses and grad against float64, given the logits as they were before the launch."""
    expected = cross_entropy_reference(logits, targets, IGNORE)
    assert torch.equal(torch.isnan(losses), torch.isnan(expected)), "NaN losses where the reference has none, or not"
    torch.testing.assert_close(losses.double(), expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    if grad is not None:
        assert_grad_close(grad, reference_grad(logits, targets, divisor))


def labels(B, T, V, device="cuda", dtype=torch.int64):
    """Random targets with one ignored row (when there are two or more)."""
    targets = torch.randint(0, V, (B, T), device=device, dtype=dtype)
    if B * T > 1:
        targets[-1, -1] = IGNORE
    return targets


# (B, T, V): V=1; V smaller than a vector; odd V (no row is 16-byte aligned); T=1; a vocabulary a little over a
# vector multiple; Llama-3's 128256; more rows than SMs, so that "auto" takes the row path (without clusters);
# 65536, whose aligned rows fill whole cluster blocks exactly (2 blocks of 8 vectors x 512 threads in bf16).
SHAPES = [(1, 1, 1), (2, 3, 3), (1, 4, 127), (2, 5, 32003), (3, 1, 8200), (1, 3, 128256), (2, 160, 4000),
          (2, 2, 65536)]


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
@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("divisor", [0.0, 7.5])
def test_target_dtypes_and_divisor(cuda_ops, path, target_dtype, divisor):
    logits = random_logits((2, 7, 1000), torch.bfloat16, "cuda")
    targets = labels(2, 7, 1000, dtype=target_dtype)
    losses, grad = run(logits, targets, divisor=divisor)
    check(logits, targets, losses, grad, divisor=divisor)


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


def small_case(V, dtype):
    """(logits [2, 3, V], targets, divisor, losses) on the GPU."""
    return (random_logits((2, 3, V), dtype, "cuda"), labels(2, 3, V),
            torch.tensor(4.0, dtype=torch.float64, device="cuda"), torch.empty(2, 3, device="cuda"))


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
def test_compile_fullgraph(cuda_ops):
    def loss_and_grad(logits, targets, divisor, grad_output):
        losses = logits.new_empty(logits.shape[:2], dtype=torch.float32)
        grad = torch.empty_like(logits)
        cuda_ce.cross_entropy_fwd(logits, targets, divisor, losses, grad, IGNORE)
        cuda_ce.scale_grad_(grad, grad_output)
        return losses, grad

    torch._dynamo.reset()
    compiled = torch.compile(loss_and_grad, fullgraph=True)
    logits = random_logits((2, 5, 1003), torch.bfloat16, "cuda")
    args = (logits, labels(2, 5, 1003), torch.tensor(4.0, dtype=torch.float64, device="cuda"),
            torch.tensor(0.5, device="cuda"))
    for actual, expected in zip(compiled(*args), loss_and_grad(*args)):
        assert torch.equal(actual, expected)


@gpu
@requires_cuda
def test_opcheck(cuda_ops):
    logits, targets, divisor, losses = small_case(37, torch.float32)
    grad = torch.empty_like(logits)
    torch.library.opcheck(cuda_ops.cross_entropy_fwd.default, (logits, targets, divisor, losses, grad, IGNORE))
    torch.library.opcheck(cuda_ops.cross_entropy_fwd.default, (logits, targets, divisor, losses, None, IGNORE))
    torch.library.opcheck(cuda_ops.scale_grad_.default, (logits.clone(), torch.rand(2, 3, device="cuda")))
