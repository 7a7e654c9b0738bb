"""Run folders: claimed atomically, held by one process at a time, cleaned of interrupted saves.

A run folder is `out_dir` (or `out_dir-2`, `out_dir-3`, ... when that already holds a run). It
is claimed by creating its `metrics.jsonl` exclusively (O_CREAT | O_EXCL), so two runs started
at once with the same `--out-dir` get two folders, never one shared. While a process trains in
it, it holds an advisory lock on the folder itself (flock; released by the kernel when the
process ends, `kill -9` included), so a second `--resume` of a run in progress is refused.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from crt.checkpoint import remove_debris
from crt.errors import CRTError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the atomic claim still holds
    fcntl = None

METRICS = "metrics.jsonl"


def _unusable(path: Path, e: OSError) -> CRTError:
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        return CRTError(f"cannot make the run folder {path}: {e.filename or path} is a file, not a folder; give --out-dir a folder path")
    return CRTError(f"cannot write the run folder {path} ({e.strerror}): give --out-dir a folder you can write to")


def claim_run_dir(out_dir: str | Path) -> tuple[Path, Path | None]:
    """Claim out_dir if it holds no run yet, else the first free out_dir-2, out_dir-3, ...

    Returns (folder, created): created is the topmost folder this call made (the folder itself
    or an ancestor; None if it existed), so a run that fails before its first checkpoint can
    remove what it made. A new run never writes into a folder that holds another run."""
    text = str(out_dir)
    base = Path(os.path.normpath(os.path.expanduser(text)))  # "runs/a/../b" is runs/b: no stray runs/a
    if not base.name or base.name == "..":
        base = Path(os.path.abspath(base))
    if not base.name:
        raise CRTError(f"--out-dir {text} is the root folder: give a folder below it for the run")
    if "\0" in text:
        raise CRTError("--out-dir contains a NUL character: give a plain folder path")
    path, n = base, 1
    while True:
        if not (path / "checkpoints").exists():
            missing = [p for p in (path, *path.parents) if not p.exists()]
            created = missing[-1] if missing else None
            try:
                path.mkdir(parents=True, exist_ok=True)
                fd = os.open(path / METRICS, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError as e:
                if Path(e.filename or "") == path / METRICS:
                    pass  # another run's log (perhaps started a moment ago): try the next name
                else:
                    raise _unusable(path, e) from None
            except OSError as e:
                raise _unusable(path, e) from None
            else:
                os.close(fd)
                return path, created
        n += 1
        path = base.with_name(f"{base.name}-{n}")


class RunLock:
    """An exclusive advisory lock on a run folder for as long as a process trains in it."""

    def __init__(self, run_dir: Path):
        self.fd = None
        if fcntl is None:
            return
        self.fd = os.open(run_dir, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise CRTError(f"{run_dir} is being trained by another process right now: wait for it to end, or resume into a new folder with --out-dir") from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


class RunFolder:
    """The folder a `train()` call writes: claimed (a new run, or a resumed one continuing in a
    new --out-dir) or the resumed run's own, locked while training, with its metrics log.

    Used as a context manager around the training loop: on an error or an interrupt before the
    first checkpoint, a folder this run claimed is removed again (nothing could resume from it).
    """

    def __init__(self, path: Path, claimed: bool, created: Path | None, requested: str, metrics):
        self.path, self.claimed, self.created, self.requested, self.metrics = path, claimed, created, requested, metrics
        self.saved = False  # set once a checkpoint has been written

    @classmethod
    def open(cls, train_cfg, resume=None, step: int = 0) -> RunFolder:
        """train_cfg.out_dir names the folder of a new run; for a resume (a Checkpoint), an
        out_dir other than the run's own continues it in a new folder, else in its own."""
        from crt.train.metrics import MetricsLog

        source, claimed, created = None, True, None
        if resume is None:
            path, created = claim_run_dir(train_cfg.out_dir)
        else:
            own = resume.path.parent.parent if resume.path.parent.name == "checkpoints" else None
            recorded = resume.train_config(in_stage=False).out_dir
            here = own is not None and os.path.realpath(os.path.expanduser(train_cfg.out_dir)) == os.path.realpath(own)
            if train_cfg.out_dir != recorded and not here:
                path, created = claim_run_dir(train_cfg.out_dir)
                source = own / METRICS if own is not None else None
            elif own is not None:
                path, claimed = own, False
            else:
                raise CRTError(
                    f"{resume.path} is not inside a run's checkpoints/ folder, so there is no run folder to continue in: "
                    "give --out-dir for the folder the run continues in"
                )
        try:
            lock = RunLock(path)
        except BaseException:
            if claimed:
                _remove_claim(path, created, tensorboard=False)
            raise
        made_tensorboard = not (path / "tensorboard").exists()
        remove_debris(path / "checkpoints")
        folder = cls(path, claimed, created, train_cfg.out_dir, MetricsLog(path, resume_step=step if resume is not None else None, source=source))
        folder.lock, folder.made_tensorboard = lock, made_tensorboard
        return folder

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.metrics.close()
        self.lock.release()
        if exc_type is not None and self.claimed and not self.saved:
            _remove_claim(self.path, self.created, tensorboard=self.made_tensorboard)


def _remove_claim(path: Path, created: Path | None, tensorboard: bool) -> None:
    """Undo a claim: the folders the claim made, else only what a run writes in the folder."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    (path / METRICS).unlink(missing_ok=True)
    if tensorboard:  # only if this run made it: a folder of the user's is theirs
        shutil.rmtree(path / "tensorboard", ignore_errors=True)
    try:
        (path / "checkpoints").rmdir()  # only if empty
    except OSError:
        pass


class _NoLog:
    def log(self, record) -> None:
        pass


class FollowerRun:
    """What a rank other than 0 holds of the run folder: its path (set from rank 0) and no
    writes, since rank 0 alone logs, plots and saves."""

    def __init__(self):
        self.path, self.claimed, self.saved, self.metrics = None, False, False, _NoLog()

    def __enter__(self) -> FollowerRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass
