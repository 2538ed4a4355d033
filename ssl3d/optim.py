"""Optimizers and learning-rate schedules of the reference, with its ``poly`` bug fixed.

The schedule is a pure function of the step, so resuming needs no scheduler state beyond the step itself,
and it works the same for every backend (a DeepSpeed engine included).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ssl3d.config import OptimConfig


def build_optimizer(
    cfg: OptimConfig, params: Iterable[torch.nn.Parameter], foreach: bool | None = None
) -> torch.optim.Optimizer:
    """``foreach``: torch's default (None) picks the multi-tensor step on CUDA; the estimator, tracing fake CPU
    tensors for a GPU, asks for it explicitly."""
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=foreach)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=foreach)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=foreach)


def lr_at(cfg: OptimConfig, step: int, num_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``num_steps``."""
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "poly":
        return cfg.lr * (1.0 - min(step, num_steps) / num_steps) ** cfg.poly_power
    # warmup_cosine: linear warm-up from 0, then half a cosine down to 0 at num_steps.
    if step < cfg.warmup_steps:
        return cfg.lr * step / max(1, cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / max(1, num_steps - cfg.warmup_steps)
    return cfg.lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
