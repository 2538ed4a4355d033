"""``ssl3d finetune`` under torchrun on 2 gloo processes (DDP, FSDP2, ZeRO-2) and ``ssl3d probe`` under DDP match one
process on the same global batch.

One process takes 2 volumes a step, each rank 1: the seeded global shuffle gives rank r the r-th volume of every
global batch, crops are seeded per volume, and Dice+CE is a per-sample mean, so the data-parallel gradient is the
single-process one up to summation order. SGD keeps that difference at rounding level (Adam would magnify the
rounding noise of gradients that are exactly zero in theory into lr-sized steps).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cpu_runs import cpu_env
from tiny_run import TINY_RUN

from ssl3d.config import ModelConfig
from ssl3d.data.demo import write_demo_dataset
from ssl3d.downstream.model import build_segmentation_model
from ssl3d.tasks import PROBE

ROOT = Path(__file__).resolve().parents[2]
ENV = cpu_env()
STEPS = 3
TOL = 2e-5  # after 3 SGD steps at lr 0.05: float32 summation order only (seen: ~1e-6)
RUN = {
    **TINY_RUN,
    "optim.name": "sgd",
    "optim.lr": 0.05,
    "optim.schedule": "constant",
    "train.num_steps": STEPS,
    "train.eval_num": STEPS,
    "finetune.labelled": 4,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def finetune(
    nproc: int, datalist: Path, logdir: Path, preset: str | None, batch: int, task: str = "finetune"
) -> dict[str, torch.Tensor]:
    args = [f"--set={k}={json.dumps(v)}" for k, v in {**RUN, "train.batch_size": batch}.items()]
    args += ["--datalist", str(datalist), f"--set=train.logdir={logdir}"]
    if preset:
        args += ["--ds_config", str(ROOT / "ds_configs" / preset)]
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
    ]
    run([*(launch if nproc > 1 else [sys.executable]), "-m", "ssl3d.cli", task, *args])
    return torch.load(logdir / "model_final.pt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("finetune")
    datalist = write_demo_dataset(out / "demo", n_volumes=5, shape=(64, 64, 48))  # 4 training volumes
    return datalist, finetune(1, datalist, out / "single", None, batch=2)


@pytest.mark.parametrize("preset", ["ddp.json", "fsdp.json", "zero2.json"])
def test_two_processes_match_one(preset: str, single, tmp_path) -> None:
    datalist, ref = single
    got = finetune(2, datalist, tmp_path / preset, preset, batch=1)
    assert set(got) == set(ref)
    worst = max(float((got[k].float() - ref[k].float()).abs().max()) for k in ref)
    assert worst <= TOL, f"{preset}: max |difference| {worst:.2e} > {TOL:.0e}"
    # ... while training moved the weights far more than that from where every run started.
    torch.manual_seed(0)
    start = build_segmentation_model(ModelConfig(feature_size=12, depths=(1, 1, 1, 1)), 5).state_dict()
    assert max(float((ref[k] - start[k]).abs().max()) for k in ref if ref[k].is_floating_point()) > 100 * TOL


def test_probe_under_ddp_matches_one_process(single, tmp_path) -> None:
    """The probe's frozen encoder takes no gradient and no DDP bucket; its head learns the same on 2 ranks."""
    datalist, _ = single
    ref = finetune(1, datalist, tmp_path / "probe1", None, batch=2, task="probe")
    got = finetune(2, datalist, tmp_path / "probe2", "ddp.json", batch=1, task="probe")
    assert set(got) == set(ref)
    worst = max(float((got[k].float() - ref[k].float()).abs().max()) for k in ref)
    assert worst <= TOL, f"probe under DDP: max |difference| {worst:.2e} > {TOL:.0e}"
    torch.manual_seed(0)
    start = PROBE.build_model(ModelConfig(feature_size=12, depths=(1, 1, 1, 1)), num_classes=5).state_dict()
    moved = {k: float((ref[k] - start[k]).abs().max()) for k in ref if ref[k].is_floating_point()}
    assert max(v for k, v in moved.items() if not k.startswith("swinViT.")) > 100 * TOL  # the head learned
    assert max(v for k, v in moved.items() if k.startswith("swinViT.")) == 0.0  # the encoder stayed frozen
