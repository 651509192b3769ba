"""Reliability (issue 6): hypothesis fuzzing of every input parser, in process.

Each target gets generated malformed input and must end in a :class:`MaskSAMError` (one line,
exit code 1 or 2 in the CLI) or a correct result: never another exception, a hang or a crash.
``max_examples`` is bounded so the whole file runs in well under a minute. Counted in the
README's "Reliability" section (keep the two in step).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MaskSAMLib.cli import main
from MaskSAMLib.config import ModelConfig, make_labels, make_model_config
from MaskSAMLib.data.dataset_json import load_dataset, validate_dataset
from MaskSAMLib.data.geometry import Geometry
from MaskSAMLib.data.io import list_dicom_series, read_any, read_image_info, read_volume
from MaskSAMLib.data.nifti_checks import incomplete_nifti
from MaskSAMLib.data.phantoms import make_phantoms
from MaskSAMLib.data.writers import write_label_map
from MaskSAMLib.errors import MaskSAMError
from MaskSAMLib.labels import parse_labels, read_label_file

REPO = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
SMALL_FUZZ = settings(FUZZ, max_examples=30)
MAX_VOXELS = 2_000_000  # bounds memory while fuzzing headers (default refusal: tested elsewhere)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def _fresh(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


# -- image readers ------------------------------------------------------------------------------
def _valid_image_bytes(tmp_path: Path, ext: str) -> bytes:
    path = tmp_path / f"valid{ext}"
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    image.SetSpacing((0.8, 0.9, 2.5))
    sitk.WriteImage(image, str(path), useCompression=False)
    return path.read_bytes()


def _check_read(path: Path) -> None:
    try:
        info = read_image_info(path, max_voxels=MAX_VOXELS)
    except MaskSAMError:
        return
    assert info.num_voxels <= MAX_VOXELS
    try:
        volume = read_volume(path, max_voxels=MAX_VOXELS)
    except MaskSAMError:
        return
    assert volume.array.shape == tuple(reversed(volume.geometry.size))
    assert incomplete_nifti(path) is None  # never a truncated NIfTI read as zeros


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
@pytest.mark.parametrize("damage", ["cut", "huge"])
def test_truncated_or_oversized_nifti_is_refused(tmp_path, ext, damage):
    """ITK reads a truncated NIfTI without an error (the rest becomes 0); a header claiming
    1200^3 voxels in a tiny file is refused from the header, before 3.4 GB are allocated."""
    raw = bytearray(_valid_image_bytes(tmp_path, ".nii"))
    if damage == "cut":
        raw = raw[:-50]
    else:
        raw = raw[:352]
        raw[40:56] = struct.pack("<8h", 3, 1200, 1200, 1200, 1, 1, 1, 1)
    path = tmp_path / f"bad{ext}"
    path.write_bytes(gzip.compress(bytes(raw)) if ext == ".nii.gz" else bytes(raw))
    with pytest.raises(MaskSAMError, match="truncated or corrupt"):
        read_volume(path)  # default limits


@FUZZ
@given(content=st.binary(max_size=600),
       ext=st.sampled_from([".nii", ".nii.gz", ".nrrd", ".mha", ".seg.nrrd", ".dcm", ".png"]))
def test_random_bytes_as_an_image(tmp_path, content, ext):
    path = tmp_path / f"random{ext}"
    path.write_bytes(content)
    _check_read(path)


@FUZZ
@given(ext=st.sampled_from([".nii", ".nii.gz", ".mha"]),
       edits=st.lists(st.tuples(st.integers(0, 351), st.integers(0, 255)), min_size=1,
                      max_size=8),
       cut=st.none() | st.integers(0, 700))
def test_corrupted_binary_headers(tmp_path, ext, edits, cut):
    """NIfTI (first 352 bytes) and MetaImage headers with bytes overwritten, files truncated."""
    raw = bytearray(_valid_image_bytes(tmp_path, ".nii" if ext == ".nii.gz" else ext))
    for offset, value in edits:
        if offset < len(raw):
            raw[offset] = value
    data = bytes(raw if cut is None else raw[:cut])
    path = tmp_path / f"corrupt{ext}"
    path.write_bytes(gzip.compress(data) if ext == ".nii.gz" else data)
    _check_read(path)


NRRD_FIELDS = ["type", "dimension", "space", "sizes", "space directions", "kinds", "encoding",
               "space origin", "endian"]


@FUZZ
@given(field=st.sampled_from(NRRD_FIELDS),
       value=st.sampled_from(["", "0", "-1", "3", "4", "1e30", "99999 99999 99999", "nan",
                              "(1,0,0) (0,1,0)", "(nan,0,0) (0,1,0) (0,0,1)", "gzip", "raw",
                              "domain", "float", "block", "big"]) | st.text(max_size=20),
       drop=st.booleans())
def test_corrupted_nrrd_header_fields(tmp_path, field, value, drop):
    text = _valid_image_bytes(tmp_path, ".nrrd")
    header, sep, body = text.partition(b"\n\n")
    lines = []
    for line in header.decode("latin-1").splitlines():
        if line.startswith(field + ":"):
            if drop:
                continue
            line = f"{field}: {value}"
        lines.append(line)
    path = tmp_path / "corrupt.nrrd"
    path.write_bytes("\n".join(lines).encode("utf-8", "replace") + sep + body)
    _check_read(path)


# -- DICOM folder scan -------------------------------------------------------------------------
dicom_like = st.binary(max_size=300).map(lambda b: b"\0" * 128 + b"DICM" + b)


@SMALL_FUZZ
@given(files=st.lists(st.tuples(st.sampled_from(["a.dcm", "b", "IM0001", "sub/c.dcm", ".x"]),
                                st.binary(max_size=300) | dicom_like), max_size=5))
def test_folders_of_random_files_as_dicom(tmp_path, files):
    folder = _fresh(tmp_path, "dicom")
    for name, content in files:
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(content)
    try:
        series = list_dicom_series(folder)
    except MaskSAMError:
        series = []
    assert isinstance(series, list)
    with pytest.raises(MaskSAMError):  # random bytes never make a readable 3D series
        read_any(folder, max_voxels=MAX_VOXELS)


# -- dataset.json ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("fuzz") / "ds", cases=2, seed=3, size=(16, 16, 16))


def _mutate(value, path: list, new):
    """``value`` with the item at ``path`` replaced by ``new`` (or deleted when new is ...)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict) and value:
        key = list(value)[head % len(value)]
        out = dict(value)
        if new is ... and not rest:
            del out[key]
        else:
            out[key] = _mutate(value[key], rest, new)
        return out
    if isinstance(value, list) and value:
        out = list(value)
        index = head % len(value)
        out[index] = _mutate(value[index], rest, None if new is ... else new)
        return out
    return None if new is ... else new


mutations = st.tuples(st.lists(st.integers(0, 50), min_size=1, max_size=3),
                      st.just(...) | json_values)


@FUZZ
@given(data=json_values, mutation=mutations, use_random=st.booleans())
def test_dataset_json(dataset, tmp_path, data, mutation, use_random):
    folder = _fresh(tmp_path, "ds")
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).symlink_to(dataset / sub)
    valid = json.loads((dataset / "dataset.json").read_text())
    content = data if use_random else _mutate(valid, *mutation)
    (folder / "dataset.json").write_text(json.dumps(content))
    try:
        spec = load_dataset(folder)
        validate_dataset(spec)
    except MaskSAMError:
        return
    assert spec.cases


@FUZZ
@given(data=json_values)
def test_label_mappings_and_label_files(tmp_path, data):
    try:
        mapping = parse_labels(data, source="fuzz")
    except MaskSAMError:
        pass
    else:
        assert mapping and sorted(mapping.values())[0] == 0
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(data))
    try:
        labels = read_label_file(path).labels
    except MaskSAMError:
        return
    assert labels and next(iter(labels.values())) == 0


# -- model config.json -------------------------------------------------------------------------
VALID_CONFIG = make_model_config(backbone="tiny",
                                 labels=make_labels(["background", "liver", "spleen"])).to_dict()


@settings(FUZZ, max_examples=150)
@given(data=json_values, mutation=mutations, use_random=st.booleans())
def test_model_config(tmp_path, data, mutation, use_random):
    content = data if use_random else _mutate(VALID_CONFIG, *mutation)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    try:
        config = ModelConfig.load(path)
    except MaskSAMError:
        return
    assert config.labels[0].value == 0 and config.num_queries >= config.num_classes


# -- .seg.nrrd metadata ------------------------------------------------------------------------
names = st.text(min_size=0, max_size=12)
colours = st.none() | st.lists(st.integers(-5, 300), max_size=4) | json_values
label_entries = st.lists(
    st.fixed_dictionaries({"value": st.integers(-2, 70000) | json_values, "name": names},
                          optional={"color": colours,
                                    "terminology": st.none() | st.text(max_size=20)}),
    max_size=4,
)


@FUZZ
@given(labels=label_entries)
def test_seg_nrrd_labels_round_trip(tmp_path, labels):
    import slicerio

    array = np.zeros((3, 4, 5), np.uint8)
    values = [e["value"] for e in labels if isinstance(e["value"], int) and 0 < e["value"] < 256]
    for i, v in enumerate(values[:3]):
        array[i, 0, 0] = v
    geometry = Geometry((5, 4, 3), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    path = tmp_path / "out.seg.nrrd"
    path.unlink(missing_ok=True)
    try:
        write_label_map(array, geometry, path, labels=labels)
    except MaskSAMError:
        assert not path.exists()
        return
    except ValueError as exc:  # a label map value with no label entry: a caller bug, not input
        assert "no label entry" in str(exc)
        return
    expected = {int(e["value"]): str(e["name"]).strip() for e in labels if int(e["value"]) != 0}
    image = sitk.ReadImage(str(path))  # the header fields as written (UTF-8 names kept)
    written = {int(image.GetMetaData(f"Segment{i}_LabelValue")):
               image.GetMetaData(f"Segment{i}_Name") for i in range(len(expected))}
    assert written == expected
    assert not image.HasMetaDataKey(f"Segment{len(expected)}_ID")
    segmentation = slicerio.read_segmentation(str(path), skip_voxels=True)  # Slicer's reader
    read = {s["labelValue"]: s["name"] for s in segmentation["segments"]}
    assert read.keys() == expected.keys()
    # slicerio drops non-ASCII characters from names (Slicer itself reads them as UTF-8)
    assert all(read[v] == n for v, n in expected.items() if n.isascii())


# -- CLI arguments -----------------------------------------------------------------------------
TOKENS = ["init", "train", "segment", "evaluate", "demo", "make-phantoms", "--out", "--model",
          "--labels", "--backbone", "tiny", "nonsense", "--device", "cuda:7", "cpu", "--resume",
          "--iterations", "-3", "0", "1e9", "--size", "--cases", "--step", "--format", "dcm",
          "--progress", "json", "--quiet", "--debug", "--series-uid", "--init", "--img-size",
          "--queries", "--slices", "--help", "--version", "--batch-size", "--overwrite",
          "missing.nii.gz", "missing_dir", "labels_bad.json", "labels_ok.json", "--", "-",
          "--tta", "--fast", "--memory-budget", "--lr", "nan", "--split", "--val-fraction", "2"]


@pytest.fixture()
def cli_sandbox(tmp_path, monkeypatch):
    """cwd in tmp; the jobs that would run for minutes (demo, phantoms, model creation) stubbed."""
    import MaskSAMLib.data.phantoms as phantoms_module
    import MaskSAMLib.demo as demo_module
    import MaskSAMLib.modeling.build as build_module

    def stub(*_args, **_kwargs):
        raise MaskSAMError("stubbed long job")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo_module, "run_demo", stub)
    monkeypatch.setattr(phantoms_module, "make_phantoms", stub)
    monkeypatch.setattr(build_module, "create_model", stub)
    (tmp_path / "labels_bad.json").write_text("{not json")
    (tmp_path / "labels_ok.json").write_text(json.dumps(["background", "liver"]))
    return tmp_path


@settings(FUZZ, max_examples=200)
@given(argv=st.lists(st.sampled_from(TOKENS) | st.text(max_size=8), max_size=8))
def test_cli_arguments(cli_sandbox, capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    assert isinstance(code, int) and code in (0, 1, 2, 130), (argv, code)
    assert "Traceback" not in captured.err or "--debug" in argv
    assert "Unexpected error" not in captured.err, (argv, captured.err)
    if code != 0 and "--debug" not in argv and "--progress" not in argv:
        errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 or (code == 2 and "usage:" in captured.err), captured.err


# -- CLI subprocess cases ----------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["segment", "missing.nii.gz", "--model", "missing_dir", "--out", "x.nii.gz"],
    ["train", "missing_dir", "--out", "out", "--backbone", "tiny"],
    ["init", "--backbone", "tiny", "--labels", "labels_bad.json", "--out", "m"],
    ["evaluate", "missing.nii.gz", "missing.nii.gz"],
    ["segment", "--model"],
    ["train", "ds", "--out", "o", "--iterations", "many"],
    ["segment", "bad.nii.gz", "--model", "model", "--out", "y.nii.gz"],
])
def test_cli_subprocess_errors_are_one_line(tmp_path, args):
    (tmp_path / "labels_bad.json").write_text("{not json")
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b garbage")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"format_version": 1, "backbone": {"name": "evil"}}')
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "MaskSAMLib", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode in (1, 2), result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Unexpected error" not in result.stderr
