"""Shared test helpers: a tiny encoder keeps every test to seconds on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

from ssl3d.config import ModelConfig

os.environ.setdefault("OMP_NUM_THREADS", "2")
# Every DeepSpeed run of the suite is on the CPU (train.device "cpu"), in this process and the ones it launches.
# DeepSpeed picks its accelerator once, when first imported, CUDA wherever CUDA is visible; a test that imports it
# here before any run (its config models, its launcher's parser) would leave this process on CUDA for good, and
# ssl3d then refuses a CPU run in it. A test about DeepSpeed's own choice removes it from its child's environment.
os.environ["DS_ACCELERATOR"] = "cpu"
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (3, 6, 12, 24)}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/dist is marked ``dist``, under tests/e2e ``e2e``, under tests/cuda ``cuda_sim``
    (``pytest -m "not dist and not e2e"`` is the quick local loop)."""
    for item in items:
        part = item.path.parent.name
        if part in ("dist", "e2e"):
            item.add_marker(getattr(pytest.mark, part))
        elif part == "cuda":
            item.add_marker(pytest.mark.cuda_sim)


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
