"""A fused lm_head for any ``nn.Linear``: while autograd records, its output is a lazy logits tensor, which a fused
loss consumes as (hidden states, weight, bias) and which becomes real logits the moment anything else reads it.

Nothing here knows transformers; ``transformers.py`` decides which heads to fuse. The head is fused with two public
``nn.Module`` hooks (undone by removing them): a forward pre-hook keeps the hidden states and hands the linear layer
an empty slice of them (no GEMM), and a forward hook replaces its empty output with ``LazyLogits``.

``LazyLogits`` records, without computing anything, what a model typically does to its logits before the loss:
the final-logit softcap (``x / cap``, ``torch.tanh``, ``* cap``: Gemma 2/3) and dtype casts (``.float()``, as
accelerate applies to model outputs under mixed precision). ``fusable_softcap()`` says whether a loss may take it
as ``(input, weight, bias, softcap)``. Any other use -- an op, ``.cpu()``, indexing, printing -- materialises it:
the GEMM runs (through autograd, so gradients reach the hidden states and the weight), the recorded steps are
applied, the result is cached, and the op runs on real logits. Reads are therefore always correct, and merely
cost what unfused logits would.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

_SOFTCAP_STEPS = ("div", "tanh", "mul")


class LazyLogits(torch.Tensor):
    """``F.linear(input, weight, bias)`` followed by recorded elementwise steps, not computed until read."""

    @staticmethod
    def __new__(cls, input, weight, bias, steps=(), dtype=None):
        shape = (*input.shape[:-1], weight.shape[0])
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype or input.dtype, device=input.device,
                                                   requires_grad=False)

    def __init__(self, input, weight, bias, steps=(), dtype=None):
        self.linear_input, self.linear_weight, self.linear_bias = input, weight, bias
        self.steps = tuple(steps)  # ("div", c), ("tanh",), ("mul", c), ("cast", dtype)
        self._value = None

    def __repr__(self, *, tensor_contents=None):
        return f"LazyLogits(shape={tuple(self.shape)}, dtype={self.dtype}, steps={self.steps})"

    def fusable_softcap(self):
        """``(True, cap or None)`` when the recorded steps are casts and at most one softcap; ``(False, None)``."""
        ops = [s for s in self.steps if s[0] != "cast"]
        if not ops:
            return True, None
        if tuple(s[0] for s in ops) == _SOFTCAP_STEPS and ops[0][1] == ops[2][1] and ops[0][1] > 0:
            return True, float(ops[0][1])
        return False, None

    def materialize(self) -> torch.Tensor:
        """The real logits (computed once, through autograd)."""
        if self._value is None:
            with torch._C.DisableTorchFunctionSubclass():
                x = F.linear(self.linear_input, self.linear_weight, self.linear_bias)
                for step in self.steps:
                    if step[0] == "div":
                        x = x / step[1]
                    elif step[0] == "tanh":
                        x = torch.tanh(x)
                    elif step[0] == "mul":
                        x = x * step[1]
                    else:
                        x = x.to(step[1])
            self._value = x
        return self._value

    def _with(self, step, dtype=None) -> "LazyLogits":
        return LazyLogits(self.linear_input, self.linear_weight, self.linear_bias, (*self.steps, step),
                          dtype=dtype or self.dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_metadata(func):  # shape, dtype, device, ...: answered by the wrapper itself, nothing computed
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        lazy = _record(func, args, kwargs)
        if lazy is not None:
            return lazy
        args, kwargs = torch.utils._pytree.tree_map_only(LazyLogits, lambda t: t.materialize(), (args, kwargs))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only by code that bypasses __torch_function__ (C++ callers, dispatch modes): below autograd, a
        # value computed here would carry no gradient, so refuse rather than return logits that silently train nothing.
        if any(isinstance(t, LazyLogits) and (t.linear_input.requires_grad or t.linear_weight.requires_grad)
               for t in torch.utils._pytree.tree_leaves((args, kwargs))):
            raise RuntimeError(
                f"fastce: the fused lm_head's lazy logits were read below autograd (by {func}); their gradient would "
                "be lost. Read them from Python (outputs.logits works), or patch without fuse_lm_head=True."
            )
        args, kwargs = torch.utils._pytree.tree_map_only(LazyLogits, lambda t: t.materialize().detach(),
                                                         (args, kwargs or {}))
        return func(*args, **kwargs)


_METADATA_PROPERTIES = frozenset({
    "shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "is_cpu", "is_meta", "layout", "is_leaf",
    "grad_fn", "is_sparse", "is_quantized", "is_nested", "itemsize", "nbytes", "is_mps", "is_xpu",
})
_METADATA_METHODS = frozenset({
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.__len__, torch.Tensor.element_size,
    torch.Tensor.is_floating_point, torch.Tensor.is_complex, torch.Tensor.get_device, torch.Tensor.ndimension,
    torch.Tensor.nelement,
})


def _is_metadata(func) -> bool:
    if func in _METADATA_METHODS:
        return True
    descriptor = getattr(func, "__self__", None)  # a property's __get__: the descriptor names the property
    return getattr(func, "__name__", "") == "__get__" and getattr(descriptor, "__name__", "") in _METADATA_PROPERTIES


def _record(func, args, kwargs):
    """The LazyLogits that ``func(*args)`` makes when it is a recordable step on a lazy tensor, else None."""
    if kwargs or not args or not isinstance(args[0], LazyLogits) or type(args[0]) is not LazyLogits:
        return None
    x = args[0]
    number = len(args) == 2 and isinstance(args[1], (int, float)) and not isinstance(args[1], bool)
    if func in (torch.Tensor.__truediv__, torch.Tensor.div, torch.div) and number:
        return x._with(("div", float(args[1])))
    if func in (torch.Tensor.__mul__, torch.Tensor.mul, torch.mul) and number:
        return x._with(("mul", float(args[1])))
    if func in (torch.tanh, torch.Tensor.tanh) and len(args) == 1:
        return x._with(("tanh",))
    if func is torch.Tensor.float and len(args) == 1:
        return x._with(("cast", torch.float32), torch.float32)
    if func is torch.Tensor.to and len(args) == 2 and isinstance(args[1], torch.dtype) and args[1].is_floating_point:
        return x._with(("cast", args[1]), args[1])
    return None


def _warn_unfused(reason: str) -> None:
    warnings.warn(f"fastce: the lm_head was not fused ({reason}); the loss is exact but the logits were computed",
                  stacklevel=3)


def check_fusable_head(head) -> None:
    """Raise ``ValueError`` unless ``head`` is a plain linear layer (its forward is ``nn.Linear.forward``)."""
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise ValueError(
            f"fuse_lm_head needs an lm_head that is a plain nn.Linear; this model's is {type(head).__name__} "
            "(a LoRA-adapted or quantized head computes more than input @ weight.T + bias). Patch without "
            "fuse_lm_head=True, or leave the lm_head out of the adapter's target modules."
        )
    fsdp = getattr(torch.distributed, "fsdp", None)
    if fsdp is not None and isinstance(head, getattr(fsdp, "FSDPModule", ())):
        raise ValueError(
            "fuse_lm_head cannot fuse an lm_head wrapped by fully_shard on its own: its weight is resharded as soon "
            "as the head returns, before the loss reads it. Shard the lm_head with its parent module (the root)."
        )


def fuse_head(head: nn.Linear) -> list:
    """Install the two hooks on ``head``; returns their handles (``remove()`` each to undo)."""
    check_fusable_head(head)
    kept: list = []

    def keep_input(module, args):
        if not _should_fuse(module, args):
            return None
        check_fusable_head(module)  # still plain, and not wrapped by fully_shard since the patch
        kept.append(args[0])
        return (args[0][..., :0, :] if args[0].dim() > 1 else args[0][:0], *args[1:])

    def lazy_output(module, args, output):
        if not kept:
            return None
        hidden = kept.pop()
        weight, bias = module.weight, module.bias
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):  # what F.linear would have computed in, under autocast
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        if weight.dtype != hidden.dtype:
            _warn_unfused(f"hidden states are {hidden.dtype}, the weight {weight.dtype}")
            return F.linear(hidden, weight, bias)
        return LazyLogits(hidden, weight, bias)

    return [head.register_forward_pre_hook(keep_input), head.register_forward_hook(lazy_output)]


def _should_fuse(module, args) -> bool:
    """Only while autograd records a training step of real tensors (inference and generation keep plain logits)."""
    if len(args) != 1 or not isinstance(args[0], torch.Tensor) or torch.compiler.is_compiling():
        return False
    return torch.is_grad_enabled() and (args[0].requires_grad or module.weight.requires_grad)
