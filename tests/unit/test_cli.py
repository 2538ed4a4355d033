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


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


# Every reference flag the README lists -> the config keys it must change (and nothing else), with values that
# differ from the defaults.
REFERENCE_FLAGS = [
    ("--batch_size=3", {"train.batch_size": 3}),
    ("--sw_batch_size=3", {"data.num_samples": 3}),
    ("--num_steps=11", {"train.num_steps": 11}),
    ("--lrdecay", {"optim.schedule": "warmup_cosine"}),
    ("--lrdecay --lr_schedule=poly", {"optim.schedule": "poly"}),
    ("--num_steps=11 --lr_schedule=poly", {"train.num_steps": 11}),  # the seed: constant rate without --lrdecay
    ("--eval_num=7", {"train.eval_num": 7}),
    ("--warmup_steps=9", {"optim.warmup_steps": 9}),
    ("--logdir=abc", {"train.logdir": "runs/abc"}),
    ("--logdir=./abc", {"train.logdir": "./abc"}),
    ("--lr=2e-5", {"optim.lr": 2e-5}),
    ("--decay=0.03", {"optim.weight_decay": 0.03}),
    ("--momentum=0.8", {"optim.momentum": 0.8}),
    ("--opt=sgd", {"optim.name": "sgd"}),
    ("--roi_x=64", {"data.roi": (64, 96, 96)}),
    ("--roi_y=64 --roi_z=64", {"data.roi": (96, 64, 64)}),
    ("--use_checkpoint", {"model.use_checkpoint": True}),
    ("--feature_size=24", {"model.feature_size": 24}),
    ("--dropout_path_rate=0.2", {"model.drop_path_rate": 0.2}),
    ("--noamp", {"train.precision": "fp32"}),
    ("--grad_clip", {"train.grad_clip": 1.0}),
    ("--grad_clip --max_grad_norm=0.5", {"train.grad_clip": 0.5}),
    ("--num_steps=11 --max_grad_norm=0.5", {"train.num_steps": 11}),  # the seed clips only with --grad_clip
    ("--a_min=-900", {"data.a_min": -900.0}),
    ("--a_max=900", {"data.a_max": 900.0}),
    ("--b_min=0.1", {"data.b_min": 0.1}),
    ("--b_max=0.9", {"data.b_max": 0.9}),
    ("--space_x=1.0", {"data.spacing": (1.0, 1.5, 2.0)}),
    ("--space_y=1.0", {"data.spacing": (1.5, 1.0, 2.0)}),
    ("--space_z=1.0", {"data.spacing": (1.5, 1.5, 1.0)}),
    ("--cache_dataset", {"data.dataset": "cache"}),
    ("--smartcache_dataset", {"data.dataset": "smart_cache"}),
    ("--seed=5 --resume={tmp}/step_00000010", {"train.seed": 5, "train.resume": "{tmp}/step_00000010"}),
    ("--seed=5", {"train.seed": 5}),
    ("--num_workers=3", {"data.num_workers": 3}),
]


@pytest.mark.parametrize(("argv", "changed"), REFERENCE_FLAGS, ids=[a for a, _ in REFERENCE_FLAGS])
def test_each_reference_flag_sets_its_key_and_nothing_else(argv, changed, tmp_path):
    (tmp_path / "step_00000010").mkdir()
    (tmp_path / "step_00000010" / "COMPLETE").touch()
    argv = argv.replace("{tmp}", str(tmp_path))
    changed = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v for k, v in changed.items()}
    base = _flat(build_config(seed_args([]), seed_flags=True, demo=False).to_dict())
    got = _flat(build_config(seed_args(argv.split()), seed_flags=True).to_dict())
    diff = {k: v for k, v in got.items() if v != base.get(k)}
    assert diff == changed
