"""The whole-process baseline: measured in a real fresh interpreter once per environment, cached by versions."""

from __future__ import annotations

import json

import pytest

from ssl3d.config import ModelConfig
from ssl3d.memory import estimate_memory, format_estimate
from ssl3d.memory import process as proc
from ssl3d.rss import current_rss_bytes

MIB = 2**20
TINY = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))


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
    est = estimate_memory(TINY, (32, 64, 64), 1, 1, device="cpu", process_baseline=300 * MIB)
    b = est.breakdown
    assert b["process_baseline"] == 300 * MIB and b["process_peak"] == b["total"] + 300 * MIB
    text = format_estimate(est)
    assert "libraries before the step (measured)" in text and "= whole-process peak (RSS)" in text
    gpu = estimate_memory(TINY, (32, 64, 64), 1, 1, device="cuda").breakdown
    assert "process_peak" not in gpu  # a GPU's budget is device memory


@pytest.fixture(autouse=True)
def _fresh_cache():
    yield
    proc.process_baseline_bytes.cache_clear()
