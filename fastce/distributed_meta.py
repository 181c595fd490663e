"""The per-call protocol of the vocab-parallel losses (``fastce/distributed.py``, ``distributed_linear.py``): where each
rank's shard starts, one error the same on every rank for input that does not fit together across ranks, and the
exchange of the rows' partial statistics.

A call first runs its local checks (``run_checks``), then ``shard_of``: one ``all_gather`` of a small int64 vector per
rank (``Facts``: shard size, the targets' shape, the options, whether the local checks failed, and with
``validate=True`` the targets' range, a checksum of them and the divisor, read back in the same one transfer).
Every rank runs the same ``verdict`` on the same gathered rows, so every rank raises the same error or none; only
when some rank's own checks failed does a second ``all_gather`` carry that rank's message (every rank knows by then
that it must take part). Offsets are cached per (group, shard size): with ``validate=False`` a call that finds them
there exchanges nothing, so the hot path adds neither a collective nor a host synchronisation.
"""
from __future__ import annotations

import struct
import sys
import weakref
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch import Tensor

from .spec import LossSpec
from .stats import merge

_MESSAGE_BYTES = 1024
_NO_TARGET_MIN, _NO_TARGET_MAX = 2**62, -(2**62)  # (min, max) of a rank with no target to check
_MAX_DIMS = 4
_ERRORS = {1: TypeError, 2: ValueError, 3: RuntimeError}
_REDUCTIONS = {None: 0, "mean": 1, "sum": 2, "none": 3}
_LABEL_FIELDS = 4  # target_min, target_max, checksum, divisor: the last fields of Facts


@dataclass(frozen=True)
class Shard:
    """This rank's columns ``[start, start + size)`` of a vocabulary of ``total`` ids, split over ``group``.

    It holds the group weakly: a Shard lives in autograd graphs (and the loss tensors that keep them), and a
    ProcessGroup kept alive past ``destroy_process_group`` until interpreter exit can abort the process there
    (gloo: "terminate called without an active exception")."""

    group_ref: weakref.ref
    start: int
    size: int
    total: int

    @property
    def group(self):
        group = self.group_ref()
        if group is None:
            raise RuntimeError("the process group of this vocab-parallel loss was destroyed")
        return group


@dataclass
class Facts:
    """What a rank knows of its call, as int64s (floats as their bits). ``error``: 0, or the key of ``_ERRORS`` of a
    failed local check (its message travels apart)."""

    error: int = 0
    shard: int = -1
    vocab_size: int = -1  # the whole vocabulary's size as the caller gave it, -1 for None
    ndim: int = -1
    dims: tuple = (-1,) * _MAX_DIMS  # the targets' shape
    hidden: int = -1  # D of the replicated hidden states (fused linear), -1 for logits
    ignore_index: int = 0
    reduction: int = 0
    softcap: int = 0
    label_smoothing: int = 0
    z_loss: int = 0
    stats: int = 0
    input_grad: int = 0  # the fused linear all-reduces the input's gradient in backward: every rank or none
    validated: int = 0
    # The label facts (validate=True), computed on the device: the last _LABEL_FIELDS entries of the vector.
    target_min: int = _NO_TARGET_MIN
    target_max: int = _NO_TARGET_MAX
    checksum: int = 0
    divisor: int = 0

    def to_list(self) -> list[int]:
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            out.extend(value if isinstance(value, tuple) else (value,))
        return out

    @classmethod
    def from_list(cls, values: list[int]) -> "Facts":
        values = list(values)
        kwargs = {}
        for f in fields(cls):
            if f.name == "dims":
                kwargs["dims"], values = tuple(values[:_MAX_DIMS]), values[_MAX_DIMS:]
            else:
                kwargs[f.name], values = values[0], values[1:]
        return cls(**kwargs)


def is_dtensor(value) -> bool:
    """Whether ``value`` is a DTensor, without importing ``torch.distributed.tensor`` (no DTensor exists before it
    is imported): the loss API's test for vocab-parallel DTensor logits."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def _bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def call_facts(shard: int, targets_shape, vocab_size, ignore_index: int, reduction, spec: LossSpec,
               hidden: int = -1, input_grad: bool = False) -> Facts:
    """The facts of a call whose local checks passed (``label_facts`` adds the targets' with ``validate=True``)."""
    dims = tuple(targets_shape)
    if len(dims) > _MAX_DIMS:
        raise ValueError(f"targets of at most {_MAX_DIMS} dimensions, got shape {dims}")
    return Facts(shard=shard, vocab_size=-1 if vocab_size is None else int(vocab_size), ndim=len(dims),
                 dims=dims + (-1,) * (_MAX_DIMS - len(dims)), hidden=hidden, ignore_index=int(ignore_index),
                 reduction=_REDUCTIONS[reduction], softcap=_bits(spec.softcap),
                 label_smoothing=_bits(spec.label_smoothing), z_loss=_bits(spec.z_loss), stats=int(spec.stats),
                 input_grad=int(input_grad))


def label_facts(targets: Tensor, ignore_index: int, divisor: Tensor) -> Tensor:
    """``[4]`` int64 on the targets' device, nothing read back: the smallest and largest target that is not
    ``ignore_index``, a checksum of the targets, and the divisor's bits (the label facts of ``Facts``)."""
    flat = targets.reshape(-1).long()
    kept = flat != ignore_index
    if flat.numel():
        low = torch.where(kept, flat, _NO_TARGET_MIN).amin()
        high = torch.where(kept, flat, _NO_TARGET_MAX).amax()
    else:
        low, high = flat.new_tensor(_NO_TARGET_MIN), flat.new_tensor(_NO_TARGET_MAX)
    # Position weights make the checksum see two labels swapped; int64 sums of these sizes never overflow.
    weights = torch.arange(flat.numel(), device=flat.device) % 1021 + 1
    bits = divisor.detach().reshape(()).to(device=flat.device, dtype=torch.float64).view(torch.int64)
    return torch.stack((low, high, (flat * weights).sum(), bits))


def comm_device(group) -> torch.device:
    """Where this group's small exchanges run: the current CUDA device for NCCL, else the CPU (gloo, and the gloo
    half of a ``"cpu:gloo,cuda:nccl"`` group)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(local: Tensor, group) -> Tensor:
    """``[R, *local.shape]``: every rank's ``local`` (same shape everywhere), in rank order; one collective."""
    world = dist.get_world_size(group)
    out = local.new_empty((world * local.numel(),))
    # torch 2.14 renamed all_gather_into_tensor (deprecated there, with a warning) to all_gather_single; 2.11 has
    # only the old name.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local.contiguous().reshape(-1), group=group)
    return out.view(world, *local.shape)


def _messages(group, message: str | None) -> list[str]:
    data = (message or "").encode("utf-8")[:_MESSAGE_BYTES]
    local = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
    local[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    rows = all_gather_rows(local.to(comm_device(group)), group).cpu()
    return [bytes(row.tolist()).rstrip(b"\0").decode("utf-8", "replace") for row in rows]


def _error_code(exc: BaseException) -> int:
    return 1 if isinstance(exc, TypeError) else 2 if isinstance(exc, ValueError) else 3


def _shape(f: Facts) -> tuple:
    return tuple(f.dims[:f.ndim])


def verdict(rows: list[Facts], what: str) -> tuple[type, str] | None:
    """The error of these gathered facts (every rank computes the same), or None. Local errors are handled apart."""
    sizes = [f.shard for f in rows]
    where = lambda values: ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))  # noqa: E731
    if len({_shape(f) for f in rows}) > 1:
        return ValueError, f"the targets' shapes differ across ranks ({where([list(_shape(f)) for f in rows])})"
    if len({f.hidden for f in rows}) > 1:
        return ValueError, f"the hidden states' sizes differ across ranks ({where([f.hidden for f in rows])})"
    options = [(f.ignore_index, f.reduction, f.softcap, f.label_smoothing, f.z_loss, f.stats) for f in rows]
    if len(set(options)) > 1:
        return ValueError, ("the options (ignore_index, reduction, softcap, label_smoothing, z_loss, return_stats) "
                            "differ across ranks")
    if len({f.input_grad for f in rows}) > 1:
        return ValueError, (f"the hidden states need a gradient on some ranks and not on others "
                            f"({where([bool(f.input_grad) for f in rows])}): backward would all-reduce on some only")
    total = sum(sizes)
    if total == 0:
        return ValueError, f"the {what} shards hold no vocabulary at all ({where(sizes)})"
    for r, f in enumerate(rows):
        if f.vocab_size not in (-1, total):
            return ValueError, (f"vocab_size={f.vocab_size} (rank {r}) does not match the sum of the {what} shards, "
                                f"{total} ({where(sizes)})")
    checked = [(r, f) for r, f in enumerate(rows) if f.validated]
    for r, f in checked:
        for value in (f.target_min, f.target_max):
            if value not in (_NO_TARGET_MIN, _NO_TARGET_MAX) and not 0 <= value < total:
                return ValueError, (f"target {value} (rank {r}) is outside [0, {total}) and is not "
                                    f"ignore_index={f.ignore_index}")
    if len({f.checksum for _, f in checked}) > 1:
        return ValueError, ("the targets differ across ranks (vocab-parallel ranks must hold the same labels): "
                            f"checksums {where([f.checksum if f.validated else '-' for f in rows])}")
    divisors = {f.divisor for _, f in checked}
    for _, f in checked:
        if _float(f.divisor) != _float(f.divisor):  # NaN: a negative or NaN count (loss.divisor_of)
            return ValueError, "num_items_in_batch must be a count >= 0, got a tensor holding nan"
    if len(divisors) > 1:
        return ValueError, ("num_items_in_batch differs across ranks "
                            f"({where([_float(f.divisor) if f.validated else '-' for f in rows])})")
    return None


# group -> {shard size: (start, total)}: weak, and the values do not hold the group (see Shard).
_OFFSETS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cached_shard(group, size: int) -> Shard | None:
    offsets = _OFFSETS.get(group, {}).get(size)
    return None if offsets is None else Shard(weakref.ref(group), offsets[0], size, offsets[1])


def has_cached_shards(group) -> bool:
    """Whether some call on ``group`` already exchanged the metadata (so ``validate=False`` calls no longer do)."""
    return bool(_OFFSETS.get(group))


def exchange(group, facts: Facts | BaseException, what: str, labels: Tensor | None = None) -> Shard:
    """One ``all_gather`` of every rank's ``facts`` (or the exception of its local checks) and, when given, its
    ``label_facts``; raises the same error on every rank when something does not fit, else returns this rank's
    ``Shard`` (and caches it). One read back to the host."""
    local = Facts(error=_error_code(facts)) if isinstance(facts, BaseException) else facts
    if labels is not None:
        local.validated = 1
    device = comm_device(group)
    vector = torch.tensor(local.to_list(), dtype=torch.int64, device=device)
    if labels is not None:
        vector[-_LABEL_FIELDS:] = labels.to(device)
    rows = [Facts.from_list(row) for row in all_gather_rows(vector, group).tolist()]
    failed = [r for r, f in enumerate(rows) if f.error]
    if failed:  # every rank knows now: all take part in the message exchange
        message = None
        if isinstance(facts, BaseException):
            message = str(facts) if isinstance(facts, (TypeError, ValueError)) else f"{type(facts).__name__}: {facts}"
        first = failed[0]
        text = _messages(group, message)[first]
        raise _ERRORS[rows[first].error](f"rank {first} of {len(rows)}: {text}") from (
            facts if isinstance(facts, BaseException) else None)
    bad = verdict(rows, what)
    if bad is not None:
        raise bad[0](bad[1])
    rank = dist.get_rank(group)
    sizes = [f.shard for f in rows]
    shard = Shard(weakref.ref(group), sum(sizes[:rank]), sizes[rank], sum(sizes))
    _OFFSETS.setdefault(group, {})[shard.size] = (shard.start, shard.total)
    return shard


# --- one call -------------------------------------------------------------------------------------------------------

def checked_group(group):
    if group is None:
        raise ValueError("vocab-parallel losses need process_group= (or DTensor logits sharded on the vocabulary)")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group given, but torch.distributed is not initialised (init_process_group)")
    return group


def run_checks(prepare, *args):
    """``prepare(*args)``: a call's local checks and layout, or the exception they raised (to be shared with the
    other ranks by ``shard_of`` rather than raised here, where it would leave them waiting)."""
    try:
        return prepare(*args)
    except Exception as exc:  # noqa: BLE001 - any local failure must reach the other ranks
        return exc


def shard_of(group, call, validate: bool, what: str) -> Shard:
    """This rank's ``Shard``: from the cache (``validate=False``), else by the metadata exchange, which raises the same
    error on every rank. ``call`` (from ``run_checks``) has ``.facts`` and, for ``validate=True``, ``.targets``,
    ``.ignore_index`` and ``.divisor``; or it is the exception of the local checks."""
    failed = isinstance(call, BaseException)
    if not validate:
        if failed:
            if has_cached_shards(group):  # the other ranks exchange nothing: the error can only be raised here
                raise call
        else:
            shard = cached_shard(group, call.facts.shard)
            if shard is not None:
                return shard
        return exchange(group, call if failed else call.facts, what)
    if failed:
        return exchange(group, call, what)
    return exchange(group, call.facts, what, label_facts(call.targets, call.ignore_index, call.divisor))


def merged_stats(local: Tensor, group) -> Tensor:
    """The whole rows' statistics from every rank's partial ``[..., 5]`` ones (one ``all_gather``), merged in rank
    order: the same bits on every rank."""
    if local.numel() == 0:
        return local
    return merge(all_gather_rows(local, group))


def row_scale(grad_output: Tensor, divisor: Tensor, reduce: bool, shape) -> Tensor:
    """Each row's gradient factor: the upstream gradient over the divisor (a zero divisor gives NaN, as in
    ``linear.py``: README, Semantics), or the per-row upstream gradient for ``reduction="none"``."""
    if not reduce:
        return grad_output.float().reshape(shape)
    return (grad_output.double() / torch.where(divisor == 0, float("nan"), divisor)).float().expand(shape)


class Call:
    """One rank's checked call: tensors in the kernels' layout and the ``Facts`` the ranks compare."""

    def __init__(self, **values):
        self.__dict__.update(values)
