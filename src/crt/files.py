"""Writing files the way every output of crt is written: whole or not at all, with ordinary modes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def umask_mode(path: Path) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (owner-only) the mode an ordinary
    open() or mkdir() would have given it under the user's umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def write_atomic(path: Path, text: str) -> None:
    """Write text to path via a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask_mode(tmp)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # a full disk or an interrupt leaves no half file
        raise
