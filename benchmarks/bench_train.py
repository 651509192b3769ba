"""Training benchmarks (issue 3): learning on phantoms, and fine-tuning LiteMedSAM on real CT.

phantoms: make a phantom dataset, train, and score whole-volume predictions of held-out cases
(per-class Dice on the preprocessed grid, the same sliding window as inference).

totalseg: split ../shared/data/totalseg_examples/ct_abdomen_3mm.nii.gz into axial slabs: a
held-out slab in the middle of the organs (--heldout), and a training slab below and above it,
each --gap slices away (neighbouring slices leak); fine-tune from LiteMedSAM and score the
held-out slab.

Records iterations, wall time, peak RSS and per-class Dice as JSON in benchmarks/out/ and
prints a markdown table. Examples:

    python benchmarks/bench_train.py phantoms --iterations 1500
    python benchmarks/bench_train.py totalseg --iterations 120 --batch-size 1 --lr 2e-3 \
        --spacing 1.5 1.5 3 --workers 0
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MaskSAMLib.data.phantoms import make_phantoms  # noqa: E402
from MaskSAMLib.progress import Progress  # noqa: E402
from MaskSAMLib.training.run import TrainRequest, train  # noqa: E402
from MaskSAMLib.training.trainer import TrainOptions  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "totalseg_examples"
# Label values in ct_abdomen_3mm_seg.nii.gz. Gallbladder (slices 84-95) and pancreas (81-99)
# lie wholly inside the held-out slab and its gaps, so no training slab shows them: they are
# left out (background) rather than scored on classes the model never saw.
ORGANS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "stomach": 6,
          "aorta": 52, "inferior_vena_cava": 63}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def make_slab_dataset(out: Path, gap: int, heldout: tuple[int, int], lowest: int
                      ) -> tuple[Path, Path]:
    """Axial slabs of the real CT: the held-out slab ``heldout`` (slice range, end exclusive)
    and two training slabs, below and above it, each ``gap`` slices away from it (the CT's
    organs span slices 57-111 of 112, so the held-out slab sits in their middle and the
    training slabs see the organs' lower and upper parts)."""
    image = sitk.ReadImage(str(SHARED / "ct_abdomen_3mm.nii.gz"))
    label = sitk.ReadImage(str(SHARED / "ct_abdomen_3mm_seg.nii.gz"))
    seg = sitk.GetArrayFromImage(label)
    remapped = np.zeros_like(seg, dtype=np.uint8)
    labels = {"background": 0}
    for i, (name, value) in enumerate(ORGANS.items(), start=1):
        remapped[seg == value] = i
        labels[name] = i
    z = seg.shape[0]
    h0, h1 = heldout
    slabs = {"train_lower": (lowest, h0 - gap), "heldout": (h0, h1), "train_upper": (h1 + gap, z)}
    if not (0 <= lowest < h0 - gap and h1 + gap < z):
        raise SystemExit(f"slabs do not fit the CT's {z} slices: {slabs}")
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    lab_img = sitk.GetImageFromArray(remapped)
    lab_img.CopyInformation(label)
    for case, (z0, z1) in slabs.items():
        sitk.WriteImage(image[:, :, z0:z1], str(out / "imagesTr" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(lab_img[:, :, z0:z1], str(out / "labelsTr" / f"{case}.nii.gz"))
    (out / "dataset.json").write_text(json.dumps({
        "name": "totalseg_ct_slabs", "channel_names": {"0": "CT"}, "labels": labels,
        "numTraining": 3, "file_ending": ".nii.gz",
    }))
    split = out / "split.json"
    split.write_text(json.dumps({"train": ["train_lower", "train_upper"], "val": ["heldout"]}))
    (out / "slabs.json").write_text(json.dumps(slabs))
    return out, split


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=["phantoms", "totalseg"])
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--slices", type=int, default=3)
    parser.add_argument("--gap", type=int, default=6, help="slices between slabs (totalseg)")
    parser.add_argument("--heldout", type=int, nargs=2, default=(84, 96), metavar=("Z0", "Z1"),
                        help="held-out slice range, end exclusive (totalseg)")
    parser.add_argument("--lowest", type=int, default=50,
                        help="first slice of the lower training slab (totalseg)")
    parser.add_argument("--val-every", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spacing", type=float, nargs=3, default=None,
                        help="target spacing X Y Z mm (default: the dataset's median)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--work", default=None, help="working folder (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="masksam-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.experiment == "phantoms":
        dataset = make_phantoms(work / "phantoms", cases=args.cases, seed=0)
        split, backbone, lr = None, "tiny", args.lr or 3e-3
        val_fraction = 0.2
    else:
        if not (SHARED / "ct_abdomen_3mm.nii.gz").is_file():
            print(f"shared data not found at {SHARED}", file=sys.stderr)
            return 1
        dataset, split = make_slab_dataset(work / "slabs", args.gap, tuple(args.heldout),
                                           args.lowest)
        backbone, lr, val_fraction = "litemedsam", args.lr or 1e-3, 0.0
    request = TrainRequest(dataset=dataset, out=work / "model", backbone=backbone,
                           val_fraction=val_fraction, split_file=split,
                           num_slices=args.slices, cache_dir=work / "cache", device="cpu",
                           target_spacing=tuple(args.spacing) if args.spacing else None)
    options = TrainOptions(iterations=args.iterations, batch_size=args.batch_size, lr=lr,
                           val_every=args.val_every or max(args.iterations // 5, 1),
                           checkpoint_every=max(args.iterations // 5, 1),
                           num_points=2048 if backbone == "tiny" else 4096,
                           workers=args.workers)
    start = time.monotonic()
    summary = train(request, options, Progress("tqdm" if sys.stderr.isatty() else "none"))
    seconds = time.monotonic() - start
    log = [json.loads(x) for x in (work / "model" / "training" / "log.jsonl").read_text()
           .splitlines()]
    validations = [rec for rec in log if "validation" in rec]
    best = max(validations, key=lambda r: r["validation"]["mean_dice"]) if validations else None
    result = {
        "experiment": args.experiment, "backbone": backbone, "iterations": args.iterations,
        "batch_size": args.batch_size, "lr": lr, "slices": args.slices,
        "spacing": args.spacing,
        "slabs": (json.loads((work / "slabs" / "slabs.json").read_text())
                  if args.experiment == "totalseg" else None),
        "wall_s": round(seconds, 1), "s_per_iteration": round(seconds / args.iterations, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "validations": [{"iteration": r["iteration"], **r["validation"]} for r in validations],
        "best": best, "summary_best": summary["best"],
        "device": f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }
    out_dir = REPO / "benchmarks" / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"train_{args.experiment}.json").write_text(json.dumps(result, indent=2))
    print("| iteration | mean Dice | per class |\n|---|---|---|")
    for v in result["validations"]:
        per = ", ".join(f"{k} {d:.3f}" for k, d in v["dice"].items())
        print(f"| {v['iteration']} | {v['mean_dice']:.3f} | {per} |")
    print(f"\nwall {result['wall_s']} s ({result['s_per_iteration']} s/it), peak RSS "
          f"{result['peak_rss_gb']} GB, {result['device']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
