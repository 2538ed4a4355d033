"""Issue 5: bad input gets clear errors.

One table of malformed run configs, ds_configs and flags, each driven through ``ssl3d pretrain`` in-process. Every
row must exit with code 2, name the key (and the value where there is one) on a single line, print no traceback,
and stop before anything heavy starts: no process group, model, data or log folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ssl3d.strategies
from ssl3d.cli import main

ROOT = Path(__file__).resolve().parents[2]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def row(
    name: str,
    run: dict[str, Any] | str | None = None,
    ds: dict[str, Any] | str | None = None,
    args: tuple[str, ...] = (),
    needles: tuple[str, ...] = (),
    marks: Any = (),
) -> Any:
    """run/ds: a dict (written as JSON), a str (written verbatim) or None (no file); "{tmp}" is the test folder.

    ``needles`` must all appear on ONE output line: the dotted key, the value and what would work.
    """
    return pytest.param(run, ds, args, needles, id=name, marks=marks)


ROWS = [
    # -- unknown or misspelled keys, at any level ------------------------------------------------------------
    row("unknown-top-level-key", {"trian": {"num_steps": 5}}, needles=("trian: unknown key", "did you mean 'train'")),
    row("unknown-nested-key", {"train": {"num_step": 5}}, needles=("train.num_step: unknown key", "'num_steps'")),
    row(
        "unknown-key-in-list-entry",
        {"data": {"datalists": [{"json": "{tmp}/datalist.json", "rooot": "{tmp}"}]}},
        needles=("data.datalists[0].rooot: unknown key", "did you mean 'root'"),
    ),
    # -- wrong types -----------------------------------------------------------------------------------------
    row("string-for-int", {"train": {"num_steps": "many"}}, needles=("train.num_steps", '"many"', "an integer")),
    row("list-for-float", {"optim": {"lr": [0.001]}}, needles=("optim.lr", "[0.001]", "a number")),
    row("bool-for-int", {"train": {"batch_size": True}}, needles=("train.batch_size", "true", "an integer")),
    row("fraction-for-int", {"train": {"grad_accum": 2.5}}, needles=("train.grad_accum", "2.5", "an integer")),
    row("list-for-section", {"model": [48]}, needles=("model: got [48]", "an object")),
    row("roi-of-two", {"data": {"roi": [96, 96]}}, needles=("data.roi", "[96, 96]", "a list of 3")),
    # -- out-of-range values ---------------------------------------------------------------------------------
    row("negative-lr", {"optim": {"lr": -0.001}}, needles=("optim.lr", "-0.001", "positive")),
    row("zero-steps", {"train": {"num_steps": 0}}, needles=("train.num_steps", "got 0", "at least 1")),
    row("zero-temperature", {"ssl": {"temperature": 0}}, needles=("ssl.temperature", "got 0", "positive")),
    row("max-drop-above-1", {"ssl": {"max_drop": 1.5}}, needles=("ssl.max_drop", "1.5", "[0, 1]")),
    row(
        "negative-queue-below-0",
        {"ssl": {"negative_queue": -8}},
        needles=("ssl.negative_queue", "-8", "0 (off) or the queued negatives"),
    ),
    row("fraction-queue", {"ssl": {"negative_queue": 0.5}}, needles=("ssl.negative_queue", "0.5", "an integer")),
    row("drop-path-1", {"model": {"drop_path_rate": 1.0}}, needles=("model.drop_path_rate", "1.0", "[0, 1)")),
    row("negative-momentum", {"optim": {"momentum": -0.5}}, needles=("optim.momentum", "-0.5", "[0, 1)")),
    row("zero-in-channels", {"model": {"in_channels": 0}}, needles=("model.in_channels", "got 0", "at least 1")),
    row(
        "zero-max-val-batches",
        {"train": {"max_val_batches": 0}},
        needles=("train.max_val_batches", "got 0", "at least 1 or null"),
    ),
    row("roi-not-multiple-of-32", {"data": {"roi": [96, 100, 100]}}, needles=("data.roi[1]", "100", "multiple of 32")),
    row("roi-y-not-z", {"data": {"roi": [64, 96, 64]}}, needles=("data.roi", "[64, 96, 64]", "roi[1] == roi[2]")),
    # -- unknown names ---------------------------------------------------------------------------------------
    row("unknown-decoder", {"model": {"decoder": "unet"}}, needles=("model.decoder", '"unet"', '"deconv"')),
    row("unknown-optimizer", {"optim": {"name": "adamx"}}, needles=("optim.name", '"adamx"', "did you mean")),
    row("unknown-schedule", {"optim": {"schedule": "cosine"}}, needles=("optim.schedule", '"cosine"', '"poly"')),
    row("unknown-precision", {"train": {"precision": "fp8"}}, needles=("train.precision", '"fp8"', '"bf16"')),
    row("unknown-strategy", ds={"strategy": "deepspeeed"}, needles=("strategy", '"deepspeeed"', "'deepspeed'")),
    row(
        "cuda-without-cuda",
        {"train": {"device": "cuda"}},
        needles=("train.device", '"cuda"', '"cpu"'),
        marks=NO_CUDA,
    ),
    # -- missing files and folders ---------------------------------------------------------------------------
    row(
        "missing-datalist-file",
        {"data": {"datalists": [{"json": "{tmp}/nope.json"}]}},
        needles=("data.datalists[0].json", "{tmp}/nope.json", "not found"),
    ),
    row(
        "missing-datalist-root",
        {"data": {"datalists": [{"json": "{tmp}/datalist.json", "root": "{tmp}/noroot"}]}},
        needles=("data.datalists[0].root", "{tmp}/noroot", "not found"),
    ),
    row(
        "datalist-without-training",
        args=("--datalist", "{tmp}/no_training.json"),
        needles=("no_training.json", 'no "training" key', '"validation"'),
    ),
    row(
        "missing-init-weights",
        {"model": {"init_weights": "{tmp}/nope.pt"}},
        needles=("model.init_weights", "{tmp}/nope.pt", "not found"),
    ),
    row("missing-config-file", args=("--config", "{tmp}/nope.json"), needles=("config file", "{tmp}/nope.json")),
    row("missing-ds-config-file", args=("--ds_config", "{tmp}/nods.json"), needles=("ds_config", "{tmp}/nods.json")),
    row("resume-missing-folder", args=("--resume", "{tmp}/nockpt"), needles=("train.resume", "{tmp}/nockpt", '"auto"')),
    row(
        "resume-folder-without-checkpoint",
        args=("--resume", "{tmp}/empty"),
        needles=("train.resume", "{tmp}/empty", "no complete checkpoint"),
    ),
    row(
        "logdir-is-a-file",
        args=("--set", "train.logdir={tmp}/datalist.json"),
        needles=("train.logdir", "{tmp}/datalist.json", "not a folder"),
    ),
    # -- malformed JSON: the file and the line ---------------------------------------------------------------
    row("malformed-run-json", '{\n  "train": {"num_steps": 5,}\n}\n', needles=("run.json", "invalid JSON at line 2")),
    row("malformed-ds-json", ds='{"train_batch_size": 8,,}', needles=("ds.json", "invalid JSON at line 1")),
    # -- ds_config: DeepSpeed vocabulary ---------------------------------------------------------------------
    row(
        "ds-misspelled-section",
        ds={"zero_optimisation": {"stage": 2}},
        needles=("zero_optimisation: unknown section", "did you mean 'zero_optimization'"),
    ),
    row(
        "ds-unknown-zero-key",
        ds={"zero_optimization": {"stage": 2, "overlap_com": True}},
        needles=("zero_optimization.overlap_com: unknown key", "did you mean 'overlap_comm'"),
    ),
    row(
        "ds-zero-flag-not-bool",
        ds={"zero_optimization": {"stage": 2, "round_robin_gradients": "yes"}},
        needles=("zero_optimization.round_robin_gradients", '"yes"', "true/false"),
    ),
    row(
        "ds-zero-stage-4",
        ds={"zero_optimization": {"stage": 4}},
        needles=("zero_optimization.stage", "got 4", "0, 1, 2 or 3"),
    ),
    row(
        "ds-batch-arithmetic",
        {"train": {"batch_size": 2, "grad_accum": 2}},
        ds={"train_batch_size": 16},
        needles=("train_batch_size", "got 16", "2 x 2 x 1 = 4"),
    ),
    row(
        "ds-contradicts-run-config",
        {"train": {"batch_size": 1}},
        ds={"train_micro_batch_size_per_gpu": 4},
        needles=("train_micro_batch_size_per_gpu", "got 4", "train.batch_size is 1", '"auto"'),
    ),
    row(
        "ds-unknown-checkpointing-policy",
        ds={"activation_checkpointing": {"policy": "sometimes"}},
        needles=("activation_checkpointing.policy", '"sometimes"', "selective"),
    ),
    row(
        "ds-offload-param-stage-2",
        ds={"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
        needles=("zero_optimization.offload_param", '"cpu"', "needs stage 3", "offload_optimizer"),
    ),
    row(
        "ds-fp16-on-cpu",
        {"train": {"device": "cpu"}},
        ds={"fp16": {"enabled": True}},
        needles=("fp16.enabled", "cpu", "use bf16"),
    ),
    row("ds-optimizer-section", ds={"optimizer": {"type": "Adam"}}, needles=("optimizer: not allowed", "optim.name")),
    # -- flags -----------------------------------------------------------------------------------------------
    row("set-without-equals", args=("--set", "train.num_steps"), needles=("--set train.num_steps", "key=value")),
    row("set-unknown-key", args=("--set", "train.num_stepz=5"), needles=("train.num_stepz", "'num_steps'")),
    row("set-bad-value", args=("--set", "data.roi=[96,96,95]"), needles=("data.roi[2]", "95", "multiple of 32")),
    row("unknown-flag", args=("--num-steps", "5"), needles=("unrecognized arguments", "--num-steps")),
]


def _fill(value: Any, tmp: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, list):
        return [_fill(v, tmp) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, tmp) for k, v in value.items()}
    return value


def _write(path: Path, content: dict[str, Any] | str) -> str:
    path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
    return str(path)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Files the rows refer to, one process, and a tripwire at the first heavy step (the process group / backend)."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    _write(tmp_path / "datalist.json", {"training": [{"image": "a.nii.gz"}], "validation": [{"image": "b.nii.gz"}]})
    _write(tmp_path / "no_training.json", {"validation": [{"image": "b.nii.gz"}]})
    (tmp_path / "empty").mkdir()

    def tripwire(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("validation passed and the run started (strategy_from_ds_config was called)")

    monkeypatch.setattr(ssl3d.strategies, "strategy_from_ds_config", tripwire)
    return tmp_path


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``main`` in-process; argparse's own errors raise SystemExit(2) instead of returning."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


# The rows check messages, not devices: on the CPU on every machine ("auto" would select a GPU where there is one),
# except where a row's own config names the device.
ON_THE_CPU = ("--set", 'train.device="cpu"')


def _names_device(run: dict[str, Any] | str | None) -> bool:
    return isinstance(run, dict) and "device" in run.get("train", {})


@pytest.mark.parametrize(("run", "ds", "args", "needles"), ROWS)
def test_malformed_input_exits_2_naming_the_key(workdir, capsys, run, ds, args, needles) -> None:
    logdir = workdir / "logs" / "run"
    argv = ["pretrain", "--set", f"train.logdir={logdir}", *(() if _names_device(run) else ON_THE_CPU)]
    if run is not None:
        argv += ["--config", _write(workdir / "run.json", _fill(run, workdir))]
    if ds is not None:
        argv += ["--ds_config", _write(workdir / "ds.json", _fill(ds, workdir))]
    argv += _fill(list(args), workdir)

    code, text = run_main(argv, capsys)

    assert code == 2, text
    assert "Traceback" not in text, text
    needles = _fill(list(needles), workdir)
    assert any(all(n in line for n in needles) for line in text.splitlines()), f"no line has all of {needles}:\n{text}"
    assert not logdir.exists() and not (workdir / "logs").exists(), "the run started: a log or demo folder exists"


def test_the_tripwire_fires_when_validation_passes(workdir, capsys) -> None:
    """The table's "did not start" check is live: a valid config reaches the backend."""
    argv = ["pretrain", "--set", f"train.logdir={workdir}/run", "--datalist", f"{workdir}/datalist.json", *ON_THE_CPU]
    with pytest.raises(AssertionError, match="the run started"):
        main(argv)


def test_three_problems_in_one_config_are_reported_at_once(workdir, capsys) -> None:
    """An unknown key, a wrong type and an out-of-range value: all three, one line each."""
    run = {"trian": {}, "optim": {"lr": "fast"}, "data": {"roi": [64, 96, 64]}}
    argv = ["pretrain", "--config", _write(workdir / "run.json", run), "--set", f"train.logdir={workdir}/run"]
    code, text = run_main(argv, capsys)
    lines = [line for line in text.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 3, text
    assert all(line.startswith("ssl3d: error: ") for line in lines), text
    assert [line.split(": ")[2] for line in lines] == ["trian", "optim.lr", "data.roi"], text
    assert "Traceback" not in text and not (workdir / "run").exists()


@pytest.mark.slow
def test_bad_config_from_a_fresh_process_exits_2_without_traceback(tmp_path: Path) -> None:
    run = _write(tmp_path / "run.json", {"optim": {"name": "adamx"}, "train": {"logdir": str(tmp_path / "run")}})
    proc = subprocess.run(
        [sys.executable, "-m", "ssl3d.cli", "pretrain", "--config", run],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith('ssl3d: error: optim.name: got "adamx", expected "adamw" | "adam" | "sgd"'), line
    assert not (tmp_path / "run").exists()
