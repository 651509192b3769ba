"""The panel's decisions, as plain classes and functions (no qt, no slicer, no torch).

``widget.py`` reads the GUI into these inputs, asks what to do, and writes the answers back
into the widgets. Everything a user would notice (which buttons are enabled, what Apply and
Start do with the chosen options, which messages appear) is decided here, so it is tested
without the application (``Testing/slicer_module/test_slicer_panel_logic.py``), and the widget
itself runs against PySide6 stand-ins (``Testing/slicer_module/test_slicer_widget.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import CancelledError, MaskSAMSlicerError
from .process import describeProgress


# ====================================================================== button states
@dataclass
class PanelState:
    """What the button states depend on (read from the GUI and the running jobs)."""

    segRunning: bool = False
    segCancelRequested: bool = False
    trainRunning: bool = False
    trainCancelRequested: bool = False
    volumeSelected: bool = False
    modelSelected: bool = False
    modelAvailable: bool = False
    haveModels: bool = False
    hasResult: bool = False
    cropChecked: bool = False
    sceneSource: bool = True
    caseVolumeSelected: bool = False
    caseSegmentationSelected: bool = False
    selectedCases: int = 0
    resumable: bool = False
    baseKind: str | None = None
    baseBackbone: str = ""
    fetching: bool = False
    incompatibility: str | None = None


@dataclass
class ButtonStates:
    applyText: str
    applyEnabled: bool
    applyToolTip: str
    roiEnabled: bool
    correctEnabled: bool
    addToTrainingEnabled: bool
    downloadVisible: bool
    importVisible: bool
    downloadEnabled: bool
    noModelVisible: bool
    sceneWidgetsEnabled: bool
    datasetFolderEnabled: bool
    addCaseEnabled: bool
    removeCaseEnabled: bool
    startEnabled: bool
    startToolTip: str
    stopEnabled: bool
    resumeEnabled: bool
    samCheckpointEnabled: bool


def buttonStates(state: PanelState) -> ButtonStates:
    seg, train = state.segRunning, state.trainRunning
    blocked = state.incompatibility is not None
    if seg:
        applyText, applyEnabled = "Cancel", not state.segCancelRequested
        applyToolTip = "Stop the running auto-segmentation; nothing is changed."
    else:
        applyText = "Apply"
        ready = state.volumeSelected and state.modelSelected and state.modelAvailable
        applyEnabled = ready and not train and not blocked and not state.fetching
        if blocked:
            applyToolTip = state.incompatibility
        elif not state.volumeSelected:
            applyToolTip = "Select an input volume first."
        elif not (state.modelSelected and state.modelAvailable):
            applyToolTip = "Select (or download, train, add) a model first."
        elif train:
            applyToolTip = "Training is running; auto-segment when it has finished."
        else:
            applyToolTip = "Run auto-segmentation."
    missingModel = state.modelSelected and not state.modelAvailable
    sceneSource = state.sceneSource
    startEnabled = not train and not seg and not blocked
    return ButtonStates(
        applyText=applyText,
        applyEnabled=applyEnabled,
        applyToolTip=applyToolTip,
        roiEnabled=state.cropChecked,
        correctEnabled=state.hasResult and not seg,
        addToTrainingEnabled=state.hasResult and not seg and not train,
        downloadVisible=missingModel,
        importVisible=missingModel,
        downloadEnabled=missingModel and not state.fetching,
        noModelVisible=not state.haveModels,
        sceneWidgetsEnabled=sceneSource and not train,
        datasetFolderEnabled=not sceneSource and not train,
        addCaseEnabled=(sceneSource and not train and state.caseVolumeSelected
                        and state.caseSegmentationSelected),
        removeCaseEnabled=sceneSource and not train and state.selectedCases > 0,
        startEnabled=startEnabled,
        startToolTip=(state.incompatibility if blocked else
                      "Training is running." if train else
                      "Auto-segmentation is running." if seg else "Start training."),
        stopEnabled=train and not state.trainCancelRequested,
        resumeEnabled=not train and not seg and not blocked and state.resumable,
        samCheckpointEnabled=state.baseKind == "backbone"
        and str(state.baseBackbone).startswith("vit_"),
    )


# ====================================================================== Apply
@dataclass
class ApplyPlan:
    """What pressing Apply does: ``cancel``, ``refuse`` (show ``message``), ``confirmReplace``
    (ask ``message``; Yes starts and replaces), or ``start``."""

    action: str
    message: str = ""
    replace: bool = False


def planApply(*, segRunning: bool, incompatibility: str | None, volumeSelected: bool,
              cropChecked: bool, roiSelected: bool, outputName: str | None,
              outputSegmentCount: int) -> ApplyPlan:
    if segRunning:
        return ApplyPlan("cancel", "Cancelling...")
    if incompatibility:
        return ApplyPlan("refuse", incompatibility)
    if not volumeSelected:
        return ApplyPlan("refuse", "Select an input volume first.")
    if cropChecked and not roiSelected:
        return ApplyPlan("refuse",
                         "Cropping is on but no ROI is selected; choose or place an ROI.")
    if outputName is not None and outputSegmentCount > 0:
        return ApplyPlan(
            "confirmReplace",
            f"'{outputName}' already holds {outputSegmentCount} segments. Replace them with the "
            "auto-segmentation? (Choose No and select 'Create new segmentation' to keep them.)",
            replace=True,
        )
    return ApplyPlan("start")


def segmentationStartedMessage(volumeName: str, modelName: str, device: str, speed: str) -> str:
    return f"Segmenting '{volumeName}' with '{modelName}' ({device}, {speed})."


def segmentationDoneMessage(segmentCount: int, nodeName: str, elapsedS: float | None) -> str:
    seconds = f" in {elapsedS:.0f} s" if elapsedS else ""
    return (f"Done{seconds}: {segmentCount} segments in '{nodeName}'. Review them; 'Correct in "
            "Segment Editor' to fix.")


# ====================================================================== Train
def trainingOptions(base: dict[str, Any] | None, *, iterations: int, batchSize: int,
                    learningRate: float, device: str, samCheckpoint: str = "") -> dict[str, Any]:
    """The keyword options ``TrainingLogic.startTraining`` gets for the chosen base model."""
    if base is None:
        raise MaskSAMSlicerError("Choose a base model.")
    options: dict[str, Any] = {
        "iterations": int(iterations),
        "batchSize": int(batchSize),
        "learningRate": float(learningRate),
        "device": str(device),
    }
    if base.get("kind") == "model":
        options["initModel"] = base["model"]
    else:
        options["backbone"] = base["backbone"]
        if str(base["backbone"]).startswith("vit_"):
            options["samCheckpoint"] = samCheckpoint
    return options


def trainingProgressText(event: dict[str, Any]) -> tuple[int | None, str]:
    """(percent or None, ``"train: 350/1000, ETA 4 min 10 s, loss 0.7712"``)."""
    percent, text = describeProgress(event)
    loss = event.get("loss")
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        text += f", loss {loss:.4f}"
    return percent, text


def caseAddedMessage(entry: dict[str, Any], volumeName: str, segmentationName: str,
                     missing: dict[str, list[str]]) -> str:
    lacking = {case: names for case, names in missing.items() if names}
    note = ""
    if lacking:
        note = (" Classes missing from a case are background there: "
                + "; ".join(f"{c} lacks {', '.join(n)}" for c, n in lacking.items()) + ".")
    return (f"Added {entry['caseId']} ({volumeName} + {segmentationName}: "
            f"{', '.join(entry['classes'])}).{note}")


def casesSummary(caseCount: int, classNames: list[str]) -> str:
    return (f"{caseCount} cases, {len(classNames)} classes: "
            f"{', '.join(classNames) or 'none yet'}.")


def trainingEndMessage(*, succeeded: bool, cancelled: bool, returnCode: int | None,
                       modelName: str = "", error: str = "") -> tuple[str, bool]:
    """(status text, whether it is an error to show in a dialog)."""
    if succeeded:
        return (f"Training finished: model '{modelName}' is registered and selected in "
                "Auto-segment."), False
    if cancelled or returnCode == 130:
        return "Training stopped; the checkpoint was kept: Resume continues it.", False
    return f"Training failed: {error}", True


# ====================================================================== Prompt
#: The mode selector's entries -> ``PromptLogic`` modes.
PROMPT_MODES = {
    "Replace the segment": "replace",
    "Add to the segment": "add",
    "Correct the prompted slices": "correct",
}
NEW_SEGMENT = "(new segment)"


@dataclass
class PromptState:
    """What the Prompt section's buttons depend on."""

    running: bool = False
    cancelRequested: bool = False
    volumeSelected: bool = False
    havePrompts: bool = False
    canUndo: bool = False
    hasResult: bool = False
    newSegment: bool = True
    incompatibility: str | None = None


@dataclass
class PromptButtons:
    segmentText: str
    segmentEnabled: bool
    segmentToolTip: str
    undoEnabled: bool
    addToTrainingEnabled: bool
    inputsEnabled: bool
    newNameEnabled: bool


def promptButtonStates(state: PromptState) -> PromptButtons:
    running = state.running
    if running:
        text, enabled = "Cancel", not state.cancelRequested
        tip = "Stop this request; the segment is not changed."
    else:
        text = "Segment"
        enabled = (state.volumeSelected and state.havePrompts
                   and state.incompatibility is None)
        tip = (state.incompatibility or
               ("Select the volume to segment first." if not state.volumeSelected else
                "Place a box (ROI) or points in the slice views first." if not state.havePrompts
                else "Segment from the box and points (the first run starts the model)."))
    return PromptButtons(
        segmentText=text, segmentEnabled=enabled, segmentToolTip=tip,
        undoEnabled=state.canUndo and not running,
        addToTrainingEnabled=state.hasResult and not running,
        inputsEnabled=not running,
        newNameEnabled=state.newSegment and not running,
    )


def planPrompt(*, running: bool, incompatibility: str | None, volumeSelected: bool,
               havePrompts: bool) -> ApplyPlan:
    """What pressing Segment does: ``cancel``, ``refuse`` (show ``message``) or ``start``."""
    if running:
        return ApplyPlan("cancel", "Cancelling...")
    if incompatibility:
        return ApplyPlan("refuse", incompatibility)
    if not volumeSelected:
        return ApplyPlan("refuse", "Select the volume to segment first.")
    if not havePrompts:
        return ApplyPlan("refuse", "Place a box (ROI) or points in the slice views first, then "
                         "click Segment.")
    return ApplyPlan("start")


def promptDoneMessage(segmentName: str, volumeMl: float, elapsedS: float,
                      encoderRuns: int | None) -> str:
    reuse = (" (slices already encoded were reused)" if encoderRuns == 0 else "")
    return (f"'{segmentName}': {volumeMl:.1f} mL in {elapsedS:.1f} s{reuse}. Undo restores the "
            "segment as it was.")


# ====================================================================== model download
class ModelFetch:
    """Download a registry model on a worker thread; the GUI polls and may cancel.

    ``fetch(progress)`` is the registry call (``ModelRegistry.fetchModel`` with its name bound);
    it runs on a daemon thread and reports ``(done, total)`` bytes through ``progress``. Cancel
    makes the next progress report raise ``CancelledError``, which the registry's clean-up
    turns into "nothing left behind". Nothing here touches Qt: the GUI reads ``fraction``,
    ``finished``, ``result`` and ``error`` from its timer.
    """

    def __init__(self, fetch: Callable[[Callable[[int, int], None]], Any]) -> None:
        self._fetch = fetch
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self.done = 0
        self.total = 0
        self.result: Any = None
        self.error: str | None = None
        self.cancelled = False
        self._thread = threading.Thread(target=self._run, name="MaskSAM-fetch", daemon=True)

    def start(self) -> ModelFetch:
        self._thread.start()
        return self

    def _progress(self, done: int, total: int) -> None:
        with self._lock:
            self.done, self.total = int(done), int(total)
        if self._cancel.is_set():
            raise CancelledError("The download was cancelled; nothing was kept.")

    def _run(self) -> None:
        try:
            self.result = self._fetch(self._progress)
        except CancelledError as exc:
            self.cancelled = True
            self.error = str(exc)
        except MaskSAMSlicerError as exc:
            self.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported in the panel, never lost
            self.error = f"The download failed ({exc})."

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive() and (self.result is not None or self.error is not None)

    @property
    def percent(self) -> int | None:
        with self._lock:
            if self.total <= 0:
                return None
            return max(0, min(100, int(100 * self.done / self.total)))

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()
