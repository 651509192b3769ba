"""The Prompt section: a box (markups ROI) and points placed in the slice views -> one segment.

The annotator picks the volume, the segmentation (a new one is made when none is chosen) and
the segment (an existing one, or a new one by name), places an ROI and/or include / exclude
points (the Place buttons put the slice views into place mode), and clicks **Segment**. The
result replaces the segment, is added to it, or corrects only the slices the prompts reach;
the segment keeps its name, colour and terminology, and **Undo** restores it. The warm worker
(``PromptLogic``) starts on the first Segment and stops when the scene closes or the module is
cleaned up. Cancel stops a request without changing anything. qt; Slicer only.
"""

from __future__ import annotations

from typing import Any

import slicer

from .errors import CancelledError, MaskSAMSlicerError
from .panelLogic import (
    NEW_SEGMENT,
    PROMPT_MODES,
    PromptState,
    planPrompt,
    promptButtonStates,
    promptDoneMessage,
)
from .panelSection import PanelSection, selectComboText, setSettingsValue, settingsValue
from .process import describeProgress
from .promptLogic import startPlacing

#: The markups each Place button makes when none is chosen: (selector, class, name, persistent).
_PLACE = {
    "roi": ("promptRoiSelector", "vtkMRMLMarkupsROINode", "MaskSAM box", False),
    "include": ("promptPositivePointsSelector", "vtkMRMLMarkupsFiducialNode", "MaskSAM include",
                True),
    "exclude": ("promptNegativePointsSelector", "vtkMRMLMarkupsFiducialNode", "MaskSAM exclude",
                True),
}


class PromptSection(PanelSection):
    """The Prompt tab."""

    def __init__(self, panel) -> None:
        super().__init__(panel)
        self._job = None
        self._segmentIds: list[str | None] = [None]
        self._lastResult = None  # (volume, segmentation) of the last result

    @property
    def promptLogic(self):
        return self.logic.prompt

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        ui = self.ui
        for name in ("promptVolumeSelector", "promptSegmentationSelector", "promptRoiSelector",
                     "promptPositivePointsSelector", "promptNegativePointsSelector"):
            getattr(ui, name).setMRMLScene(slicer.mrmlScene)
            getattr(ui, name).connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtonStates)
        ui.promptSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                              lambda _node: self.refreshSegments())
        ui.promptSegmentSelector.connect("currentIndexChanged(int)", self.updateButtonStates)
        ui.promptModeSelector.clear()
        for label in PROMPT_MODES:
            ui.promptModeSelector.addItem(label)
        selectComboText(ui.promptDeviceSelector, settingsValue("promptDevice", "Auto"))
        ui.promptDeviceSelector.connect(
            "currentIndexChanged(int)",
            lambda _i: setSettingsValue("promptDevice", ui.promptDeviceSelector.currentText))
        ui.placeRoiButton.clicked.connect(lambda: self.onPlace("roi"))
        ui.placePositiveButton.clicked.connect(lambda: self.onPlace("include"))
        ui.placeNegativeButton.clicked.connect(lambda: self.onPlace("exclude"))
        ui.promptSegmentButton.clicked.connect(self.onSegment)
        ui.promptUndoButton.clicked.connect(self.onUndo)
        ui.promptAddToTrainingButton.clicked.connect(self.onAddToTraining)
        self.refreshSegments()

    def cleanup(self) -> None:
        self.stop()

    def onSceneStartClose(self) -> None:
        """The scene goes: its nodes (and the undo steps on them) go, and so does the worker."""
        self.stop()
        self.promptLogic.clearUndo()
        self._lastResult = None

    def stop(self) -> None:
        """Cancel a running request and end the worker (its temporary files go too)."""
        self._job = None
        self.promptLogic.stopWorker()

    # ------------------------------------------------------------------ state
    def isBusy(self) -> bool:
        return self._job is not None and not self._job.finished

    def promptState(self) -> PromptState:
        ui = self.ui
        job = self._job
        running = self.isBusy()
        havePrompts = any(node is not None for node in (
            ui.promptRoiSelector.currentNode(), ui.promptPositivePointsSelector.currentNode(),
            ui.promptNegativePointsSelector.currentNode()))
        return PromptState(
            running=running, cancelRequested=running and job.cancelRequested,
            volumeSelected=ui.promptVolumeSelector.currentNode() is not None,
            havePrompts=havePrompts, canUndo=self.promptLogic.canUndo(),
            hasResult=self._lastResult is not None,
            newSegment=self.selectedSegmentId() is None,
            incompatibility=self._incompatibility)

    def applyStates(self, _states=None) -> None:
        ui = self.ui
        buttons = promptButtonStates(self.promptState())
        ui.promptSegmentButton.text = buttons.segmentText
        ui.promptSegmentButton.enabled = buttons.segmentEnabled
        ui.promptSegmentButton.toolTip = buttons.segmentToolTip
        ui.promptUndoButton.enabled = buttons.undoEnabled
        ui.promptAddToTrainingButton.enabled = buttons.addToTrainingEnabled
        ui.promptNewSegmentNameLineEdit.enabled = buttons.newNameEnabled
        for name in ("promptVolumeSelector", "promptSegmentationSelector",
                     "promptSegmentSelector", "promptModeSelector", "promptDeviceSelector",
                     "placeRoiButton", "placePositiveButton", "placeNegativeButton"):
            getattr(ui, name).enabled = buttons.inputsEnabled

    # ------------------------------------------------------------------ segments
    def refreshSegments(self, selectId: str | None = None) -> None:
        """Fill the segment selector: "(new segment)" and the chosen segmentation's segments."""
        combo = self.ui.promptSegmentSelector
        wanted = selectId if selectId is not None else self.selectedSegmentId()
        self._segmentIds = [None]
        names = [NEW_SEGMENT]
        node = self.ui.promptSegmentationSelector.currentNode()
        if node is not None:
            segmentation = node.GetSegmentation()
            for index in range(segmentation.GetNumberOfSegments()):
                segmentId = segmentation.GetNthSegmentID(index)
                self._segmentIds.append(segmentId)
                names.append(segmentation.GetSegment(segmentId).GetName())
        combo.blockSignals(True)
        combo.clear()
        for name in names:
            combo.addItem(name)
        combo.setCurrentIndex(self._segmentIds.index(wanted) if wanted in self._segmentIds
                              else 0)
        combo.blockSignals(False)
        self.updateButtonStates()

    def selectedSegmentId(self) -> str | None:
        index = self.ui.promptSegmentSelector.currentIndex
        return self._segmentIds[index] if 0 <= index < len(self._segmentIds) else None

    # ------------------------------------------------------------------ actions
    def onPlace(self, kind: str) -> None:
        """Place mode in the slice views for the chosen (or a new) ROI / points list."""
        selectorName, className, name, persistent = _PLACE[kind]
        selector = getattr(self.ui, selectorName)
        node = selector.currentNode()
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass(className,
                                                      slicer.mrmlScene.GenerateUniqueName(name))
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            if display is not None and kind == "exclude":
                display.SetSelectedColor(0.9, 0.2, 0.2)
            elif display is not None and kind == "include":
                display.SetSelectedColor(0.2, 0.8, 0.3)
            selector.setCurrentNode(node)
        try:
            startPlacing(node, persistent=persistent)
        except MaskSAMSlicerError as exc:
            self.showError(str(exc), self.ui.promptStatusLabel)
            return
        self.ui.promptStatusLabel.text = (
            "Draw the box in a slice view." if kind == "roi" else
            f"Click in the slice views to add {kind} points; Esc or right-click ends.")
        self.updateButtonStates()

    def onSegment(self) -> None:
        ui = self.ui
        volume = ui.promptVolumeSelector.currentNode()
        state = self.promptState()
        plan = planPrompt(running=state.running, incompatibility=self._incompatibility,
                          volumeSelected=state.volumeSelected, havePrompts=state.havePrompts)
        if plan.action == "cancel":
            self.promptLogic.cancel(self._job)
            ui.promptStatusLabel.text = plan.message
            self.updateButtonStates()
            return
        if plan.action == "refuse":
            self.showError(plan.message, ui.promptStatusLabel)
            return
        if not self.ensureDependencies(ui.promptStatusLabel):
            return
        segmentationNode = ui.promptSegmentationSelector.currentNode()
        if segmentationNode is None:  # never somebody's segmentation: a new one
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode",
                slicer.mrmlScene.GenerateUniqueName(f"{volume.GetName()} prompts"))
            segmentationNode.CreateDefaultDisplayNodes()
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            ui.promptSegmentationSelector.setCurrentNode(segmentationNode)
        segmentId = self.selectedSegmentId()
        name = ui.promptNewSegmentNameLineEdit.text.strip() or "Segment"
        self.promptLogic.tempRoot = slicer.app.temporaryPath
        try:
            job = self.promptLogic.startPromptSegmentation(
                volume, segmentationNode, segmentId=segmentId, segmentName=name,
                roiNodes=[ui.promptRoiSelector.currentNode()],
                positivePointsNode=ui.promptPositivePointsSelector.currentNode(),
                negativePointsNode=ui.promptNegativePointsSelector.currentNode(),
                mode=PROMPT_MODES[ui.promptModeSelector.currentText],
                device=ui.promptDeviceSelector.currentText)
        except MaskSAMSlicerError as exc:
            self.showError(str(exc), ui.promptStatusLabel)
            return
        self._job = job
        ui.promptProgressBar.setRange(0, 0)
        ui.promptStatusLabel.text = "Starting (the first run loads the model)..."
        self._timer.start()
        self.updateButtonStates()

    def poll(self) -> bool:
        job = self._job
        if job is None:
            return False
        for event in self.promptLogic.pollJob(job):
            self._showEvent(event)
        if job.finished:
            self._finish(job)
            return False
        return True

    def _showEvent(self, event: dict[str, Any]) -> None:
        if event.get("event") in ("start", "progress"):
            self.showProgress(self.ui.promptProgressBar, self.ui.promptStatusLabel,
                              *describeProgress(event))

    def _finish(self, job) -> None:
        self._job = None
        ui = self.ui
        ui.promptProgressBar.setRange(0, 100)
        try:
            result = self.promptLogic.finishPromptSegmentation(job)
        except CancelledError as exc:
            ui.promptProgressBar.value = 0
            ui.promptStatusLabel.text = str(exc)
        except MaskSAMSlicerError as exc:
            ui.promptProgressBar.value = 0
            self.showError(f"Segmentation from prompts failed: {exc}", ui.promptStatusLabel)
        else:
            ui.promptProgressBar.value = 100
            self._lastResult = (job.volumeNode, result.segmentationNode)
            self.refreshSegments(selectId=result.segmentId)  # the next click corrects it
            segment = result.segmentationNode.GetSegmentation().GetSegment(result.segmentId)
            ui.promptStatusLabel.text = promptDoneMessage(
                segment.GetName(), result.volumeMl, result.elapsedS, result.encoderRuns)
            displayNode = result.segmentationNode.GetDisplayNode()
            if displayNode is not None:
                displayNode.SetVisibility(True)
        self.updateButtonStates()

    def onUndo(self) -> None:
        if self.promptLogic.undo():
            self.ui.promptStatusLabel.text = "Undone: the segment is as it was before."
        else:
            self.ui.promptStatusLabel.text = "Nothing to undo."
        self.refreshSegments()

    def onAddToTraining(self) -> None:
        if self._lastResult is None:
            return
        volume, segmentation = self._lastResult
        self.panel.train.addCase(volume, segmentation, self.ui.promptStatusLabel)
