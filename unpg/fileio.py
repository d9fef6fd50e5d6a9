"""Atomic file writes: the one implementation every writer in the project uses.

A file is written under a temporary name in its own folder (``.<name>.<random>.tmp``), flushed,
fsynced and then renamed over the target with ``os.replace``. A rename within one filesystem is
atomic, so a reader, or whatever is left after a crash or a kill, sees either the old file or the
complete new one, never a partial one. On any exception (``KeyboardInterrupt`` included) the
temporary is removed and the old file is left as it was.

``fsync=False`` skips the two fsyncs (file and folder) for bulk writers of many small files where
durability across a power loss does not matter; the rename keeps the write atomic all the same.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Union

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]

PathLike = Union[str, "os.PathLike[str]"]
_WRITE_MODES = ("w", "wt", "wb")
_umask_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _umask() -> int:
    """The process umask, read once. Linux reports it in /proc without changing it; elsewhere
    it can only be read by setting it, which is done once, under a lock, and undone at once."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; best effort (some filesystems refuse it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. some network filesystems: the rename is still atomic, just not yet durable
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", *, encoding: Optional[str] = None,
                 fsync: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it becomes ``path``.

    ``mode`` is ``"wb"`` (default), ``"w"`` or ``"wt"``; ``encoding`` is for the text modes. The
    parent folder is created. The file gets the usual mode ``0o666 & ~umask`` (``mkstemp``
    would leave ``0o600``). On any exception inside the block the temporary is removed, the old
    ``path`` (if any) is untouched, and the exception propagates.
    """
    if mode not in _WRITE_MODES:
        raise ValueError(f"atomic_write: mode must be one of {_WRITE_MODES}, got {mode!r}")
    if "b" in mode and encoding is not None:
        raise ValueError(f"atomic_write: encoding={encoding!r} given for binary mode {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path`` as a ``Path``."""
    with atomic_write(path, "wb", fsync=fsync) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8",
                      fsync: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8 unless told); returns ``path``."""
    with atomic_write(path, "w", encoding=encoding, fsync=fsync) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(path: PathLike, obj: Any, *, fsync: bool = True, **json_kwargs: Any) -> Path:
    """``json.dumps(obj, **json_kwargs)`` plus a final newline, written atomically as UTF-8.

    The text is built before the file is opened, so an object JSON cannot encode raises
    without touching the disk."""
    return atomic_write_text(path, json.dumps(obj, **json_kwargs) + "\n", fsync=fsync)
