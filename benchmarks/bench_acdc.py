"""ACDC validation figures of a model, measured as a user gets them: ``masksam segment`` on the
val volumes (in their original grid), then ``masksam evaluate`` against the references.

    python benchmarks/bench_acdc.py --model MODEL_OR_NAME [--data ../shared/data/acdc]
        [--subset val] [--out benchmarks/out/acdc-MODEL] [--threads 2]

Writes ``summary.json`` (mean and per-structure Dice and HD95, seconds per volume from the
sidecars, wall time, peak RSS of the segment process, device, date, command) and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STRUCTURES = ("right_ventricle", "myocardium", "left_ventricle")


def _link_cases(data: Path, ids: list[str], out: Path) -> tuple[Path, Path]:
    images, labels = out / "images", out / "labels"
    for folder in (images, labels):
        folder.mkdir(parents=True, exist_ok=True)
    for case in ids:
        for src, dst in ((data / "imagesTr" / f"{case}_0000.nii.gz", images / f"{case}.nii.gz"),
                         (data / "labelsTr" / f"{case}.nii.gz", labels / f"{case}.nii.gz")):
            if not dst.exists():
                dst.symlink_to(src.resolve())
    return images, labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "acdc"))
    parser.add_argument("--subset", default="val", help="key of split.json (never tune on test)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N cases of the subset (a sample; say so)")
    args = parser.parse_args()

    data = Path(args.data)
    ids = json.loads((data / "split.json").read_text())[args.subset][: args.limit]
    name = Path(args.model).name
    out = Path(args.out or REPO / "benchmarks" / "out" / f"acdc-{name}-{args.subset}")
    out.mkdir(parents=True, exist_ok=True)
    images, labels = _link_cases(data, ids, out)
    pred = out / "pred"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    segment = [sys.executable, "-m", "MaskSAMLib", "segment", str(images), "--model", args.model,
               "--out", str(pred), "--device", args.device, "--overwrite", "--quiet"]
    start = time.perf_counter()
    proc = subprocess.run(segment, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return proc.returncode
    peak_rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    report = out / "report.json"
    evaluate = [sys.executable, "-m", "MaskSAMLib", "evaluate", str(pred), str(labels),
                "--labels", str(data / "dataset.json"), "--out", str(report), "--quiet"]
    ev = subprocess.run(evaluate, env=env, capture_output=True, text=True)
    if ev.returncode != 0:
        print(ev.stderr, file=sys.stderr)
        return ev.returncode
    rep = json.loads(report.read_text())
    seconds = []
    for sidecar in sorted(pred.glob("*.json")):
        timings = json.loads(sidecar.read_text()).get("timings_s") or {}
        if "total" in timings:
            seconds.append(timings["total"])
    summary = {
        "model": args.model, "subset": args.subset, "cases": len(ids),
        "per_structure": {m["label"]: {"dice": m["dice"], "dice_std": m["dice_std"],
                                       "hd95_mm": m["hd95_mm"]} for m in rep["mean"]},
        "mean_foreground_dice": rep.get("mean_foreground_dice"),
        "seconds_per_volume_median": sorted(seconds)[len(seconds) // 2] if seconds else None,
        "segment_wall_s": round(wall, 1), "segment_peak_rss_gb": round(peak_rss_gb, 2),
        "threads": args.threads, "device": args.device, "cpu": platform.processor() or
        platform.machine(), "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
