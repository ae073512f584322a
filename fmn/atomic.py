"""Atomic file writes: a reader of ``path`` sees the previous file or the whole new one, never half.

``write(tmp)`` writes the new content to a temporary file in the same folder, named so that its
extension stays last (numpy, PIL and torch choose formats from it) and unique per call (process
id and a random token, so that threads and processes writing the same path do not share one):
``.tmp-<pid>-<8 hex digits>-<name>``. The file is then fsynced, moved over ``path`` with
``os.replace`` and the folder fsynced, so a kill or a power cut at any moment leaves one of the
two files. On an error the temporary file is removed and the error raised; ``path`` is
untouched. Files get the usual permissions (0o666 less the umask).

A full disk (or a used-up disk quota) is one :class:`NoSpaceError`, an ``OSError`` whose message
names ``path`` and says "no space left on device". ``torch.save`` reports a full disk as a
``RuntimeError`` from its zip writer (``inline_container.cc: unexpected pos ...`` or
``basic_ios::clear: iostream error``, the errno lost): such an error counts as a full disk when
the folder's file system has (almost) no free space left at that moment; otherwise it is an
``OSError`` naming ``path`` with torch's message.

A writer killed between creating its temporary file and the move leaves that file behind (a
checkpoint-sized ``.tmp-...-last.pt``, say). :func:`remove_stale_temporaries` deletes those of
one file, e.g. at the start of a run that resumes in the folder.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import threading
from typing import Callable, List

__all__ = ["NoSpaceError", "atomic_write", "remove_stale_temporaries", "temporary_name"]

# Free space below which a failed torch.save counts as a full disk. A write fails with ENOSPC
# when the file system has less room than that write needs; the rest of the file system's free
# space is then (nearly) nothing.
NEARLY_FULL_BYTES = 16 * 1024 * 1024

# The messages of torch's zip writer (caffe2/serialize/inline_container.cc) when a write fails.
_TORCH_WRITE_FAILURES = ("inline_container.cc", "PytorchStreamWriter", "iostream error", "file write failed")

_in_flight: set[str] = set()             # this process's temporary files being written
_in_flight_lock = threading.Lock()


class NoSpaceError(OSError):
    """Writing ``filename`` failed: no space left on its file system (or in the disk quota)."""

    def __init__(self, path: str, quota: bool = False):
        reason = "no space left in the disk quota" if quota else "no space left on device"
        super().__init__(errno.EDQUOT if quota else errno.ENOSPC, reason, path)

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror} (the file was not changed; free some space and retry)"

    def __reduce__(self):
        return type(self), (self.filename, self.errno == errno.EDQUOT)


def temporary_name(name: str) -> str:
    """A fresh temporary file name for the file ``name`` (a base name), as atomic_write uses."""
    return f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{name}"


def _temporary_pattern(name: str) -> re.Pattern:
    return re.compile(r"\.tmp-(\d+)-[0-9a-f]{8}-" + re.escape(name))


def _fsync(path: str, directory: bool = False) -> None:
    """fsync a file, or a folder (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _free_bytes(folder: str) -> int | None:
    """Bytes this process may still write on the file system of ``folder``, or None if unknown."""
    try:
        st = os.statvfs(folder)
    except (AttributeError, OSError):            # no statvfs (Windows), or the folder is gone
        return None
    root = getattr(os, "geteuid", lambda: -1)() == 0
    return (st.f_bfree if root else st.f_bavail) * st.f_frsize


def _write_failure(exc: BaseException, path: str, folder: str) -> OSError | None:
    """The OSError to raise instead of ``exc`` (a full disk, or torch's writer failing), or None
    to raise ``exc`` itself. Called while the temporary file still takes its space."""
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return NoSpaceError(path, quota=exc.errno == errno.EDQUOT)
        return None
    if isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_WRITE_FAILURES):
        free = _free_bytes(folder)
        if free is not None and free < NEARLY_FULL_BYTES:
            return NoSpaceError(path)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return OSError(f"cannot write {path}: torch's file writer failed ({first}); the file was not changed")
    return None


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> str:
    """Run ``write(tmp_path)``, then move the written file over ``path`` durably. Returns ``path``.
    A full disk raises :class:`NoSpaceError` (the previous ``path`` kept, no temporary left)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpaceError(path, quota=exc.errno == errno.EDQUOT) from exc
        raise
    tmp = os.path.join(folder, temporary_name(os.path.basename(path)))
    with _in_flight_lock:
        _in_flight.add(tmp)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        failure = _write_failure(exc, path, folder)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if failure is not None:
            raise failure from exc
        raise
    finally:
        with _in_flight_lock:
            _in_flight.discard(tmp)
    _fsync(folder, directory=True)
    return path


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (True when that cannot be told)."""
    if os.name == "nt":                     # os.kill would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):     # no such process id
        return False
    except OSError:                         # PermissionError: it runs as another user
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, name: str) -> List[str]:
    """Delete the temporary files that atomic_write left in ``folder`` for the file ``name`` when
    its writer was killed; returns their paths (sorted).

    Only regular files named ``.tmp-<pid>-<8 hex digits>-<name>`` are candidates (links, folders
    and every other name are never touched). One is kept while it may still be written: this
    process's own writes in flight, and files of another process of that id still running on
    this machine. Call it where one run owns the folder (at the start of a resumed run, before it
    writes): a writer on another machine sharing the folder is not seen.
    """
    if not name or os.path.basename(name) != name:
        raise ValueError(f"fmn.atomic.remove_stale_temporaries: name must be a file name; got {name!r}")
    folder = os.fspath(folder)
    pattern = _temporary_pattern(name)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    me = os.getpid()
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(m.group(1))
        with _in_flight_lock:
            if os.path.abspath(entry.path) in _in_flight:
                continue
        if pid != me and _pid_alive(pid):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:           # removed meanwhile by another cleaner
            continue
        removed.append(entry.path)
    return sorted(removed)
