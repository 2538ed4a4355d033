"""Which DeepSpeed checkpoints resume at another world size with their optimizer (universal checkpoint) and which
fall back to a fresh optimizer: decided from the step folder's file layout, without a process group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssl3d.strategies.deepspeed import DeepSpeedStrategy, is_zero3_checkpoint, zero_partition_files


def folder(tmp_path: Path, *names: str) -> Path:
    (tmp_path / "deepspeed").mkdir(parents=True)
    for name in names:
        (tmp_path / "deepspeed" / name).touch()
    return tmp_path


def strategy(stage: int) -> DeepSpeedStrategy:
    s = DeepSpeedStrategy(torch.device("cpu"), torch.float32)
    s.stage = stage
    return s


ZERO2 = (
    "mp_rank_00_model_states.pt",
    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "zero_pp_rank_1_mp_rank_00_optim_states.pt",
)
ZERO3 = (
    "zero_pp_rank_0_mp_rank_00_model_states.pt",
    "zero_pp_rank_1_mp_rank_00_model_states.pt",
    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "zero_pp_rank_1_mp_rank_00_optim_states.pt",
)


def test_layout_from_file_names(tmp_path: Path) -> None:
    z2 = folder(tmp_path / "z2", *ZERO2)
    z3 = folder(tmp_path / "z3", *ZERO3)
    bf16 = folder(tmp_path / "bf16", "mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert len(zero_partition_files(z2)) == 2 and not is_zero3_checkpoint(z2)
    assert len(zero_partition_files(z3)) == 2 and is_zero3_checkpoint(z3)
    assert len(zero_partition_files(bf16)) == 1


@pytest.mark.parametrize(
    ("files", "stage", "problem"),
    [
        (ZERO2, 2, None),
        (ZERO2, 1, None),
        (ZERO3, 3, None),
        (("mp_rank_00_model_states.pt",), 0, "stage 0"),
        (ZERO2, 3, "same ZeRO family"),
        (ZERO3, 2, "same ZeRO family"),
    ],
)
def test_resume_problem(tmp_path: Path, files: tuple[str, ...], stage: int, problem: str | None) -> None:
    directory = folder(tmp_path, *files)
    s = strategy(stage)  # world size 1 (no RANK/WORLD_SIZE in the environment)
    assert s.resume_problem(directory, 1) is None  # same world size: the plain DeepSpeed load
    got = s.resume_problem(directory, 2)
    assert got is None if problem is None else problem in got
