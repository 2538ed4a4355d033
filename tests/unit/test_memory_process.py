"""The whole-process baseline: measured in a real fresh interpreter once per environment, cached by versions."""

from __future__ import annotations

import json

import pytest

from ssl3d.config import ModelConfig
from ssl3d.memory import estimate_memory, format_estimate
from ssl3d.memory import process as proc
from ssl3d.rss import current_rss_bytes
from ssl3d.tasks import PRETRAIN

MIB = 2**20
TINY = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))


@pytest.mark.slow
def test_baseline_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    proc.process_baseline_bytes.cache_clear()
    value = proc.process_baseline_bytes(str(tmp_path))
    # torch + MONAI + ssl3d imported, nothing built: well above a bare interpreter, below this test process (which
    # has also run pytest and built models).
    assert 100 * MIB < value < max(current_rss_bytes(), 100 * MIB) + 200 * MIB
    stored = json.loads((tmp_path / "process_baseline.json").read_text())
    assert stored == {proc.baseline_key(): value}

    def no_measuring(*a, **k):
        raise AssertionError("measured again although cached")

    proc.process_baseline_bytes.cache_clear()
    monkeypatch.setattr(proc, "measure_process_baseline", no_measuring)
    assert proc.process_baseline_bytes(str(tmp_path)) == value


def test_other_environment_measures_again_and_keeps_both(tmp_path, monkeypatch):
    (tmp_path / "process_baseline.json").write_text(json.dumps({"python3.0-torch0.1": 5}))
    monkeypatch.setattr(proc, "measure_process_baseline", lambda *a, **k: 123 * MIB)
    proc.process_baseline_bytes.cache_clear()
    assert proc.process_baseline_bytes(str(tmp_path)) == 123 * MIB
    stored = json.loads((tmp_path / "process_baseline.json").read_text())
    assert stored == {"python3.0-torch0.1": 5, proc.baseline_key(): 123 * MIB}
    proc.process_baseline_bytes.cache_clear()
    (tmp_path / "process_baseline.json").write_text("not json")  # damaged cache: measured again, not an error
    assert proc.process_baseline_bytes(str(tmp_path)) == 123 * MIB


def test_cpu_estimate_reports_the_whole_process():
    est = estimate_memory(TINY, (32, 64, 64), 1, 1, device="cpu", process_baseline=300 * MIB, task=PRETRAIN)
    b = est.breakdown
    assert b["process_baseline"] == 300 * MIB and b["process_peak"] == b["total"] + 300 * MIB
    text = format_estimate(est)
    assert "libraries before the step (measured)" in text and "= whole-process peak (RSS)" in text
    assert f"note: {proc.ALLOCATOR_NOTE}" in text  # what the figure assumes of malloc, and what glibc's defaults add
    gpu = estimate_memory(TINY, (32, 64, 64), 1, 1, device="cuda", task=PRETRAIN)
    assert "process_peak" not in gpu.breakdown  # a GPU's budget is device memory
    assert proc.ALLOCATOR_NOTE not in format_estimate(gpu)


@pytest.fixture(autouse=True)
def _fresh_cache():
    yield
    proc.process_baseline_bytes.cache_clear()


# Frees ~470 MiB of 1-2 MiB blocks while a later block pins the top of the heap, after one 16 MiB block has raised
# glibc's dynamic mmap threshold (as a training step's large tensors do): glibc's defaults keep all of it.
_FREE_BLOCKS = """
import json, sys
import numpy as np
from ssl3d.rss import current_rss_bytes
line = ""
if sys.argv[1] == "fit":
    import contextlib, io
    from ssl3d.cli import make_parser
    from ssl3d.run_config import apply_memory_fit, build_config, check_run_inputs
    from ssl3d.strategies import strategy_from_ds_config
    from ssl3d.tasks import PRETRAIN
    cfg = build_config(make_parser().parse_args(["pretrain", *sys.argv[2:]]))
    ds, device = check_run_inputs(cfg)
    strategy = strategy_from_ds_config(ds, device)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        apply_memory_fit(cfg, strategy, 2**40, PRETRAIN)
    strategy.teardown()
    line = out.getvalue()
big = np.ones(16 << 20, np.uint8)
del big
blocks = [np.ones((1 << 20) + i * 4096, np.uint8) for i in range(300)]
keep = np.ones(1 << 20, np.uint8)
before = current_rss_bytes()
del blocks
print(json.dumps({"released": before - current_rss_bytes(), "line": line}))
"""


def _free_blocks(tmp_path, *args: str, **env: str) -> dict:
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in proc.MALLOC_ENV}
    logdir = json.dumps(str(tmp_path / "run"))
    extra = [f"--set=train.logdir={logdir}", '--set=train.device="cpu"'] if args[:1] == ("fit",) else []
    done = subprocess.run(
        [sys.executable, "-c", _FREE_BLOCKS, *args, *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env={**base, **env},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_fit_memory_on_cpu_returns_freed_memory_to_the_system(tmp_path):
    """Without it glibc keeps every freed block (RSS does not fall); ``--fit-memory`` on the CPU switches a running
    process to giving them back, so its peak RSS follows the live memory the fit was made for; a user's own glibc
    settings are left alone."""
    kept = _free_blocks(tmp_path, "plain")
    assert kept["released"] < 50 * MIB, kept
    fitted = _free_blocks(tmp_path, "fit")
    assert "freed host memory goes back to the system at once" in fitted["line"], fitted["line"]
    assert fitted["released"] > 400 * MIB, fitted
    own = _free_blocks(tmp_path, "fit", MALLOC_MMAP_THRESHOLD_=str(2**30))  # the user's: never mmap
    assert "--fit-memory" in own["line"] and "freed host memory" not in own["line"], own["line"]
    assert own["released"] < 50 * MIB, own
