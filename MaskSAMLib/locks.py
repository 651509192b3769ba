"""Folder locks: one MaskSAM run writes to a folder at a time.

A lock dies with the process that took it (``fcntl.flock``; forked children drop their copy),
so a killed run never blocks ``--resume``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import MaskSAMError

_HELD_LOCKS: set[FolderLock] = set()


def _drop_inherited_locks() -> None:
    """In a forked child (a data-loader worker): close its copy of every held lock, so a lock
    dies with the process that took it and a SIGKILLed run's orphaned workers never block
    ``--resume`` (a flock belongs to the open file, which fork shares)."""
    for lock in list(_HELD_LOCKS):
        if lock._handle is not None:
            with contextlib.suppress(OSError):
                lock._handle.close()
            lock._handle = None
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


class FolderLock:
    """An exclusive lock on a folder, held for the life of a process.

    Uses ``fcntl.flock`` where available (released by the OS when the process dies, so a lock
    left by a killed run never blocks ``--resume``; forked children drop their copy); elsewhere
    a PID file checked with psutil.
    """

    def __init__(self, folder: str | os.PathLike, name: str = ".masksam.lock") -> None:
        self.path = Path(folder) / name
        self._handle = None

    def acquire(self, what: str = "Another MaskSAM run") -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - kept open while the lock is held
        try:
            import fcntl
        except ImportError:  # Windows
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                owner = handle.read().strip() or "unknown"
                handle.close()
                raise MaskSAMError(
                    f"{what} (pid {owner}) is writing to {self.path.parent}; wait for it to "
                    "finish or stop it, or choose another output folder."
                ) from None
        else:
            handle.seek(0)
            owner = handle.read().strip()
            if owner.isdigit() and int(owner) != os.getpid() and _pid_alive(int(owner)):
                handle.close()
                raise MaskSAMError(
                    f"{what} (pid {owner}) is writing to {self.path.parent}; wait for it to "
                    "finish or stop it, or choose another output folder."
                )
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        _HELD_LOCKS.add(self)
        return self

    def release(self) -> None:
        _HELD_LOCKS.discard(self)
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    try:
        import psutil

        return psutil.pid_exists(pid)
    except ImportError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
