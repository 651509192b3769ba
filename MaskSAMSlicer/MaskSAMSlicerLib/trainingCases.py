"""Training cases from the scene: volume + segmentation pairs kept as an nnU-Net dataset.

``TrainingCaseStore`` keeps the cases an annotator collected (volume + segmentation pairs, e.g.
auto-segmentations they corrected) in a working folder that survives Slicer sessions::

    FOLDER/dataset.json              nnU-Net v2: channel_names, labels, numTraining, file_ending
    FOLDER/imagesTr/case_0001_0000.nrrd
    FOLDER/labelsTr/case_0001.nrrd
    FOLDER/masksam-cases.json        manifest: label set, cases, where each came from

Each class also keeps the colour and terminology of the segment it came from (the latest case
added wins); when a model trained on these cases finishes, its ``config.json`` labels get them,
so its auto-segmentations look and mean what the annotator chose. A segment still carrying
Slicer's generic default terminology ("Tissue") does not replace the standard one that
MaskSAMLib gives a known structure.

Images are written with the volume's exact geometry and label maps on the very same grid
(NRRD keeps the geometry in doubles, so nothing is rounded). Segments are matched to classes by
name (case, spaces, '-' and '_' do not matter); a segment with a new name adds a class with the
next free value, unless new classes are not allowed, in which case the unmatched names are an
error that lists the known classes.

Uses MRML and ``slicer.util``; no qt, no application object, no torch.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from . import volumeIO
from .errors import TrainingCaseError
from .segmentationLogic import registerSegmentationConverterRules

MANIFEST_FILE = "masksam-cases.json"
MANIFEST_VERSION = 1
FILE_ENDING = ".nrrd"


def normalizeClassName(name: str) -> str:
    """``"Kidney Left"``, ``"kidney-left"`` and ``"kidney_left"`` all match."""
    return re.sub(r"[\s_\-]+", "_", str(name).strip().lower()).strip("_")


def atomicWriteText(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


#: Slicer's default for a new segment ("Tissue" / "Tissue"): says nothing about the class.
_GENERIC_TYPE_CODES = {"85756007"}


def isTerminologyEntry(text: Any) -> bool:
    """A Slicer terminology string: 7 '~' fields, category and type as 'SCHEME^VALUE^MEANING'."""
    if not isinstance(text, str) or not text:
        return False
    fields = text.split("~")
    if len(fields) != 7:
        return False
    codes = [fields[i].split("^") for i in (1, 2, 3, 5, 6)]
    if any(len(code) != 3 for code in codes):
        return False
    return all(codes[0]) and all(codes[1])


def isGenericTerminology(text: str | None) -> bool:
    """True for no terminology or Slicer's default "Tissue" type (nothing the user chose)."""
    if not isTerminologyEntry(text):
        return True
    return text.split("~")[2].split("^")[1] in _GENERIC_TYPE_CODES


def segmentStyle(segment) -> dict[str, Any]:
    """``{"color": [r, g, b] 0-255, "terminology": str | None}`` of a vtkSegment."""
    import slicer

    color = [int(round(max(0.0, min(1.0, float(c))) * 255)) for c in segment.GetColor()]
    if hasattr(segment, "GetTerminology"):
        terminology = segment.GetTerminology()
    else:  # vtkSegment.GetTerminology is new in Slicer 5.10
        import vtk

        tag = vtk.reference("")
        found = segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag)
        terminology = str(tag) if found else ""
    return {"color": color, "terminology": terminology if isTerminologyEntry(terminology)
            else None}


def applyClassStyles(labels: list[dict[str, Any]], styles: dict[str, dict[str, Any]]
                     ) -> list[dict[str, Any]]:
    """A model's labels with the annotator's colours and terminology (matched by name).

    The colour always comes from the case; the terminology too, unless the case's segment had
    none or only Slicer's generic default and the label already has one.
    """
    byKey = {normalizeClassName(name): style for name, style in styles.items()}
    result = []
    for lab in labels:
        lab = dict(lab)
        style = byKey.get(normalizeClassName(lab.get("name", "")))
        if style is not None and int(lab.get("value", 0)) != 0:
            color = style.get("color")
            if (isinstance(color, list) and len(color) == 3
                    and all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
                lab["color"] = list(color)
            terminology = style.get("terminology")
            if isTerminologyEntry(terminology) and not (
                    isGenericTerminology(terminology) and lab.get("terminology")):
                lab["terminology"] = terminology
        result.append(lab)
    return result


class TrainingCaseStore:
    """Training cases from the scene, persisted as an nnU-Net dataset in ``folder``."""

    def __init__(self, folder: str | os.PathLike, *, modality: str = "CT",
                 datasetName: str = "MaskSAMSlicerCases") -> None:
        self.folder = Path(folder).expanduser()
        self.modality = modality
        self.datasetName = datasetName
        self._manifest = self._load()

    # ------------------------------------------------------------------ persistence
    @property
    def manifestPath(self) -> Path:
        return self.folder / MANIFEST_FILE

    def _load(self) -> dict[str, Any]:
        empty = {
            "formatVersion": MANIFEST_VERSION,
            "labels": {"background": 0},
            "modality": self.modality,
            "fileEnding": FILE_ENDING,
            "cases": [],
            "classStyles": {},
        }
        if not self.manifestPath.is_file():
            return empty
        try:
            data = json.loads(self.manifestPath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TrainingCaseError(
                f"The case list {self.manifestPath} is damaged ({exc}); choose another working "
                "folder or delete the file."
            ) from exc
        if data.get("formatVersion") != MANIFEST_VERSION or not isinstance(data.get("cases"), list):
            raise TrainingCaseError(
                f"{self.manifestPath} was written by another version; choose a new working folder."
            )
        self.modality = data.get("modality", self.modality)
        return {**empty, **data}

    def _save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomicWriteText(self.manifestPath, json.dumps(self._manifest, indent=2) + "\n")
        self.writeDatasetJson()

    def writeDatasetJson(self) -> Path:
        """nnU-Net v2 ``dataset.json`` for the cases and label set of this store."""
        data = {
            "name": self.datasetName,
            "description": "Training cases exported from 3D Slicer by MaskSAMSlicer.",
            "channel_names": {"0": self.modality},
            "labels": self.labels(),
            "numTraining": len(self.cases()),
            "file_ending": FILE_ENDING,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "dataset.json"
        atomicWriteText(path, json.dumps(data, indent=2) + "\n")
        return path

    # ------------------------------------------------------------------ labels
    def labels(self) -> dict[str, int]:
        """``{name: value}`` ordered by value, background 0 first."""
        return dict(sorted(self._manifest["labels"].items(), key=lambda item: item[1]))

    def classNames(self) -> list[str]:
        return [name for name, value in self.labels().items() if value != 0]

    def classStyles(self) -> dict[str, dict[str, Any]]:
        """``{className: {"color": [r, g, b], "terminology": str | None}}`` from the cases."""
        styles = self._manifest.get("classStyles")
        return dict(styles) if isinstance(styles, dict) else {}

    def _lookupClass(self, segmentName: str) -> str | None:
        key = normalizeClassName(segmentName)
        for name in self._manifest["labels"]:
            if normalizeClassName(name) == key:
                return name
        return None

    def addClasses(self, labels: dict[str, int] | list[dict[str, Any]]) -> list[str]:
        """Merge a label set (e.g. a base model's) into the store; return the names added.

        A name already present with another value is an error (existing label maps would
        change meaning).
        """
        if isinstance(labels, list):
            labels = {str(lab["name"]): int(lab["value"]) for lab in labels}
        added = []
        current = self._manifest["labels"]
        for name, value in sorted(labels.items(), key=lambda item: item[1]):
            if value == 0:
                continue
            existing = self._lookupClass(name)
            if existing is not None:
                if current[existing] != value:
                    raise TrainingCaseError(
                        f"Class '{name}' has value {value} in the model but {current[existing]} in "
                        f"the training cases of {self.folder}; use a new working folder."
                    )
                continue
            if value in current.values():
                raise TrainingCaseError(
                    f"Value {value} is '{name}' in the model but another class in the training "
                    f"cases of {self.folder}; use a new working folder."
                )
            current[name] = int(value)
            added.append(name)
        if added:
            self._save()
        return added

    # ------------------------------------------------------------------ cases
    def cases(self) -> list[dict[str, Any]]:
        return list(self._manifest["cases"])

    def isEmpty(self) -> bool:
        return not self._manifest["cases"]

    def casePaths(self, caseId: str) -> tuple[Path, Path]:
        return (self.folder / "imagesTr" / f"{caseId}_0000{FILE_ENDING}",
                self.folder / "labelsTr" / f"{caseId}{FILE_ENDING}")

    def _nextCaseId(self) -> str:
        numbers = [int(m.group(1)) for c in self._manifest["cases"]
                   if (m := re.fullmatch(r"case_(\d+)", c["caseId"]))]
        return f"case_{(max(numbers) + 1 if numbers else 1):04d}"

    def matchSegments(self, segmentationNode, *, allowNewClasses: bool = True
                      ) -> tuple[list[tuple[str, str]], list[str]]:
        """``([(segmentId, className), ...], newClassNames)`` for a segmentation's segments."""
        segmentation = segmentationNode.GetSegmentation()
        count = segmentation.GetNumberOfSegments()
        if count == 0:
            raise TrainingCaseError(
                f"'{segmentationNode.GetName()}' has no segments; segment the volume first."
            )
        matched, newNames, unmatched, seen = [], [], [], {}
        for index in range(count):
            segmentId = segmentation.GetNthSegmentID(index)
            segmentName = segmentation.GetSegment(segmentId).GetName()
            if normalizeClassName(segmentName) == "background":
                continue
            className = self._lookupClass(segmentName)
            if className is None:
                pending = next((n for n in newNames
                                if normalizeClassName(n) == normalizeClassName(segmentName)), None)
                if pending is not None:
                    className = pending
                elif allowNewClasses:
                    className = segmentName.strip()
                    newNames.append(className)
                else:
                    unmatched.append(segmentName)
                    continue
            if className in seen:
                raise TrainingCaseError(
                    f"Segments '{seen[className]}' and '{segmentName}' of "
                    f"'{segmentationNode.GetName()}' both mean class '{className}'; merge or "
                    "rename one of them."
                )
            seen[className] = segmentName
            matched.append((segmentId, className))
        if unmatched:
            known = ", ".join(self.classNames()) or "none yet"
            raise TrainingCaseError(
                f"Segments {', '.join(repr(n) for n in unmatched)} of "
                f"'{segmentationNode.GetName()}' match no class (known classes: {known}); rename "
                "them to a class name or allow new classes."
            )
        if not matched:
            raise TrainingCaseError(
                f"'{segmentationNode.GetName()}' has no segment besides the background."
            )
        return matched, newNames

    def addCase(self, volumeNode, segmentationNode, *, allowNewClasses: bool = True,
                scene=None) -> dict[str, Any]:
        """Export one volume + segmentation pair; return its manifest entry.

        Adding the same volume/segmentation names again replaces that case (an annotator
        who corrected more adds it again). Files appear atomically; the manifest is written
        last, so a failure leaves the previous state.
        """
        import slicer
        import slicer.util
        import vtk

        volumeIO.checkScalarVolume(volumeNode, "training volume")
        if segmentationNode is None:
            raise TrainingCaseError("Select the segmentation that goes with the volume.")
        matched, newNames = self.matchSegments(segmentationNode, allowNewClasses=allowNewClasses)
        labels = dict(self._manifest["labels"])
        nextValue = max(labels.values()) + 1
        for name in newNames:
            labels[name] = nextValue
            nextValue += 1
        if max(labels.values()) > 65535:
            raise TrainingCaseError("Too many classes (label values above 65535).")

        existing = next((c for c in self._manifest["cases"]
                         if c["volumeName"] == volumeNode.GetName()
                         and c["segmentationName"] == segmentationNode.GetName()), None)
        caseId = existing["caseId"] if existing else self._nextCaseId()
        imagePath, labelPath = self.casePaths(caseId)

        registerSegmentationConverterRules()
        scene = scene or segmentationNode.GetScene()
        segmentIds = vtk.vtkStringArray()
        for segmentId, _ in matched:
            segmentIds.InsertNextValue(segmentId)
        labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__masksam_export__")
        try:
            # Static method: no module logic instance (its SetMRMLScene would register the
            # converter rules again on every Add case).
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentationNode, segmentIds, labelmapNode, volumeNode,
                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
            )
            if not ok:
                raise TrainingCaseError(
                    f"Slicer could not export '{segmentationNode.GetName()}' on the grid of "
                    f"'{volumeNode.GetName()}'."
                )
            positions = slicer.util.arrayFromVolume(labelmapNode)
            labelGeometry = volumeIO.volumeGeometry(labelmapNode)
        finally:
            scene.RemoveNode(labelmapNode)
        volumeGeometry = volumeIO.volumeGeometry(volumeNode)
        problems = labelGeometry.differences(volumeGeometry, relTol=1e-9)
        if problems:
            raise TrainingCaseError(
                f"The exported label map does not match the grid of '{volumeNode.GetName()}' "
                f"({'; '.join(problems)})."
            )
        lookup = np.zeros(len(matched) + 1, dtype=np.uint16)
        for index, (_, className) in enumerate(matched):
            lookup[index + 1] = labels[className]
        labelArray = lookup[positions.astype(np.int64)]
        present = sorted({className for index, (_, className) in enumerate(matched)
                          if np.any(positions == index + 1)})

        self.folder.mkdir(parents=True, exist_ok=True)
        tmpImage = imagePath.with_name(f".tmp-{imagePath.name}")
        tmpLabel = labelPath.with_name(f".tmp-{labelPath.name}")
        try:
            volumeIO.writeVolumeNode(volumeNode, tmpImage, compress=True)
            volumeIO.writeLabelArray(labelArray, volumeGeometry, tmpLabel, compress=True)
            os.replace(tmpImage, imagePath)
            os.replace(tmpLabel, labelPath)
        finally:
            for tmp in (tmpImage, tmpLabel):
                if tmp.exists():
                    tmp.unlink()
        entry = {
            "caseId": caseId,
            "volumeName": volumeNode.GetName(),
            "segmentationName": segmentationNode.GetName(),
            "classes": present,
            "added": _now(),
            "size": list(volumeGeometry.size),
            "spacing": list(volumeGeometry.spacing),
        }
        styles = self.classStyles()
        segmentation = segmentationNode.GetSegmentation()
        for segmentId, className in matched:
            style = segmentStyle(segmentation.GetSegment(segmentId))
            previous = styles.get(className, {})
            if isGenericTerminology(style["terminology"]) and not isGenericTerminology(
                    previous.get("terminology")):
                style["terminology"] = previous["terminology"]  # keep a real earlier choice
            styles[className] = style
        self._manifest["classStyles"] = styles
        self._manifest["labels"] = labels
        if existing:
            self._manifest["cases"] = [entry if c["caseId"] == caseId else c
                                       for c in self._manifest["cases"]]
        else:
            self._manifest["cases"].append(entry)
        self._save()
        return entry

    def missingClassesPerCase(self) -> dict[str, list[str]]:
        """Classes each case does not contain (treated as background there: worth a warning)."""
        names = self.classNames()
        return {c["caseId"]: [n for n in names if n not in c.get("classes", [])]
                for c in self._manifest["cases"]}

    def removeCase(self, caseId: str) -> None:
        if not any(c["caseId"] == caseId for c in self._manifest["cases"]):
            raise TrainingCaseError(f"There is no training case '{caseId}'.")
        for path in self.casePaths(caseId):
            if path.exists():
                path.unlink()
        self._manifest["cases"] = [c for c in self._manifest["cases"] if c["caseId"] != caseId]
        self._save()
