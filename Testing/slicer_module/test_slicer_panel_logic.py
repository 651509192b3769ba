"""The panel's decisions (MaskSAMSlicerLib.panelLogic, compatibility): plain Python, no Qt.

What a user sees: which buttons are enabled and what they say, what Apply does with the chosen
options, the messages, the old-Slicer refusal, and a model download that Cancel stops without
leaving anything behind. Also part of the Python 3.12 run.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MaskSAMSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from MaskSAMSlicerLib.compatibility import incompatibilityMessage  # noqa: E402
from MaskSAMSlicerLib.errors import MaskSAMSlicerError  # noqa: E402
from MaskSAMSlicerLib.modelRegistry import ModelRegistry  # noqa: E402
from MaskSAMSlicerLib.panelLogic import (  # noqa: E402
    ModelFetch,
    PanelState,
    buttonStates,
    caseAddedMessage,
    casesSummary,
    planApply,
    segmentationDoneMessage,
    trainingEndMessage,
    trainingOptions,
    trainingProgressText,
)

from MaskSAMLib.files import sha256_file as sha256OfFile  # noqa: E402

READY = dict(volumeSelected=True, modelSelected=True, modelAvailable=True, haveModels=True)


# ----------------------------------------------------------------------------- compatibility
@pytest.mark.parametrize("slicerVersion,python,ok", [
    ((5, 8), (3, 9), False), ((5, 6), (3, 9), False), ((5, 10), (3, 12), True),
    ((5, 12), (3, 12), True), (None, (3, 9), False), (None, (3, 11), True),
    ((5, 9), (3, 12), False),
])
def test_old_slicer_or_python_gets_one_clear_message(slicerVersion, python, ok):
    message = incompatibilityMessage(slicerVersion, python)
    if ok:
        assert message is None
    else:
        assert "Slicer 5.10 or later" in message and "\n" not in message
        assert f"Python {python[0]}.{python[1]}" in message


def test_an_old_slicer_cannot_apply_or_train():
    message = incompatibilityMessage((5, 8), (3, 9))
    states = buttonStates(PanelState(**READY, incompatibility=message))
    assert not states.applyEnabled and states.applyToolTip == message
    assert not states.startEnabled and not states.resumeEnabled
    plan = planApply(segRunning=False, incompatibility=message, volumeSelected=True,
                     cropChecked=False, roiSelected=False, outputName=None, outputSegmentCount=0)
    assert plan.action == "refuse" and plan.message == message


# ----------------------------------------------------------------------------- buttons
def test_apply_needs_a_volume_and_an_available_model():
    assert not buttonStates(PanelState()).applyEnabled
    assert buttonStates(PanelState()).applyToolTip == "Select an input volume first."
    noModel = buttonStates(PanelState(volumeSelected=True))
    assert not noModel.applyEnabled and "model" in noModel.applyToolTip
    assert noModel.noModelVisible
    remote = buttonStates(PanelState(volumeSelected=True, modelSelected=True, haveModels=True))
    assert not remote.applyEnabled and remote.downloadVisible and remote.importVisible
    ready = buttonStates(PanelState(**READY))
    assert ready.applyEnabled and ready.applyText == "Apply" and not ready.downloadVisible
    assert not ready.noModelVisible


def test_apply_becomes_cancel_while_segmenting_and_blocks_training():
    running = buttonStates(PanelState(**READY, segRunning=True))
    assert running.applyText == "Cancel" and running.applyEnabled
    assert not running.startEnabled and not running.correctEnabled
    cancelling = buttonStates(PanelState(**READY, segRunning=True, segCancelRequested=True))
    assert cancelling.applyText == "Cancel" and not cancelling.applyEnabled


def test_training_disables_apply_and_case_editing_and_enables_stop():
    states = buttonStates(PanelState(**READY, trainRunning=True, caseVolumeSelected=True,
                                     caseSegmentationSelected=True, selectedCases=1))
    assert not states.applyEnabled and "Training is running" in states.applyToolTip
    assert states.stopEnabled and not states.startEnabled and not states.resumeEnabled
    assert not states.addCaseEnabled and not states.removeCaseEnabled
    assert not states.sceneWidgetsEnabled
    stopping = buttonStates(PanelState(trainRunning=True, trainCancelRequested=True))
    assert not stopping.stopEnabled


def test_case_buttons_follow_the_source_and_selection():
    scene = buttonStates(PanelState(caseVolumeSelected=True, caseSegmentationSelected=True))
    assert scene.addCaseEnabled and not scene.removeCaseEnabled and not scene.datasetFolderEnabled
    assert buttonStates(PanelState(selectedCases=2)).removeCaseEnabled
    folder = buttonStates(PanelState(sceneSource=False, caseVolumeSelected=True,
                                     caseSegmentationSelected=True))
    assert folder.datasetFolderEnabled and not folder.addCaseEnabled
    assert not folder.sceneWidgetsEnabled


def test_resume_and_sam_checkpoint_states():
    assert buttonStates(PanelState(resumable=True)).resumeEnabled
    assert not buttonStates(PanelState(resumable=False)).resumeEnabled
    assert buttonStates(PanelState(baseKind="backbone", baseBackbone="vit_b")).samCheckpointEnabled
    assert not buttonStates(PanelState(baseKind="backbone",
                                       baseBackbone="litemedsam")).samCheckpointEnabled
    assert not buttonStates(PanelState(baseKind="model", baseBackbone="vit_b")
                            ).samCheckpointEnabled


def test_results_and_crop():
    states = buttonStates(PanelState(hasResult=True, cropChecked=True))
    assert states.correctEnabled and states.addToTrainingEnabled and states.roiEnabled
    assert not buttonStates(PanelState(hasResult=True, trainRunning=True)).addToTrainingEnabled


def test_a_download_in_progress_disables_apply_and_a_second_download():
    states = buttonStates(PanelState(volumeSelected=True, modelSelected=True, haveModels=True,
                                     fetching=True))
    assert states.downloadVisible and not states.downloadEnabled and not states.applyEnabled


# ----------------------------------------------------------------------------- Apply
def plan(**kwargs):
    options = dict(segRunning=False, incompatibility=None, volumeSelected=True,
                   cropChecked=False, roiSelected=False, outputName=None, outputSegmentCount=0)
    options.update(kwargs)
    return planApply(**options)


def test_apply_plans():
    assert plan(segRunning=True).action == "cancel"
    assert plan(volumeSelected=False).action == "refuse"
    crop = plan(cropChecked=True)
    assert crop.action == "refuse" and "ROI" in crop.message
    assert plan(cropChecked=True, roiSelected=True).action == "start"
    replace = plan(outputName="mine", outputSegmentCount=3)
    assert replace.action == "confirmReplace" and replace.replace
    assert "'mine' already holds 3 segments" in replace.message
    assert plan(outputName="empty one", outputSegmentCount=0).action == "start"


def test_training_options_for_each_kind_of_base():
    common = dict(iterations=500, batchSize=2, learningRate=1e-4, device="CUDA")
    lite = trainingOptions({"kind": "backbone", "backbone": "litemedsam"}, **common)
    assert lite == {"iterations": 500, "batchSize": 2, "learningRate": 1e-4, "device": "CUDA",
                    "backbone": "litemedsam"}
    vit = trainingOptions({"kind": "backbone", "backbone": "vit_b"}, samCheckpoint="/x.pth",
                          **common)
    assert vit["samCheckpoint"] == "/x.pth" and vit["backbone"] == "vit_b"
    model = object()
    fine = trainingOptions({"kind": "model", "model": model, "backbone": "tiny"}, **common)
    assert fine["initModel"] is model and "backbone" not in fine
    with pytest.raises(MaskSAMSlicerError, match="base model"):
        trainingOptions(None, **common)


def test_messages():
    assert trainingProgressText({"stage": "train", "done": 350, "total": 1000, "eta_s": 250,
                                 "loss": 0.77123}) == (35, "train: 350/1000, ETA 4 min 10 s, "
                                                           "loss 0.7712")
    assert trainingProgressText({"stage": "prepare"}) == (None, "prepare")
    entry = {"caseId": "case_0002", "classes": ["liver"]}
    text = caseAddedMessage(entry, "CT", "CT seg", {"case_0001": [], "case_0002": ["spleen"]})
    assert text == ("Added case_0002 (CT + CT seg: liver). Classes missing from a case are "
                    "background there: case_0002 lacks spleen.")
    assert casesSummary(0, []) == "0 cases, 0 classes: none yet."
    assert segmentationDoneMessage(6, "CT MaskSAM", 12.4).startswith("Done in 12 s: 6 segments")
    assert trainingEndMessage(succeeded=False, cancelled=True, returnCode=-15)[1] is False
    assert trainingEndMessage(succeeded=False, cancelled=False, returnCode=130)[0].startswith(
        "Training stopped")
    failed = trainingEndMessage(succeeded=False, cancelled=False, returnCode=1, error="bad")
    assert failed == ("Training failed: bad", True)


# ----------------------------------------------------------------------------- download
def test_fetch_runs_off_the_calling_thread_and_reports_progress():
    threads = []

    def fetch(progress):
        threads.append(threading.current_thread())
        for done in range(0, 101, 25):
            progress(done, 100)
        return "the model"

    job = ModelFetch(fetch).start()
    assert job.wait(10) and job.finished
    assert job.result == "the model" and job.error is None and job.percent == 100
    assert threads and threads[0] is not threading.current_thread()


def test_cancel_stops_a_download_and_nothing_is_kept(tmp_path):
    """A real registry download (file:// URL) cancelled half way: no model, no temp folder."""
    payload = tmp_path / "model"
    payload.mkdir()
    (payload / "config.json").write_text(json.dumps({"labels": []}))
    (payload / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(5 << 20))
    archive = tmp_path / "published.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for f in payload.iterdir():
            zf.write(f, f"published/{f.name}")
    registryFile = tmp_path / "models.json"
    registryFile.write_text(json.dumps({"version": 1, "models": [
        {"name": "published", "url": archive.as_uri(), "sha256": sha256OfFile(archive),
         "backbone": "tiny"}], "baseModels": []}))
    models = tmp_path / "models"
    registry = ModelRegistry(registryFile=registryFile, userModelsDir=models)
    gate = threading.Event()

    def slowProgress(progress):
        def report(done, total):
            progress(done, total)
            gate.set()
            time.sleep(0.05)
        return registry.fetchModel("published", progress=report)

    job = ModelFetch(slowProgress).start()
    assert gate.wait(10)
    job.cancel()
    assert job.wait(10)
    assert job.cancelled and job.result is None and "cancelled" in job.error
    assert not (models / "published").exists()
    assert [p.name for p in models.iterdir()] == []


def test_a_failed_download_is_one_line(tmp_path):
    registryFile = tmp_path / "models.json"
    registryFile.write_text(json.dumps({"version": 1, "models": [
        {"name": "gone", "url": (tmp_path / "missing.zip").as_uri(), "sha256": "0" * 64,
         "backbone": "tiny"}], "baseModels": []}))
    registry = ModelRegistry(registryFile=registryFile, userModelsDir=tmp_path / "models")
    job = ModelFetch(lambda progress: registry.fetchModel("gone", progress=progress)).start()
    assert job.wait(10) and job.finished and not job.cancelled
    assert "Could not download" in job.error and "\n" not in job.error


# ----------------------------------------------------------------------------- Prompt section
def test_prompt_buttons_follow_volume_prompts_running_and_undo() -> None:
    from MaskSAMSlicerLib.panelLogic import PromptState, promptButtonStates

    nothing = promptButtonStates(PromptState())
    assert nothing.segmentText == "Segment" and not nothing.segmentEnabled
    assert nothing.segmentToolTip == "Select the volume to segment first."
    noPrompts = promptButtonStates(PromptState(volumeSelected=True))
    assert not noPrompts.segmentEnabled and noPrompts.segmentToolTip.startswith("Place a box")
    ready = promptButtonStates(PromptState(volumeSelected=True, havePrompts=True, canUndo=True,
                                           hasResult=True, newSegment=False))
    assert ready.segmentEnabled and ready.undoEnabled and ready.addToTrainingEnabled
    assert not ready.newNameEnabled  # an existing segment keeps its own name
    running = promptButtonStates(PromptState(volumeSelected=True, havePrompts=True, running=True,
                                             canUndo=True, hasResult=True))
    assert running.segmentText == "Cancel" and running.segmentEnabled
    assert not (running.undoEnabled or running.addToTrainingEnabled or running.inputsEnabled)
    cancelling = promptButtonStates(PromptState(running=True, cancelRequested=True))
    assert cancelling.segmentText == "Cancel" and not cancelling.segmentEnabled
    old = promptButtonStates(PromptState(volumeSelected=True, havePrompts=True,
                                         incompatibility="needs 3D Slicer 5.10"))
    assert not old.segmentEnabled and old.segmentToolTip == "needs 3D Slicer 5.10"


def test_plan_prompt_cancels_refuses_or_starts() -> None:
    from MaskSAMSlicerLib.panelLogic import planPrompt

    def plan(**changes):
        inputs = dict(running=False, incompatibility=None, volumeSelected=True,
                      havePrompts=True)
        return planPrompt(**{**inputs, **changes})

    assert plan().action == "start"
    assert plan(running=True).action == "cancel"
    assert plan(incompatibility="old Slicer").message == "old Slicer"
    assert plan(volumeSelected=False).message == "Select the volume to segment first."
    refused = plan(havePrompts=False)
    assert refused.action == "refuse" and "Place a box (ROI) or points" in refused.message
