"""bench/gpu_check.py's CPU dry run, end to end: the script a person with a GPU will run once, kept runnable.

The dry run launches every preset through the real entry point (``launch/pretrain.py``, under torchrun for all
but ``single``) with the tiny encoder, reads each run back (losses, the checkpoint verified and compared with the
export), sweeps one ROI through the planner and the profiler, and times fused against eager attention and ssl3d
against the reference-equivalent step with FLOPs and MFU. What needs CUDA must be listed as skipped, with the
reason. Presets run in bf16 only here (the precision a GPU run uses; the full dry run adds fp32), so the test
takes about 3 minutes on the project's 2 cores (measured with other jobs running).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Every shipped preset but the legacy, optional fairscale one: a new preset must join the GPU check.
PRESETS = sorted(p.stem for p in (ROOT / "ds_configs").glob("*.json") if p.stem != "fairscale")
NEEDS_CUDA = {
    ("presets", "zero3_nvme bf16"),
    *(("presets", f"{name} fp16") for name in PRESETS),
    ("roi", "memory cap"),
    ("snapshot", "memory profile, fp32"),
    ("oom", "single under 2 GiB"),
    ("oom", "zero2 under 2 GiB"),
    ("throughput", "reference fp16 AMP + cudnn"),
}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "gpu_check.json"
    cmd = [sys.executable, "bench/gpu_check.py", "--dry-run", "--precisions", "bf16,fp16"]
    cmd += ["--work", str(tmp / "work"), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())
    result["stdout"] = proc.stdout
    return result


def rows_by_setting(result: dict) -> dict[tuple[str, str], dict]:
    return {(r["part"], r["setting"]): r for r in result["rows"]}


def test_every_preset_has_a_verdict_and_the_runs_are_sound(dry_run: dict) -> None:
    rows = rows_by_setting(dry_run)
    for name in PRESETS:
        for precision in ("bf16", "fp16"):
            row = rows[("presets", f"{name} {precision}")]
            if ("presets", row["setting"]) in NEEDS_CUDA:
                continue
            assert row["verdict"] == "pass", row
            assert len(row["losses"]) == 1 and all(math.isfinite(v) for v in row["losses"]), row
            ck = row["checkpoint"]
            assert ck["ok"] and ck["problem"] is None and ck["max_abs_diff_vs_export"] <= 1e-6, ck
            assert row["rc"] == 0 and "launch/pretrain.py" in row["command"]
            assert ("torch.distributed.run" in row["command"]) == (name != "single")
    # DeepSpeedCPUAdam's C++ build is left out on the CPU, and the row says so.
    assert "not DeepSpeedCPUAdam" in rows[("presets", "zero2_offload bf16")]["details"]


def test_what_needs_cuda_is_skipped_with_the_reason(dry_run: dict) -> None:
    rows = rows_by_setting(dry_run)
    skipped = {key for key, row in rows.items() if row["verdict"] == "skipped"}
    assert skipped == NEEDS_CUDA
    for key in skipped:
        assert rows[key]["details"].startswith("needs CUDA ("), rows[key]
    assert dry_run["counts"]["fail"] == 0
    # The printed verdict table carries the same rows.
    assert "| presets | zero3 bf16 | **pass** |" in dry_run["stdout"]
    assert "| oom | single under 2 GiB | **skipped** | needs CUDA (a device memory cap) |" in dry_run["stdout"]


def test_roi_attention_and_throughput_parts(dry_run: dict) -> None:
    rows = rows_by_setting(dry_run)
    roi = rows[("roi", "ROI 64, no cap")]
    assert roi["verdict"] == "pass" and roi["trained"] and roi["planned_fit"], roi
    assert rows[("roi", "largest trained, no cap")]["largest_roi"] == 64
    attention = rows[("attention", "fused vs eager, fp32")]
    assert attention["verdict"] == "pass", attention
    assert attention["fused"]["step_time_s"] > 0 and attention["eager"]["step_time_s"] > 0
    for setting in ("reference fp32", "ssl3d fp32"):
        row = rows[("throughput", setting)]
        assert row["verdict"] == "pass", row
        assert row["flops_per_step"] > 1e9 and 0 < row["mfu"] < 1, row
        assert row["gemm_dtype"] == "float32" and not row["grad_scaler"] and not row["cudnn_benchmark"]
    assert rows[("throughput", "reference fp32")]["mode"] == "reference"
    assert rows[("throughput", "ssl3d / reference")]["speedup"] > 0
