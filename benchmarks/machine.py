"""Facts about the machine a benchmark ran on, printed and stored with every result."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import resource
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(device: str) -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else cpu_name(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_rss_bytes() -> int:
    """The process's peak resident set since start or the last ``reset_peak_rss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count from the current RSS (Linux >= 4.0); False where that is impossible.

    Freed heap memory is handed back to the system first (glibc's malloc_trim), so that what the floor
    and Adam measurements freed does not count as the next training epoch's.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def finish(report: dict, as_json: bool) -> dict:
    """The lines every benchmark ends with: the load it ran under, then (with --json) the whole report."""
    print(f"load avg at end {report['machine']['load_avg_1m']}")
    if as_json:
        print(json.dumps(report))
    return report
