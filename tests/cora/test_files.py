"""Output files (cora/files.py): the path check before any work, and the atomic write."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cora.files import check_output_path, write_atomic


def test_check_output_path(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        check_output_path("")
    with pytest.raises(ValueError, match="existing folder"):
        check_output_path(tmp_path)
    with pytest.raises(ValueError, match="ends with a separator"):
        check_output_path(str(tmp_path / "new") + os.sep)
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        check_output_path(regular / "sub" / "m.safetensors")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        check_output_path(fifo)
    assert check_output_path(tmp_path / "a" / "b" / "m.safetensors") == tmp_path / "a" / "b" / "m.safetensors"
    assert not (tmp_path / "a").exists()  # the check creates nothing
    assert check_output_path(regular) == regular  # an existing file may be overwritten


def test_check_output_path_unwritable_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root (or with capabilities): permission bits do not stop writes here; "
                        "the path-under-a-regular-file case of test_check_output_path covers the refusal")
        with pytest.raises(ValueError, match="is not writable"):
            check_output_path(locked / "m.safetensors")
        with pytest.raises(ValueError, match="is not writable"):
            check_output_path(locked / "new" / "m.safetensors")
    finally:
        os.chmod(locked, 0o700)


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out.bin"
    write_atomic(target, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert target.read_bytes() == b"new"

    def broken(tmp):
        Path(tmp).write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, broken)
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_write_atomic_gives_the_mode_open_would(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "f"
        write_atomic(path, lambda tmp: Path(tmp).write_bytes(b"x"))
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_new_parent_folders_are_removed_when_the_write_fails(tmp_path):
    from cora.files import new_parent_folders

    target = tmp_path / "a" / "b" / "model.safetensors"
    with pytest.raises(OSError):
        with new_parent_folders(target):
            assert target.parent.is_dir()
            raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []  # a and b were created here, so they went again
    (tmp_path / "a").mkdir()
    with new_parent_folders(target):
        target.write_bytes(b"x")
    assert target.read_bytes() == b"x"
