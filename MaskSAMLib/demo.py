"""``masksam demo``: the main job end to end on a CPU-only machine with no data.

1. a small synthetic CT dataset (``data.phantoms``: liver, spleen, kidneys, aorta, spine in
   varied voxel orientations and anisotropic spacing);
2. train the ``tiny`` backbone on it. Why tiny: it is the only backbone that learns anything
   within the budget on 2 CPU cores. Its 64 x 64 input and 8-pixel patches make one training
   iteration about 0.2 s (1200 iterations: mean Dice ~0.7 on the held-out phantom, 3.7 min in
   all), while LiteMedSAM (256 input, a 64 x 64 embedding grid through the decoder for every
   query) or SAM ViT-B cost tens of seconds per iteration on a CPU, i.e. a few dozen
   iterations in 10 minutes: too few for the new prompt generator and heads;
3. auto-segment a held-out phantom (generated with the same seed, never trained on);
4. evaluate it against its reference (Dice, HD95, volumes) and write the report;
5. write the ``.seg.nrrd`` (opens in 3D Slicer with names and colours) and a PNG overlay.

Layout of ``out``::

    dataset/                 the training phantoms (nnU-Net v2 raw format)
    model/                   the trained model folder (config.json, model.safetensors, ...)
    heldout/                 the held-out CT phantom (phantom_heldout_0000.nii.gz) and its
                             reference labels (phantom_heldout.nii.gz)
    segmentation.seg.nrrd    MaskSAM's result (+ segmentation.json: volumes, timings)
    report.json, report.csv  evaluation; overlay.png (top: reference, bottom: MaskSAM)
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import RESEARCH_NOTICE

DEMO_CASES = 8
DEMO_SIZE = (64, 64, 24)
DEMO_ITERATIONS = 1200
NOTICE = RESEARCH_NOTICE + " This demo model knows synthetic phantoms only."
_PRODUCTS = ("dataset", "model", "heldout", "segmentation.seg.nrrd", "segmentation.json",
             "report.json", "report.csv", "overlay.png", "cache")


@dataclass
class DemoOptions:
    """The demo's budget and where it writes (``iterations``/``cases``/``size`` set the time)."""

    out: Path = Path("masksam-demo")
    iterations: int = DEMO_ITERATIONS
    cases: int = DEMO_CASES
    size: tuple[int, int, int] = DEMO_SIZE
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False
    batch_size: int = 2


@dataclass
class DemoResult:
    """Where the demo put things, and how well the held-out case was segmented."""

    out: Path
    model: Path
    image: Path
    reference: Path
    segmentation: Path
    report: Path
    overlay: Path
    mean_dice: float | None
    table: str
    seconds: float

    def summary(self) -> str:
        """What was written, how to open it in 3D Slicer, and the research-use notice."""
        dice = "n/a" if self.mean_dice is None else f"{self.mean_dice:.3f}"
        load = (f"slicer.util.loadVolume(r'{self.image.resolve()}'); "
                f"slicer.util.loadSegmentation(r'{self.segmentation.resolve()}')")
        return "\n".join([
            "",
            self.table,
            "",
            f"MaskSAM demo finished in {self.seconds / 60:.1f} min; mean foreground Dice on the "
            f"held-out phantom: {dice}.",
            f"  held-out CT phantom : {self.image}",
            f"  its reference labels: {self.reference}",
            f"  MaskSAM segmentation: {self.segmentation} (volumes and timings in "
            f"{self.segmentation.parent / 'segmentation.json'})",
            f"  evaluation report   : {self.report} (and .csv)",
            f"  overlay             : {self.overlay} (top: reference, bottom: MaskSAM; axial, "
            "coronal, sagittal)",
            f"  trained model       : {self.model} (use it with: masksam segment IMAGE --model "
            f"{self.model} --out result.seg.nrrd)",
            "Open in 3D Slicer: drag and drop the CT phantom and the .seg.nrrd into the Slicer "
            "window (or File > Add Data), or start Slicer with",
            f'  Slicer --python-code "{load}"',
            NOTICE,
        ])


class _Lap:
    """Logs each demo step with the seconds it took."""

    def __init__(self, progress, start: float) -> None:  # noqa: ANN001 - Progress
        self.progress, self.last = progress, start

    def __call__(self, what: str) -> None:
        now = time.monotonic()
        self.progress.log(f"demo: {what} ({now - self.last:.0f} s)")
        self.last = now


def _prepare_out(options: DemoOptions) -> Path:
    from .errors import MaskSAMError

    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise MaskSAMError(f"{out} is a file; choose a folder for the demo with --out.")
    if out.is_dir() and any(out.iterdir()):
        others = [p.name for p in out.iterdir() if p.name not in _PRODUCTS]
        if not options.overwrite:
            raise MaskSAMError(f"{out} is not empty; pass --overwrite to replace an earlier demo "
                               "there, or choose a new --out folder.")
        if others:
            raise MaskSAMError(f"{out} holds files the demo did not write ({others[0]}, ...); "
                               "choose a new --out folder.")
        for name in _PRODUCTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    if not out.parent.is_dir():
        raise MaskSAMError(f"The folder {out.parent} does not exist; create it first.")
    out.mkdir(exist_ok=True)
    return out


def run_demo(options: DemoOptions, progress) -> DemoResult:  # noqa: ANN001 - Progress
    """Run the whole demo into ``options.out`` (see the module doc).

    The network runs on one thread and the patch loader in a second process: the tiny model's
    small matrix products gain little from a second thread, and a second thread stalls the
    whole step whenever another program holds a core (measured: 12 s instead of 0.9 s per
    iteration on a busy 2-core machine).
    """
    from .errors import MaskSAMError

    if options.iterations < 1 or options.cases < 2:
        raise MaskSAMError("The demo needs at least 1 iteration and 2 training cases.")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(options, progress)
    finally:
        torch.set_num_threads(threads)


def _run(options: DemoOptions, progress) -> DemoResult:  # noqa: ANN001 - Progress
    import SimpleITK as sitk

    from .data.phantoms import PHANTOM_LABELS, make_phantom_case, make_phantoms
    from .evaluation import evaluate_files, format_table, write_report
    from .inference.inputs import CaseInput
    from .inference.outputs import PlannedOutput, write_outputs
    from .inference.predictor import PredictOptions, Predictor
    from .overlay import orthogonal_panels, write_png
    from .training.run import TrainRequest, train
    from .training.trainer import TrainOptions

    start = time.monotonic()
    out = _prepare_out(options)
    progress.log(f"MaskSAM demo in {out}: {options.cases} phantoms of {options.size} voxels, "
                 f"tiny backbone, {options.iterations} iterations. {NOTICE}")
    progress.start("phantoms", total=options.cases + 1)
    dataset = make_phantoms(out / "dataset", cases=options.cases, seed=options.seed,
                            size=options.size,
                            on_case=lambda done, total: progress.update(done, options.cases + 1))
    heldout = out / "heldout"
    heldout.mkdir(exist_ok=True)
    image, reference = make_phantom_case(options.seed, options.cases, size=options.size)
    image_path = heldout / "phantom_heldout_0000.nii.gz"
    reference_path = heldout / "phantom_heldout.nii.gz"
    sitk.WriteImage(image, str(image_path), True)
    sitk.WriteImage(reference, str(reference_path), True)
    progress.update(options.cases + 1, options.cases + 1)
    lap = _Lap(progress, start)
    lap("phantoms written")

    model_dir = out / "model"
    train(
        TrainRequest(dataset=dataset, out=model_dir, backbone="tiny", device=options.device,
                     val_fraction=0.0, cache_dir=out / "cache"),
        TrainOptions(iterations=options.iterations, batch_size=options.batch_size,
                     num_points=2048, seed=options.seed, val_every=options.iterations,
                     checkpoint_every=max(options.iterations, 1),
                     workers=1 if options.iterations >= 50 else 0),  # a loader pays off
        progress,
    )
    lap("training finished")

    predictor = Predictor.from_model_dir(model_dir, device=options.device)
    predict_options = PredictOptions()
    seg_path = out / "segmentation.seg.nrrd"
    read_start = time.perf_counter()
    volume = sitk.ReadImage(str(image_path))
    read_s = time.perf_counter() - read_start

    def on_windows(done: int, total: int) -> None:
        if done == 0:
            progress.start("segment", total=total, case="heldout")
        else:
            progress.update(done, total)

    prediction = predictor.predict(volume, options=predict_options, progress=on_windows)
    planned = PlannedOutput(CaseInput("heldout", [image_path]), seg_path)
    write_outputs(prediction, planned, overwrite=True, read_seconds=read_s)
    lap("held-out phantom segmented")

    progress.start("evaluate")
    report = evaluate_files(seg_path, reference_path, dict(PHANTOM_LABELS))
    report_path, _ = write_report(report, out / "report.json")
    figure = orthogonal_panels(
        sitk.GetArrayFromImage(volume), [sitk.GetArrayFromImage(reference), prediction.labels],
        prediction.geometry, predictor.labels, min_height=200,
    )
    overlay = write_png(out / "overlay.png", figure)
    shutil.rmtree(out / "cache", ignore_errors=True)
    lap("evaluated; report and overlay written")
    return DemoResult(
        out=out, model=model_dir, image=image_path, reference=reference_path,
        segmentation=seg_path, report=report_path, overlay=overlay,
        mean_dice=report.get("mean_foreground_dice"), table=format_table(report),
        seconds=time.monotonic() - start,
    )
