"""fp16 loss-scale overflow and underflow, and the out-of-memory message, on real (tiny) training runs.

fp16 runs on the CPU here through torch's GradScaler (ssl3d refuses fp16 on a CPU for users: it is slow there and
DeepSpeed's fp16 needs CUDA), with the strategy switched to fp16 after it was built from a valid fp32 config.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_run import TINY_RUN

from ssl3d.cli import main
from ssl3d.config import load_config
from ssl3d.strategies import build_strategy
from ssl3d.trainer import Trainer, TrainingStopped

TINY = {
    **TINY_RUN,
    "data.demo_volumes": 2,
    "train.device": "cpu",
    "train.eval_num": 100,
    "train.max_val_batches": 1,
    "optim.warmup_steps": 1,
}


def fp16_trainer(logdir: Path, fp16: dict, **overrides) -> Trainer:
    cfg = load_config(None, {**TINY, "train.logdir": str(logdir), **overrides})
    strategy = build_strategy(cfg)
    strategy.dtype = torch.float16
    strategy.ds_config = dataclasses.replace(strategy.ds_config, fp16=fp16)
    return Trainer(cfg, strategy)


def test_fp16_overflows_are_skipped_and_do_not_stop_the_run(tmp_path: Path) -> None:
    """At an initial scale of 2^20 the rotation head's fp16 gradients overflow (|g| ~0.3 x 2^20 > 65504): the
    scaler skips those steps and halves the scale; they are counted, but unlike NaN losses they do not count
    towards train.max_bad_steps."""
    trainer = fp16_trainer(tmp_path / "run", {"initial_scale_power": 20}, **{"train.num_steps": 5})
    trainer.cfg.train.max_bad_steps = 2
    summary = trainer.fit()
    assert summary["steps"] == 5
    assert summary["skipped_steps"] >= 2  # would have stopped the run at max_bad_steps=2 if counted as bad
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0})
    acc.Reload()
    scales = [e.value for e in acc.Scalars("train/loss_scale")]
    assert scales[-1] <= 2.0**18 and scales == sorted(scales, reverse=True)


def test_fp16_loss_scale_underflow_stops_with_the_step_and_advice(tmp_path: Path) -> None:
    """Scale 2^31 overflows at every step; each overflow halves it; under fp16.min_loss_scale (2^29) the run stops
    at step 3 with a message naming the scale, the minimum and bf16."""
    trainer = fp16_trainer(
        tmp_path / "run",
        {"initial_scale_power": 31, "min_loss_scale": 2**29},
        **{"train.num_steps": 6, "train.max_bad_steps": 10},
    )
    with pytest.raises(TrainingStopped) as info:
        trainer.fit()
    msg = str(info.value)
    assert msg.startswith("step 3: fp16 loss scale underflow: after 3 gradient overflows in a row")
    assert "below fp16.min_loss_scale (5.36871e+08)" in msg and "bf16" in msg and "\n" not in msg


def test_out_of_memory_names_peak_estimate_and_plan(tmp_path: Path, monkeypatch, capsys) -> None:
    """An out-of-memory error in a step ends the run with exit 3 and one message: the measured peak, the
    estimator's figure for this run and the planner's suggestion (no traceback)."""

    def oom(self, micro):  # noqa: ANN001 - stands in for Trainer.train_step
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Trainer, "train_step", oom)
    args = ["pretrain", *[f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]]
    assert main([*args, "--set=train.num_steps=2", f"--set=train.logdir={json.dumps(str(tmp_path / 'run'))}"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(x for x in err.splitlines() if "out of memory" in x)
    assert "step 1: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB)" in line
    assert "measured peak RSS" in line and "the estimate for this run is" in line
    assert "--fit-memory" in line and "no checkpoint written yet" in line
