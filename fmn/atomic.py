"""Atomic file writes: a reader of ``path`` sees the previous file or the whole new one, never half.

``write(tmp)`` writes the new content to a temporary file in the same folder, named so that its
extension stays last (numpy, PIL and torch choose formats from it) and unique per call (process
id and a random token, so that threads and processes writing the same path do not share one).
The file is then fsynced, moved over ``path`` with ``os.replace`` and the folder fsynced, so a
kill or a power cut at any moment leaves one of the two files. On an error the temporary file is
removed and the error raised; ``path`` is untouched. Files get the usual permissions (0o666 less
the umask).
"""
from __future__ import annotations

import os
import secrets
from typing import Callable

__all__ = ["atomic_write"]


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


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> str:
    """Run ``write(tmp_path)``, then move the written file over ``path`` durably. Returns ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{os.path.basename(path)}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync(folder, directory=True)
    return path
