"""Runs that stay on the CPU on any machine: the real launchers with 2 CPU ranks (torchrun and the deepspeed
launcher) and their environment, and the demo's resolved config.

On a GPU machine the runs stay on the CPU by two settings, both needed:

- ``train.device: "cpu"`` in the run config (``tiny_run.TINY_RUN``): "auto" takes ``cuda:LOCAL_RANK``, which on a
  1-GPU machine does not exist for rank 1.
- ``DS_ACCELERATOR=cpu`` in the environment (``cpu_env``; ``tests/conftest.py`` sets it for the whole session):
  DeepSpeed picks its accelerator when first imported, CUDA wherever CUDA is visible. ssl3d sets it from the run's
  device in each rank; the deepspeed launcher process (which never sees the run config) needs it from here.

Hiding the GPUs with ``CUDA_VISIBLE_DEVICES=""`` would not do: the deepspeed launcher overwrites it for every rank
with the indices ``--num_gpus`` names (``0,1``, whether or not the machine has 2 GPUs; with ``DS_ACCELERATOR=cpu``
too), and it leaves nothing for the ranks' device setting to prove. ``tests/cuda/test_gpu_machine.py`` runs these
commands on a simulated GPU machine where any real use of CUDA fails.

The demo preset is the one thing that follows the machine rather than the device: ``ssl3d pretrain`` with no config
applies ``DEMO_GPU`` where CUDA is available and ``DEMO_CPU`` elsewhere (``ssl3d.run_config``), so its test asks the
process that chose the preset which machine it saw.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from ssl3d.run_config import DEMO_CPU, DEMO_GPU

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment of a launched CPU run: one thread per rank (2 ranks on 2 cores), this checkout importable
    (in front of what ``base`` has on its path), DeepSpeed on its CPU accelerator."""
    env = dict(os.environ if base is None else base)
    path = [str(ROOT), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path), DS_ACCELERATOR="cpu", **extra)
    return env


def torchrun(nproc: int, *args: str, script: str = "launch/pretrain.py") -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        script,
        *args,
    ]


def deepspeed(*args: str, script: str = "launch/pretrain.py") -> list[str]:
    """``deepspeed --num_gpus 2``: two ranks on one machine (CPU ranks: the run config says so)."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    return [launcher, "--num_gpus", "2", "--master_port", str(free_port()), script, *args]


# ``ssl3d pretrain`` in a fresh process that first says whether it sees CUDA (the question the demo preset asks).
_DEMO = "import sys, torch; print('cuda:', torch.cuda.is_available()); from ssl3d.cli import main; sys.exit(main())"


def demo_dry_run(env: dict[str, str], cwd: Path, *args: str) -> tuple[dict[str, Any], bool]:
    """The demo's resolved config (``ssl3d pretrain --dry-run`` with no config, 3 steps, on the CPU) and whether the
    process that resolved it saw CUDA. ``train.device="cpu"``: resolving "auto" would select a GPU (touch CUDA) and
    the dry run does not need one."""
    argv = ["pretrain", "--set", "train.num_steps=3", "--set", 'train.device="cpu"', *args, "--dry-run"]
    proc = subprocess.run(
        [sys.executable, "-c", _DEMO, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] in ("cuda: True", "cuda: False"), proc.stdout[-2000:]
    start = lines.index("{")  # the config, printed last; notes may come before it
    return json.loads("\n".join(lines[start:])), lines[0] == "cuda: True"


def assert_demo_preset(cfg: dict[str, Any], cuda: bool) -> None:
    """The machine's demo preset on top of the defaults, and the 3 steps asked for on top of it."""
    preset = DEMO_GPU if cuda else DEMO_CPU
    for dotted, value in preset.items():
        section, key = dotted.split(".")
        if dotted != "train.num_steps":
            assert cfg[section][key] == value, (dotted, cfg[section][key], "GPU" if cuda else "CPU")
    assert cfg["train"]["num_steps"] == 3
    if cuda:  # the reference's model at the reference's ROI, not the CPU demo's tiny one
        assert cfg["model"]["feature_size"] == 48 and cfg["model"]["depths"] == [2, 2, 2, 2], cfg["model"]
