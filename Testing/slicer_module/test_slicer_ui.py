"""The module's .ui loads in PySide6 (offscreen) and agrees with the widget code.

CTK/MRML classes do not exist outside Slicer, so the loader maps each to a plain Qt stand-in.
Renderings of both tabs are made from the loaded .ui; they are stand-in renderings (plain Qt
widgets, example values), not Slicer screenshots, and say so on the image. Set
``MASKSAM_WRITE_SCREENSHOTS=1`` to refresh ``Resources/Screenshots/`` with them.
"""

from __future__ import annotations

import ast
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtWidgets = pytest.importorskip("PySide6.QtWidgets", reason="PySide6 is not installed")
from PySide6 import QtCore, QtGui, QtUiTools  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MaskSAMSlicer"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MaskSAMSlicer.ui"
#: The panel's code: the shell (widget.py) and its sections.
PANEL_CODE = [MODULE_DIR / "MaskSAMSlicerLib" / f"{name}.py" for name in
              ("widget", "panelSection", "autoSegmentSection", "trainSection", "promptSection")]
PARAMETERS_CODE = MODULE_DIR / "MaskSAMSlicerLib" / "parameters.py"
SCREENSHOTS = REPO / "Resources" / "Screenshots"
CAPTION = ("Stand-in rendering of the MaskSAM module panel (PySide6; CTK/MRML widgets drawn as "
           "plain Qt widgets; example values) - not a Slicer screenshot.")


class CollapsibleStandIn(QtWidgets.QGroupBox):
    """ctkCollapsibleButton: a titled box (``text`` and ``collapsed`` properties)."""

    def _text(self) -> str:
        return self.title()

    def _setText(self, text: str) -> None:
        self.setTitle(text)

    def _collapsed(self) -> bool:
        return bool(self.property("_collapsed"))

    def _setCollapsed(self, value: bool) -> None:
        self.setProperty("_collapsed", value)
        self.setMaximumHeight(24 if value else 16777215)  # title only, like a collapsed button

    text = QtCore.Property(str, _text, _setText)
    collapsed = QtCore.Property(bool, _collapsed, _setCollapsed)


class PlotStandIn(QtWidgets.QFrame):
    """qMRMLPlotWidget: draws two example curves (loss falling, Dice rising)."""

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        painter = QtGui.QPainter(self)
        painter.setRenderHint(QtGui.QPainter.Antialiasing)
        rect = self.rect().adjusted(34, 10, -10, -22)
        painter.fillRect(self.rect(), QtGui.QColor("white"))
        painter.setPen(QtGui.QColor("#888"))
        painter.drawRect(rect)
        painter.drawText(rect.left(), rect.bottom() + 16, "iteration")
        for colour, values in (
            ("#d9482b", [1.9, 1.4, 1.1, 0.95, 0.86, 0.8, 0.77, 0.74]),
            ("#2f6fd6", [0.05, 0.22, 0.41, 0.55, 0.63, 0.69, 0.72, 0.74]),
        ):
            pen = QtGui.QPen(QtGui.QColor(colour), 2)
            painter.setPen(pen)
            points = [QtCore.QPointF(rect.left() + rect.width() * i / (len(values) - 1),
                                     rect.bottom() - rect.height() * v / 2.0)
                      for i, v in enumerate(values)]
            painter.drawPolyline(points)
        painter.setPen(QtGui.QColor("#d9482b"))
        painter.drawText(rect.left() + 8, rect.top() + 16, "loss")
        painter.setPen(QtGui.QColor("#2f6fd6"))
        painter.drawText(rect.left() + 50, rect.top() + 16, "validation Dice")
        painter.end()


STAND_INS = {
    "qMRMLWidget": QtWidgets.QWidget,
    "qMRMLNodeComboBox": QtWidgets.QComboBox,
    "ctkCollapsibleButton": CollapsibleStandIn,
    "ctkPathLineEdit": QtWidgets.QLineEdit,
    "qMRMLPlotWidget": PlotStandIn,
}


class StandInLoader(QtUiTools.QUiLoader):
    def __init__(self) -> None:
        super().__init__()
        self.created: list[tuple[str, str]] = []

    def createWidget(self, className, parent=None, name=""):  # noqa: N802 - Qt API
        self.created.append((className, name))
        if className in STAND_INS:
            widget = STAND_INS[className](parent)
            widget.setObjectName(name)
            return widget
        return super().createWidget(className, parent, name)


@pytest.fixture(scope="module")
def app():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def loadUi(app):
    loader = StandInLoader()
    handle = QtCore.QFile(str(UI_FILE))
    assert handle.open(QtCore.QFile.ReadOnly)
    widget = loader.load(handle)
    handle.close()
    assert widget is not None, loader.errorString()
    return widget, loader


def objectNames(widget) -> set[str]:
    return {o.objectName() for o in widget.findChildren(QtCore.QObject) if o.objectName()}


def test_ui_loads_and_has_every_widget_the_code_uses(app):
    widget, loader = loadUi(app)
    names = objectNames(widget)
    code = "\n".join(path.read_text() for path in PANEL_CODE)
    used = set(re.findall(r"(?:self\.ui|\bui)\.([A-Za-z_]\w*)", code))
    used |= set(re.findall(r'getattr\((?:self\.)?ui, "(\w+)"\)', code))
    for match in re.finditer(r"for name in \(([^)]*)\):\s*\n\s*getattr\((?:self\.)?ui, name\)",
                             code):
        used |= set(re.findall(r'"(\w+)"', match.group(1)))
    used |= set(re.findall(r'\("(prompt\w+Selector)", "vtkMRML', code))
    assert len(used) > 60
    missing = used - names
    assert missing == set(), f"the panel code uses widgets missing from the .ui: {missing}"
    # Every custom class in the .ui was created through a stand-in (a new CTK/MRML class in the
    # .ui needs one here, and a declaration in <customwidgets>).
    tree = ET.parse(UI_FILE)
    declared = {c.findtext("class") for c in tree.iter("customwidget")}
    used_classes = {w.get("class") for w in tree.iter("widget")}
    custom = {c for c in used_classes if not c.startswith("Q")}
    assert custom <= declared and custom <= set(STAND_INS)
    assert {cls for cls, _ in loader.created} >= custom


def test_tabs_and_research_notice(app):
    widget, _ = loadUi(app)
    tabs = widget.findChild(QtWidgets.QTabWidget, "mainTabWidget")
    assert [tabs.tabText(i) for i in range(tabs.count())] == ["Auto-segment", "Train", "Prompt"]
    notice = widget.findChild(QtWidgets.QLabel, "researchNoticeLabel").text()
    assert "Research use only" in notice and "not for diagnosis" in notice
    device = widget.findChild(QtWidgets.QComboBox, "deviceSelector")
    assert [device.itemText(i) for i in range(device.count())] == ["Auto", "CPU", "CUDA"]
    speed = widget.findChild(QtWidgets.QComboBox, "speedSelector")
    assert [speed.itemText(i) for i in range(speed.count())] == ["Fast", "Standard",
                                                                  "Accurate (TTA)"]
    assert speed.currentText() == "Standard"
    # The speed/device texts are the ones the logic understands.
    import sys

    sys.path.insert(0, str(MODULE_DIR))
    pytest.importorskip("SimpleITK")
    from MaskSAMSlicerLib.segmentationLogic import deviceValue, speedFlags

    assert [deviceValue(device.itemText(i)) for i in range(3)] == ["auto", "cpu", "cuda"]
    assert [speedFlags(speed.itemText(i)) for i in range(3)] == [["--fast"], [], ["--tta"]]


def test_parameter_names_bind_to_parameter_node_fields(app):
    tree = ET.parse(UI_FILE)
    bound = {}
    for node in tree.iter("widget"):
        for prop in node.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = node.get("name")
    module = ast.parse(PARAMETERS_CODE.read_text())
    cls = next(n for n in module.body if isinstance(n, ast.ClassDef))
    fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    assert set(bound) == fields, (set(bound) ^ fields)
    # MRML widgets get the scene through the .ui's mrmlSceneChanged connections.
    receivers = {c.findtext("receiver") for c in tree.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml = {w.get("name") for w in tree.iter("widget")
            if w.get("class") in ("qMRMLNodeComboBox", "qMRMLPlotWidget")}
    assert receivers == mrml


def applyExampleState(widget, tab: int) -> None:
    """Fill the stand-ins the way the panel looks during real use (example values)."""
    find = widget.findChild
    find(QtWidgets.QTabWidget, "mainTabWidget").setCurrentIndex(tab)
    find(QtWidgets.QComboBox, "inputVolumeSelector").addItem("CTChest")
    find(QtWidgets.QComboBox, "modelSelector").addItem(
        "abdomen-phantoms [liver, spleen, kidney_left, kidney_right, ...]")
    find(QtWidgets.QLabel, "modelInfoLabel").setText(
        "6 classes: liver, spleen, kidney_left, kidney_right, aorta, spine. Backbone: litemedsam.")
    for name in ("noModelLabel", "downloadModelButton", "importModelFileButton"):
        find(QtWidgets.QWidget, name).setVisible(False)
    find(QtWidgets.QLabel, "deviceInfoLabel").setText("CPU only (no CUDA GPU found)")
    find(QtWidgets.QComboBox, "roiSelector").addItem("R")
    find(QtWidgets.QComboBox, "outputSegmentationSelector").addItem("Create new segmentation")
    find(QtWidgets.QPushButton, "applyButton").setText("Apply")
    find(QtWidgets.QProgressBar, "progressBar").setValue(100)
    find(QtWidgets.QLabel, "statusLabel").setText(
        "Done: 6 segments in 'CTChest MaskSAM (abdomen-phantoms)'. Review them; 'Correct in "
        "Segment Editor' to fix.")
    table = find(QtWidgets.QTableWidget, "resultsTable")
    table.setColumnCount(2)
    table.setHorizontalHeaderLabels(["Segment", "Volume (mL)"])
    rows = [("liver", "1512.4"), ("spleen", "187.0"), ("kidney_left", "160.2"),
            ("kidney_right", "151.9"), ("aorta", "61.5"), ("spine", "322.8")]
    table.setRowCount(len(rows))
    for r, (name, volume) in enumerate(rows):
        table.setItem(r, 0, QtWidgets.QTableWidgetItem(name))
        table.setItem(r, 1, QtWidgets.QTableWidgetItem(volume))
    table.horizontalHeader().setSectionResizeMode(QtWidgets.QHeaderView.Stretch)
    find(QtWidgets.QLineEdit, "workFolderPathLineEdit").setText("~/.masksam/training-cases")
    find(QtWidgets.QWidget, "datasetFolderPathLineEdit").setEnabled(False)
    find(QtWidgets.QComboBox, "caseVolumeSelector").addItem("CTChest")
    find(QtWidgets.QComboBox, "caseSegmentationSelector").addItem(
        "CTChest MaskSAM (abdomen-phantoms)")
    cases = find(QtWidgets.QTableWidget, "casesTable")
    cases.setColumnCount(4)
    cases.setHorizontalHeaderLabels(["Case", "Volume", "Segmentation", "Classes"])
    caseRows = [("case_0001", "CT 1", "CT 1 corrected", "liver, spleen"),
                ("case_0002", "CTChest", "CTChest MaskSAM", "liver, spleen, aorta")]
    cases.setRowCount(len(caseRows))
    for r, row in enumerate(caseRows):
        for c, text in enumerate(row):
            cases.setItem(r, c, QtWidgets.QTableWidgetItem(text))
    cases.horizontalHeader().setSectionResizeMode(QtWidgets.QHeaderView.Stretch)
    find(QtWidgets.QLabel, "classesLabel").setText("2 cases, 3 classes: liver, spleen, aorta.")
    find(QtWidgets.QComboBox, "baseModelSelector").addItem("LiteMedSAM")
    find(QtWidgets.QLineEdit, "samCheckpointPathLineEdit").setEnabled(False)
    find(QtWidgets.QLabel, "baseModelInfoLabel").setText(
        "LiteMedSAM's TinyViT encoder pretrained on medical images. Fast on CPU.")
    find(QtWidgets.QPushButton, "startTrainingButton").setEnabled(False)
    find(QtWidgets.QPushButton, "resumeTrainingButton").setEnabled(False)
    find(QtWidgets.QProgressBar, "trainProgressBar").setValue(35)
    find(QtWidgets.QLabel, "trainStatusLabel").setText(
        "train: 350/1000, ETA 4 min 10 s, loss 0.7712")
    find(QtWidgets.QLabel, "curvesLabel").setText("Validation mean Dice 0.741 at iteration 300")


def render(widget, app) -> QtGui.QImage:
    widget.resize(460, 1060)
    widget.show()
    app.processEvents()
    shot = widget.grab().toImage()
    captioned = QtGui.QImage(shot.width(), shot.height() + 40, QtGui.QImage.Format_RGB32)
    captioned.fill(QtGui.QColor("white"))
    painter = QtGui.QPainter(captioned)
    painter.drawImage(0, 0, shot)
    painter.setPen(QtGui.QColor("#444"))
    painter.drawText(QtCore.QRect(6, shot.height() + 2, shot.width() - 12, 38),
                     QtCore.Qt.TextWordWrap, CAPTION)
    painter.end()
    widget.hide()
    return captioned


@pytest.mark.parametrize("tab,fileName", [(0, "AutoSegmentTab.png"), (1, "TrainTab.png")])
def test_render_each_tab(app, tmp_path, tab, fileName):
    widget, _ = loadUi(app)
    applyExampleState(widget, tab)
    image = render(widget, app)
    assert image.width() >= 400 and image.height() >= 900
    colours = {image.pixel(x, y) for x in range(0, image.width(), 7)
               for y in range(0, image.height(), 7)}
    assert len(colours) > 20, "the rendering is blank"
    out = tmp_path / fileName
    assert image.save(str(out))
    if os.environ.get("MASKSAM_WRITE_SCREENSHOTS") == "1" or not (SCREENSHOTS / fileName).exists():
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        assert image.save(str(SCREENSHOTS / fileName))
