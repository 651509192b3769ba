"""MaskSAM: prompt-free auto-segmentation and local fine-tuning of SAM for 3D medical images.

This file holds the module metadata, thin widget and logic shells, and the self-test. The work
is done by the plain classes in ``MaskSAMSlicerLib`` (logic: MRML + ``slicer.util`` only, so
they are tested outside Slicer with slicer-core) and by ``MaskSAMLib``, which always runs in a
child process (``PythonSlicer -m MaskSAMLib ...``). Importing this module and building the
widget needs no torch, GPU or network.
"""

import importlib
import logging
import os
import subprocess

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4

    def _(text):
        return text


RESEARCH_NOTICE = (
    "<b>Research use only.</b> MaskSAMSlicer is not a medical device and is not for diagnosis. "
    "No clinically trained model ships with it: you start from general pretrained backbones "
    "(LiteMedSAM, or Meta's SAM ViT-B/L/H checkpoints) and train on your own labelled cases. "
    "Review every result."
)


#
# MaskSAMSlicer
#
class MaskSAMSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MaskSAM")
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        # Placeholder: the maintainers' names and organisations go here (and in CMakeLists.txt
        # and MaskSAMSlicer.s4ext) before the extension is submitted to the index.
        self.parent.contributors = [
            "MaskSAMSlicer maintainers (names and organisations to be filled in before index "
            "submission)"
        ]
        self.parent.helpText = _(
            "Prompt-free auto-segmentation of CT and MR volumes with MaskSAM (Segment Anything "
            "adapted to 3D with mask classification), and local fine-tuning on your own cases."
            "<ul>"
            "<li><b>Auto-segment</b>: pick a volume and a model, press Apply. Each class becomes "
            "a named, coloured segment (with terminology and 3D surfaces) in a new "
            "segmentation; correct it in the Segment Editor and add it to the training cases."
            "</li>"
            "<li><b>Train</b>: collect volume + segmentation pairs from the scene (or use an "
            "nnU-Net dataset folder), choose a base model (LiteMedSAM, a SAM checkpoint or one "
            "of your models) and Start. Stop keeps a checkpoint; Resume continues. The new "
            "model appears in Auto-segment.</li>"
            "<li><b>Prompt</b>: place a box (ROI) or include / exclude points in the slice "
            "views, choose the segment (existing or new) and click Segment: LiteMedSAM "
            "segments it, the segment keeps its name, colour and terminology, and Undo "
            "restores it. Corrections reuse the warm model. Add the result to the training "
            "cases.</li>"
            "</ul>"
            "Computation runs in a separate process: Slicer stays responsive and Cancel/Stop "
            "always work.<br><br>"
            "<b>Requires 3D Slicer 5.10 or later</b> (Python 3.12); on older Slicer versions "
            "the panel says so and runs nothing.<br><br>"
        ) + RESEARCH_NOTICE
        self.parent.acknowledgementText = _(
            "MaskSAM: Xie et al., <i>MaskSAM: Towards Auto-prompt SAM with Mask Classification "
            "for Medical Image Segmentation</i>, ICCV 2025 (arXiv 2403.14103). Segment Anything "
            "by Meta AI; LiteMedSAM by the MedSAM authors. Dependency installation follows the "
            "PyTorch extension and Slicer's packaging helpers."
        )


#
# MaskSAMSlicerWidget
#
class MaskSAMSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        from MaskSAMSlicerLib.widget import MaskSAMSlicerPanel

        self.logic = MaskSAMSlicerLogic()
        self.panel = MaskSAMSlicerPanel(self, self.logic)
        self.panel.setup()

    def cleanup(self) -> None:
        if self.panel is not None:
            self.panel.cleanup()
        self.removeObservers()

    def enter(self) -> None:
        if self.panel is not None:
            self.panel.enter()

    def exit(self) -> None:
        if self.panel is not None:
            self.panel.exit()

    def onReload(self) -> None:
        """Developer reload: also reload the MaskSAMSlicerLib submodules."""
        for name in ("compatibility", "errors", "process", "volumeIO", "modelRegistry",
                     "install", "segmentationLogic", "trainingCases", "trainingLogic",
                     "promptLogic", "panelLogic", "panelSection", "autoSegmentSection",
                     "trainSection", "promptSection", "widget"):
            module = importlib.import_module(f"MaskSAMSlicerLib.{name}")
            importlib.reload(module)
        ScriptedLoadableModuleWidget.onReload(self)


#
# MaskSAMSlicerLogic
#
class MaskSAMSlicerLogic(ScriptedLoadableModuleLogic):
    """Thin shell over ``SegmentationLogic``, ``TrainingLogic`` and ``PromptLogic`` (usable
    without the GUI).

    Example (Python console)::

        logic = slicer.util.getModuleLogic("MaskSAMSlicer")
        result = logic.segment(getNode("CTChest"), "/path/to/model", device="CPU")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from MaskSAMSlicerLib.promptLogic import PromptLogic
        from MaskSAMSlicerLib.segmentationLogic import SegmentationLogic
        from MaskSAMSlicerLib.trainingLogic import TrainingLogic

        self.segmentation = SegmentationLogic()
        self.training = TrainingLogic()
        self.prompt = PromptLogic()

    def getParameterNode(self):
        from MaskSAMSlicerLib.parameters import MaskSAMSlicerParameterNode

        return MaskSAMSlicerParameterNode(super().getParameterNode())

    def segment(self, volumeNode, modelDir, *, device="Auto", speed="Standard", roiNode=None,
                outputSegmentationNode=None, replaceConfirmed=False, timeout=None):
        """Blocking auto-segmentation; returns a ``SegmentationResult``."""
        from MaskSAMSlicerLib.compatibility import currentIncompatibility
        from MaskSAMSlicerLib.errors import MaskSAMSlicerError

        incompatibility = currentIncompatibility()
        if incompatibility:
            raise MaskSAMSlicerError(incompatibility)
        self.segmentation.tempRoot = slicer.app.temporaryPath
        return self.segmentation.segment(
            volumeNode, modelDir, device=device, speed=speed, roiNode=roiNode,
            outputSegmentationNode=outputSegmentationNode, replaceConfirmed=replaceConfirmed,
            timeout=timeout,
        )


#
# MaskSAMSlicerTest
#
class MaskSAMSlicerTest(ScriptedLoadableModuleTest):
    """A tiny end-to-end run inside Slicer: Train tab logic, then Auto-segment logic.

    Builds a synthetic CT-like volume and a segmentation of it, exports the pair as a training
    case, trains a tiny random-init MaskSAM for two iterations with the real child
    (``PythonSlicer -m MaskSAMLib train``), auto-segments the volume with it (the real
    ``segment`` child) and checks segment names, colours, reference geometry, and that every
    segment equals the CLI's own label map voxel for voxel. Skips with a message when PyTorch or
    the requirements are missing (tests must not install packages) or when this MaskSAMLib
    has no ``train``/``segment`` command.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AutoSegmentTinyModel()

    @staticmethod
    def _waitKeepingGuiAlive(runner, timeout):
        """Wait for a child while Slicer keeps drawing and answering (no frozen window)."""
        import time

        deadline = time.monotonic() + timeout
        while runner.isRunning():
            runner.poll()
            slicer.app.processEvents()
            if time.monotonic() > deadline:
                runner.cancelAndWait(timeout=60)
                raise TimeoutError(f"{runner.args[0]} still running after {timeout} s")
            time.sleep(0.05)
        return runner.returnCode

    def _skip(self, message):
        logging.warning(f"MaskSAMSlicerTest skipped: {message}")
        self.delayDisplay(f"Skipped: {message}")

    def test_AutoSegmentTinyModel(self):
        import numpy as np
        from MaskSAMSlicerLib import volumeIO
        from MaskSAMSlicerLib.install import DependencyInstaller
        from MaskSAMSlicerLib.modelRegistry import ModelRegistry
        from MaskSAMSlicerLib.process import childEnvironment
        from MaskSAMSlicerLib.segmentationLogic import registerSegmentationConverterRules
        from MaskSAMSlicerLib.trainingCases import TrainingCaseStore

        self.delayDisplay("Starting the MaskSAM end-to-end test")
        moduleDir = os.path.dirname(slicer.util.modulePath("MaskSAMSlicer"))
        installer = DependencyInstaller(os.path.join(moduleDir, "Resources", "requirements.txt"))
        if not installer.isReady():
            self._skip("PyTorch or the Python requirements are not installed "
                       "(press Apply once to install them).")
            return
        logic = MaskSAMSlicerLogic()
        python = logic.segmentation.python
        helpResult = subprocess.run([python, "-m", "MaskSAMLib", "--help"], capture_output=True,
                                    text=True, env=childEnvironment(), timeout=120)
        commands = helpResult.stdout.split("COMMAND", 1)[-1]
        if "segment" not in commands or "train" not in commands:
            self._skip("this MaskSAMLib has no 'train' or 'segment' command")
            return
        registerSegmentationConverterRules()

        # A small CT-like volume (oblique, anisotropic grid) and a two-class segmentation of it.
        array = np.full((10, 32, 36), -100, dtype=np.int16)
        array[2:8, 6:22, 6:22] = 180
        array[3:7, 20:30, 22:33] = 40
        volume = slicer.util.addVolumeFromArray(array, name="MaskSAMTestCT")
        volume.SetSpacing(0.9, 0.8, 2.5)
        volume.SetOrigin(-20.0, 15.0, 30.0)
        volume.SetIJKToRASDirections(0.96, -0.28, 0.0, 0.28, 0.96, 0.0, 0.0, 0.0, 1.0)
        reference = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reference")
        reference.CreateDefaultDisplayNodes()
        reference.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        for name, value in (("liver", 180), ("spleen", 40)):
            segmentId = reference.GetSegmentation().AddEmptySegment(name, name)
            slicer.util.updateSegmentBinaryLabelmapFromArray(
                (array == value).astype(np.uint8), reference, segmentId, volume)

        workDir = slicer.util.tempDirectory("MaskSAMSlicerTest")
        store = TrainingCaseStore(os.path.join(workDir, "cases"))
        store.addCase(volume, reference)
        self.assertEqual(store.classNames(), ["liver", "spleen"])
        registry = ModelRegistry(userModelsDir=os.path.join(workDir, "models"))
        self.delayDisplay("Training a tiny model for 2 iterations")
        job = logic.training.startTraining(
            store.folder, registry.newModelDir("selftest"), backbone="tiny", iterations=2,
            batchSize=1, device="CPU", valFraction=0.0)
        self._waitKeepingGuiAlive(job.runner, timeout=900)
        model = logic.training.finishTraining(job, registry)
        self.assertEqual(model.classNames(), ["liver", "spleen"])

        self.delayDisplay("Auto-segmenting with the new model")
        logic.segmentation.keepTemporaryFiles = True
        logic.segmentation.tempRoot = workDir
        segJob = logic.segmentation.startSegmentation(volume, model, device="CPU", speed="Fast")
        self._waitKeepingGuiAlive(segJob.runner, timeout=900)
        result = logic.segmentation.finishSegmentation(segJob)
        segmentationNode = result.segmentationNode

        segmentation = segmentationNode.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName()
                 for i in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, model.classNames())
        referenceVolume = segmentationNode.GetNodeReference(
            segmentationNode.GetReferenceImageGeometryReferenceRole())
        self.assertIs(referenceVolume, volume)
        self.assertTrue(segmentation.ContainsRepresentation("Closed surface"))
        cliArray, cliGeometry = volumeIO.readLabelMap(segJob.outputPath)
        self.assertEqual(cliGeometry.differences(volumeIO.volumeGeometry(volume)), [])
        classes = [lab for lab in model.labels if lab["value"] != 0]
        self.assertEqual(len(result.summary), len(classes))
        for row, lab in zip(result.summary, classes):
            segment = segmentation.GetSegment(row["segmentId"])
            for got, want in zip(segment.GetColor(), lab["color"]):
                self.assertAlmostEqual(got, want / 255.0, places=5)
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, row["segmentId"],
                                                              volume)
            self.assertTrue(np.array_equal(mask > 0, cliArray == lab["value"]))
        self.delayDisplay("Test passed")
