"""What a training process holds before its first step: the interpreter, torch, MONAI and ssl3d's own imports.

The step estimate counts tensors, workspaces and the CPU runtime a step adds; ``top`` shows the whole process. The
difference is the imported libraries (about 0.3 GiB for torch + MONAI + TensorBoard), which depend on the
environment, not on the step, so they are measured once per environment: a fresh interpreter imports what
training imports, builds nothing and reports its resident set size. The figure is cached in the user's cache
folder (``$XDG_CACHE_HOME/ssl3d``, else ``~/.cache/ssl3d``) under a key of the interpreter's and libraries'
versions, so a new torch or MONAI measures again.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

__all__ = [
    "ALLOCATOR_NOTE",
    "BASELINE_IMPORTS",
    "MALLOC_ENV",
    "baseline_key",
    "measure_process_baseline",
    "process_baseline_bytes",
    "return_freed_memory",
]

# The training entry points: the trainer (strategies, data, TensorBoard) and the profiler the benchmarks run.
BASELINE_IMPORTS = ("ssl3d.trainer", "ssl3d.memory.profile")
# glibc settings of profile_in_subprocess: large blocks go back to the kernel at once, so RSS means live memory.
RETURN_THRESHOLD = 65536
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(RETURN_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(RETURN_THRESHOLD)}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
# What the CPU estimate assumes, and what a process with another allocator setting sees (BENCHMARKS.md, ROI 64).
ALLOCATOR_NOTE = (
    "CPU peaks assume freed memory is reused or returned as soon as it is free (as --fit-memory and `memory profile` "
    "arrange); under glibc's default malloc a training process keeps freed blocks and peaks up to ~1.8x higher, "
    "with tcmalloc (LD_PRELOAD) ~1.2x"
)

_PROBE = (
    "import importlib, json, sys\n"
    "for name in sys.argv[1:]:\n"
    "    importlib.import_module(name)\n"
    "from ssl3d.rss import current_rss_bytes\n"
    "print(json.dumps({'rss': current_rss_bytes()}))\n"
)


def baseline_key() -> str:
    """The environment the baseline belongs to: interpreter, platform and library versions."""
    import monai
    import torch

    import ssl3d

    version = getattr(ssl3d, "__version__", "0")
    return (
        f"python{platform.python_version()}-{platform.machine()}-torch{torch.__version__}-monai{monai.__version__}-"
        f"ssl3d{version}"
    )


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssl3d"


def measure_process_baseline(imports: tuple[str, ...] = BASELINE_IMPORTS, timeout: float = 300) -> int:
    """RSS in bytes of a fresh interpreter after importing ``imports`` (nothing built)."""
    env = {**os.environ, **MALLOC_ENV}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *imports], capture_output=True, text=True, timeout=timeout, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"process baseline probe failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["rss"])


@functools.lru_cache(maxsize=4)
def process_baseline_bytes(cache_dir: str | None = None) -> int:
    """The measured baseline for this environment, from the cache file or measured now (a fresh interpreter) and cached.

    A cache file that cannot be read or written is not an error: the figure is measured again."""
    path = Path(cache_dir) if cache_dir else default_cache_dir()
    path = path / "process_baseline.json"
    key = baseline_key()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(key), int):
        return cached[key]
    value = measure_process_baseline()
    cached = cached if isinstance(cached, dict) else {}
    cached[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)
    except OSError:
        pass
    return value


def return_freed_memory(threshold: int = RETURN_THRESHOLD) -> bool:
    """Make glibc's malloc give freed blocks of ``threshold`` bytes or more back to the kernel at once.

    What ``MALLOC_ENV`` does at a process's start, for a process already running (``mallopt``). glibc's defaults
    keep freed blocks for reuse, so a training step on the CPU peaks well above its live memory (up to 1.8x at
    ROI 64, see BENCHMARKS.md) and above the estimate; returning them makes the peak RSS follow the estimate, at
    the price of the kernel handing out fresh pages again every step (slower steps). Leaves a process alone whose
    user set ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` and returns False there, where the C library is
    not glibc, and where another malloc is preloaded (tcmalloc, jemalloc: they manage freed memory themselves)."""
    if any(k in os.environ for k in MALLOC_ENV) or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    process, libc = ctypes.CDLL(None), ctypes.CDLL("libc.so.6")
    if ctypes.cast(process.malloc, ctypes.c_void_p).value != ctypes.cast(libc.malloc, ctypes.c_void_p).value:
        return False  # another allocator is preloaded (tcmalloc, jemalloc): glibc's settings would not apply
    mallopt = libc.mallopt  # glibc has had it since its first malloc
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, threshold) == 1
