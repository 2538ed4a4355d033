"""The CUDA-semantics layer: tests that stand in for a GPU machine on the CPU (``pytest -m cuda_sim``)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cudasim  # noqa: E402


@pytest.fixture
def cuda_sim() -> Iterator[Callable[..., None]]:
    """``cuda_sim("autocast-query", ...)`` applies simulation pieces in this process until the test ends."""
    yield cudasim.apply
    cudasim.undo()
