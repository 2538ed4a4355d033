"""Backends for the training loop, chosen from a ds_config JSON (DeepSpeed's vocabulary)."""

from __future__ import annotations

from ssl3d.config import Config
from ssl3d.strategies.base import Strategy, clean_name, resolve_device, resolve_precision
from ssl3d.strategies.single import SingleStrategy


def build_strategy(cfg: Config) -> Strategy:
    """The backend the run's ds_config asks for; one process on one device when there is none."""
    local_rank = 0
    device = resolve_device(cfg.train.device, local_rank)
    dtype = resolve_precision(cfg.train.precision, device)
    return SingleStrategy(device, dtype, grad_accum=cfg.train.grad_accum)


__all__ = ["SingleStrategy", "Strategy", "build_strategy", "clean_name", "resolve_device", "resolve_precision"]
