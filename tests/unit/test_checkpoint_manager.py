"""CheckpointManager on one process: step folders, pruning, the ``last`` link, ``best``, and what ``--resume auto``
picks, with a real SingleStrategy writing real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from ssl3d.checkpoint import COMPLETE, CheckpointManager, resolve_resume
from ssl3d.config import ConfigError
from ssl3d.strategies.single import SingleStrategy


def _manager(root: Path, keep: int = 2, calls: list | None = None) -> tuple[CheckpointManager, SingleStrategy]:
    torch.manual_seed(0)
    strategy = SingleStrategy(torch.device("cpu"), torch.float32)
    strategy.setup(nn.Linear(4, 3), lambda params: torch.optim.AdamW(params, lr=0.1))
    hook = (lambda step, rank: calls.append((step, rank))) if calls is not None else None
    return CheckpointManager(root, strategy, keep=keep, on_shard_saved=hook), strategy


def _train_one_step(strategy: SingleStrategy) -> None:
    strategy.backward(strategy.model(torch.ones(2, 4)).square().sum())
    strategy.step(None)


def test_step_folders_are_complete_pruned_and_linked(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    manager, strategy = _manager(tmp_path / "checkpoints", keep=2, calls=calls)
    for step in (1, 2, 3):
        _train_one_step(strategy)
        manager.save(step, {"step": step, "marker": f"state of step {step}"})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["last", "step_00000002", "step_00000003"]  # the oldest pruned, no temporary left
    assert os.readlink(tmp_path / "checkpoints" / "last") == "step_00000003"
    newest = manager.latest()
    assert newest == tmp_path / "checkpoints" / "step_00000003"
    assert '"step": 3' in (newest / COMPLETE).read_text()
    assert strategy.load_extra(newest)["marker"] == "state of step 3"
    saved = torch.load(newest / "state.pt", weights_only=True)["model"]
    assert torch.equal(saved["weight"], strategy.module.weight.detach())
    assert calls == [(1, 0), (2, 0), (3, 0)]  # the hook runs once per step folder, after this rank's part


def test_incomplete_folders_are_never_picked(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    manager, _ = _manager(root)
    manager.save(1, {"step": 1})
    # A run killed while writing step 2 leaves its temporary folder; a step folder without the marker is not ours.
    (root / ".tmp_step_00000002").mkdir()
    (root / "step_00000003").mkdir()
    assert manager.latest() == root / "step_00000001"
    assert resolve_resume("auto", root) == root / "step_00000001"
    assert resolve_resume(str(tmp_path), root) == root / "step_00000001"  # a run folder: its newest checkpoint
    assert resolve_resume("auto", tmp_path / "nothing_here") is None
    (root / "step_00000001" / COMPLETE).unlink()
    with pytest.raises(ConfigError, match="no checkpoint under .* verifies"):
        resolve_resume(str(root), root)


def test_best_is_replaced_whole(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    manager, strategy = _manager(tmp_path / "checkpoints", calls=calls)
    manager.save_best({"step": 1, "marker": "first"})
    _train_one_step(strategy)
    best = manager.save_best({"step": 2, "marker": "second"})
    assert strategy.load_extra(best)["marker"] == "second"
    assert torch.equal(torch.load(best / "state.pt", weights_only=True)["model"]["weight"], strategy.module.weight)
    assert sorted(p.name for p in best.parent.iterdir()) == ["best"]  # no .old_ or .tmp_ folder left behind
    assert calls == []  # best is no step folder: the kill hook is not offered there
