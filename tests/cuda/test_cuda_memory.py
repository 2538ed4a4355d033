"""The memory tools on a (simulated) GPU machine: the out-of-memory advice and ``--fit-memory`` against a V100's real
capacity (GPU_AUDIT F8), and the profiler's CUDA calls (S12)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import cudasim
import pytest
import torch

from ssl3d.config import Config
from ssl3d.memory import plan
from ssl3d.memory.estimate import GIB, estimate_memory
from ssl3d.strategies.ds_config import load_ds_config
from ssl3d.tasks import PRETRAIN

TINY = {"feature_size": 12, "depths": (1, 1, 1, 1)}


def _tiny_run() -> Config:
    cfg = Config()
    cfg.model.feature_size, cfg.model.depths = TINY["feature_size"], TINY["depths"]
    cfg.data.roi, cfg.data.num_samples, cfg.train.batch_size, cfg.train.precision = (32, 64, 64), 1, 1, "fp32"
    return cfg


def _v100_strategy(cfg: Config, monkeypatch: pytest.MonkeyPatch, peak: int) -> SimpleNamespace:
    """What the trainer hands ``out_of_memory_help`` after an out-of-memory stop on the V100: its device, its
    resolved preset, and the allocator's peak (``max_memory_reserved``, which a CPU build cannot answer)."""
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: peak)
    ds = load_ds_config(None, cfg, world_size=1, device_type="cuda", auto_precision="fp32")
    return SimpleNamespace(device=torch.device("cuda", 0), ds_config=ds, world_size=1, memory_report=dict)


def test_f8_out_of_memory_advice_stays_below_a_v100s_capacity(cuda_sim, monkeypatch) -> None:
    """Before: "--fit-memory 32GiB" for a 32 GB V100, which reports 31.75 GiB: the copy-pasted flag budgeted more
    than the card (rounded to the nearest GiB, no margin). Now: the card's capacity less the stated margin, rounded
    down to a whole GiB, and the fit it describes is the one that flag would make."""
    cuda_sim("gpu-machine", "sm70")
    cfg = _tiny_run()
    capacity = cudasim.V100_TOTAL_MEMORY
    text = plan.out_of_memory_help(cfg, _v100_strategy(cfg, monkeypatch, peak=capacity - GIB // 4), PRETRAIN)
    assert "of 31.75 GiB on this device" in text
    flag = re.search(r"--fit-memory (\d+)GiB would use", text)
    assert flag, text
    suggested = int(flag[1]) * GIB
    # A margin of 5-8% below the real capacity, rounded down: 29 or 30 GiB on this card, never 31 or 32.
    assert capacity * 0.92 - GIB < suggested <= capacity * 0.95, text
    # Exactly: the named margin, then down to a whole GiB.
    assert suggested == int(capacity * (1 - plan.CAPACITY_MARGIN)) // GIB * GIB
    assert f"of {suggested / GIB:.2f} GiB" in text  # the fit described is the one made with the suggested budget


def test_fit_memory_on_the_device_keeps_the_margin(cuda_sim) -> None:
    """``--fit-memory 32GiB`` on that V100 (the old advice, or a user's round number) plans for the card's capacity
    less the margin, and says so; a budget already below it is used as given."""
    cuda_sim("gpu-machine", "sm70")
    usable = plan.usable_capacity(cudasim.V100_TOTAL_MEMORY)
    assert usable == int(cudasim.V100_TOTAL_MEMORY * (1 - plan.CAPACITY_MARGIN))
    step = ({"feature_size": 12, "depths": (1, 1, 1, 1)}, (32, 64, 64), 1, 1)
    from ssl3d.config import ModelConfig

    model = ModelConfig(**step[0])
    fit = plan.fit_memory(32 * GIB, model, *step[1:], device="cuda", task=PRETRAIN)
    assert fit.budget_bytes == usable
    assert "Tesla V100-SXM2-32GB" in fit.describe(32 * GIB) and f"{usable / GIB:.2f} GiB" in fit.describe(32 * GIB)
    small = plan.fit_memory(8 * GIB, model, *step[1:], device="cuda", task=PRETRAIN)
    assert small.budget_bytes == 8 * GIB and small.note == ""
    # Planning for a GPU on a machine without one: the budget is the user's, nothing to compare it with.
    cudasim.undo()
    remote = plan.fit_memory(32 * GIB, model, *step[1:], device="cuda", task=PRETRAIN)
    assert remote.budget_bytes == 32 * GIB and remote.note == ""
    assert remote.estimate_bytes == estimate_memory(model, *step[1:], policy="none", task=PRETRAIN).total


def test_memory_snapshot_records_python_stacks_only(monkeypatch, tmp_path) -> None:
    """S12: ``stacks="all"`` (the default) also records and symbolises C++ frames, slow at ``_dump_snapshot``."""
    from ssl3d.memory import profile

    calls: list[dict] = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *a, **kw: calls.append(kw))
    profile.start_memory_history()
    assert calls == [{"max_entries": profile.SNAPSHOT_ENTRIES, "stacks": "python"}]
