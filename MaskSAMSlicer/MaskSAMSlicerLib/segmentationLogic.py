"""Auto-segmentation: volume node -> child ``masksam segment`` -> segmentation node.

Flow (nothing in the scene changes until the child has succeeded):

1. the input volume (optionally cropped to a markups ROI) is written to a temporary NRRD with
   exact geometry (``volumeIO``);
2. ``PythonSlicer -m MaskSAMLib segment IN --model DIR --out OUT.nrrd --device D
   [--fast|--tta] --progress json`` runs as a child process (``process.ProcessRunner``);
3. the label map is read back, checked to lie on the written grid, pasted into the full volume
   grid when cropped, and imported as one segment per class with the model's name, colour and
   terminology, the input volume as reference geometry (DICOM SEG export needs it), the volume's
   parent transform, and closed surfaces for the 3D view.

The output is a new segmentation node by default. An existing node that holds segments is only
replaced when the caller says the user confirmed it (``replaceConfirmed=True``); otherwise
``ReplaceNotConfirmedError`` is raised before anything is touched.

Uses MRML and ``slicer.util``; no qt, no application object, no torch.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from MaskSAMLib.files import split_extension

from . import volumeIO
from .errors import (
    CancelledError,
    ChildFailedError,
    InputError,
    ModelError,
    ReplaceNotConfirmedError,
)
from .modelRegistry import ModelInfo, readModelDir
from .process import (
    ChildLogic,
    ProcessRunner,
    childEnvironment,
    masksamCommand,
    pythonExecutable,
)

#: Speed choices shown in the panel -> extra ``segment`` flags.
SPEED_FLAGS = {"Fast": ["--fast"], "Standard": [], "Accurate": ["--tta"]}
#: Device choices shown in the panel -> ``--device`` values.
DEVICE_VALUES = {"Auto": "auto", "CPU": "cpu", "CUDA": "cuda"}


def deviceValue(choice: str) -> str:
    """``"Auto"``/``"CPU"``/``"CUDA"`` (or a CLI value such as ``cuda:1``) -> ``--device``."""
    if choice in DEVICE_VALUES:
        return DEVICE_VALUES[choice]
    lowered = choice.strip().lower()
    if lowered in ("auto", "cpu", "mps") or lowered.startswith("cuda"):
        return lowered
    raise InputError(f"Unknown device '{choice}'; choose Auto, CPU or CUDA.")


def speedFlags(choice: str) -> list[str]:
    key = choice.split(" ")[0] if choice else "Standard"
    if key not in SPEED_FLAGS:
        raise InputError(f"Unknown speed '{choice}'; choose Fast, Standard or Accurate.")
    return list(SPEED_FLAGS[key])


def registerSegmentationConverterRules() -> None:
    """Register the four converter rules once (the Slicer app does this; slicer-core does not).

    Rules already registered (by the application, or by an earlier call) are not added again.
    The module never creates a ``vtkSlicerSegmentationsModuleLogic`` and gives it a scene: that
    registers all four rules again each time. It uses the class's static methods instead.
    """
    import slicer

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    try:
        known = {rule.GetClassName() for rule in factory.GetConverterRules()}
    except Exception:  # noqa: BLE001 - rule list not wrapped: the app has registered them
        return
    for rule in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
        slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
        slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule,
    ):
        if rule.__name__ not in known:
            factory.RegisterConverterRule(rule())


def setSegmentTerminology(segment, terminology: str) -> None:
    """Give a vtkSegment a terminology entry (``vtkSegment.SetTerminology`` is new in 5.10)."""
    import slicer

    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(str(terminology))
    else:
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), str(terminology))


@dataclass
class SegmentationJob:
    """One auto-segmentation run: what was written, the child, where the result will be."""

    volumeNode: Any
    model: ModelInfo
    device: str
    speed: str
    workDir: Path
    inputPath: Path
    outputPath: Path
    inputGeometry: volumeIO.Geometry
    ijkBox: Any
    runner: ProcessRunner
    startedAt: float = field(default_factory=time.monotonic)

    @property
    def gpuDescription(self) -> str:
        """Device reported by the child (``start`` event): ``cuda (NVIDIA H100, 80.0 GB)``."""
        event = self.runner.startEvent or {}
        device = event.get("device")
        name, memory = event.get("gpu_name"), event.get("gpu_memory_gb")
        if not device:
            return ""
        if name:
            extra = f"{name}, {float(memory):.1f} GB" if memory else str(name)
            return f"{device} ({extra})"
        return str(device)


@dataclass
class SegmentationResult:
    segmentationNode: Any
    summary: list[dict[str, Any]]
    warnings: list[str]
    elapsedS: float | None = None
    sidecar: dict[str, Any] | None = None  # what the CLI wrote next to the label map


def sidecarPath(labelPath: str | Path) -> Path:
    """Where ``masksam segment`` / ``prompt`` put the JSON of a label map: ``out/case.seg.nrrd``
    -> ``out/case.json`` (the rule of ``MaskSAMLib.inference.outputs.sidecar_path``, which lives
    in a module that imports torch)."""
    stem, _ = split_extension(labelPath)
    if stem.lower().endswith(".seg"):
        stem = stem[:-4]
    return Path(stem + ".json")


def readSidecar(labelPath: Path) -> dict[str, Any] | None:
    """The JSON ``masksam segment`` writes next to its label map (``labels.json``)."""
    path = sidecarPath(labelPath)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def describeSidecar(sidecar: dict[str, Any] | None) -> str:
    """``Device cpu; 15 windows; encoder 3.6 s, decoder 15.5 s, total 19.3 s``."""
    if not sidecar:
        return ""
    parts = []
    if sidecar.get("device"):
        parts.append(f"device {sidecar['device']}")
    if sidecar.get("windows"):
        parts.append(f"{sidecar['windows']} windows")
    timings = sidecar.get("timings_s")
    if isinstance(timings, dict):
        parts.append(", ".join(f"{k} {float(v):.1f} s" for k, v in timings.items()
                               if isinstance(v, (int, float)) and v >= 0.05))
    return "; ".join(p for p in parts if p)


class SegmentationLogic(ChildLogic):
    """Auto-segment volume nodes with a MaskSAM model in a child process.

    Args:
        scene: the MRML scene (default ``slicer.mrmlScene``).
        python: the interpreter for the child (default ``PythonSlicer`` or this Python).
        tempRoot: where temporary folders go (the widget passes ``slicer.app.temporaryPath``).
        environment: base environment for the child (default ``os.environ``).
    """

    def __init__(self, scene=None, *, python: str | None = None, tempRoot: str | None = None,
                 environment: dict[str, str] | None = None) -> None:
        super().__init__(scene, python=python, environment=environment)
        self.tempRoot = tempRoot
        self.keepTemporaryFiles = False

    # ------------------------------------------------------------------ checks
    @staticmethod
    def resolveModel(model: ModelInfo | str | Path) -> ModelInfo:
        if isinstance(model, ModelInfo):
            if not model.available:
                raise ModelError(
                    f"The model '{model.name}' is not on this computer yet; download it or add a "
                    "model folder."
                )
            return readModelDir(model.path, source=model.source)
        if model is None or str(model) == "":
            raise ModelError(
                "No model is selected. Train one from your own cases in the Train tab, or use "
                "'Add model...' to pick a MaskSAM model folder."
            )
        return readModelDir(model)

    @staticmethod
    def needsReplaceConfirmation(segmentationNode) -> bool:
        """True when writing into this node would discard segments the user has."""
        if segmentationNode is None:
            return False
        segmentation = segmentationNode.GetSegmentation()
        return segmentation is not None and segmentation.GetNumberOfSegments() > 0

    # ------------------------------------------------------------------ run
    def buildCommand(self, inputPath: Path, model: ModelInfo, outputPath: Path, device: str,
                     speed: str) -> list[str]:
        return masksamCommand(
            "segment", str(inputPath), "--model", str(model.path), "--out", str(outputPath),
            "--device", deviceValue(device), *speedFlags(speed), python=self.python,
        )

    def startSegmentation(
        self,
        volumeNode,
        model: ModelInfo | str | Path,
        *,
        device: str = "Auto",
        speed: str = "Standard",
        roiNode=None,
        outputSegmentationNode=None,
        replaceConfirmed: bool = False,
        onEvent: Callable[[dict[str, Any]], None] | None = None,
    ) -> SegmentationJob:
        """Check everything, write the input, start the child; return without waiting."""
        volumeIO.checkScalarVolume(volumeNode)
        modelInfo = self.resolveModel(model)
        deviceValue(device)
        speedFlags(speed)
        if self.needsReplaceConfirmation(outputSegmentationNode) and not replaceConfirmed:
            raise ReplaceNotConfirmedError(
                f"'{outputSegmentationNode.GetName()}' already holds segments; confirm that "
                "they may be replaced, or choose 'Create new segmentation'."
            )
        ijkBox = volumeIO.ijkBoxFromRoi(roiNode, volumeNode) if roiNode is not None else None
        workDir = Path(tempfile.mkdtemp(prefix="MaskSAMSlicer-segment-", dir=self.tempRoot))
        try:
            inputPath = workDir / "input.nrrd"
            outputPath = workDir / "labels.nrrd"
            geometry = volumeIO.writeVolumeNode(volumeNode, inputPath, ijkBox=ijkBox)
            args = self.buildCommand(inputPath, modelInfo, outputPath, device, speed)
            env = childEnvironment(forceCpu=deviceValue(device) == "cpu", base=self.environment)
            runner = ProcessRunner(args, env=env, cwd=workDir, terminateGraceS=5.0,
                                   onEvent=onEvent)
            runner.start()
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        return SegmentationJob(
            volumeNode=volumeNode, model=modelInfo, device=device, speed=speed, workDir=workDir,
            inputPath=inputPath, outputPath=outputPath, inputGeometry=geometry, ijkBox=ijkBox,
            runner=runner,
        )

    def cancel(self, job: SegmentationJob) -> None:
        """Ask the child to stop (non-blocking; keep polling until the exit event)."""
        job.runner.cancel()

    def finishSegmentation(
        self,
        job: SegmentationJob,
        *,
        outputSegmentationNode=None,
        replaceConfirmed: bool = False,
        createClosedSurface: bool = True,
    ) -> SegmentationResult:
        """After the child's exit: import the result (or raise why there is none); clean up."""
        try:
            if job.runner.isRunning():
                raise RuntimeError("finishSegmentation called while the child is still running")
            if job.runner.wasCancelled():
                raise CancelledError("Auto-segmentation was cancelled; nothing was changed.")
            if job.runner.returnCode != 0:
                raise ChildFailedError(job.runner.failureMessage(), job.runner.returnCode)
            if not self._inScene(job.volumeNode):
                raise InputError("The input volume was removed while it was being segmented.")
            if outputSegmentationNode is not None and not self._inScene(outputSegmentationNode):
                outputSegmentationNode = None
            array, geometry = volumeIO.readLabelMap(job.outputPath)
            problems = geometry.differences(job.inputGeometry)
            if problems:
                raise ChildFailedError(
                    "The label map does not lie on the input grid (" + "; ".join(problems)
                    + "); this is a MaskSAMLib bug, please report it."
                )
            if job.ijkBox is not None:
                full = np.zeros(tuple(reversed(volumeIO.volumeSize(job.volumeNode))), array.dtype)
                (i0, i1), (j0, j1), (k0, k1) = job.ijkBox
                full[k0:k1, j0:j1, i0:i1] = array
                array = full
            result = self.importLabelArray(
                array, job.volumeNode, job.model.labels,
                outputSegmentationNode=outputSegmentationNode, replaceConfirmed=replaceConfirmed,
                createClosedSurface=createClosedSurface,
                name=f"{job.volumeNode.GetName()} MaskSAM ({job.model.name})",
            )
            result.elapsedS = time.monotonic() - job.startedAt
            result.sidecar = readSidecar(job.outputPath)
            return result
        finally:
            if not self.keepTemporaryFiles:
                shutil.rmtree(job.workDir, ignore_errors=True)

    def segment(self, volumeNode, model, *, device: str = "Auto", speed: str = "Standard",
                roiNode=None, outputSegmentationNode=None, replaceConfirmed: bool = False,
                timeout: float | None = None, onEvent=None) -> SegmentationResult:
        """Blocking mode for scripts and tests: start, wait, import."""
        job = self.startSegmentation(
            volumeNode, model, device=device, speed=speed, roiNode=roiNode,
            outputSegmentationNode=outputSegmentationNode, replaceConfirmed=replaceConfirmed,
            onEvent=onEvent,
        )
        try:
            job.runner.wait(timeout=timeout)
        except TimeoutError:
            job.runner.cancelAndWait(timeout=30.0)
            shutil.rmtree(job.workDir, ignore_errors=True)
            raise
        return self.finishSegmentation(
            job, outputSegmentationNode=outputSegmentationNode, replaceConfirmed=replaceConfirmed
        )

    # ------------------------------------------------------------------ import
    def _inScene(self, node) -> bool:
        return node is not None and node.GetScene() is not None and (
            self.scene.GetNodeByID(node.GetID()) is node
        )

    def importLabelArray(
        self,
        labelArray: np.ndarray,
        referenceVolumeNode,
        labels: list[dict[str, Any]],
        *,
        outputSegmentationNode=None,
        replaceConfirmed: bool = False,
        createClosedSurface: bool = True,
        name: str | None = None,
    ) -> SegmentationResult:
        """A label map ``(z, y, x)`` on the reference volume's grid -> segments.

        One segment per class of ``labels`` (background excluded), in label order, with the
        class's name, colour and terminology. Values in the map that no label declares are
        left out and reported in ``warnings``.
        """
        import slicer
        import slicer.util
        import vtk

        scene = self.scene
        if self.needsReplaceConfirmation(outputSegmentationNode) and not replaceConfirmed:
            raise ReplaceNotConfirmedError(
                f"'{outputSegmentationNode.GetName()}' already holds segments; confirm that "
                "they may be replaced, or choose 'Create new segmentation'."
            )
        expectedShape = tuple(reversed(volumeIO.volumeSize(referenceVolumeNode)))
        if tuple(labelArray.shape) != expectedShape:
            raise InputError(
                f"The label map has {labelArray.shape} voxels but the volume has {expectedShape}."
            )
        classes = sorted((lab for lab in labels if int(lab["value"]) != 0),
                         key=lambda lab: int(lab["value"]))
        if not classes:
            raise ModelError("The model declares no class besides the background.")
        registerSegmentationConverterRules()
        warnings = []
        if labelArray.dtype.kind not in "ui" or (labelArray.size and labelArray.min() < 0):
            raise InputError("The label map holds negative or non-integer values.")
        present = np.flatnonzero(np.bincount(labelArray.ravel()))
        declared = {int(lab["value"]) for lab in classes}
        stray = [int(v) for v in present if v != 0 and int(v) not in declared]
        if stray:
            warnings.append(f"Label values {stray} are not classes of the model; left out.")
        # Consecutive values 1..K in class order, so segment IDs map one to one.
        lookup = np.zeros(max(int(present.max()) if present.size else 0,
                              max(declared)) + 1, dtype=np.uint16)
        for index, lab in enumerate(classes):
            lookup[int(lab["value"])] = index + 1
        consecutive = lookup[labelArray]
        consecutive = consecutive.astype(np.uint8 if len(classes) < 256 else np.uint16)

        newNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        labelmapNode = None
        try:
            newNode.SetName(scene.GenerateUniqueName(name or "MaskSAM segmentation"))
            newNode.CreateDefaultDisplayNodes()
            newNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
            segmentation = newNode.GetSegmentation()
            segmentIds = vtk.vtkStringArray()
            for lab in classes:
                color = [c / 255.0 for c in lab.get("color") or [128, 128, 128]]
                segmentId = segmentation.AddEmptySegment(str(lab["name"]), str(lab["name"]), color)
                segmentIds.InsertNextValue(segmentId)
                segment = segmentation.GetSegment(segmentId)
                if lab.get("terminology"):
                    setSegmentTerminology(segment, lab["terminology"])
            labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__masksam_tmp__")
            slicer.util.updateVolumeFromArray(labelmapNode, consecutive)
            labelmapNode.CopyOrientation(referenceVolumeNode)
            # The static method: a new vtkSlicerSegmentationsModuleLogic with SetMRMLScene
            # would register the four converter rules again on every Apply.
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                    labelmapNode, newNode, segmentIds):
                raise InputError("Slicer could not import the label map into segments.")
        except Exception:
            scene.RemoveNode(newNode)
            raise
        finally:
            if labelmapNode is not None:
                scene.RemoveNode(labelmapNode)

        target = newNode
        if outputSegmentationNode is not None:
            outputSegmentationNode.GetSegmentation().DeepCopy(newNode.GetSegmentation())
            outputSegmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(
                referenceVolumeNode
            )
            if outputSegmentationNode.GetDisplayNode() is None:
                outputSegmentationNode.CreateDefaultDisplayNodes()
            scene.RemoveNode(newNode)
            target = outputSegmentationNode
        target.SetAndObserveTransformNodeID(referenceVolumeNode.GetTransformNodeID())
        if createClosedSurface:
            target.CreateClosedSurfaceRepresentation()

        voxelMl = volumeIO.voxelVolumeMl(referenceVolumeNode)
        counts = np.bincount(consecutive.reshape(-1), minlength=len(classes) + 1)
        summary = []
        for index, lab in enumerate(classes):
            voxels = int(counts[index + 1])
            summary.append(
                {
                    "segmentId": segmentIds.GetValue(index),
                    "name": str(lab["name"]),
                    "value": int(lab["value"]),
                    "voxels": voxels,
                    "volumeMl": voxels * voxelMl,
                }
            )
        empty = [s["name"] for s in summary if s["voxels"] == 0]
        if empty:
            warnings.append(f"Not found in this volume: {', '.join(empty)}.")
        return SegmentationResult(target, summary, warnings)


def summaryText(summary: list[dict[str, Any]]) -> str:
    """A short text table of segment volumes (for the log and the self-test)."""
    lines = [f"{'segment':<24} {'volume (mL)':>12}"]
    for row in summary:
        lines.append(f"{row['name']:<24} {row['volumeMl']:>12.1f}")
    return "\n".join(lines)


#: A tiny child script that reports the compute devices torch sees, as one ``done`` event.
_DEVICE_PROBE = r"""
import json
event = {"v": 1, "event": "done", "stage": "devices"}
try:
    import torch
except Exception as exc:
    event = {"v": 1, "event": "error", "stage": "devices",
             "message": "PyTorch is not installed (%s); it is installed on first Apply." % exc}
else:
    event["torch_version"] = torch.__version__
    event["cuda_available"] = bool(torch.cuda.is_available())
    if event["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        event["device"] = "cuda"
        event["gpu_name"] = props.name
        event["gpu_memory_gb"] = round(props.total_memory / 1024 ** 3, 1)
        event["gpu_count"] = torch.cuda.device_count()
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        event["device"] = "mps"
    else:
        event["device"] = "cpu"
print(json.dumps(event), flush=True)
"""


def deviceProbeCommand(python: str | None = None) -> list[str]:
    """``[python, -c, probe]``: prints which device ``--device auto`` would use (GPU name, GB)."""
    return [python or pythonExecutable(), "-c", _DEVICE_PROBE]


def describeDevices(event: dict[str, Any]) -> str:
    """``"CUDA: NVIDIA H100 (79.2 GB)"``, ``"CPU only (no CUDA GPU found)"`` or the error."""
    if event.get("event") == "error":
        return str(event.get("message") or "Device detection failed.")
    if event.get("cuda_available"):
        count = int(event.get("gpu_count") or 1)
        extra = f", {count} GPUs" if count > 1 else ""
        memory = event.get("gpu_memory_gb")
        memoryText = f" ({float(memory):.1f} GB{extra})" if memory else extra
        return f"CUDA: {event.get('gpu_name', 'GPU')}{memoryText}"
    if event.get("device") == "mps":
        return "Apple GPU (MPS)"
    return "CPU only (no CUDA GPU found)"
