"""Where a case's outputs go, and writing them: label map (or DICOM SEG) plus a JSON sidecar.

Formats by extension: ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha`` label maps, ``.seg.nrrd``
with Slicer's segment metadata (names, colours, terminology), and ``.dcm`` DICOM SEG (DICOM
series inputs only). The sidecar ``<name>.json`` next to the output records the per-segment
volume (ml), the model, device, options and the time of each stage. Every file appears
atomically; an existing output is only replaced with ``overwrite``.
"""

from __future__ import annotations

import datetime
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import RESEARCH_NOTICE, __version__
from ..data.io import DicomSeries
from ..data.writers import LABEL_EXTENSIONS, write_label_map
from ..errors import MaskSAMError
from ..files import (
    atomic_write_text,
    check_output_path,
    check_writable_folder,
    publish_together,
    split_extension,
)
from .dicom_seg import require_highdicom, write_dicom_seg
from .inputs import CaseInput
from .prediction import Prediction

OUTPUT_EXTENSIONS = (*LABEL_EXTENSIONS, ".dcm")
FORMATS = tuple(ext.lstrip(".") for ext in OUTPUT_EXTENSIONS)


def output_extension(path: str | Path) -> str | None:
    """The output format of ``path`` by its extension, or None when it has none we write."""
    lower = str(path).lower()
    for ext in OUTPUT_EXTENSIONS:
        if lower.endswith(ext):
            return ext
    return None


def sidecar_path(output: str | Path) -> Path:
    """``out/case.seg.nrrd`` -> ``out/case.json``."""
    stem, _ = split_extension(str(output))
    if stem.lower().endswith(".seg"):
        stem = stem[:-4]
    return Path(stem + ".json")


@dataclass
class PlannedOutput:
    """A case, the file its label map goes to and whether an earlier output of ours is there."""

    case: CaseInput
    path: Path
    exists: bool = False

    @property
    def is_dicom_seg(self) -> bool:
        return output_extension(self.path) == ".dcm"

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.path)


_EXTENSION_LIKE = re.compile(r"^\.[A-Za-z][A-Za-z0-9]{0,6}$")


def _output_format(out: Path) -> str | None:
    """The format ``out`` names, refusing a misspelt or upper-case extension before any work
    (``seg.nrdd`` would otherwise silently become a folder; ``SEG.NII.GZ`` fails after the
    inference, since SimpleITK picks its writer by the lower-case extension)."""
    ext = output_extension(out)
    if ext is not None:
        if not out.name.endswith(ext):
            raise MaskSAMError(
                f"--out {out}: write the extension in lower case ({ext}); SimpleITK and "
                "Slicer recognise file types by their lower-case extension."
            )
        return ext
    if out.is_dir():
        return None
    suffix = out.suffix
    if suffix.lower() == ".nhdr":
        raise MaskSAMError(f"--out {out}: detached NRRD headers (.nhdr) are not written; use "
                           ".nrrd or .seg.nrrd.")
    if _EXTENSION_LIKE.match(suffix) and not suffix[1:].isdigit():
        raise MaskSAMError(
            f"--out {out}: unknown output type '{suffix}'; use one of "
            f"{', '.join(OUTPUT_EXTENSIONS)}, or for an output folder a name without an "
            "extension (or create the folder first)."
        )
    return None


def plan_outputs(
    cases: list[CaseInput],
    out: str | Path,
    *,
    batch: bool,
    fmt: str | None,
    model_dir: str | Path | None = None,
    overwrite: bool = False,
) -> list[PlannedOutput]:
    """Every output of the run, decided and checked before any work.

    ``out`` itself for one case, ``out/<case id>.<fmt>`` else. Each label map and its sidecar
    obey :func:`~MaskSAMLib.files.check_output_path`: never an input, never inside the model
    folder, never a file MaskSAM did not write; an earlier output of ours is replaced only with
    ``overwrite`` (in a batch it is skipped, ``PlannedOutput.exists``). The output folder must
    be writable. Raises MaskSAMError (one line) otherwise.
    """
    out = Path(out)
    fmt_ext = None
    if fmt is not None:
        fmt_ext = "." + fmt.lstrip(".").lower()
        if fmt_ext not in OUTPUT_EXTENSIONS:
            raise MaskSAMError(f"Unknown --format {fmt}; use one of {', '.join(FORMATS)}.")
    out_ext = _output_format(out)
    as_folder = batch or out.is_dir() or out_ext is None
    if batch and out_ext is not None and not out.is_dir():
        raise MaskSAMError(f"Several cases are being segmented, so --out must be a folder, not "
                           f"the file name {out}.")
    if not as_folder:
        if fmt_ext is not None and fmt_ext != out_ext:
            raise MaskSAMError(f"--format {fmt} contradicts the --out extension of {out}.")
        if not out.parent.is_dir():
            raise MaskSAMError(f"Cannot write {out}: the folder {out.parent} does not exist.")
        planned = [PlannedOutput(cases[0], out)]
        folder = out.parent
    else:
        if out.exists() and not out.is_dir():
            raise MaskSAMError(f"--out {out} is a file; several cases need an output folder.")
        if not out.parent.is_dir():
            raise MaskSAMError(f"Cannot create {out}: the folder {out.parent} does not exist.")
        input_folders = [p for c in cases if not c.dicom for p in {q.parent for q in c.paths}]
        if batch and any(_same_folder(out, f) for f in input_folders):
            raise MaskSAMError(
                f"--out {out} is the folder the input images come from; choose another output "
                "folder (outputs there would replace or be taken for inputs)."
            )
        ext = fmt_ext or ".nii.gz"
        planned = [PlannedOutput(c, out / f"{c.case_id}{ext}") for c in cases]
        folder = out
    inputs = [p for c in cases for p in c.paths]
    protected = [model_dir] if model_dir is not None else []
    for item in planned:
        if item.is_dicom_seg:
            if not item.case.dicom:
                raise MaskSAMError(
                    f"{item.path}: DICOM SEG output needs a DICOM series input (it references "
                    "the source images); write .seg.nrrd or .nii.gz for "
                    f"{item.case.describe()}."
                )
            require_highdicom()
        found = [
            check_output_path(item.path, inputs=inputs, protected=protected,
                              overwrite=overwrite or batch, role="label map"),
            check_output_path(item.sidecar, inputs=inputs, protected=protected,
                              overwrite=overwrite or batch,
                              role=f"JSON sidecar of {item.path.name}"),
        ]
        item.exists = any(found)
        if item.exists and not overwrite and not batch:
            what = item.path if found[0] else item.sidecar
            raise MaskSAMError(f"{what} already exists; pass --overwrite to replace it.")
    check_writable_folder(folder)
    return planned


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.is_dir() and b.is_dir() and a.samefile(b)
    except OSError:
        return False


def write_outputs(
    prediction: Prediction,
    planned: PlannedOutput,
    *,
    overwrite: bool,
    series: DicomSeries | None = None,
    read_seconds: float = 0.0,
) -> dict[str, Any]:
    """Write the label map (or DICOM SEG) and its sidecar as one set; returns the sidecar.

    ``series``: the DICOM series the case was read from (``CaseRead.series``), which a DICOM
    SEG references. Both files go to temporaries first and are published together
    (``publish_together``): a failure on either (a full disk, a size limit) leaves neither, and
    the previous set intact.
    """
    start = time.perf_counter()
    classes = prediction.info.classes
    with publish_together():
        if planned.is_dicom_seg:
            if series is None:
                raise MaskSAMError(f"{planned.path}: the DICOM series of this case is unknown.")
            write_dicom_seg(prediction.labels, classes, series.files, planned.path,
                            spacing=prediction.geometry.spacing, overwrite=overwrite,
                            software_version=__version__)
        else:
            write_label_map(prediction.labels, prediction.geometry, planned.path,
                            overwrite=overwrite, labels=classes)
        timings = {"read": read_seconds, **prediction.timings,
                   "write": time.perf_counter() - start}
        info = sidecar(prediction, planned, timings, series=series)
        atomic_write_text(planned.sidecar, json.dumps(info, indent=2) + "\n",
                          overwrite=overwrite)
    return info


def sidecar(
    prediction: Prediction,
    planned: PlannedOutput,
    timings: dict[str, float],
    *,
    series: DicomSeries | None = None,
) -> dict[str, Any]:
    """The JSON sidecar: segments with volumes, model, device, options, timings (seconds)."""
    made = prediction.info
    order = ("read", "preprocess", "encoder", "decoder", "stitch", "postprocess", "write")
    times = {k: round(timings[k], 3) for k in order if k in timings}
    times["total"] = round(sum(timings.get(k, 0.0) for k in order), 3)
    case = planned.case
    return {
        "format_version": 1,
        "notice": RESEARCH_NOTICE,
        "software": f"MaskSAMLib {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "case": case.case_id,
        "inputs": [str(p) for p in case.paths],
        "series_uid": series.uid if series is not None else None,
        "output": str(planned.path),
        "model": {
            "dir": made.model_dir,
            "backbone": made.backbone,
            "img_size": made.img_size,
            "num_slices": made.num_slices,
            "num_queries": made.num_queries,
            "provenance": made.provenance,
        },
        "device": made.device,
        "options": {
            "step": made.step, "fast": made.fast, "tta": made.tta,
            "mirror_axes": list(made.mirror_axes),
            "target_spacing": list(made.target_spacing),
        },
        "geometry": prediction.geometry.to_dict(),
        "preprocessed_shape": list(prediction.preprocessed_shape),
        "windows": prediction.windows,
        "segments": prediction.segment_volumes(),
        "timings_s": times,
    }
