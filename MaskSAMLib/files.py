"""Atomic writes, output safety and safe loading: the one place these mechanisms live.

Conventions (INTERFACES.md): a temporary file keeps the real extension last
(``out.tmp-4f2a.nii.gz``) so SimpleITK picks the right writer, then ``os.replace`` moves it into
place; a directory is written as a temporary sibling and renamed; checkpoints load with
``torch.load(weights_only=True)`` so no pickled code ever runs. Folder locks live in
:mod:`MaskSAMLib.locks`, NIfTI integrity checks in :mod:`MaskSAMLib.data.nifti_checks` and the
test-only fault injection in :mod:`MaskSAMLib.faults`.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .data.nifti_checks import incomplete_nifti
from .errors import MaskSAMError
from .faults import fault_point

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
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise MaskSAMError(
            f"No space left on the device while writing {target}; free some disk space and try "
            "again (the previous file, if any, is untouched)."
        ) from exc
    if exc.errno == errno.EFBIG:
        raise MaskSAMError(
            f"Could not write {target}: the file is larger than this file system or a size limit "
            "(ulimit -f) allows; write to another disk (the previous file, if any, is untouched)."
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
        pending = _PENDING.get()
        if pending is not None:  # inside publish_together(): renamed with the rest of the set
            pending.append((tmp, target))
            return
        fault_point("write:before_rename", target)
        os.replace(tmp, target)
    except OSError as exc:
        _remove_quietly(tmp)
        _raise_os_error(exc, target)
    except BaseException:
        _remove_quietly(tmp)
        raise


_PENDING: contextvars.ContextVar[list[tuple[Path, Path]] | None] = contextvars.ContextVar(
    "masksam_pending_publish", default=None)


@contextlib.contextmanager
def publish_together() -> Iterator[None]:
    """Publish an output set as one: every :func:`atomic_path` write inside the block (label
    map, sidecar, report and its CSV) goes to its temporary file; only when the whole block
    succeeded are they renamed into place, one right after the other. On any failure (a full
    disk or a size limit on the last file, an interrupt) every temporary is removed and no file
    of the set is replaced, so a rerun finds the previous set, or none, intact.
    """
    pending: list[tuple[Path, Path]] = []
    token = _PENDING.set(pending)
    try:
        yield
    except BaseException:
        for tmp, _target in pending:
            _remove_quietly(tmp)
        raise
    finally:
        _PENDING.reset(token)
    for index, (tmp, target) in enumerate(pending):
        try:
            fault_point("write:before_rename", target)
            os.replace(tmp, target)
        except BaseException as exc:
            for left, _ in pending[index:]:
                _remove_quietly(left)
            if isinstance(exc, OSError):
                _raise_os_error(exc, target)
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
                f"{target} already exists and is not empty; choose a new output folder or "
                "remove it."
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


def _writer_failure(exc: Exception) -> OSError:
    """An ``OSError`` for a library writer's failure (ITK, torch and safetensors raise their own
    types, e.g. RuntimeError "unexpected pos" or SafetensorError "os error 28", when the disk is
    full), so :func:`atomic_path` reports it in one line and keeps the previous file."""
    text = str(exc)
    code = errno.EIO
    for needles, value in ((("No space", "os error 28"), errno.ENOSPC),
                           (("too large", "os error 27"), errno.EFBIG),
                           (("quota", "os error 122"), errno.EDQUOT),
                           (("ermission denied", "os error 13"), errno.EACCES)):
        if any(needle in text for needle in needles):
            code = value
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = lines[-1][:200] if lines else type(exc).__name__
    return OSError(code, f"the writer failed ({detail}); check the free disk space")


def write_image(image, path: str | os.PathLike, *, compress: bool = True) -> None:
    """``sitk.WriteImage`` that never fails silently (use it inside :func:`atomic_path`).

    ITK's NIfTI writer only prints "wrote only N of M bytes" when the disk is full and returns
    normally, so the truncated file would be renamed into place; ITK's other writers raise a
    bare RuntimeError. Both become an ``OSError`` here.
    """
    import SimpleITK as sitk

    path = Path(path)
    try:
        sitk.WriteImage(image, str(path), useCompression=compress)
    except RuntimeError as exc:
        raise _writer_failure(exc) from exc
    problem = incomplete_nifti(path) or _differs_on_reading(image, path)
    if problem:
        raise OSError(errno.EIO, f"{problem}; check the free disk space")


def _differs_on_reading(image, path: Path) -> str | None:
    """Read ``path`` back: ITK's NRRD writer, too, can leave a truncated file without an error."""
    import numpy as np
    import SimpleITK as sitk

    try:
        back = sitk.ReadImage(str(path))
    except RuntimeError:
        return "the written file cannot be read back"
    if back.GetSize() != image.GetSize() or any(
        not back.HasMetaDataKey(key) for key in image.GetMetaDataKeys()
    ):
        return "the written file is incomplete"
    a, b = sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(back)
    if a.shape != b.shape or not np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"):
        return "the written file does not hold the image"
    return None


def write_torch(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` whose write failures are ``OSError`` (use it inside :func:`atomic_path`)."""
    import torch

    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        raise _writer_failure(exc) from exc


def write_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` whose write failures are ``OSError``."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except (SafetensorError, RuntimeError) as exc:
        if isinstance(exc, SafetensorError) and "serializ" not in str(exc):
            raise
        raise _writer_failure(exc) from exc



def read_small_file(path: str | os.PathLike, *, max_bytes: int, what: str) -> bytes:
    """The bytes of a small regular file (a JSON config, a label list), refusing what is not one.

    A FIFO would block ``open`` forever and a link to ``/dev/zero`` reads until memory runs out:
    only a regular file of at most ``max_bytes`` is read. ``what`` names the file in errors.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise MaskSAMError(f"Cannot read {what} {path} ({exc.strerror or exc}).") from exc
    if not stat.S_ISREG(info.st_mode):
        raise MaskSAMError(
            f"{what} {path} is not a regular file (a FIFO, a device or a socket); point to the "
            "real file."
        )
    if info.st_size > max_bytes:
        raise MaskSAMError(
            f"{what} {path} is {info.st_size:,} bytes, more than the {max_bytes:,} such a file "
            "can hold; is it the right file?"
        )
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):  # swapped after the stat
            raise MaskSAMError(f"{what} {path} is not a regular file; point to the real file.")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise MaskSAMError(f"{what} {path} is larger than {max_bytes:,} bytes; is it the right "
                           "file?")
    return data


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return _resolved(a) == _resolved(b)


def _inside(path: Path, folder: Path) -> bool:
    try:
        _resolved(path).relative_to(_resolved(folder))
    except ValueError:
        return False
    return True


#: Written into every label map's header (ITK_FileNotes: NIfTI ``descrip``, NRRD/MHA field) so
#: ``--overwrite`` can tell MaskSAM's own outputs from a user's files.
LABEL_MAP_MARKER = "MaskSAMLib label map"
_CSV_MARKER = "case,label,value,dice,hd95_mm,"
_MAX_JSON_BYTES = 64 << 20


def _json_object(path: Path) -> dict | None:
    import json

    try:
        data = json.loads(read_small_file(path, max_bytes=_MAX_JSON_BYTES, what="JSON file"))
    except (OSError, ValueError, MaskSAMError):
        return None
    return data if isinstance(data, dict) else None


def is_masksam_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is recognisably a file MaskSAM wrote (the only kind it ever replaces).

    JSON sidecars and reports carry ``"software": "MaskSAMLib ..."``; evaluation CSVs start with
    their fixed header; label maps carry :data:`LABEL_MAP_MARKER` in their header (older ones
    are recognised by their MaskSAM sidecar naming them); DICOM SEG objects name MaskSAM as
    their manufacturer model.
    """
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    lower = path.name.lower()
    if lower.endswith(".json"):
        data = _json_object(path)
        if not data:
            return False
        older_report = {"format_version", "conventions", "cases", "mean"} <= set(data)
        return older_report or str(data.get("software", "")).startswith("MaskSAMLib")
    if lower.endswith(".csv"):
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                return handle.readline(200).startswith(_CSV_MARKER)
        except OSError:
            return False
    if lower.endswith(".dcm"):
        try:
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
                "ManufacturerModelName", "Modality"])
        except Exception:  # noqa: BLE001 - not readable as DICOM: not ours
            return False
        return ds.get("Modality") == "SEG" and ds.get("ManufacturerModelName") == "MaskSAM"
    try:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        if reader.HasMetaDataKey("ITK_FileNotes") and reader.GetMetaData(
                "ITK_FileNotes").startswith(LABEL_MAP_MARKER):
            return True
    except RuntimeError:
        return False
    stem, _ = split_extension(path)
    if stem.lower().endswith(".seg"):
        stem = stem[:-4]
    sidecar = _json_object(Path(stem + ".json"))
    return bool(sidecar) and str(sidecar.get("software", "")).startswith("MaskSAMLib") and (
        Path(str(sidecar.get("output", ""))).name == path.name)


def check_output_path(
    target: str | os.PathLike,
    *,
    inputs: Sequence[str | os.PathLike] = (),
    protected: Sequence[str | os.PathLike] = (),
    overwrite: bool,
    ours: Callable[[Path], bool] = is_masksam_file,
    role: str = "output",
) -> bool:
    """The one rule for every file MaskSAM writes, checked before any work.

    Refused: ``target`` is one of the ``inputs`` (same file, links included) or lies inside a
    ``protected`` folder (a model folder); ``target`` exists but was not written by MaskSAM
    (``ours(target)`` is False), with or without ``overwrite``; ``target`` exists without
    ``overwrite``. Returns whether ``target`` exists (and may be replaced).
    """
    path = Path(target)
    for source in inputs:
        source = Path(source)
        if (source.is_file() and path.exists() and _same_file(path, source)) or (
            _resolved(path) == _resolved(source)
        ):
            raise MaskSAMError(
                f"The {role} {path} is an input of this command; it is never replaced: choose "
                "another output name (nothing was written)."
            )
    for folder in protected:
        if Path(folder).is_dir() and _inside(path, folder):
            raise MaskSAMError(
                f"The {role} {path} would land inside the model folder {folder}; write outputs "
                "elsewhere (nothing was written)."
            )
    if not (path.exists() or path.is_symlink()):
        return False
    if path.is_dir() or not ours(path):
        raise MaskSAMError(
            f"{path} ({role}) already exists and was not written by MaskSAM; it is never "
            "replaced: choose another output name or move that file away (nothing was written)."
        )
    if not overwrite:
        raise MaskSAMError(f"{path} ({role}) already exists; pass --overwrite to replace it.")
    return True


def check_writable_folder(folder: str | os.PathLike) -> None:
    """Refuse (one line, before any work) a folder that files cannot be created in.

    ``folder`` may not exist yet (a batch output folder): then its parent must be writable.
    A probe file is created and removed, which also catches read-only mounts and ACLs.
    """
    folder = Path(folder)
    probe_in = folder if folder.is_dir() else folder.parent
    if not probe_in.is_dir():
        raise MaskSAMError(f"Cannot write to {folder}: the folder {probe_in} does not exist.")
    try:
        fd, name = tempfile.mkstemp(prefix=".masksam-probe-", dir=probe_in)
    except OSError as exc:
        reason = ("permission denied or a read-only file system"
                  if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
                  else exc.strerror or str(exc))
        raise MaskSAMError(
            f"Cannot write to the folder {probe_in} ({reason}); choose a folder you can write "
            "to (nothing was done)."
        ) from exc
    os.close(fd)
    _remove_quietly(Path(name))


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
    except OSError as exc:
        # Delayed-allocation filesystems report a full disk here: that file must not be
        # renamed into place. Filesystems without fsync (EINVAL, ENOTSUP) are fine.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
