"""Shared test helpers: a tiny encoder keeps every test to seconds on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

from ssl3d.config import ModelConfig

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (3, 6, 12, 24)}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/dist is marked ``dist``, under tests/e2e ``e2e`` (``pytest -m "not dist and not e2e"``
    is the quick local loop)."""
    for item in items:
        part = item.path.parent.name
        if part in ("dist", "e2e"):
            item.add_marker(getattr(pytest.mark, part))


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
    return ModelConfig(**TINY)
