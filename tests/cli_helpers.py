"""Run the `crt` command as a user would and check its one-line errors."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

# a few-second synthetic CRT run that tests add their flags to
TINY_RUN = ["--preset", "synthetic-crt", "--d-model", "32", "--n-layer", "1", "--d-ff", "64", "--segment-len", "8", "--batch-size", "4"]
TINY_RUN += ["--synth-train-docs", "40", "--synth-valid-docs", "5", "--synth-test-docs", "5"]


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


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `crt ARGS` in this process (no interpreter start-up per call): (exit status, stdout,
    stderr). An exception escaping `main` is a traceback a user would have seen: it fails the test."""
    from crt.cli.main import main

    capsys.readouterr()
    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def refused(result: tuple[int, str, str], *needles: str) -> str:
    """`result` (from `cli`) is one line on stderr starting `crt: error:`, exit 2, naming every needle."""
    rc, _, err = result
    lines = [line for line in err.strip().splitlines() if line and not line.startswith("crt: warning:")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("crt: error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under root with its mode and content (files) or type: to assert that nothing changed."""
    import stat

    found = {}
    for p in sorted(Path(root).rglob("*")):
        st = p.lstat()
        content = p.read_bytes() if stat.S_ISREG(st.st_mode) else os.readlink(p).encode() if stat.S_ISLNK(st.st_mode) else b""
        found[str(p.relative_to(root))] = (st.st_mode, content)
    return found


def in_process(capsys, *args: str):
    """`cli`, shaped like the CompletedProcess of `run_cli` (returncode, stdout, stderr)."""
    from types import SimpleNamespace

    rc, out, err = cli(capsys, *args)
    return SimpleNamespace(returncode=rc, stdout=out, stderr=err)
