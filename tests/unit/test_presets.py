"""The demo preset applies to the demo only: the reference's command lines and ``--datalist`` runs train the
reference's model (the config's defaults, which are the seed's) on any machine, CPU included."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from cpu_runs import assert_demo_preset, cpu_env, demo_dry_run

from ssl3d.cli import make_parser, memory_setting
from ssl3d.config import Config

ROOT = Path(__file__).resolve().parents[2]
ENV = cpu_env()

# The seed's defaults (SPEC "Optimisation and loop", "Model") that a command line leaves alone.
SEED_MODEL = {"feature_size": 48, "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24], "window_size": 7}
SEED_OPTIM = {"name": "adamw", "weight_decay": 0.1, "warmup_steps": 500}


def dry_run(argv: list[str], cwd: Path) -> dict:
    """The resolved config that this command line would train, from a fresh process (``--dry-run``), on the CPU on
    any machine (resolving train.device "auto" would select a GPU where there is one; the checks need none)."""
    proc = subprocess.run(
        [*argv, '--set=train.device="cpu"', "--dry-run"],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{") :])


def readme_reference_command() -> list[str]:
    """The command line under the "The reference's command lines" heading of docs/pretraining.md."""
    page = (ROOT / "docs" / "pretraining.md").read_text()
    section = page.split("## The reference's command lines", 1)[1]
    block = re.search(r"```bash\n(.*?)\n```", section, flags=re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


def assert_reference_model(cfg: dict) -> None:
    for key, value in SEED_MODEL.items():
        assert cfg["model"][key] == value, (key, cfg["model"][key])
    for key, value in SEED_OPTIM.items():
        assert cfg["optim"][key] == value, (key, cfg["optim"][key])
    assert cfg["model"]["fused_attention"] is True  # ssl3d's default, not the demo's eager attention


@pytest.mark.slow
def test_the_readmes_reference_command_line_trains_the_reference_model(tmp_path):
    argv = readme_reference_command()
    assert argv[:2] == ["python", "launch/pretrain.py"], argv
    cfg = dry_run([sys.executable, str(ROOT / argv[1]), *argv[2:]], tmp_path)
    assert_reference_model(cfg)
    # ... with what its flags say, on top of the seed's defaults
    assert cfg["optim"]["lr"] == 6e-6 and cfg["optim"]["schedule"] == "warmup_cosine"  # --lr, --lrdecay
    assert cfg["data"]["roi"] == [96, 96, 96] and cfg["train"]["batch_size"] == 1 and cfg["data"]["num_samples"] == 2
    assert cfg["train"]["num_steps"] == 1000 and cfg["train"]["eval_num"] == 100
    assert cfg["train"]["logdir"] == "runs/ssl"
    # every other setting is the config's default
    defaults = Config().to_dict()
    for section in ("model", "ssl"):
        diff = {k for k in defaults[section] if cfg[section][k] != json.loads(json.dumps(defaults[section][k]))}
        assert diff <= {"use_checkpoint"}, (section, diff)


@pytest.mark.slow
def test_the_issues_cpu_command_line_is_not_the_demo(tmp_path):
    """The report: this command trained depths 1-1-1-1 at lr 1e-3 with 5 warm-up steps and eager attention."""
    argv = "--use_checkpoint --batch_size=1 --sw_batch_size=2 --roi_x=64 --roi_y=64 --roi_z=64 --feature_size=48 "
    argv += "--noamp --num_steps=3"
    cfg = dry_run([sys.executable, str(ROOT / "launch" / "pretrain.py"), *argv.split()], tmp_path)
    assert_reference_model(cfg)
    assert cfg["optim"]["lr"] == 4e-4 and cfg["optim"]["schedule"] == "constant"  # the seed without --lrdecay
    assert cfg["train"]["logdir"] == "runs/ssl3d"


@pytest.mark.slow
def test_a_datalist_run_starts_from_the_reference_defaults(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps({"training": [{"image": "a.nii.gz"}], "validation": []}))
    cfg = dry_run([sys.executable, "-m", "ssl3d.cli", "pretrain", "--datalist", "list.json"], tmp_path)
    assert_reference_model(cfg)
    assert cfg["optim"]["lr"] == 4e-4 and cfg["data"]["roi"] == [96, 96, 96] and cfg["train"]["batch_size"] == 2


@pytest.mark.slow
def test_the_demo_is_still_the_demo(tmp_path):
    """The demo preset of the machine the test runs on: DEMO_CPU on a CPU, DEMO_GPU where CUDA is visible
    (tests/cuda/test_gpu_machine.py checks the GPU side on a simulated GPU machine)."""
    cfg, cuda = demo_dry_run(ENV, tmp_path)
    assert_demo_preset(cfg, cuda)


@pytest.mark.parametrize("command", ["estimate", "plan"])
def test_memory_commands_without_a_config_size_the_reference_run(command):
    argv = ["memory", command] + (["--budget", "32GiB"] if command == "plan" else [])
    step, _ = memory_setting(make_parser().parse_args([*argv, "--device", "cpu"]))
    model = step.model.model_dump()
    assert model["feature_size"] == 48 and list(model["depths"]) == [2, 2, 2, 2]
    assert list(step.roi) == [96, 96, 96] and step.batch_size == 2
