"""One line that says where a benchmark ran: CPU, cores, torch and its threads, Python, OS, GPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def describe(device: torch.device | None = None) -> str:
    text = (
        f"{cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}, {platform.system()} {platform.machine()}"
    )
    if device is not None and device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return text
