"""``masksam train``: from a dataset folder and a starting point to a trained model folder.

Starting points: a backbone (``--backbone`` [+ ``--sam-checkpoint``]), an existing model folder
(``--init``, fine-tuning; new classes grow the class head, removed classes are refused), or the
output folder's own checkpoint (``--resume``). The dataset is validated before anything is
written; the output folder is locked while the run writes. Under ``torchrun`` the run is
distributed (NCCL on CUDA, gloo on CPU) and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import RECIPES, LabelSpec, ModelConfig, make_labels
from ..data.dataset_json import DatasetSpec, load_dataset, validate_dataset
from ..data.planning import plan_preprocessing
from ..data.preprocessing import PreprocessConfig
from ..devices import device_info, half_dtype, resolve_device
from ..errors import MaskSAMError
from ..files import atomic_path, write_safetensors
from ..locks import FolderLock
from ..modeling.build import CONFIG_NAME, build_masksam, create_model, load_model_dir
from ..modeling.masksam import MaskSAM
from ..progress import Progress
from .cases import default_cache_dir, prepare_cases, split_cases
from .checkpoint import load_checkpoint
from .trainer import Trainer, TrainOptions


@dataclass
class TrainRequest:
    """What the user asked for (the CLI's arguments)."""

    dataset: Path
    out: Path
    backbone: str | None = None
    sam_checkpoint: Path | None = None
    init: Path | None = None
    resume: bool = False
    device: str = "auto"
    val_fraction: float = 0.2
    split_file: Path | None = None
    img_size: int | None = None
    num_slices: int = 3
    num_queries: int = 0
    cache_dir: Path | None = None
    target_spacing: tuple[float, float, float] | None = None  # (x, y, z) mm; None: planned
    recipe: str | None = None  # with --backbone: "paper" (default) or "cpu" (see config.RECIPES)


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def dataset_labels(spec: DatasetSpec) -> list[LabelSpec]:
    ordered = sorted(spec.labels.items(), key=lambda item: item[1])
    if len(ordered) < 2:
        raise MaskSAMError(f"{spec.folder}: dataset.json declares no class besides background.")
    return make_labels([n for n, _ in ordered], [v for _, v in ordered])


def extend_classes(model: MaskSAM, labels: list[LabelSpec]) -> list[str]:
    """Grow the class head for classes the dataset adds; old classes keep their weights.

    Returns the added class names. Removed classes and too few queries are refused.
    """
    old = [lab.name for lab in model.config.labels]
    names = [lab.name for lab in labels]
    removed = [n for n in old if n not in names]
    if removed:
        raise MaskSAMError(
            f"The dataset lacks classes {removed} of the starting model; removing classes is not "
            "supported: declare them in dataset.json (they may be absent from the images) or "
            "start from a backbone with --backbone."
        )
    added = [lab for lab in labels if lab.name not in old]
    if not added:
        return []
    k_old, k_new = len(old), len(old) + len(added)
    if k_new > model.num_queries:
        raise MaskSAMError(
            f"The starting model has {model.num_queries} queries, too few for {k_new} classes; "
            "start from a backbone with --backbone."
        )
    taken = {lab.value for lab in model.config.labels}
    for lab in added:
        if lab.value in taken:
            lab.value = max(taken) + 1
        taken.add(lab.value)
    old_head = model.class_head
    head = nn.Linear(old_head.in_features, k_new + 1).to(old_head.weight.device)
    with torch.no_grad():
        head.weight[:k_old] = old_head.weight[:k_old]
        head.bias[:k_old] = old_head.bias[:k_old]
        head.weight[k_new] = old_head.weight[k_old]  # the no-object row
        head.bias[k_new] = old_head.bias[k_old]
    model.class_head = head
    model.config.labels = list(model.config.labels) + added
    model.num_classes = k_new
    return [lab.name for lab in added]


def _restartable(out: Path) -> bool:
    """A run killed before its first checkpoint: its starting weights and config are there, so
    ``--resume`` restarts it from iteration 0 (each step is seeded by its iteration: exact)."""
    return (out / "training" / "base.safetensors").is_file() and (out / CONFIG_NAME).is_file()


def _only_leftovers(out: Path) -> bool:
    """``out`` holds nothing but a lock file and empty folders (a run killed while starting)."""
    return all(p.name == ".masksam.lock" or (p.is_dir() and not any(p.rglob("*")))
               for p in out.iterdir())


def _check_out(request: TrainRequest) -> None:
    out = request.out
    if request.resume:
        if not (out / "training" / "checkpoint.pt").is_file() and not _restartable(out):
            raise MaskSAMError(f"{out} has no training checkpoint to resume; start without "
                               "--resume.")
        return
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _only_leftovers(out))):
        hint = (" It holds a training run: pass --resume to continue it."
                if (out / "training" / "checkpoint.pt").exists() else "")
        raise MaskSAMError(f"{out} already exists and is not empty; choose a new --out.{hint}")
    if (request.backbone is None) == (request.init is None):
        raise MaskSAMError("Pass exactly one starting point: --backbone NAME or --init MODEL_DIR.")
    if request.recipe is not None and request.backbone is None:
        raise MaskSAMError("--recipe applies to a new model (--backbone); a model given with "
                           "--init keeps its own recipe.")
    if request.recipe not in (None, *RECIPES):
        raise MaskSAMError(f"Unknown --recipe {request.recipe!r}; choose {', '.join(RECIPES)}.")


def check_spacing(spacing: object) -> tuple[float, float, float]:
    """``--spacing X Y Z``: three finite millimetre values in [0.05, 50]."""
    try:
        values = tuple(float(v) for v in spacing)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and 0.05 <= v <= 50.0 for v in values):
        raise MaskSAMError(f"--spacing needs three values X Y Z in mm from 0.05 to 50, got "
                           f"{spacing!r}; e.g. --spacing 1.5 1.5 3.")
    return values  # type: ignore[return-value]


def _apply_spacing(pre: dict, request: TrainRequest, progress: Progress) -> dict:
    if request.target_spacing is None:
        return pre
    planned = pre.get("target_spacing")
    pre = {**pre, "target_spacing": list(check_spacing(request.target_spacing))}
    progress.log(f"Target spacing {pre['target_spacing']} mm (--spacing; planned {planned}).")
    return pre


def check_split(request: TrainRequest, spec: DatasetSpec) -> None:
    """``--val-fraction`` and ``--split`` checked against the dataset before anything is
    written to ``--out`` (a mistake there used to leave a started folder behind)."""
    if request.split_file is None:
        if not (isinstance(request.val_fraction, (int, float))
                and 0 <= request.val_fraction < 1):
            raise MaskSAMError(f"--val-fraction must be in [0, 1), got {request.val_fraction}; "
                               "e.g. 0.2 keeps a fifth of the cases for validation.")
        return
    from ..files import read_small_file

    path = Path(request.split_file)
    example = '{"train": ["case1", ...], "val": ["case9", ...]}'
    try:
        split = json.loads(read_small_file(path, max_bytes=16 << 20, what="Split file"))
    except FileNotFoundError:
        raise MaskSAMError(f"Split file {path} does not exist; check the path.") from None
    except ValueError as exc:
        raise MaskSAMError(
            f"Split file {path} is not valid JSON ({exc}); write {example}.") from None
    if not isinstance(split, dict) or not isinstance(split.get("train"), list) or not isinstance(
            split.get("val", []), list):
        raise MaskSAMError(f"Split file {path} must be JSON like {example}.")
    train_ids, val_ids = split["train"], split.get("val", [])
    if not train_ids:
        raise MaskSAMError(f"Split file {path} names no training case.")
    known = {c.case_id for c in spec.cases}
    unknown = [i for i in train_ids + val_ids if not isinstance(i, str) or i not in known]
    if unknown:
        raise MaskSAMError(f"Split file {path} names cases {unknown[:3]} that are not in "
                           f"{spec.folder} (case ids are label file names without extension).")
    listed = train_ids + val_ids
    twice = sorted({i for i in listed if listed.count(i) > 1})
    if twice:
        raise MaskSAMError(f"Split file {path} names cases {twice[:3]} more than once (or in "
                           "both train and val); list each case once.")


def _undo_setup(out: Path, existed: bool) -> None:
    """A fresh run that failed before its first iteration: remove what it wrote, so the
    corrected command runs again without --resume (the folder was empty or new, _check_out
    made sure, so nothing of the user's is touched)."""
    import shutil

    for name in (CONFIG_NAME, ".masksam.lock"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "training", ignore_errors=True)
    if not existed:
        with contextlib.suppress(OSError):
            out.rmdir()


def _write_config(config: ModelConfig, out: Path) -> None:
    config.save(out / CONFIG_NAME)


def train(request: TrainRequest, options: TrainOptions, progress: Progress) -> dict:
    """Validate, set up and run one training; returns the trainer's summary."""
    rank, world, local = _distributed()
    options.validate()
    if request.target_spacing is not None:
        if request.resume:
            raise MaskSAMError("--spacing cannot change on --resume: the run keeps the spacing "
                               "it started with; leave --spacing out.")
        request.target_spacing = check_spacing(request.target_spacing)
    _check_out(request)
    device = resolve_device(request.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank != 0:
        progress = Progress("none")

    progress.start("validate", **device_info(device))
    spec = load_dataset(request.dataset)
    validate_dataset(spec)
    labels = dataset_labels(spec)
    check_split(request, spec)

    lock = None
    existed = request.out.exists()
    if rank == 0:
        request.out.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(request.out).acquire("Another training run")
    started = False
    try:
        model, state = _model_for(request, spec, labels, progress)
        config = model.config
        pre = PreprocessConfig.from_dict(config.preprocessing)
        class_names = [lab.name for lab in config.labels]
        progress.start("preprocess", total=len(spec.cases))
        if world > 1 and rank != 0:
            torch.distributed.barrier()  # rank 0 fills the cache first; the others read it
        cases = prepare_cases(
            spec, pre, class_names, cache_dir=request.cache_dir,
            on_case=lambda i, n, cid: progress.update(i, n, message=cid),
        )
        if world > 1 and rank == 0:
            torch.distributed.barrier()
        train_cases, val_cases = split_cases(
            cases, val_fraction=request.val_fraction, seed=options.seed,
            split_file=request.split_file,
        )
        if not train_cases:
            raise MaskSAMError("No training cases left after the validation split.")
        model.to(device)
        encoded = None
        if model.caches_encoder:
            from .encoder_cache import encode_cases

            progress.start("encode", total=len(train_cases) + len(val_cases))
            encoded = encode_cases(
                model, train_cases + val_cases, request.cache_dir or default_cache_dir(),
                on_case=lambda i, n, cid: progress.update(i, n, message=cid),
            )
            progress.log("Encoder output cached for every training slice (recipe 'cpu'): "
                         "training runs without spatial or intensity augmentation.")
        progress.log(f"{len(train_cases)} training and {len(val_cases)} validation cases; "
                     f"{config.backbone.name}, T={config.num_slices}, N={config.num_queries}, "
                     f"input {config.img_size}, device {device}")
        if options.decoder_chunk is None and device.type == "cpu":
            options.decoder_chunk = 8
        trainer = Trainer(
            model=model, train_cases=train_cases, val_cases=val_cases, options=options,
            out_dir=request.out, device=device, progress=progress,
            amp_dtype=half_dtype(device), rank=rank, world_size=world, encoded=encoded,
            val_encoded=encoded,
        )
        if state is not None:
            trainer.load_state(state)
            progress.log(f"Resuming at iteration {trainer.iteration} of {options.iterations}")
        started = True
        summary = trainer.run()
        if rank == 0:
            config.provenance.update({
                "dataset": spec.name,
                "dataset_cases": len(cases),
                "iterations": trainer.iteration,
                "best_validation_dice": trainer.best["dice"] if val_cases else None,
                "trained": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"),
            })
            _write_config(config, request.out)
        return summary
    except BaseException:
        if rank == 0 and not started and not request.resume:  # nothing to resume: undo
            if lock is not None:
                lock.release()
                lock = None
            _undo_setup(request.out, existed)
        raise
    finally:
        if lock is not None:
            lock.release()
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _model_for(
    request: TrainRequest, spec: DatasetSpec, labels: list[LabelSpec], progress: Progress
) -> tuple[MaskSAM, dict | None]:
    """The model to train, and the resume state (None for a fresh run)."""
    from safetensors.torch import load_file

    out = request.out
    base = out / "training" / "base.safetensors"
    if request.resume:
        config = ModelConfig.load(out / CONFIG_NAME)
        model = build_masksam(config)
        if not base.is_file():
            raise MaskSAMError(f"{base} is missing; the run cannot be resumed. Start a new one.")
        from ..modeling.build import check_weights

        base_state = load_file(str(base))
        check_weights(base_state, model, base)
        model.load_state_dict(base_state, strict=True)
        checkpoint = out / "training" / "checkpoint.pt"
        if not checkpoint.is_file():
            progress.log("No checkpoint yet: the run restarts from iteration 0.")
            return model, None
        return model, load_checkpoint(checkpoint)

    if request.init is not None:
        model = load_model_dir(request.init)
        added = extend_classes(model, labels)
        if added:
            progress.log(f"New classes {added}: the class head grows; old classes keep weights.")
        pre = model.config.preprocessing
        if "target_spacing" not in pre:
            pre = plan_preprocessing(spec).to_dict()
        model.config.preprocessing = _apply_spacing(pre, request, progress)
        model.config.provenance["init_model"] = str(request.init)
    else:
        recipe = request.recipe or "paper"
        pre = _apply_spacing(plan_preprocessing(spec).to_dict(), request, progress)
        if recipe == "cpu":
            # Whole slices fitted to the input (as the 2D backbones were pretrained): one
            # window per slice, whose encoder output is then cached.
            from ..config import default_img_size

            pre["fit_size"] = request.img_size or default_img_size(request.backbone)
        model = create_model(
            backbone=request.backbone, labels=labels, sam_checkpoint=request.sam_checkpoint,
            img_size=request.img_size, num_slices=request.num_slices,
            num_queries=request.num_queries, in_channels=len(spec.channel_names),
            preprocessing=pre, recipe=recipe,
        )
    if model.config.in_channels != len(spec.channel_names):
        raise MaskSAMError(
            f"The model takes {model.config.in_channels} channel(s) but the dataset has "
            f"{len(spec.channel_names)}; use a matching dataset or start from a backbone."
        )
    if _distributed()[0] == 0:
        (out / "training").mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        with atomic_path(base) as tmp:
            write_safetensors(state, tmp, metadata={"format": "pt"})
        _write_config(model.config, out)
    return model, None
