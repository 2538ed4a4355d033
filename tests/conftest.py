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


@pytest.fixture
def keep_pytest_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--fit-memory`` on the CPU switches the running process's malloc to returning freed memory at once (slower
    allocations from then on); a test that runs it inside pytest sets glibc's own variable, as a user who tuned
    malloc would, so ssl3d leaves this process alone (tests/unit/test_memory_process.py runs the switch for real,
    in a subprocess). The variable is read by glibc only at a process's start: it changes nothing here."""
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
