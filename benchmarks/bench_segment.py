"""Issue 4 benchmark: ``masksam segment`` seconds per volume, peak memory and the time split.

Volumes: synthetic CT-like 512 x 512 x Z int16 NIfTI (Z = 100 and 300; spacing 0.78 x 0.78 x
1.5 mm; an ellipse body with a few ellipsoid organs and noise; written once, reused).
Models: each backbone with **random weights** (speed and memory do not depend on the weight
values): 13 classes + background, N = 16 queries, T = 3 slices, the backbone's input size
(litemedsam 256, vit_b 512), decoder chunk 8 (the CPU default), fp32. The model's saved
preprocessing plans target spacing 0.9 x 0.9 x 2.0 mm, so resampling is part of the cost, and
CT normalisation.

Each configuration runs in a fresh child process that does what ``masksam segment`` does
(``read_case`` with its header and memory checks -> ``Predictor.predict`` -> ``write_outputs``)
and reports the sidecar's split: read, preprocess, encoder, decoder (prompt generator + mask
decoder + heads, i.e. the network minus the encoder), stitch (MaskFormer class scores, Gaussian
blending, argmax), postprocess (back to the input grid), write. Peak memory is the child's
``VmHWM`` (the whole process: Python, torch, weights, data, activations).

Sampling (``--sample-batches K``, default 3): on a CPU a full-resolution run of the standard
setting is hours (thousands of windows), so after a warm-up forward the first K window
batches run the real network and the remaining batches reuse the last output (zero cost).
Every other stage (reading, preprocessing, stitching of *all* windows, restoring, writing) runs
in full; encoder and decoder seconds are the measured seconds per window (over the windows that
ran for real, a last partial batch included) times the number of windows.
``--sample-batches 0`` runs every window for real. The output JSON says which.

Load: the machine may be shared. For each run we record the 1-minute load average and the CPU
time used by other processes during the run ("other cores busy" = system busy time from
/proc/stat minus this run's CPU time, divided by the wall time).

Usage::

    python benchmarks/bench_segment.py                      # 2 backbones x 2 sizes x 2 modes
    python benchmarks/bench_segment.py --backbones litemedsam --slices 100 --modes fast
    python benchmarks/bench_segment.py --sample-batches 0 --backbones tiny   # full, no sampling
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPACING = (0.78, 0.78, 1.5)
TARGET_SPACING = (0.9, 0.9, 2.0)
NUM_CLASSES = 14


def make_ct(path: Path, slices: int, seed: int = 0) -> Path:
    """A 512 x 512 x ``slices`` int16 CT-like volume (HU), written once."""
    import numpy as np
    import SimpleITK as sitk

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:512, :512].astype(np.float32)
    body = ((xx - 256) / 230) ** 2 + ((yy - 256) / 170) ** 2 <= 1
    organs = [(rng.uniform(150, 360, 2), rng.uniform(20, 70, 2), rng.uniform(0, slices),
               rng.uniform(10, 60), rng.uniform(30, 200)) for _ in range(10)]
    volume = np.empty((slices, 512, 512), np.int16)
    for z in range(slices):
        plane = np.where(body, 40.0, -1000.0).astype(np.float32)
        for (cx, cy), (rx, ry), cz, rz, hu in organs:
            r = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 + ((z - cz) / rz) ** 2
            plane[(r <= 1) & body] = hu
        plane += rng.normal(0, 12, plane.shape).astype(np.float32) * body
        volume[z] = np.clip(plane, -1024, 3071).astype(np.int16)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(SPACING)
    image.SetOrigin((-200.0, -200.0, -slices * SPACING[2]))
    tmp = path.with_name(path.name.replace(".nii.gz", ".tmp.nii.gz"))
    sitk.WriteImage(image, str(tmp), True)
    os.replace(tmp, path)
    return path


def make_model(folder: Path, backbone: str) -> Path:
    """A random-weight model folder of ``backbone`` with a preprocessing plan."""
    import torch

    from MaskSAMLib.config import make_labels, make_model_config
    from MaskSAMLib.data.normalization import CTNormStats
    from MaskSAMLib.data.preprocessing import PreprocessConfig
    from MaskSAMLib.modeling.build import build_masksam, save_model_dir

    if (folder / "model.safetensors").exists():
        return folder
    stats = CTNormStats(mean=80.0, std=120.0, percentile_00_5=-150.0, percentile_99_5=300.0)
    pre = PreprocessConfig(target_spacing=TARGET_SPACING, channel_names=["CT"], ct_stats=[stats])
    labels = make_labels(["background"] + [f"organ_{i}" for i in range(1, NUM_CLASSES)])
    config = make_model_config(backbone=backbone, labels=labels, num_queries=16,
                               preprocessing=pre,
                               provenance={"weights": "random (benchmark)"})
    torch.manual_seed(0)
    save_model_dir(build_masksam(config).eval(), folder)
    return folder


def _cpu_busy() -> float:
    fields = [float(v) for v in open("/proc/stat").readline().split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return (sum(fields) - idle) / ticks


def _peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration, in this (fresh) process."""
    import torch

    from MaskSAMLib.inference.inputs import CaseInput, read_case
    from MaskSAMLib.inference.outputs import PlannedOutput, write_outputs
    from MaskSAMLib.inference.predictor import PredictOptions, Predictor

    torch.set_num_threads(args.threads)
    busy0, cpu0, wall0 = _cpu_busy(), time.process_time(), time.monotonic()
    predictor = Predictor.from_model_dir(args.model, device="cpu")
    options = PredictOptions(fast=args.mode == "fast")
    case = CaseInput("bench", [Path(args.input)])
    sampler = _Sampler(predictor.model, args.sample_batches)
    warm = torch.zeros(options.batch_windows, 1, predictor.model.num_slices,
                       predictor.model.img_size, predictor.model.img_size)
    with torch.no_grad():
        predictor.model(warm)  # warm-up, not timed
    predictor.model = sampler
    read = read_case(case, lambda geometry, name, nbytes: predictor.check_memory(
        geometry, name, None, options, nbytes))
    prediction = predictor.predict(read.volumes, options=options)
    read.volumes.clear()
    out = Path(args.workdir) / f"out_{args.backbone}_{args.slices}_{args.mode}.nii.gz"
    info = write_outputs(prediction, PlannedOutput(case, out), overwrite=True,
                         read_seconds=read.seconds)
    times = dict(info["timings_s"])
    batches = sampler.calls
    if sampler.limit and sampler.real < batches:
        scale = prediction.windows / max(sampler.real_windows, 1)
        times["encoder"] = round(times["encoder"] * scale, 3)
        times["decoder"] = round((sampler.real_seconds - prediction.timings["encoder"]) * scale, 3)
    order = ("read", "preprocess", "encoder", "decoder", "stitch", "postprocess", "write")
    times["total"] = round(sum(times[k] for k in order), 3)
    wall = time.monotonic() - wall0
    other = (_cpu_busy() - busy0 - (time.process_time() - cpu0)) / wall
    shape = prediction.preprocessed_shape
    return {
        "backbone": args.backbone, "slices": args.slices, "mode": args.mode,
        "threads": args.threads, "windows": prediction.windows, "batches": batches,
        "real_batches": sampler.real, "real_windows": sampler.real_windows,
        "sampled": bool(sampler.limit and sampler.real < batches),
        "preprocessed_shape": list(shape),
        "timings_s": times, "peak_rss_mb": round(_peak_rss_mb(), 0),
        "wall_s": round(wall, 1), "other_cores_busy": round(other, 2),
        "load_1min": round(os.getloadavg()[0], 2),
    }


class _Sampler:
    """Runs the real network for the first ``limit`` batches, then repeats its last output."""

    def __init__(self, net: Any, limit: int) -> None:
        self.net, self.limit = net, limit
        self.calls = self.real = self.real_windows = 0
        self.real_seconds = 0.0
        self._last: dict | None = None
        self._shape: tuple | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["net"], name)

    def __call__(self, x):  # noqa: ANN001 - a (B, C, T, H, W) tensor
        self.calls += 1
        if self.limit and self.real >= self.limit and tuple(x.shape) == self._shape:
            return {k: v.clone() for k, v in self._last.items()}
        start = time.perf_counter()
        out = self.net(x)
        self.real_seconds += time.perf_counter() - start
        self.real += 1
        self.real_windows += int(x.shape[0])
        self._last, self._shape = out, tuple(x.shape)
        return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """RESULTS.md table: one line per configuration, seconds per stage and peak memory."""
    head = ("| backbone | slices | mode | windows | total s | read | preprocess | encoder | "
            "decoder | stitch | restore | write | rest / encoder | peak RSS GB | load |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        t = r["timings_s"]
        rest = t["total"] - t["encoder"]
        lines.append(
            f"| {r['backbone']} | {r['slices']} | {r['mode']} | {r['windows']} | "
            f"{t['total']:.0f} | {t['read']:.1f} | {t['preprocess']:.1f} | {t['encoder']:.0f} | "
            f"{t['decoder']:.0f} | {t['stitch']:.1f} | {t['postprocess']:.1f} | {t['write']:.1f} | "
            f"{rest / max(t['encoder'], 1e-9):.2f} | {r['peak_rss_mb'] / 1024:.2f} | "
            f"{r['other_cores_busy']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["litemedsam", "vit_b"])
    parser.add_argument("--slices", nargs="+", type=int, default=[100, 300])
    parser.add_argument("--modes", nargs="+", default=["standard", "fast"])
    parser.add_argument("--sample-batches", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "masksam-bench"))
    parser.add_argument("--out", default=None, help="JSON lines results file")
    parser.add_argument("--table", default=None, help="print the table of a results file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        rows = [json.loads(x) for x in Path(args.table).read_text().splitlines() if x.strip()]
        print(markdown_table(rows))
        return
    if args.child:
        args.slices = args.slices[0]
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    for slices in args.slices:
        for backbone in args.backbones:
            model = make_model(work / f"model_{backbone}", backbone)
            volume = make_ct(work / f"ct_512x512x{slices}.nii.gz", slices)
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--child", "--model", str(model), "--input",
                       str(volume), "--backbone", backbone, "--slices", str(slices), "--mode",
                       mode, "--sample-batches", str(args.sample_batches), "--threads",
                       str(args.threads), "--workdir", str(work)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not lines:
                    print(f"{backbone} {slices} {mode}: failed\n{proc.stderr[-2000:]}",
                          file=sys.stderr)
                    continue
                result = json.loads(lines[-1][7:])
                print(json.dumps(result), flush=True)
                if args.out:
                    with open(args.out, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
