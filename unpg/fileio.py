"""Atomic file writes: the one implementation every writer in the project uses.

A file is written under a temporary name in its own folder (``.<name>.<random>.tmp``), flushed,
fsynced and then renamed over the target with ``os.replace``. A rename within one filesystem is
atomic, so a reader, or whatever is left after a crash or a kill, sees either the old file or the
complete new one, never a partial one. On any exception (``KeyboardInterrupt`` included) the
temporary is removed and the old file is left as it was.

``fsync=False`` skips the two fsyncs (file and folder) for bulk writers of many small files where
durability across a power loss does not matter; the rename keeps the write atomic all the same.

Output folders of the tools belong to the tool that wrote them: ``claim_output_dir`` refuses a
non-empty folder unless its ``unpg_manifest.json`` names the same tool (re-running a tool on its
own output keeps working) or ``force`` is given, proves the folder writable before any work is
done, and writes the manifest. ``claim_output_file`` is the same rule for one output file.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional, Sequence, Union

__all__ = ["MANIFEST", "OutputError", "atomic_write", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_text", "check_writable_dir", "claim_output_dir", "claim_output_file",
           "clear_dir", "manifest_tool", "staged_output_dir", "write_manifest"]

MANIFEST = "unpg_manifest.json"  # names the tool that wrote an output folder

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


class OutputError(ValueError):
    """An output path a tool must not or cannot write; the message names it and the fix."""


def check_writable_dir(folder: PathLike, option: str = "--out") -> Path:
    """Create ``folder`` (and its parents) and create/remove a file in it, so an unwritable
    output fails before any work is done (permission bits alone say nothing for root)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".unpg-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{option} {folder} is not a writable folder ({e.strerror or e}); "
                          f"choose a folder you can write to") from None
    return folder


def manifest_tool(folder: PathLike) -> Optional[str]:
    """The tool named by ``folder``'s manifest, or None (no manifest, or not one of ours)."""
    try:
        with open(Path(folder) / MANIFEST, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    tool = obj.get("tool") if isinstance(obj, dict) else None
    return tool if isinstance(tool, str) else None


def write_manifest(folder: PathLike, tool: str, *, fsync: bool = True) -> Path:
    """Mark ``folder`` as written by ``tool`` (atomically)."""
    return atomic_write_json(Path(folder) / MANIFEST, {"tool": tool, "format": "unpg-output"},
                             indent=1, fsync=fsync)


def clear_dir(folder: PathLike) -> None:
    """Remove everything inside ``folder`` (the folder itself stays)."""
    for entry in Path(folder).iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _nonempty(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _check_not_source(out: Path, sources: Sequence[PathLike], option: str) -> None:
    """Replacing ``out`` must never delete the input: refuse an ``out`` that is, or holds, a source."""
    target = out.resolve()
    for src in sources:
        s = Path(src).resolve()
        if s == target or target in s.parents:
            raise OutputError(f"{option} {out} is or contains the input {src}; write elsewhere")


def claim_output_dir(out: PathLike, tool: str, *, force: bool = False, option: str = "--out",
                     clear: bool = True, mark: bool = True,
                     ours: Callable[[Path], bool] = lambda p: False,
                     sources: Sequence[PathLike] = ()) -> Path:
    """Make ``out`` ``tool``'s output folder, before any work is done.

    An absent or empty folder, or one whose manifest names ``tool`` (or for which ``ours(out)``
    is true, for folders written before manifests existed), is taken as it is: the tool resumes
    or overwrites its own output. Any other non-empty folder is refused with an ``OutputError``
    unless ``force``; then its contents are removed first when ``clear``. The folder is created,
    proven writable and (when ``mark``) gets the manifest. An ``out`` that is or holds one of the
    ``sources`` (the tool's inputs) is always refused. Returns ``out`` as a ``Path``."""
    out = Path(out)
    _check_not_source(out, sources, option)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {out} is a file, not a folder; choose a folder")
    if _nonempty(out) and manifest_tool(out) != tool and not ours(out):
        if not force:
            named = manifest_tool(out)
            why = f"was written by {named}" if named else f"has no {MANIFEST} naming {tool}"
            raise OutputError(f"{option} {out} is not empty and {why}; choose an empty or new "
                              f"folder, or pass --force to replace its contents")
        if clear:
            try:
                clear_dir(out)
            except OSError as e:
                raise OutputError(f"{option} {out}: cannot remove its contents for --force "
                                  f"({e.strerror or e})") from None
    check_writable_dir(out, option)
    if mark:
        write_manifest(out, tool)
    return out


def claim_output_file(out: PathLike, what: Optional[str] = None, *, force: bool = False,
                      option: str = "--out", ours: Callable[[Path], bool] = lambda p: False) -> Path:
    """Check, before any work, that the output file ``out`` may be written: an existing file is
    replaced only when ``ours(out)`` recognises it as ``what`` (a file this tool writes) or with
    ``force``; its folder is created and proven writable."""
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"{option} {out} is a folder; give a file name")
    if out.exists() and not force and not ours(out):
        not_ours = f" and is not {what}" if what else ""
        raise OutputError(f"{option} {out} already exists{not_ours}; choose another name, or "
                          f"pass --force to replace it")
    check_writable_dir(out.parent if str(out.parent) else Path("."), option)
    return out


@contextlib.contextmanager
def staged_output_dir(out: PathLike, tool: str, *, force: bool = False, option: str = "--out",
                      sources: Sequence[PathLike] = ()) -> Iterator[Path]:
    """Yield a fresh sibling folder ``OUT.tmp-<random>`` holding ``tool``'s manifest; on success
    it replaces ``out``, on any exception it is deleted, so ``out`` never holds a partial result.

    ``out`` may be absent, empty, ``tool``'s own earlier output, or anything with ``force``
    (checked before any work: ``OutputError`` otherwise, or if its parent is not writable, or if
    ``out`` is or holds one of the ``sources``)."""
    out = Path(out)
    _check_not_source(out, sources, option)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {out} is a file, not a folder; choose a folder")
    if _nonempty(out) and manifest_tool(out) != tool and not force:
        named = manifest_tool(out)
        why = f"was written by {named}" if named else f"has no {MANIFEST} naming {tool}"
        raise OutputError(f"{option} {out} is not empty and {why}; choose an empty or new "
                          f"folder, or pass --force to replace it")
    parent = check_writable_dir(out.parent, option)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=parent))
    try:
        write_manifest(tmp, tool, fsync=False)
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; give it a normal folder's mode
        old = None
        if out.is_dir():
            # rename() cannot replace a non-empty folder: move the old one aside, then delete it.
            old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=parent))
            os.replace(out, old / "out")
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
