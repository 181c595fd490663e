"""fastce: fused, exact shifted cross-entropy for causal language models.

``causal_lm_loss`` is transformers' ``ForCausalLMLoss`` computed straight from bf16/fp16/fp32 logits, with the
gradient produced in the same pass; ``patch_transformers()`` makes every causal LM in transformers use it.
"""
from .backends import available_backends, unavailable_reason
from .linear_loss import causal_lm_linear_loss, linear_cross_entropy
from .api import LossOutput
from .loss import causal_lm_loss, cross_entropy

__version__ = "0.1.0"

_INTEGRATION_NAMES = (
    "patch_transformers",
    "unpatch_transformers",
    "patched_transformers",
    "is_transformers_patched",
    "patch_model",
    "unpatch_model",
    "trainer_loss",
    "TrainerLoss",
)

__all__ = [
    "LossOutput",
    "available_backends",
    "causal_lm_linear_loss",
    "causal_lm_loss",
    "cross_entropy",
    "linear_cross_entropy",
    "unavailable_reason",
    *_INTEGRATION_NAMES,
]


def __getattr__(name):
    # transformers is imported only when its integration is asked for: `import fastce` stays light.
    if name in _INTEGRATION_NAMES:
        from .integrations import transformers as integration

        return getattr(integration, name)
    if name == "distributed":  # fastce.distributed (vocab-parallel and data-parallel helpers), imported when used
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module 'fastce' has no attribute {name!r}")
