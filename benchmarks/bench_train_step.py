"""Seconds and peak memory of one training step (forward, losses, backward, AdamW) on CPU,
under different process settings.

Each variant runs in a fresh child process (glibc reads its MALLOC_* variables at process
start): build the backbone's MaskSAM with random weights (timing does not depend on weight
values), one warm-up step, then --steps timed steps on a fixed synthetic batch (a CT-like
noise image and a label map with seven organ-sized boxes, so the matcher and every loss term
work as in training). The step is what the trainer does: forward (decoder in chunks of 8
queries, the CPU default), SetCriterion, backward, gradient clipping, AdamW.

Variants:
  default   the process as `masksam train` starts it
  malloc    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 (glibc's
            malloc thresholds raised; the JSON's system CPU share shows how much of a step the
            kernel spent, e.g. page-faulting freed activation buffers in again)

    python benchmarks/bench_train_step.py --backbone litemedsam --steps 4 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "default": {},
    "malloc": {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"},
}
NAMES = ["background", "spleen", "kidney_right", "kidney_left", "liver", "stomach", "aorta",
         "inferior_vena_cava"]


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def worker(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    from MaskSAMLib.config import make_labels, make_model_config
    from MaskSAMLib.modeling.build import build_masksam
    from MaskSAMLib.training.criterion import SetCriterion
    from MaskSAMLib.training.trainer import TrainOptions

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = make_model_config(backbone=args.backbone, labels=make_labels(NAMES),
                               num_slices=args.slices)
    model = build_masksam(config)
    model.train()
    size, t, b = model.img_size, model.num_slices, args.batch_size
    criterion = SetCriterion(num_classes=model.num_classes, num_points=args.num_points)
    trainable = [p for p in model.parameters() if p.requires_grad]
    defaults = TrainOptions()
    optimizer = torch.optim.AdamW(trainable, lr=defaults.lr, eps=defaults.eps,
                                  weight_decay=defaults.weight_decay)
    image = torch.randn(b, 1, t, size, size, generator=torch.Generator().manual_seed(0))
    label = torch.zeros(b, t, size, size, dtype=torch.long)
    s = size / 256
    for k, (y0, y1, x0, x1) in enumerate([(40, 150, 30, 150), (160, 200, 180, 230),
                                           (150, 190, 40, 80), (150, 190, 170, 210),
                                           (60, 110, 150, 200), (120, 135, 120, 135),
                                           (120, 135, 100, 115)], start=1):
        label[:, :, int(y0 * s):int(y1 * s), int(x0 * s):int(x1 * s)] = k
    encoder = {}
    model.image_encoder.register_forward_pre_hook(
        lambda m, i: encoder.__setitem__("start", time.perf_counter()))
    model.image_encoder.register_forward_hook(
        lambda m, i, o: encoder.__setitem__("s", time.perf_counter() - encoder["start"]))
    rows = []
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        outputs = model(image, decoder_chunk=8)
        t1 = time.perf_counter()
        loss = criterion(outputs, label)["loss"]
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trainable, defaults.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        del outputs, loss
        row = {"forward": t1 - t0, "encoder_forward": encoder["s"], "loss": t2 - t1,
               "backward": t3 - t2, "optimizer": t4 - t3, "total": t4 - t0}
        print(f"  step {step}{' (warm-up)' if step == 0 else ''}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), file=sys.stderr, flush=True)
        if step > 0:
            rows.append(row)
    cpu = os.times()
    return {
        "median_s": {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]},
        "steps_total_s": [round(r["total"], 2) for r in rows],
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "system_cpu_share": round(cpu.system / max(cpu.user + cpu.system, 1e-9), 3),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "trainable_params_m": round(sum(p.numel() for p in trainable) / 1e6, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="litemedsam",
                        choices=["litemedsam", "vit_b", "tiny"])
    parser.add_argument("--variants", default="default,malloc")
    parser.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--slices", type=int, default=3)
    parser.add_argument("--num-points", type=int, default=4096)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown --variants {unknown}; choose from {sorted(VARIANTS)}")
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    results = {}
    for name in args.variants.split(","):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env.update(VARIANTS[name])
        print(f"{name}:", file=sys.stderr, flush=True)
        argv = [sys.executable, __file__, "--worker", "--backbone", args.backbone,
                "--steps", str(args.steps), "--threads", str(args.threads),
                "--batch-size", str(args.batch_size), "--slices", str(args.slices),
                "--num-points", str(args.num_points)]
        done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True, check=True)
        results[name] = {"env": VARIANTS[name], **json.loads(done.stdout.strip().splitlines()[-1])}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import cpu_name  # imports torch: only after the children have run

    record = {
        "backbone": args.backbone, "batch_size": args.batch_size, "slices": args.slices,
        "num_points": args.num_points, "variants": results,
        "device": f"{cpu_name()}, {os.cpu_count()} logical cores",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "command": "python " + " ".join(sys.argv),
    }
    out = REPO / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    (out / f"train_step_{args.backbone}.json").write_text(json.dumps(record, indent=2))
    print("| variant | step s (median) | forward | of which encoder | backward | peak RSS GB "
          "| system CPU share |\n|---|---|---|---|---|---|---|")
    for name, r in results.items():
        m = r["median_s"]
        print(f"| {name} | {m['total']:.1f} | {m['forward']:.1f} | {m['encoder_forward']:.1f} "
              f"| {m['backward']:.1f} | {r['peak_rss_gb']:.2f} | {r['system_cpu_share']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
