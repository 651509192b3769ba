"""Atomic writes, safe loading and folder locks: the one place these mechanisms live.

Conventions (INTERFACES.md): a temporary file keeps the real extension last
(``out.tmp-4f2a.nii.gz``) so SimpleITK picks the right writer, then ``os.replace`` moves it into
place; a directory is written as a temporary sibling and renamed; checkpoints load with
``torch.load(weights_only=True)`` so no pickled code ever runs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import MaskSAMError

# Multi-part extensions that must stay whole at the end of a temporary name.
_COMPOUND_SUFFIXES = (".nii.gz", ".seg.nrrd", ".tar.gz", ".safetensors.part")


def split_extension(path: str | os.PathLike) -> tuple[str, str]:
    """Split ``path`` into (stem, extension), keeping compound extensions such as ``.nii.gz``."""
    name = os.fspath(path)
    lower = name.lower()
    for suffix in _COMPOUND_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix) :]
    stem, ext = os.path.splitext(name)
    return stem, ext


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A unique temporary path next to ``path`` with the real extension last."""
    stem, ext = split_extension(path)
    return Path(f"{stem}.tmp-{uuid.uuid4().hex[:8]}{ext}")


def _raise_os_error(exc: OSError, target: Path) -> None:
    if exc.errno == errno.ENOSPC:
        raise MaskSAMError(
            f"No space left on the device while writing {target}; free some disk space and try "
            "again (the previous file, if any, is untouched)."
        ) from exc
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        raise MaskSAMError(
            f"Cannot write {target}: permission denied; choose a folder you can write to."
        ) from exc
    raise MaskSAMError(f"Could not write {target}: {exc.strerror or exc}.") from exc


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is renamed onto ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    With ``overwrite=False`` an existing ``path`` is refused before anything is written.
    """
    target = Path(path)
    if not overwrite and target.exists():
        raise MaskSAMError(f"{target} already exists; pass --overwrite to replace it.")
    tmp = temporary_sibling(target)
    try:
        yield tmp
        if not tmp.exists():
            raise MaskSAMError(f"Nothing was written for {target}.")
        _fsync_file(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        _remove_quietly(tmp)
        _raise_os_error(exc, target)
    except BaseException:
        _remove_quietly(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it is renamed to ``path``.

    ``path`` must not exist or be an empty directory. On failure nothing is left behind.
    """
    target = Path(path)
    if target.exists():
        if not target.is_dir():
            raise MaskSAMError(f"{target} exists and is not a folder; choose another output path.")
        if any(target.iterdir()):
            raise MaskSAMError(
                f"{target} already exists and is not empty; choose a new output folder or remove it."
            )
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _raise_os_error(exc, target)
    tmp = parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_os_error(exc, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


class FolderLock:
    """An exclusive lock on a folder, held for the life of a process.

    Uses ``fcntl.flock`` where available (released by the OS when the process dies, so a lock
    left by a killed run never blocks ``--resume``); elsewhere a PID file checked with psutil.
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
        return self

    def release(self) -> None:
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
