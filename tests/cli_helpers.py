"""Run the `crt` command as a user would and check its one-line errors."""

import os
import shutil
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "crt", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("crt: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0]


def interrupted_copy(run: Path, to: Path, kept_step: int, dropped_step: int) -> Path:
    """A copy of a finished run as if it had stopped after kept_step: the checkpoint of
    dropped_step removed and `latest` pointing back. Resuming it must retrace the original."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "checkpoints" / f"step-{dropped_step:07d}")
    (to / "checkpoints" / "latest").write_text(f"step-{kept_step:07d}\n")
    return to
