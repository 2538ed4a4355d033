"""Broken volumes in a datalist: skipped and reported under "skip", fatal and named under "fail"."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from tiny_run import TINY_RUN

from ssl3d.cli import main
from ssl3d.config import load_config
from ssl3d.data.faults import BadVolumeError
from ssl3d.strategies import build_strategy
from ssl3d.trainer import Trainer

TINY = {
    **TINY_RUN,
    "optim.warmup_steps": 1,
}


def write(path: Path, array: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0])), path)


@pytest.fixture
def messy(tmp_path) -> Path:
    """Three good volumes and one of each fault: missing, truncated, 2D, tiny, constant."""
    rng = np.random.default_rng(0)
    img = tmp_path / "img"
    img.mkdir()
    for i in range(3):
        write(img / f"good{i}.nii.gz", rng.normal(0, 300, size=(48, 64, 64)).astype(np.int16))
    write(img / "flat.nii.gz", rng.normal(0, 300, size=(64, 64)).astype(np.int16))
    write(img / "tiny.nii.gz", rng.normal(0, 300, size=(8, 8, 8)).astype(np.int16))
    write(img / "constant.nii.gz", np.full((40, 40, 40), -1000, np.int16))
    write(img / "cut.nii.gz", rng.normal(0, 300, size=(48, 64, 64)).astype(np.int16))
    raw = (img / "cut.nii.gz").read_bytes()
    (img / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated gzip stream
    names = ["good0", "missing", "cut", "flat", "good1", "tiny", "constant"]
    datalist = {
        "training": [{"image": f"img/{n}.nii.gz"} for n in names],
        "validation": [{"image": "img/good2.nii.gz"}],
    }
    (tmp_path / "list.json").write_text(json.dumps(datalist))
    return tmp_path / "list.json"


BAD_NAMES = ["missing", "cut", "flat", "tiny", "constant"]


def test_skip_policy_finishes_and_names_each_bad_file(messy, tmp_path, capsys):
    args = ["pretrain", "--datalist", str(messy)] + [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]
    args += [f"--set=train.logdir={tmp_path / 'run'}", "--set=train.num_steps=7", "--set=train.eval_num=7"]
    with pytest.warns(UserWarning, match="skipping unusable volume"):
        assert main(args) == 0
    out = capsys.readouterr().out
    assert "5 unusable volumes were skipped" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    reported = " ".join(summary["bad_volumes"])
    for name in BAD_NAMES:
        assert f"{name}.nii.gz" in reported, name
    assert "not a 3D volume" in reported and "too small" in reported and "constant" in reported


def test_fail_policy_stops_at_the_first_bad_file(messy, tmp_path, capsys):
    rng = np.random.default_rng(1)
    write(messy.parent / "img" / "missing.nii.gz", rng.normal(0, 300, size=(48, 64, 64)).astype(np.int16))
    cfg = load_config(
        None,
        {
            **TINY,
            "data.datalists": [{"json": str(messy)}],
            "data.on_bad_volume": "fail",
            "train.num_steps": 7,
            "train.logdir": str(tmp_path / "run"),
            "data.dataset": "plain",
        },
    )
    trainer = Trainer(cfg, build_strategy(cfg))
    with pytest.raises(BadVolumeError, match=r"(cut|flat|tiny|constant)\.nii\.gz"):
        trainer.fit()


def test_fail_policy_reports_missing_files_up_front(messy, tmp_path, capsys):
    args = ["pretrain", "--datalist", str(messy), '--set=data.on_bad_volume="fail"']
    args += [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()] + [f"--set=train.logdir={tmp_path / 'r'}"]
    assert main(args) == 2
    assert "missing.nii.gz" in capsys.readouterr().err


def test_data_check_lists_every_bad_entry(messy, capsys):
    assert main(["data", "check", str(messy)]) == 1
    out = capsys.readouterr().out
    assert out.count("bad: ") == 5
    for name in BAD_NAMES:
        assert f"{name}.nii.gz" in out
    assert "8 volumes checked, 5 unusable" in out
