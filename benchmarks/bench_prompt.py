"""Prompted segmentation on the shared real CT: Dice per organ from one 3D box, corrections, speed.

Accuracy (``--organs``): for each organ, one 3D box = the reference's bounding box (voxel
centres, LPS mm) plus a 5 mm margin, propagated slice by slice by ``MaskSAMLib.prompting``
with LiteMedSAM; 3D Dice against the reference in the input grid.

Corrections (``--corrections``):
- *points*: the organ's good result plus a deliberately wrong region (the neighbouring organ's
  voxels on three slices) is given as the mask to correct, with two points on each of those
  slices (one positive on the organ, one negative on the wrong region): Dice before and after;
- *box*: a deliberately wrong 3D box (the organ's box widened by 40 mm towards the body's centre,
  so it takes in neighbours), then the same 3D box plus one box drawn tightly on the organ's
  middle slice: Dice of both.

Speed (``--speed``): a 3D box around the left kidney on a 512 x 512 version of the CT (each
slice resampled in-plane from 122 x 101 to 512 x 512 voxels, linear interpolation; the slice
count is unchanged): seconds the first time (cold embedding cache, fresh backbone, median of
``--runs``) and for a correction on the same volume (a negative and a positive point; warm
cache), peak RSS of the process.

    python benchmarks/bench_prompt.py --json out.json                 # everything
    python benchmarks/bench_prompt.py --organs liver,spleen --no-speed
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data" / "totalseg_examples"
ORGANS = ["liver", "spleen", "kidney_left", "kidney_right", "stomach", "aorta"]
MARGIN_MM = 5.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def box_of(mask: np.ndarray, geometry, margin: float = MARGIN_MM,
           margin_z: float | None = None) -> list[float]:
    """LPS box [xmin, ymin, zmin, xmax, ymax, zmax] of a mask's voxel centres, plus margin."""
    index = np.argwhere(mask)[:, ::-1]
    corners = np.array([geometry.physical_point((i, j, k))[:3]
                        for i in (index[:, 0].min(), index[:, 0].max())
                        for j in (index[:, 1].min(), index[:, 1].max())
                        for k in (index[:, 2].min(), index[:, 2].max())])
    pad = np.array([margin, margin, margin if margin_z is None else margin_z])
    return [*(corners.min(axis=0) - pad), *(corners.max(axis=0) + pad)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def lps_of(geometry, z: int, y: float, x: float) -> tuple[float, float, float]:
    return tuple(float(v) for v in geometry.physical_point((x, y, z))[:3])


def accuracy(volume, seg, classes, organs, segmenter) -> dict:
    from MaskSAMLib.prompting import PromptSession, StructurePrompts

    session = PromptSession(volume, segmenter)
    out = {}
    for organ in organs:
        reference = seg == classes[organ]
        runs = segmenter.encoder_runs
        start = time.perf_counter()
        result = session.segment_structure(StructurePrompts(organ,
                                                            boxes=[box_of(reference,
                                                                          volume.geometry)]))
        seconds = time.perf_counter() - start
        z_ref = np.flatnonzero(reference.any(axis=(1, 2)))
        z_got = np.flatnonzero(result.mask.any(axis=(1, 2)))
        out[organ] = {"dice": round(dice(result.mask, reference), 4),
                      "seconds": round(seconds, 1),
                      "encoder_runs": segmenter.encoder_runs - runs,
                      "reference_slices": [int(z_ref[0]), int(z_ref[-1])],
                      "result_slices": [int(z_got[0]), int(z_got[-1])] if z_got.size else None}
        print(f"{organ}: Dice {out[organ]['dice']:.4f} ({seconds:.1f} s, "
              f"{out[organ]['encoder_runs']} encoder runs)", flush=True)
    return out


def corrections(volume, seg, classes, segmenter) -> dict:
    from MaskSAMLib.prompting import PromptSession, StructurePrompts

    session = PromptSession(volume, segmenter)
    geometry = volume.geometry
    kidney = seg == classes["kidney_right"]
    liver = seg == classes["liver"]
    box = box_of(kidney, geometry)
    good = session.segment_structure(StructurePrompts("kidney_right", boxes=[box])).mask

    # Points: three slices where the liver touches the kidney's box get the liver as wrong region.
    zs = [z for z in np.flatnonzero(kidney.any(axis=(1, 2)))
          if kidney[z].sum() > 100 and liver[z].sum() > 100]
    zs = [zs[len(zs) // 4], zs[len(zs) // 2], zs[3 * len(zs) // 4]]
    wrong = good.copy()
    positives, negatives = [], []
    for z in zs:
        ys, xs = np.nonzero(kidney[z])
        ky, kx = np.median(ys), np.median(xs)
        # the liver voxels nearest the kidney, a blob of about the kidney's size
        ly, lx = np.nonzero(liver[z])
        near = np.argsort(np.hypot(ly - ky, lx - kx))[: int(kidney[z].sum())]
        wrong[z, ly[near], lx[near]] = True
        positives.append(lps_of(geometry, z, ky, kx))
        cy, cx = np.median(ly[near]), np.median(lx[near])
        negatives.append(lps_of(geometry, z, cy, cx))
    start = time.perf_counter()
    fixed = session.segment_structure(StructurePrompts("kidney_right", points=positives,
                                                       negative_points=negatives),
                                      initial=wrong).mask
    points_s = time.perf_counter() - start
    slice_dice = {int(z): [round(dice(wrong[z], kidney[z]), 4), round(dice(fixed[z], kidney[z]), 4)]
                  for z in zs}
    out = {"points": {"slices": [int(z) for z in zs], "dice_before": round(dice(wrong, kidney), 4),
                      "dice_after": round(dice(fixed, kidney), 4),
                      "slice_dice_before_after": slice_dice,
                      "wrong_voxels_left": int((fixed & liver).sum()),
                      "wrong_voxels_before": int((wrong & liver).sum()),
                      "seconds": round(points_s, 2)}}
    print(f"points: Dice {out['points']['dice_before']} -> {out['points']['dice_after']} "
          f"({points_s:.2f} s)", flush=True)

    # Box: widen the kidney box towards the body's centre (the liver side) by 40 mm.
    centre = geometry.physical_point(np.asarray(geometry.size) / 2.0)[:3]
    wide = list(box)
    for axis in (0, 1):
        if centre[axis] < (box[axis] + box[axis + 3]) / 2:
            wide[axis] -= 40.0
        else:
            wide[axis + 3] += 40.0
    bad = session.segment_structure(StructurePrompts("kidney_right", boxes=[wide])).mask
    zmid = int(np.flatnonzero(kidney.any(axis=(1, 2))).mean().round())
    tight = box_of(_slice_only(kidney, zmid), geometry, 3.0, margin_z=0.0)  # on one slice
    start = time.perf_counter()
    boxed = session.segment_structure(StructurePrompts("kidney_right", boxes=[wide, tight])).mask
    box_s = time.perf_counter() - start
    out["box"] = {"wide_box_dice": round(dice(bad, kidney), 4),
                  "with_one_slice_box_dice": round(dice(boxed, kidney), 4),
                  "slice": zmid, "seconds": round(box_s, 2)}
    print(f"box: Dice {out['box']['wide_box_dice']} -> {out['box']['with_one_slice_box_dice']} "
          f"({box_s:.2f} s)", flush=True)
    return out


def _slice_only(mask: np.ndarray, z: int) -> np.ndarray:
    only = np.zeros_like(mask)
    only[z] = mask[z]
    return only


def upsampled_512(volume):
    """The CT with every slice resampled in-plane to 512 x 512 (same physical extent)."""
    import SimpleITK as sitk

    image = volume.to_sitk()
    size = image.GetSize()
    spacing = image.GetSpacing()
    new_spacing = (spacing[0] * size[0] / 512, spacing[1] * size[1] / 512, spacing[2])
    # keep the outer voxel edges where they were
    origin = np.array(image.GetOrigin())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    shift = direction @ (np.array([(new_spacing[0] - spacing[0]) / 2,
                                   (new_spacing[1] - spacing[1]) / 2, 0.0]))
    resampled = sitk.Resample(image, (512, 512, size[2]), sitk.Transform(), sitk.sitkLinear,
                              tuple(origin + shift), new_spacing, image.GetDirection(), -1024.0,
                              image.GetPixelID())
    from MaskSAMLib.data.geometry import Volume

    return Volume.from_sitk(resampled)


def speed(volume, seg, classes, runs: int, threads: int) -> dict:
    import torch

    from MaskSAMLib.prompting import PromptSession, SliceSegmenter, StructurePrompts

    big = upsampled_512(volume)
    kidney = seg == classes["kidney_left"]
    box = box_of(kidney, volume.geometry)
    zs = np.flatnonzero(kidney.any(axis=(1, 2)))
    z = int(zs[len(zs) // 2])
    ys, xs = np.nonzero(kidney[z])
    positive = lps_of(volume.geometry, z, float(np.median(ys)), float(np.median(xs)))
    negative = lps_of(volume.geometry, z, float(ys.min()), float(xs.min()))
    torch.set_num_threads(threads)
    first, again = [], []
    for _ in range(runs):
        segmenter = SliceSegmenter.load("litemedsam")  # cold: fresh backbone and cache
        start = time.perf_counter()
        session = PromptSession(big, segmenter)
        result = session.segment_structure(StructurePrompts("kidney_left", boxes=[box]))
        first.append(time.perf_counter() - start)
        print(f"first time: {first[-1]:.1f} s ({result.encoder_runs} encoder runs)", flush=True)
        for _ in range(3):
            start = time.perf_counter()
            session.segment_structure(StructurePrompts("kidney_left", boxes=[box],
                                                       points=[positive],
                                                       negative_points=[negative]))
            again.append(time.perf_counter() - start)
        print(f"corrections: {', '.join(f'{s:.2f}' for s in again[-3:])} s", flush=True)
    return {"volume": list(big.geometry.size), "first_s": [round(s, 1) for s in first],
            "first_median_s": round(statistics.median(first), 1),
            "correction_s": [round(s, 2) for s in again],
            "correction_median_s": round(statistics.median(again), 2),
            "encoder_runs": result.encoder_runs, "threads": threads,
            "peak_rss_mb": round(peak_rss_mb())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--organs", default=",".join(ORGANS))
    parser.add_argument("--no-corrections", action="store_true")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--runs", type=int, default=3, help="first-time runs for --speed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--cache", help="load/save the slice embeddings of the accuracy part "
                                        "here (re-runs of the Dice table; never for --speed, "
                                        "which always starts cold)")
    args = parser.parse_args()
    if not (DATA / "ct_abdomen_3mm.nii.gz").is_file():
        print(f"shared data not found at {DATA}", file=sys.stderr)
        return 1
    import torch

    from MaskSAMLib.data.io import read_volume
    from MaskSAMLib.prompting import SliceSegmenter

    torch.set_num_threads(args.threads)
    volume = read_volume(DATA / "ct_abdomen_3mm.nii.gz")
    seg = read_volume(DATA / "ct_abdomen_3mm_seg.nii.gz").array
    classes = {v: int(k) for k, v in json.loads((DATA / "classes.json").read_text())["ct"].items()}
    report: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "command": " ".join(sys.argv), "machine": platform.processor()
        or platform.machine(), "threads": args.threads, "torch": torch.__version__}
    segmenter = SliceSegmenter.load("litemedsam")
    if args.cache and Path(args.cache).is_file():
        for key, value in torch.load(args.cache, weights_only=True).items():
            segmenter.cache.put(key, value)
    organs = [o for o in args.organs.split(",") if o]
    if organs:
        report["dice"] = accuracy(volume, seg, classes, organs, segmenter)
    if not args.no_corrections:
        report["corrections"] = corrections(volume, seg, classes, segmenter)
    if args.cache:
        torch.save(dict(segmenter.cache._items), args.cache)
    report["accuracy_encoder_runs"] = segmenter.encoder_runs
    if not args.no_speed:
        report["speed_512"] = speed(volume, seg, classes, args.runs, args.threads)
    report["peak_rss_mb"] = round(peak_rss_mb())
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
