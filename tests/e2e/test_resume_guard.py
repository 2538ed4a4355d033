"""Resuming with another model is refused before anything starts, with one line per setting that differs."""

from __future__ import annotations

import json
from pathlib import Path

from tiny_run import TINY_RUN

from ssl3d.cli import main

TINY = {**TINY_RUN, "data.demo_volumes": 4, "train.max_val_batches": 1, "optim.warmup_steps": 1, "optim.lr": 1e-3}


def args(logdir: Path, demo: Path, **more: object) -> list[str]:
    run = {**TINY, "data.demo_dir": str(demo), "train.logdir": str(logdir), **more}
    return ["pretrain", *[f"--set={k}={json.dumps(v)}" for k, v in run.items()]]


def test_resume_with_another_feature_size_names_the_setting(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(args(run, tmp_path / "demo", **{"train.num_steps": 1, "train.eval_num": 1})) == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    capsys.readouterr()
    more = {"train.num_steps": 2, "model.feature_size": 24, "model.depths": [1, 1, 2, 1]}
    assert main([*args(run, tmp_path / "demo", **more), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in err, err
    assert "model.feature_size 12, this run has 24" in lines[0] and "step_00000001" in lines[0], err
    assert "model.depths [1, 1, 1, 1], this run has [1, 1, 2, 1]" in lines[1], err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing started
