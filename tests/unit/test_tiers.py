"""The test tiers (tests/conftest.py, docs/layout.md): every test has exactly one of fast, slow, dist, e2e, cuda_sim,
and a test that has none (or two) stops the run at collection, naming it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIERS = ("fast", "slow", "dist", "e2e", "cuda_sim")
NO_TIER = " and ".join(f"not {t}" for t in TIERS)


def collect(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_selected_test_has_exactly_one_tier(request: pytest.FixtureRequest) -> None:
    """In this very run, whatever ``-m`` selected."""
    for item in request.session.items:
        assert sum(item.get_closest_marker(t) is not None for t in TIERS) == 1, item.nodeid


@pytest.mark.slow
def test_no_test_of_the_suite_is_left_out_of_the_tiers() -> None:
    """What no tier selects is nothing (pytest's exit status 5: no tests collected)."""
    proc = collect(ROOT, "-m", NO_TIER)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "no tests collected" in proc.stdout


@pytest.mark.slow
def test_a_test_without_a_tier_stops_the_run(tmp_path: Path) -> None:
    """A copy of the suite's conftest over a small tree: tiered, it collects; one test outside the tier folders, a
    downloading test in the fast tier or a slow e2e test, and nothing runs: each named, with why."""
    markers = "".join(f"    {m}: -\n" for m in (*TIERS, "network"))
    (tmp_path / "pytest.ini").write_text(f"[pytest]\nmarkers =\n{markers}")
    (tmp_path / "tests" / "unit").mkdir(parents=True)
    (tmp_path / "tests" / "e2e").mkdir()
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "tests" / "conftest.py")
    unit = "import pytest\n\ndef test_quick():\n    pass\n\n@pytest.mark.slow\ndef test_long():\n    pass\n"
    (tmp_path / "tests" / "unit" / "test_a.py").write_text(unit)
    (tmp_path / "tests" / "e2e" / "test_b.py").write_text("def test_run():\n    pass\n")

    proc = collect(tmp_path, "-m", NO_TIER)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    proc = collect(tmp_path, "-m", "fast")
    assert proc.returncode == 0 and "1/3 tests collected" in proc.stdout, proc.stdout + proc.stderr

    (tmp_path / "tests" / "other").mkdir()
    (tmp_path / "tests" / "other" / "test_c.py").write_text("def test_somewhere():\n    pass\n")
    more = """
        @pytest.mark.network
        def test_download():
            pass
        """
    (tmp_path / "tests" / "unit" / "test_a.py").write_text(unit + textwrap.dedent(more))
    slow_e2e = "import pytest\n\n@pytest.mark.slow\ndef test_run():\n    pass\n"
    (tmp_path / "tests" / "e2e" / "test_b.py").write_text(slow_e2e)
    proc = collect(tmp_path, "-m", "fast")  # the check sees every collected test, also those -m leaves out
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert "3 test(s) without exactly one tier" in proc.stderr
    assert "tests/other/test_c.py::test_somewhere: no tier" in proc.stderr
    assert "tests/unit/test_a.py::test_download: downloads (network) but is in the fast tier" in proc.stderr
    assert "tests/e2e/test_b.py::test_run: tiers slow, e2e" in proc.stderr
