"""Reliability round 2 (issue 13), sections 3-5: inputs that would be misplaced, wrong results
reported as success, and errors that did not say what happened.

Shared mechanisms: ``data/dicom_checks.py`` (``check_series_geometry``,
``refuse_unsupported_dicom``, ``quiet_native_stderr``), ``data/header_checks.py``
(``check_nrrd_directions``, ``check_grid``, ``nifti_nonfinite_voxels``),
``Geometry.__post_init__``, ``labels.parse_labels``/``name_key``, ``ModelConfig.validate`` +
``modeling.build.check_weights`` (both reported as "the model folder ... is damaged"),
``files.read_small_file`` and the CLI's BrokenPipe handling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file, save_file

from MaskSAMLib.cli import main
from MaskSAMLib.config import make_labels
from MaskSAMLib.data.geometry import Geometry
from MaskSAMLib.data.io import read_any, read_volume
from MaskSAMLib.errors import MaskSAMError
from MaskSAMLib.labels import parse_labels
from MaskSAMLib.modeling.build import create_model, save_model_dir

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from MaskSAMLib.data.normalization import CTNormStats
    from MaskSAMLib.data.preprocessing import PreprocessConfig

    stats = CTNormStats(mean=60.0, std=200.0, percentile_00_5=-1000.0, percentile_99_5=1000.0)
    pre = PreprocessConfig(target_spacing=(2.0, 2.0, 2.0), channel_names=["CT"], ct_stats=[stats])
    net = create_model(backbone="tiny", labels=make_labels(["background", "liver", "spleen"]),
                       seed=0, img_size=32, preprocessing=pre)
    return save_model_dir(net, tmp_path_factory.mktemp("models") / "m")


def run(capsys, *args: object) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def one_line(code: int, err: str, *fragments: str, exit_code: int = 1) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == exit_code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "Unexpected error" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def volume_file(path: Path, *, spacing=(1.0, 1.0, 2.0), dtype=np.int16, fill=None) -> Path:
    array = (np.arange(12 * 14 * 16).reshape(12, 14, 16) % 300).astype(dtype)
    if fill is not None:
        fill(array)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), not path.name.endswith((".nii", ".nrrd")))
    return path


# --- section 3: geometry ---------------------------------------------------------------------
def _series(folder: Path, **kwargs) -> Path:
    from dicom_series import write_series

    return write_series(folder, **kwargs)


def _localizer(ds, k: int) -> None:
    if k == 2:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]


BAD_SERIES = {
    "missing slice": (dict(positions=[[0, 0, z] for z in (0, 2, 4, 8, 10, 12)]),
                      "1 slice(s) missing"),
    "non-uniform spacing": (dict(positions=[[0, 0, z] for z in (0, 2, 4, 6.5, 8.5, 10.5)]),
                            "uneven slice spacing"),
    "duplicated position": (dict(positions=[[0, 0, z] for z in (0, 2, 4, 4, 6, 8)]),
                            "same position"),
    "localizer in the series": (dict(slices=7, edit=_localizer), "localizer"),
    "mixed PixelSpacing": (dict(pixel_spacing=[[0.8, 0.8]] * 3 + [[0.9, 0.9]] * 3),
                           "different pixel spacing"),
    "gantry tilt 20 degrees": (dict(sideways_per_slice=2 * np.tan(np.radians(20))),
                               "20.0 degrees (gantry tilt)"),
}


@pytest.mark.parametrize("case", list(BAD_SERIES), ids=list(BAD_SERIES))
def test_dicom_series_that_would_be_misplaced_are_refused(tmp_path, case):
    kwargs, expected = BAD_SERIES[case]
    folder = _series(tmp_path / "series", **kwargs)
    with pytest.raises(MaskSAMError, match=expected.replace("(", r"\(").replace(")", r"\)")) \
            as info:
        read_any(folder)
    assert "dcm2niix" in str(info.value)  # says what to do


def test_a_good_dicom_series_still_reads_on_its_grid(tmp_path):
    volume = read_any(_series(tmp_path / "good", slices=5, spacing=2.5))
    assert volume.geometry.size == (16, 16, 5)
    assert np.allclose(volume.geometry.spacing, (0.8, 0.8, 2.5))


def test_segment_refuses_a_series_with_a_missing_slice(capsys, tmp_path, model):
    folder = _series(tmp_path / "series", positions=[[0, 0, z] for z in (0, 2, 4, 8, 10, 12)])
    code, err = run(capsys, "segment", folder, "--model", model, "--out",
                    tmp_path / "seg.nii.gz")
    one_line(code, err, "missing")
    assert not (tmp_path / "seg.nii.gz").exists()


def _nrrd_with_directions(tmp_path: Path, directions: str) -> Path:
    path = volume_file(tmp_path / "ct.nrrd")
    raw = path.read_bytes()
    head, body = raw.split(b"\n\n", 1)
    lines = [ln for ln in head.decode().splitlines() if not ln.startswith("space directions")]
    lines.append(f"space directions: {directions}")
    path.write_bytes("\n".join(lines).encode() + b"\n\n" + body)
    return path


@pytest.mark.parametrize(("directions", "expected"), [
    ("(1,0,0) (0.342,0.94,0) (0,0,2)", "sheared"),
    ("(1,0,0) (0,1,0) (0,0,0)", "zero or missing direction vector"),
])
def test_nrrd_directions_itk_would_change_are_refused(tmp_path, directions, expected):
    path = _nrrd_with_directions(tmp_path, directions)
    with pytest.raises(MaskSAMError, match=expected):
        read_volume(path)


def test_an_orthogonal_oblique_nrrd_is_still_read(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    path = _nrrd_with_directions(tmp_path, f"({c},{s},0) ({-s},{c},0) (0,0,2)")
    assert np.allclose(read_volume(path).geometry.spacing, (1, 1, 2))


@pytest.mark.parametrize("spacing", [(0.0008, 0.0008, 0.002), (0.3, 0.3, 0.3)],
                         ids=["metres", "a few mm in all"])
def test_implausibly_small_spacing_is_refused_with_a_hint(tmp_path, spacing):
    path = volume_file(tmp_path / "ct.nii.gz", spacing=spacing)
    with pytest.raises(MaskSAMError, match="metres"):
        read_volume(path)


@pytest.mark.parametrize(("spacing", "direction"), [
    ((1.0, -1.0, 2.0), np.eye(3).ravel()),
    ((1.0, 0.0, 2.0), np.eye(3).ravel()),
    ((1.0, float("nan"), 2.0), np.eye(3).ravel()),
    ((1.0, 1.0, 2.0), np.zeros(9)),
    ((1.0, 1.0, 2.0), [1, 0, 0, 1, 0, 0, 0, 0, 1]),
])
def test_geometry_refuses_impossible_grids_at_construction(spacing, direction):
    with pytest.raises(ValueError, match="spacing|direction"):
        Geometry((4, 4, 4), spacing, (0, 0, 0), direction)


# --- section 4: wrong results reported as success ----------------------------------------------
def test_init_refuses_a_label_list_without_background_first(capsys, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["liver", "spleen", "kidney_left"]))
    code, err = run(capsys, "init", "--backbone", "tiny", "--labels", labels, "--out",
                    tmp_path / "m")
    one_line(code, err, "'background'")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("names", [["liver", "Liver"], ["liver", "liver "],
                                   ["left kidney", "left  kidney"]])
def test_label_names_differing_only_by_case_or_spacing_are_refused(capsys, tmp_path, names):
    with pytest.raises(MaskSAMError, match="differ only in spaces or case"):
        parse_labels({"background": 0, names[0]: 1, names[1]: 2}, source="dataset.json")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["background", *names]))
    code, err = run(capsys, "init", "--backbone", "tiny", "--labels", labels, "--out",
                    tmp_path / "m")
    one_line(code, err, "differ only in spaces or case")


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_and_inf_voxels_are_refused_in_every_format(tmp_path, ending, dtype):
    def poison(array):
        array[3, 4, 5] = np.nan
        array[0, 0, 0] = -np.inf

    path = volume_file(tmp_path / f"ct{ending}", dtype=dtype, fill=poison)
    with pytest.raises(MaskSAMError, match="NaN or Inf values in 2 voxels"):
        read_volume(path)


def test_float64_beyond_float32_gives_one_clear_message_and_no_warning(tmp_path):
    path = volume_file(tmp_path / "ct.nii.gz", dtype=np.float64,
                       fill=lambda a: a.__setitem__((1, 1, 1), 1e300))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(MaskSAMError, match="beyond the float32 range"):
            read_volume(path)


# --- section 5: errors that say what happened ------------------------------------------------
def _edit_config(model_dir: Path, change) -> None:
    path = model_dir / "config.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _wrong_shape(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    name = next(k for k in state if k.startswith("class_head") and k.endswith("weight"))
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    save_file(state, str(path))


def _fifo(model_dir: Path) -> None:
    (model_dir / "config.json").unlink()
    os.mkfifo(model_dir / "config.json")


def _dev_zero(model_dir: Path) -> None:
    (model_dir / "config.json").unlink()
    (model_dir / "config.json").symlink_to("/dev/zero")


DAMAGE = {
    "tensor of the wrong shape": (_wrong_shape, "has shape"),
    "a class dropped from config.json": (
        lambda m: _edit_config(m, lambda d: d["labels"].pop()), "has shape"),
    "in_channels 0": (lambda m: _edit_config(m, lambda d: d.update(in_channels=0)),
                      "in_channels"),
    "in_channels not the plan's channels": (
        lambda m: _edit_config(m, lambda d: d.update(in_channels=2)), "in_channels is 2"),
    "a newer format_version": (
        lambda m: _edit_config(m, lambda d: d.update(format_version=2)), "format_version 2"),
    "negative img_size": (lambda m: _edit_config(m, lambda d: d.update(img_size=-64)),
                          "img_size"),
    "negative embed_dim": (
        lambda m: _edit_config(m, lambda d: d["backbone"].update(embed_dim=-8)), "embed_dim"),
    "label value out of range": (
        lambda m: _edit_config(m, lambda d: d["labels"][1].update(value=70000)), "70000"),
    "absurd T": (lambda m: _edit_config(m, lambda d: d.update(num_slices=100000)),
                 "num_slices"),
    "config.json is a FIFO": (_fifo, "not a regular file"),
    "config.json links to /dev/zero": (_dev_zero, "not a regular file"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(DAMAGE), ids=list(DAMAGE))
def test_damaged_model_folders_say_so(capsys, tmp_path, model, case):
    import shutil

    damage, expected = DAMAGE[case]
    broken = Path(shutil.copytree(model, tmp_path / "model"))
    damage(broken)
    ct = volume_file(tmp_path / "ct.nii.gz")
    code, err = run(capsys, "segment", ct, "--model", broken, "--out", tmp_path / "s.nii.gz")
    one_line(code, err, "is damaged", expected)


@pytest.mark.parametrize("budget", ["nan", "inf", "-1", "0"])
def test_memory_budget_must_be_a_positive_finite_number(capsys, tmp_path, model, budget):
    ct = volume_file(tmp_path / "ct.nii.gz")
    code, err = run(capsys, "segment", ct, "--model", model, "--out", tmp_path / "s.nii.gz",
                    "--memory-budget", budget)
    one_line(code, err, "--memory-budget")


def test_init_with_absurd_slices_is_one_line(capsys, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["background", "liver"]))
    code, err = run(capsys, "init", "--backbone", "tiny", "--labels", labels, "--out",
                    tmp_path / "m", "--slices", "100000")
    one_line(code, err, "num_slices")


@pytest.mark.parametrize("argv", [
    ["make-phantoms", "{tmp}/ph", "--cases", "6", "--size", "16", "16", "16",
     "--progress", "json"],
], ids=["make-phantoms"])
def test_a_closed_stdout_ends_quietly(tmp_path, argv):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "MaskSAMLib",
                             *[a.format(tmp=tmp_path) for a in argv]], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()  # what `| head -1` does
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert json.loads(first)["event"] == "start"
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert proc.returncode in (0, 1)


def test_segment_progress_json_into_a_closed_pipe_ends_quietly(tmp_path, model):
    ct = volume_file(tmp_path / "ct.nii.gz")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "MaskSAMLib", "segment", str(ct), "--model", str(model), "--out",
         str(tmp_path / "s.nii.gz"), "--device", "cpu", "--progress", "json"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert proc.returncode in (0, 1)


def _label_map(path: Path, values=(0, 1, 2)) -> Path:
    array = np.zeros((8, 10, 12), np.uint8)
    array[2:5, 2:6, 3:8] = values[1]
    array[5:7, 6:9, 2:5] = values[2]
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), path.name.endswith(".gz"))
    return path


def test_evaluate_refuses_a_truncated_reference(capsys, tmp_path):
    pred = _label_map(tmp_path / "pred.nii")
    ref = _label_map(tmp_path / "ref.nii")
    ref.write_bytes(ref.read_bytes()[:-200])
    code, err = run(capsys, "evaluate", pred, ref)
    one_line(code, err, "truncated")


@pytest.mark.parametrize("source", ["model config.json", "model folder", "MSD labels"])
def test_evaluate_takes_model_and_msd_labels(capsys, tmp_path, model, source):
    pred = _label_map(tmp_path / "pred.nii.gz")
    ref = _label_map(tmp_path / "ref.nii.gz")
    if source == "model config.json":
        labels = model / "config.json"
    elif source == "model folder":
        labels = model
    else:
        labels = tmp_path / "dataset.json"
        labels.write_text(json.dumps({"labels": {"0": "background", "1": "liver",
                                                 "2": "spleen"}}))
    code, err = run(capsys, "evaluate", pred, ref, "--labels", labels, "--out",
                    tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert [m["label"] for m in report["mean"]] == ["liver", "spleen"]
    assert report["mean_foreground_dice"] == 1.0


def test_undecodable_jpeg2000_gives_one_line(capfd, tmp_path, model):
    from dicom_series import JPEG2000

    folder = _series(tmp_path / "j2k", transfer_syntax=JPEG2000)
    code = main(["segment", str(folder), "--model", str(model), "--out",
                 str(tmp_path / "s.nii.gz")])
    err = capfd.readouterr().err  # file descriptor 2: GDCM's and OpenJPEG's own prints too
    one_line(code, err, "JPEG 2000", "decompress")


def _enhanced(folder: Path) -> Path:
    from dicom_series import ENHANCED_CT

    def frames(ds, _k):
        ds.NumberOfFrames = 4
        ds.PixelData = ds.PixelData * 4

    return _series(folder, slices=1, sop_class=ENHANCED_CT, edit=frames)


def _dicom_seg(folder: Path) -> Path:
    from dicom_series import SEG_STORAGE

    return _series(folder, slices=1, sop_class=SEG_STORAGE)


def _seg_nrrd(folder: Path) -> Path:
    folder.mkdir()
    return _label_map(folder / "liver.seg.nrrd")


def _our_label_map(folder: Path) -> Path:
    from MaskSAMLib.data.io import write_label_map

    folder.mkdir()
    array = np.zeros((8, 10, 12), np.uint8)
    return write_label_map(array, Geometry((12, 10, 8), (1, 1, 1), (0, 0, 0), np.eye(3).ravel()),
                           folder / "seg.nii.gz")


NOT_IMAGES = {
    "enhanced multi-frame CT folder": (_enhanced, "enhanced multi-frame CT"),
    "enhanced multi-frame CT file": (lambda f: _enhanced(f) / "s000.dcm",
                                     "enhanced multi-frame CT"),
    "DICOM SEG": (_dicom_seg, "DICOM SEG"),
    ".seg.nrrd as an explicit input": (_seg_nrrd, "is a segmentation"),
    "a MaskSAM label map as input": (_our_label_map, "label map written by MaskSAM"),
}


@pytest.mark.parametrize("case", list(NOT_IMAGES), ids=list(NOT_IMAGES))
def test_inputs_that_are_not_images_get_a_correct_one_line_error(capsys, tmp_path, model, case):
    make, expected = NOT_IMAGES[case]
    source = make(tmp_path / "input")
    code, err = run(capsys, "segment", source, "--model", model, "--out",
                    tmp_path / "s.nii.gz")
    line = one_line(code, err, expected)
    assert "split it" not in line


def _special(path: Path, kind: str) -> Path:
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    return path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
@pytest.mark.parametrize("where", ["train dataset.json", "init --labels", "evaluate --labels",
                                   "train --split"])
def test_special_files_are_refused_without_hanging(capsys, tmp_path, kind, where):
    if where == "train dataset.json":
        (tmp_path / "ds").mkdir()
        _special(tmp_path / "ds" / "dataset.json", kind)
        args = ["train", tmp_path / "ds", "--out", tmp_path / "run", "--backbone", "tiny"]
    elif where == "init --labels":
        args = ["init", "--backbone", "tiny", "--labels", _special(tmp_path / "l.json", kind),
                "--out", tmp_path / "m"]
    elif where == "evaluate --labels":
        pred = _label_map(tmp_path / "p.nii.gz")
        args = ["evaluate", pred, pred, "--labels", _special(tmp_path / "l.json", kind)]
    else:
        from MaskSAMLib.data.phantoms import make_phantoms

        ds = make_phantoms(tmp_path / "ds", cases=2, seed=0, size=(16, 16, 16))
        args = ["train", ds, "--out", tmp_path / "run", "--backbone", "tiny", "--split",
                _special(tmp_path / "split.json", kind)]
    code, err = run(capsys, *args)
    one_line(code, err, "not a regular file")
    assert not (tmp_path / "run").exists() and not (tmp_path / "m").exists()
