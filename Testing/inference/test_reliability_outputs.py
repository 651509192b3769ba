"""Reliability round 2 (issue 13), sections 1 and 2: a user's file is never destroyed, an output
set is decided before any work and published as one.

One mechanism serves ``segment`` and ``evaluate`` (``MaskSAMLib/files.py``:
``check_output_path``, ``check_writable_folder``, ``publish_together``): an output never lands
on an input or inside the model folder; ``--overwrite`` replaces only files MaskSAM wrote (a
header marker or a MaskSAM sidecar/report); the JSON sidecar follows the same rules; the label
map and its sidecar (the JSON report and its CSV) are written to temporaries, then published
together.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MaskSAMLib import files
from MaskSAMLib.cli import main
from MaskSAMLib.config import make_labels
from MaskSAMLib.data.normalization import CTNormStats
from MaskSAMLib.data.phantoms import PHANTOM_LABELS, make_phantom_case
from MaskSAMLib.data.preprocessing import PreprocessConfig
from MaskSAMLib.modeling.build import create_model, save_model_dir

SIZE = (40, 40, 16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    names = sorted(PHANTOM_LABELS, key=PHANTOM_LABELS.__getitem__)
    labels = make_labels(names, [PHANTOM_LABELS[n] for n in names])
    stats = CTNormStats(mean=60.0, std=200.0, percentile_00_5=-1000.0, percentile_99_5=1000.0)
    pre = PreprocessConfig(target_spacing=(2.0, 2.0, 4.5), channel_names=["CT"], ct_stats=[stats])
    net = create_model(backbone="tiny", labels=labels, preprocessing=pre, seed=0,
                       img_size=32)
    return save_model_dir(net, tmp_path_factory.mktemp("models") / "quick")


@pytest.fixture
def scans(tmp_path) -> Path:
    folder = tmp_path / "scans"
    folder.mkdir()
    for index in range(2):
        image, label = make_phantom_case(3, index, size=SIZE)
        sitk.WriteImage(image, str(folder / f"ct{index}.nii.gz"), True)
    return folder


def run(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str, *fragments: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# --- section 1: user data destroyed -----------------------------------------------------------
def _segment_over_own_input(root: Path, scans: Path, model: Path) -> list:
    return ["segment", scans / "ct0.nii.gz", "--model", model, "--out", scans / "ct0.nii.gz",
            "--overwrite", "--fast"]


def _segment_folder_onto_itself(root: Path, scans: Path, model: Path) -> list:
    return ["segment", scans, "--model", model, "--out", scans, "--overwrite", "--fast"]


def _sidecar_over_bids_json(root: Path, scans: Path, model: Path) -> list:
    (scans / "ct0.json").write_text('{"Modality": "CT", "ConversionSoftware": "dcm2niix"}')
    return ["segment", scans / "ct0.nii.gz", "--model", model, "--out",
            scans / "ct0.seg.nrrd", "--overwrite", "--fast"]


def _output_inside_model_folder(root: Path, scans: Path, model: Path) -> list:
    return ["segment", scans / "ct0.nii.gz", "--model", model, "--out", model / "config.nii.gz",
            "--fast"]


def _evaluate_over_reference(root: Path, scans: Path, model: Path) -> list:
    return ["evaluate", scans / "ct0.nii.gz", scans / "ct1.nii.gz", "--out",
            scans / "ct1.nii.gz"]


def _evaluate_csv_over_user_file(root: Path, scans: Path, model: Path) -> list:
    (scans / "notes.csv").write_text("my,own,table\n")
    return ["evaluate", scans / "ct0.nii.gz", scans / "ct0.nii.gz", "--out",
            scans / "notes.json"]


DESTRUCTIVE = {
    "segment --out its own input --overwrite": (_segment_over_own_input, "is an input"),
    "segment folder --out same folder --overwrite": (_segment_folder_onto_itself,
                                                     "folder the input images come from"),
    "sidecar over a dcm2niix/BIDS ct.json": (_sidecar_over_bids_json, "not written by MaskSAM"),
    "--out inside the model folder": (_output_inside_model_folder, "inside the model folder"),
    "evaluate --out the reference": (_evaluate_over_reference, "is an input"),
    "evaluate's CSV over a user's CSV": (_evaluate_csv_over_user_file, "not written by MaskSAM"),
}


@pytest.mark.parametrize("case", list(DESTRUCTIVE), ids=list(DESTRUCTIVE))
def test_a_users_file_is_never_replaced(capsys, tmp_path, scans, model, case):
    make_args, expected = DESTRUCTIVE[case]
    args = make_args(tmp_path, scans, model)
    before_scans, before_model = snapshot(scans), snapshot(model)
    code, _, err = run(capsys, *args)
    line = one_line_error(code, err, expected)
    assert "--overwrite" not in line.split(";")[-1] or "pass --overwrite" not in line
    assert snapshot(scans) == before_scans and snapshot(model) == before_model


def test_overwrite_replaces_only_our_own_outputs(capsys, tmp_path, scans, model):
    out = tmp_path / "seg.nii.gz"
    code, _, err = run(capsys, "segment", scans / "ct0.nii.gz", "--model", model, "--out", out,
                       "--fast")
    assert code == 0, err
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar["software"].startswith("MaskSAMLib")
    assert files.is_masksam_file(out) and files.is_masksam_file(tmp_path / "seg.json")
    code, _, err = run(capsys, "segment", scans / "ct0.nii.gz", "--model", model, "--out", out)
    one_line_error(code, err, "already exists", "--overwrite")
    code, _, err = run(capsys, "segment", scans / "ct1.nii.gz", "--model", model, "--out", out,
                       "--overwrite", "--fast")
    assert code == 0, err
    assert json.loads((tmp_path / "seg.json").read_text())["inputs"] == [str(scans / "ct1.nii.gz")]
    # the same bytes without the marker (a user's NIfTI) is not ours
    user = tmp_path / "user.nii.gz"
    image = sitk.ReadImage(str(scans / "ct0.nii.gz"))
    sitk.WriteImage(image, str(user), True)
    assert not files.is_masksam_file(user)


def test_batch_refuses_a_foreign_file_at_an_output_path_before_any_work(capsys, tmp_path, scans,
                                                                        model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ct1.nii.gz").write_bytes(b"someone else's")
    code, _, err = run(capsys, "segment", scans, "--model", model, "--out", out, "--fast")
    one_line_error(code, err, "ct1.nii.gz", "not written by MaskSAM")
    assert sorted(p.name for p in out.iterdir()) == ["ct1.nii.gz"]  # ct0 not done either


def test_evaluate_csv_out_gives_both_files_and_replaces_its_own(capsys, tmp_path, scans):
    image, label = make_phantom_case(3, 0, size=SIZE)
    ref = tmp_path / "ref.nrrd"
    sitk.WriteImage(label, str(ref), True)
    for _ in range(2):  # the second run replaces the first report (ours)
        code, _, err = run(capsys, "evaluate", ref, ref, "--out", tmp_path / "report.csv")
        assert code == 0, err
    csv_text = (tmp_path / "report.csv").read_text()
    assert csv_text.startswith("case,label,value,dice")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mean_foreground_dice"] == 1.0 and report["software"].startswith("MaskSAMLib")
    code, _, err = run(capsys, "evaluate", ref, ref, "--out", tmp_path / "report.txt")
    one_line_error(code, err, "NAME.json or NAME.csv")


# --- section 2: outputs decided before any work, published together -----------------------------
@pytest.mark.parametrize(("name", "expected"), [
    ("seg.nrdd", "unknown output type '.nrdd'"),
    ("seg.nhdr", "detached NRRD headers"),
    ("SEG.NII.GZ", "lower case"),
    ("Seg.Seg.Nrrd", "lower case"),
])
def test_output_format_is_decided_before_any_work(capsys, tmp_path, scans, model, name,
                                                  expected, monkeypatch):
    from MaskSAMLib.inference import predictor

    def no_inference(*_a, **_k):
        raise AssertionError("the inference ran before the output was checked")

    monkeypatch.setattr(predictor.Predictor, "predict", no_inference)
    code, _, err = run(capsys, "segment", scans / "ct0.nii.gz", "--model", model, "--out",
                       tmp_path / name)
    one_line_error(code, err, expected)
    assert not (tmp_path / name).exists()


def _unwritable_folder(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "readonly"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    for candidate in (Path("/sys"), Path("/proc/sys")):  # root ignores modes; these refuse it
        try:
            fd, name = files.tempfile.mkstemp(dir=candidate)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return candidate
            continue
        os.close(fd)
        os.unlink(name)
    pytest.skip("no folder this user cannot write to")


def test_unwritable_folder_is_refused_before_any_work(capsys, tmp_path, scans, model,
                                                      monkeypatch):
    from MaskSAMLib.inference import predictor

    folder = _unwritable_folder(tmp_path)
    monkeypatch.setattr(predictor.Predictor, "predict", lambda *a, **k: pytest.fail("ran"))
    code, _, err = run(capsys, "segment", scans / "ct0.nii.gz", "--model", model, "--out",
                       folder / "seg.nii.gz")
    line = one_line_error(code, err, "Cannot write to the folder", "permission denied")
    assert "disk space" not in line


@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "over an earlier set"])
def test_a_failing_sidecar_publishes_nothing(capsys, tmp_path, scans, model, monkeypatch,
                                             previous):
    out = tmp_path / "seg.seg.nrrd"
    if previous:
        code, _, err = run(capsys, "segment", scans / "ct1.nii.gz", "--model", model, "--out",
                           out, "--fast")
        assert code == 0, err
    before = snapshot(tmp_path)
    real_fsync = files._fsync_file

    def fsync(path: Path) -> None:
        if path.name.endswith(".json"):  # the sidecar, written after the label map
            raise OSError(errno.EFBIG, "File too large")
        real_fsync(path)

    monkeypatch.setattr(files, "_fsync_file", fsync)
    code, _, err = run(capsys, "segment", scans / "ct0.nii.gz", "--model", model, "--out", out,
                       "--fast", "--overwrite")
    one_line_error(code, err, "larger than")
    assert snapshot(tmp_path) == before  # neither file published, no temporary left
    monkeypatch.setattr(files, "_fsync_file", real_fsync)
    code, _, err = run(capsys, "segment", scans / "ct0.nii.gz", "--model", model, "--out", out,
                       "--fast", *(["--overwrite"] if previous else []))
    assert code == 0, err  # the rerun is not refused with "already exists"
    written = sitk.ReadImage(str(out))
    assert written.GetSize() == sitk.ReadImage(str(scans / "ct0.nii.gz")).GetSize()
    assert np.issubdtype(sitk.GetArrayViewFromImage(written).dtype, np.integer)
    assert json.loads((tmp_path / "seg.json").read_text())["output"] == str(out)
