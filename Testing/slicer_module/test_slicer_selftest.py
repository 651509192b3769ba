"""Run the module's own ScriptedLoadableModuleTest outside Slicer, on slicer-core.

The self-test is written for the Slicer application. Here the few application-only pieces it
touches are replaced by small stand-ins (``slicer.mrmlScene``, ``slicer.app.temporaryPath``,
the volumes/segmentations module logics behind ``slicer.util``, the ScriptedLoadableModule base
classes); everything else is real: MRML nodes, segmentation logic, and the ``train`` and
``segment`` child processes. This checks that the self-test's calls and expectations hold.
"""

from __future__ import annotations

import sys
import types
import unittest
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MaskSAMSlicer"

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)
pytest.importorskip("SimpleITK")
pytest.importorskip("psutil")
import slicer.util  # noqa: E402
import vtk  # noqa: E402


def cliHas(*commands: str) -> bool:
    try:
        from MaskSAMLib.cli import build_parser

        parser = build_parser()
    except Exception:  # noqa: BLE001 - a library mid-change must not break collection
        return False
    choices = set()
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            choices = set(action.choices)
    return set(commands) <= choices


@pytest.fixture
def slicerApp(monkeypatch, tmp_path):
    """Just enough of the Slicer application for the self-test."""
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    processed = []
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(
        temporaryPath=str(tmp_path), testingEnabled=lambda: True,
        processEvents=lambda: processed.append(1)), raising=False)

    class VolumesLogic:
        def CreateAndAddLabelVolume(self, reference, name):  # noqa: N802 - Slicer API
            node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
            image = vtk.vtkImageData()
            image.SetDimensions(reference.GetImageData().GetDimensions())
            image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
            node.SetAndObserveImageData(image)
            node.CopyOrientation(reference)
            return node

    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
        volumes=types.SimpleNamespace(logic=VolumesLogic),
        segmentations=types.SimpleNamespace(logic=lambda: segmentations)), raising=False)
    counter = iter(range(1000))
    monkeypatch.setattr(slicer.util, "tempDirectory",
                        lambda key="tmp", **kw: str(_mkdir(tmp_path / f"{key}{next(counter)}")))
    monkeypatch.setattr(slicer.util, "modulePath",
                        lambda name: str(MODULE_DIR / f"{name}.py"))

    class Base:
        def __init__(self, *args, **kwargs):
            pass

    class TestBase(unittest.TestCase):
        def delayDisplay(self, message, *args):  # noqa: N802 - Slicer API
            print(f"[delayDisplay] {message}")

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModule = Base
    scripted.ScriptedLoadableModuleWidget = Base
    scripted.ScriptedLoadableModuleLogic = Base
    scripted.ScriptedLoadableModuleTest = TestBase
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)
    monkeypatch.syspath_prepend(str(MODULE_DIR))
    monkeypatch.delitem(sys.modules, "MaskSAMSlicer", raising=False)
    monkeypatch.setenv("MASKSAM_HOME", str(tmp_path / "home"))
    scene.processedEvents = processed
    return scene


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.slow
@pytest.mark.skipif(not cliHas("train", "segment"),
                    reason="MaskSAMLib's CLI has no 'train' and 'segment' yet")
def test_module_self_test_passes_end_to_end(slicerApp, capsys):
    import MaskSAMSlicer

    test = MaskSAMSlicer.MaskSAMSlicerTest("runTest")
    test.setUp = lambda: None  # scene.Clear() needs the application's scene observers
    test.runTest()
    out = capsys.readouterr().out
    assert "Skipped" not in out, out
    assert "[delayDisplay] Test passed" in out
    assert slicer.app.processEvents and len(slicerApp.processedEvents) > 10  # GUI kept alive
    segmentations = slicerApp.GetNodesByClass("vtkMRMLSegmentationNode")
    assert segmentations.GetNumberOfItems() == 2  # the reference and the auto-segmentation
