"""Per-class Dice, HD95 and volume difference between a predicted and a reference label map.

Conventions (also written into every report under ``"conventions"``):

- Background (value 0) is never scored. Classes come from a ``dataset.json`` ``labels`` mapping
  or, without one, every non-zero value found in prediction or reference, named ``label_<v>``.
- Dice = 2|P∩R| / (|P| + |R|). A class absent from **both** prediction and reference scores
  Dice **1.0** (nothing to find, nothing found); absent from only one, Dice **0.0**.
- HD95 (mm) is the symmetric 95th-percentile Hausdorff distance: surface voxels are the voxels
  of a mask with a 6-connected background neighbour (the image border counts as background);
  distances are Euclidean in physical mm (voxel spacing, Euclidean distance transform);
  HD95 = max(P95 of distances prediction->reference surface, P95 of reference->prediction),
  as in MedPy and MONAI. It is **not defined** (``None``, JSON ``null``, with a ``note``) when
  the class is absent from the prediction, the reference or both - never a made-up number.
- Volumes in ml. ``volume_diff_ml`` = prediction - reference; ``volume_diff_rel`` = that
  difference / reference volume, ``None`` when the reference is empty.
- Means per class are over all evaluated cases for Dice and volumes, and over the cases where
  HD95 is defined for HD95 (``hd95_cases`` says how many).
- Prediction and reference must share one grid (size, spacing, origin, direction, within the
  one tolerance of :meth:`MaskSAMLib.data.geometry.Geometry.differences`); a mismatch is an
  error, never a silent resample.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from . import __version__
from .data.dataset_json import case_id
from .data.geometry import Geometry
from .data.nifti_checks import incomplete_nifti
from .errors import MaskSAMError
from .files import (
    atomic_write_text,
    check_output_path,
    check_writable_folder,
    publish_together,
)
from .labels import read_label_file

LABEL_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
MAX_VOXELS = 2_000_000_000  # refuse headers claiming more voxels than this before reading pixels

CONVENTIONS = {
    "dice_absent_from_both": 1.0,
    "dice_absent_from_one": 0.0,
    "hd95": "symmetric 95th-percentile Hausdorff distance in mm: max of the two directed 95th "
    "percentiles of distances between 6-connected surface voxels, in physical spacing; null "
    "(not defined) when the class is absent from the prediction, the reference or both",
    "volume_diff": "prediction minus reference in ml; relative = difference / reference volume, "
    "null when the reference is empty",
    "means": "per class over all cases (Dice, volumes) and over cases with a defined HD95 (HD95)",
}
CSV_COLUMNS = (
    "case", "label", "value", "dice", "hd95_mm", "volume_pred_ml", "volume_ref_ml",
    "volume_diff_ml", "volume_diff_rel", "note",
)  # fmt: skip


# --- metrics on arrays ------------------------------------------------------------------------


def dice_score(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks of one shape; 1.0 when both are empty."""
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & ref)) / total


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a 6-connected neighbour outside it (array border = outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float | None:
    """Symmetric HD95 in mm between two boolean masks; ``None`` if either is empty.

    ``pred``/``ref``: boolean arrays of one shape (e.g. Z x Y x X as SimpleITK returns them);
    ``spacing``: mm per voxel in the **same axis order** as the arrays.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"Masks differ in shape: {pred.shape} vs {ref.shape}.")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing has {len(spacing)} values for a {pred.ndim}-D array.")
    if not pred.any() or not ref.any():
        return None
    # Crop to the union's box plus a zero margin: all surface voxels lie inside it, and a zero
    # margin is what the erosion sees at the image border anyway.
    box = _bounding_box(pred | ref)
    p = np.pad(pred[box], 1)
    r = np.pad(ref[box], 1)
    sp, sr = _surface(p), _surface(r)
    sampling = [float(v) for v in spacing]
    to_ref = ndimage.distance_transform_edt(~sr, sampling=sampling)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=sampling)[sr]
    return float(max(np.percentile(to_ref, 95), np.percentile(to_pred, 95)))


def evaluate_arrays(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    labels: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Per-class rows for one pair of label maps.

    ``pred``/``ref``: integer label maps of one shape (Z x Y x X from SimpleITK, or any N-D);
    ``spacing``: mm per voxel in the same axis order as the arrays (reverse SimpleITK's
    ``GetSpacing()`` for arrays from ``GetArrayFromImage``). ``labels``: name -> value; without
    it every non-zero value present is scored as ``label_<v>``. Each row holds ``label``,
    ``value``, ``dice``, ``hd95_mm``, ``volume_pred_ml``, ``volume_ref_ml``, ``volume_diff_ml``,
    ``volume_diff_rel`` and ``note`` (the module docstring gives the conventions).
    """
    if pred.shape != ref.shape:
        raise ValueError(f"Label maps differ in shape: {pred.shape} vs {ref.shape}.")
    if labels is None:
        labels = default_labels(np.union1d(_present_values(pred), _present_values(ref)))
    voxel_ml = float(np.prod([float(v) for v in spacing])) / 1000.0
    rows = []
    for name, value in sorted(labels.items(), key=lambda item: item[1]):
        if value != 0:
            p, r = pred == value, ref == value
            vp, vr = np.count_nonzero(p) * voxel_ml, np.count_nonzero(r) * voxel_ml
            rows.append(_row(name, value, vp, vr, dice_score(p, r), hd95(p, r, spacing)))
    return rows


def _row(name: str, value: int, vp: float, vr: float, dice: float, hd: float | None) -> dict:
    """One class's row from its volumes (ml), Dice and HD95, with the convention's note."""
    note = None
    if vp == 0 and vr == 0:
        note = "absent from prediction and reference: Dice 1 by convention, HD95 not defined"
    elif vp == 0 or vr == 0:
        note = f"absent from {'prediction' if vp == 0 else 'reference'}: Dice 0, HD95 not defined"
    return {
        "label": name, "value": int(value), "dice": float(dice), "hd95_mm": hd,
        "volume_pred_ml": float(vp), "volume_ref_ml": float(vr), "volume_diff_ml": float(vp - vr),
        "volume_diff_rel": float((vp - vr) / vr) if vr > 0 else None, "note": note,
    }  # fmt: skip


# --- labels -----------------------------------------------------------------------------------


def _present_values(array: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a label map (a histogram for small unsigned types: fast)."""
    if array.dtype.kind == "u" and array.dtype.itemsize <= 2:
        return np.flatnonzero(np.bincount(array.ravel()))
    return np.unique(array)


def default_labels(values: Sequence[int] | np.ndarray) -> dict[str, int]:
    """``{"label_<v>": v}`` for every non-zero value."""
    return {f"label_{int(v)}": int(v) for v in sorted({int(v) for v in values}) if v != 0}


# --- files ------------------------------------------------------------------------------------


def _read_header(path: Path) -> sitk.ImageFileReader:
    if not path.is_file():
        raise MaskSAMError(f"{path} does not exist; check the path.")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise MaskSAMError(f"{path} is not a readable image (NIfTI, NRRD or MHA).") from None
    if reader.GetNumberOfComponents() != 1 or reader.GetDimension() not in (2, 3):
        raise MaskSAMError(
            f"{path} is not a single-component 2D/3D label map; export one label map per case."
        )
    if int(np.prod(reader.GetSize(), dtype=np.float64)) > MAX_VOXELS:
        raise MaskSAMError(f"{path} claims an absurd size {reader.GetSize()}; is it corrupt?")
    return reader


def _header_grid(reader: sitk.ImageFileReader) -> Geometry:
    """The grid a header describes (a 2D label map as a one-slice grid)."""
    size, spacing = reader.GetSize(), reader.GetSpacing()
    origin, d = reader.GetOrigin(), reader.GetDirection()
    if reader.GetDimension() == 2:
        size, spacing, origin = (*size, 1), (*spacing, 1.0), (*origin, 0.0)
        d = (d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0)
    try:
        return Geometry(size, spacing, origin, d)
    except ValueError as exc:
        raise MaskSAMError(f"{reader.GetFileName()} has an invalid grid ({exc}).") from None


def _check_same_grid(pred: sitk.ImageFileReader, ref: sitk.ImageFileReader) -> None:
    """Refuse (MaskSAMError) prediction/reference headers that do not describe one grid."""
    if pred.GetDimension() != ref.GetDimension():
        problems = [f"size {pred.GetSize()} vs {ref.GetSize()}"]
    else:
        problems = _header_grid(pred).differences(_header_grid(ref))
    if problems:
        raise MaskSAMError(
            f"Prediction {pred.GetFileName()} and reference {ref.GetFileName()} differ in "
            f"{problems[0]}; evaluation never resamples: produce the prediction on the "
            "reference's grid."
        )


def _read_labels(reader: sitk.ImageFileReader) -> np.ndarray:
    path = reader.GetFileName()
    problem = incomplete_nifti(Path(path))  # ITK would zero-fill the missing voxels
    if problem:
        raise MaskSAMError(f"{path} is truncated or corrupt ({problem}); export it again.")
    try:
        array = sitk.GetArrayFromImage(reader.Execute())
    except RuntimeError:
        raise MaskSAMError(f"{path} could not be read; is it corrupt?") from None
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise MaskSAMError(f"{path} holds non-integer values; it is not a label map.")
        array = array.astype(np.int64)
    return array


def _evaluate_pair(
    pred_path: Path, ref_path: Path, labels: Mapping[str, int] | None, case: str
) -> tuple[dict[str, Any], list[str]]:
    pred_reader, ref_reader = _read_header(pred_path), _read_header(ref_path)
    _check_same_grid(pred_reader, ref_reader)
    pred, ref = _read_labels(pred_reader), _read_labels(ref_reader)
    spacing = tuple(float(v) for v in ref_reader.GetSpacing())
    warnings = []
    if labels is not None:
        declared = set(labels.values()) | {0}
        for which, array in (("prediction", pred), ("reference", ref)):
            extra = sorted(int(v) for v in _present_values(array) if int(v) not in declared)
            if extra:
                warnings.append(f"{case}: {which} holds undeclared values {extra} (not scored)")
    rows = evaluate_arrays(pred, ref, spacing[::-1], labels)
    entry = {
        "case": case,
        "prediction": str(pred_path),
        "reference": str(ref_path),
        "spacing_mm": list(spacing),
        "classes": rows,
    }
    return entry, warnings


def _index_folder(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise MaskSAMError(f"The {what} folder {folder} does not exist.")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.name.lower().endswith(LABEL_EXTENSIONS) or path.name.startswith(".") \
                or not path.is_file():
            continue
        cid = case_id(path)
        if cid in found:
            raise MaskSAMError(
                f"Case {cid!r} appears twice in {folder} ({found[cid].name}, {path.name}); "
                "keep one file per case."
            )
        found[cid] = path
    return found


def evaluate_files(
    pred_path: str | os.PathLike,
    ref_path: str | os.PathLike,
    labels: str | os.PathLike | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate one prediction file against one reference file -> report (one case)."""
    pred, ref = Path(pred_path), Path(ref_path)
    names = None if labels is None else read_label_file(labels).labels
    entry, warnings = _evaluate_pair(pred, ref, names, case_id(ref))
    return _report([entry], names, pred, ref, warnings, {})


def evaluate_folders(
    pred_dir: str | os.PathLike,
    ref_dir: str | os.PathLike,
    labels: str | os.PathLike | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate every case present in both folders (paired by case id) -> report.

    Files pair by name without extension, whatever their type (``a.nii.gz`` with ``a.nrrd``).
    Unpaired files are listed in the report's ``unpaired``; no pair at all is an error.
    """
    pred_root, ref_root = Path(pred_dir), Path(ref_dir)
    preds, refs = _index_folder(pred_root, "prediction"), _index_folder(ref_root, "reference")
    common = sorted(set(preds) & set(refs))
    if not common:
        raise MaskSAMError(
            f"No case in {pred_root} matches one in {ref_root}; files pair by name without "
            "extension (case01.nii.gz with case01.nrrd)."
        )
    names = None if labels is None else read_label_file(labels).labels
    entries, warnings = [], []
    for cid in common:
        entry, notes = _evaluate_pair(preds[cid], refs[cid], names, cid)
        entries.append(entry)
        warnings.extend(notes)
    unpaired = {
        "prediction_only": sorted(set(preds) - set(refs)),
        "reference_only": sorted(set(refs) - set(preds)),
    }
    return _report(entries, names, pred_root, ref_root, warnings, unpaired)


def evaluate_paths(
    pred: str | os.PathLike,
    ref: str | os.PathLike,
    labels: str | os.PathLike | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Two files -> :func:`evaluate_files`; two folders -> :func:`evaluate_folders`."""
    p, r = Path(pred), Path(ref)
    if p.is_dir() and r.is_dir():
        return evaluate_folders(p, r, labels)
    if p.is_dir() or r.is_dir():
        raise MaskSAMError("Pass two label files or two folders, not one of each.")
    return evaluate_files(p, r, labels)


# --- reports ----------------------------------------------------------------------------------


def _report(
    entries: list[dict[str, Any]],
    labels: Mapping[str, int] | None,
    pred: Path,
    ref: Path,
    warnings: list[str],
    unpaired: dict[str, list[str]],
) -> dict[str, Any]:
    if labels is None:  # one label set for all cases: the union of values found anywhere
        labels = default_labels([row["value"] for e in entries for row in e["classes"]])
    scored = {n: v for n, v in sorted(labels.items(), key=lambda item: item[1]) if v != 0}
    for entry in entries:
        have = {row["value"]: row for row in entry["classes"]}
        entry["classes"] = [
            have.get(v) or _row(n, v, 0.0, 0.0, 1.0, None) for n, v in scored.items()
        ]
    means = []
    for name, value in scored.items():
        rows = [row for e in entries for row in e["classes"] if row["value"] == value]

        def mean(key: str, rows: list[dict[str, Any]] = rows) -> float | None:
            values = [row[key] for row in rows if row[key] is not None]
            return float(np.mean(values)) if values else None

        means.append({
            "label": name, "value": value, "cases": len(rows), "dice": mean("dice"),
            "dice_std": float(np.std([row["dice"] for row in rows])), "hd95_mm": mean("hd95_mm"),
            "hd95_cases": sum(row["hd95_mm"] is not None for row in rows),
            **{key: mean(key) for key in CSV_COLUMNS[5:9]},  # volumes: pred, ref, diff, rel
        })  # fmt: skip
    return {
        "format_version": 1,
        "software": f"MaskSAMLib {__version__}",
        "prediction": str(pred),
        "reference": str(ref),
        "labels": {"background": 0, **scored},
        "conventions": dict(CONVENTIONS),
        "cases": entries,
        "mean": means,
        "mean_foreground_dice": float(np.mean([m["dice"] for m in means])) if means else None,
        "unpaired": {"prediction_only": [], "reference_only": [], **unpaired},
        "warnings": warnings,
    }


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def report_csv(report: Mapping[str, Any]) -> str:
    """CSV text: one row per case and class, then one ``mean`` row per class."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for entry in report["cases"]:
        for row in entry["classes"]:
            writer.writerow([_cell(entry["case"])] + [_cell(row[c]) for c in CSV_COLUMNS[1:]])
    for row in report["mean"]:
        note = f"mean over {row['cases']} cases; HD95 over {row['hd95_cases']}"
        writer.writerow(["mean"] + [_cell(row[c]) for c in CSV_COLUMNS[1:-1]] + [note])
    return out.getvalue()


def plan_report(
    out: str | os.PathLike, inputs: Sequence[str | os.PathLike] = ()
) -> tuple[Path, Path]:
    """The report's two files (JSON and CSV) for ``--out NAME.json`` or ``NAME.csv``, checked
    before any work: neither may be an input (a prediction or reference), and an existing file
    is replaced only when it is an earlier MaskSAM report (never a user's file)."""
    out = Path(out)
    check_output_path(out, inputs=list(inputs), overwrite=True, role="report")
    lower = out.name.lower()
    if lower.endswith(".json"):
        json_file, csv_file = out, out.with_name(out.name[:-5] + ".csv")
    elif lower.endswith(".csv"):
        json_file, csv_file = out.with_name(out.name[:-4] + ".json"), out
    else:
        raise MaskSAMError(f"--out {out}: name the report NAME.json or NAME.csv (both are "
                           "written, side by side).")
    if not out.parent.is_dir():
        raise MaskSAMError(f"Cannot write {out}: the folder {out.parent} does not exist.")
    for path, role in ((json_file, "JSON report"), (csv_file, "CSV report")):
        check_output_path(path, inputs=list(inputs), overwrite=True, role=role)
    check_writable_folder(out.parent)
    return json_file, csv_file


def write_report(
    report: Mapping[str, Any],
    json_path: str | os.PathLike,
    csv_path: str | os.PathLike | None = None,
    *,
    inputs: Sequence[str | os.PathLike] = (),
) -> tuple[Path, Path]:
    """Write the report as JSON and CSV (default: the JSON path with ``.csv``) as one set.

    Checked as :func:`plan_report` does; both files are published together.
    """
    json_file, csv_file = plan_report(json_path, inputs)
    if csv_path is not None:
        csv_file = Path(csv_path)
        check_output_path(csv_file, inputs=list(inputs), overwrite=True, role="CSV report")
    with publish_together():
        atomic_write_text(json_file, json.dumps(report, indent=2, allow_nan=False) + "\n")
        atomic_write_text(csv_file, report_csv(report))
    return json_file, csv_file


def format_table(report: Mapping[str, Any]) -> str:
    """A plain-text table for the terminal: per class for one case, class means for several."""
    cases = report["cases"]
    single = len(cases) == 1
    rows = cases[0]["classes"] if single else report["mean"]
    title = f"case {cases[0]['case']}" if single else f"mean over {len(cases)} cases"
    head = f"{'class':<20} {'value':>5} {'Dice':>7} {'HD95 mm':>9} {'pred ml':>10} {'ref ml':>10}"
    head += f" {'diff ml':>9} {'diff %':>7}" + ("" if single else f" {'HD95 n':>6}")
    lines = [f"Evaluation, {title}", head, "-" * len(head)]
    undefined = False
    for row in rows:
        hd = "n/a" if row["hd95_mm"] is None else f"{row['hd95_mm']:.2f}"
        undefined |= row["hd95_mm"] is None
        rel = "n/a" if row["volume_diff_rel"] is None else f"{100 * row['volume_diff_rel']:+.1f}"
        line = (
            f"{row['label'][:20]:<20} {row['value']:>5} {row['dice']:>7.3f} {hd:>9} "
            f"{row['volume_pred_ml']:>10.2f} {row['volume_ref_ml']:>10.2f} "
            f"{row['volume_diff_ml']:>+9.2f} {rel:>7}"
        )
        if not single:
            line += f" {row['hd95_cases']:>3}/{row['cases']:<2}"
        lines.append(line)
    if report.get("mean_foreground_dice") is not None:
        lines.append(f"Mean foreground Dice: {report['mean_foreground_dice']:.3f}")
    if undefined:
        lines.append(
            "HD95 n/a: the class is absent from the prediction or the reference "
            "(not defined); Dice is 1 when absent from both, 0 when absent from one."
        )
    unpaired = report.get("unpaired", {})
    for key, what in (("prediction_only", "prediction"), ("reference_only", "reference")):
        if unpaired.get(key):
            lines.append(f"Only in the {what} folder (not evaluated): {', '.join(unpaired[key])}")
    lines.extend(f"Warning: {w}" for w in report.get("warnings", []))
    return "\n".join(lines)
