"""The real launchers with 2 CPU ranks (on a GPU machine too): `deepspeed`, `torchrun` (also as two "nodes" through a
localhost rendezvous); a run resumed by the same backend continues its loss curve, and a checkpoint written by one
backend at world size 2 starts another backend at world size 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cpu_runs import ROOT, cpu_env, deepspeed, free_port, torchrun
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_run import TINY_RUN

TINY = {
    **TINY_RUN,
    "data.demo_volumes": 4,
    "train.eval_num": 2,
    "train.max_val_batches": 1,
    "optim.warmup_steps": 1,
    "optim.lr": 1e-3,
}
ENV = cpu_env()  # 2 CPU ranks on any machine (tests/cpu_runs.py says how)


def flags(logdir: Path, steps: int, *extra: str) -> list[str]:
    out = [f"--set={k}={json.dumps(v)}" for k, v in {**TINY, "train.num_steps": steps}.items()]
    return out + [f"--set=train.logdir={logdir}", *extra]


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(logdir: Path) -> dict[int, float]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in sorted(acc.Scalars("train/loss_total"), key=lambda e: e.wall_time)}


@pytest.mark.parametrize(
    "launcher, preset",
    [(deepspeed, "ds_configs/zero2.json"), (lambda *a: torchrun(2, *a), "ds_configs/zero3.json")],
    ids=["deepspeed-zero2", "torchrun-zero3"],
)
def test_launch_and_resume_continues_the_loss_curve(tmp_path, launcher, preset):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(launcher("--ds_config", preset, *flags(straight, 4)))
    run(launcher("--ds_config", preset, *flags(resumed, 2)))
    proc = run(launcher("--ds_config", preset, *flags(resumed, 4, "--resume", "auto")))
    assert "resumed from" in proc.stdout
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    for name in ("config.json", "summary.json", "model_swinvit.pt"):
        assert (resumed / name).is_file()


def test_torchrun_two_nodes_through_a_localhost_rendezvous(tmp_path):
    """Two torchrun agents (node ranks 0 and 1, one process each) meet at a c10d rendezvous on localhost."""
    port = free_port()
    common = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_id=ssl3d-test",
    ]
    args = ["launch/pretrain.py", "--ds_config", "ds_configs/fsdp.json", *flags(tmp_path / "run", 2)]
    nodes = [
        subprocess.Popen(common + args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(o[-2000:] for o in outs)
    assert sum("ssl3d: done: 2 steps" in o for o in outs) == 1  # only rank 0 reports
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "COMPLETE").is_file()


def test_zero2_checkpoint_at_world_size_2_starts_single_at_world_size_1(tmp_path):
    src = tmp_path / "zero2"
    run(torchrun(2, "--ds_config", "ds_configs/zero2.json", *flags(src, 2)))
    ckpt = src / "checkpoints" / "step_00000002"
    # Exported to model_swinvit.pt from the ZeRO partitions, equal to what the run exported itself.
    out = tmp_path / "exported.pt"
    run([sys.executable, "-m", "ssl3d.cli", "export", str(ckpt), str(out)])
    a = torch.load(out, weights_only=True)["state_dict"]
    b = torch.load(src / "model_swinvit.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)
    # Resumed by another backend at world size 1: weights carried over, optimizer restarted, with a warning.
    logdir = tmp_path / "single"
    shutil.copytree(src / "checkpoints", logdir / "checkpoints", symlinks=True)
    proc = run([sys.executable, "-m", "ssl3d.cli", "pretrain", *flags(logdir, 3, "--resume", "auto")])
    assert "FRESH optimizer" in proc.stderr and "resumed from" in proc.stdout
    assert sorted(losses(logdir)) == [3]
    # Resumed by ZeRO-2 at world size 1 with the same global batch (2 micro-batches of 1: the loader's saved position
    # counts batches of one rank): WITH its optimizer state, through DeepSpeed's universal checkpoint, converted
    # into the step folder (the exact moments are checked in test_strategies.py).
    logdir = tmp_path / "zero2_world1"
    shutil.copytree(src / "checkpoints", logdir / "checkpoints", symlinks=True)
    resume = flags(logdir, 3, "--resume", "auto", "--set=train.grad_accum=2")
    proc = run([sys.executable, "-m", "ssl3d.cli", "pretrain", "--ds_config", "ds_configs/zero2.json", *resume])
    assert "FRESH optimizer" not in proc.stdout + proc.stderr
    assert "with its optimizer state, through DeepSpeed's universal checkpoint" in proc.stdout
    assert "resumed from" in proc.stdout
    assert (logdir / "checkpoints" / "step_00000002" / "deepspeed_universal").is_dir()
    assert sorted(losses(logdir)) == [3]
