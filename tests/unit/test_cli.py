import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ssl3d.cli import add_reference_flags, add_run_flags, main
from ssl3d.run_config import build_config
from ssl3d.tasks import PRETRAIN

ROOT = Path(__file__).resolve().parents[2]


def seed_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_run_flags(p)
    add_reference_flags(p)
    return p.parse_args(argv)


def test_reference_flags_map_onto_the_config():
    argv = "--use_checkpoint --batch_size=1 --sw_batch_size=1 --num_steps=7 --lrdecay --eval_num=3 --logdir=x "
    argv += "--lr=6e-6 --decay=0.05 --roi_x=32 --roi_y=64 --roi_z=64 --feature_size=24 --noamp --grad_clip"
    cfg = build_config(seed_args(argv.split()), reference_flags=True)
    assert cfg.model.use_checkpoint and cfg.model.feature_size == 24
    assert cfg.train.batch_size == 1 and cfg.data.num_samples == 1 and cfg.train.num_steps == 7
    assert cfg.optim.schedule == "warmup_cosine" and cfg.optim.lr == 6e-6 and cfg.optim.weight_decay == 0.05
    assert cfg.data.roi == (32, 64, 64) and cfg.train.precision == "fp32" and cfg.train.grad_clip == 1.0
    assert cfg.train.logdir == "runs/x" and cfg.train.eval_num == 3


def test_without_lrdecay_the_rate_is_constant_like_the_seed():
    cfg = build_config(seed_args(["--num_steps=5"]), reference_flags=True)
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert main([*args, '--set=train.device="cpu"']) == 2  # the checks, not a device: the same on a GPU machine
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


# Every reference flag docs/pretraining.md lists -> the config keys it must change (and nothing else), with values
# that differ from the defaults.
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
    base = _flat(build_config(seed_args([]), reference_flags=True, demo=False).to_dict())
    got = _flat(build_config(seed_args(argv.split()), reference_flags=True).to_dict())
    diff = {k: v for k, v in got.items() if v != base.get(k)}
    assert diff == changed


TINY_MEMORY = ["--set=model.feature_size=12", "--set=model.depths=[1,1,1,1]", "--set=data.roi=[32,64,64]"]
TINY_MEMORY += ["--set=train.batch_size=1", "--set=data.num_samples=2", "--set=train.precision=fp32", "--device=cpu"]


@pytest.mark.slow
def test_memory_plan_table_agrees_with_the_estimator(capsys):
    """The printed table: per strategy and world size, the largest cubic ROI and batch under each policy fit the
    budget by the estimator and the next candidate does not; the cheapest policy's GiB is the requested step's."""
    from ssl3d.config import ModelConfig
    from ssl3d.memory.estimate import GIB, estimate_memory

    budget = GIB
    assert main(["memory", "plan", f"--budget={budget}", *TINY_MEMORY]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split()
    assert header[:2] == ["strategy", "ranks"] and "cheapest" in header
    assert "full+mlp-chunks" in header
    rows = {(p[0], int(p[1])): p[2:] for p in (line.split() for line in lines[2:])}
    assert {s for s, _ in rows} == {"single", "ddp", "fsdp", "zero1", "zero2", "zero3"} and len(rows) == 21
    model = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), fused_attention=True)

    def total(strategy: str, ranks: int, roi, batch: int, policy: str) -> int:
        kw = {"strategy": strategy, "world_size": ranks, "device": "cpu", "fused_attention": True}
        return estimate_memory(model, roi, batch, 2, "fp32", policy, **kw, task=PRETRAIN).total

    for strategy, ranks in [("single", 1), ("zero3", 8)]:
        policies = ("none", "full", {"policy": "full", "mlp_chunks": 4})  # the table's columns, in order
        row = rows[(strategy, ranks)]
        rois, batches, (cheapest, gib) = row[:3], row[3:6], row[6:]
        for policy, roi, batch in zip(policies, map(int, rois), map(int, batches)):
            assert total(strategy, ranks, roi, 1, policy) <= budget < total(strategy, ranks, roi + 32, 1, policy)
            fits = total(strategy, ranks, (32, 64, 64), batch, policy) <= budget
            assert fits and total(strategy, ranks, (32, 64, 64), batch + 1, policy) > budget
        assert cheapest == "none" and float(gib) == round(total(strategy, ranks, (32, 64, 64), 1, "none") / GIB, 1)


@pytest.mark.slow
def test_memory_profile_measures_the_estimated_step(tmp_path, capsys):
    """ssl3d memory profile runs real steps with the preset's policy: the tensor-storage peak it measures equals the
    estimator's allocated peak (the same step traced on fake tensors) to 2%, per-module peaks are listed, and the
    table prints those numbers."""
    from ssl3d.memory.profile import format_profile

    preset = tmp_path / "full.json"
    preset.write_text(json.dumps({"strategy": "single", "activation_checkpointing": {"policy": "full"}}))
    assert main(["memory", "profile", "--json", "--steps=1", f"--ds_config={preset}", *TINY_MEMORY]) == 0
    result = json.loads(capsys.readouterr().out)
    config = result["config"]
    assert config["roi"] == [32, 64, 64] and config["num_samples"] == 2 and config["steps"] == 1
    assert config["policy"].startswith("full(")
    measured, estimated = result["measured"], result["estimate"]["bytes"]
    print(
        f"tracked peak {measured['tracked_peak'] / 2**20:.1f} MiB, estimate {estimated['allocated_peak'] / 2**20:.1f}"
    )
    assert measured["tracked_peak"] == pytest.approx(estimated["allocated_peak"], rel=0.02)
    assert result["estimate_vs_measured"] == pytest.approx(estimated["total"] / measured["rss_peak_over_baseline"])
    peaks = result["module_peaks"]
    assert {"swinViT.layers1.0", "swinViT.layers4.0", "conv"} <= set(peaks)
    assert all(0 <= p["kept_after_forward"] <= p["forward_peak"] for p in peaks.values())
    assert len(result["step_time_s"]) == 1  # the plain step; the one under the storage tracker is not timed
    text = {" ".join(line.split()[:-2]): float(line.split()[-2]) for line in format_profile(result).splitlines()[1:4]}
    assert text["measured tracked_peak"] == round(measured["tracked_peak"] / 2**30, 3)
    assert text["estimated allocated peak"] == round(estimated["allocated_peak"] / 2**30, 3)
