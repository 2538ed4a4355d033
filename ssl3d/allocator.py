"""tcmalloc for training runs: the launcher re-executes itself with the library preloaded when it is installed.

On the CPU the allocator is worth as much as a checkpointing policy (BENCHMARKS.md, "Side by side with the
reference's step, per allocator"): glibc's malloc keeps freed blocks scattered, or, told to return them, costs every
step fresh pages from the kernel; tcmalloc reuses freed memory by size class, with 16x fewer page faults, the fastest
steps and a peak ~0.2 GiB above live memory. A preload has to be in place before the interpreter starts, so the
training commands (``ssl3d pretrain|finetune|probe`` and ``launch/pretrain.py``, when run as programs) exec the same
command line again with ``LD_PRELOAD`` set, once, before anything heavy is imported. The run's first line says
which allocator it has and how to switch.

``SSL3D_TCMALLOC=0`` keeps the C library's malloc. A user's own ``LD_PRELOAD`` of an allocator is left alone, and so
is a run with ``--fit-memory``: its CPU estimate assumes glibc returning freed memory at once, which it arranges
with ``mallopt`` (``ssl3d.memory.process.return_freed_memory``). Only this module's standard-library imports run
before the exec.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import sys
from pathlib import Path

__all__ = ["SWITCH", "allocator_in_use", "ensure_tcmalloc", "find_tcmalloc"]

SWITCH = "SSL3D_TCMALLOC"  # "0" (or false/off/no): keep the C library's malloc
_MARK = "SSL3D_TCMALLOC_EXEC"  # set for the re-executed process: the user's own LD_PRELOAD, after a "1:" prefix
_OFF = ("0", "false", "off", "no")
_KNOWN = (("tcmalloc", "libtcmalloc"), ("jemalloc", "libjemalloc"), ("mimalloc", "libmimalloc"))


def find_tcmalloc() -> str | None:
    """The installed tcmalloc's file name (the minimal build first, as Debian's libtcmalloc-minimal4 ships it)."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def allocator_in_use() -> str:
    """Which malloc this process runs on: a known preloaded allocator mapped into it, else the C library's."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "the C library's malloc"
    for name, lib in _KNOWN:
        if lib in maps:
            return name
    return "glibc malloc" if platform.libc_ver()[0] == "glibc" else "the C library's malloc"


def ensure_tcmalloc(fit_memory: bool = False, library: str | None = None) -> str:
    """Re-execute this process's command line with tcmalloc preloaded (does not return then), or return a line
    saying which allocator the run has and why. In the re-executed process it returns the line for tcmalloc and
    puts the user's ``LD_PRELOAD`` back into ``os.environ``, so processes this run starts choose for themselves.

    ``library``: the file to preload (default: ``find_tcmalloc()``)."""
    if _MARK in os.environ:
        user = os.environ.pop(_MARK)[2:]
        lib = os.environ.get("LD_PRELOAD", "").split(":")[0]
        if user:
            os.environ["LD_PRELOAD"] = user
        else:
            os.environ.pop("LD_PRELOAD", None)
        now = allocator_in_use()
        if now == "tcmalloc":
            return f"allocator: tcmalloc ({lib} preloaded; {SWITCH}=0 keeps the C library's malloc)"
        return f"allocator: {now} (preloading {lib} did not take)"
    now = allocator_in_use()
    if os.environ.get(SWITCH, "").strip().lower() in _OFF:
        return f"allocator: {now} ({SWITCH}={os.environ[SWITCH]})"
    if now != "glibc malloc":
        return f"allocator: {now} (as preloaded; tcmalloc only replaces glibc's malloc)"
    if fit_memory:
        return f"allocator: {now} (--fit-memory's CPU estimate assumes glibc returning freed memory at once)"
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        # Two FSDP2 runs on 2 gloo ranks with tcmalloc preloaded finished, then aborted at exit ("terminate called
        # without an active exception", exit -6): until that is understood, ranks of a launcher keep malloc.
        return f"allocator: {now} (a rank of a multi-process run; tcmalloc is preloaded for single-process runs)"
    lib = library or find_tcmalloc()
    if lib is None:
        return f"allocator: {now} (no tcmalloc installed; Debian/Ubuntu: apt install libtcmalloc-minimal4)"
    argv = list(getattr(sys, "orig_argv", []))
    if len(argv) < 2 or argv[1] == "-":  # a script read from standard input cannot be read again
        return f"allocator: {now} (this command line cannot be re-executed)"
    user = os.environ.get("LD_PRELOAD", "")
    env = {**os.environ, "LD_PRELOAD": lib + (":" + user if user else ""), _MARK: "1:" + user}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
    raise AssertionError("unreachable")  # pragma: no cover
