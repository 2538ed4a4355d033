"""What a new user sees: no third-party chatter on every command, and a checkpoint write that runs out of space says
so (torch's writer only says "basic_ios::clear: iostream error")."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn

import ssl3d.checkpoint
from ssl3d.checkpoint import CheckpointManager
from ssl3d.errors import CheckpointWriteError
from ssl3d.strategies.single import SingleStrategy

ROOT = Path(__file__).resolve().parents[2]
MONAI_CHATTER = ("nvImageCodec is not available", "NvImgCodecPydicomReader")


class Usage(NamedTuple):
    """What shutil.disk_usage returns."""

    total: int
    used: int
    free: int


@pytest.mark.slow
def test_a_command_that_loads_volumes_prints_no_nvimagecodec_line(tmp_path: Path) -> None:
    """MONAI's LoadImage builds every DICOM reader, also the GPU one, and that one logs (and warns) that
    nvImageCodec is missing: on every ``ssl3d`` command that reads a volume, though ssl3d reads NIfTI."""
    demo = subprocess.run(
        [sys.executable, "-m", "ssl3d.cli", "data", "demo", str(tmp_path / "demo"), "--volumes", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert demo.returncode == 0, demo.stderr
    check = subprocess.run(
        [sys.executable, "-m", "ssl3d.cli", "data", "check", str(tmp_path / "demo" / "dataset_demo.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    out = demo.stdout + demo.stderr + check.stdout + check.stderr
    assert check.returncode == 0, out
    assert "2 volumes checked" in out, out
    for chatter in MONAI_CHATTER:
        assert chatter not in out, out


def test_other_monai_warnings_still_show() -> None:
    """The filter is for that one message: the same logger's other warnings still reach the user."""
    code = (
        "import logging, ssl3d; "
        "logging.getLogger('monai.data.nvimgcodec_pydicom_plugin').warning('something else is wrong')"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert "something else is wrong" in run.stderr


# -- a checkpoint on a file system that is too small ------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB file system (tmpfs): torch's zip writer fails there the way it does on a full disk."""
    where = tmp_path / "small"
    where.mkdir()
    if not sys.platform.startswith("linux"):
        pytest.skip("mounting a tmpfs needs Linux")
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip("no mount command to make a small file system")
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({mounted.stderr.strip()}): needs root or CAP_SYS_ADMIN")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)  # lazy: a file a failed test left open is no block


def _manager(root: Path, width: int) -> tuple[CheckpointManager, SingleStrategy]:
    """A Linear of ``width`` squared floats; after one AdamW step its checkpoint is three times the weights."""
    torch.manual_seed(0)
    strategy = SingleStrategy(torch.device("cpu"), torch.float32)
    strategy.setup(nn.Linear(width, width), lambda params: torch.optim.AdamW(params, lr=0.1))
    return CheckpointManager(root, strategy, keep=2), strategy


def _step(strategy: SingleStrategy, width: int) -> None:
    strategy.backward(strategy.model(torch.ones(2, width)).square().sum())
    strategy.step(None)


def _one_line_about_space(exc: CheckpointWriteError, final: Path) -> str:
    line = str(exc)
    assert "\n" not in line, line
    assert line.startswith(f"could not write checkpoint {final}: no space left on device;"), line
    assert "iostream" not in line and "unexpected pos" not in line, line
    assert " free on " in line and "after removing the partial" in line, line
    return line


def test_first_checkpoint_on_a_too_small_file_system_says_no_space(small_fs: Path) -> None:
    """Before: "RuntimeError: basic_ios::clear: iostream error", since with no earlier checkpoint the space needed
    was taken as 0 and the free space was measured only after the partial folder was removed (all 2 MiB free)."""
    root = small_fs / "checkpoints"
    manager, strategy = _manager(root, width=512)  # 1 MiB of weights, 3 MiB with AdamW's moments
    _step(strategy, 512)
    with pytest.raises(CheckpointWriteError) as info:
        manager.save(1, {"step": 1})
    line = _one_line_about_space(info.value, root / "step_00000001")
    assert "2.0 MiB free on" in line, line  # all of it once the partial folder is gone, and not enough
    assert "it needs more than that (2.0 MiB were written when the disk filled)" in line, line
    assert line.endswith("no earlier checkpoint: start again"), line
    assert sorted(p.name for p in root.iterdir()) == []  # the partial folder is gone


def test_checkpoint_that_outgrows_the_previous_one_says_no_space(small_fs: Path) -> None:
    """A checkpoint before the first optimizer step has no AdamW moments: the next one is three times its size, more
    than the file system has left, though more is left than the previous checkpoint took. Before: the iostream
    error, since only "free < size of the previous checkpoint" counted as a full disk."""
    root = small_fs / "checkpoints"
    manager, strategy = _manager(root, width=400)  # 0.61 MiB of weights, 1.8 MiB with AdamW's moments
    first = manager.save(1, {"step": 1})
    _step(strategy, 400)
    with pytest.raises(CheckpointWriteError) as info:
        manager.save(2, {"step": 2})  # 1.8 MiB into the 1.4 MiB left
    line = _one_line_about_space(info.value, root / "step_00000002")
    assert "1.4 MiB free on" in line and "it needs more than that (1.4 MiB were written when the disk filled)" in line
    assert line.endswith(f"resume from {first} with --resume auto"), line
    assert sorted(p.name for p in root.iterdir()) == ["last", "step_00000001"]


def test_torch_writer_failing_on_a_full_device_without_mounting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Where no tmpfs can be mounted: state.pt is a link to /dev/full (every write fails with ENOSPC), so torch's
    own writer fails as on a full disk; the file system's free space is what a full disk would report at the
    failure (0) and, once the partial folder is gone, what it took."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    root = tmp_path / "checkpoints"
    manager, strategy = _manager(root, width=64)
    real_save = SingleStrategy.save

    seen: list[BaseException] = []

    def save_to_full_device(self: SingleStrategy, directory: Path, extra: dict) -> None:
        (directory / "state.pt").symlink_to("/dev/full")
        try:
            real_save(self, directory, extra)
        except RuntimeError as exc:
            seen.append(exc)
            raise

    partial = root / ".tmp_step_00000001"

    def disk_usage(path: str | Path) -> Usage:
        free = 0 if partial.exists() else 5 * 2**20
        return Usage(5 * 2**20, 5 * 2**20 - free, free)

    monkeypatch.setattr(SingleStrategy, "save", save_to_full_device)
    monkeypatch.setattr(ssl3d.checkpoint.shutil, "disk_usage", disk_usage)
    with pytest.raises(CheckpointWriteError) as info:
        manager.save(1, {"step": 1})
    (raised,) = seen
    assert "iostream error" in f"{raised} {raised.__context__}", raised  # torch's wording, no errno
    line = _one_line_about_space(info.value, root / "step_00000001")
    assert "5.0 MiB free on" in line, line


def test_a_failure_the_free_space_does_not_explain_keeps_its_own_words(tmp_path: Path, monkeypatch) -> None:
    """Plenty of room at the failure: the cause is not space, and the message says what torch said."""
    root = tmp_path / "checkpoints"
    manager, _ = _manager(root, width=8)

    def broken(self: SingleStrategy, directory: Path, extra: dict) -> None:
        raise RuntimeError("a writer bug")

    monkeypatch.setattr(SingleStrategy, "save", broken)
    with pytest.raises(CheckpointWriteError, match="RuntimeError: a writer bug;"):
        manager.save(1, {"step": 1})


def test_an_errno_other_than_enospc_is_reported_even_on_a_full_disk(tmp_path: Path, monkeypatch) -> None:
    """A permission error on a full disk is a permission error: the free space only speaks where torch hid the errno."""
    root = tmp_path / "checkpoints"
    manager, _ = _manager(root, width=8)

    def refused(self: SingleStrategy, directory: Path, extra: dict) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(directory / "state.pt"))

    monkeypatch.setattr(SingleStrategy, "save", refused)
    monkeypatch.setattr(ssl3d.checkpoint.shutil, "disk_usage", lambda path: Usage(2**30, 2**30, 0))
    with pytest.raises(CheckpointWriteError, match=r"PermissionError: \[Errno 13\] Permission denied"):
        manager.save(1, {"step": 1})


@pytest.fixture
def damaged_weights(tmp_path: Path) -> Path:
    """A real weights file (an encoder-shaped state dict, as ``model_swinvit.pt`` holds) cut to half its bytes."""
    import torch

    path = tmp_path / "model_swinvit.pt"
    torch.save({"state_dict": {"patch_embed.proj.weight": torch.randn(12, 1, 2, 2, 2)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["export", "{weights}", "{tmp}/out.pt"],
        ["finetune", "--init", "{weights}", '--set=train.logdir="{tmp}/ft"', '--set=train.device="cpu"'],
        ["pretrain", '--set=model.init_weights="{weights}"', '--set=train.logdir="{tmp}/pre"', "--dry-run"],
    ],
    ids=["export", "finetune-init", "model.init_weights"],
)
def test_a_damaged_weights_file_is_one_line_and_exit_2(
    command: list[str], damaged_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every weights file ssl3d reads: a truncated one ends with one line naming the file, what is wrong and what
    to do, exit 2, and no traceback (torch's own error is a ``PytorchStreamReader`` traceback)."""
    from ssl3d.cli import main

    argv = [a.format(weights=damaged_weights, tmp=tmp_path) for a in command]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "ssl3d: error" in line]
    assert len(lines) == 1 and str(damaged_weights) in lines[0], captured
    assert "truncated or damaged" in lines[0] and "ssl3d export" in lines[0]
    assert "Traceback" not in captured.out + captured.err
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "ft" / "checkpoints").exists()
