"""The Auto-segment section: input volume, model (list, add, download), options, Apply/Cancel,
results, and the hand-over to the Segment Editor and the training cases (qt; Slicer only)."""

from __future__ import annotations

from typing import Any

import qt
import slicer

from .errors import CancelledError, MaskSAMSlicerError, ModelError
from .modelRegistry import ModelInfo
from .panelLogic import (
    ModelFetch,
    planApply,
    segmentationDoneMessage,
    segmentationStartedMessage,
)
from .panelSection import PanelSection, selectComboText, setSettingsValue, settingsValue
from .process import ProcessRunner, childEnvironment, describeProgress
from .segmentationLogic import (
    describeDevices,
    describeSidecar,
    deviceProbeCommand,
    summaryText,
)


class AutoSegmentSection(PanelSection):
    """The Auto-segment tab."""

    def __init__(self, panel) -> None:
        super().__init__(panel)
        self._segJob = None
        self._segOutput = None
        self._segReplace = False
        self._probeRunner: ProcessRunner | None = None
        self._lastResult = None
        self._models: list[ModelInfo] = []
        self._fetch: ModelFetch | None = None
        self._fetchDialog = None

    @property
    def models(self) -> list[ModelInfo]:
        return self._models

    def setup(self) -> None:
        for name in ("inputVolumeSelector", "roiSelector", "outputSegmentationSelector"):
            getattr(self.ui, name).setMRMLScene(slicer.mrmlScene)
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
            lambda _i: setSettingsValue("speed", self.ui.speedSelector.currentText))
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
        selectComboText(self.ui.deviceSelector, settingsValue("device", "Auto"))
        selectComboText(self.ui.speedSelector, settingsValue("speed", "Standard"))

    def cleanup(self) -> None:
        self.panel.stopJob(self._segJob)
        if self._fetch is not None:
            self._fetch.cancel()

    def isBusy(self) -> bool:
        return self._segJob is not None and self._segJob.runner.isRunning()

    def poll(self) -> bool:
        self._pollSegmentation()
        self._pollProbe()
        self._pollFetch()
        return self.isBusy() or self._probeRunner is not None or self._fetch is not None

    def stateFields(self) -> dict[str, Any]:
        """This section's inputs of ``panelLogic.PanelState``."""
        segJob = self._segJob
        seg = segJob is not None and segJob.runner.isRunning()
        model = self.selectedModel()
        return dict(
            segRunning=seg,
            segCancelRequested=seg and segJob.runner.cancelRequested,
            volumeSelected=self.ui.inputVolumeSelector.currentNode() is not None,
            modelSelected=model is not None,
            modelAvailable=model is not None and model.available,
            haveModels=bool(self._models),
            hasResult=self._lastResult is not None,
            cropChecked=bool(self.ui.cropCheckBox.checked),
            fetching=self._fetch is not None,
        )

    def applyStates(self, states) -> None:
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

    def refreshModels(self, selectPath: str | None = None) -> None:
        registry = self.registry()
        try:
            self._models = registry.models()
        except ModelError as exc:
            self._models = []
            self.appendLog(str(exc))
        for problem in registry.problems:
            self.appendLog(f"Skipped a model folder: {problem}")
        wanted = selectPath or settingsValue("model", "")
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
        self.panel.train.refreshBaseModels()

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
            setSettingsValue("model", str(model.path))
        self.updateButtonStates()

    def onAddModel(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), "Choose a MaskSAM model folder",
            settingsValue("lastModelDir", ""))
        if not folder:
            return
        setSettingsValue("lastModelDir", folder)
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

    def onDeviceChanged(self, _index=None) -> None:
        setSettingsValue("device", self.ui.deviceSelector.currentText)
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
            self.showProgress(self.ui.progressBar, self.ui.statusLabel, *describeProgress(event))
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
        self.panel.train.addCase(volume, segmentation, self.ui.statusLabel)
