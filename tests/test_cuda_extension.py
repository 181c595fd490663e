"""The CUDA extension (csrc/, fastce.kernels.cuda_ce) as the dispatcher and torch.compile see it.

On any machine where fastce._C is built: the library loads, the op schemas are the documented ones, and the fake
implementations trace (meta tensors, FakeTensorMode, torch.export). On a GPU: torch.compile (fullgraph) and opcheck.
The kernels' numbers are tested in test_cuda_backend.py.
"""
import subprocess
import sys

import pytest
import torch

from fastce.kernels import cuda_ce

from cuda_checks import IGNORE, OPTIONS, cuda_ops, gpu, labels, ops, small_case  # noqa: F401
from helpers import random_logits, requires_cuda

CROSS_ENTROPY_SCHEMA = (
    "fastce_cuda::cross_entropy_fwd(Tensor logits, Tensor targets, Tensor divisor, Tensor(a!) losses, "
    "Tensor(b!)? grad, int ignore_index, Tensor? skip=None, float softcap=0., float label_smoothing=0., "
    "float z_loss=0., Tensor(c!)? row_stats=None) -> ()"
)
SHARD_STATS_SCHEMA = (
    "fastce_cuda::shard_stats(Tensor logits, Tensor targets, int vocab_start, int ignore_index, Tensor(a!) stats, "
    "float softcap, float label_smoothing, float z_loss, bool want_entropy) -> ()"
)
SHARD_GRAD_SCHEMA = (
    "fastce_cuda::shard_grad(Tensor logits, Tensor targets, int vocab_start, int vocab_size, int ignore_index, "
    "Tensor row, Tensor(a!) grad, float softcap, float label_smoothing, float z_loss) -> ()"
)
SCALE_GRAD_SCHEMA = "fastce_cuda::scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()"



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
    assert str(ops.shard_stats.default._schema) == SHARD_STATS_SCHEMA
    assert str(ops.shard_grad.default._schema) == SHARD_GRAD_SCHEMA
    assert str(ops.scale_grad_.default._schema) == SCALE_GRAD_SCHEMA


def _meta_args(B=2, T=3, V=11, dtype=torch.bfloat16, device="meta"):
    return (
        torch.empty(B, T, V, dtype=dtype, device=device),
        torch.empty(B, T, dtype=torch.int64, device=device),
        torch.empty((), dtype=torch.float64, device=device),
        torch.empty(B, T, dtype=torch.float32, device=device),
        torch.empty(B, T, V, dtype=dtype, device=device),
    )


def _per_row(B=2, T=3, fields=3, device="meta"):
    """A float32 [B, T, fields] tensor: row_stats (3), shard stats (5) or shard_grad's row (3)."""
    return torch.empty(B, T, fields, dtype=torch.float32, device=device)


def test_fakes_on_meta_tensors(ops):
    logits, targets, divisor, losses, grad = _meta_args()
    assert ops.cross_entropy_fwd(logits, targets, divisor, losses, grad, IGNORE) is None
    assert ops.cross_entropy_fwd(logits, targets, divisor, losses, None, IGNORE) is None
    assert ops.cross_entropy_fwd(logits, targets, divisor, losses, grad, IGNORE, None, 3.0, 0.1, 1e-4,
                                 _per_row()) is None
    assert ops.shard_stats(logits, targets, 5, IGNORE, _per_row(fields=5), 3.0, 0.1, 0.0, True) is None
    assert ops.shard_grad(logits, targets, 5, 100, IGNORE, _per_row(), grad, 3.0, 0.1, 0.0) is None
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
    with pytest.raises(RuntimeError, match="row_stats"):
        ops.cross_entropy_fwd(logits, targets, divisor, losses, grad, IGNORE, None, 0.0, 0.0, 0.0, _per_row(fields=5))
    with pytest.raises(RuntimeError, match="label_smoothing"):
        ops.cross_entropy_fwd(logits, targets, divisor, losses, grad, IGNORE, None, 0.0, 1.5, 0.0)
    with pytest.raises(RuntimeError, match="stats"):
        ops.shard_stats(logits, targets, 0, IGNORE, _per_row(fields=3), 0.0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="targets"):
        ops.shard_stats(logits, targets[:1], 0, IGNORE, _per_row(fields=5), 0.0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="row"):
        ops.shard_grad(logits, targets, 0, 11, IGNORE, _per_row(T=2), grad, 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="grad"):
        ops.shard_grad(logits, targets, 0, 11, IGNORE, _per_row(), grad[:, :, :5], 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="vocab_size"):
        ops.shard_grad(logits, targets, 0, 0, IGNORE, _per_row(), grad, 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="grad_output"):
        ops.scale_grad_(grad, torch.empty(3, 2, device="meta"))


def test_fakes_under_fake_tensor_mode(ops):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits, targets, divisor, losses, grad = _meta_args(device="cpu")
        ops.cross_entropy_fwd(logits, targets, divisor, losses, grad, IGNORE)
        row_stats = _per_row(device="cpu")
        ops.cross_entropy_fwd(logits, targets, divisor, losses, grad, IGNORE, None, 2.0, 0.0, 0.0, row_stats)
        ops.shard_stats(logits, targets, 0, IGNORE, _per_row(fields=5, device="cpu"), 2.0, 0.0, 0.0, False)
        ops.shard_grad(logits, targets, 0, 11, IGNORE, _per_row(device="cpu"), grad, 2.0, 0.0, 0.0)
        ops.scale_grad_(grad, torch.empty((), dtype=torch.float32))
        assert grad.shape == logits.shape and losses.dtype == torch.float32


def test_export_functionalizes_both_mutations(ops):
    """torch.export traces with the fakes (no kernel runs) and turns both mutations into functional outputs,
    as torch.compile does: the schema's optional mutable grad is understood."""

    class Step(torch.nn.Module):
        def forward(self, logits, targets, divisor, losses, grad, row_stats, stats, row):
            ops.cross_entropy_fwd(logits, targets, divisor, losses, grad, IGNORE)
            ops.cross_entropy_fwd(logits, targets, divisor, losses, None, IGNORE)
            ops.cross_entropy_fwd(logits, targets, divisor, losses, grad, IGNORE, None, 2.0, 0.1, 0.0, row_stats)
            ops.shard_stats(logits, targets, 0, IGNORE, stats, 2.0, 0.1, 0.0, True)
            ops.shard_grad(logits, targets, 0, 11, IGNORE, row, grad, 2.0, 0.1, 0.0)
            ops.scale_grad_(grad, divisor.float())
            return losses, grad, row_stats, stats

    args = (torch.randn(2, 3, 11), torch.zeros(2, 3, dtype=torch.long), torch.tensor(2.0, dtype=torch.float64),
            torch.empty(2, 3), torch.empty(2, 3, 11), torch.empty(2, 3, 3), torch.empty(2, 3, 5),
            torch.rand(2, 3, 3))
    graph = torch.export.export(Step(), args).run_decompositions().graph_module.code
    assert graph.count("auto_functionalized") >= 6
    assert all(f"fastce_cuda.{op}" in graph for op in ("cross_entropy_fwd", "shard_stats", "shard_grad"))


def test_cpu_tensors_are_not_dispatched(ops):
    logits, targets, divisor, losses, grad = _meta_args(device="cpu")
    with pytest.raises(NotImplementedError):
        ops.cross_entropy_fwd(logits, targets, divisor, losses, grad, IGNORE)
    with pytest.raises(NotImplementedError):
        ops.shard_stats(logits, targets, 0, IGNORE, _per_row(fields=5, device="cpu"), 0.0, 0.0, 0.0, False)
    with pytest.raises(NotImplementedError):
        ops.shard_grad(logits, targets, 0, 11, IGNORE, _per_row(device="cpu"), grad, 0.0, 0.0, 0.0)




# -- torch.compile and opcheck on the GPU ---------------------------------------------------------------------------
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
def test_compile_fullgraph_with_options_and_shards(cuda_ops):
    spec = OPTIONS["all"]

    def step(logits, targets, divisor):
        B, T, V = logits.shape
        losses = logits.new_empty((B, T), dtype=torch.float32)
        row_stats = logits.new_empty((B, T, 3), dtype=torch.float32)
        grad = torch.empty_like(logits)
        cuda_ce.cross_entropy_fwd(logits, targets, divisor, losses, grad, IGNORE, None, spec=spec, row_stats=row_stats)
        stats = logits.new_empty((B, T, 5), dtype=torch.float32)
        cuda_ce.shard_stats(logits[..., 7:], targets, 7, IGNORE, stats, spec)
        row = torch.stack((stats[..., 0], stats[..., 1], torch.full_like(losses, 0.5)), dim=-1)
        shard_grad = torch.empty_like(logits[..., 7:])
        cuda_ce.shard_grad(logits[..., 7:], targets, 7, V, IGNORE, row, shard_grad, spec)
        return losses, grad, row_stats, stats, shard_grad

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    args = (random_logits((2, 5, 1003), torch.bfloat16, "cuda"), labels(2, 5, 1003),
            torch.tensor(4.0, dtype=torch.float64, device="cuda"))
    for actual, expected in zip(compiled(*args), step(*args)):
        assert torch.equal(actual, expected)


@gpu
@requires_cuda
def test_opcheck(cuda_ops):
    logits, targets, divisor, losses = small_case(37, torch.float32)
    grad = torch.empty_like(logits)
    torch.library.opcheck(cuda_ops.cross_entropy_fwd.default, (logits, targets, divisor, losses, grad, IGNORE))
    torch.library.opcheck(cuda_ops.cross_entropy_fwd.default, (logits, targets, divisor, losses, None, IGNORE))
    row_stats = torch.empty(2, 3, 3, device="cuda")
    torch.library.opcheck(cuda_ops.cross_entropy_fwd.default,
                          (logits, targets, divisor, losses, grad, IGNORE, None, 2.0, 0.1, 1e-3, row_stats))
    stats = torch.empty(2, 3, 5, device="cuda")
    torch.library.opcheck(cuda_ops.shard_stats.default,
                          (logits[..., 3:], targets, 3, IGNORE, stats, 2.0, 0.1, 0.0, True))
    row = torch.stack((torch.full((2, 3), 5.0), torch.full((2, 3), 40.0), torch.rand(2, 3)), dim=-1).cuda()
    torch.library.opcheck(cuda_ops.shard_grad.default,
                          (logits[..., 3:], targets, 3, 37, IGNORE, row, grad[..., 3:], 2.0, 0.1, 1e-3))
    torch.library.opcheck(cuda_ops.scale_grad_.default, (logits.clone(), torch.rand(2, 3, device="cuda")))
