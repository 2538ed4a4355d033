"""The launcher's allocator switch: re-execution with a preload, the off switch, and the run's first line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssl3d.allocator import SWITCH, find_tcmalloc

ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = (
    "import os, sys\n"
    "from ssl3d.allocator import ensure_tcmalloc\n"
    "print('start', flush=True)\n"
    "lib = sys.argv[1] if sys.argv[1] != '-' else None\n"
    "print(ensure_tcmalloc(fit_memory=sys.argv[2] == 'fit', library=lib))\n"
    "print('LD_PRELOAD=' + os.environ.get('LD_PRELOAD', ''))\n"
)


def _run(library: str, mode: str = "", **env: str) -> list[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", SWITCH, "WORLD_SIZE")}
    full.update(env, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, library, mode], capture_output=True, text=True, env=full, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()


def test_reexecutes_once_with_the_preload_and_restores_the_environment():
    # libm stands in for tcmalloc: any shared library shows the mechanism (it replaces no malloc).
    lines = _run("libm.so.6")
    assert lines[:2] == ["start", "start"], lines  # the command ran twice: before and after the exec
    assert "preloading libm.so.6 did not take" in lines[2], lines
    assert lines[3] == "LD_PRELOAD=", lines  # what this run starts chooses for itself


def test_switch_off_and_fit_memory_keep_the_c_library_malloc():
    lines = _run("libm.so.6", **{SWITCH: "0"})
    assert lines[0] == "start" and lines[1] == f"allocator: glibc malloc ({SWITCH}=0)", lines
    lines = _run("libm.so.6", "fit")
    assert lines[0] == "start" and "--fit-memory" in lines[1], lines
    lines = _run("libm.so.6", WORLD_SIZE="2")  # a rank of torchrun / deepspeed
    assert lines[0] == "start" and "a rank of a multi-process run" in lines[1], lines


@pytest.mark.skipif(find_tcmalloc() is None, reason="tcmalloc is not installed (Debian: libtcmalloc-minimal4)")
def test_tcmalloc_when_installed():
    lines = _run("-")
    assert lines[2].startswith("allocator: tcmalloc ("), lines
