"""Output files: checking a path before hours of work, and writing atomically with normal permissions.

:func:`check_output_path` answers "can a file be written there?" without changing anything;
:func:`write_atomic` writes through a unique temporary file in the target's folder and renames it
into place, so the target is either the old file or the complete new one, never a partial file,
and no temporary is left behind on failure. The new file gets the permissions ``open(path, "w")``
would give it.
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["check_output_path", "write_atomic", "new_parent_folders"]

_UMASK_LOCK = threading.Lock()


def check_output_path(path: str | os.PathLike) -> Path:
    """Check that a checkpoint can be written at ``path``, changing nothing; returns it as a ``Path``.

    Raises ``ValueError`` when the path is empty, names a folder (an existing one, or ends with a
    separator), names something other than a regular file (a device, a pipe: the final rename would
    replace it), or when its folder cannot be written: the folder, or, when it does not exist yet
    (the writer creates it), the nearest existing ancestor must be a writable folder.

    The writability test is ``os.access``, which answers for the real user id and the permission
    bits (and for root, nearly always yes); ACLs, read-only or full file systems and quotas can
    still make the write fail. It is a check before hours of work, not a guarantee: :func:`save`
    still cleans up after a failed write.
    """
    raw = os.fsdecode(os.fspath(path))
    if not raw.strip():
        raise ValueError("the output path is empty")
    p = Path(raw)
    try:
        if p.is_dir():
            raise ValueError(f"{p} is an existing folder; give a file name, e.g. {p / 'model.safetensors'}")
        if raw.endswith(("/", os.sep)):
            raise ValueError(f"{raw} ends with a separator: it names a folder, not a checkpoint file")
        if p.exists() and not p.is_file():
            raise ValueError(f"{p} exists and is not a regular file")
        folder = p.parent
        while not folder.exists() and folder.parent != folder:
            folder = folder.parent
        if not folder.is_dir():
            raise ValueError(f"cannot write {p}: {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            what = "its folder" if folder == p.parent else "the folder that would hold its parent folders"
            raise ValueError(f"cannot write {p}: {what} {folder} is not writable")
    except OSError as exc:  # an unreadable folder on the way, for instance
        raise ValueError(f"cannot check the output path {p}: {exc}") from None
    return p


def _umask() -> int:
    """The process umask, read without changing it where the system says it (Linux 4.7+)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _UMASK_LOCK:
        # Setting is the only portable way to read it. While it is set, a file another thread
        # creates gets the restrictive 0o077, never more permissions than it should.
        old = os.umask(0o077)
        os.umask(old)
    return old


def _final_mode(path: Path) -> int:
    """What ``open(path, "w")`` would leave: an existing file keeps its mode, a new one gets 0o666 & ~umask."""
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode) & 0o777
    except FileNotFoundError:
        pass
    return 0o666 & ~_umask()


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` to fill a unique temporary file in ``path``'s folder, then rename it over ``path``.

    ``write`` may replace the temporary file by its own (safetensors does); the result is synced to
    disk, given the mode ``open(path, "w")`` would give, and renamed into place. On any exception
    the temporary file is removed and the exception re-raised; ``path`` is untouched.
    """
    mode = _final_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        os.close(fd)
        write(tmp)
        fd = os.open(tmp, os.O_RDWR)  # the writer may have renamed its own file over tmp: open it again
        try:
            os.fsync(fd)  # the data is on disk before the name points to it
        finally:
            os.close(fd)
        os.chmod(tmp, mode)  # mkstemp (and safetensors) create 0o600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if os.name == "posix":  # make the rename itself durable; best effort
        with contextlib.suppress(OSError):
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


@contextlib.contextmanager
def new_parent_folders(path: Path) -> Iterator[None]:
    """Create the missing folders above ``path``; if the block raises, remove the ones created here
    (innermost first, only while empty), so a failed write leaves the tree as it was."""
    missing = []
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for made in missing:
            try:
                made.rmdir()
            except OSError:
                break
        raise
