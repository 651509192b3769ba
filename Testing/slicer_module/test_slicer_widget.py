"""The module panel itself (MaskSAMSlicerLib/widget.py) running on PySide6, offscreen.

``qt``/``ctk`` are PySide6 behind PythonQt-style proxies (``slicer_qt_shims.py`` here: a
property or signal that does not exist fails), the .ui is the real one with CTK/MRML
stand-ins, the scene and nodes are real MRML (slicer-core), and the application-only parts of
``slicer`` (``slicer.app``, dialogs) are small stand-ins that record what the user would see.
The panel's own timer drives a real (stand-in) child process: Apply becomes Cancel, the
progress and results appear, and the segments land in the scene.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtWidgets = pytest.importorskip("PySide6.QtWidgets", reason="PySide6 is not installed")
slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)
pytest.importorskip("SimpleITK")
safetensorsNumpy = pytest.importorskip("safetensors.numpy")
import slicer.util  # noqa: E402
import vtk  # noqa: E402
from PySide6 import QtCore  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MaskSAMSlicer"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MaskSAMSlicer.ui"
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import slicer_qt_shims as shims  # noqa: E402

PY = sys.executable
TERMINOLOGY_KIDNEY = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical "
    "Structure~SCT^64033007^Kidney~^^~Anatomic codes - DICOM master list~^^~^^"
)

FAKE_SEGMENT = textwrap.dedent(
    """
    # Stand-in for `masksam segment`: same arguments, progress events, a label map on the grid.
    import json, os, sys, time
    import numpy as np, SimpleITK as sitk
    args = sys.argv[1:]
    src, out = args[0], args[args.index("--out") + 1]
    def emit(**e):
        print(json.dumps({"v": 1, **e}), flush=True)
    emit(event="start", stage="segment", done=0, total=2, device="cpu")
    delay = float(os.environ.get("FAKE_DELAY", "0"))
    for i in (1, 2):
        time.sleep(delay)
        emit(event="progress", stage="segment", done=i, total=2, eta_s=delay)
    image = sitk.ReadImage(src)
    a = sitk.GetArrayFromImage(image)
    lab = (a > 100).astype(np.uint8)
    result = sitk.GetImageFromArray(lab)
    result.CopyInformation(image)
    sitk.WriteImage(result, out)
    emit(event="done", stage="segment", output=out)
    """
)


# ----------------------------------------------------------------------------- environment
class Recorder:
    """What the user would have seen in dialogs, and scripted answers to questions."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.questions: list[str] = []
        self.answers: list[bool] = []
        self.selectedModules: list[str] = []

    def ask(self, text, **_kwargs) -> bool:
        self.questions.append(text)
        return self.answers.pop(0) if self.answers else False


def makeParameterNodeWrapper():
    """A small ``slicer.parameterNodeWrapper``: enough to run parameters.py's declaration."""
    module = types.ModuleType("slicer.parameterNodeWrapper")

    class WithinRange:
        def __init__(self, low, high):
            self.low, self.high = low, high

    def parameterNodeWrapper(cls):
        fields = dict(cls.__annotations__)

        def init(self, parameterNode):
            self.parameterNode = parameterNode
            for name in fields:
                setattr(self, name, getattr(cls, name, None))

        cls.__init__ = init
        cls.connectGui = lambda self, ui: ("tag", sorted(fields))
        cls.disconnectGui = lambda self, tag: None
        return cls

    module.WithinRange = WithinRange
    module.parameterNodeWrapper = parameterNodeWrapper
    return module


@pytest.fixture(scope="module")
def app():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


@pytest.fixture
def env(app, monkeypatch, tmp_path):
    """A scene, the stand-in application and the panel's module widget; returns a namespace."""
    QtCore.QSettings.setDefaultFormat(QtCore.QSettings.IniFormat)
    QtCore.QSettings.setPath(QtCore.QSettings.IniFormat, QtCore.QSettings.UserScope,
                             str(tmp_path / "settings"))
    QtCore.QCoreApplication.setOrganizationName("MaskSAMSlicerWidgetTest")
    shims.installQtModules(monkeypatch)
    scene = slicer.vtkMRMLScene()
    recorder = Recorder()
    monkeypatch.setenv("MASKSAM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    application = types.SimpleNamespace(
        temporaryPath=str(tmp_path), testingEnabled=lambda: False,
        processEvents=app.processEvents, layoutManager=lambda: None,
        majorVersion=5, minorVersion=10)
    monkeypatch.setattr(slicer, "app", application, raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(), raising=False)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", makeParameterNodeWrapper())

    @contextmanager
    def waitCursor():
        yield

    def progressDialog(labelText="", maximum=100, **_kwargs):
        dialog = QtWidgets.QProgressDialog(labelText, "Cancel", 0, maximum)
        return shims.PythonQtProxy(dialog)

    for name, value in {
        "loadUI": shims.loadUI,
        "childWidgetVariables": shims.childWidgetVariables,
        "errorDisplay": lambda text, **kw: recorder.errors.append(text),
        "confirmOkCancelDisplay": recorder.ask,
        "confirmYesNoDisplay": recorder.ask,
        "createProgressDialog": progressDialog,
        "WaitCursor": waitCursor,
        "mainWindow": lambda: None,
        "selectModule": recorder.selectedModules.append,
        "setSliceViewerLayers": lambda **kw: None,
    }.items():
        monkeypatch.setattr(slicer.util, name, value, raising=False)
    from MaskSAMSlicerLib.install import DependencyInstaller

    monkeypatch.setattr(DependencyInstaller, "isReady", lambda self: True)
    resources = tmp_path / "module" / "Resources"
    resources.mkdir(parents=True)
    (resources / "models.json").write_text((REPO / "Resources" / "models.json").read_text())

    container = QtWidgets.QWidget()
    layout = QtWidgets.QVBoxLayout(container)

    def resourcePath(relative: str) -> str:
        if relative == "models.json":
            return str(resources / "models.json")
        return str(MODULE_DIR / "Resources" / relative)

    moduleWidget = types.SimpleNamespace(layout=layout, resourcePath=resourcePath,
                                         parent=types.SimpleNamespace(isEntered=False))
    namespace = types.SimpleNamespace(scene=scene, recorder=recorder, app=app, tmp=tmp_path,
                                      moduleWidget=moduleWidget, container=container,
                                      resources=resources, application=application, panels=[])
    yield namespace
    for panel in namespace.panels:  # also after a failed test: no timer or child left behind
        try:
            panel.cleanup()
        except Exception:  # noqa: BLE001 - a panel whose setup failed
            pass
    container.deleteLater()
    app.processEvents()


def makePanel(env):
    for name in [n for n in sys.modules if n.startswith("MaskSAMSlicerLib.")]:
        if name.endswith(("widget", "parameters", "Section")):
            del sys.modules[name]
    from MaskSAMSlicerLib.parameters import MaskSAMSlicerParameterNode
    from MaskSAMSlicerLib.promptLogic import PromptLogic
    from MaskSAMSlicerLib.segmentationLogic import SegmentationLogic
    from MaskSAMSlicerLib.trainingLogic import TrainingLogic
    from MaskSAMSlicerLib.widget import MaskSAMSlicerPanel

    owner = env.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "MaskSAMSlicer")
    parameterNode = MaskSAMSlicerParameterNode(owner)
    logic = types.SimpleNamespace(
        segmentation=SegmentationLogic(env.scene, python=PY),
        training=TrainingLogic(env.scene, python=PY),
        prompt=PromptLogic(env.scene, python=PY),
        getParameterNode=lambda: parameterNode,
    )
    panel = MaskSAMSlicerPanel(env.moduleWidget, logic)
    env.panels.append(panel)
    panel.setup()
    return panel


def pump(env, until, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not until():
        env.app.processEvents()
        assert time.monotonic() < deadline, "timed out waiting for the panel"
        time.sleep(0.02)


def addVolume(scene, name="CT"):
    array = np.full((6, 12, 14), -100, np.int16)
    array[1:5, 3:9, 3:10] = 200
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(volume, array)
    volume.SetSpacing(0.9, 0.8, 2.5)
    volume.CreateDefaultDisplayNodes()
    return volume, array


def makeModelDir(folder: Path, names) -> Path:
    from MaskSAMLib.config import make_labels, make_model_config

    folder.mkdir(parents=True)
    make_model_config(backbone="tiny", labels=make_labels(["background", *names])).save(
        folder / "config.json")
    safetensorsNumpy.save_file({"w": np.zeros(2, np.float32)}, str(folder / "model.safetensors"))
    return folder


def useFakeChild(panel, env, delay=0.0):
    script = env.tmp / "fake_segment.py"
    script.write_text(FAKE_SEGMENT)
    logic = panel.logic.segmentation
    original = logic.buildCommand

    def build(inputPath, model, outputPath, device, speed):
        args = original(inputPath, model, outputPath, device, speed)
        assert args[1:4] == ["-m", "MaskSAMLib", "segment"]
        return [PY, str(script), *args[4:]]

    logic.buildCommand = build
    logic.environment = {**os.environ, "FAKE_DELAY": str(delay)}


# ----------------------------------------------------------------------------- tests
def test_panel_builds_and_says_how_to_get_a_model(env):
    panel = makePanel(env)
    ui = panel.ui
    assert ui.mainTabWidget.count == 3
    assert ui.applyButton.text == "Apply" and not ui.applyButton.enabled
    assert ui.applyButton.toolTip == "Select an input volume first."
    assert not ui.noModelLabel.isHidden()  # no model yet: the hint is shown
    assert ui.modelSelector.currentText == "(no model yet)"
    assert ui.baseModelSelector.currentText == "LiteMedSAM"
    assert ui.workFolderPathLineEdit.currentPath.endswith("training-cases")
    assert not ui.stopTrainingButton.enabled and not ui.resumeTrainingButton.enabled
    assert env.recorder.errors == []


def test_apply_runs_the_child_shows_progress_and_imports_segments(env):
    volume, array = addVolume(env.scene)
    modelDir = makeModelDir(env.tmp / "home" / "models" / "abdomen", ["liver"])
    panel = makePanel(env)
    useFakeChild(panel, env, delay=0.4)
    ui = panel.ui
    panel.autoSegment.refreshModels(selectPath=str(modelDir))
    ui.inputVolumeSelector.setCurrentNode(volume)
    assert "1 classes: liver" in ui.modelInfoLabel.text
    assert ui.applyButton.enabled and ui.applyButton.toolTip == "Run auto-segmentation."
    ui.applyButton.click()
    assert ui.applyButton.text == "Cancel" and ui.applyButton.enabled
    assert not ui.startTrainingButton.enabled
    assert "Segmenting 'CT' with 'abdomen'" in ui.logTextEdit.plainText
    pump(env, lambda: "segment: 1/2" in ui.statusLabel.text)
    pump(env, lambda: ui.applyButton.text == "Apply")
    assert ui.statusLabel.text.startswith("Done") and "1 segments" in ui.statusLabel.text
    assert ui.resultsTable.rowCount == 1
    assert ui.resultsTable.item(0, 0).text() == "liver"
    voxelMl = 0.9 * 0.8 * 2.5 / 1000
    assert float(ui.resultsTable.item(0, 1).text()) == pytest.approx(
        (array > 100).sum() * voxelMl, abs=0.05)
    assert ui.correctButton.enabled and ui.addToTrainingButton.enabled
    assert ui.progressBar.value == 100
    segNodes = env.scene.GetNodesByClass("vtkMRMLSegmentationNode")
    assert segNodes.GetNumberOfItems() == 1
    segment = segNodes.GetItemAsObject(0).GetSegmentation().GetNthSegment(0)
    assert segment.GetName() == "liver" and "SCT^10200004^Liver" in segment.GetTerminology()
    assert env.recorder.errors == []


def test_cancel_while_segmenting_changes_nothing(env):
    volume, _ = addVolume(env.scene)
    modelDir = makeModelDir(env.tmp / "home" / "models" / "m", ["liver"])
    panel = makePanel(env)
    useFakeChild(panel, env, delay=20)
    ui = panel.ui
    panel.autoSegment.refreshModels(selectPath=str(modelDir))
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.applyButton.click()
    section = panel.autoSegment
    pump(env, lambda: section._segJob is not None and section._segJob.runner.startEvent)
    ui.applyButton.click()  # Cancel
    assert ui.statusLabel.text == "Cancelling..." and not ui.applyButton.enabled
    pump(env, lambda: ui.applyButton.text == "Apply", timeout=30)
    assert "cancelled" in ui.statusLabel.text
    assert env.scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


def test_replacing_a_segmentation_needs_a_yes(env):
    volume, _ = addVolume(env.scene)
    modelDir = makeModelDir(env.tmp / "home" / "models" / "m", ["liver"])
    mine = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my work")
    mine.GetSegmentation().AddEmptySegment("a", "a")
    panel = makePanel(env)
    ui = panel.ui
    panel.autoSegment.refreshModels(selectPath=str(modelDir))
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.outputSegmentationSelector.setCurrentNode(mine)
    env.recorder.answers = [False]
    ui.applyButton.click()
    assert "'my work' already holds 1 segments" in env.recorder.questions[-1]
    assert ui.statusLabel.text == "Nothing was changed." and panel.autoSegment._segJob is None
    assert mine.GetSegmentation().GetNthSegment(0).GetName() == "a"


def test_crop_without_roi_is_refused_with_a_message(env):
    volume, _ = addVolume(env.scene)
    modelDir = makeModelDir(env.tmp / "home" / "models" / "m", ["liver"])
    panel = makePanel(env)
    ui = panel.ui
    panel.autoSegment.refreshModels(selectPath=str(modelDir))
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.cropCheckBox.checked = True
    assert ui.roiSelector.enabled
    ui.applyButton.click()
    assert "no ROI is selected" in env.recorder.errors[-1]
    assert panel.autoSegment._segJob is None


def test_old_slicer_gets_a_message_instead_of_a_run(env, monkeypatch):
    env.application.majorVersion, env.application.minorVersion = 5, 8
    volume, _ = addVolume(env.scene)
    modelDir = makeModelDir(env.tmp / "home" / "models" / "m", ["liver"])
    panel = makePanel(env)
    ui = panel.ui
    panel.autoSegment.refreshModels(selectPath=str(modelDir))
    ui.inputVolumeSelector.setCurrentNode(volume)
    assert "needs 3D Slicer 5.10 or later" in ui.statusLabel.text
    assert "Slicer 5.8" in ui.trainStatusLabel.text
    assert not ui.applyButton.enabled and not ui.startTrainingButton.enabled
    panel.autoSegment.onApplyButton()  # e.g. from a script: still refused, with the message
    assert "Slicer 5.10" in env.recorder.errors[-1] and panel.autoSegment._segJob is None
    panel.train.onStartTraining()
    assert panel.train._trainJob is None


def test_add_case_and_remove_case_from_the_train_tab(env):
    volume, array = addVolume(env.scene)
    seg = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT seg")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentId = seg.GetSegmentation().AddEmptySegment("", "liver", (0.2, 0.4, 0.6))
    labelmap = env.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    slicer.util.updateVolumeFromArray(labelmap, (array > 100).astype(np.uint8))
    labelmap.CopyOrientation(volume)
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        labelmap, seg, ids)
    env.scene.RemoveNode(labelmap)
    panel = makePanel(env)
    ui = panel.ui
    ui.caseVolumeSelector.setCurrentNode(volume)
    ui.caseSegmentationSelector.setCurrentNode(seg)
    assert ui.addCaseButton.enabled
    ui.addCaseButton.click()
    assert ui.trainStatusLabel.text == "Added case_0001 (CT + CT seg: liver)."
    assert ui.casesTable.rowCount == 1 and ui.casesTable.item(0, 0).text() == "case_0001"
    assert ui.classesLabel.text == "1 cases, 1 classes: liver."
    ui.casesTable.selectRow(0)
    assert ui.removeCaseButton.enabled
    env.recorder.answers = [True]
    ui.removeCaseButton.click()
    assert ui.casesTable.rowCount == 0 and "Remove case_0001" in env.recorder.questions[-1]


def test_model_download_runs_off_the_gui_thread_and_can_be_cancelled(env):
    import zipfile

    from MaskSAMLib.files import sha256_file as sha256OfFile

    source = makeModelDir(env.tmp / "published", ["liver", "spleen"])
    archive = env.tmp / "published.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in source.iterdir():
            zf.write(f, f"published/{f.name}")
    registry = json.loads((env.resources / "models.json").read_text())
    registry["models"] = [{"name": "published", "url": archive.as_uri(),
                           "sha256": sha256OfFile(archive), "backbone": "tiny",
                           "classes": ["liver", "spleen"]}]
    (env.resources / "models.json").write_text(json.dumps(registry))
    panel = makePanel(env)
    ui = panel.ui
    assert ui.modelSelector.currentText.startswith("published")
    assert not ui.downloadModelButton.isHidden() and ui.downloadModelButton.enabled
    env.recorder.answers = [False]
    ui.downloadModelButton.click()  # declined: nothing happens
    assert panel.autoSegment._fetch is None and "SHA-256" in env.recorder.questions[-1]
    env.recorder.answers = [True]
    ui.downloadModelButton.click()
    assert panel.autoSegment._fetch is not None and not ui.downloadModelButton.enabled
    pump(env, lambda: panel.autoSegment._fetch is None)
    assert env.recorder.errors == []
    assert "ready" in ui.statusLabel.text
    model = panel.autoSegment.selectedModel()
    assert model.available and model.name == "published"


def test_the_training_plot_view_is_owned_by_the_panel_and_not_saved(env):
    panel = makePanel(env)
    panel.logic.training.createCurveNodes()
    panel.train._connectPlot()
    view = panel.ui.curvesPlotWidget._obj.plotViewNode
    assert view.GetParentLayoutNode() is not None
    assert view.GetParentLayoutNode() is panel.logic.getParameterNode().parameterNode
    assert not view.GetSaveWithScene()
    panel.train._connectPlot()  # the same view node again, not a second one
    assert env.scene.GetNodesByClass("vtkMRMLPlotViewNode").GetNumberOfItems() == 1


def test_the_proxies_are_strict_like_pythonqt(app):
    button = shims.PythonQtProxy(QtWidgets.QPushButton("x"))
    button.text = "Cancel"
    assert button.text == "Cancel"
    with pytest.raises(AttributeError, match="no Qt property 'txt'"):
        button.txt = "typo"
    with pytest.raises(AttributeError):
        _ = button.enabledd
    with pytest.raises(AttributeError, match="no signal"):
        button.connect("pressedd()", lambda: None)


def test_a_renamed_ui_widget_fails_the_panel_setup(env, monkeypatch, tmp_path):
    renamed = tmp_path / "Renamed.ui"
    renamed.write_text(UI_FILE.read_text().replace('name="applyButton"', 'name="runButton"'))
    original = env.moduleWidget.resourcePath
    env.moduleWidget.resourcePath = lambda rel: (str(renamed) if rel.startswith("UI/")
                                                 else original(rel))
    with pytest.raises(AttributeError, match="applyButton"):
        makePanel(env)


# ----------------------------------------------------------------------------- Prompt section
FAKE_WORKER = textwrap.dedent(
    """
    # Stand-in for `masksam worker`: the protocol of INTERFACES.md; a request "segments" the
    # voxels above 100 HU, one slice per progress event, and can be cancelled between slices.
    import json, os, queue, sys, threading, time
    import numpy as np, SimpleITK as sitk
    lines = queue.Queue()
    def read():
        for line in sys.stdin:
            lines.put(json.loads(line))
        lines.put({"request": "stop"})
    threading.Thread(target=read, daemon=True).start()
    def emit(**e):
        print(json.dumps({"v": 1, **e}), flush=True)
    runs = 0
    pending = []
    while True:
        request = pending.pop(0) if pending else lines.get()
        if request["request"] == "stop":
            break
        if request["request"] != "segment":
            continue
        rid = request["id"]
        delay = float(open(os.environ["FAKE_DELAY_FILE"]).read() or 0)
        image = sitk.ReadImage(request["volume"])
        a = sitk.GetArrayFromImage(image)
        emit(id=rid, event="start", stage="prompt", done=0, total=a.shape[0])
        cancelled = False
        for k in range(a.shape[0]):
            time.sleep(delay)
            while not lines.empty():
                other = lines.get()
                if other["request"] == "cancel" and other.get("id") == rid:
                    cancelled = True
                else:
                    pending.append(other)
            if cancelled:
                break
            emit(id=rid, event="progress", stage="prompt", done=k + 1, total=a.shape[0])
        if cancelled:
            emit(id=rid, event="error", cancelled=True, message="Cancelled; nothing was written.")
            continue
        result = sitk.GetImageFromArray((a > 100).astype(np.uint8))
        result.CopyInformation(image)
        sitk.WriteImage(result, request["out"])
        emit(id=rid, event="done", stage="prompt", output=request["out"],
             segments=[{"name": request["prompts"]["structures"][0]["name"],
                        "encoder_runs": 0 if runs else a.shape[0]}])
        runs += 1
    """
)


def addViewSingletons(scene) -> None:
    """The selection and interaction nodes the application's views use for place mode."""
    for node in (slicer.vtkMRMLSelectionNode(), slicer.vtkMRMLInteractionNode()):
        node.SetSingletonTag("Singleton")
        scene.AddNode(node)


def useFakeWorker(panel, env, monkeypatch):
    from MaskSAMSlicerLib.promptLogic import PromptWorker

    script = env.tmp / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    delayFile = env.tmp / "delay"
    delayFile.write_text("0.05")
    monkeypatch.setattr(PromptWorker, "command", lambda self: [PY, str(script)])
    panel.logic.prompt.environment = {**os.environ, "FAKE_DELAY_FILE": str(delayFile)}
    return delayFile


def test_prompt_section_segments_undoes_cancels_and_stops_with_the_scene(env, monkeypatch):
    from MaskSAMSlicerLib.promptLogic import segmentMask
    from MaskSAMSlicerLib.segmentationLogic import registerSegmentationConverterRules

    registerSegmentationConverterRules()
    psutil = pytest.importorskip("psutil")
    addViewSingletons(env.scene)
    volume, array = addVolume(env.scene)
    panel = makePanel(env)
    delayFile = useFakeWorker(panel, env, monkeypatch)
    ui = panel.ui
    ui.promptVolumeSelector.setCurrentNode(volume)
    assert ui.promptSegmentButton.text == "Segment" and not ui.promptSegmentButton.enabled
    assert ui.promptSegmentButton.toolTip.startswith("Place a box")
    assert ui.promptSegmentSelector.currentText == "(new segment)"
    assert not ui.promptUndoButton.enabled

    # Place: a new ROI, chosen in the selector, and the views in place mode for it.
    ui.placeRoiButton.click()
    roi = ui.promptRoiSelector.currentNode()
    assert roi is not None and roi.IsA("vtkMRMLMarkupsROINode")
    interaction = env.scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
    selection = env.scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
    assert interaction.GetCurrentInteractionMode() == interaction.Place
    assert selection.GetActivePlaceNodeID() == roi.GetID()
    assert "Draw the box" in ui.promptStatusLabel.text
    roi.SetXYZ(6.0, 4.5, 7.5)
    roi.SetRadiusXYZ(4.0, 3.0, 5.0)
    assert ui.promptSegmentButton.enabled

    # Segment into a new segment of a new segmentation: Cancel while running, then the result.
    ui.promptNewSegmentNameLineEdit.text = "kidney"
    ui.promptSegmentButton.click()
    assert ui.promptSegmentButton.text == "Cancel" and not ui.placeRoiButton.enabled
    pump(env, lambda: ui.promptSegmentButton.text == "Segment")
    assert env.recorder.errors == []
    assert ui.promptStatusLabel.text.startswith("'kidney':") and "mL" in ui.promptStatusLabel.text
    segNodes = env.scene.GetNodesByClass("vtkMRMLSegmentationNode")
    assert segNodes.GetNumberOfItems() == 1
    segmentationNode = segNodes.GetItemAsObject(0)
    assert segmentationNode.GetName() == "CT prompts"
    assert ui.promptSegmentationSelector.currentNode() is segmentationNode
    assert ui.promptSegmentSelector.currentText == "kidney"  # the next click corrects it
    segmentation = segmentationNode.GetSegmentation()
    segmentId = segmentation.GetNthSegmentID(0)
    assert np.array_equal(segmentMask(segmentationNode, segmentId, volume), array > 100)
    assert ui.promptUndoButton.enabled and ui.promptAddToTrainingButton.enabled
    pid = panel.logic.prompt.worker.pid()

    # Again into the same segment: colour and terminology kept, the worker stayed warm.
    segment = segmentation.GetSegment(segmentId)
    segment.SetColor(0.2, 0.4, 0.6)
    segment.SetTerminology(TERMINOLOGY_KIDNEY)
    ui.promptModeSelector.setCurrentIndex(ui.promptModeSelector.findText("Add to the segment"))
    ui.promptSegmentButton.click()
    pump(env, lambda: ui.promptSegmentButton.text == "Segment")
    assert "already encoded were reused" in ui.promptStatusLabel.text
    assert panel.logic.prompt.worker.pid() == pid
    assert segmentation.GetNumberOfSegments() == 1
    assert segment.GetName() == "kidney" and segment.GetTerminology() == TERMINOLOGY_KIDNEY
    assert segment.GetColor() == pytest.approx((0.2, 0.4, 0.6))

    # Undo twice: the segment as it was, then gone (it was made by the first Segment).
    ui.promptUndoButton.click()
    assert "Undone" in ui.promptStatusLabel.text and segmentation.GetNumberOfSegments() == 1
    ui.promptUndoButton.click()
    assert segmentation.GetNumberOfSegments() == 0
    assert ui.promptSegmentSelector.currentText == "(new segment)"
    assert not ui.promptUndoButton.enabled

    # Cancel: the request ends cancelled and nothing is added.
    delayFile.write_text("1.0")
    ui.promptSegmentButton.click()
    job = panel.prompt._job
    pump(env, lambda: any(e.get("event") == "start" for e in job.events))
    ui.promptSegmentButton.click()  # Cancel
    assert ui.promptStatusLabel.text == "Cancelling..." and not ui.promptSegmentButton.enabled
    pump(env, lambda: ui.promptSegmentButton.text == "Segment", timeout=30)
    assert "cancelled" in ui.promptStatusLabel.text
    assert segmentation.GetNumberOfSegments() == 0 and env.recorder.errors == []

    # Closing the scene stops the worker.
    panel.onSceneStartClose(None, None)
    assert panel.logic.prompt.worker is None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_prompt_section_without_views_or_volume_says_why(env, monkeypatch):
    panel = makePanel(env)
    ui = panel.ui
    panel.prompt.onSegment()  # e.g. from a script with nothing chosen
    assert env.recorder.errors[-1] == "Select the volume to segment first."
    ui.placePositiveButton.click()  # no views in this scene: a message, not a traceback
    assert ui.promptPositivePointsSelector.currentNode() is not None
    assert "no views to place markups in" in env.recorder.errors[-1]
