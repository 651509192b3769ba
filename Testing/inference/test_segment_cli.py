"""``masksam segment``: formats, .seg.nrrd via slicerio, DICOM in and DICOM SEG out, sidecars,
batches with a bad file, progress events, and every bad input (one line, exit 1, no file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MaskSAMLib.cli import main
from MaskSAMLib.config import make_labels
from MaskSAMLib.data.normalization import CTNormStats
from MaskSAMLib.data.phantoms import PHANTOM_LABELS, make_phantom_case
from MaskSAMLib.data.preprocessing import PreprocessConfig
from MaskSAMLib.modeling.build import create_model, save_model_dir

REPO = Path(__file__).resolve().parents[2]
SIZE = (40, 40, 16)
LIVER_TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical "
    "Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory) -> Path:
    """A random-weight tiny model with a preprocessing plan: fast, for format and error tests."""
    names = sorted(PHANTOM_LABELS, key=PHANTOM_LABELS.__getitem__)
    labels = make_labels(names, [PHANTOM_LABELS[n] for n in names])
    labels[1].terminology = LIVER_TERMINOLOGY
    stats = CTNormStats(mean=60.0, std=200.0, percentile_00_5=-1000.0, percentile_99_5=1000.0)
    pre = PreprocessConfig(target_spacing=(2.0, 2.0, 4.5), channel_names=["CT"], ct_stats=[stats])
    model = create_model(backbone="tiny", labels=labels, preprocessing=pre, seed=0,
                         img_size=32)
    return save_model_dir(model, tmp_path_factory.mktemp("models") / "quick")


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cases")
    for index in range(2):
        image, label = make_phantom_case(3, index, size=SIZE)
        sitk.WriteImage(image, str(folder / f"case{index}_0000.nii.gz"), True)
        sitk.WriteImage(label, str(folder / f"case{index}_ref.nrrd"), True)
    return folder


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_seg_nrrd_from_trained_model_reads_back_in_slicerio(
    capsys, tmp_path, trained_tiny_model_dir
):
    slicerio = pytest.importorskip("slicerio")
    from conftest import TRAINED_PHANTOM_CASES, TRAINED_PHANTOM_SIZE

    image, _ = make_phantom_case(0, TRAINED_PHANTOM_CASES, size=TRAINED_PHANTOM_SIZE)
    source = tmp_path / "heldout.nii.gz"
    sitk.WriteImage(image, str(source), True)
    out = tmp_path / "heldout.seg.nrrd"
    code, _, err = run(capsys, "segment", source, "--model", trained_tiny_model_dir, "--out", out,
                       "--device", "cpu")
    assert code == 0, err
    seg = slicerio.read_segmentation(str(out))
    config = json.loads((trained_tiny_model_dir / "config.json").read_text())
    expected = [lab for lab in config["labels"] if lab["value"] != 0]
    assert [s["name"] for s in seg["segments"]] == [lab["name"] for lab in expected]
    for segment, label in zip(seg["segments"], expected, strict=True):
        assert segment["labelValue"] == label["value"]
        assert np.allclose(segment["color"], np.array(label["color"]) / 255.0, atol=1e-5)
    written = sitk.ReadImage(str(out))
    for getter in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(written, getter)(), getattr(image, getter)(), atol=1e-6)
    sidecar = json.loads((tmp_path / "heldout.json").read_text())
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000
    counts = np.bincount(sitk.GetArrayFromImage(written).ravel(), minlength=7)
    for entry in sidecar["segments"]:
        assert entry["volume_ml"] == pytest.approx(counts[entry["value"]] * voxel_ml, abs=1e-3)
    assert sidecar["model"]["backbone"] == "tiny" and sidecar["device"] == "cpu"
    assert set(sidecar["timings_s"]) >= {"read", "preprocess", "encoder", "decoder", "stitch",
                                         "postprocess", "write", "total"}
    assert "Research use only" in sidecar["notice"]


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha", ".nii"])
def test_label_map_formats_keep_the_input_grid(capsys, tmp_path, quick_model, cases, ext):
    source = cases / "case0_0000.nii.gz"
    out = tmp_path / f"labels{ext}"
    code, _, err = run(capsys, "segment", source, "--model", quick_model, "--out", out,
                       "--device", "cpu", "--fast")
    assert code == 0, err
    written, image = sitk.ReadImage(str(out)), sitk.ReadImage(str(source))
    assert written.GetPixelID() == sitk.sitkUInt8
    assert written.GetSize() == image.GetSize()
    assert np.allclose(written.GetSpacing(), image.GetSpacing(), atol=1e-6)
    assert np.allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-6)
    assert np.allclose(written.GetDirection(), image.GetDirection(), atol=1e-6)
    assert set(np.unique(sitk.GetArrayFromImage(written))) <= set(PHANTOM_LABELS.values())
    sidecar = json.loads((tmp_path / "labels.json").read_text())
    assert sidecar["options"]["fast"] is True and sidecar["output"] == str(out)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_existing_output_needs_overwrite(capsys, tmp_path, quick_model, cases):
    source = cases / "case1_0000.nii.gz"
    out = tmp_path / "result.nrrd"
    code, _, err = run(capsys, "segment", source, "--model", quick_model, "--out", out, "--fast")
    assert code == 0, err
    first = out.read_bytes()
    code, _, err = run(capsys, "segment", source, "--model", quick_model, "--out", out)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert out.read_bytes() == first
    code, _, err = run(capsys, "segment", source, "--model", quick_model, "--out", out,
                       "--overwrite", "--fast")
    assert code == 0, err
    assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(source)).GetSize()
    # A file MaskSAM did not write is never replaced, not even with --overwrite.
    foreign = tmp_path / "mine.nrrd"
    foreign.write_bytes(b"keep me")
    code, _, err = run(capsys, "segment", source, "--model", quick_model, "--out", foreign,
                       "--overwrite", "--fast")
    assert_one_line_error(code, err, "not written by MaskSAM")
    assert foreign.read_bytes() == b"keep me"


def test_progress_json_events_on_stdout_only(capsys, tmp_path, quick_model, cases):
    out = tmp_path / "p.seg.nrrd"
    code, stdout, _ = run(capsys, "segment", cases / "case0_0000.nii.gz", "--model", quick_model,
                          "--out", out, "--fast", "--progress", "json")
    assert code == 0
    events = [json.loads(line) for line in stdout.strip().splitlines()]
    assert all(e["v"] == 1 for e in events)
    assert events[0]["event"] == "start" and events[0]["device"] in ("cpu", "cuda", "mps")
    windows = [e for e in events if e["event"] == "progress" and e["stage"] == "segment"]
    assert windows and windows[-1]["done"] == windows[-1]["total"]
    assert events[-1]["event"] == "done" and events[-1]["output"] == str(out)


def _write_dicom_series(image: sitk.Image, folder: Path, series_uid: str) -> None:
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    tags = {
        "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0010|0010": "Phantom^Test",
        "0010|0020": "PH1", "0020|000d": "1.2.826.0.1.3680043.2.1125.7", "0020|000e": series_uid,
        "0020|0052": "1.2.826.0.1.3680043.2.1125.8", "0008|0021": time.strftime("%Y%m%d"),
        "0008|0031": time.strftime("%H%M%S"), "0008|103e": "phantom",
        "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0018|0050": str(image.GetSpacing()[2]),
    }
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        for key, value in tags.items():
            plane.SetMetaData(key, value)
        point = image.TransformIndexToPhysicalPoint((0, 0, k))
        plane.SetMetaData("0020|0032", "\\".join(str(v) for v in point))
        plane.SetMetaData("0020|0013", str(k + 1))
        plane.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        writer.SetFileName(str(folder / f"slice{(k * 7) % image.GetDepth():03d}.dcm"))
        writer.Execute(plane)


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory) -> Path:
    image, _ = make_phantom_case(3, 5, size=SIZE, direction=np.eye(3).reshape(-1))
    root = tmp_path_factory.mktemp("dicom")
    _write_dicom_series(image, root / "study" / "ct", "1.2.826.0.1.3680043.2.1125.9.1")
    return root / "study"


def test_dicom_series_input_and_dicom_seg_output(capsys, tmp_path, quick_model, dicom_folder):
    out = tmp_path / "from_dicom.nrrd"
    code, _, err = run(capsys, "segment", dicom_folder, "--model", quick_model, "--out", out,
                       "--fast")
    assert code == 0, err
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(dicom_folder / "ct"))
    reader.SetFileNames(files)
    series = reader.Execute()
    labels = sitk.ReadImage(str(out))
    assert labels.GetSize() == series.GetSize()
    assert np.allclose(labels.GetOrigin(), series.GetOrigin(), atol=1e-4)
    assert np.allclose(labels.GetSpacing(), series.GetSpacing(), atol=1e-4)

    highdicom = pytest.importorskip("highdicom")
    import pydicom

    dcm = tmp_path / "seg.dcm"
    code, _, err = run(capsys, "segment", dicom_folder, "--model", quick_model, "--out", dcm,
                       "--fast")
    assert code == 0, err
    seg = highdicom.seg.segread(str(dcm))
    assert seg.Modality == "SEG"
    names = [s.SegmentLabel for s in seg.SegmentSequence]
    assert names == [n for n in sorted(PHANTOM_LABELS, key=PHANTOM_LABELS.get) if n != "background"]
    liver = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert (liver.CodeValue, liver.CodeMeaning) == ("10200004", "Liver")
    uids = [pydicom.dcmread(f).SOPInstanceUID for f in files]
    expected = sitk.GetArrayFromImage(labels)
    if expected.any():
        back = seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False)
        values = np.array([0] + [v for v in sorted(PHANTOM_LABELS.values()) if v])
        np.testing.assert_array_equal(values[back], expected)
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar["series_uid"] == "1.2.826.0.1.3680043.2.1125.9.1"


def test_competing_dicom_series_are_listed_and_chosen_by_uid(capsys, tmp_path, quick_model):
    image, _ = make_phantom_case(3, 6, size=SIZE, direction=np.eye(3).reshape(-1))
    _write_dicom_series(image, tmp_path / "two" / "a", "1.2.826.0.1.3680043.2.1125.10.1")
    _write_dicom_series(image, tmp_path / "two" / "b", "1.2.826.0.1.3680043.2.1125.10.2")
    out = tmp_path / "x.nii.gz"
    code, _, err = run(capsys, "segment", tmp_path / "two", "--model", quick_model, "--out", out)
    assert_one_line_error(code, err, "1.2.826.0.1.3680043.2.1125.10.1",
                          "1.2.826.0.1.3680043.2.1125.10.2", "--series-uid")
    assert not out.exists()
    code, _, err = run(capsys, "segment", tmp_path / "two", "--model", quick_model, "--out", out,
                       "--series-uid", "1.2.826.0.1.3680043.2.1125.10.2", "--fast")
    assert code == 0, err
    assert sitk.ReadImage(str(out)).GetSize() == image.GetSize()
    out_dcm = tmp_path / "y.dcm"
    volume = tmp_path / "volume.nii.gz"  # an image, not the label map just written (refused)
    sitk.WriteImage(image, str(volume), True)
    code, _, err = run(capsys, "segment", volume, "--model", quick_model, "--out", out_dcm)
    assert_one_line_error(code, err, "DICOM SEG output needs a DICOM series input")


def test_batch_with_one_bad_file_reports_it_and_finishes_the_rest(
    capsys, tmp_path, quick_model, cases
):
    batch = tmp_path / "in"
    batch.mkdir()
    for name in ("case0_0000.nii.gz", "case1_0000.nii.gz"):
        (batch / name).write_bytes((cases / name).read_bytes())
    (batch / "broken_0000.nii.gz").write_bytes(b"this is not a NIfTI file")
    out = tmp_path / "out"
    code, _, err = run(capsys, "segment", batch, "--model", quick_model, "--out", out, "--fast",
                       "--format", "seg.nrrd")
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "case0.json", "case0.seg.nrrd", "case1.json", "case1.seg.nrrd"]
    failures = [line for line in err.splitlines() if line.startswith("error:")]
    assert any("broken" in line and "not an image file" in line for line in failures), err
    assert "Traceback" not in err
    # A second run skips what is finished, fails on the bad file again, and says so.
    stamp = (out / "case0.seg.nrrd").stat().st_mtime_ns
    code, _, err = run(capsys, "segment", batch, "--model", quick_model, "--out", out, "--fast",
                       "--format", "seg.nrrd")
    assert code == 1 and "skipped 2" in err
    assert (out / "case0.seg.nrrd").stat().st_mtime_ns == stamp
    (batch / "broken_0000.nii.gz").unlink()
    code, _, err = run(capsys, "segment", batch / "case0_0000.nii.gz", batch / "case1_0000.nii.gz",
                       "--model", quick_model, "--out", out, "--format", "seg.nrrd")
    assert code == 0, err


def _bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (input path, a fragment of the expected message)."""
    folder.mkdir()
    out: dict[str, tuple[Path, str]] = {}
    flat = sitk.Image([24, 24], sitk.sitkInt16)
    sitk.WriteImage(flat, str(folder / "flat.nrrd"))
    out["2D image"] = (folder / "flat.nrrd", "2D image")
    one = sitk.Image([24, 24, 1], sitk.sitkInt16)
    sitk.WriteImage(one, str(folder / "one.nrrd"))
    out["single slice"] = (folder / "one.nrrd", "single slice")
    sitk.WriteImage(sitk.Image([8, 8, 8, 3], sitk.sitkInt16), str(folder / "four.nii.gz"))
    out["4D image"] = (folder / "four.nii.gz", "4D image")
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3), str(folder / "rgb.mha"))
    out["multi-component"] = (folder / "rgb.mha", "3 components")
    nan = np.zeros((8, 8, 8), np.float32)
    nan[2, 3, 4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(folder / "nan.nrrd"))
    out["NaN"] = (folder / "nan.nrrd", "NaN or Inf")
    inf = np.zeros((8, 8, 8), np.float32)
    inf[1, 1, 1] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(inf), str(folder / "inf.mha"))
    out["Inf"] = (folder / "inf.mha", "NaN or Inf")
    (folder / "notes.nii.gz").write_text("not an image")
    out["not an image"] = (folder / "notes.nii.gz", "not an image file")
    (folder / "empty.nrrd").write_bytes(b"")
    out["empty file"] = (folder / "empty.nrrd", "empty file")
    (folder / "zero.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 0 16 16\n"
                                     "ElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    out["zero voxels"] = (folder / "zero.mha", "zero.mha")
    (folder / "huge.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 90000 90000 90000\n"
                                     "ElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    out["absurd header"] = (folder / "huge.mha", "claims a size of 90000 x 90000 x 90000")
    (folder / "nodicom").mkdir()
    (folder / "nodicom" / "readme.txt").write_text("no images here")
    out["folder without DICOM"] = (folder / "nodicom", "No DICOM series found")
    out["missing"] = (folder / "missing.nii.gz", "does not exist")
    return out


def test_every_bad_input_gets_one_line_exit_1_and_no_output(capsys, tmp_path, quick_model):
    bad = _bad_inputs(tmp_path / "bad")
    results = tmp_path / "results"
    results.mkdir()
    for name, (path, fragment) in bad.items():
        out = results / f"{path.name.split('.')[0]}.nii.gz"
        code, _, err = run(capsys, "segment", path, "--model", quick_model, "--out", out)
        assert_one_line_error(code, err, fragment)
        assert list(results.iterdir()) == [], name


def test_bad_models_devices_and_budgets_refused(capsys, tmp_path, quick_model, cases):
    source = cases / "case0_0000.nii.gz"
    out = tmp_path / "r" / "x.nii.gz"
    out.parent.mkdir()

    def refused(*extra: str, model: Path = quick_model, fragments: tuple[str, ...] = ()) -> None:
        code, _, err = run(capsys, "segment", source, "--model", model, "--out", out, *extra)
        assert_one_line_error(code, err, *fragments)
        assert list(out.parent.iterdir()) == []

    refused(model=tmp_path / "nowhere", fragments=("does not exist",))
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_bytes((quick_model / "config.json").read_bytes())
    refused(model=broken, fragments=("model.safetensors is missing",))
    weights = (quick_model / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    refused(model=broken, fragments=("truncated or corrupt",))
    (broken / "config.json").write_text("{ not json")
    refused(model=broken, fragments=("not valid JSON",))
    refused("--memory-budget", "0.01", fragments=("needs about", "--memory-budget"))
    if not __import__("torch").cuda.is_available():
        refused("--device", "cuda", fragments=("no CUDA GPU",))


def test_child_process_exit_codes_and_no_traceback(tmp_path, quick_model):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    (tmp_path / "bad.nii.gz").write_text("nope")
    proc = subprocess.run(
        [sys.executable, "-m", "MaskSAMLib", "segment", str(tmp_path / "bad.nii.gz"), "--model",
         str(quick_model), "--out", str(tmp_path / "o.nii.gz")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "o.nii.gz").exists()
    usage = subprocess.run([sys.executable, "-m", "MaskSAMLib", "segment", "x.nii.gz"],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert usage.returncode == 2 and "--model" in usage.stderr


_WRITE_WITHOUT_PREDICTOR = """
import json, sys
from pathlib import Path
import numpy as np
from MaskSAMLib.data.geometry import Geometry
from MaskSAMLib.inference.inputs import CaseInput
from MaskSAMLib.inference.outputs import PlannedOutput, write_outputs
from MaskSAMLib.inference.prediction import Prediction, PredictionInfo

out = Path(sys.argv[1])
labels = np.zeros((4, 5, 6), np.uint8)
labels[1:3, 1:4, 2:5] = 1
info = PredictionInfo(
    classes=[{"value": 0, "name": "background", "color": None, "terminology": None},
             {"value": 1, "name": "liver", "color": [221, 130, 101], "terminology": None}],
    model_dir="m", backbone="tiny", img_size=64, num_slices=3, num_queries=4, provenance={},
    device="cpu", step=0.5, fast=False, tta=True, mirror_axes=(2, 3), target_spacing=(1, 1, 2))
prediction = Prediction(labels, Geometry((6, 5, 4), (1.0, 1.0, 2.0), (0, 0, 0),
                        (1, 0, 0, 0, 1, 0, 0, 0, 1)), info=info, windows=2)
write_outputs(prediction, PlannedOutput(CaseInput("c", [Path("c.nii.gz")]), out),
              overwrite=False)
assert "torch" not in sys.modules and "MaskSAMLib.inference.predictor" not in sys.modules
"""


def test_outputs_are_written_from_the_prediction_record_alone(tmp_path):
    """The writers read what a Prediction carries: no Predictor (and no torch) is imported."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = tmp_path / "c.seg.nrrd"
    proc = subprocess.run([sys.executable, "-c", _WRITE_WITHOUT_PREDICTOR, str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    sidecar = json.loads((tmp_path / "c.json").read_text())
    assert sidecar["options"] == {"step": 0.5, "fast": False, "tta": True, "mirror_axes": [2, 3],
                                  "target_spacing": [1, 1, 2]}
    assert sidecar["model"]["backbone"] == "tiny" and sidecar["device"] == "cpu"
    assert sidecar["segments"] == [{"value": 1, "name": "liver", "voxels": 18,
                                    "volume_ml": 0.036}]
    assert sidecar["series_uid"] is None and sidecar["windows"] == 2
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out))).sum() == 18


def test_sigterm_stops_cleanly_with_130_and_no_output(tmp_path, quick_model):
    image, _ = make_phantom_case(3, 7, size=(96, 96, 48))
    source = tmp_path / "long.nii.gz"
    sitk.WriteImage(image, str(source), True)
    out = tmp_path / "out" / "long.seg.nrrd"
    out.parent.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "MaskSAMLib", "segment", str(source), "--model", str(quick_model),
         "--out", str(out), "--progress", "json", "--batch-windows", "1", "--step", "0.25"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    try:
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "progress" and event.get("stage") == "segment":
                assert event["done"] < event["total"]
                proc.send_signal(15)
                break
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert list(out.parent.iterdir()) == []


def test_multichannel_model_one_file_per_channel(capsys, tmp_path, cases):
    stats = CTNormStats(mean=60.0, std=200.0, percentile_00_5=-1000.0, percentile_99_5=1000.0)
    pre = PreprocessConfig(target_spacing=(2.0, 2.0, 4.5), channel_names=["CT", "PET"],
                           ct_stats=[stats, None])
    model = save_model_dir(create_model(
        backbone="tiny", labels=make_labels(["background", "liver"]),
        preprocessing=pre, img_size=32), tmp_path / "two_channel")
    folder = tmp_path / "in"
    folder.mkdir()
    for case in ("a", "b"):
        image = sitk.ReadImage(str(cases / "case0_0000.nii.gz"))
        sitk.WriteImage(image, str(folder / f"{case}_0000.nii.gz"))
        second = sitk.Cast(image, sitk.sitkFloat32) * 0.1
        sitk.WriteImage(second, str(folder / f"{case}_0001.nii.gz"))
    out = tmp_path / "one.nii.gz"
    code, _, err = run(capsys, "segment", folder / "a_0000.nii.gz", folder / "a_0001.nii.gz",
                       "--model", model, "--out", out, "--fast")
    assert code == 0, err
    first = sitk.ReadImage(str(folder / "a_0000.nii.gz"))
    assert sitk.ReadImage(str(out)).GetSize() == first.GetSize()
    code, _, err = run(capsys, "segment", folder / "a_0000.nii.gz", "--model", model, "--out",
                       tmp_path / "x.nii.gz")
    assert_one_line_error(code, err, "2 channels", "one file per channel")
    code, _, err = run(capsys, "segment", folder, "--model", model, "--out", tmp_path / "batch",
                       "--fast")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "batch").iterdir()) == [
        "a.json", "a.nii.gz", "b.json", "b.nii.gz"]
    (folder / "b_0001.nii.gz").unlink()
    code, _, err = run(capsys, "segment", folder, "--model", model, "--out", tmp_path / "c")
    assert_one_line_error(code, err, "Case b has channel files [0]")
