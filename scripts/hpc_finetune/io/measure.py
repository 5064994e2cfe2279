"""Measurements every stage reports: the peak memory of this process (host RSS, and GPU memory when CUDA is used)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident set since exec (VmHWM). ru_maxrss would also count the parent's resident set
    at fork, which inflates the figure of every stage started from a big process."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory() -> dict:
    """Peak memory of this process: GPU bytes allocated by torch when CUDA is in use, and host RSS."""
    info = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        info["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return info
