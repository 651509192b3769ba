"""Issue 2 benchmark: SAM ViT-B image encoder (ours vs official) and each backbone's MaskSAM.

Part A (``encoder``): segment-anything's official ``ImageEncoderViT`` (ViT-B, built by the
official ``build_sam_vit_b``, every tensor filled with random values because the builder leaves
``pos_embed`` and the ``rel_pos`` tables at zero) against MaskSAMLib's ``SamViTEncoder`` wrapped
around a deep copy of it (fused SDPA attention with SAM's decomposed rel-pos bias, depth adapters
zero-initialised). Same weights, same input, CPU, fp32, ``torch.no_grad``. The variants run
interleaved in one process (the order alternates each round) after a warm-up; we report the
median time of each, the official/ours ratio of the medians and the median of the per-round
ratios, and the max abs difference of the neck outputs.

* 1024: the official encoder exactly as built (the headline ratio).
* other sizes (512, 256): the official encoder cannot run there (its 64x64 ``pos_embed`` is added
  to a 32x32 token grid). We time ours (pos_embed resampled bilinearly at run time) and, as a
  secondary reference, an official ``ImageEncoderViT`` rebuilt at that geometry with the same
  weights resampled the way ours does it (``pos_embed`` bilinear, global-attention ``rel_pos``
  tables linearly, as SAM's ``get_rel_pos`` would), so outputs are still comparable.
* ``ours-noadapt``: ours with the two depth adapters per block replaced by a zero, i.e. fused
  attention alone (the adapters are part of MaskSAM, the official encoder has none).

Peak memory: each (variant, size) runs again in a fresh subprocess that builds only that encoder
(``ours`` adopts the official modules without a copy), resets the kernel's peak-RSS counter
(``/proc/self/clear_refs`` <- 5, which resets ``VmHWM``), runs one forward and reads ``VmHWM``:
the peak resident memory of the whole process during that forward (weights + activations +
the Python/torch runtime), and ``forward_extra`` = that peak minus the RSS just before it.

Part B (``models``): the full MaskSAM of each backbone (random weights, LiteMedSAM included: its
real checkpoint is not needed for timing) at its input size, T slices, N = 5 queries for 4
classes, ``torch.no_grad``, eval mode. Each configuration runs in a fresh subprocess: build,
warm-up forward, then timed forwards; time per slice = forward time / T, split into image
encoder, prompt generator, mask decoder (``decode_prompts``) and the rest (stem, prompt
embedding, heads). Peak memory as above, over the timed forwards.

Load: the machine is shared. For every timed region we record the CPU time used by other
processes (system-wide busy time from /proc/stat minus our own process's CPU time, divided by
the wall time: "other cores busy") and the steal time, and the 1-minute load average.

Usage::

    python benchmarks/bench_encoder.py                 # full run (~10-15 min on 2 cores)
    python benchmarks/bench_encoder.py --quick         # a few minutes
    python benchmarks/bench_encoder.py --sizes 1024 --repeats 7 --parts encoder
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = Path(__file__).resolve().parent / "out"
sys.path.insert(0, str(REPO))

MB = 1024 * 1024
VIT_B = dict(
    depth=12, embed_dim=768, num_heads=12, global_attn_indexes=(2, 5, 8, 11), window_size=14,
    patch_size=16, out_chans=256,
)
FEATURE_INDEXES = [2, 5, 8, 11]
# (backbone, input size, T) of part B; T=1 where a forward of T=3 would take too long on 2 cores.
MODEL_CASES = [
    ("tiny", 64, 3),
    ("litemedsam", 256, 3),
    ("vit_b", 256, 3),
    ("vit_b", 512, 3),
    ("vit_l", 512, 1),
    ("vit_h", 512, 1),
]
QUICK_MODEL_CASES = [("tiny", 64, 3), ("litemedsam", 256, 1), ("vit_b", 256, 3), ("vit_b", 512, 1)]
LABEL_NAMES = ["background", "liver", "spleen", "kidney"]  # K = 4 classes
NUM_QUERIES = 5


# --------------------------------------------------------------------------------------------
# Measurement helpers (used inside the worker subprocesses)
# --------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class LoadMeter:
    """CPU used by other processes during a region (cores), from /proc/stat and our own times."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process()

    def __enter__(self) -> LoadMeter:
        self._sys0 = self._psutil.cpu_times()
        own = self._proc.cpu_times()
        self._own0 = own.user + own.system
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t0
        sys1 = self._psutil.cpu_times()
        own = self._proc.cpu_times()
        busy = sum(
            getattr(sys1, f) - getattr(self._sys0, f)
            for f in ("user", "nice", "system", "irq", "softirq")
        )
        steal = getattr(sys1, "steal", 0.0) - getattr(self._sys0, "steal", 0.0)
        own_used = own.user + own.system - self._own0
        self.wall = wall
        self.own_cpu = own_used
        self.own_cores = own_used / wall if wall > 0 else 0.0
        self.other_cores = max(0.0, busy - own_used) / wall if wall > 0 else 0.0
        self.steal_cores = steal / wall if wall > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "wall_s": round(self.wall, 3),
            "own_cpu_s": round(self.own_cpu, 3),
            "own_cores": round(self.own_cores, 2),
            "other_cores": round(self.other_cores, 2),
            "steal_cores": round(self.steal_cores, 3),
            "loadavg_1min": round(os.getloadavg()[0], 2),
        }


QUIET_CORES = 0.3  # other processes' CPU use (cores) above which a timed run counts as disturbed


def wait_for_quiet(max_wait: float = 30.0, window: float = 0.5) -> dict[str, float]:
    """Sleep until other processes use less than QUIET_CORES cores (sampled over ``window``).

    With 2 torch threads on 2 cores, one core taken by another process slows an OpenMP forward
    by up to ~10x (threads wait on each other at every barrier), so a run is only started on a
    quiet machine; after ``max_wait`` seconds it starts anyway (the run is then flagged).
    """
    import psutil

    t0 = time.perf_counter()
    while True:
        a = psutil.cpu_times()
        time.sleep(window)
        b = psutil.cpu_times()
        busy = sum(getattr(b, f) - getattr(a, f) for f in ("user", "nice", "system", "irq",
                                                             "softirq"))
        other = busy / window
        waited = time.perf_counter() - t0
        if other < QUIET_CORES or waited >= max_wait:
            return {"waited_s": round(waited, 1), "other_cores_before": round(other, 2)}


def timed(fn: Any, max_wait: float) -> tuple[float, dict[str, float]]:
    """Run ``fn()`` once on a quiet machine; its wall time and the load during it."""
    quiet = wait_for_quiet(max_wait)
    with LoadMeter() as load:
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
    return elapsed, {**load.as_dict(), **quiet}


def interleaved(
    fns: dict[str, Any], repeats: int, max_wait: float, budget: float, min_unit: float = 0.0
) -> dict[str, Any]:
    """Time each function ``repeats`` times in rounds (order alternating every round).

    A round during which another process used more than QUIET_CORES cores in any of its runs
    is "disturbed" and one more round is run (at most ``repeats`` extra rounds). Medians are
    taken over the undisturbed rounds when there is any, otherwise over all rounds; every run
    is kept in the JSON with its load. Time lost to the load (waiting for quiet, disturbed
    rounds) is limited to ``budget`` seconds: after that no more waiting and no extra rounds.
    A function faster than ``min_unit`` seconds is called several times per timed unit (the
    time is divided), since /proc/stat counts load in 10 ms ticks.
    """
    names = list(fns)
    inner = dict.fromkeys(names, 1)
    if min_unit > 0:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            once = time.perf_counter() - t0
            inner[name] = max(1, math.ceil(min_unit / max(once, 1e-5)))

    def unit(name: str) -> Any:
        fn, n = fns[name], inner[name]
        if n == 1:
            return fn

        def many() -> None:
            for _ in range(n):
                fn()
        return many

    rounds: list[dict[str, Any]] = []
    lost = 0.0
    while True:
        clean = [r for r in rounds if not r["disturbed"]]
        over = lost > budget
        if len(clean) >= repeats or len(rounds) >= 2 * repeats or (len(rounds) >= repeats
                                                                    and over):
            break
        order = names if len(rounds) % 2 == 0 else names[::-1]
        runs = {}
        for name in order:
            t, load = timed(unit(name), max(0.0, min(max_wait, budget - lost)))
            runs[name] = {"s": round(t / inner[name], 6), "calls": inner[name], **load}
            lost += load["waited_s"]
        disturbed = any(r["other_cores"] > QUIET_CORES for r in runs.values())
        if disturbed:
            lost += sum(r["s"] * r["calls"] for r in runs.values())
        rounds.append({"runs": runs, "disturbed": disturbed})
    clean = [r for r in rounds if not r["disturbed"]]
    use = clean or rounds
    times = {n: [r["runs"][n]["s"] for r in use] for n in names}
    cpu = {n: [r["runs"][n]["own_cpu_s"] for r in use] for n in names}
    return {
        "rounds": rounds,
        "rounds_run": len(rounds),
        "rounds_disturbed": sum(r["disturbed"] for r in rounds),
        "medians_over": (f"{len(clean)} undisturbed rounds" if clean
                         else "all rounds (none was quiet)"),
        "times_s": times,
        "median_s": {n: statistics.median(v) for n, v in times.items()},
        "cpu_median_s": {n: statistics.median(v) for n, v in cpu.items()},
        "other_cores_median": round(statistics.median(
            r["runs"][n]["other_cores"] for r in use for n in names), 2),
        "other_cores_max": round(max(
            r["runs"][n]["other_cores"] for r in rounds for n in names), 2),
    }


def random_fill(module: Any, seed: int) -> None:
    """Fill EVERY parameter and buffer with random values (pos_embed, rel_pos included).

    Norm weights around 1, biases small, every other tensor N(0, 0.05^2): activations stay in
    a realistic range through 12 blocks, and position handling is exercised.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                t.copy_(1.0 + 0.1 * noise)
            elif leaf == "bias":
                t.copy_(0.02 * noise)
            elif leaf in ("pos_embed", "rel_pos_h", "rel_pos_w"):
                t.copy_(0.5 * noise)
            else:
                t.copy_(0.05 * noise)


def official_vit_b(seed: int = 0) -> Any:
    """The official ViT-B image encoder (1024 geometry) with every tensor random."""
    from MaskSAMLib.modeling.sam_import import sam_builders

    enc = sam_builders().build_sam_vit_b().image_encoder.eval()
    assert float(enc.pos_embed.abs().sum()) == 0.0  # the builder leaves it at zero...
    random_fill(enc, seed)  # ...so fill it, and the rel_pos tables, too
    assert float(enc.pos_embed.abs().sum()) > 0
    assert float(enc.blocks[2].attn.rel_pos_h.abs().sum()) > 0
    return enc


def official_vit_b_resampled(enc1024: Any, size: int) -> Any:
    """An official ``ImageEncoderViT`` built at ``size`` geometry, weights resampled from 1024.

    ``pos_embed`` 64x64 -> (size/16)^2 bilinear (what our encoder does at run time); the
    global-attention ``rel_pos`` tables 127 -> 2*(size/16)-1 linearly, exactly as SAM's
    ``get_rel_pos`` resizes them at run time. Window tables (27) are unchanged.
    """
    from torch import nn
    from torch.nn import functional as F

    from MaskSAMLib.modeling.sam_import import sam_modeling

    m = sam_modeling()
    enc = m.ImageEncoderViT(
        img_size=size, mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), qkv_bias=True,
        use_rel_pos=True, **VIT_B,
    ).eval()
    state = {}
    own = enc.state_dict()
    for k, v in enc1024.state_dict().items():
        if k == "pos_embed":
            g = size // 16
            v = F.interpolate(v.permute(0, 3, 1, 2), size=(g, g), mode="bilinear",
                              align_corners=False).permute(0, 2, 3, 1)
        elif k.endswith(("rel_pos_h", "rel_pos_w")) and v.shape != own[k].shape:
            n = own[k].shape[0]
            v = F.interpolate(v.reshape(1, v.shape[0], -1).permute(0, 2, 1), size=n,
                              mode="linear").reshape(-1, n).permute(1, 0)
        state[k] = v.contiguous()
    enc.load_state_dict(state)
    return enc


class _Zero:
    """Stands in for a depth adapter: contributes nothing (fused attention alone)."""

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> int:
        return 0


def ours_from(official: Any, *, copy_weights: bool, adapters: bool = True) -> Any:
    from MaskSAMLib.modeling.sam_vit import SamViTEncoder

    src = copy.deepcopy(official) if copy_weights else official
    ours = SamViTEncoder(sam_encoder=src, num_slices=1, feature_indexes=FEATURE_INDEXES).eval()
    if not adapters:
        for block in ours.blocks:
            # plain attributes shadow nothing in nn.Module's lookup once the submodules are gone
            del block.space_adapter
            del block.mlp_adapter
            object.__setattr__(block, "space_adapter", _Zero())
            object.__setattr__(block, "mlp_adapter", _Zero())
    return ours


def _run_variant(model: Any, x: Any) -> Any:
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


# --------------------------------------------------------------------------------------------
# Workers (each runs in a fresh subprocess and prints one JSON line)
# --------------------------------------------------------------------------------------------


def worker_encoder_time(
    size: int, repeats: int, warmup: int, threads: int, max_wait: float, budget: float
) -> dict:
    """Interleaved timing of official vs ours (vs ours without adapters) at one input size."""
    import torch

    torch.set_num_threads(threads)
    official1024 = official_vit_b(seed=0)
    if size == 1024:
        official = official1024
        official_kind = "official (as built)"
    else:
        official = official_vit_b_resampled(official1024, size)
        official_kind = f"official rebuilt at {size} (weights resampled)"
    variants = {
        "official": official,
        "ours": ours_from(official1024, copy_weights=True),
        "ours-noadapt": ours_from(official1024, copy_weights=True, adapters=False),
    }
    if size != 1024:
        del official1024
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    outputs = {}
    with torch.no_grad():
        for name, model in variants.items():
            for _ in range(warmup):
                outputs[name] = _run_variant(model, x)
        ref = outputs["official"]
        diffs = {
            name: float((out - ref).abs().max())
            for name, out in outputs.items() if name != "official"
        }
        ref_scale = float(ref.abs().max())
        fns = {name: partial(_run_variant, model, x) for name, model in variants.items()}
        res = interleaved(fns, repeats, max_wait, budget)
    times, med = res["times_s"], res["median_s"]
    paired = [o / u for o, u in zip(times["official"], times["ours"], strict=True)]
    paired_na = [o / u for o, u in zip(times["official"], times["ours-noadapt"], strict=True)]
    return {
        "size": size,
        "official_kind": official_kind,
        "repeats": repeats,
        "warmup": warmup,
        "threads": threads,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "ratio_official_over_ours": round(med["official"] / med["ours"], 3),
        "ratio_official_over_ours_paired_median": round(statistics.median(paired), 3),
        "ratio_official_over_ours_noadapt": round(med["official"] / med["ours-noadapt"], 3),
        "cpu_time_ratio_official_over_ours": round(
            res["cpu_median_s"]["official"] / res["cpu_median_s"]["ours"], 3),
        "cpu_time_ratio_official_over_ours_noadapt": round(
            res["cpu_median_s"]["official"] / res["cpu_median_s"]["ours-noadapt"], 3),
        "ratio_official_over_ours_noadapt_paired_median": round(statistics.median(paired_na), 3),
        "max_abs_diff": diffs,
        "max_abs_output": ref_scale,
        "equal_within_1e-4": all(d <= 1e-4 for d in diffs.values()),
        "timing": res,
    }


def worker_encoder_mem(size: int, variant: str, threads: int) -> dict:
    """Peak RSS of one forward of one encoder variant in this fresh process."""
    import torch

    torch.set_num_threads(threads)
    base = rss_mb()
    official1024 = official_vit_b(seed=0)
    if variant == "official":
        model = official1024 if size == 1024 else official_vit_b_resampled(official1024, size)
        if size != 1024:
            del official1024
    else:
        model = ours_from(official1024, copy_weights=False, adapters=variant == "ours")
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    import gc

    gc.collect()
    before = rss_mb()
    wait_for_quiet(10)
    ok = reset_peak_rss()
    with torch.no_grad(), LoadMeter() as load:
        t0 = time.perf_counter()
        _run_variant(model, x)
        elapsed = time.perf_counter() - t0
    peak = peak_rss_mb()
    import resource

    return {
        "size": size,
        "variant": variant,
        "peak_reset_ok": ok,
        "rss_interpreter_mb": round(base, 1),
        "rss_before_forward_mb": round(before, 1),
        "peak_rss_forward_mb": round(peak, 1),
        "forward_extra_mb": round(peak - before, 1),
        "ru_maxrss_process_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cold_forward_s": round(elapsed, 3),
        "load": load.as_dict(),
    }


def worker_model(
    backbone: str, size: int, slices: int, repeats: int, threads: int, max_wait: float,
    budget: float,
) -> dict:
    """Per-slice forward time and peak RSS of one backbone's full MaskSAM."""
    import torch

    import MaskSAMLib.modeling.masksam as masksam_mod
    from MaskSAMLib.config import make_labels, make_model_config
    from MaskSAMLib.modeling.build import build_masksam

    torch.set_num_threads(threads)
    base = rss_mb()
    t0 = time.perf_counter()
    config = make_model_config(
        backbone=backbone, labels=make_labels(LABEL_NAMES), img_size=size, num_slices=slices,
        num_queries=NUM_QUERIES,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_masksam(config).eval()
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    enc_params = sum(p.numel() for p in model.image_encoder.parameters())

    # Split the forward: hooks on the encoder and prompt generator, a timing wrapper around
    # decode_prompts (a function MaskSAM.forward calls once per query chunk).
    spans: dict[str, float] = {"encoder": 0.0, "prompt_generator": 0.0, "decoder": 0.0}
    starts: dict[str, float] = {}

    def pre(name: str):
        def hook(*_: Any) -> None:
            starts[name] = time.perf_counter()
        return hook

    def post(name: str):
        def hook(*_: Any) -> None:
            spans[name] += time.perf_counter() - starts[name]
        return hook

    model.image_encoder.register_forward_pre_hook(pre("encoder"))
    model.image_encoder.register_forward_hook(post("encoder"))
    model.prompt_generator.register_forward_pre_hook(pre("prompt_generator"))
    model.prompt_generator.register_forward_hook(post("prompt_generator"))
    original_decode = masksam_mod.decode_prompts

    def timed_decode(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return original_decode(*args, **kwargs)
        finally:
            spans["decoder"] += time.perf_counter() - t

    masksam_mod.decode_prompts = timed_decode

    x = torch.randn(1, 1, slices, size, size, generator=torch.Generator().manual_seed(1))
    import gc

    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(x)  # warm-up
        warm_s = time.perf_counter() - t0
        shapes = {k: list(v.shape) for k, v in out.items()}
        del out
        gc.collect()
        before = rss_mb()
        ok = reset_peak_rss()
        parts: list[dict[str, float]] = []
        # A timed unit of at least ~0.5 s: /proc/stat counts in 10 ms ticks, so the load of
        # a shorter run cannot be measured (tiny: several forwards per unit, times divided).
        inner = max(1, math.ceil(0.5 / max(warm_s, 1e-3))) if warm_s < 0.25 else 1

        def one() -> None:
            for k in spans:
                spans[k] = 0.0
            for _ in range(inner):
                model(x)
            parts.append({k: v / inner for k, v in spans.items()})

        res = interleaved({"forward": one}, repeats, max_wait, budget)
        peak = peak_rss_mb()
        if inner > 1:
            for r in res["rounds"]:
                r["runs"]["forward"]["s"] = round(r["runs"]["forward"]["s"] / inner, 5)
            res["times_s"] = {k: [t / inner for t in v] for k, v in res["times_s"].items()}
            res["median_s"] = {k: v / inner for k, v in res["median_s"].items()}
    used = [i for i, r in enumerate(res["rounds"])
            if not r["disturbed"] or res["medians_over"].startswith("all")]
    med_total = res["median_s"]["forward"]
    med_parts = {k: statistics.median(parts[i][k] for i in used) for k in spans}
    rest = med_total - sum(med_parts.values())
    return {
        "backbone": backbone,
        "size": size,
        "slices": slices,
        "num_queries": NUM_QUERIES,
        "num_classes": len(LABEL_NAMES),
        "params_m": round(params / 1e6, 2),
        "encoder_params_m": round(enc_params / 1e6, 2),
        "build_s": round(build_s, 2),
        "warmup_forward_s": round(warm_s, 3),
        "repeats": repeats,
        "forwards_per_timed_unit": inner,
        "threads": threads,
        "median_forward_s": round(med_total, 4),
        "per_slice_s": round(med_total / slices, 4),
        "per_slice_parts_s": {
            **{k: round(v / slices, 4) for k, v in med_parts.items()},
            "rest": round(rest / slices, 4),
        },
        "output_shapes": shapes,
        "peak_reset_ok": ok,
        "rss_interpreter_mb": round(base, 1),
        "rss_before_forward_mb": round(before, 1),
        "peak_rss_forward_mb": round(peak, 1),
        "forward_extra_mb": round(peak - before, 1),
        "timing": res,
    }


def worker_blocks(size: int, repeats: int, threads: int, max_wait: float, budget: float) -> dict:
    """Where the encoder time goes: one global and one windowed ViT-B block, part by part.

    The parts run interleaved like the encoder variants. ``bias (fresh)`` builds SAM's
    decomposed rel-pos bias ``(1, heads, L, L)`` as our fused attention does (a new tensor each
    call); ``bias (reused buffer)`` writes the same values into a preallocated tensor, which shows
    how much of the cost is the allocation itself (page faults of a fresh multi-100-MB block).
    """
    import torch
    from torch.nn import functional as F

    from MaskSAMLib.modeling.sam_import import sam_image_encoder_module
    from MaskSAMLib.modeling.sam_vit import fused_attention

    torch.set_num_threads(threads)
    enc_mod = sam_image_encoder_module()
    official = official_vit_b(seed=0)
    if size != 1024:
        official = official_vit_b_resampled(official, size)
    g = official.blocks[VIT_B["global_attn_indexes"][0]]
    wb = official.blocks[0]
    grid = size // 16
    x = torch.randn(1, grid, grid, 768, generator=torch.Generator().manual_seed(1))
    xw, _ = enc_mod.window_partition(x, wb.window_size)
    attn = g.attn
    heads = attn.num_heads
    with torch.no_grad():
        qkv = attn.qkv(x).reshape(1, grid * grid, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q = qkv[0]
        rh = enc_mod.get_rel_pos(grid, grid, attn.rel_pos_h)
        rw = enc_mod.get_rel_pos(grid, grid, attn.rel_pos_w)
        rq = q.reshape(1, heads, grid, grid, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", rq, rh)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", rq, rw)
        buf = torch.empty(1, heads, grid, grid, grid, grid)
        k, v = qkv[1], qkv[2]
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(1, heads, grid**2, grid**2)
        fns = {
            "global attention, official": partial(attn, x),
            "global attention, fused (ours)": partial(fused_attention, attn, x),
            "  of which: bias (fresh tensor)": lambda: rel_h[..., :, None] + rel_w[..., None, :],
            "  bias into a reused buffer": lambda: torch.add(
                rel_h[..., :, None], rel_w[..., None, :], out=buf),
            "  of which: SDPA with the bias": lambda: F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, scale=attn.scale),
            "windowed attention, official": partial(wb.attn, xw),
            "windowed attention, fused (ours)": partial(fused_attention, wb.attn, xw),
            "MLP + 2 LayerNorms (same code in both)": lambda: wb.mlp(wb.norm2(wb.norm1(x))),
        }
        for fn in fns.values():
            fn()
        res = interleaved(fns, repeats, max_wait, budget, min_unit=0.5)
    n_global = len(VIT_B["global_attn_indexes"])
    return {
        "size": size,
        "threads": threads,
        "global_blocks": n_global,
        "windowed_blocks": VIT_B["depth"] - n_global,
        "bias_mb": round(buf.numel() * 4 / MB, 1),
        "median_s": {k: round(v, 4) for k, v in res["median_s"].items()},
        "timing": res,
    }


WORKERS = {
    "blocks": worker_blocks,
    "encoder_time": worker_encoder_time,
    "encoder_mem": worker_encoder_mem,
    "model": worker_model,
}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def device_info() -> dict[str, Any]:
    import psutil
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)),
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_config_blas": "mkldnn" if torch.backends.mkldnn.is_available() else "no-mkldnn",
        "cuda": "no GPU in this run (CUDA not measured)"
        if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        "platform": platform.platform(),
        "git_commit": commit,
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def run_worker(kind: str, timeout: float, **kwargs: Any) -> dict:
    """Run one measurement in a fresh ``python`` subprocess; return its JSON (or an error)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--worker-args",
           json.dumps(kwargs)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", **kwargs}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}", **kwargs}
    result = json.loads(lines[-1])
    result["subprocess_wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def fmt_s(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v < 0.1:
        return f"{v:.4f}"
    return f"{v:.3f}" if v < 10 else f"{v:.2f}"


def encoder_table(timing: list[dict], memory: list[dict]) -> str:
    mem = {(m["size"], m["variant"]): m for m in memory if "error" not in m}
    rows = [
        "| input | threads | variant | median s | official/ours (medians) | (paired median) "
        "| (CPU time) | max abs diff vs official | peak RSS MB (forward extra) "
        "| load: other cores busy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in timing:
        if "error" in t:
            rows.append(f"| {t.get('size')} | error: {t['error']} |||||||||")
            continue
        s = t["size"]
        timing = t["timing"]
        load_txt = (f"{timing['other_cores_median']:.2f} (max {timing['other_cores_max']:.2f}; "
                    f"{timing['rounds_disturbed']}/{timing['rounds_run']} rounds disturbed)")
        for v in ("official", "ours", "ours-noadapt"):
            label = {"official": t["official_kind"], "ours": "ours (fused attn + adapters)",
                     "ours-noadapt": "ours without adapters"}[v]
            m = mem.get((s, v))
            mem_txt = f"{m['peak_rss_forward_mb']:.0f} ({m['forward_extra_mb']:.0f})" if m else "-"
            if v == "official":
                ratio = paired = cpu = diff = "-"
            elif v == "ours":
                ratio = f"**{t['ratio_official_over_ours']:.2f}x**"
                paired = f"{t['ratio_official_over_ours_paired_median']:.2f}x"
                cpu = f"{t['cpu_time_ratio_official_over_ours']:.2f}x"
                diff = f"{t['max_abs_diff']['ours']:.1e}"
            else:
                ratio = f"{t['ratio_official_over_ours_noadapt']:.2f}x"
                paired = f"{t['ratio_official_over_ours_noadapt_paired_median']:.2f}x"
                cpu = f"{t['cpu_time_ratio_official_over_ours_noadapt']:.2f}x"
                diff = f"{t['max_abs_diff']['ours-noadapt']:.1e}"
            rows.append(
                f"| {s} | {t['threads']} | {label} | {fmt_s(t['median_s'][v])} | {ratio} | "
                f"{paired} | {cpu} | {diff} | "
                f"{mem_txt} | {load_txt if v == 'official' else ''} |"
            )
    return "\n".join(rows)


def model_table(models: list[dict]) -> str:
    rows = [
        "| backbone | input | T | params (M) | per-slice s | encoder | prompt gen. | decoder "
        "| rest | peak RSS MB (forward extra) | load: other cores (disturbed runs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        if "error" in m or "skipped" in m:
            why = m.get("error") or m.get("skipped")
            rows.append(f"| {m['backbone']} | {m['size']} | {m['slices']} | skipped: {why} "
                        "||||||||")
            continue
        p = m["per_slice_parts_s"]
        rows.append(
            f"| {m['backbone']} | {m['size']} | {m['slices']} | {m['params_m']:.1f} | "
            f"**{fmt_s(m['per_slice_s'])}** | {fmt_s(p['encoder'])} | "
            f"{fmt_s(p['prompt_generator'])} | {fmt_s(p['decoder'])} | {fmt_s(p['rest'])} | "
            f"{m['peak_rss_forward_mb']:.0f} ({m['forward_extra_mb']:.0f}) | "
            f"{m['timing']['other_cores_median']:.2f} ({m['timing']['rounds_disturbed']}/"
            f"{m['timing']['rounds_run']}) |"
        )
    return "\n".join(rows)


def parse_cases(text: str) -> list[tuple[str, int, int]]:
    cases = []
    for item in text.split(","):
        backbone, size, slices = item.strip().split(":")
        cases.append((backbone, int(size), int(slices)))
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a few minutes: encoder at 512 and 256 (3 repeats), small models only")
    ap.add_argument("--sizes", default=None,
                    help="encoder input sizes, comma-separated "
                    "(default 1024,512,256; quick 512,256)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed encoder runs per variant (default 5; quick 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first")
    ap.add_argument("--model-repeats", type=int, default=None,
                    help="timed MaskSAM forwards per backbone (default 3; quick 2)")
    ap.add_argument("--models", default=None,
                    help="MaskSAM cases as backbone:size:T,... (default "
                    + ",".join(f"{b}:{s}:{t}" for b, s, t in MODEL_CASES) + ")")
    ap.add_argument("--parts", default="encoder,memory,blocks,models",
                    help="which parts to run: encoder (timing), memory, blocks (per-block "
                    "breakdown at the largest size), models")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="folder for the JSON results")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per subprocess")
    ap.add_argument("--max-wait", type=float, default=20,
                    help="seconds to wait for a quiet machine before each timed run")
    ap.add_argument("--budget", type=float, default=200,
                    help="seconds per measurement that may be lost to other load (waiting, "
                    "disturbed rounds) before no more waiting or extra rounds")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        result = WORKERS[args.worker](**json.loads(args.worker_args))
        print(json.dumps(result))
        return 0

    size_text = args.sizes or ("512,256" if args.quick else "1024,512,256")
    sizes = [int(s) for s in size_text.split(",")]
    repeats = args.repeats or (3 if args.quick else 5)
    model_repeats = args.model_repeats or (2 if args.quick else 3)
    cases = parse_cases(args.models) if args.models else (
        QUICK_MODEL_CASES if args.quick else MODEL_CASES)
    parts = set(args.parts.split(","))
    info = device_info()
    command = "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:])
    print(f"# bench_encoder  {info['date_utc']}\n{command}")
    print(f"device: {info['cpu_model']}, {info['cores_available']} cores, torch {info['torch']}, "
          f"{info['cuda']}; load avg {os.getloadavg()}", flush=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": command, "device": info, "threads": args.threads,
        "settings": {"sizes": sizes, "repeats": repeats, "warmup": args.warmup,
                     "model_repeats": model_repeats, "cases": cases},
        "encoder_timing": [], "encoder_memory": [], "blocks": None, "models": [],
    }

    if "encoder" in parts:
        for s in sizes:
            print(f"encoder timing at {s} ...", flush=True)
            r = run_worker("encoder_time", args.timeout, size=s, repeats=repeats,
                           warmup=args.warmup, threads=args.threads, max_wait=args.max_wait,
                           budget=args.budget)
            results["encoder_timing"].append(r)
            print("  ", json.dumps({k: r.get(k) for k in (
                "median_s", "ratio_official_over_ours", "max_abs_diff", "error")}),
                r.get("timing", {}).get("rounds_disturbed"), "disturbed rounds",
                flush=True)
    if "memory" in parts:
        for s in sizes:
            for v in ("official", "ours", "ours-noadapt"):
                print(f"encoder memory at {s}, {v} ...", flush=True)
                r = run_worker("encoder_mem", args.timeout, size=s, variant=v,
                               threads=args.threads)
                results["encoder_memory"].append(r)
                print("  ", json.dumps({k: r.get(k) for k in (
                    "peak_rss_forward_mb", "forward_extra_mb", "cold_forward_s", "error")}),
                    flush=True)
    if "blocks" in parts:
        s = max(sizes)
        print(f"block breakdown at {s} ...", flush=True)
        r = run_worker("blocks", args.timeout, size=s, repeats=repeats, threads=args.threads,
                       max_wait=args.max_wait, budget=args.budget)
        results["blocks"] = r
        print("  ", json.dumps(r.get("median_s") or r.get("error")), flush=True)
    if "models" in parts:
        for backbone, size, slices in cases:
            print(f"MaskSAM {backbone} at {size}, T={slices} ...", flush=True)
            r = run_worker("model", args.timeout, backbone=backbone, size=size, slices=slices,
                           repeats=model_repeats, threads=args.threads,
                           max_wait=args.max_wait, budget=args.budget)
            results["models"].append(r)
            print("  ", json.dumps({k: r.get(k) for k in (
                "per_slice_s", "per_slice_parts_s", "peak_rss_forward_mb", "build_s", "error")}),
                flush=True)

    results["total_wall_s"] = round(time.perf_counter() - started, 1)
    results["loadavg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"bench_encoder_{stamp}.json"
    text = json.dumps(results, indent=2) + "\n"
    path.write_text(text)
    (args.out / "bench_encoder_latest.json").write_text(text)

    print()
    if results["encoder_timing"] or results["encoder_memory"]:
        print("## ViT-B image encoder: ours vs official (CPU, fp32, "
              f"{args.threads} threads, median of {repeats} interleaved runs)\n")
        print(encoder_table(results["encoder_timing"], results["encoder_memory"]))
        print()
    if results["blocks"] and "error" not in results["blocks"]:
        b = results["blocks"]
        print(f"## Where the time goes: one ViT-B block at {b['size']} (median s; "
              f"{b['global_blocks']} global + {b['windowed_blocks']} windowed blocks; "
              f"bias {b['bias_mb']:.0f} MB per global block)\n")
        print("| part | median s |\n|---|---|")
        for k, v in b["median_s"].items():
            print(f"| {k} | {fmt_s(v)} |")
        t = b["timing"]
        print(f"\nload: other cores {t['other_cores_median']:.2f} (max {t['other_cores_max']:.2f}; "
              f"{t['rounds_disturbed']}/{t['rounds_run']} rounds disturbed)\n")
    if results["models"]:
        print(f"## MaskSAM per backbone (N={NUM_QUERIES} queries, K={len(LABEL_NAMES)} classes, "
              f"no_grad, {args.threads} threads, median of {model_repeats}; seconds per slice)\n")
        print(model_table(results["models"]))
        print()
    print(f"total {results['total_wall_s']:.0f} s; JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
