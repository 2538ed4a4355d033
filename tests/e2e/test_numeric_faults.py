"""fp16 loss-scale underflow on a real (tiny) training run (overflow streaks and the out-of-memory message, for
every task: ``test_task_faults.py``).

fp16 runs on the CPU here through torch's GradScaler (ssl3d refuses fp16 on a CPU for users: it is slow there and
DeepSpeed's fp16 needs CUDA), with the strategy switched to fp16 after it was built from a valid fp32 config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tiny_run import TINY_RUN

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
