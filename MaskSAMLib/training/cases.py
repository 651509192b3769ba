"""From a dataset folder to preprocessed training cases, cached on disk.

Each case is preprocessed exactly as inference will (canonical orientation, target spacing,
per-modality normalisation, crop to non-zero) and its label values are mapped to the model's
class indices. Results are cached under ``cache_dir/<dataset hash>/<preprocessing key>/`` as
``.npz`` files keyed by the case files' sizes and modification times, so a second run (or a
resumed one) reuses them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..data.dataset_json import Case as DatasetCase
from ..data.dataset_json import DatasetSpec
from ..data.io import read_volume
from ..data.loader import Case
from ..data.preprocessing import PreprocessConfig, preprocess_case, preprocess_label
from ..errors import MaskSAMError, UsageError
from ..files import atomic_write_bytes


def default_cache_dir() -> Path:
    """``$MASKSAM_CACHE`` or ``$XDG_CACHE_HOME/masksam`` (``~/.cache/masksam``)."""
    if os.environ.get("MASKSAM_CACHE"):
        return Path(os.environ["MASKSAM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "masksam"


def _files_key(case: DatasetCase) -> str:
    parts = []
    for path in (*case.image_paths, case.label_path):
        if path is None:
            continue
        stat = Path(path).stat()
        parts.append(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def label_lookup(dataset_labels: dict[str, int], class_names: list[str]) -> np.ndarray:
    """Lookup table: dataset label value -> model class index (by class name)."""
    missing = [n for n in dataset_labels if n not in class_names]
    if missing:
        raise MaskSAMError(f"Dataset classes {missing} are not among the model's classes.")
    table = np.zeros(max(dataset_labels.values()) + 1, dtype=np.int64)
    for name, value in dataset_labels.items():
        table[value] = class_names.index(name)
    return table


def prepare_cases(
    spec: DatasetSpec,
    config: PreprocessConfig,
    class_names: list[str],
    *,
    cache_dir: Path | None = None,
    on_case: Callable[[int, int, str], None] | None = None,
) -> list[Case]:
    """Preprocessed :class:`Case` objects (image ``(C, Z, Y, X)`` float32, label class indices)."""
    table = label_lookup(spec.labels, class_names)
    root = (cache_dir or default_cache_dir()) / "preprocessed"
    folder = root / hashlib.sha256(str(spec.folder.resolve()).encode()).hexdigest()[:12]
    folder = folder / config.cache_key()
    cases = []
    labelled = [c for c in spec.cases if c.label_path is not None]
    for i, case in enumerate(labelled):
        cached = folder / f"{case.case_id}-{_files_key(case)}.npz"
        image = label = None
        if cached.is_file():
            try:
                with np.load(cached) as data:
                    image, label = data["image"], data["label"]
            except (OSError, ValueError, KeyError):
                image = label = None  # a damaged cache entry is simply rebuilt
        if image is None:
            volumes = [read_volume(p) for p in case.image_paths]
            image, properties = preprocess_case(volumes, config)
            raw_label = preprocess_label(read_volume(case.label_path), properties)
            label = table[np.clip(raw_label, 0, len(table) - 1)].astype(np.uint8)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                buffer = io.BytesIO()
                np.savez(buffer, image=image.astype(np.float32), label=label,
                         properties=json.dumps(properties))
                atomic_write_bytes(cached, buffer.getvalue())
            except (OSError, MaskSAMError):
                pass  # caching is an optimisation; a read-only cache dir is fine
        cases.append(Case(case.case_id, np.asarray(image, dtype=np.float32),
                          np.asarray(label, dtype=np.uint8)))
        if on_case is not None:
            on_case(i + 1, len(labelled), case.case_id)
    return cases


SPLIT_EXAMPLE = '{"train": ["case1", ...], "val": ["case9", ...]}'


def read_split_file(path: str | Path, known: list[str]) -> dict[str, list[str]]:
    """``--split FILE``: ``{"train": [ids], "val": [ids]}`` naming cases of ``known`` once each.

    A missing or unreadable file is a MaskSAMError (exit 1); content that does not fit the
    dataset (no training case, unknown ids, a case listed twice) a UsageError (exit 2).
    """
    from ..files import read_small_file

    path = Path(path)
    try:
        split = json.loads(read_small_file(path, max_bytes=16 << 20, what="Split file"))
    except FileNotFoundError:
        raise MaskSAMError(f"Split file {path} does not exist; check the path.") from None
    except ValueError as exc:
        raise MaskSAMError(
            f"Split file {path} is not valid JSON ({exc}); write {SPLIT_EXAMPLE}.") from None
    if not isinstance(split, dict) or not isinstance(split.get("train"), list) or not isinstance(
            split.get("val", []), list):
        raise UsageError(f"Split file {path} must be JSON like {SPLIT_EXAMPLE}.")
    train_ids, val_ids = split["train"], split.get("val", [])
    if not train_ids:
        raise UsageError(f"Split file {path} names no training case.")
    unknown = [i for i in train_ids + val_ids if not isinstance(i, str) or i not in known]
    if unknown:
        raise UsageError(f"Split file {path} names cases {unknown[:3]} that are not in the "
                         "dataset (case ids are label file names without extension).")
    listed = train_ids + val_ids
    twice = sorted({i for i in listed if listed.count(i) > 1})
    if twice:
        raise UsageError(f"Split file {path} names cases {twice[:3]} more than once (or in "
                         "both train and val); list each case once.")
    return {"train": list(train_ids), "val": list(val_ids)}


def random_split(case_ids: list[str], *, val_fraction: float, seed: int) -> dict[str, list[str]]:
    """A seeded random ``val_fraction`` of ``case_ids`` for validation (at least one training
    case is always kept); ids keep their order."""
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise UsageError(f"--val-fraction must be in [0, 1), got {val_fraction}; e.g. 0.2 keeps "
                         "a fifth of the cases for validation.")
    order = np.random.default_rng(seed).permutation(len(case_ids))
    n_val = min(int(round(len(case_ids) * val_fraction)), len(case_ids) - 1)
    return {"val": [case_ids[i] for i in sorted(order[:n_val])],
            "train": [case_ids[i] for i in sorted(order[n_val:])]}


def select_split(cases: list[Case], split: dict[str, list[str]]) -> tuple[list[Case], list[Case]]:
    """The training and validation cases a split names."""
    by_id = {c.case_id: c for c in cases}
    unknown = [i for i in split["train"] + split["val"] if i not in by_id]
    if unknown:
        raise MaskSAMError(f"The split names cases {unknown[:3]} that the dataset no longer "
                           "holds; restore them or start a new run.")
    return [by_id[i] for i in split["train"]], [by_id[i] for i in split["val"]]


def split_cases(
    cases: list[Case], *, val_fraction: float, seed: int, split_file: Path | None = None
) -> tuple[list[Case], list[Case]]:
    """Training and validation cases: from a split file (``{"train": [...], "val": [...]}``)
    or a seeded random ``val_fraction`` (at least one training case is always kept)."""
    ids = [c.case_id for c in cases]
    split = (read_split_file(split_file, ids) if split_file is not None
             else random_split(ids, val_fraction=val_fraction, seed=seed))
    return select_split(cases, split)
