"""Training from inside Slicer: scene cases -> nnU-Net dataset -> child ``masksam train``.

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

``TrainingLogic`` builds and runs ``PythonSlicer -m MaskSAMLib train DATASET --out MODEL
(--backbone B [--sam-checkpoint F] | --init MODEL) ... --progress json`` in a child process;
Stop writes ``MODEL/STOP`` (the trainer saves a checkpoint and exits), then escalates; loss and
validation Dice go into table nodes that a plot chart shows.

Uses MRML and ``slicer.util``; no qt, no application object, no torch.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import volumeIO
from .errors import InputError, ModelError, TrainingCaseError
from .modelRegistry import ModelInfo, ModelRegistry, readModelDir
from .process import ProcessRunner, childEnvironment, masksamCommand, pythonExecutable
from .segmentationLogic import deviceValue, registerSegmentationConverterRules

MANIFEST_FILE = "masksam-cases.json"
MANIFEST_VERSION = 1
FILE_ENDING = ".nrrd"
BACKBONES = ("litemedsam", "vit_b", "vit_l", "vit_h", "tiny")
STOP_FILE = "STOP"


def normalizeClassName(name: str) -> str:
    """``"Kidney Left"``, ``"kidney-left"`` and ``"kidney_left"`` all match."""
    return re.sub(r"[\s_\-]+", "_", str(name).strip().lower()).strip("_")


def _atomicWriteText(path: Path, text: str) -> None:
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
        _atomicWriteText(self.manifestPath, json.dumps(self._manifest, indent=2) + "\n")
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
        _atomicWriteText(path, json.dumps(data, indent=2) + "\n")
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


def canResume(outputDir: str | os.PathLike) -> bool:
    """A stopped (or killed) run left a checkpoint that ``--resume`` continues."""
    return (Path(outputDir) / "training" / "checkpoint.pt").is_file()


def datasetLabels(datasetDir: str | os.PathLike) -> dict[str, int]:
    """The ``labels`` of an nnU-Net (or MSD) dataset folder, checked lightly."""
    path = Path(datasetDir) / "dataset.json"
    if not path.is_file():
        raise TrainingCaseError(
            f"{datasetDir} has no dataset.json; choose an nnU-Net dataset folder or add cases "
            "from the scene."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainingCaseError(f"{path} is not valid JSON ({exc}).") from exc
    raw = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise TrainingCaseError(f"{path} declares no labels.")
    labels = {}
    for key, value in raw.items():
        if isinstance(value, str) and str(key).isdigit():  # MSD form {"1": "liver"}
            labels[value] = int(key)
        elif isinstance(value, int):
            labels[str(key)] = value
        else:
            raise TrainingCaseError(
                f"{path}: label {key!r} is not a plain integer class (region-based labels are "
                "not supported)."
            )
    return labels


@dataclass
class TrainingCurves:
    """Loss per iteration and validation Dice per iteration, as reported by the child."""

    loss: list[tuple[int, float]] = field(default_factory=list)
    dice: list[tuple[int, float]] = field(default_factory=list)

    @staticmethod
    def _meanDice(value: Any) -> float | None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, dict):
            numbers = [float(v) for v in value.values()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)]
            return sum(numbers) / len(numbers) if numbers else None
        return None

    def update(self, event: dict[str, Any]) -> bool:
        """Record ``loss`` / ``dice`` of a progress or metric event; True when one was added.

        (The ``done`` event repeats the last loss; it is not a new point.)
        """
        if event.get("event") not in ("progress", "metric"):
            return False
        iteration = event.get("iteration", event.get("done"))
        if not isinstance(iteration, (int, float)):
            iteration = (self.loss[-1][0] + 1) if self.loss else 0
        changed = False
        loss = event.get("loss")
        if isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss):
            self.loss.append((int(iteration), float(loss)))
            changed = True
        dice = self._meanDice(event.get("mean_dice"))
        if dice is None:
            dice = self._meanDice(event.get("dice"))
        if dice is not None and math.isfinite(dice):
            self.dice.append((int(iteration), dice))
            changed = True
        return changed


@dataclass
class TrainingJob:
    datasetDir: Path
    outputDir: Path
    runner: ProcessRunner
    curves: TrainingCurves
    resume: bool = False


class TrainingLogic:
    """Build, run and stop ``masksam train``; register the new model when it finishes."""

    def __init__(self, scene=None, *, python: str | None = None,
                 environment: dict[str, str] | None = None) -> None:
        self._scene = scene
        self.python = python or pythonExecutable()
        self.environment = environment
        self.stopGraceS = 180.0  # saving a checkpoint of a big model takes a while
        self.lossTableNode = None
        self.diceTableNode = None
        self.chartNode = None

    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        import slicer

        return slicer.mrmlScene

    # ------------------------------------------------------------------ checks
    @staticmethod
    def checkDataset(datasetDir: str | os.PathLike, *, initModel: ModelInfo | None = None
                     ) -> dict[str, int]:
        """Cases exist and, when fine-tuning, no class of the base model is missing."""
        labels = datasetLabels(datasetDir)
        folder = Path(datasetDir)
        manifest = folder / MANIFEST_FILE
        if manifest.is_file():
            count = len(json.loads(manifest.read_text(encoding="utf-8")).get("cases", []))
        else:
            labelsDir = folder / "labelsTr"
            count = sum(1 for p in labelsDir.iterdir()
                        if p.is_file() and not p.name.startswith(".")) if labelsDir.is_dir() else 0
            data = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
            count = max(count, len(data.get("training") or []))
        if count == 0:
            raise TrainingCaseError(
                f"There are no training cases yet in {folder}; add volume + segmentation pairs "
                "from the scene (or choose an nnU-Net dataset folder with labelled cases)."
            )
        if initModel is not None:
            have = {normalizeClassName(n) for n in labels}
            missing = [n for n in initModel.classNames() if normalizeClassName(n) not in have]
            if missing:
                raise TrainingCaseError(
                    f"The base model '{initModel.name}' has classes the training cases lack "
                    f"({', '.join(missing)}); fine-tuning cannot remove classes. Add them to the "
                    "cases or start from a backbone."
                )
        return labels

    def buildCommand(
        self,
        datasetDir: str | os.PathLike,
        outputDir: str | os.PathLike,
        *,
        backbone: str | None = None,
        samCheckpoint: str | None = None,
        initModel: ModelInfo | str | None = None,
        iterations: int | None = None,
        batchSize: int | None = None,
        learningRate: float | None = None,
        device: str = "Auto",
        resume: bool = False,
        valFraction: float | None = None,
    ) -> list[str]:
        args = [str(datasetDir), "--out", str(outputDir)]
        if initModel is not None:
            path = initModel.path if isinstance(initModel, ModelInfo) else initModel
            args += ["--init", str(path)]
        elif backbone is not None:
            if backbone not in BACKBONES:
                raise InputError(f"Unknown backbone '{backbone}'; choose one of {BACKBONES}.")
            args += ["--backbone", backbone]
            if backbone.startswith("vit_"):
                if not samCheckpoint or not Path(samCheckpoint).is_file():
                    raise InputError(
                        f"The {backbone} backbone needs Meta's SAM checkpoint file "
                        f"(sam_{backbone}_*.pth); choose it with 'SAM checkpoint'."
                    )
                args += ["--sam-checkpoint", str(samCheckpoint)]
        elif not resume:
            raise InputError("Choose a base model: LiteMedSAM, a SAM checkpoint or a model.")
        if iterations is not None:
            if int(iterations) < 1:
                raise InputError("Iterations must be at least 1.")
            args += ["--iterations", str(int(iterations))]
        if batchSize is not None:
            if int(batchSize) < 1:
                raise InputError("The batch size must be at least 1.")
            args += ["--batch-size", str(int(batchSize))]
        if learningRate is not None:
            if not (0 < float(learningRate) < 1):
                raise InputError("The learning rate must be between 0 and 1 (e.g. 0.0001).")
            args += ["--lr", repr(float(learningRate))]
        if valFraction is not None:
            if not 0 <= float(valFraction) < 1:
                raise InputError("The validation fraction must be between 0 and 1.")
            args += ["--val-fraction", repr(float(valFraction))]
        args += ["--device", deviceValue(device)]
        if resume:
            args.append("--resume")
        return masksamCommand("train", *args, python=self.python)

    # ------------------------------------------------------------------ run
    def startTraining(
        self,
        datasetDir: str | os.PathLike,
        outputDir: str | os.PathLike,
        *,
        onEvent: Callable[[dict[str, Any]], None] | None = None,
        resume: bool = False,
        **options: Any,
    ) -> TrainingJob:
        """Validate, then start the child (non-blocking). ``options`` as in buildCommand."""
        initModel = options.get("initModel")
        if isinstance(initModel, (str, Path)):
            initModel = readModelDir(initModel)
            options["initModel"] = initModel
        elif isinstance(initModel, ModelInfo):
            initModel = readModelDir(initModel.path)
        self.checkDataset(datasetDir, initModel=initModel)
        outputDir = Path(outputDir)
        if resume and not canResume(outputDir):
            raise InputError(f"There is no stopped run in {outputDir} to resume; start a new one.")
        if not resume and outputDir.exists() and any(outputDir.iterdir()):
            raise InputError(
                f"{outputDir} already exists; choose another model name or Resume that run."
            )
        args = self.buildCommand(datasetDir, outputDir, resume=resume, **options)
        env = childEnvironment(forceCpu=deviceValue(options.get("device", "Auto")) == "cpu",
                               base=self.environment)
        curves = TrainingCurves()

        def handle(event: dict[str, Any]) -> None:
            if curves.update(event):
                self.updateCurveTables(curves)
            if onEvent is not None:
                onEvent(event)

        runner = ProcessRunner(args, env=env, stopFile=outputDir / STOP_FILE,
                               stopGraceS=self.stopGraceS, terminateGraceS=30.0, onEvent=handle)
        runner.start()
        return TrainingJob(Path(datasetDir), outputDir, runner, curves, resume)

    def stop(self, job: TrainingJob) -> None:
        """Stop button: STOP file (checkpoint saved), then SIGTERM, then kill (non-blocking)."""
        job.runner.cancel()

    def finishTraining(self, job: TrainingJob, registry: ModelRegistry | None = None) -> ModelInfo:
        """After a successful exit: check the model folder and register it."""
        if job.runner.wasCancelled():
            raise TrainingCaseError(
                "Training was stopped; a checkpoint was kept, use Resume to continue."
            )
        if job.runner.returnCode != 0:
            raise ModelError(job.runner.failureMessage())
        stop = job.outputDir / STOP_FILE
        if stop.exists():
            stop.unlink()
        self.applyCaseStyles(job.datasetDir, job.outputDir)
        if registry is not None:
            return registry.addModelDir(job.outputDir)
        return readModelDir(job.outputDir)

    @staticmethod
    def applyCaseStyles(datasetDir: str | os.PathLike, modelDir: str | os.PathLike) -> bool:
        """Give a trained model the colours and terminology of its scene training cases.

        ``config.json`` is rewritten atomically with only the labels' ``color`` and
        ``terminology`` changed; a dataset folder without the case manifest (an nnU-Net
        folder chosen by the user) changes nothing. Returns True when the file was rewritten.
        """
        manifest = Path(datasetDir) / MANIFEST_FILE
        configPath = Path(modelDir) / "config.json"
        if not manifest.is_file() or not configPath.is_file():
            return False
        try:
            styles = json.loads(manifest.read_text(encoding="utf-8")).get("classStyles") or {}
            config = json.loads(configPath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return False
        labels = config.get("labels") if isinstance(config, dict) else None
        if not styles or not isinstance(labels, list):
            return False
        updated = applyClassStyles(labels, styles)
        if updated == labels:
            return False
        config["labels"] = updated
        _atomicWriteText(configPath, json.dumps(config, indent=2) + "\n")
        return True

    # ------------------------------------------------------------------ curves
    def createCurveNodes(self):
        """Two tables (loss, Dice) and a chart showing them; returns the chart node."""
        scene = self.scene
        chart = self.chartNode
        if chart is not None and scene.GetNodeByID(chart.GetID()) is chart:
            return self.chartNode
        self.lossTableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", "MaskSAM training loss")
        self.diceTableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", "MaskSAM validation Dice")
        for table, column in ((self.lossTableNode, "loss"), (self.diceTableNode, "dice")):
            for name in ("iteration", column):
                array = table.AddColumn()
                array.SetName(name)
            table.SetColumnType("iteration", 6)  # VTK_INT
            table.SetColumnType(column, 11)  # VTK_DOUBLE
        self.chartNode = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "MaskSAM training")
        self.chartNode.SetTitle("Training")
        self.chartNode.SetXAxisTitle("iteration")
        self.chartNode.SetYAxisTitle("loss / Dice")
        for table, column, color in ((self.lossTableNode, "loss", (0.85, 0.3, 0.2)),
                                     (self.diceTableNode, "dice", (0.2, 0.5, 0.9))):
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"MaskSAM {column}")
            series.SetAndObserveTableNodeID(table.GetID())
            series.SetXColumnName("iteration")
            series.SetYColumnName(column)
            series.SetPlotType(series.PlotTypeScatter)
            series.SetColor(*color)
            self.chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
        return self.chartNode

    def createPlotViewNode(self, ownerNode):
        """A plot view node for the Train tab's own plot widget.

        Its parent layout node is ``ownerNode`` (the module's parameter node): a view node
        without one is taken over by the main layout, which then builds a hidden extra plot
        widget for it. It is not saved with the scene (it only serves this panel).
        """
        import slicer

        viewNode = slicer.vtkMRMLPlotViewNode()
        viewNode.SetName("MaskSAM training plot view")
        viewNode.SetLayoutName("MaskSAMTrainingPlot")
        viewNode.SetSaveWithScene(False)
        if ownerNode is not None:
            viewNode.SetAndObserveParentLayoutNodeID(ownerNode.GetID())
        viewNode = self.scene.AddNode(viewNode)
        if self.chartNode is not None:
            viewNode.SetPlotChartNodeID(self.chartNode.GetID())
        return viewNode

    def updateCurveTables(self, curves: TrainingCurves) -> None:
        """Mirror the curves into the table nodes (no-op when they were not created)."""
        for table, points in ((self.lossTableNode, curves.loss), (self.diceTableNode, curves.dice)):
            if table is None:
                continue
            vtkTable = table.GetTable()
            have = vtkTable.GetNumberOfRows()
            if len(points) < have:
                vtkTable.SetNumberOfRows(0)
                have = 0
            for iteration, value in points[have:]:
                row = vtkTable.InsertNextBlankRow()
                vtkTable.SetValue(row, 0, int(iteration))
                vtkTable.SetValue(row, 1, float(value))
            vtkTable.Modified()
            table.Modified()
