"""The supervised segmentation task (fine-tuning and probing): what one micro-batch computes and learns.

Same shape as the pre-training task (``forward_backward(model, batch, backend, sync=...)``): the task owns the
forward and the loss, the backend (a ``Strategy`` in training, plain autograd in the memory estimator) owns where
the gradients go. The probe is the same task on a model whose encoder is frozen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.losses import DiceCELoss
from torch import Tensor, nn

LOSS_KEYS = ("total",)


def _identity(t: Tensor) -> Tensor:
    return t


def _no_phase(name: str) -> None:
    pass


class SegmentationTask:
    """Dice + cross-entropy on ``{"image": [N, C, *roi], "label": [N, 1, *roi]}`` micro-batches (per-sample mean, so
    a data-parallel average over ranks equals the loss of the global batch)."""

    loss_keys = LOSS_KEYS

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0, device: torch.device | None = None):
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=dice_weight, lambda_ce=ce_weight)
        self.device = device

    def losses(self, model: nn.Module, batch: dict[str, Tensor], backend: Any) -> dict[str, Tensor]:
        x, y = batch["image"], batch["label"]
        if self.device is not None:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with backend.autocast():
            logits = model(x)  # [N, classes, *roi]
        return {"total": self.loss_fn(logits.float(), y)}

    def forward_backward(
        self,
        model: nn.Module,
        batch: dict[str, Tensor],
        backend: Any,
        *,
        sync: bool,
        loss_hook: Callable[[Tensor], Tensor] = _identity,
        phase: Callable[[str], None] = _no_phase,
    ) -> dict[str, Tensor]:
        with backend.accumulate(sync):
            phase("forward")
            losses = {k: loss_hook(v) for k, v in self.losses(model, batch, backend).items()}
            phase("backward")
            backend.backward(losses["total"])
        return {k: v.detach() for k, v in losses.items()}
