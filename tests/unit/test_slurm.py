"""The SLURM batch scripts in launch/slurm/, run by bash in a fake SLURM environment: ``scontrol``, ``srun`` and
``deepspeed`` are shims on PATH that record their command lines (and, for the launchers, wait until signalled).
The command lines they generate are parsed by torchrun's and DeepSpeed's own argument parsers and by ssl3d's; a
USR1 to the script (SLURM's --signal=B:USR1) reaches the launcher as SIGTERM and the job is requeued."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ssl3d.cli import add_dry_run, add_reference_flags, add_run_flags

ROOT = Path(__file__).resolve().parents[2]
SHIM = """#!/bin/bash
printf '%s' "$(basename "$0")" >> "$FAKE_SLURM_LOG"
printf ' %q' "$@" >> "$FAKE_SLURM_LOG"
echo >> "$FAKE_SLURM_LOG"
"""
SCONTROL = (
    SHIM
    + """if [ "$1 $2" = "show hostnames" ]; then echo "$3" | tr ',' '\\n'; fi
"""
)
LAUNCHER = (
    SHIM
    + """[ -n "${FAKE_HOSTFILE_COPY:-}" ] && [ -n "${HOSTFILE:-}" ] && cp "$HOSTFILE" "$FAKE_HOSTFILE_COPY"
trap 'echo "launcher got TERM" >> "$FAKE_SLURM_LOG"; exit 1' TERM
sleep "${FAKE_RUN_SECONDS:-0}" & wait $!
exit "${FAKE_EXIT:-0}"
"""
)


@pytest.fixture
def slurm(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"scontrol": SCONTROL, "srun": LAUNCHER, "deepspeed": LAUNCHER}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_SLURM_LOG": str(tmp_path / "calls.log"),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu017,gpu018",  # what the scontrol shim expands, as scontrol does gpu[017-018]
        "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_CPUS_PER_TASK": "64",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "HOSTFILE": str(tmp_path / "hostfile"),
        "GRACE": "1",
    }


def calls(env: dict[str, str]) -> list[list[str]]:
    return [shlex.split(line) for line in Path(env["FAKE_SLURM_LOG"]).read_text().splitlines() if line.strip()]


def pretrain_args(argv: list[str]):
    import argparse

    p = argparse.ArgumentParser()
    add_run_flags(p)
    add_dry_run(p)
    add_reference_flags(p)
    return p.parse_args(argv)


USER_ARGS = ["--config", "run.json", "--ds_config", "ds_configs/zero2.json"]


def test_torchrun_script_generates_one_rendezvous_over_the_job_nodes(slurm):
    proc = subprocess.run(["bash", str(ROOT / "launch/slurm/torchrun.sbatch"), *USER_ARGS], env=slurm, timeout=60)
    assert proc.returncode == 0
    (srun,) = [c for c in calls(slurm) if c[0] == "srun"]
    i = srun.index("torchrun")
    # The job's CPUs passed on: Slurm 22.05-23.02 would give the step one CPU for all ranks and loader workers.
    assert srun[1:i] == ["--kill-on-bad-exit=1", "--ntasks-per-node=1", "--cpus-per-task=64"]
    from torch.distributed.run import get_args_parser

    targs = get_args_parser().parse_args(srun[i + 1 :])  # torchrun's own parser: every option exists
    assert (targs.nnodes, targs.nproc_per_node) == ("2", "4")
    assert (targs.rdzv_backend, targs.rdzv_endpoint, targs.rdzv_id) == ("c10d", "gpu017:29500", "ssl3d-4242")
    assert targs.shutdown_timeout == 240 and targs.training_script == "launch/pretrain.py"
    a = pretrain_args(targs.training_script_args)
    assert a.resume == "auto" and a.config == "run.json" and a.ds_config == "ds_configs/zero2.json"
    assert not any(c[:2] == ["scontrol", "requeue"] for c in calls(slurm))


def test_deepspeed_script_writes_the_hostfile_from_the_node_list(slurm, tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "launch/slurm/deepspeed.sbatch"), *USER_ARGS], env=slurm, timeout=60)
    assert proc.returncode == 0
    assert (tmp_path / "hostfile").read_text() == "gpu017 slots=4\ngpu018 slots=4\n"
    (ds,) = [c for c in calls(slurm) if c[0] == "deepspeed"]
    from deepspeed.launcher.runner import parse_args

    dargs = parse_args(ds[1:])  # DeepSpeed's own parser
    assert (dargs.hostfile, dargs.num_nodes, dargs.num_gpus) == (str(tmp_path / "hostfile"), 2, 4)
    assert (dargs.master_addr, dargs.master_port, dargs.user_script) == ("gpu017", 29500, "launch/pretrain.py")
    a = pretrain_args(dargs.user_args)
    assert a.resume == "auto" and a.ds_config == "ds_configs/zero2.json"


@pytest.mark.parametrize("script", ["torchrun", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_usr1_before_the_time_limit_stops_the_launcher_and_requeues(slurm, script):
    slurm["FAKE_RUN_SECONDS"] = "60"
    proc = subprocess.Popen(["bash", str(ROOT / f"launch/slurm/{script}.sbatch"), *USER_ARGS], env=slurm)
    launcher = "srun" if script == "torchrun" else "deepspeed"
    deadline = time.monotonic() + 30
    while not (Path(slurm["FAKE_SLURM_LOG"]).exists() and any(c[0] == launcher for c in calls(slurm))):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.2)  # the launcher shim has set its trap
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends the batch script
    assert proc.wait(timeout=30) == 0
    log = Path(slurm["FAKE_SLURM_LOG"]).read_text()
    assert "launcher got TERM" in log
    assert calls(slurm)[-1] == ["scontrol", "requeue", "4242"]


@pytest.mark.parametrize("script", ["torchrun", "deepspeed"])
def test_a_failed_run_is_not_requeued_and_keeps_its_exit_code(slurm, script):
    slurm["FAKE_EXIT"] = "3"
    proc = subprocess.run(["bash", str(ROOT / f"launch/slurm/{script}.sbatch"), *USER_ARGS], env=slurm, timeout=60)
    assert proc.returncode == 3
    assert not any(c[:2] == ["scontrol", "requeue"] for c in calls(slurm))
