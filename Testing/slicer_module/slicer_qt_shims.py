"""Thin PythonQt-style stand-ins so the module's panel (widget.py) runs on PySide6.

Inside Slicer, ``qt`` and ``ctk`` are PythonQt wrappers: a Qt property is a Python attribute
(``button.text = "Cancel"``, ``combo.currentIndex``), signals connect by C++ signature
(``combo.connect("currentIndexChanged(int)", slot)``), and ``slicer.util.loadUI`` /
``childWidgetVariables`` give the .ui's widgets by object name. Here:

- :class:`PythonQtProxy` wraps a PySide6 object the same way, strictly: reading or writing a
  name that is neither a Qt property nor a method raises ``AttributeError``, and connecting a
  signal the class does not have fails, so a wrong property or signal in widget.py fails a
  test;
- the CTK/MRML classes of the .ui (``ctkCollapsibleButton``, ``ctkPathLineEdit``,
  ``qMRMLNodeComboBox``, ``qMRMLPlotWidget``, ``qMRMLWidget``) get small PySide6 stand-ins
  with the properties, methods and signals the panel uses, and the MRML combo boxes list real
  MRML nodes (slicer-core);
- :func:`installQtModules` puts ``qt`` and ``ctk`` modules into ``sys.modules``.

Used by ``Testing/slicer_module/test_slicer_widget.py``; nothing here is shipped.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets


# ----------------------------------------------------------------------------- proxies
def _hasQtProperty(obj: QtCore.QObject, name: str) -> bool:
    return obj.metaObject().indexOfProperty(name) >= 0


def wrap(value):
    """QObjects come back wrapped (PythonQt exposes their properties as attributes)."""
    if isinstance(value, QtCore.QObject) and not isinstance(value, PythonQtProxy):
        return PythonQtProxy(value)
    return value


def unwrap(value):
    return value._obj if isinstance(value, PythonQtProxy) else value


class PythonQtProxy:
    """A PySide6 QObject seen the way PythonQt shows it to Slicer code."""

    __slots__ = ("_obj",)

    def __init__(self, obj: QtCore.QObject) -> None:
        object.__setattr__(self, "_obj", obj)

    def __getattr__(self, name: str):
        obj = self._obj
        if _hasQtProperty(obj, name):
            return obj.property(name)
        try:
            attr = getattr(obj, name)
        except AttributeError:
            raise AttributeError(
                f"{type(obj).__name__} '{obj.objectName()}' has no property or method "
                f"'{name}'") from None
        if callable(attr) and not isinstance(attr, (QtCore.SignalInstance,)):
            def call(*args, **kwargs):
                return wrap(attr(*[unwrap(a) for a in args],
                                 **{k: unwrap(v) for k, v in kwargs.items()}))

            return call
        return attr

    def __setattr__(self, name: str, value) -> None:
        obj = self._obj
        if not _hasQtProperty(obj, name):
            raise AttributeError(
                f"{type(obj).__name__} '{obj.objectName()}' has no Qt property '{name}' "
                "(PythonQt would not set it either)")
        meta = obj.metaObject().property(obj.metaObject().indexOfProperty(name))
        if not meta.isWritable():
            raise AttributeError(f"the Qt property '{name}' is read-only")
        if not obj.setProperty(name, unwrap(value)):
            raise TypeError(f"could not set {name}={value!r} on {type(obj).__name__}")

    def connect(self, signature: str, slot) -> None:
        """PythonQt's ``obj.connect("signal(args)", slot)``."""
        match = re.fullmatch(r"(\w+)\((.*)\)", signature)
        if match is None:
            raise ValueError(f"not a signal signature: {signature!r}")
        signal = getattr(self._obj, match.group(1), None)
        if not isinstance(signal, QtCore.SignalInstance):
            raise AttributeError(f"{type(self._obj).__name__} has no signal {signature}")
        signal.connect(slot)

    def __eq__(self, other) -> bool:
        return unwrap(other) is self._obj

    def __hash__(self) -> int:
        return id(self._obj)


# ----------------------------------------------------------------------------- stand-ins
class CollapsibleButton(QtWidgets.QGroupBox):
    """ctkCollapsibleButton: ``text`` and ``collapsed``."""

    def _text(self) -> str:
        return self.title()

    def _setText(self, text: str) -> None:
        self.setTitle(text)

    def _collapsed(self) -> bool:
        return bool(self.property("_collapsed"))

    def _setCollapsed(self, value: bool) -> None:
        self.setProperty("_collapsed", value)

    text = QtCore.Property(str, _text, _setText)
    collapsed = QtCore.Property(bool, _collapsed, _setCollapsed)


class PathLineEdit(QtWidgets.QWidget):
    """ctkPathLineEdit: ``currentPath``, ``filters``, ``nameFilters``, currentPathChanged."""

    Dirs = 0x001
    Files = 0x002
    currentPathChanged = QtCore.Signal(str)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._path = ""
        self._filters = 0
        self._nameFilters: list[str] = []
        self.lineEdit = QtWidgets.QLineEdit(self)

    def _getPath(self) -> str:
        return self._path

    def _setPath(self, path: str) -> None:
        if path != self._path:
            self._path = str(path)
            self.lineEdit.setText(self._path)
            self.currentPathChanged.emit(self._path)

    def _getFilters(self) -> int:
        return self._filters

    def _setFilters(self, value: int) -> None:
        self._filters = int(value)

    def _getNameFilters(self) -> list:
        return list(self._nameFilters)

    def _setNameFilters(self, value: list) -> None:
        self._nameFilters = [str(v) for v in value]

    currentPath = QtCore.Property(str, _getPath, _setPath)
    filters = QtCore.Property(int, _getFilters, _setFilters)
    nameFilters = QtCore.Property("QStringList", _getNameFilters, _setNameFilters)


class MRMLWidget(QtWidgets.QWidget):
    """qMRMLWidget: ``setMRMLScene`` (the .ui's top widget)."""

    def setMRMLScene(self, scene) -> None:  # noqa: N802 - Slicer API
        self.mrmlScene = scene


class NodeComboBox(QtWidgets.QComboBox):
    """qMRMLNodeComboBox over a real MRML scene: the nodes of ``nodeTypes``, optionally None.

    ``currentNode``/``setCurrentNode``/``currentNodeChanged(vtkMRMLNode*)`` and ``setMRMLScene``
    as in qMRMLNodeComboBox; the list is refreshed when the popup would open
    (:meth:`refreshNodes`), which tests call after adding nodes.
    """

    currentNodeChanged = QtCore.Signal(object)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._scene = None
        self._nodes: list = []
        self.currentIndexChanged.connect(self._emitNode)

    def _types(self) -> list[str]:
        value = self.property("nodeTypes") or []
        return [str(v) for v in value]

    def setMRMLScene(self, scene) -> None:  # noqa: N802
        self._scene = scene
        self.refreshNodes()

    def refreshNodes(self) -> None:  # noqa: N802
        current = self.currentNode()
        nodes = [None] if self.property("noneEnabled") else []
        if self._scene is not None:
            for nodeType in self._types():
                collection = self._scene.GetNodesByClass(nodeType)
                for i in range(collection.GetNumberOfItems()):
                    node = collection.GetItemAsObject(i)
                    if node.IsA("vtkMRMLLabelMapVolumeNode") and nodeType != \
                            "vtkMRMLLabelMapVolumeNode":
                        continue
                    if node.GetHideFromEditors():
                        continue
                    nodes.append(node)
        self.blockSignals(True)
        self.clear()
        self._nodes = nodes
        for node in nodes:
            self.addItem(node.GetName() if node is not None else "None")
        index = nodes.index(current) if current in nodes else (0 if nodes else -1)
        self.setCurrentIndex(index)
        self.blockSignals(False)
        if self.currentNode() is not current:
            self.currentNodeChanged.emit(self.currentNode())

    def currentNode(self):  # noqa: N802
        index = self.currentIndex()
        return self._nodes[index] if 0 <= index < len(self._nodes) else None

    def setCurrentNode(self, node) -> None:  # noqa: N802
        if node is not None and node not in self._nodes:
            self.refreshNodes()
        if node is None and None not in self._nodes:
            self.setCurrentIndex(-1)
            return
        self.setCurrentIndex(self._nodes.index(node))

    def _emitNode(self, _index: int) -> None:
        self.currentNodeChanged.emit(self.currentNode())


class PlotWidget(QtWidgets.QFrame):
    """qMRMLPlotWidget: ``setMRMLScene`` and ``setMRMLPlotViewNode``."""

    def setMRMLScene(self, scene) -> None:  # noqa: N802
        self.mrmlScene = scene

    def setMRMLPlotViewNode(self, node) -> None:  # noqa: N802
        self.plotViewNode = node


STAND_INS = {
    "qMRMLWidget": MRMLWidget,
    "qMRMLNodeComboBox": NodeComboBox,
    "ctkCollapsibleButton": CollapsibleButton,
    "ctkPathLineEdit": PathLineEdit,
    "qMRMLPlotWidget": PlotWidget,
}


class StandInLoader(QtUiTools.QUiLoader):
    def createWidget(self, className, parent=None, name=""):  # noqa: N802 - Qt API
        if className in STAND_INS:
            widget = STAND_INS[className](parent)
            widget.setObjectName(name)
            return widget
        return super().createWidget(className, parent, name)


def loadUI(path: str | Path) -> QtWidgets.QWidget:
    """``slicer.util.loadUI``: the .ui with CTK/MRML stand-ins."""
    handle = QtCore.QFile(str(path))
    if not handle.open(QtCore.QFile.ReadOnly):
        raise RuntimeError(f"cannot open {path}")
    loader = StandInLoader()
    widget = loader.load(handle)
    handle.close()
    if widget is None:
        raise RuntimeError(loader.errorString())
    return widget


def childWidgetVariables(widget: QtWidgets.QWidget) -> types.SimpleNamespace:
    """``slicer.util.childWidgetVariables``: every named child, as PythonQt shows it."""
    names = {}
    for child in widget.findChildren(QtCore.QObject):
        if child.objectName():
            names[child.objectName()] = PythonQtProxy(child)
    return types.SimpleNamespace(**names)


def installQtModules(monkeypatch) -> None:
    """``import qt`` and ``import ctk`` give PySide6-backed modules (undone after the test)."""
    qt = types.ModuleType("qt")
    for module in (QtCore, QtGui, QtWidgets):
        for name in dir(module):
            if name.startswith("Q") or name == "Qt":
                setattr(qt, name, getattr(module, name))
    ctk = types.ModuleType("ctk")
    ctk.ctkPathLineEdit = PathLineEdit
    ctk.ctkCollapsibleButton = CollapsibleButton
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "ctk", ctk)
