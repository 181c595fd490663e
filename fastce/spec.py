"""The loss options, as one small spec that every layer passes along and every backend reads in one place.

A row's loss is computed in two phases (see ``fastce/kernels/__init__.py``): its statistics, then an epilogue that
turns them into the loss and the gradient. The options change only the logits the statistics are taken of
(``softcap``) and the epilogue (``label_smoothing``, ``z_loss``); ``stats`` asks the kernels for the per-row
log-sum-exp, entropy and accuracy as well.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class LossSpec:
    """Options of one loss call (hashable, so it can key caches and travel through torch.compile as a constant).

    softcap:          0 for none, else the logits used are ``softcap * tanh(logits / softcap)`` (Gemma 2/3).
    label_smoothing:  ``(1 - e) * CE + e * mean_j(-log p_j)`` on non-ignored rows (``F.cross_entropy``'s meaning).
    z_loss:           ``z_loss * lse**2`` added to each non-ignored row (PaLM's auxiliary loss).
    stats:            also produce each row's lse, entropy and accuracy (``return_stats=True``).
    """

    softcap: float = 0.0
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    stats: bool = False

    @property
    def plain(self) -> bool:
        """True for plain cross-entropy: the kernels' default path, untouched by any option."""
        return self.softcap == 0.0 and self.label_smoothing == 0.0 and self.z_loss == 0.0 and not self.stats

    @property
    def needs_sum_x(self) -> bool:
        """Label smoothing needs each row's sum of logits."""
        return self.label_smoothing != 0.0

    @property
    def needs_sum_px(self) -> bool:
        """The entropy needs each row's sum of exp(x - max) * x."""
        return self.stats


PLAIN = LossSpec()


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def make_spec(softcap=None, label_smoothing=0.0, z_loss=0.0, stats=False) -> LossSpec:
    """The spec of the user-facing options, checked: a bad value raises ``ValueError`` (``TypeError`` for a non-number)."""
    if softcap is None and label_smoothing.__class__ is float and label_smoothing == 0.0 and z_loss.__class__ is float \
            and z_loss == 0.0 and stats is False:
        return PLAIN  # the defaults, at every call of the default path: no checks to run
    cap = 0.0
    if softcap is not None:
        cap = _real("softcap", softcap)
        if not (cap > 0.0 and math.isfinite(cap)):
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    smoothing = _real("label_smoothing", label_smoothing)
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    z = _real("z_loss", z_loss)
    if not (z >= 0.0 and math.isfinite(z)):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    return LossSpec(softcap=cap, label_smoothing=smoothing, z_loss=z, stats=bool(stats))
