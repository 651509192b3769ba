"""Which cases a ``masksam segment`` call names, and reading them safely (headers first).

Inputs are image files (NIfTI, NRRD, MHA, ...) or folders. A folder holding image files is a
batch of those files; any other folder is one DICOM series (the series with the most slices,
or ``--series-uid``). A model with C > 1 channels takes one file per channel: either exactly C
files for one case, or nnU-Net-named files ``CASE_0000``, ``CASE_0001``, ... grouped by case.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..data.dataset_json import CHANNEL_SUFFIX, case_id
from ..data.geometry import Geometry, Volume
from ..data.io import (
    DEFAULT_MAX_VOXELS,
    DicomSeries,
    list_dicom_series,
    quiet_native_stderr,
    read_dicom_series,
    read_image_info,
    read_image_info_unchecked,
    read_volume,
)
from ..errors import MaskSAMError
from ..files import is_masksam_file
from .budget import pixel_bytes

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


#: ``check_memory(geometry, name, bytes_per_voxel)``: raises MaskSAMError (one line) when a
#: volume on ``geometry`` would not fit; ``name`` says which file in the message.
MemoryCheck = Callable[[Geometry, str, int], object]


@dataclass
class CaseInput:
    """One case: its id and its channel files (or one DICOM folder)."""

    case_id: str
    paths: list[Path]
    dicom: bool = False

    def describe(self) -> str:
        return str(self.paths[0]) if len(self.paths) == 1 else ", ".join(map(str, self.paths))


def is_image_file(path: Path) -> bool:
    name = path.name.lower()
    if name.startswith(".") or ".tmp-" in name or name.endswith(".seg.nrrd"):
        return False  # hidden, an unfinished temporary, or a segmentation (an output)
    if not (path.is_file() and name.endswith(IMAGE_EXTENSIONS)):
        return False
    return not is_masksam_file(path)  # an earlier output of ours is not an input


def refuse_segmentation_input(path: Path) -> None:
    """An explicit input that is a segmentation, not an image: a Slicer ``.seg.nrrd`` or a label
    map MaskSAM wrote (its header marker), which would otherwise be "segmented" like a CT."""
    name = path.name.lower()
    if name.endswith(".seg.nrrd"):
        raise MaskSAMError(f"{path} is a segmentation (.seg.nrrd), not an image; pass the image "
                           "volume it belongs to.")
    if name.endswith(IMAGE_EXTENSIONS) and is_masksam_file(path):
        raise MaskSAMError(f"{path} is a label map written by MaskSAM, not an image; pass the "
                           "image volume it was made from.")


def _group_channels(files: list[Path], channels: int) -> list[CaseInput]:
    """nnU-Net naming: ``CASE_0000 .. CASE_{C-1:04d}`` per case (C = ``channels``)."""
    if channels == 1:
        return [CaseInput(case_id(f, strip_channel=True), [f]) for f in files]
    groups: dict[str, dict[int, Path]] = {}
    for f in files:
        match = CHANNEL_SUFFIX.match(case_id(f))
        if not match:
            raise MaskSAMError(
                f"{f} has no channel suffix; a {channels}-channel model needs files named "
                "CASE_0000, CASE_0001, ... (one per channel) for batches."
            )
        groups.setdefault(match.group("case"), {})[int(match.group("channel"))] = f
    cases = []
    for case, found in sorted(groups.items()):
        if sorted(found) != list(range(channels)):
            raise MaskSAMError(
                f"Case {case} has channel files {sorted(found)}; the model needs channels 0 to "
                f"{channels - 1} (CASE_0000 ... CASE_{channels - 1:04d})."
            )
        cases.append(CaseInput(case, [found[c] for c in range(channels)]))
    return cases


def discover_cases(inputs: Sequence[str | Path], channels: int) -> tuple[list[CaseInput], bool]:
    """The cases named by ``inputs`` and whether this is a batch (``--out`` is a folder)."""
    paths = [Path(p) for p in inputs]
    if not paths:
        raise MaskSAMError("No input was given; pass an image file, a DICOM folder or a folder "
                           "of images.")
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise MaskSAMError(f"{missing[0]} does not exist; check the path.")
    if channels > 1 and len(paths) == channels and all(p.is_file() for p in paths):
        return [CaseInput(case_id(paths[0], strip_channel=True), paths)], False
    files: list[Path] = []
    cases: list[CaseInput] = []
    batch = len(paths) > 1
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if is_image_file(p))
            if inside:
                files.extend(inside)
                batch = True
            else:
                cases.append(CaseInput(case_id(path), [path], dicom=True))
        else:
            refuse_segmentation_input(path)
            files.append(path)
    if channels > 1 and any(c.dicom for c in cases):
        raise MaskSAMError(f"The model takes {channels} channels; pass one image file per "
                           "channel (DICOM folders hold a single channel).")
    if channels > 1 and files and not batch:
        raise MaskSAMError(f"The model takes {channels} channels but 1 file was given; pass one "
                           "file per channel, in the model's channel order.")
    cases = _group_channels(files, channels) + cases
    ids = [c.case_id for c in cases]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise MaskSAMError(f"Several inputs have the case id {duplicated[0]!r}, so their outputs "
                           "would collide; rename them or run them separately.")
    return cases, batch


def _dicom_geometry(series: DicomSeries) -> tuple[Geometry, int]:
    """Grid of a series from two slice headers (first, last), and bytes per voxel."""
    first = read_image_info_unchecked(series.files[0])
    reader = sitk.ImageFileReader()
    spacing_z = first.spacing[2] if len(first.spacing) > 2 else 1.0
    positions = []
    for name in (series.files[0], series.files[-1]):
        reader.SetFileName(name)
        with quiet_native_stderr():
            reader.ReadImageInformation()
        if reader.HasMetaDataKey("0020|0032"):
            positions.append([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
    if len(positions) == 2 and series.num_slices > 1:
        gap = np.linalg.norm(np.subtract(positions[1], positions[0])) / (series.num_slices - 1)
        spacing_z = float(gap) if gap > 0 else spacing_z
    size = (first.size[0], first.size[1], series.num_slices)
    spacing = (first.spacing[0], first.spacing[1], spacing_z)
    direction = first.direction if len(first.direction) == 9 else np.eye(3).reshape(-1)
    return Geometry(size, spacing, first.origin[:3], direction), pixel_bytes(first.pixel_type)


def choose_series(folder: Path, series_uid: str | None) -> DicomSeries:
    """The series ``read_dicom_series`` will read (most slices, or ``series_uid``)."""
    found = list_dicom_series(folder)
    if series_uid is not None:
        for series in found:
            if series.uid == series_uid:
                return series
    elif found and not (len(found) > 1 and found[1].num_slices == found[0].num_slices):
        return found[0]
    read_dicom_series(folder, series_uid, max_voxels=1)  # raises its one-line explanation
    raise MaskSAMError(f"No usable DICOM series in {folder}.")  # pragma: no cover


@dataclass
class CaseRead:
    """The pixels of one case: channel volumes, the DICOM series they came from (None for image
    files) and the seconds reading took."""

    volumes: list[Volume]
    series: DicomSeries | None
    seconds: float


def read_case(
    case: CaseInput,
    check_memory: MemoryCheck | None = None,
    *,
    series_uid: str | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> CaseRead:
    """Header checks, ``check_memory`` on each header (e.g. ``Predictor.check_memory`` with the
    run's budget and options), then the pixels."""
    start = time.perf_counter()
    series = None
    if case.dicom:
        folder = case.paths[0]
        series = choose_series(folder, series_uid)
        geometry, nbytes = _dicom_geometry(series)
        if geometry.num_voxels > max_voxels:
            read_dicom_series(folder, series.uid, max_voxels=max_voxels)  # refuses, one line
        if check_memory is not None:
            check_memory(geometry, f"DICOM series {series.uid} in {folder}", nbytes)
        volumes = [read_dicom_series(folder, series.uid, max_voxels=max_voxels)]
    else:
        infos = [read_image_info(p, max_voxels=max_voxels) for p in case.paths]
        for info in infos:
            if check_memory is not None:
                check_memory(info.geometry, str(info.path), pixel_bytes(info.pixel_type))
        volumes = [read_volume(p, max_voxels=max_voxels) for p in case.paths]
    return CaseRead(volumes, series, time.perf_counter() - start)
