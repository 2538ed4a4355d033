"""Host memory of this process (resident set size), for the logs, the profiler and the benchmarks."""

from __future__ import annotations

import os
import resource

__all__ = ["current_rss_bytes", "peak_rss_bytes"]


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (kernel-tracked, so it catches peaks between samples).

    ``VmHWM`` of /proc/self/status, not ``ru_maxrss``: Linux carries the pre-exec address space's peak into
    ``ru_maxrss`` across ``execve``, and a subprocess started with vfork from a large parent (pytest after many
    tests) would report the PARENT's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
