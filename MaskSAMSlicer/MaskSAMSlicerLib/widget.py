"""The module panel's shell: loads the .ui and drives its sections (qt; only loads inside Slicer).

The sections (``autoSegmentSection.AutoSegmentSection``, ``trainSection.TrainSection``,
``promptSection.PromptSection``) own their widgets and jobs; the shell owns what they share:
the parameter node, the scene observers, the error display and one ``qt.QTimer`` on the GUI
thread that polls the running children (events are queued by reader threads; no Qt call ever
happens off the GUI thread). Apply/Segment become Cancel and Stop escalates politely, so the
GUI never blocks. Errors appear in the status line and in ``slicer.util.errorDisplay``; the
user's segmentations are never touched without confirmation or undo.

The panel never imports torch: the GPU's name and memory come from the child.
"""

from __future__ import annotations

import logging
from pathlib import Path

import qt
import slicer
from slicer.util import VTKObservationMixin

from .autoSegmentSection import AutoSegmentSection
from .compatibility import currentIncompatibility
from .errors import DependencyError
from .install import DependencyInstaller
from .modelRegistry import ModelRegistry, defaultRegistryFile
from .panelLogic import PanelState, buttonStates
from .promptSection import PromptSection
from .trainSection import TrainSection

POLL_INTERVAL_MS = 200
MAX_LOG_BLOCKS = 5000


class MaskSAMSlicerPanel(VTKObservationMixin):
    """Builds the panel into ``moduleWidget.layout`` and drives it.

    Args:
        moduleWidget: the ``MaskSAMSlicerWidget`` (gives ``layout`` and ``resourcePath``).
        logic: the ``MaskSAMSlicerLogic`` (parameter node, logic objects).
    """

    def __init__(self, moduleWidget, logic) -> None:
        VTKObservationMixin.__init__(self)
        self.moduleWidget = moduleWidget
        self.logic = logic
        self.ui = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = None
        self._incompatibility: str | None = None
        self.autoSegment = AutoSegmentSection(self)
        self.train = TrainSection(self)
        self.prompt = PromptSection(self)
        self.sections = (self.autoSegment, self.train, self.prompt)

    # ================================================================== setup
    def setup(self) -> None:
        self._incompatibility = currentIncompatibility()
        uiWidget = slicer.util.loadUI(self.moduleWidget.resourcePath("UI/MaskSAMSlicer.ui"))
        self.moduleWidget.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self.onTimer)
        for section in self.sections:
            section.setup()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.autoSegment.refreshModels()
        self.train.start()
        self.initializeParameterNode()
        if self._incompatibility:
            for label in (self.ui.statusLabel, self.ui.trainStatusLabel,
                          self.ui.promptStatusLabel):
                label.text = self._incompatibility
            logging.error(self._incompatibility)
        self.updateButtonStates()

    def cleanup(self) -> None:
        """Module widget destroyed (application exit): stop children, drop observers."""
        for section in self.sections:
            section.cleanup()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    @staticmethod
    def stopJob(job, timeout: float = 20.0) -> None:
        """Cancel a running child and wait for it (then kill its tree)."""
        if job is None or not job.runner.isRunning():
            return
        try:
            job.runner.cancelAndWait(timeout=timeout)
        except TimeoutError:
            job.runner.kill()
            try:
                job.runner.wait(timeout=10)
            except TimeoutError:
                logging.error("MaskSAMSlicer: a child process did not exit.")

    # ================================================================== parameter node
    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self.prompt.onSceneStartClose()

    def onSceneEndClose(self, caller, event) -> None:
        if self.moduleWidget.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
        self.updateButtonStates()

    # ================================================================== shared helpers
    def showError(self, message: str, statusLabel=None, title: str = "MaskSAMSlicer") -> None:
        (statusLabel or self.ui.statusLabel).text = message
        logging.error(message)
        if not slicer.app.testingEnabled():
            slicer.util.errorDisplay(message, windowTitle=title)

    def appendLog(self, text: str, train: bool = False) -> None:
        edit = self.ui.trainLogTextEdit if train else self.ui.logTextEdit
        edit.setMaximumBlockCount(MAX_LOG_BLOCKS)
        edit.appendPlainText(text)

    def isBusy(self) -> bool:
        return any(section.isBusy() for section in self.sections)

    def installer(self) -> DependencyInstaller:
        return DependencyInstaller(self.moduleWidget.resourcePath("requirements.txt"))

    def ensureDependencies(self, statusLabel) -> bool:
        """First use: torch (PyTorch extension) and the requirements, each after asking."""
        installer = self.installer()
        if installer.isReady():
            return True
        statusLabel.text = "Installing Python packages (first use)..."
        slicer.app.processEvents()
        try:
            # No wait cursor here: the installer asks before installing anything, and a wait
            # cursor would stay on over its confirmation dialogs.
            installer.ensure()
        except DependencyError as exc:
            self.showError(str(exc), statusLabel)
            return False
        statusLabel.text = ""
        return True

    def registry(self) -> ModelRegistry:
        """Registry file next to the installed module (or the checkout's Resources/)."""
        moduleDir = Path(self.moduleWidget.resourcePath("models.json")).parent.parent
        return ModelRegistry(registryFile=defaultRegistryFile(moduleDir))

    # ================================================================== button states
    def panelState(self) -> PanelState:
        """The inputs of the button-state decisions (no settings or disk access: it runs on
        every timer tick)."""
        return PanelState(**self.autoSegment.stateFields(), **self.train.stateFields(),
                          incompatibility=self._incompatibility)

    def updateButtonStates(self, *_args) -> None:
        if self.ui is None:
            return
        states = buttonStates(self.panelState())
        for section in self.sections:
            section.applyStates(states)

    # ================================================================== timer
    def onTimer(self) -> None:
        needed = [section.poll() for section in self.sections]
        if not any(needed):
            self._timer.stop()
        self.updateButtonStates()
