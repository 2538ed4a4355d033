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


# The tiers: every collected test has exactly one (docs/layout.md). A folder gives its tier; tests/unit is ``fast``
# unless a test is marked ``slow``. ``network`` (downloads) comes on top of a tier and never with ``fast``.
TIERS = ("fast", "slow", "dist", "e2e", "cuda_sim")
FOLDER_TIERS = {"dist": "dist", "e2e": "e2e", "cuda": "cuda_sim"}


def tier_problems(items: list[pytest.Item]) -> list[str]:
    """One line per test without exactly one tier, or in the fast tier although it downloads."""
    problems = []
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        tiers = [t for t in TIERS if t in marks]
        if len(tiers) != 1:
            problems.append(f"{item.nodeid}: {'no tier' if not tiers else 'tiers ' + ', '.join(tiers)}")
        elif "network" in marks and tiers == ["fast"]:
            problems.append(f"{item.nodeid}: downloads (network) but is in the fast tier: mark it slow")
    return problems


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects: every collected test is checked, whatever the selection
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/dist is marked ``dist``, under tests/e2e ``e2e``, under tests/cuda ``cuda_sim``, under
    tests/unit ``fast`` unless marked ``slow`` (``pytest -m fast`` is the quick local loop); a test that ends up
    with no tier or two stops the run before anything runs."""
    for item in items:
        part = item.path.parent.name
        if part in FOLDER_TIERS:
            item.add_marker(FOLDER_TIERS[part])
        elif part == "unit" and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.fast)
    problems = tier_problems(items)
    if problems:
        raise pytest.UsageError(
            f"{len(problems)} test(s) without exactly one tier of {', '.join(TIERS)} (tests/conftest.py):\n  "
            + "\n  ".join(problems)
        )


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
