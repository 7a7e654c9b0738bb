"""Where a benchmark ran (CPU, cores, torch and its threads, Python, OS, GPU) and its peak memory."""

from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path

import torch

from crt.runtime import cpu_bf16_units


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def describe(device: torch.device | None = None) -> str:
    units = cpu_bf16_units()  # two CPUs of one name can differ here, and it decides what --precision auto runs
    text = (
        f"{cpu_name()} ({'native bf16: ' + ' and '.join(units) if units else 'no native bf16'}), {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}, {platform.system()} {platform.machine()}"
    )
    if device is not None and device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return text


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB.

    Linux: VmHWM of /proc/self/status, which starts afresh at exec. getrusage's ru_maxrss does
    not: a child process started from a large parent reports the parent's peak at fork time
    until it exceeds it, which hides how much the child itself needs.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
