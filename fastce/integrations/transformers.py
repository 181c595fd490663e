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
from typing import Any, Iterator

from .. import loss as _loss

FASTCE_LOSS_TYPE = "fastce"
"""The ``LOSS_MAPPING`` key that ``patch_transformers`` registers: a model with ``model.loss_type = "fastce"`` uses
fastce whatever its class."""


class FastCELoss:
    """A drop-in for transformers' ``ForCausalLMLoss`` that calls ``fastce.causal_lm_loss`` with fixed options.

    ``options`` are keyword-only options of ``causal_lm_loss`` (``backend``, ``inplace_backward``, ``validate``).
    ``inplace_backward=True`` overwrites ``outputs.logits`` with the gradient during the forward pass, so use it only
    when nothing reads the logits after the loss.
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
        # Looked up on the module at call time, so that a test's spy on fastce.loss.causal_lm_loss sees the calls.
        return _loss.causal_lm_loss(
            logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **self.options, **kwargs
        )

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.options.items())
        return f"FastCELoss({options})"


def _option_names() -> set[str]:
    parameters = inspect.signature(_loss.causal_lm_loss).parameters.values()
    return {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


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


def patch_transformers(**options: Any) -> FastCELoss:
    """Make every causal LM of transformers compute its loss with fastce. Undo with ``unpatch_transformers()``.

    Replaces each ``LOSS_MAPPING`` entry that holds ``ForCausalLMLoss`` (``"ForCausalLM"``,
    ``"ForConditionalGeneration"``, ``"CsmForConditionalGeneration"``, ...) with a ``FastCELoss(**options)``, and
    registers it as ``LOSS_MAPPING["fastce"]``. Models read the mapping when they compute a loss, so models created
    before the call switch too, except those given their own loss through ``model.loss_function = ...``.

    Calling it again is harmless: nothing is wrapped twice and the options of the latest call win.

    A ``Trainer`` built while patched counts ``num_items_in_batch`` as stock transformers does (module docstring).

    Args:
        **options: keyword-only options of ``fastce.causal_lm_loss``, e.g. ``backend="triton"``.

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
        _patch = {"loss": None, "replaced": {}, "added": []}
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
    return new_loss


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
    previous = dict(_patch["loss"].options) if _patch is not None else None
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


def _own_loss(model):
    # transformers' setter stores the value as ``_loss_function``; the getter falls back to LOSS_MAPPING without it.
    return vars(model).get("_loss_function", _NO_OWN_LOSS)


def patch_model(model, **options: Any) -> FastCELoss:
    """Make one transformers model compute its loss with fastce, through the public ``model.loss_function`` setter.

    Only a model whose loss is ``ForCausalLMLoss`` (or already fastce's) is patched; any other raises
    ``ValueError``. Calling it again only updates the options. Undo with ``unpatch_model(model)``.
    ``LOSS_MAPPING`` is not touched, so ``Trainer`` counts ``num_items_in_batch`` as it does for stock models.

    Args:
        model: a ``transformers.PreTrainedModel`` causal LM.
        **options: keyword-only options of ``fastce.causal_lm_loss``, e.g. ``backend="triton"``.

    Returns:
        The installed loss function.

    Example::

        fastce.patch_model(model)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
    """
    if not hasattr(type(model), "loss_function"):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    current = model.loss_function
    if not (current is _loss_utils().ForCausalLMLoss or isinstance(current, FastCELoss)):
        raise ValueError(
            f"patch_model replaces ForCausalLMLoss only; {type(model).__name__} computes its loss with {current!r}"
        )
    new_loss = FastCELoss(**options)
    if not hasattr(model, _PREVIOUS_ATTR):
        setattr(model, _PREVIOUS_ATTR, _own_loss(model))
    model.loss_function = new_loss
    return new_loss


def unpatch_model(model) -> None:
    """Undo ``patch_model``: the model computes its loss as it did before. Harmless when the model is not patched."""
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
