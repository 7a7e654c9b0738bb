"""Results files (docs/results/*.md): every one opens the same way, so anyone can rerun it.

lines = header("Speed: tokens/s", command)   # "# title", the exact command, the date, the machine
lines += ["| model | tokens/s |", ...]
write_results(out, lines)                      # whole or not at all
"""

from __future__ import annotations

import datetime
import shlex
import sys
from pathlib import Path

import torch

from crt.analysis.machine import describe
from crt.files import write_atomic


def script_command() -> str:
    """The command line that ran this script: `python benchmarks/NAME.py ARGS`."""
    return shlex.join(["python", sys.argv[0], *sys.argv[1:]])


def header(title: str, command: str | None = None, machine: str | None = None, device: torch.device | None = None) -> list[str]:
    """A results file's opening lines: its title, the exact command (default: this script's),
    the date, and the machine with its versions (default: `describe(device)`)."""
    return [f"# {title}", "", f"Command: `{command or script_command()}`. Date: {datetime.date.today()}.", f"Machine: {machine or describe(device)}.", ""]


def write_results(path: str | Path, lines: list[str]) -> Path:
    """Write a results file atomically (a temporary file, then a rename), ending in one newline."""
    path = Path(path)
    write_atomic(path, "\n".join(lines).rstrip("\n") + "\n")
    return path
