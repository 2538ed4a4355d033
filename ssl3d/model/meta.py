"""The SSL model (or a downstream one) on the meta device: shapes and parameter counts without memory or
initialisation cost.

The estimator traces copies of it; the strategy presets count its parameters to size DeepSpeed's "auto" buckets.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch
from torch import nn

from ssl3d.config import ModelConfig
from ssl3d.model.ssl_model import build_model

__all__ = ["count_parameters", "meta_model", "model_from_key", "model_key"]


@functools.lru_cache(maxsize=8)
def meta_model(key: str, contrastive_dim: int, task: Any = None, num_classes: int = 0) -> nn.Module:
    """The model ``task`` (a ``ssl3d.tasks.Task``) trains, with meta parameters (no memory, no init cost after the
    first call per config); ``num_classes`` outputs (background included) where the task has classes. Without a
    task: the SSL pre-training model (what the strategy presets count)."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._device import _device_constructors

    class _MetaInit(TorchFunctionMode):
        # MONAI calls .item() on a linspace in the encoder's constructor: keep that one (tiny) on the CPU.
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = dict(kwargs or {})
            if func in _device_constructors() and kwargs.get("device") is None and func is not torch.linspace:
                kwargs["device"] = "meta"
            return func(*args, **kwargs)

    cfg = model_from_key(key)
    with _MetaInit():
        if task is None:
            return build_model(cfg, contrastive_dim)
        return task.build_model(cfg, contrastive_dim, num_classes)


def model_from_key(key: str) -> ModelConfig:
    """The model config ``model_key`` made ``key`` from (without initial weights)."""
    cfg = ModelConfig(**json.loads(key))
    cfg.depths, cfg.num_heads = tuple(cfg.depths), tuple(cfg.num_heads)
    cfg.init_weights = None
    return cfg


def model_key(cfg: ModelConfig) -> str:
    """A hashable key for ``meta_model`` (initial weights do not change shapes)."""
    d = cfg.model_dump()
    d["init_weights"] = None
    return json.dumps(d, sort_keys=True)


def count_parameters(model: ModelConfig, contrastive_dim: int = 512) -> int:
    """Parameters of the SSL model for this config, counted on the meta device (no memory, well under a second)."""
    return sum(p.numel() for p in meta_model(model_key(model), contrastive_dim).parameters())
