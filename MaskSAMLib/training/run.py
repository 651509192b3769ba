"""``masksam train``: from a dataset folder and a starting point to a trained model folder.

Starting points: a backbone (``--backbone`` [+ ``--sam-checkpoint``]), an existing model folder
(``--init``, fine-tuning; new classes grow the class head, removed classes are refused), or the
output folder's own checkpoint (``--resume``). Every option, the dataset, the split and
the starting model are checked before anything is written to ``--out`` or any case is
preprocessed; the output folder is locked while the run writes. The split of a run is stored
with it (``training/split.json``) and reused on ``--resume``, as are its training settings
(``training/settings.json``: augmentation, loss and matching-cost weights). Under ``torchrun``
the run is distributed (NCCL on CUDA, gloo on CPU) and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RECIPES, LabelSpec, ModelConfig, default_img_size, make_labels
from ..data.dataset_json import DatasetSpec, load_dataset, validate_dataset
from ..data.planning import plan_preprocessing
from ..data.preprocessing import PreprocessConfig
from ..devices import device_info, half_dtype, resolve_device
from ..errors import MaskSAMError, UsageError
from ..files import atomic_path, write_safetensors
from ..locks import FolderLock
from ..modeling.build import CONFIG_NAME, build_masksam, create_model, load_model_dir
from ..modeling.masksam import MaskSAM
from ..modeling.surgery import extend_classes
from ..progress import Progress
from .cases import default_cache_dir, prepare_cases, random_split, read_split_file, select_split
from .checkpoint import load_checkpoint
from .settings import SETTINGS_NAME, SPLIT_NAME, TrainConfig, read_split, write_split
from .trainer import Trainer, TrainOptions

__all__ = ["TrainRequest", "check_spacing", "dataset_labels", "extend_classes", "train"]


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


def _apply_spacing(
    plan: PreprocessConfig, request: TrainRequest, progress: Progress
) -> PreprocessConfig:
    if request.target_spacing is None:
        return plan
    planned = list(plan.target_spacing)
    plan = dataclasses.replace(plan, target_spacing=request.target_spacing)
    progress.log(f"Target spacing {list(plan.target_spacing)} mm (--spacing; planned {planned}).")
    return plan


def _labelled_ids(spec: DatasetSpec) -> list[str]:
    """The cases training uses (those with a label map), in dataset order."""
    return [c.case_id for c in spec.cases if c.label_path is not None]


def plan_split(request: TrainRequest, spec: DatasetSpec, seed: int) -> dict[str, list[str]]:
    """The case ids of the training and validation sets, before any case is preprocessed.

    A new run: the ``--split`` file (checked against the dataset) or a seeded random
    ``--val-fraction``. ``--resume``: the split the run stored when it started; a ``--split``
    that differs from it is refused (a run from before splits were stored splits as it did).
    """
    ids = _labelled_ids(spec)
    asked = read_split_file(request.split_file, ids) if request.split_file is not None else None
    if request.resume:
        stored = read_split(request.out / "training" / SPLIT_NAME)
        if stored is not None:
            if asked is not None and asked != stored:
                raise UsageError(
                    f"--split {request.split_file} differs from the split this run started with "
                    f"({request.out / 'training' / SPLIT_NAME}); leave --split out to continue "
                    "the run, or start a new one.")
            return stored
    split = asked or random_split(ids, val_fraction=request.val_fraction, seed=seed)
    if not split["train"]:
        raise MaskSAMError(f"{spec.folder} has no labelled case to train on.")
    return split


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


def train(request: TrainRequest, options: TrainOptions, progress: Progress) -> dict:
    """Check everything, set up and run one training; returns the trainer's summary.

    ``options`` were validated when made (:class:`TrainOptions`).
    """
    rank, world, local = _distributed()
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
    split = plan_split(request, spec, options.seed)
    # The starting model, its preprocessing plan and its settings, in memory: a mistake in
    # any of them is refused here, before --out is touched.
    model, state, settings = _model_for(request, spec, labels, progress)
    settings = settings.with_options(options)
    config = model.config
    plan = config.require_preprocessing()

    lock = None
    existed = request.out.exists()
    if rank == 0:
        request.out.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(request.out).acquire("Another training run")
    started = False
    try:
        if rank == 0:
            _write_run(model, settings, split, request, fresh=state is None)
        class_names = [lab.name for lab in config.labels]
        progress.start("preprocess", total=len(spec.cases))
        if world > 1 and rank != 0:
            torch.distributed.barrier()  # rank 0 fills the cache first; the others read it
        cases = prepare_cases(
            spec, plan, class_names, cache_dir=request.cache_dir,
            on_case=lambda i, n, cid: progress.update(i, n, message=cid),
        )
        if world > 1 and rank == 0:
            torch.distributed.barrier()
        train_cases, val_cases = select_split(cases, split)
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
        trainer = Trainer(
            model=model, train_cases=train_cases, val_cases=val_cases, options=options,
            out_dir=request.out, device=device, progress=progress,
            amp_dtype=half_dtype(device), rank=rank, world_size=world, encoded=encoded,
            val_encoded=encoded, settings=settings,
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
            config.save(request.out / CONFIG_NAME)
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


def _write_run(model: MaskSAM, settings: TrainConfig, split: dict[str, list[str]],
               request: TrainRequest, *, fresh: bool) -> None:
    """What a run keeps in ``--out`` from its start: the starting weights and config.json (a
    new run, or one restarting from iteration 0), the training settings and the split."""
    out = request.out
    training = out / "training"
    training.mkdir(parents=True, exist_ok=True)
    if not request.resume:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        with atomic_path(training / "base.safetensors") as tmp:
            write_safetensors(state, tmp, metadata={"format": "pt"})
        model.config.save(out / CONFIG_NAME)
    if fresh or not (training / SETTINGS_NAME).is_file():
        settings.save(training / SETTINGS_NAME)
    if not (training / SPLIT_NAME).is_file():
        write_split(training / SPLIT_NAME, split)


def _model_for(
    request: TrainRequest, spec: DatasetSpec, labels: list[LabelSpec], progress: Progress
) -> tuple[MaskSAM, dict | None, TrainConfig]:
    """The model to train, the resume state (None for a fresh run) and the stored training
    settings (of the run on --resume, of the starting model on --init). Writes nothing."""
    from safetensors.torch import load_file

    out = request.out
    base = out / "training" / "base.safetensors"
    if request.resume:
        config = ModelConfig.load(out / CONFIG_NAME)
        settings = TrainConfig.load(out / "training" / SETTINGS_NAME)
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
            return model, None, settings
        return model, load_checkpoint(checkpoint), settings

    if request.init is not None:
        model = load_model_dir(request.init)
        settings = TrainConfig.load(Path(request.init) / "training" / SETTINGS_NAME)
        added = extend_classes(model, labels)
        if added:
            progress.log(f"New classes {added}: the class head grows; old classes keep weights.")
        plan = model.config.preprocessing
        if plan is None:  # created by 'masksam init': planned from this dataset
            plan = plan_preprocessing(spec)
            _check_channels(model.config, spec)
            model.config.channel_names = list(plan.channel_names)
        model.config.preprocessing = _apply_spacing(plan, request, progress)
        model.config.provenance["init_model"] = str(request.init)
    else:
        recipe = request.recipe or "paper"
        plan = _apply_spacing(plan_preprocessing(spec), request, progress)
        if recipe == "cpu":
            # Whole slices fitted to the input (as the 2D backbones were pretrained): one
            # window per slice, whose encoder output is then cached.
            plan = dataclasses.replace(
                plan, fit_size=request.img_size or default_img_size(request.backbone))
        model = create_model(
            backbone=request.backbone, labels=labels, sam_checkpoint=request.sam_checkpoint,
            img_size=request.img_size, num_slices=request.num_slices,
            num_queries=request.num_queries, preprocessing=plan, recipe=recipe,
        )
        settings = TrainConfig()
    _check_channels(model.config, spec)
    return model, None, settings


def _check_channels(config: ModelConfig, spec: DatasetSpec) -> None:
    if config.in_channels != len(spec.channel_names):
        raise MaskSAMError(
            f"The model takes {config.in_channels} channel(s) but the dataset has "
            f"{len(spec.channel_names)}; use a matching dataset or start from a backbone."
        )
