"""Shared helpers of the benchmarks in tools/."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak RSS in MB, from /proc/self/status VmHWM.

    Not ru_maxrss: Linux keeps ru_maxrss across execve, so a child started from a large parent (e.g. the
    process that generated the benchmark's data) would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
