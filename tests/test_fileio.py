"""unpg.fileio: atomic writes leave the old file or the complete new one, and no temporary."""
import json
import os
import stat

import pytest

from unpg import fileio
from unpg.fileio import (
    MANIFEST,
    OutputError,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_writable_dir,
    claim_output_dir,
    claim_output_file,
    manifest_tool,
    staged_output_dir,
)


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


# ----------------------------------------------------------------------------- output ownership
def test_claim_output_dir_rules(tmp_path):
    out = claim_output_dir(tmp_path / "new" / "out", "toolA")  # absent: created and marked
    assert manifest_tool(out) == "toolA" and _names(out) == [MANIFEST]
    (out / "result.txt").write_text("a")
    assert claim_output_dir(out, "toolA") == out  # its own output: taken as it is
    assert (out / "result.txt").read_text() == "a"
    with pytest.raises(OutputError, match="was written by toolA.*--force"):
        claim_output_dir(out, "toolB")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "train.rec").write_bytes(b"data")
    with pytest.raises(OutputError) as e:
        claim_output_dir(foreign, "toolA", option="--dst")
    assert "--dst" in str(e.value) and str(foreign) in str(e.value) and MANIFEST in str(e.value)
    assert _names(foreign) == ["train.rec"]
    claim_output_dir(foreign, "toolA", force=True)  # replaced
    assert _names(foreign) == [MANIFEST]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "failed.txt").write_text("")
    claim_output_dir(legacy, "toolA", ours=lambda p: (p / "failed.txt").is_file())
    assert sorted(_names(legacy)) == sorted(["failed.txt", MANIFEST])  # adopted, kept
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        claim_output_dir(tmp_path / "file", "toolA")


def test_unwritable_output_is_found_before_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="not a writable folder"):
        check_writable_dir(blocker / "sub")
    with pytest.raises(OutputError, match="not a writable folder"):
        claim_output_file(blocker / "sub" / "out.pth")


def test_claim_output_file(tmp_path):
    f = tmp_path / "out.bin"
    assert claim_output_file(f) == f  # absent
    f.write_bytes(b"MINE....")
    with pytest.raises(OutputError, match="already exists and is not a packed file"):
        claim_output_file(f, "a packed file")
    assert claim_output_file(f, "a packed file", ours=lambda p: p.read_bytes()[:4] == b"MINE") == f
    assert claim_output_file(f, force=True) == f
    assert f.read_bytes() == b"MINE...."  # claiming never writes the file itself


def test_staged_output_dir_replaces_only_its_own_output(tmp_path):
    out = tmp_path / "out"
    with staged_output_dir(out, "toolA") as tmp:
        (tmp / "a.txt").write_text("1")
    assert sorted(_names(out)) == sorted(["a.txt", MANIFEST])
    with staged_output_dir(out, "toolA") as tmp:  # its own output: replaced whole
        (tmp / "b.txt").write_text("2")
    assert sorted(_names(out)) == sorted(["b.txt", MANIFEST])
    with pytest.raises(RuntimeError):  # an error inside leaves the old output and no temporary
        with staged_output_dir(out, "toolA") as tmp:
            raise RuntimeError("boom")
    assert sorted(_names(out)) == sorted(["b.txt", MANIFEST])
    assert _names(tmp_path) == ["out"]
    with pytest.raises(OutputError, match="toolA"):
        with staged_output_dir(out, "toolB"):
            pass
    with staged_output_dir(out, "toolB", force=True) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(_names(out)) == sorted(["c.txt", MANIFEST]) and manifest_tool(out) == "toolB"
    assert _names(tmp_path) == ["out"]


def test_an_output_that_holds_the_input_is_refused_even_with_force(tmp_path):
    src = tmp_path / "data" / "rec"
    src.mkdir(parents=True)
    (src / "train.rec").write_bytes(b"x")
    for out in (src, tmp_path / "data"):
        with pytest.raises(OutputError, match="is or contains the input"):
            claim_output_dir(out, "toolA", force=True, sources=[src])
        with pytest.raises(OutputError, match="is or contains the input"):
            with staged_output_dir(out, "toolA", force=True, sources=[src]):
                pass
    assert (src / "train.rec").read_bytes() == b"x"
    claim_output_dir(tmp_path / "elsewhere", "toolA", sources=[src])  # a sibling is fine
