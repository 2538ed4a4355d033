"""What a step did, as the loop needs to know it, and the fp16 loss-scaling policy behind it.

The loop asks, the strategy answers: ``Strategy.step`` returns a ``StepResult`` (gradient norm, whether the loss
scaler skipped the update, whether the run cannot go on), so the loop never looks at a precision or a backend.
As Lightning keeps loss scaling in its Precision plugins, the policy lives here, beside the strategies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["LossScaleWatch", "StepResult"]


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, as it happened."""

    grad_norm: float  # global, before clipping; not finite: the update was skipped
    overflow: bool = False  # the fp16 loss scaler skipped the update and lowered its scale (normal while it settles)
    stop: str | None = None  # why the run cannot go on (the scale fell below its minimum), for the loop to report
    scalars: dict[str, float] = field(default_factory=dict)  # for the logs, e.g. train/loss_scale


class LossScaleWatch:
    """fp16 dynamic loss scaling seen from outside the scaler (torch's GradScaler or DeepSpeed's).

    A step whose scale went down was an overflow: skipped, not a bad step. A scale below ``min_scale``
    (``fp16.min_loss_scale``, DeepSpeed's default 1) means the gradients overflow fp16 even unscaled: stop."""

    def __init__(self, min_scale: float = 1.0):
        self.min_scale = float(min_scale)
        self.overflows_in_row = 0

    def result(self, norm: float, before: float | None, after: float | None) -> StepResult:
        scalars = {} if after is None else {"train/loss_scale": after}
        # A lower scale is an overflow; so is a non-finite norm under loss scaling: DeepSpeed's scaler (hysteresis 2,
        # its default) skips the first overflow without lowering the scale.
        overflow = after is not None and (after < (before or 0.0) or not math.isfinite(norm))
        if overflow:
            self.overflows_in_row += 1
        elif math.isfinite(norm):
            self.overflows_in_row = 0
        stop = self.underflow(after) if overflow and after < self.min_scale else None  # type: ignore[operator]
        return StepResult(grad_norm=norm, overflow=overflow, stop=stop, scalars=scalars)

    def underflow(self, scale: float | None) -> str:
        """The stop message: what happened and what to do instead."""
        return (
            f"fp16 loss scale underflow: after {max(self.overflows_in_row, 1)} gradient overflows in a row the scale "
            f"is {scale or 0.0:g}, below fp16.min_loss_scale ({self.min_scale:g}): gradients overflow fp16 even "
            'unscaled; train in bf16 (train.precision=bf16, or "bf16": {"enabled": true} in the preset) or lower '
            "optim.lr"
        )
