"""Process faults: a run killed with SIGKILL (between steps or while writing a checkpoint) resumes exactly."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_logs import newest_complete_step, resumed_from, steps_per_process
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_run import TINY_RUN

TINY = {
    **TINY_RUN,
    "data.demo_volumes": 3,
    "train.eval_num": 1,
    "train.max_val_batches": 1,
    "optim.warmup_steps": 2,
    "optim.lr": 1e-3,
}
STEPS = 5


def command(logdir: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "ssl3d.cli", "pretrain"]
    args += [f"--set={k}={json.dumps(v)}" for k, v in {**TINY, "train.num_steps": STEPS}.items()]
    return args + [f"--set=train.logdir={logdir}", *extra]


def losses(logdir: Path) -> dict[int, float]:
    """Loss per step; a step logged twice (before a kill and after the resume) keeps its last value."""
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[int, float] = {}
    for event in sorted(acc.Scalars("train/loss_total"), key=lambda e: e.wall_time):
        out[event.step] = event.value
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[int, float]:
    logdir = tmp_path_factory.mktemp("faults") / "straight"
    subprocess.run(command(logdir), check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return losses(logdir)


def test_sigkill_at_a_random_moment_then_resume_auto(straight, tmp_path):
    logdir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command(logdir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (logdir / "checkpoints" / "step_00000002").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    newest = newest_complete_step(logdir)
    assert newest is not None and newest >= 2
    resumed = subprocess.run(command(logdir, "--resume", "auto"), check=True, capture_output=True, env=env, text=True)
    # From the newest complete step folder, running only the steps after it (a restart from scratch would
    # reproduce the same deterministic losses).
    assert resumed_from(resumed.stdout) == [(str(logdir / "checkpoints" / f"step_{newest:08d}"), newest)]
    before, after = steps_per_process(logdir)
    assert before == list(range(1, len(before) + 1)) and len(before) >= newest
    assert after == list(range(newest + 1, STEPS + 1))
    got = losses(logdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), step


def test_sigkill_while_writing_a_checkpoint(straight, tmp_path):
    logdir = tmp_path / "killed_in_save"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command(logdir), env={**env, "SSL3D_KILL_DURING_SAVE": "3"}, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    ckpts = logdir / "checkpoints"
    assert (ckpts / ".tmp_step_00000003").is_dir()  # the half-written folder is there ...
    assert not (ckpts / "step_00000003").exists()
    resumed = subprocess.run(command(logdir, "--resume", "auto"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    # ... and never picked up: the run continues from step 2 and logs only the steps after it.
    assert resumed_from(resumed.stdout) == [(str(ckpts / "step_00000002"), 2)]
    assert steps_per_process(logdir) == [[1, 2, 3], [3, 4, 5]]
    got = losses(logdir)
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), step
