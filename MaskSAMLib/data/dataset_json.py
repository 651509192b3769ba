"""nnU-Net v2 / Medical Segmentation Decathlon dataset folders: loading and validation.

nnU-Net v2 layout::

    DATASET/dataset.json   {"channel_names": {"0": "CT"}, "labels": {"background": 0, ...},
                            "numTraining": N, "file_ending": ".nii.gz"}
    DATASET/imagesTr/CASE_0000.nii.gz, CASE_0001.nii.gz, ...   (one 3D file per channel)
    DATASET/labelsTr/CASE.nii.gz

MSD layout: ``dataset.json`` with ``modality`` (or ``channel_names``), ``labels`` as
``{"0": "background", "1": "liver"}`` and ``training``:
``[{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]``. A multi-modal MSD
image is one 4D file: it is refused with a message saying how to split it per channel.

:func:`load_dataset` reads the description (refusing what cannot work at all: missing keys,
region-based labels, no background); :func:`validate_dataset` checks every case and raises one
:class:`MaskSAMError` summarising all problems, each naming its case.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MaskSAMError
from ..files import split_extension
from ..labels import as_int as _as_int
from ..labels import parse_labels
from .geometry import GRID_TOL
from .io import DEFAULT_MAX_VOXELS, read_image_info, read_volume

MAX_REPORTED = 3
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # CASE_0000: channel 0


def case_id(
    path: str | os.PathLike, *, ending: str | None = None, strip_channel: bool = False
) -> str:
    """The case a file or folder names, nnU-Net style (the one rule for datasets, ``segment``
    inputs and ``evaluate`` pairing).

    A file: its name without ``ending`` (when given and present) or else without its extension,
    compound ones kept whole (``liver_01.nii.gz``, ``liver_01.seg.nrrd`` -> ``liver_01``); with
    ``strip_channel`` also without a channel suffix (``ct_0000.nii.gz`` -> ``ct``). A folder (a
    DICOM series): its name.
    """
    path = Path(path)
    if path.is_dir():
        return path.resolve().name
    name = path.name
    if ending and name.endswith(ending) and len(name) > len(ending):
        stem = name[: -len(ending)]
    else:
        stem = split_extension(name)[0]
    match = CHANNEL_SUFFIX.match(stem) if strip_channel else None
    return match.group("case") if match else stem


@dataclass(frozen=True)
class Case:
    """One training case: its channel files (in channel order) and its label map."""

    case_id: str
    image_paths: tuple[Path, ...]
    label_path: Path | None


@dataclass
class DatasetSpec:
    """What a dataset folder holds (see the module docstring for the two layouts)."""

    folder: Path
    name: str
    channel_names: list[str]
    labels: dict[str, int]
    file_ending: str
    cases: list[Case]
    layout: str = "nnunet"
    num_training: int | None = None
    extra_images: list[str] = field(default_factory=list)

    def label_entries(self) -> list[dict[str, Any]]:
        """``[{"value", "name"}]`` sorted by value, background included."""
        return [{"value": v, "name": n} for n, v in sorted(self.labels.items(), key=lambda x: x[1])]


def _read_json(path: Path) -> Any:
    from ..files import read_small_file

    if not (path.exists() or path.is_symlink()):
        raise MaskSAMError(f"{path} does not exist; a dataset folder needs a dataset.json.")
    try:  # a regular file of sane size only: a FIFO would hang, /dev/zero exhaust memory
        return json.loads(read_small_file(path, max_bytes=64 << 20, what="dataset.json"))
    except FileNotFoundError:
        raise MaskSAMError(f"{path} does not exist; a dataset folder needs a dataset.json.") \
            from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MaskSAMError(f"{path} is not valid JSON ({exc}); fix the file.") from exc


def _channel_names(data: dict[str, Any], source: str) -> list[str]:
    raw = data.get("channel_names", data.get("modality"))
    if not isinstance(raw, dict) or not raw:
        raise MaskSAMError(
            f"{source}: needs 'channel_names' (or MSD 'modality'), e.g. {{\"0\": \"CT\"}}."
        )
    keys = sorted((_as_int(k), str(v)) for k, v in raw.items() if _as_int(k) is not None)
    if [k for k, _ in keys] != list(range(len(raw))):
        raise MaskSAMError(
            f'{source}: \'channel_names\' keys must be "0", "1", ... without gaps; got {list(raw)}.'
        )
    return [name for _, name in keys]


def _entry_path(folder: Path, entry: Any, what: str, source: str) -> Path:
    if not isinstance(entry, str) or not entry.strip():
        raise MaskSAMError(f"{source}: a training '{what}' entry is not a path: {entry!r}.")
    return folder / entry


def load_dataset(folder: str | os.PathLike) -> DatasetSpec:
    """Read ``folder/dataset.json`` and list the cases (nnU-Net v2 or MSD layout)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MaskSAMError(f"{folder} is not a folder; pass the dataset folder.")
    source = str(folder / "dataset.json")
    data = _read_json(folder / "dataset.json")
    if not isinstance(data, dict):
        raise MaskSAMError(f"{source}: must hold a JSON object.")
    channels = _channel_names(data, source)
    labels = parse_labels(data.get("labels"), source)
    name = str(data.get("name") or folder.name)
    num_training = _as_int(data.get("numTraining"))
    training = data.get("training")
    if isinstance(training, list) and training and "file_ending" not in data:
        return _load_msd(folder, data, source, name, channels, labels, num_training)
    ending = data.get("file_ending")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise MaskSAMError(f"{source}: needs 'file_ending' such as \".nii.gz\".")
    labels_dir, images_dir = folder / "labelsTr", folder / "imagesTr"
    if not labels_dir.is_dir():
        raise MaskSAMError(f"{labels_dir} is missing; put one label map per case there.")
    label_files = sorted(
        p for p in labels_dir.iterdir() if p.name.endswith(ending) and not p.name.startswith(".")
    )
    if not label_files:
        raise MaskSAMError(f"No '*{ending}' label files in {labels_dir}; add the label maps.")
    cases = []
    for label_file in label_files:
        cid = case_id(label_file, ending=ending)
        images = tuple(images_dir / f"{cid}_{c:04d}{ending}" for c in range(len(channels)))
        cases.append(Case(cid, images, label_file))
    known = {f"{c.case_id}_{i:04d}{ending}" for c in cases for i in range(len(channels))}
    extra = []
    if images_dir.is_dir():
        extra = sorted(
            p.name
            for p in images_dir.iterdir()
            if p.name.endswith(ending) and not p.name.startswith(".") and p.name not in known
        )
    return DatasetSpec(folder, name, channels, labels, ending, cases, "nnunet", num_training, extra)


def _load_msd(
    folder: Path,
    data: dict[str, Any],
    source: str,
    name: str,
    channels: list[str],
    labels: dict[str, int],
    num_training: int | None,
) -> DatasetSpec:
    cases = []
    ending = ""
    for index, entry in enumerate(data["training"]):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise MaskSAMError(f"{source}: training entry {index} needs 'image' and 'label'.")
        raw_images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        images = tuple(_entry_path(folder, e, "image", source) for e in raw_images)
        label = _entry_path(folder, entry["label"], "label", source)
        ending = ending or split_extension(label.name)[1]
        cases.append(Case(case_id(label, ending=ending), images, label))
    return DatasetSpec(folder, name, channels, labels, ending, cases, "msd", num_training)


# -- validation -----------------------------------------------------------------------------
def _escapes(folder: Path, path: Path) -> str | None:
    """Why ``path`` is not safely inside ``folder`` (None when it is)."""
    root = os.path.normpath(os.path.abspath(folder))
    lexical = os.path.normpath(os.path.abspath(path))
    if os.path.commonpath([root, lexical]) != root:
        return "is outside the dataset folder (absolute path or '..')"
    real_root = os.path.realpath(folder)
    real_path = os.path.realpath(path)
    if os.path.lexists(path) and os.path.commonpath([real_root, real_path]) != real_root:
        return "is a symbolic link pointing outside the dataset folder"
    return None


def _relative(folder: Path, path: Path) -> str:
    try:
        return os.path.relpath(path, folder)
    except ValueError:
        return str(path)


def _label_values(array: np.ndarray) -> tuple[list[int], str | None]:
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(array == np.round(array)):
            return [], "holds non-integer values; save it as an integer label map"
        array = array.astype(np.int64)
    low = int(array.min())
    if low < 0:
        return [], f"holds negative values ({low}); labels must be 0 or positive"
    counts = np.bincount(array.reshape(-1).astype(np.int64, copy=False))
    return [int(v) for v in np.flatnonzero(counts)], None


def _check_case(spec: DatasetSpec, case: Case, tol: float, max_voxels: int) -> list[str]:
    folder = spec.folder
    paths = [*case.image_paths, *([case.label_path] if case.label_path else [])]
    missing = [p for p in paths if not p.exists()]
    if missing:
        return [f"missing file {_relative(folder, p)}; add it or remove the case" for p in missing]
    problems: list[str] = []
    infos = []
    for path in paths:
        try:
            infos.append(read_image_info(path, max_voxels=max_voxels))
        except MaskSAMError as exc:
            problems.append(str(exc).replace(str(path), _relative(folder, path)))
    if problems:
        return problems
    reference = infos[-1].geometry
    for path, info in zip(paths[:-1], infos[:-1], strict=True):
        diff = info.geometry.differences(reference, tol)
        if diff:
            problems.append(
                f"{_relative(folder, path)} and its label differ in {'; '.join(diff)}; resample "
                "the label onto the image grid (or fix the header)"
            )
    if problems:
        return problems
    for path in paths:
        try:
            volume = read_volume(path, max_voxels=max_voxels)
        except MaskSAMError as exc:
            problems.append(str(exc).replace(str(path), _relative(folder, path)))
            continue
        if path == case.label_path:
            values, why = _label_values(volume.array)
            if why:
                problems.append(f"label {_relative(folder, path)} {why}")
                continue
            undeclared = sorted(set(values) - set(spec.labels.values()))
            if undeclared:
                problems.append(
                    f"label {_relative(folder, path)} holds values {undeclared} not declared in "
                    "dataset.json 'labels'; declare them or fix the label map"
                )
    return problems


def validate_dataset(
    spec: DatasetSpec,
    *,
    check_files: bool = True,
    tol: float = GRID_TOL,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> None:
    """Check every case; raise one :class:`MaskSAMError` listing the first problems.

    Always: paths stay inside the dataset folder (no absolute paths, '..' or symlinks leading
    out) and ``numTraining`` matches. With ``check_files``: files exist and are readable 3D
    scalar volumes without NaN/Inf, each image channel matches its label's grid (size,
    spacing, origin, direction within ``tol``), and label values are declared in ``labels``.
    """
    problems: list[str] = []
    if spec.num_training is not None and spec.num_training != len(spec.cases):
        problems.append(
            f"dataset.json says numTraining={spec.num_training} but {len(spec.cases)} cases were "
            "found; fix numTraining or add the missing cases"
        )
    for name in spec.extra_images[:MAX_REPORTED]:
        problems.append(
            f"imagesTr/{name} belongs to no labelled case (or a channel beyond channel_names); "
            "add its label, rename it CASE_XXXX, or move it out"
        )
    seen: set[str] = set()
    for case in spec.cases:
        if case.case_id in seen:
            problems.append(f"{case.case_id}: case listed twice; remove the duplicate entry")
            continue
        seen.add(case.case_id)
        paths = [*case.image_paths, *([case.label_path] if case.label_path else [])]
        escaping = [(p, why) for p in paths if (why := _escapes(spec.folder, p))]
        if escaping:
            problems += [
                f"{case.case_id}: {_relative(spec.folder, p)} {why}; keep the files inside "
                f"{spec.folder} with relative paths"
                for p, why in escaping
            ]
            continue
        if check_files:
            problems += [f"{case.case_id}: {p}" for p in _check_case(spec, case, tol, max_voxels)]
    if problems:
        shown = "; ".join(problems[:MAX_REPORTED])
        more = f"; and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise MaskSAMError(
            f"{len(problems)} problem{'s' if len(problems) > 1 else ''} in dataset {spec.name}: "
            f"{shown}{more}"
        )
