"""transformers integration: causal LMs compute their loss with ``fastce.causal_lm_loss``.

The only module of fastce that knows transformers; it imports transformers inside its functions, so ``import
fastce`` never does. It uses two public hooks and touches nothing else (no torch or transformers function is
rebound):

* ``transformers.loss.loss_utils.LOSS_MAPPING``. Every causal LM looks its loss up there at call time, through the
  ``PreTrainedModel.loss_function`` property (``LOSS_MAPPING[model.loss_type]``, or ``LOSS_MAPPING["ForCausalLM"]``
  when the model has no known loss type, as GPT-2 has none). ``patch_transformers`` replaces every entry that holds
  ``ForCausalLMLoss`` (found by identity, not by name), so every causal LM switches at once, including those loaded
  before the call.
* The ``model.loss_function`` setter, for a single model: ``patch_model``.

Trainer and ``num_items_in_batch`` (transformers 5.x): ``Trainer.__init__`` decides how to count the targets of a
gradient-accumulation step from ``LOSS_MAPPING[model.loss_type] is ForCausalLMLoss``, where ``ForCausalLMLoss`` is
the name ``transformers.trainer`` imported. When that holds it counts ``labels[..., 1:] != -100``, the shifted
targets; otherwise ``labels != -100``, which also counts position 0 of every row. So that a Trainer built while
patched counts exactly as stock transformers does, ``patch_transformers`` also points that one name,
``transformers.trainer.ForCausalLMLoss``, at fastce's loss (and ``unpatch_transformers`` points it back): the only
name outside the two hooks that fastce rebinds, and only while patched.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from typing import Any, Iterator

import torch

from .. import linear_loss as _linear_loss
from .. import loss as _loss
from .lm_head import LazyLogits, _warn_unfused, check_fusable_head, fuse_head

FASTCE_LOSS_TYPE = "fastce"
"""The ``LOSS_MAPPING`` key that ``patch_transformers`` registers: a model with ``model.loss_type = "fastce"`` uses
fastce whatever its class."""


class FastCELoss:
    """A drop-in for transformers' ``ForCausalLMLoss`` that calls ``fastce.causal_lm_loss`` with fixed options, or
    ``fastce.causal_lm_linear_loss`` when the logits come from a fused lm_head (``fuse_lm_head=True``).

    ``options`` are keyword-only options of ``causal_lm_loss`` (``backend``, ``inplace_backward``, ``validate``,
    ``softcap``, ``label_smoothing``, ``z_loss``). ``inplace_backward=True`` overwrites ``outputs.logits`` with the
    gradient during the forward pass, so use it only when nothing reads the logits after the loss.
    """

    def __init__(self, **options: Any) -> None:
        allowed = _option_names()
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"unknown fastce option(s) {unknown}; expected some of {sorted(allowed)}")
        self.options = dict(options)

    def __call__(
        self,
        logits,
        labels,
        vocab_size: int | None = None,
        num_items_in_batch=None,
        ignore_index: int = -100,
        shift_labels=None,
        **kwargs,
    ):
        # Looked up on the modules at call time, so that a test's spy on fastce.loss.causal_lm_loss (or
        # fastce.linear_loss.causal_lm_linear_loss) sees the calls.
        if isinstance(logits, LazyLogits):  # from a fused lm_head: (hidden states, weight, bias), never the logits
            fusable, cap = logits.fusable_softcap()
            if fusable and not (cap is not None and self.options.get("softcap") is not None):
                options = {k: v for k, v in self.options.items() if k != "inplace_backward"}
                if cap is not None:
                    options["softcap"] = cap
                return _linear_loss.causal_lm_linear_loss(
                    logits.linear_input, logits.linear_weight, labels, vocab_size, num_items_in_batch, ignore_index,
                    shift_labels, bias=logits.linear_bias, **options, **kwargs
                )
            _warn_unfused(f"the model transformed its logits with {logits.steps} before the loss")
            logits = logits.materialize()
        return _loss.causal_lm_loss(
            logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **self.options, **kwargs
        )

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.options.items())
        return f"FastCELoss({options})"


# Options that make no sense for a model's loss: the statistics tuple (a model's loss is a tensor) and vocab-parallel
# shards (transformers' own tensor parallelism gathers the logits before the loss).
_NOT_FOR_MODELS = {"return_stats", "process_group"}


def _option_names() -> set[str]:
    parameters = inspect.signature(_loss.causal_lm_loss).parameters.values()
    return {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY} - _NOT_FOR_MODELS


def _loss_utils():
    try:
        from transformers.loss import loss_utils
    except ImportError as exc:
        raise ImportError(
            "fastce's transformers integration needs transformers>=5: pip install 'fastce[transformers]'"
        ) from exc
    return loss_utils


# What patch_transformers changed, so that unpatch_transformers can put it back; None when not patched.
# ``replaced`` maps each LOSS_MAPPING key we overwrote to its original value (ForCausalLMLoss, or what an earlier
# "fastce" key held); ``added`` lists the keys that did not exist before.
_patch: dict[str, Any] | None = None


def patch_transformers(*, fuse_lm_head: bool = False, **options: Any) -> FastCELoss:
    """Make every causal LM of transformers compute its loss with fastce. Undo with ``unpatch_transformers()``.

    Replaces each ``LOSS_MAPPING`` entry that holds ``ForCausalLMLoss`` (``"ForCausalLM"``,
    ``"ForConditionalGeneration"``, ``"CsmForConditionalGeneration"``, ...) with a ``FastCELoss(**options)``, and
    registers it as ``LOSS_MAPPING["fastce"]``. Models read the mapping when they compute a loss, so models created
    before the call switch too, except those given their own loss through ``model.loss_function = ...``.

    Calling it again is harmless: nothing is wrapped twice and the options of the latest call win.

    A ``Trainer`` built while patched counts ``num_items_in_batch`` as stock transformers does (module docstring).

    Args:
        fuse_lm_head: also fuse the lm_head with the loss (``fastce.causal_lm_linear_loss``): a training forward never
            holds the logits. Applies to every model whose loss is fastce's and whose lm_head is a plain
            ``nn.Linear``, from its next forward on (a global module pre-hook installs the head's hooks; see
            ``fastce/integrations/lm_head.py``); ``outputs.logits`` is then lazy, and real once read. A model that
            post-processes its logits with the final-logit softcap (Gemma 2/3) gets the cap applied by fastce; any
            other post-processing is computed unfused (correct, with a warning).
        **options: keyword-only options of ``fastce.causal_lm_loss``, e.g. ``backend="triton"``, ``z_loss=1e-4``.

    Returns:
        The installed loss function.

    Example::

        fastce.patch_transformers()
        loss = model(input_ids, labels=labels).loss  # computed by fastce
        fastce.unpatch_transformers()
    """
    global _patch
    mapping = _loss_utils().LOSS_MAPPING
    original = _loss_utils().ForCausalLMLoss
    new_loss = FastCELoss(**options)
    if _patch is None:
        _patch = {"loss": None, "replaced": {}, "added": [], "fuse": None}
    current = _patch["loss"]
    for key, value in list(mapping.items()):
        if value is original:  # also takes a causal LM entry added since an earlier call
            _patch["replaced"][key] = value
            mapping[key] = new_loss
        elif current is not None and value is current:  # ours already (recorded then): only the options change
            mapping[key] = new_loss
    if FASTCE_LOSS_TYPE not in mapping:
        _patch["added"].append(FASTCE_LOSS_TYPE)
        mapping[FASTCE_LOSS_TYPE] = new_loss
    elif mapping[FASTCE_LOSS_TYPE] is not new_loss:  # someone else's entry under our name
        _patch["replaced"][FASTCE_LOSS_TYPE] = mapping[FASTCE_LOSS_TYPE]
        mapping[FASTCE_LOSS_TYPE] = new_loss
    _patch["loss"] = new_loss
    _point_trainer_at(new_loss, original if current is None else current)
    if fuse_lm_head and _patch["fuse"] is None:
        _patch["fuse"] = _GlobalHeadFusion()
    elif not fuse_lm_head and _patch["fuse"] is not None:
        _patch["fuse"].remove()
        _patch["fuse"] = None
    return new_loss


class _GlobalHeadFusion:
    """The lm_heads fused by ``patch_transformers(fuse_lm_head=True)``: a global module forward pre-hook (public
    ``torch.nn.modules.module`` API) fuses the head of each model whose loss is fastce's, at the model's first
    forward, and keeps the head hooks' handles for ``remove()``."""

    def __init__(self):
        from transformers import PreTrainedModel

        self.model_class = PreTrainedModel
        self.seen = weakref.WeakSet()
        self.handles: list = []
        self.global_handle = torch.nn.modules.module.register_module_forward_pre_hook(self)

    def __call__(self, module, args):
        if not isinstance(module, self.model_class) or module in self.seen:
            return None
        self.seen.add(module)
        head = module.get_output_embeddings()
        if head is None or not isinstance(module.loss_function, FastCELoss):
            return None
        try:
            check_fusable_head(head)
        except ValueError as exc:
            warnings.warn(f"fastce: {type(module).__name__}'s lm_head is not fused: {exc}", stacklevel=2)
            return None
        self.handles += fuse_head(head)
        return None

    def remove(self) -> None:
        self.global_handle.remove()
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _point_trainer_at(new, old) -> None:
    """Rebind ``transformers.trainer.ForCausalLMLoss`` from ``old`` to ``new`` (see the module docstring)."""
    try:
        import transformers.trainer as trainer_module
    except Exception:  # Trainer unavailable (e.g. accelerate missing): nothing counts labels there
        return
    if getattr(trainer_module, "ForCausalLMLoss", None) is old:
        trainer_module.ForCausalLMLoss = new


def unpatch_transformers() -> None:
    """Undo ``patch_transformers``: ``LOSS_MAPPING`` holds exactly what it held before. Harmless when not patched.

    An entry that someone else changed after the patch keeps their value.
    """
    global _patch
    if _patch is None:
        return
    mapping = _loss_utils().LOSS_MAPPING
    ours = _patch["loss"]
    for key, value in _patch["replaced"].items():
        if mapping.get(key) is ours:
            mapping[key] = value
    for key in _patch["added"]:
        if mapping.get(key) is ours:
            del mapping[key]
    _point_trainer_at(_loss_utils().ForCausalLMLoss, ours)
    if _patch["fuse"] is not None:
        _patch["fuse"].remove()
    _patch = None


def is_transformers_patched() -> bool:
    """Whether ``patch_transformers`` is in effect (its loss is in ``LOSS_MAPPING``)."""
    if _patch is None:
        return False
    return _loss_utils().LOSS_MAPPING.get(FASTCE_LOSS_TYPE) is _patch["loss"]


@contextlib.contextmanager
def patched_transformers(**options: Any) -> Iterator[FastCELoss]:
    """``patch_transformers(**options)`` for the ``with`` block; on exit the previous state (patched with the
    previous options, or not patched) comes back, so blocks nest.

    Example::

        with fastce.patched_transformers(backend="triton"):
            trainer.train()
    """
    previous = None
    if _patch is not None:
        previous = {**_patch["loss"].options, "fuse_lm_head": _patch["fuse"] is not None}
    try:
        yield patch_transformers(**options)
    finally:
        if previous is None:
            unpatch_transformers()
        else:
            patch_transformers(**previous)


# Where patch_model keeps the model's state from before the patch: the model's own loss function, or _NO_OWN_LOSS
# when the model used LOSS_MAPPING. Kept on the model so that it travels with copies of the model (a string, not an
# object() sentinel, so that it still compares equal after copy.deepcopy or pickling).
_PREVIOUS_ATTR = "_fastce_previous_loss_function"
_NO_OWN_LOSS = "LOSS_MAPPING"
_HEAD_HOOKS_ATTR = "_fastce_head_hooks"  # the fused head's hook handles (patch_model(fuse_lm_head=True))


def _own_loss(model):
    # transformers' setter stores the value as ``_loss_function``; the getter falls back to LOSS_MAPPING without it.
    return vars(model).get("_loss_function", _NO_OWN_LOSS)


def patch_model(model, *, fuse_lm_head: bool = False, **options: Any) -> FastCELoss:
    """Make one transformers model compute its loss with fastce, through the public ``model.loss_function`` setter.

    Only a model whose loss is ``ForCausalLMLoss`` (or already fastce's) is patched; any other raises
    ``ValueError``. Calling it again only updates the options. Undo with ``unpatch_model(model)``.
    ``LOSS_MAPPING`` is not touched, so ``Trainer`` counts ``num_items_in_batch`` as it does for stock models.
    A PEFT model (anything with ``get_base_model()``) is patched through its base model.

    Args:
        model: a ``transformers.PreTrainedModel`` causal LM (or a PEFT model around one).
        fuse_lm_head: fuse the lm_head with the loss, as ``patch_transformers(fuse_lm_head=True)`` does; raises
            ``ValueError`` if the head is not a plain ``nn.Linear`` (e.g. a LoRA-adapted or quantized head).
        **options: keyword-only options of ``fastce.causal_lm_loss``, e.g. ``backend="triton"``.

    Returns:
        The installed loss function.

    Example::

        fastce.patch_model(model)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
    """
    model = _base_model(model)
    if not hasattr(type(model), "loss_function"):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    current = model.loss_function
    if not (current is _loss_utils().ForCausalLMLoss or isinstance(current, FastCELoss)):
        raise ValueError(
            f"patch_model replaces ForCausalLMLoss only; {type(model).__name__} computes its loss with {current!r}"
        )
    head = model.get_output_embeddings() if fuse_lm_head else None
    if fuse_lm_head:
        if head is None:
            raise ValueError(f"fuse_lm_head: {type(model).__name__} has no output embeddings (lm_head) to fuse")
        check_fusable_head(head)
    new_loss = FastCELoss(**options)
    if not hasattr(model, _PREVIOUS_ATTR):
        setattr(model, _PREVIOUS_ATTR, _own_loss(model))
    model.loss_function = new_loss
    _unfuse(model)
    if fuse_lm_head:
        setattr(model, _HEAD_HOOKS_ATTR, fuse_head(head))
    return new_loss


def _base_model(model):
    """The transformers model inside a PEFT model (``get_base_model()``, PEFT's public accessor), else the model."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _unfuse(model) -> None:
    for handle in vars(model).pop(_HEAD_HOOKS_ATTR, ()):
        handle.remove()


def unpatch_model(model) -> None:
    """Undo ``patch_model``: the model computes its loss (and its logits) as it did before. Harmless when the model is
    not patched."""
    model = _base_model(model)
    _unfuse(model)
    if not hasattr(model, _PREVIOUS_ATTR):
        return
    previous = getattr(model, _PREVIOUS_ATTR)
    delattr(model, _PREVIOUS_ATTR)
    if isinstance(previous, str) and previous == _NO_OWN_LOSS:
        # There is no public way to clear a model's own loss: remove what the setter stored, so the getter reads
        # LOSS_MAPPING again (and follows later patch_transformers/unpatch_transformers calls).
        vars(model).pop("_loss_function", None)
    else:
        model.loss_function = previous


class TrainerLoss:
    """A ``compute_loss_func`` for transformers' ``Trainer``: the shifted loss of ``outputs.logits`` and the labels
    that Trainer pops, divided by the ``num_items_in_batch`` that Trainer counts (``fastce.trainer_loss()``).

    Trainer calls it as ``compute_loss_func(outputs, labels, num_items_in_batch=...)``. The count is what Trainer's
    ``_get_num_items_in_batch`` sums over the whole accumulation step (and across ranks with
    ``average_tokens_across_devices``): ``labels[..., 1:] != -100``, the targets this loss sums, when the model's
    loss type is ``ForCausalLM`` (Llama, Mistral, Qwen, Gemma, ... and every model while ``patch_transformers`` is in
    effect), else every ``labels != -100`` (one more per sequence than the targets: set ``model.loss_type =
    "ForCausalLM"`` before building the Trainer, see README). When the model's lm_head is fused (``patch_model(model,
    fuse_lm_head=True)`` or ``patch_transformers(fuse_lm_head=True)``), ``outputs.logits`` is lazy and the loss is
    computed from the hidden states, never from logits.
    """

    def __init__(self, **options: Any) -> None:
        self.loss = FastCELoss(**options)

    def __call__(self, outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        return self.loss(logits, labels, num_items_in_batch=num_items_in_batch)

    def __repr__(self) -> str:
        return f"TrainerLoss({repr(self.loss)[len('FastCELoss('):-1]})"


def trainer_loss(**options: Any) -> TrainerLoss:
    """The callable for ``Trainer(compute_loss_func=fastce.trainer_loss(**options))``; ``options`` as for
    ``patch_transformers`` (keyword-only options of ``fastce.causal_lm_loss``). See ``TrainerLoss``.

    Example::

        fastce.patch_model(model, fuse_lm_head=True)  # optional: the logits are then never held
        trainer = Trainer(model=model, args=args, train_dataset=data, compute_loss_func=fastce.trainer_loss())
    """
    return TrainerLoss(**options)
