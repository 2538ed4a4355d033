"""Graceful preemption under the real launcher (torchrun, 2 gloo ranks on the CPU): SIGTERM to ONE rank mid-run
makes both ranks stop after the same step, write a complete checkpoint there and exit with code 4; the same command
with ``--resume auto`` then reproduces the uninterrupted run's loss at every step. The time-based checkpoint
interval writes checkpoints between the ``eval_num`` ones."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from cpu_runs import cpu_env
from tiny_run import TINY_RUN

from ssl3d.checkpoint import checkpoint_problem
from ssl3d.cli import main

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12
TINY = {
    **TINY_RUN,
    "data.demo_volumes": 4,
    "train.eval_num": 5,  # the first checkpoint (step 5) tells the test the run is under way
    "train.max_val_batches": 1,
    "train.num_steps": STEPS,
    "optim.warmup_steps": 1,
    "optim.lr": 1e-3,
}
REL, ABS = 1e-5, 1e-6  # as in test_kill.py: the resumed run repeats the same operations in the same order
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(logdir: Path, demo: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    cmd += ["launch/pretrain.py", "--ds_config", "ds_configs/ddp.json"]
    cmd += [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]
    return cmd + [f"--set=data.demo_dir={demo}", f"--set=train.logdir={logdir}", *extra]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        # torchrun puts its workers in process groups of their own: kill the whole tree, or a hung worker keeps
        # the output pipe open and the test waits forever instead of failing.
        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            os.killpg(proc.pid, signal.SIGKILL)
        except (psutil.Error, ProcessLookupError):
            pass
        pytest.fail(f"no result after {TIMEOUT}s\n{proc.communicate()[0][-4000:]}")
    return proc.returncode, out


def losses(logdir: Path) -> dict[int, float]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in sorted(acc.Scalars("train/loss_total"), key=lambda e: e.wall_time)}


def rank_pid(launcher: psutil.Process, rank: int) -> int:
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "launch/pretrain.py" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with RANK={rank}")


def test_sigterm_to_one_rank_checkpoints_both_at_the_agreed_step_and_resumes_exactly(tmp_path):
    demo = tmp_path / "demo"
    ref_dir = tmp_path / "straight"
    rc, out = finish(start(torchrun(ref_dir, demo)))
    assert rc == 0, out[-4000:]
    ref = losses(ref_dir)
    assert sorted(ref) == list(range(1, STEPS + 1))

    logdir = tmp_path / "preempted"
    proc = start(torchrun(logdir, demo))
    first = logdir / "checkpoints" / "step_00000005" / "COMPLETE"
    deadline = time.monotonic() + TIMEOUT
    while not first.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
        time.sleep(0.05)
    time.sleep(1.0)  # most likely mid-step 6 or 7: then the preemption itself writes the checkpoint
    os.kill(rank_pid(psutil.Process(proc.pid), 1), signal.SIGTERM)  # one rank only, as a node's kubelet would
    rc, out = finish(proc)

    assert "ssl3d: rank 1 got SIGTERM: stopping after step" in out, out[-4000:]
    stopped = re.findall(
        r"ssl3d: preempted by SIGTERM \((this|another) rank\): every rank stopped after step (\d+) of", out
    )
    assert sorted(who for who, _ in stopped) == ["another", "this"], out[-4000:]  # each rank says why it stopped
    assert len({s for _, s in stopped}) == 1, out[-4000:]  # ... after the same step
    step = int(stopped[0][1])
    assert 5 <= step < STEPS, out[-4000:]
    print(f"SIGTERM to rank 1: both ranks stopped after step {step}")
    assert "exitcode  : 4" in out, out[-4000:]  # torchrun's failure report: the workers' documented code
    folder = logdir / "checkpoints" / f"step_{step:08d}"
    assert checkpoint_problem(folder) is None  # complete and verified, written by both ranks at the same step
    for rank in (0, 1):
        assert int(torch.load(folder / f"extra_rank{rank}.pt", weights_only=True)["step"]) == step
    assert not (logdir / "summary.json").exists()

    rc, out = finish(start(torchrun(logdir, demo, "--resume", "auto")))
    assert rc == 0, out[-4000:]
    assert f"resumed from {folder} at step {step}" in out, out[-4000:]
    got = losses(logdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in got)
    print(f"preempted after step {step}: largest relative loss difference to the uninterrupted run: {worst:.3g}")
    for s in got:
        assert got[s] == pytest.approx(ref[s], rel=REL, abs=ABS), s


def test_time_based_checkpoints_come_between_the_step_ones(tmp_path):
    """checkpoint_every_minutes (here a few milliseconds: due after every step) writes a checkpoint at steps that
    eval_num alone would not; eval_num alone writes only the last one."""
    run = {**TINY, "train.num_steps": 3, "train.eval_num": 100, "train.keep_checkpoints": 5, "train.logdir": ""}
    for name, minutes in (("timed", 1e-4), ("untimed", None)):
        run |= {"train.logdir": str(tmp_path / name), "data.demo_dir": str(tmp_path / "demo")}
        run["train.checkpoint_every_minutes"] = minutes
        assert main(["pretrain", *[f"--set={k}={json.dumps(v)}" for k, v in run.items()]]) == 0
    steps = {n: sorted(p.name for p in (tmp_path / n / "checkpoints").glob("step_*")) for n in ("timed", "untimed")}
    assert steps["timed"] == ["step_00000001", "step_00000002", "step_00000003"], steps
    assert steps["untimed"] == ["step_00000003"], steps
