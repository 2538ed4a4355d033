"""Checkpoints prove themselves: the COMPLETE marker lists every file's size and SHA-256; a damaged checkpoint
(truncated, a flipped byte, a missing file, a missing marker) is named and skipped by ``--resume auto``, refused
when named explicitly (exit 2), and refused by ``ssl3d export`` and ``model.init_weights``. A checkpoint write
that fails (a full disk) stops the run with exit 3, removes the partial folder and leaves the previous one intact.

One backend writes one file (single); FSDP2 on 2 gloo ranks writes a sharded ``torch.distributed.checkpoint``."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cpu_runs import cpu_env
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_run import TINY_RUN

from ssl3d.checkpoint import checkpoint_problem, resolve_resume
from ssl3d.cli import main
from ssl3d.config import ConfigError
from ssl3d.strategies.single import SingleStrategy

ROOT = Path(__file__).resolve().parents[2]
TINY = {**TINY_RUN, "data.demo_volumes": 4, "train.max_val_batches": 1, "optim.warmup_steps": 1, "optim.lr": 1e-3}
STEPS, EVAL = 4, 2  # checkpoints at steps 2 and 4
REL, ABS = 1e-5, 1e-6


def flags(logdir: Path, demo: Path, **more: object) -> list[str]:
    run = {**TINY, "train.num_steps": STEPS, "train.eval_num": EVAL, **more}
    run |= {"data.demo_dir": str(demo), "train.logdir": str(logdir)}
    return [f"--set={k}={json.dumps(v)}" for k, v in run.items()]


def losses(logdir: Path) -> dict[int, float]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in sorted(acc.Scalars("train/loss_total"), key=lambda e: e.wall_time)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_fsdp(logdir: Path, demo: Path, *extra: str) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    cmd += ["launch/pretrain.py", "--ds_config", "ds_configs/fsdp.json", *flags(logdir, demo), *extra]
    env = cpu_env()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("torchrun: no result after 300 s\n" + proc.communicate()[0][-3000:])
    return proc.returncode, out


# -- damage, as it happens to files on shared storage -----------------------------------------------------------
def biggest(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file() and p.name != "COMPLETE"), key=lambda p: p.stat().st_size)


def truncate(folder: Path) -> None:
    f = biggest(folder)
    os.truncate(f, f.stat().st_size // 2)


def flip(folder: Path) -> None:
    """400 bytes inverted in the middle of the biggest file: same size, other contents."""
    f = biggest(folder)
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 400] = bytes(b ^ 0xFF for b in data[mid : mid + 400])
    f.write_bytes(bytes(data))


def missing_file(folder: Path) -> None:
    biggest(folder).unlink()


def missing_marker(folder: Path) -> None:
    (folder / "COMPLETE").unlink()


DAMAGE = {"truncated": truncate, "flipped": flip, "missing_file": missing_file, "missing_marker": missing_marker}
EXPECTED = {
    "truncated": "bytes, the marker lists",
    "flipped": "differs from its SHA-256",
    "missing_file": "is missing",
    "missing_marker": "no COMPLETE marker",
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trust_demo")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, demo) -> Path:
    logdir = tmp_path_factory.mktemp("trust_single") / "run"
    assert main(["pretrain", *flags(logdir, demo)]) == 0
    return logdir


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, demo) -> Path:
    logdir = tmp_path_factory.mktemp("trust_fsdp") / "run"
    rc, out = torchrun_fsdp(logdir, demo)
    assert rc == 0, out[-4000:]
    assert (logdir / "checkpoints" / "step_00000004" / "dcp").is_dir()
    return logdir


def damaged_copy(run: Path, tmp_path: Path, damage: str) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    DAMAGE[damage](copy / "checkpoints" / "step_00000004")
    return copy


def test_the_marker_lists_each_file_with_size_and_checksum(single_run, fsdp_run):
    for run, expected in (
        (single_run, {"state.pt", "extra_rank0.pt"}),
        (fsdp_run, {"extra_rank0.pt", "extra_rank1.pt"}),
    ):
        folder = run / "checkpoints" / "step_00000004"
        marker = json.loads((folder / "COMPLETE").read_text())
        assert expected <= set(marker["files"]), marker["files"].keys()
        for rel, entry in marker["files"].items():
            assert (folder / rel).stat().st_size == entry["size"] and len(entry["sha256"]) == 64
        assert checkpoint_problem(folder) is None
    shards = json.loads((fsdp_run / "checkpoints" / "step_00000004" / "COMPLETE").read_text())["files"]
    assert sum(rel.startswith("dcp/") and rel.endswith(".distcp") for rel in shards) == 2  # one per rank


@pytest.mark.parametrize("backend", ["single", "fsdp"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_skipped(backend, damage, single_run, fsdp_run, tmp_path):
    run = damaged_copy(single_run if backend == "single" else fsdp_run, tmp_path, damage)
    root, newest = run / "checkpoints", run / "checkpoints" / "step_00000004"
    with pytest.warns(UserWarning) as record:
        assert resolve_resume("auto", root, checksums=True) == root / "step_00000002"
    (line,) = [str(w.message) for w in record if "damaged" in str(w.message)]
    assert str(newest) in line and EXPECTED[damage] in line, line
    # named explicitly: refused, with the reason
    with pytest.raises(ConfigError, match=EXPECTED[damage]):
        resolve_resume(str(newest), root, checksums=True)


def test_resume_auto_after_truncation_continues_the_uninterrupted_curve(single_run, demo, tmp_path, capsys):
    """The report: a truncated state.pt ended in a PytorchStreamReader traceback."""
    run = damaged_copy(single_run, tmp_path, "truncated")
    (run / "summary.json").unlink()
    with pytest.warns(UserWarning, match=r"step_00000004 is damaged \(state.pt has \d+ bytes"):
        assert main(["pretrain", *flags(run, demo), "--resume", "auto"]) == 0
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in capsys.readouterr().out
    ref, got = losses(single_run), losses(run)
    for step in (3, 4):
        assert got[step] == pytest.approx(ref[step], rel=REL, abs=ABS), step
    assert checkpoint_problem(run / "checkpoints" / "step_00000004") is None  # rewritten


def test_flipped_bytes_never_resume_silently(single_run, demo, tmp_path, capsys):
    """The report: 400 flipped bytes resumed silently with corrupted weights. Named explicitly: exit 2, one line."""
    run = damaged_copy(single_run, tmp_path, "flipped")
    newest = run / "checkpoints" / "step_00000004"
    assert main(["pretrain", *flags(run, demo, **{"train.num_steps": 5}), "--resume", str(newest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(newest) in err[0] and "differs from its SHA-256" in err[0], err
    assert not (run / "checkpoints" / "step_00000005").exists()


def test_fsdp_resume_auto_on_2_ranks_falls_back_past_a_flipped_shard(fsdp_run, demo, tmp_path):
    run = damaged_copy(fsdp_run, tmp_path, "flipped")
    rc, out = torchrun_fsdp(run, demo, "--resume", "auto")
    assert rc == 0, out[-4000:]
    assert "step_00000004 is damaged" in out and "differs from its SHA-256" in out, out[-4000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'}" in out, out[-4000:]
    ref, got = losses(fsdp_run), losses(run)
    for step in (3, 4):
        assert got[step] == pytest.approx(ref[step], rel=REL, abs=ABS), step


def test_export_and_init_weights_verify(single_run, demo, tmp_path, capsys):
    run = damaged_copy(single_run, tmp_path, "flipped")
    newest = run / "checkpoints" / "step_00000004"
    assert main(["export", str(newest), str(tmp_path / "a.pt")]) == 2
    assert "differs from its SHA-256" in capsys.readouterr().err and not (tmp_path / "a.pt").exists()
    with pytest.warns(UserWarning, match="step_00000004 is damaged"):  # a run folder: its newest that verifies
        assert main(["export", str(run), str(tmp_path / "b.pt")]) == 0
    b = torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"]
    assert len(b) > 10
    more = {"model.init_weights": str(newest / "state.pt"), "train.num_steps": 1}
    assert main(["pretrain", *flags(tmp_path / "init", demo, **more)]) == 2
    err = capsys.readouterr().err
    assert "damaged checkpoint" in err and "state.pt" in err and "Traceback" not in err, err


def test_disk_full_while_writing_stops_with_exit_3_and_keeps_the_previous(demo, tmp_path, monkeypatch, capsys):
    """ENOSPC after part of step 4's state.pt is written (injected into the strategy's save)."""
    real_save = SingleStrategy.save

    def save(self, directory: Path, extra: dict) -> None:
        if extra["step"] == 4:
            (directory / "state.pt").write_bytes(b"\0" * 100_000)
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "state.pt"))
        real_save(self, directory, extra)

    monkeypatch.setattr(SingleStrategy, "save", save)
    run = tmp_path / "run"
    assert main(["pretrain", *flags(run, demo)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    ckpts = run / "checkpoints"
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith(f"ssl3d: stopped: could not write checkpoint {ckpts / 'step_00000004'}: no space left"), line
    assert "it needs about" in line and "free on" in line, line
    assert f"resume from {ckpts / 'step_00000002'} with --resume auto" in line, line
    assert not (ckpts / ".tmp_step_00000004").exists() and not (ckpts / "step_00000004").exists()
    assert checkpoint_problem(ckpts / "step_00000002") is None
    assert os.readlink(ckpts / "last") == "step_00000002"
