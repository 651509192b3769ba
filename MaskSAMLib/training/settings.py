"""The training configuration: options, augmentation and loss / matching-cost weights.

One :class:`TrainConfig` holds every setting of a run. It is saved with the model as
``training/settings.json`` (INTERFACES.md: training adds its files to the model folder) and read
back on ``--resume`` (the run continues with the weights it started with) and ``--init`` (a
fine-tuned model keeps its parent's loss weights and augmentation). The options are validated
once, when they are made (:meth:`TrainOptions.__post_init__`).

The split of a run (``training/split.json``) is stored next to it and reused on ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..data.loader import AugmentConfig
from ..errors import MaskSAMError, UsageError

SETTINGS_NAME = "settings.json"
SPLIT_NAME = "split.json"
SETTINGS_FORMAT = 1


@dataclass
class TrainOptions:
    """Optimisation and bookkeeping settings of one run (validated when made)."""

    iterations: int = 1000
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 3e-5
    eps: float = 1e-4
    poly_power: float = 0.9
    grad_clip: float = 12.0
    accumulate: int = 1
    seed: int = 0
    checkpoint_every: int = 50
    val_every: int = 100
    log_every: int = 1
    workers: int = 1
    decoder_chunk: int | None = None
    num_points: int = 12544
    augment: bool = True
    # Stop cleanly (checkpoint, exit 130, continue with --resume) after this many minutes of
    # this call: a long run split into calls of a batch system or a lent machine's time limit.
    time_limit_min: float | None = None

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "accumulate", "checkpoint_every", "val_every",
                     "log_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1.")
        if not 0 < self.lr < 1e3:  # refuses nan and inf too: they only give non-finite weights
            raise UsageError(f"--lr must be a positive, finite number (e.g. 1e-3), got "
                             f"{self.lr}.")
        if self.workers < 0:
            raise UsageError("--workers must be 0 or more.")
        if self.time_limit_min is not None and not self.time_limit_min > 0:
            raise UsageError(f"--time-limit must be a positive number of minutes, got "
                             f"{self.time_limit_min}.")
        if self.num_points < 1:
            raise UsageError(f"--num-points must be at least 1, got {self.num_points}.")
        if self.decoder_chunk is not None and self.decoder_chunk < 1:
            raise UsageError(f"--decoder-chunk must be at least 1 (or left out), got "
                             f"{self.decoder_chunk}.")
        for name in ("weight_decay", "eps", "poly_power", "grad_clip"):
            if not 0 <= getattr(self, name) < math.inf:
                raise UsageError(f"{name} must be a finite number >= 0.")


@dataclass
class LossWeights:
    """Weights of the loss terms (Mask2Former style) and of the no-object class."""

    no_object_weight: float = 0.1
    weight_class: float = 0.2
    weight_mask: float = 1.2
    weight_dice: float = 1.2
    weight_aux_mask: float = 0.5
    weight_aux_dice: float = 0.5
    weight_box_l1: float = 0.5
    weight_giou: float = 0.2


@dataclass
class MatchCosts:
    """Weights of the Hungarian matcher's cost terms, and its random points per batch item
    (its own number: ``--num-points`` sets the mask losses' points only)."""

    cost_class: float = 0.2
    cost_mask: float = 1.2
    cost_dice: float = 1.2
    cost_box_l1: float = 0.5
    cost_giou: float = 0.2
    cost_aux_mask: float = 0.5
    cost_aux_dice: float = 0.5
    num_points: int = 12544


@dataclass
class TrainConfig:
    """Every setting of a training run, saved as ``training/settings.json``."""

    options: TrainOptions = field(default_factory=TrainOptions)
    # Probabilities and ranges of the augmentations; ``enabled`` follows ``--no-augment``.
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    matching: MatchCosts = field(default_factory=MatchCosts)
    format_version: int = SETTINGS_FORMAT

    def with_options(self, options: TrainOptions) -> TrainConfig:
        """This configuration with the options of this call (the command line's)."""
        return dataclasses.replace(self, options=options, augment=dataclasses.replace(
            self.augment, enabled=options.augment))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = SETTINGS_NAME) -> TrainConfig:
        """Parse :meth:`to_dict` output; anything else is a one-line MaskSAMError."""
        if not isinstance(data, dict):
            raise MaskSAMError(f"{source} must hold a JSON object; restore or delete it.")
        version = data.get("format_version")
        if version != SETTINGS_FORMAT:
            raise MaskSAMError(f"{source} has format_version {version!r}; this MaskSAMLib reads "
                               f"version {SETTINGS_FORMAT}. Upgrade MaskSAMLib.")
        try:
            augment = {k: tuple(v) if isinstance(v, list) else v
                       for k, v in dict(data.get("augment") or {}).items()}
            return cls(options=TrainOptions(**dict(data.get("options") or {})),
                       augment=AugmentConfig(**augment),
                       loss=_numbers(LossWeights, data.get("loss"), source),
                       matching=_numbers(MatchCosts, data.get("matching"), source))
        except MaskSAMError as exc:
            raise MaskSAMError(f"{source}: {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise MaskSAMError(f"{source} is malformed ({exc}); restore or delete it.") from exc

    def save(self, path: Path) -> None:
        from ..files import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        """Read ``path``; a missing file gives the defaults (runs and models from before)."""
        data = _read_json(path, "training settings")
        return cls() if data is None else cls.from_dict(data, str(path))


def _numbers(kind: type, data: Any, source: str) -> Any:
    values = dict(data or {})
    made = kind(**values)
    for name, value in asdict(made).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                0 <= value < math.inf):
            raise MaskSAMError(f"{source}: {name} must be a finite number >= 0, got {value!r}.")
    return made


def _read_json(path: Path, what: str) -> Any:
    """JSON of a small file, None when it does not exist (a one-line error when unreadable)."""
    from ..files import read_small_file

    try:
        return json.loads(read_small_file(path, max_bytes=16 << 20, what=what))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise MaskSAMError(f"{path} cannot be read ({exc}); restore or delete it.") from None


def read_split(path: Path) -> dict[str, list[str]] | None:
    """The stored split of a run (``{"train": [...], "val": [...]}``), None if not stored."""
    data = _read_json(path, "Split")
    if data is None:
        return None
    if not (isinstance(data, dict) and all(
            isinstance(data.get(k), list) and all(isinstance(i, str) for i in data[k])
            for k in ("train", "val"))):
        raise MaskSAMError(f"{path} is damaged (not {{\"train\": [...], \"val\": [...]}}); "
                           "restore it, or delete it to split again.")
    return {"train": list(data["train"]), "val": list(data["val"])}


def write_split(path: Path, split: dict[str, list[str]]) -> None:
    from ..files import atomic_write_text

    atomic_write_text(path, json.dumps({"train": list(split["train"]),
                                        "val": list(split["val"])}, indent=2) + "\n")
