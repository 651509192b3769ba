"""``masksam demo`` end to end with a short budget, and the PNG overlay it writes."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MaskSAMLib.cli import main
from MaskSAMLib.data.geometry import Geometry
from MaskSAMLib.overlay import encode_png, orthogonal_panels

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def decode_png(data: bytes) -> np.ndarray:
    """A minimal decoder for the 8-bit RGB, filter-0 PNGs that ``encode_png`` writes."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 2)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, -1)
    assert np.all(raw[:, 0] == 0)
    return raw[:, 1:].reshape(height, width, 3)


def test_png_encoder_round_trip_and_qt_reads_it():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(7, 11, 3), dtype=np.uint8)
    data = encode_png(image)
    np.testing.assert_array_equal(decode_png(data), image)
    qtgui = pytest.importorskip("PySide6.QtGui")
    qimage = qtgui.QImage.fromData(data, "PNG")
    assert (qimage.width(), qimage.height()) == (11, 7)
    assert qtgui.QColor(qimage.pixel(3, 2)).getRgb()[:3] == tuple(int(v) for v in image[2, 3])


def test_overlay_is_the_same_whatever_the_voxel_order():
    array = np.zeros((6, 8, 10), np.int16)
    array[2:4, 1:5, 6:9] = 200
    labels = (array > 0).astype(np.uint8)
    labels[3, 2, 8] = 2
    entries = [{"value": 1, "name": "a", "color": [255, 0, 0]},
               {"value": 2, "name": "b", "color": [0, 0, 255]}]
    identity = Geometry((10, 8, 6), (1.0, 1.0, 2.0), (0, 0, 0), np.eye(3).reshape(-1))
    reference = orthogonal_panels(array, [labels], identity, entries)
    # The same voxels stored with x reversed and the axes z <-> x swapped.
    flipped = np.ascontiguousarray(np.swapaxes(array[:, :, ::-1], 0, 2))
    flipped_labels = np.ascontiguousarray(np.swapaxes(labels[:, :, ::-1], 0, 2))
    direction = np.array([[0, 0, -1], [0, 1, 0], [1, 0, 0]], float)
    other = Geometry((6, 8, 10), (2.0, 1.0, 1.0), (9.0, 0, 0), direction.reshape(-1))
    np.testing.assert_array_equal(
        orthogonal_panels(flipped, [flipped_labels], other, entries), reference)
    assert reference.shape[0] >= 12 and (reference[..., 0] > reference[..., 1]).any()


def test_demo_end_to_end_with_a_short_budget(tmp_path, capsys):
    slicerio = pytest.importorskip("slicerio")
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--iterations", "4", "--cases", "2",
                 "--size", "40", "40", "16", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    seg_path = out / "segmentation.seg.nrrd"
    image = sitk.ReadImage(str(out / "heldout" / "phantom_heldout_0000.nii.gz"))
    seg = sitk.ReadImage(str(seg_path))
    assert seg.GetSize() == image.GetSize()
    assert np.allclose(seg.GetDirection(), image.GetDirection())
    assert np.allclose(seg.GetOrigin(), image.GetOrigin(), atol=1e-5)
    names = [s["name"] for s in slicerio.read_segmentation(str(seg_path))["segments"]]
    assert names == ["liver", "spleen", "kidney_left", "kidney_right", "aorta", "spine"]
    report = json.loads((out / "report.json").read_text())
    assert [row["label"] for row in report["mean"]] == names
    assert 0.0 <= report["mean_foreground_dice"] <= 1.0
    assert (out / "report.csv").read_text().startswith("case,label,value,dice")
    figure = decode_png((out / "overlay.png").read_bytes())
    assert figure.shape[0] >= 2 * 200 and figure.shape[2] == 3
    reference_row = figure[: figure.shape[0] // 2]
    assert (np.abs(reference_row[..., 0].astype(int) - reference_row[..., 2]) > 30).any()
    sidecar = json.loads((out / "segmentation.json").read_text())
    assert sidecar["model"]["provenance"]["iterations"] == 4
    assert not (out / "cache").exists()
    assert "Research use only" in err and "Slicer --python-code" in err
    assert str(seg_path) in err and str(out / "overlay.png") in err
    # An earlier demo is only replaced on request, and foreign files are never deleted.
    code = main(["demo", "--out", str(out), "--iterations", "1", "--cases", "2"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "--overwrite" in lines[0]
    (out / "mine.txt").write_text("keep")
    code = main(["demo", "--out", str(out), "--overwrite", "--iterations", "1", "--cases", "2"])
    assert code == 1 and "did not write" in capsys.readouterr().err
    assert (out / "mine.txt").exists() and seg_path.exists()


def test_demo_defaults_are_the_documented_budget():
    from MaskSAMLib.demo import DEMO_CASES, DEMO_ITERATIONS, DEMO_SIZE, DemoOptions

    options = DemoOptions()
    assert (options.iterations, options.cases, options.size) == (
        DEMO_ITERATIONS, DEMO_CASES, DEMO_SIZE)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    main_command = readme.split("<!-- main-command -->")[1].split("<!-- /main-command -->")[0]
    assert main_command.strip().splitlines()[-2].endswith("&& masksam demo")
    assert "research" in readme.lower() and "not for diagnosis" in readme
