"""Files that are never half-written, and output locations checked before training starts.

:func:`atomic_write` writes ``path`` through a temporary file in the same folder
(``.<name>.<random>.tmp``): write, flush, ``fsync``, then ``os.replace`` (atomic on POSIX), then
``fsync`` the folder. A crash or a ``kill -9`` at any moment leaves either the previous file or
the new one, never a mixture; the temporary file is removed when the write fails with an
exception, and one left by a killed process is ignored by every reader and removed by
:func:`remove_stale_temporaries` (the trainer calls it before step 1).

:func:`check_output_dir` and :func:`check_output_file` are the preflight: the folder exists or can
be created, is a folder (an existing file there is an error) and a file can be created in it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["OutputLocationError", "atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "check_output_dir", "check_output_file", "remove_stale_temporaries", "temporary_prefix"]


class OutputLocationError(OSError):
    """An output file or folder cannot be written (named in the message); raised before training."""


def temporary_prefix(path: str | os.PathLike) -> str:
    """The name prefix of ``path``'s temporary files: ``.<name>.``."""
    return f".{Path(path).name}."


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable, binary: bool = True) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file in the same folder, which is
    flushed, synced and renamed over ``path``. The file gets the usual ``0666 & ~umask`` mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would otherwise survive the rename
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_write_json(path, obj, indent: int | None = 1) -> None:
    """``json.dumps(obj)`` to ``path`` atomically (the object is serialised before the file is touched)."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files a killed :func:`atomic_write` of ``path`` left; returns them."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = [p for p in path.parent.glob(temporary_prefix(path) + "*.tmp") if p.is_file()]
    for p in stale:
        try:
            p.unlink()
        except FileNotFoundError:  # pragma: no cover - removed meanwhile
            pass
    return stale


def check_output_dir(directory: str | os.PathLike, what: str) -> Path:
    """Make sure files can be written in ``directory`` (creating it); raise :class:`OutputLocationError`
    naming ``what`` (e.g. ``"--out"``) otherwise. Returns the path."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputLocationError(f"{what}: {directory} exists and is not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputLocationError(f"{what}: cannot create the folder {directory} ({err.strerror or err})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".iconv-write-check.", suffix=".tmp", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputLocationError(f"{what}: cannot write in the folder {directory} ({err.strerror or err})") from None
    return directory


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Make sure ``path`` can be written (atomically): not a folder, its folder writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputLocationError(f"{what}: {path} is a folder, expected a file name")
    if path.exists() and not path.is_file():
        raise OutputLocationError(f"{what}: {path} exists and is not a regular file")
    check_output_dir(path.parent, what)
    return path
