"""Atomic file writes: a crash never leaves a half-written result or checkpoint.

Every writer goes through a temporary file (or folder) beside its target, named
``.NAME.HOST-PID.XXXX.tmp``, that is flushed to disk (``fsync``) and renamed into place.
A writer killed half-way leaves only such a temporary; the next write of the same target
removes the ones whose process is gone (or, from another host, that are old).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from defectfusion.core.errors import UserError

# Temporaries from another host (a shared file system), or without a host-pid in their name
# (older versions), cannot be checked for a live writer: they are removed once this old.
STALE_FILE_AGE_S = 3600.0
STALE_DIR_AGE_S = 24 * 3600.0  # a dataset may take hours to stage


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def temp_prefix(name: str, pid: int | None = None) -> str:
    """The prefix of a process's (default: this one's) temporaries of `name`: ``.NAME.HOST-PID.``"""
    return f".{name}.{_host()}-{os.getpid() if pid is None else pid}."


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # our own temporaries are being written (or cleaned by their writer)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def remove_stale_temps(folder: str | Path, name: str) -> list[Path]:
    """Remove the temporaries of target `name` in `folder` whose writer is gone; return them.

    Never raises: cleaning up is best effort and must not stop the write that follows.
    """
    folder = Path(folder)
    pattern = re.compile(
        r"^\." + re.escape(name) + r"\.(?:(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.)?.+\.tmp$"
    )
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    now = time.time()
    for p in entries:
        m = pattern.match(p.name)
        if not m:
            continue
        try:
            is_dir = p.is_dir() and not p.is_symlink()
            if m["host"] == _host() and m["pid"]:
                stale = not _pid_alive(int(m["pid"]))
            else:
                age = now - p.lstat().st_mtime
                stale = age > (STALE_DIR_AGE_S if is_dir else STALE_FILE_AGE_S)
            if stale:
                shutil.rmtree(p) if is_dir else p.unlink()
                removed.append(p)
        except OSError:
            continue
    return removed


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk; folders may refuse, ignored."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if Path(path).is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not Path(path).is_dir() or e.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


# ---- OS errors as one line ---------------------------------------------------------------

_FIXES: dict[int, str] = {
    errno.EACCES: "permission denied; check the permissions of the file and its folder, "
    "or choose another path",
    errno.EPERM: "operation not permitted; check the permissions of the file and its folder, "
    "or choose another path",
    errno.EROFS: "read-only file system; choose an output folder on a writable disk",
    errno.ENOSPC: "no space left on the device; free some space or choose an output folder "
    "on another disk",
    errno.EDQUOT: "disk quota exceeded; free some space or choose an output folder on another disk",
    errno.EFBIG: "file too large for this file system; choose an output folder on another disk",
    errno.ENOENT: "no such file or folder; check the path",
    errno.EISDIR: "is a folder where a file was expected; check the path",
    errno.ENOTDIR: "a part of the path is not a folder; check the path",
    errno.ENAMETOOLONG: "file name too long; choose a shorter path",
    errno.EMFILE: "too many open files; lower data.num_workers or raise `ulimit -n`",
    errno.ENFILE: "too many open files on the system; lower data.num_workers",
    errno.EIO: "input/output error from the disk; check the disk, or copy the file elsewhere",
    errno.ELOOP: "too many symbolic links; check the path",
    errno.EEXIST: "already exists; remove it or choose another path",
}


def os_error_message(e: OSError, path: str | Path | None = None) -> str:
    """``PATH: what went wrong; how to fix it`` for an OS error a user can cause."""
    where = path if path is not None else (e.filename or "")
    fix = _FIXES.get(e.errno or -1) or (e.strerror or e.__class__.__name__)
    return f"{where}: {fix}" if where else fix


def user_os_error(e: OSError, path: str | Path | None = None) -> UserError:
    return UserError(os_error_message(e, path))


# ---- atomic writes -----------------------------------------------------------------------


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, flush it, rename it into place.

    The rename is atomic on POSIX, so readers see either the old file or the new one; the
    fsyncs (file, then folder) make that hold across a power cut too. An OS error (read-only
    or full disk, permissions) becomes a one-line `UserError` naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent, path.name)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise user_os_error(e, path) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        # mkstemp makes the file private (0600); give it the usual permissions instead.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        fsync_path(tmp_path)  # the data must be on disk before the rename makes it visible
        os.replace(tmp_path, path)
        fsync_path(path.parent)  # and the rename itself
    except OSError as e:
        if e.errno in _FIXES and e.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise user_os_error(e, path) from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write JSON with sorted keys and a trailing newline, so equal objects give equal bytes."""
    text = json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)


# ---- folders: stage, then swap -------------------------------------------------------------


def make_staging_dir(out: str | Path) -> Path:
    """A fresh temporary folder beside `out` to build it in (stale ones are removed first)."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out.parent, out.name)
        staging = Path(
            tempfile.mkdtemp(prefix=temp_prefix(out.name), suffix=".tmp", dir=out.parent)
        )
        # mkdtemp makes the folder private (0700); it becomes `out`, so give it the usual mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        return staging
    except OSError as e:
        raise user_os_error(e, out) from None


def swap_dir(staging: str | Path, out: str | Path) -> None:
    """Move the finished folder `staging` to `out`, replacing an earlier `out`.

    Two renames: a kill between them leaves no `out` but the earlier one intact as a
    temporary beside it (``.OUT.HOST-PID.old.tmp``); it is never a mix of the two.
    """
    staging, out = Path(staging), Path(out)
    try:
        fsync_path(staging)
        if out.exists():
            old = out.with_name(f"{temp_prefix(out.name)}old.tmp")
            os.replace(out, old)
            os.replace(staging, out)
            fsync_path(out.parent)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
            fsync_path(out.parent)
    except OSError as e:
        raise user_os_error(e, out) from None


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def staged_dir(out: Path):
    """A staging folder beside `out` for a writer that builds a whole folder then swaps it in
    (`swap_dir`): errors name `out`, not the staging path, an OSError becomes one line, and
    the staging folder is removed whatever happens."""
    import contextlib

    @contextlib.contextmanager
    def cm():

        staging = make_staging_dir(out)
        try:
            yield staging
        except UserError as e:  # a full disk while staging: name the folder the user asked for
            raise UserError(str(e).replace(str(staging), str(out))) from None
        except OSError as e:
            raise user_os_error(e, out) from None
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    return cm()
