"""The one training loop's robustness, for every task: pre-training, fine-tuning and (where it differs) the probe.

Each fault runs a real tiny run of the task on the same labelled demo volumes (pre-training reads their images):
- SIGKILL after a step, then ``--resume auto``: the losses of the uninterrupted run (separate processes, one
  thread: bit-exact);
- SIGTERM (a scheduler's preemption): a checkpoint at that step and exit 4;
- a damaged newest checkpoint: named, skipped, and the one before it taken;
- a planted NaN loss: that step's update is skipped and counted, the run goes on;
- an unreadable volume in the training list: skipped and named;
- a loader worker killed mid-epoch: restarted, the losses are those of a clean run;
- an out-of-memory error in a step: one line with the peak, the estimate and the plan, exit 3;
- an fp16 overflow streak while the loss scale settles: skipped steps, never a stop.

The probe shares fine-tuning's data path and step outcome; it runs the kill, preemption, damaged-checkpoint and NaN
faults, where its frozen encoder and its own saved state could differ.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_logs import newest_complete_step, resumed_from, steps_per_process
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_run import TINY_RUN

from ssl3d.cli import main
from ssl3d.config import load_config
from ssl3d.data.demo import write_demo_dataset
from ssl3d.strategies import build_strategy
from ssl3d.trainer import Trainer

ALL_TASKS = ["pretrain", "finetune", "probe"]
DATA_TASKS = ["pretrain", "finetune"]  # the probe's data path and step outcome are fine-tuning's
STEPS, EVAL = 4, 2  # checkpoints at steps 2 and 4
RUN = {
    **TINY_RUN,
    "train.eval_num": EVAL,
    "train.max_val_batches": 1,
    "optim.warmup_steps": 1,
    "optim.lr": 1e-3,
    "finetune.sw_batch_size": 4,
    "finetune.sw_overlap": 0.0,
}
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def datalist(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_volumes=3, shape=(64, 64, 48))


def args(task: str, datalist: Path, logdir: Path, steps: int = STEPS, **extra: object) -> list[str]:
    """The command line of a tiny run of ``task`` on ``datalist`` (pre-training reads its images)."""
    run = {**RUN, "train.num_steps": steps, "train.logdir": str(logdir), **extra}
    run["data.datalists"] = [{"json": str(datalist)}]
    return [task, *[f"--set={k}={json.dumps(v)}" for k, v in run.items()]]


def launch(cli_args: list[str], *extra: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ssl3d.cli", *cli_args, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**ONE_THREAD, **env}, timeout=600)


def losses(logdir: Path) -> dict[int, float]:
    """Loss per step; a step logged twice (before a kill and after the resume) keeps its last value."""
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in sorted(acc.Scalars("train/loss_total"), key=lambda e: e.wall_time)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, datalist):
    """The uninterrupted run of each task (run once, on first use)."""
    root = tmp_path_factory.mktemp("straight")
    done: dict[str, Path] = {}

    def get(task: str, **extra: object) -> Path:
        name = task + "".join(f"_{k}={v}" for k, v in extra.items())
        if name not in done:
            out = launch(args(task, datalist, root / name, **extra))
            assert out.returncode == 0, out.stderr[-3000:]
            done[name] = root / name
        return done[name]

    return get


# Pre-training with a queue of negatives (ssl.negative_queue): the queue is part of each rank's checkpoint.
KILL_CASES = [(task, {}) for task in ALL_TASKS] + [("pretrain", {"ssl.negative_queue": 6})]


@pytest.mark.parametrize(("task", "extra"), KILL_CASES, ids=[*ALL_TASKS, "pretrain-negative-queue"])
def test_sigkill_then_resume_auto_gives_the_uninterrupted_losses(task, extra, straight, datalist, tmp_path):
    reference = losses(straight(task, **extra))
    logdir = tmp_path / "killed"
    killed = launch(args(task, datalist, logdir, **extra), SSL3D_KILL_AT_STEP="3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert newest_complete_step(logdir) == 2
    resumed = launch(args(task, datalist, logdir, **extra), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_from(resumed.stdout) == [(str(logdir / "checkpoints" / "step_00000002"), 2)]
    before, after = steps_per_process(logdir)  # step 3's record may die unflushed with the first process
    assert before[:2] == [1, 2] and after == [3, 4]
    assert losses(logdir) == reference  # separate processes, one thread each: bit for bit
    assert sorted(reference) == list(range(1, STEPS + 1))


@pytest.mark.parametrize("task", ALL_TASKS)
def test_sigterm_writes_a_checkpoint_and_exits_4(task, datalist, tmp_path):
    logdir = tmp_path / "preempted"
    out = launch(args(task, datalist, logdir), SSL3D_SIGTERM_AT_STEP="1")
    assert out.returncode == 4, out.stderr[-3000:]
    assert newest_complete_step(logdir) == 1  # not a validation step: written because of the signal
    assert "every rank stopped after step 1 of 4" in out.stderr and "--resume auto" in out.stderr


@pytest.mark.parametrize("task", ALL_TASKS)
def test_a_damaged_newest_checkpoint_is_named_and_the_one_before_taken(task, straight, datalist, tmp_path, capsys):
    import shutil

    logdir = tmp_path / "run"
    shutil.copytree(straight(task), logdir, symlinks=True)
    newest = logdir / "checkpoints" / "step_00000004"
    biggest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with pytest.warns(UserWarning, match="step_00000004"):
        assert main([*args(task, datalist, logdir), "--resume", "auto"]) == 0
    assert resumed_from(capsys.readouterr().out) == [(str(logdir / "checkpoints" / "step_00000002"), 2)]
    got, reference = losses(logdir), losses(straight(task))
    for step in (3, 4):  # in this process (2 threads): equal to the rounding of a thread count
        assert got[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-6), step


@pytest.mark.parametrize("task", ALL_TASKS)
def test_a_planted_nan_step_is_skipped_and_counted(task, datalist, tmp_path, monkeypatch):
    monkeypatch.setenv("SSL3D_PLANT_NAN", "2")
    logdir = tmp_path / "nan"
    with pytest.warns(UserWarning, match="step 2: non-finite loss or gradient norm; update skipped"):
        assert main(args(task, datalist, logdir, steps=3, **{"train.eval_num": 3})) == 0
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["skipped_steps"] == 1


@pytest.mark.parametrize("task", DATA_TASKS)
def test_an_unreadable_volume_is_skipped_and_named(task, datalist, tmp_path):
    doc = json.loads(datalist.read_text())
    root = datalist.parent
    cut = tmp_path / "cut.nii.gz"
    image = root / doc["training"][0]["image"]
    cut.write_bytes(image.read_bytes()[:2000])  # a real NIfTI header, the data cut off
    bad = {"image": str(cut), "label": str(root / doc["training"][0]["label"])}
    for entry in doc["training"] + doc["validation"]:
        entry["image"], entry["label"] = str(root / entry["image"]), str(root / entry["label"])
    doc["training"] = [bad, *doc["training"]]
    messy = tmp_path / "messy.json"
    messy.write_text(json.dumps(doc))
    logdir = tmp_path / "run"
    with pytest.warns(UserWarning, match=f"skipping unusable volume {cut}"):
        assert main(args(task, messy, logdir, steps=2, **{"train.batch_size": 2})) == 0
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["steps"] == 2 and [k for k in summary["bad_volumes"] if str(cut) in k]


@pytest.mark.parametrize("task", DATA_TASKS)
def test_a_killed_loader_worker_is_restarted(task, straight, datalist, tmp_path, monkeypatch):
    """A worker killed mid-epoch (SIGKILL) is replaced; the batches and losses are those of the clean run."""
    import torch.utils.data

    from ssl3d.data.datasets import CropDataset

    marker = tmp_path / "killed_once"
    original = CropDataset.__getitem__

    def dying_getitem(self, key):
        if torch.utils.data.get_worker_info() is not None and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, key)

    monkeypatch.setattr(CropDataset, "__getitem__", dying_getitem)
    logdir = tmp_path / "crashed"
    with pytest.warns(UserWarning, match="a data loader worker died"):
        assert main(args(task, datalist, logdir, **{"data.num_workers": 1})) == 0
    assert marker.exists()
    assert losses(logdir) == pytest.approx(losses(straight(task)), rel=1e-4)  # in-process, 2 threads


@pytest.mark.parametrize("task", DATA_TASKS)
def test_out_of_memory_names_peak_estimate_and_plan(task, datalist, tmp_path, monkeypatch, capsys) -> None:
    """An out-of-memory error in a step ends the run with exit 3 and one message: the measured peak, the
    estimator's figure for this run and the planner's suggestion (no traceback)."""

    def oom(self, micro):  # noqa: ANN001 - stands in for Trainer.train_step
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Trainer, "train_step", oom)
    assert main(args(task, datalist, tmp_path / "run", steps=2)) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(x for x in err.splitlines() if "out of memory" in x)
    assert "step 1: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB)" in line
    assert "measured peak RSS" in line and "the estimate for this run is" in line
    assert "--fit-memory" in line and "no checkpoint written yet" in line


def _fp16_trainer(task: str, datalist: Path, logdir: Path, **overrides) -> Trainer:
    """A tiny run of ``task`` whose strategy runs fp16 through torch's GradScaler on the CPU (ssl3d refuses fp16 on a
    CPU for users; the scaler's overflow handling is what is tested), at an initial scale of 2^24: a scaled gradient
    overflows fp16 once any gradient exceeds about 2^-8 (2^-7 at the next scale), so the first steps overflow."""
    from ssl3d.downstream.run import prepare_run
    from ssl3d.tasks import PretrainTask, SegmentationTask

    run = {**RUN, "train.logdir": str(logdir), "data.datalists": [{"json": str(datalist)}], **overrides}
    cfg = load_config(None, run)
    if task == "pretrain":
        job = PretrainTask()
    else:
        cfg.finetune.task = task
        cfg, _, data, _ = prepare_run(cfg, set())
        job = SegmentationTask(task, data, None)
    strategy = build_strategy(cfg)
    strategy.dtype = torch.float16
    strategy.ds_config = dataclasses.replace(strategy.ds_config, fp16={"initial_scale_power": 24})
    return Trainer(cfg, strategy, job)


@pytest.mark.parametrize("task", DATA_TASKS)
def test_an_fp16_overflow_streak_does_not_stop_the_run(task, datalist, tmp_path: Path) -> None:
    """While the scaler settles from 2^24, gradients overflow at several steps in a row: the scaler skips those
    updates and halves the scale; they are counted, but unlike NaN losses they do not count towards
    train.max_bad_steps (1 here). Two steps: fp16 convolutions on a CPU take seconds each."""
    run = {"train.num_steps": 2, "train.eval_num": 2, "train.max_bad_steps": 1}
    trainer = _fp16_trainer(task, datalist, tmp_path / "run", **run)
    summary = trainer.fit()
    assert summary["steps"] == 2
    assert summary["skipped_steps"] == 2  # would have stopped the run after the first if counted as bad
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0})
    acc.Reload()
    scales = [e.value for e in acc.Scalars("train/loss_scale")]
    assert scales[-1] <= 2.0**23 and scales == sorted(scales, reverse=True)


def test_a_checkpoint_of_another_task_is_refused(straight, datalist, tmp_path, capsys):
    """``--resume`` of a pre-training checkpoint by a fine-tuning run: one line, exit 2, nothing trained."""
    import shutil

    logdir = tmp_path / "run"
    shutil.copytree(straight("pretrain") / "checkpoints", logdir / "checkpoints", symlinks=True)
    assert main([*args("finetune", datalist, logdir), "--resume", "auto"]) != 0
    err = capsys.readouterr().err
    assert "is a pretrain checkpoint and this run is finetune" in err and "Traceback" not in err
