"""Interactive prompts: markups in the slice views -> a warm ``masksam worker`` -> one segment.

Flow (the scene changes only when the worker has written a result):

1. the volume is written once to a temporary NRRD with exact geometry (``volumeIO``) and kept
   for later prompts on it (rewritten only when its voxels or geometry change);
2. a long-lived child ``PythonSlicer -m MaskSAMLib worker --device D`` (started on first use,
   stopped by :meth:`PromptLogic.stopWorker`, with the scene or the module) gets one JSON
   request per line on stdin and answers with progress events carrying the request id
   (INTERFACES.md worker protocol); it keeps the backbone and the slice embeddings, so a
   correction on the same volume does not pay for the encoder again;
3. markups ROIs become boxes and markups points become positive / negative points, converted
   from Slicer's world RAS to the volume's local frame (through a linear parent transform) and
   to LPS millimetres (x and y negated), the library's convention. An ROI thinner than a slice
   is a box on that slice;
4. the result goes into the chosen segment: ``replace`` (the segment becomes the result),
   ``add`` (union with what the segment holds) or ``correct`` (the segment is sent along: slices
   the prompts reach are redone, the others kept). An existing segment keeps its name, colour
   and terminology; a new one gets the given name and colour. :meth:`PromptLogic.undo` restores
   the segment as it was before the last result (or removes the segment it created).

Uses MRML and ``slicer.util``; no qt, no application object, no torch.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import volumeIO
from .errors import CancelledError, ChildFailedError, InputError
from .process import ChildLogic, StdinProcessRunner, childEnvironment, pythonExecutable
from .segmentationLogic import (
    deviceValue,
    registerSegmentationConverterRules,
    setSegmentTerminology,
    sidecarPath,
)

#: How the result enters the chosen segment.
MODES = ("replace", "add", "correct")


class PromptWorker:
    """The ``masksam worker`` child: send requests, poll events, cancel, stop.

    Args:
        python: interpreter (default ``PythonSlicer`` or this Python).
        device: ``Auto``/``CPU``/``CUDA`` or a CLI device value.
        environment: base environment for the child.
        extraArgs: more ``worker`` flags (``--backbone``, ``--sam-checkpoint``, ``--cache-gb``).
    """

    def __init__(self, *, python: str | None = None, device: str = "Auto",
                 environment: dict[str, str] | None = None,
                 extraArgs: Sequence[str] = ()) -> None:
        self.python = python or pythonExecutable()
        self.device = deviceValue(device)
        self.environment = environment
        self.extraArgs = [str(a) for a in extraArgs]
        self.runner: StdinProcessRunner | None = None
        self._ids = itertools.count(1)
        self.exitEvent: dict[str, Any] | None = None

    def command(self) -> list[str]:
        return [self.python, "-m", "MaskSAMLib", "worker", "--device", self.device,
                *self.extraArgs]

    def start(self) -> PromptWorker:
        env = childEnvironment(forceCpu=self.device == "cpu", base=self.environment)
        self.runner = StdinProcessRunner(self.command(), env=env, terminateGraceS=5.0).start()
        self.exitEvent = None
        return self

    def isRunning(self) -> bool:
        return self.runner is not None and self.runner.isRunning()

    def send(self, request: str, requestId: str | None = None, **fields: Any) -> str:
        """Send ``{"v": 1, "id", "request", ...}``; returns the id. Raises when the child is
        gone."""
        if not self.isRunning():
            raise ChildFailedError("The prompting process is not running; click Segment again "
                                   "to restart it.")
        requestId = requestId or f"r{next(self._ids)}"
        payload = {"v": 1, "id": requestId, "request": request, **fields}
        assert self.runner is not None
        if not self.runner.writeLine(json.dumps(payload)):
            raise ChildFailedError("The prompting process has stopped; " +
                                   self.runner.failureMessage())
        return requestId

    def poll(self) -> list[dict[str, Any]]:
        if self.runner is None:
            return []
        events = self.runner.poll()
        for event in events:
            if event.get("event") == "exit":
                self.exitEvent = event
        return events

    def cancel(self, requestId: str) -> None:
        """Stop one request (it ends with an ``error`` event, ``cancelled: true``)."""
        if self.isRunning():
            assert self.runner is not None
            self.runner.writeLine(json.dumps({"v": 1, "id": requestId, "request": "cancel"}))

    def stop(self, timeout: float = 10.0) -> int | None:
        """Ask the worker to end (stop request, closed stdin), kill its tree after ``timeout``."""
        if self.runner is None:
            return None
        if self.runner.isRunning():
            self.runner.writeLine(json.dumps({"v": 1, "request": "stop"}))
            self.runner.closeStdin()
            try:
                self.runner.wait(timeout=timeout)
            except TimeoutError:
                self.runner.kill()
                self.runner.wait(timeout=10.0)
        return self.runner.returnCode

    def pid(self) -> int | None:
        return self.runner.pid if self.runner is not None else None


@dataclass
class PromptJob:
    """One Segment click: its request, where the result goes, and the events so far."""

    requestId: str
    volumeNode: Any
    segmentationNode: Any
    segmentId: str | None
    segmentName: str
    color: tuple[float, float, float] | None
    terminology: str | None
    mode: str
    outputPath: Path
    inputGeometry: volumeIO.Geometry
    events: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    error: str | None = None
    cancelled: bool = False
    cancelRequested: bool = False
    doneEvent: dict[str, Any] | None = None
    startedAt: float = field(default_factory=time.monotonic)

    @property
    def lastProgress(self) -> dict[str, Any] | None:
        for event in reversed(self.events):
            if event.get("event") in ("progress", "start"):
                return event
        return None


@dataclass
class PromptResult:
    segmentationNode: Any
    segmentId: str
    voxels: int
    volumeMl: float
    elapsedS: float
    encoderRuns: int | None = None


def _toLocalRas(volumeNode) -> np.ndarray:
    """World RAS -> the volume's local RAS (4x4), through a linear parent transform."""
    import slicer
    import vtk

    worldToLocal = vtk.vtkMatrix4x4()
    parent = volumeNode.GetParentTransformNode()
    if parent is not None:
        if not parent.IsLinear():
            raise InputError("The volume is under a non-linear transform; harden the transform "
                             "before placing prompts.")
        slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(None, parent, worldToLocal)
    return np.array([[worldToLocal.GetElement(r, c) for c in range(4)] for r in range(4)])


def rasToLps(points: np.ndarray) -> np.ndarray:
    """(N, 3) RAS -> LPS (x and y negated)."""
    return np.asarray(points, dtype=float) * np.array([-1.0, -1.0, 1.0])


class PromptLogic(ChildLogic):
    """Prompted segmentation of volume nodes through a warm worker process.

    Args:
        scene: the MRML scene (default ``slicer.mrmlScene``).
        python: the interpreter for the worker (default ``PythonSlicer`` or this Python).
        tempRoot: where the temporary folder goes (the widget passes
            ``slicer.app.temporaryPath``).
        environment: base environment for the worker.
        workerArgs: more ``worker`` flags (``--backbone``, ``--sam-checkpoint``).
    """

    def __init__(self, scene=None, *, python: str | None = None, tempRoot: str | None = None,
                 environment: dict[str, str] | None = None,
                 workerArgs: Sequence[str] = ()) -> None:
        super().__init__(scene, python=python, environment=environment)
        self.tempRoot = tempRoot
        self.workerArgs = list(workerArgs)
        self.worker: PromptWorker | None = None
        self._workerDevice: str | None = None
        self._workDir: Path | None = None
        self._written: dict[str, tuple[Any, Path, volumeIO.Geometry]] = {}
        self._undo: list[tuple[Any, str, np.ndarray | None, Any]] = []
        self._results = itertools.count(1)

    # ------------------------------------------------------------------ worker
    def ensureWorker(self, device: str = "Auto") -> PromptWorker:
        """The running worker for ``device`` (started, or restarted for another device)."""
        value = deviceValue(device)
        if self.worker is not None and self.worker.isRunning() and self._workerDevice == value:
            return self.worker
        # Only the process: the volume files already written (and the request's output folder)
        # stay, so a restart for another device does not pull the folder from under the request.
        self._stopProcess()
        self.worker = PromptWorker(python=self.python, device=value,
                                   environment=self.environment,
                                   extraArgs=self.workerArgs).start()
        self._workerDevice = value
        return self.worker

    def _stopProcess(self, timeout: float = 10.0) -> None:
        if self.worker is not None:
            self.worker.stop(timeout=timeout)
        self.worker = None
        self._workerDevice = None

    def stopWorker(self, timeout: float = 10.0) -> None:
        """End the worker (call on scene close and module cleanup) and drop temporary files."""
        self._stopProcess(timeout)
        if self._workDir is not None:
            shutil.rmtree(self._workDir, ignore_errors=True)
        self._workDir = None
        self._written.clear()

    def _folder(self) -> Path:
        if self._workDir is None or not self._workDir.is_dir():
            self._workDir = Path(tempfile.mkdtemp(prefix="MaskSAMSlicer-prompt-",
                                                  dir=self.tempRoot))
        return self._workDir

    def _volumeFile(self, volumeNode) -> tuple[Path, volumeIO.Geometry]:
        """The volume as a NRRD, written again only when its voxels or geometry changed."""
        volumeIO.checkScalarVolume(volumeNode)
        imageData = volumeNode.GetImageData()
        stamp = (imageData.GetMTime(), volumeNode.GetMTime(),
                 tuple(volumeIO.ijkToRasMatrix(volumeNode).reshape(-1)))
        known = self._written.get(volumeNode.GetID())
        if known is not None and known[0] == stamp and known[1].is_file():
            return known[1], known[2]
        path = self._folder() / f"volume-{len(self._written) + 1}.nrrd"
        geometry = volumeIO.writeVolumeNode(volumeNode, path)
        self._written[volumeNode.GetID()] = (stamp, path, geometry)
        return path, geometry

    # ------------------------------------------------------------------ markups -> prompts
    def promptsFromMarkups(
        self,
        volumeNode,
        *,
        roiNodes: Sequence[Any] = (),
        positivePointsNode=None,
        negativePointsNode=None,
        name: str = "Segment",
    ) -> dict[str, Any]:
        """One structure of the prompts format (``MaskSAMLib.prompting.prompts``), in LPS mm."""
        toLocal = _toLocalRas(volumeNode)
        boxes = []
        for roi in roiNodes:
            if roi is None:
                continue
            bounds = [0.0] * 6
            roi.GetRASBounds(bounds)
            if bounds[1] < bounds[0]:
                raise InputError(f"The ROI '{roi.GetName()}' is not placed; place it on the "
                                 "volume.")
            corners = np.array([[x, y, z, 1.0] for x in bounds[0:2] for y in bounds[2:4]
                                for z in bounds[4:6]])
            lps = rasToLps((toLocal @ corners.T).T[:, :3])
            boxes.append([*map(float, lps.min(axis=0)), *map(float, lps.max(axis=0))])

        def pointsOf(node) -> list[list[float]]:
            out = []
            if node is None:
                return out
            for index in range(node.GetNumberOfControlPoints()):
                position = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(index, position)
                local = toLocal @ np.array([*position, 1.0])
                out.append([float(v) for v in rasToLps(local[None, :3])[0]])
            return out

        structure = {"name": name, "boxes": boxes, "points": pointsOf(positivePointsNode),
                     "negative_points": pointsOf(negativePointsNode)}
        if not (boxes or structure["points"] or structure["negative_points"]):
            raise InputError("Place a box (ROI) or points on the volume first, then click "
                             "Segment.")
        return structure

    # ------------------------------------------------------------------ run
    def startPromptSegmentation(
        self,
        volumeNode,
        segmentationNode,
        *,
        segmentId: str | None = None,
        segmentName: str = "Segment",
        color: tuple[float, float, float] | None = None,
        terminology: str | None = None,
        roiNodes: Sequence[Any] = (),
        positivePointsNode=None,
        negativePointsNode=None,
        mode: str = "replace",
        device: str = "Auto",
        window: tuple[float, float] | None = None,
    ) -> PromptJob:
        """Check the inputs, send the request, return at once (poll with :meth:`pollJob`).

        ``segmentId``: the segment to write into (None: a new segment ``segmentName``).
        """
        if mode not in MODES:
            raise InputError(f"Unknown mode '{mode}'; use one of {', '.join(MODES)}.")
        if segmentationNode is None:
            raise InputError("Choose a segmentation (or create one) for the result.")
        segmentation = segmentationNode.GetSegmentation()
        if segmentId is not None and segmentation.GetSegment(segmentId) is None:
            raise InputError(f"The segment '{segmentId}' is not in "
                             f"'{segmentationNode.GetName()}'; choose another one.")
        name = segmentName
        if segmentId is not None:
            name = segmentation.GetSegment(segmentId).GetName()
        structure = self.promptsFromMarkups(volumeNode, roiNodes=roiNodes,
                                            positivePointsNode=positivePointsNode,
                                            negativePointsNode=negativePointsNode, name=name)
        volumePath, geometry = self._volumeFile(volumeNode)
        folder = self._folder()
        outputPath = folder / f"result-{next(self._results)}.nrrd"
        request: dict[str, Any] = {"volume": str(volumePath), "out": str(outputPath),
                                   "overwrite": True, "prompts": {"structures": [structure]}}
        if window is not None:
            request["window"] = [float(window[0]), float(window[1])]
        if mode == "correct" and segmentId is not None:
            existing = self._segmentArray(segmentationNode, segmentId, volumeNode)
            if existing is not None and existing.any():
                initialPath = folder / f"initial-{next(self._results)}.nrrd"
                volumeIO.writeLabelArray(existing.astype(np.uint8), geometry, initialPath)
                request["initial"] = str(initialPath)
                structure["value"] = 1
        worker = self.ensureWorker(device)
        requestId = worker.send("segment", **request)
        return PromptJob(requestId=requestId, volumeNode=volumeNode,
                         segmentationNode=segmentationNode, segmentId=segmentId,
                         segmentName=name, color=color, terminology=terminology, mode=mode,
                         outputPath=outputPath, inputGeometry=geometry)

    def pollJob(self, job: PromptJob, onEvent: Callable[[dict], None] | None = None
                ) -> list[dict[str, Any]]:
        """Events of ``job`` since the last call (never blocks); sets ``job.finished``."""
        if self.worker is None:
            if not job.finished:
                job.finished, job.error = True, "The prompting process was stopped."
            return []
        mine = []
        for event in self.worker.poll():
            kind = event.get("event")
            if kind == "exit" and not job.finished:
                job.finished = True
                job.error = job.error or ("The prompting process ended unexpectedly: "
                                          + self.worker.runner.failureMessage())
                mine.append(event)
            elif event.get("id") == job.requestId:
                job.events.append(event)
                mine.append(event)
                if kind == "done":
                    job.finished, job.doneEvent = True, event
                elif kind == "error":
                    job.finished = True
                    job.cancelled = bool(event.get("cancelled"))
                    job.error = str(event.get("message") or "The prompting request failed.")
        if onEvent is not None:
            for event in mine:
                onEvent(event)
        return mine

    def cancel(self, job: PromptJob) -> None:
        """Ask the worker to stop this request (keep polling until ``job.finished``)."""
        if self.worker is not None and not job.finished:
            job.cancelRequested = True
            self.worker.cancel(job.requestId)

    def waitJob(self, job: PromptJob, timeout: float | None = None,
                onEvent: Callable[[dict], None] | None = None) -> None:
        """Blocking mode for scripts and tests."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not job.finished:
            self.pollJob(job, onEvent)
            if job.finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.cancel(job)
                raise TimeoutError(f"prompt request {job.requestId} still running after "
                                   f"{timeout} s")
            time.sleep(0.02)

    def finishPromptSegmentation(self, job: PromptJob) -> PromptResult:
        """After ``job.finished``: put the mask into the segment (or raise why there is none)."""
        if not job.finished:
            raise RuntimeError("finishPromptSegmentation called before the job finished")
        if job.cancelled:
            raise CancelledError("Segmentation from prompts was cancelled; nothing was changed.")
        if job.error:
            raise ChildFailedError(job.error)
        try:
            array, geometry = volumeIO.readLabelMap(job.outputPath)
            problems = geometry.differences(job.inputGeometry)
            if problems:
                raise ChildFailedError("The mask does not lie on the volume's grid ("
                                       + "; ".join(problems) + "); please report this bug.")
            mask = array > 0
            segmentId = self.applyMask(mask, job.volumeNode, job.segmentationNode,
                                       segmentId=job.segmentId, segmentName=job.segmentName,
                                       color=job.color, terminology=job.terminology,
                                       mode=job.mode)
        finally:
            for name in (job.outputPath, sidecarPath(job.outputPath)):
                Path(name).unlink(missing_ok=True)
        voxels = int(self._segmentArray(job.segmentationNode, segmentId, job.volumeNode).sum())
        segments = (job.doneEvent or {}).get("segments") or [{}]
        return PromptResult(job.segmentationNode, segmentId, voxels,
                            voxels * volumeIO.voxelVolumeMl(job.volumeNode),
                            time.monotonic() - job.startedAt, segments[0].get("encoder_runs"))

    def segment(self, volumeNode, segmentationNode, *, timeout: float | None = None,
                onEvent: Callable[[dict], None] | None = None, **kwargs: Any) -> PromptResult:
        """Blocking mode: start, wait, apply."""
        job = self.startPromptSegmentation(volumeNode, segmentationNode, **kwargs)
        self.waitJob(job, timeout=timeout, onEvent=onEvent)
        return self.finishPromptSegmentation(job)

    # ------------------------------------------------------------------ segments
    @staticmethod
    def _segmentArray(segmentationNode, segmentId: str, volumeNode) -> np.ndarray | None:
        return segmentMask(segmentationNode, segmentId, volumeNode)

    def applyMask(
        self,
        mask: np.ndarray,
        volumeNode,
        segmentationNode,
        *,
        segmentId: str | None = None,
        segmentName: str = "Segment",
        color: tuple[float, float, float] | None = None,
        terminology: str | None = None,
        mode: str = "replace",
    ) -> str:
        """Write a mask ``(z, y, x)`` on the volume's grid into a segment; returns its id.

        The previous content is kept for :meth:`undo`.
        """
        registerSegmentationConverterRules()
        expected = tuple(reversed(volumeIO.volumeSize(volumeNode)))
        if tuple(mask.shape) != expected:
            raise InputError(f"The mask has {mask.shape} voxels but the volume {expected}.")
        segmentation = segmentationNode.GetSegmentation()
        if segmentationNode.GetDisplayNode() is None:
            segmentationNode.CreateDefaultDisplayNodes()
        if segmentation.GetNumberOfSegments() == 0:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        previous = None
        if segmentId is None:
            if color:
                segmentId = segmentation.AddEmptySegment("", segmentName, list(color))
            else:
                segmentId = segmentation.AddEmptySegment("", segmentName)
            if terminology:
                setSegmentTerminology(segmentation.GetSegment(segmentId), terminology)
        else:
            previous = self._segmentArray(segmentationNode, segmentId, volumeNode)
        values = mask.astype(bool)
        if mode == "add" and previous is not None:
            values = values | previous
        self._undo.append((segmentationNode, segmentId, previous, volumeNode))
        del self._undo[:-20]
        setSegmentMask(values, segmentationNode, segmentId, volumeNode)
        return segmentId

    def canUndo(self) -> bool:
        return bool(self._undo)

    def clearUndo(self) -> None:
        """Forget the undo steps (the scene was closed: their nodes are gone)."""
        self._undo.clear()

    def undo(self) -> bool:
        """Restore the segment changed last (or remove the one created); False if none."""
        while self._undo:
            segmentationNode, segmentId, previous, volumeNode = self._undo.pop()
            if segmentationNode.GetScene() is None or volumeNode.GetScene() is None:
                continue
            segmentation = segmentationNode.GetSegmentation()
            if segmentation.GetSegment(segmentId) is None:
                continue
            if previous is None:
                segmentation.RemoveSegment(segmentId)
            else:
                setSegmentMask(previous, segmentationNode, segmentId, volumeNode)
            return True
        return False


def segmentMask(segmentationNode, segmentId: str, volumeNode) -> np.ndarray | None:
    """One segment as a boolean array ``(z, y, x)`` on the volume's grid (None: no segment).

    Uses the node's own scene and the static segmentations logic (``slicer.util``'s helpers
    need ``slicer.modules`` and the application's scene).
    """
    import slicer
    import vtk

    if segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
        return None
    scene = segmentationNode.GetScene()
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__masksam_segment__")
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentationNode, ids, labelmap, volumeNode,
                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            raise InputError(f"Slicer could not read the segment '{segmentId}' on the grid of "
                             f"'{volumeNode.GetName()}'.")
        return np.asarray(slicer.util.arrayFromVolume(labelmap)) > 0
    finally:
        scene.RemoveNode(labelmap)


def setSegmentMask(mask: np.ndarray, segmentationNode, segmentId: str, volumeNode) -> None:
    """Replace one segment's voxels by ``mask`` ``(z, y, x)`` on the volume's grid."""
    import slicer
    import vtk

    scene = segmentationNode.GetScene()
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__masksam_segment__")
    try:
        slicer.util.updateVolumeFromArray(labelmap, np.ascontiguousarray(mask, dtype=np.uint8))
        labelmap.CopyOrientation(volumeNode)
        labelmap.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                labelmap, segmentationNode, ids):
            raise InputError("Slicer could not put the result into the segment.")
    finally:
        scene.RemoveNode(labelmap)


def startPlacing(markupsNode, *, persistent: bool = False) -> None:
    """Put the slice views into place mode for ``markupsNode`` (an ROI or a points list).

    ``persistent``: every click adds a point until the user leaves place mode (points);
    otherwise one placement (an ROI).
    """
    scene = markupsNode.GetScene()
    selection = scene.GetNodeByID("vtkMRMLSelectionNodeSingleton") if scene else None
    interaction = scene.GetNodeByID("vtkMRMLInteractionNodeSingleton") if scene else None
    if selection is None or interaction is None:
        raise InputError("This scene has no views to place markups in.")
    selection.SetReferenceActivePlaceNodeClassName(markupsNode.GetClassName())
    selection.SetActivePlaceNodeID(markupsNode.GetID())
    interaction.SetPlaceModePersistence(1 if persistent else 0)
    interaction.SetCurrentInteractionMode(interaction.Place)
