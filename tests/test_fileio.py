"""unpg.fileio: atomic writes leave the old file or the complete new one, and no temporary."""
import json
import os
import stat

import pytest

from unpg import fileio
from unpg.fileio import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_writes_content_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.bin"
    with atomic_write(target) as fh:
        fh.write(b"\x00\x01")
        fh.write(b"binary")
    assert target.read_bytes() == b"\x00\x01binary"
    assert atomic_write_text(tmp_path / "t.txt", "h\u00e9llo\n") == tmp_path / "t.txt"
    assert (tmp_path / "t.txt").read_bytes() == "h\u00e9llo\n".encode("utf-8")
    atomic_write_bytes(target, b"replaced")  # over an existing file
    assert target.read_bytes() == b"replaced"
    atomic_write_json(tmp_path / "j.json", {"x": [1, 2.5]}, indent=1)
    assert (tmp_path / "j.json").read_text() == '{\n "x": [\n  1,\n  2.5\n ]\n}\n'
    assert json.loads((tmp_path / "j.json").read_text()) == {"x": [1, 2.5]}
    with atomic_write(tmp_path / "t2.txt", "w", encoding="latin-1", fsync=False) as fh:
        fh.write("\u00e9")
    assert (tmp_path / "t2.txt").read_bytes() == b"\xe9"
    assert _names(tmp_path) == ["a.bin", "j.json", "t.txt", "t2.txt"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_in_block_keeps_old_file(tmp_path, exc):
    target = tmp_path / "keep.txt"
    target.write_text("old\n")
    with pytest.raises(type(exc)):
        with atomic_write(target, "w", encoding="utf-8") as fh:
            fh.write("new, half written")
            fh.flush()  # the partial content is on disk, under the temporary name only
            raise exc
    assert target.read_text() == "old\n"
    assert _names(tmp_path) == ["keep.txt"]


def test_failed_rename_and_unencodable_json_leave_nothing(tmp_path, monkeypatch):
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "nan.json", [float("nan")], allow_nan=False)

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(tmp_path / "x.bin", b"data")
    assert _names(tmp_path) == []


def test_file_mode_respects_umask(tmp_path):
    old = os.umask(0o027)
    fileio._umask.cache_clear()  # the umask is read once per process; this test changes it
    try:
        atomic_write_bytes(tmp_path / "u027", b"x")
        os.umask(0o002)
        fileio._umask.cache_clear()
        atomic_write_bytes(tmp_path / "u002", b"x")
    finally:
        os.umask(old)
        fileio._umask.cache_clear()
    assert stat.S_IMODE((tmp_path / "u027").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "u002").stat().st_mode) == 0o664


def test_creates_parent_folders(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    atomic_write_text(target, "deep")
    assert target.read_text() == "deep" and _names(target.parent) == ["c.txt"]


def test_bad_mode_or_encoding_raises_before_writing(tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        with atomic_write(tmp_path / "x", "ab"):
            pass
    with pytest.raises(ValueError, match="binary mode"):
        with atomic_write(tmp_path / "x", "wb", encoding="utf-8"):
            pass
    assert _names(tmp_path) == []


def test_umask_fallback_without_proc(monkeypatch):
    """Where /proc/self/status is missing the umask is read by setting and restoring it."""
    old = os.umask(0o037)
    try:
        fileio._umask.cache_clear()

        def no_proc(*args, **kwargs):
            raise OSError("no /proc here")

        monkeypatch.setattr(fileio, "open", no_proc, raising=False)
        assert fileio._umask() == 0o037
        assert os.umask(0o037) == 0o037  # and it was put back
    finally:
        os.umask(old)
        fileio._umask.cache_clear()
