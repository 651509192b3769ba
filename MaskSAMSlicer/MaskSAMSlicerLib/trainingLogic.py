"""Training from inside Slicer: child ``masksam train`` on the cases (``trainingCases``).

``TrainingLogic`` builds and runs ``PythonSlicer -m MaskSAMLib train DATASET --out MODEL
(--backbone B [--sam-checkpoint F] | --init MODEL) ... --progress json`` in a child process;
Stop writes ``MODEL/STOP`` (the trainer saves a checkpoint and exits), then escalates; loss and
validation Dice go into table nodes that a plot chart shows.

Uses MRML and ``slicer.util``; no qt, no application object, no torch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from MaskSAMLib.backbones import BACKBONE_NAMES
from MaskSAMLib.errors import MaskSAMError
from MaskSAMLib.labels import parse_labels

from .errors import InputError, ModelError, TrainingCaseError
from .modelRegistry import ModelInfo, ModelRegistry, readJsonObject, readModelDir
from .process import ChildLogic, ProcessRunner, childEnvironment, masksamCommand
from .segmentationLogic import deviceValue
from .trainingCases import MANIFEST_FILE, applyClassStyles, atomicWriteText, normalizeClassName

BACKBONES = BACKBONE_NAMES  # the library's backbone table, one definition
STOP_FILE = "STOP"


def canResume(outputDir: str | os.PathLike) -> bool:
    """A stopped (or killed) run left a checkpoint that ``--resume`` continues."""
    return (Path(outputDir) / "training" / "checkpoint.pt").is_file()


def datasetLabels(datasetDir: str | os.PathLike) -> dict[str, int]:
    """The ``labels`` of an nnU-Net (or MSD) dataset folder, by the library's rules
    (``MaskSAMLib.labels.parse_labels``: what ``masksam train`` will accept)."""
    path = Path(datasetDir) / "dataset.json"
    if not path.is_file():
        raise TrainingCaseError(
            f"{datasetDir} has no dataset.json; choose an nnU-Net dataset folder or add cases "
            "from the scene."
        )
    data = readJsonObject(path, TrainingCaseError, "fix or replace the file.")
    try:
        return parse_labels(data.get("labels"), str(path))
    except MaskSAMError as exc:
        raise TrainingCaseError(str(exc)) from exc


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


class TrainingLogic(ChildLogic):
    """Build, run and stop ``masksam train``; register the new model when it finishes."""

    def __init__(self, scene=None, *, python: str | None = None,
                 environment: dict[str, str] | None = None) -> None:
        super().__init__(scene, python=python, environment=environment)
        self.stopGraceS = 180.0  # saving a checkpoint of a big model takes a while
        self.lossTableNode = None
        self.diceTableNode = None
        self.chartNode = None

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
                raise InputError(f"Unknown backbone '{backbone}'; choose one of "
                                 f"{', '.join(BACKBONES)}.")
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
        atomicWriteText(configPath, json.dumps(config, indent=2) + "\n")
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
