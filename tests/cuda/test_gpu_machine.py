"""The suite on a GPU machine: the tests that pin the CPU never touch CUDA there (``gpu-machine``: one GPU visible,
any real use of CUDA fails).

A representative subset, run as the pinned tests run it (``tests/cpu_runs.py``, ``tests/tiny_run.py``): 2 ranks
under torchrun, 2 ranks under ``deepspeed --num_gpus 2`` (which hands each rank ``CUDA_VISIBLE_DEVICES=0,1`` on a
1-GPU machine), and the demo preset's test. Without ``train.device: "cpu"`` each rank would resolve "auto" to
``cuda:LOCAL_RANK``: here that fails at once, on a real 1-GPU machine rank 1 fails with "invalid device ordinal"
and rank 0 trains in bf16 on the GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cpu_runs import ROOT, assert_demo_preset, cpu_env, deepspeed, demo_dry_run, torchrun
from cudasim import sim_env
from tiny_run import TINY_RUN

GPU_MACHINE = sim_env("gpu-machine", base=cpu_env())
# One step with its validation and checkpoint (the save path too), on the smallest demo data set.
RUN = {
    **TINY_RUN,
    "data.demo_volumes": 2,
    "train.num_steps": 1,
    "train.eval_num": 1,
    "train.max_val_batches": 1,
    "optim.warmup_steps": 1,
}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu_machine_demo")  # written by the first run, read by the next


# The launchers and presets of tests/dist/test_launchers.py (DeepSpeed) and test_kill.py / test_preempt.py (DDP).
LAUNCHES = {
    "torchrun-ddp": (lambda *a: torchrun(2, *a), "ds_configs/ddp.json"),
    "deepspeed-zero2": (deepspeed, "ds_configs/zero2.json"),
}


@pytest.mark.parametrize("name", LAUNCHES)
def test_two_cpu_ranks_on_a_gpu_machine(name, demo_dir, tmp_path):
    launcher, preset = LAUNCHES[name]
    logdir = tmp_path / "run"
    run = {**RUN, "data.demo_dir": str(demo_dir), "train.logdir": str(logdir)}
    cmd = launcher("--ds_config", preset, *[f"--set={k}={json.dumps(v)}" for k, v in run.items()])
    proc = subprocess.run(cmd, cwd=ROOT, env=GPU_MACHINE, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "ssl3d: done: 1 steps" in out, out[-4000:]
    assert (logdir / "checkpoints" / "step_00000001" / "COMPLETE").is_file()


def test_the_demo_preset_test_on_a_gpu_machine(tmp_path):
    """test_presets.py's demo check, on a GPU machine: the process saw CUDA and applied the GPU demo."""
    cfg, cuda = demo_dry_run(GPU_MACHINE, tmp_path)
    assert cuda
    assert_demo_preset(cfg, cuda)


def test_a_run_left_at_auto_touches_cuda_here(tmp_path):
    """The control: "auto" selects the GPU, and any use of it fails on this machine, so a pinned test that passed
    above never reached CUDA."""
    cmd = [sys.executable, "-m", "ssl3d.cli", "pretrain", "--set=train.num_steps=1", "--dry-run"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=GPU_MACHINE, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "torch/cuda" in proc.stderr, proc.stdout[-2000:] + proc.stderr[-3000:]
