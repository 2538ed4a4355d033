import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ssl3d.cli import add_run_flags, add_seed_flags, build_config, main

ROOT = Path(__file__).resolve().parents[2]


def seed_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_run_flags(p)
    add_seed_flags(p)
    return p.parse_args(argv)


def test_seed_flags_map_onto_the_config():
    argv = "--use_checkpoint --batch_size=1 --sw_batch_size=1 --num_steps=7 --lrdecay --eval_num=3 --logdir=x "
    argv += "--lr=6e-6 --decay=0.05 --roi_x=32 --roi_y=64 --roi_z=64 --feature_size=24 --noamp --grad_clip"
    cfg = build_config(seed_args(argv.split()), seed_flags=True)
    assert cfg.model.use_checkpoint and cfg.model.feature_size == 24
    assert cfg.train.batch_size == 1 and cfg.data.num_samples == 1 and cfg.train.num_steps == 7
    assert cfg.optim.schedule == "warmup_cosine" and cfg.optim.lr == 6e-6 and cfg.optim.weight_decay == 0.05
    assert cfg.data.roi == (32, 64, 64) and cfg.train.precision == "fp32" and cfg.train.grad_clip == 1.0
    assert cfg.train.logdir == "runs/x" and cfg.train.eval_num == 3


def test_without_lrdecay_the_rate_is_constant_like_the_seed():
    cfg = build_config(seed_args(["--num_steps=5"]), seed_flags=True)
    assert cfg.optim.schedule == "constant"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    assert test_cmd.strip() in (ROOT / ".ci" / "run").read_text()


def test_user_errors_exit_2_with_one_line_per_problem(capsys):
    assert main(["pretrain", "--set", "train.batch_size=0", "--set", "data.roi=[50,64,64]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert any("train.batch_size" in line for line in err) and any("data.roi[0]" in line for line in err)


def test_missing_config_file_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ssl3d.cli", "pretrain", "--config", str(tmp_path / "nope.json")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "nope.json: not found" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [["export", "missing_dir", "out.pt"]])
def test_export_of_missing_checkpoint_is_a_user_error(argv, capsys):
    assert main(argv) == 2
    assert "missing_dir" in capsys.readouterr().err


def test_memory_estimate_prints_a_breakdown_as_json(capsys):
    args = ["memory", "estimate", "--json", "--device", "cpu", "--set", "model.feature_size=12"]
    args += ["--set", "model.depths=[1,1,1,1]", "--set", "data.roi=[64,64,64]", "--set", "train.batch_size=1"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    parts = out["bytes"]
    assert parts["total"] > parts["activations"] > 0 and parts["parameters"] > 0


def test_memory_plan_rejects_a_bad_budget(capsys):
    assert main(["memory", "plan", "--budget", "lots"]) == 2
    assert "--budget" in capsys.readouterr().err


def test_preset_and_run_input_problems_are_reported_together(tmp_path, capsys):
    """A misspelled preset section and a --resume folder with no checkpoint: both lines in one report, exit 2."""
    preset = tmp_path / "zero.json"
    preset.write_text(json.dumps({"zero_optimisation": {"stage": 2}}))
    logdir = tmp_path / "run"
    missing = tmp_path / "nothing_here"
    missing.mkdir()
    args = ["pretrain", f"--ds_config={preset}", f"--resume={missing}", f"--set=train.logdir={json.dumps(str(logdir))}"]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ssl3d: error:")]
    assert any("zero_optimisation" in line for line in err), err
    assert any(str(missing) in line for line in err), err
    assert not logdir.exists()
