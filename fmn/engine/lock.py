"""One run per output folder: ``fmn train`` and ``fmn demo`` hold ``<folder>/.fmn.lock`` while they run.

The lock is an OS file lock (``filelock``), so a killed run releases it; the holder's process id
and command are written beside it (``.fmn.lock.owner``) for the message a second run gets."""
from __future__ import annotations

import contextlib
import os
import sys

from filelock import FileLock, Timeout

LOCK_NAME = ".fmn.lock"


class OutputLockedError(OSError):
    """Another fmn process is writing into the same output folder."""


def _owner(folder: str) -> str:
    try:
        with open(os.path.join(folder, LOCK_NAME + ".owner")) as fh:
            return fh.read().strip() or "another process"
    except OSError:
        return "another process"


@contextlib.contextmanager
def output_lock(folder: str, enabled: bool = True):
    """Hold the lock of ``folder`` (created if missing) for the block; ``OutputLockedError`` at
    once, naming the folder and the running process, when another run holds it. ``enabled=False``
    (the ranks of a DDP run other than rank 0) does nothing."""
    if not enabled:
        yield
        return
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    lock = FileLock(os.path.join(folder, LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise OutputLockedError(f"{folder} is in use by {_owner(folder)}: another fmn run is writing there; "
                                "wait for it, or give another output folder") from None
    owner = os.path.join(folder, LOCK_NAME + ".owner")
    try:
        with open(owner, "w") as fh:
            fh.write(f"process {os.getpid()} ({' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))})")
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(owner)
        lock.release()
        if created and set(os.listdir(folder)) <= {LOCK_NAME}:   # a run that wrote nothing leaves nothing
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, LOCK_NAME))
                os.rmdir(folder)
