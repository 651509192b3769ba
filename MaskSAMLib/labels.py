"""Label sets: nnU-Net ``labels`` mappings validated once for every command, and the one reader
of label files (``init``/``prompt``/``evaluate --labels``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MaskSAMError

MAX_LABEL_FILE_BYTES = 64 << 20

#: The one colour table (0-255, Slicer-like distinct colours) for classes without a known
#: colour: models (``config.make_labels``) and label-map writers both take it from here.
PALETTE = (
    (128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79),
    (221, 130, 101), (144, 238, 144), (192, 104, 88), (220, 245, 20), (78, 63, 0),
    (255, 250, 220), (230, 220, 70), (200, 200, 235), (250, 250, 210), (244, 214, 49),
    (0, 151, 206), (216, 101, 79), (183, 156, 220), (183, 214, 211), (152, 189, 207),
)


def palette_color(value: int) -> tuple[int, int, int]:
    """The palette colour of label ``value`` (1 is the first; the table repeats)."""
    return PALETTE[(value - 1) % len(PALETTE)]


def as_int(value: Any) -> int | None:
    """An int from an int or a digit string (not a bool); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def name_key(name: str) -> str:
    """What makes two class names the same to a reader: case and spacing ignored."""
    return " ".join(str(name).split()).casefold()


def has_lateralized_classes(names: Sequence[str]) -> bool:
    """Whether any class name marks a side (``kidney_left``, ``Right lung`` ...).

    Such classes must never be swapped: augmentation and test-time mirroring leave out the
    left-right axis for them (INTERFACES.md, Labels).
    """
    for name in names:
        words = name.lower().replace("-", "_").replace(" ", "_").split("_")
        if "left" in words or "right" in words:
            return True
    return False


def parse_labels(raw: Any, source: str, *, require_background: bool = True) -> dict[str, int]:
    """``{name: value}`` from nnU-Net ``{name: value}`` or MSD ``{"value": name}`` form.

    Background 0 is required (unless ``require_background=False``); values are unique
    integers 0-65535; region-based labels (lists of values) are refused. Sorted by value.
    """
    if not isinstance(raw, dict) or not raw:
        raise MaskSAMError(f"{source}: 'labels' must be a non-empty mapping of names to values.")
    for name, value in raw.items():
        if isinstance(value, (list, tuple)):
            raise MaskSAMError(
                f"{source}: label '{name}' is region-based ({value}); MaskSAM needs one integer "
                "value per class: convert the regions to plain labels."
            )
    msd = all(as_int(k) is not None and isinstance(v, str) for k, v in raw.items())
    pairs = (
        [(str(v), as_int(k)) for k, v in raw.items()]
        if msd
        else [(str(k), as_int(v)) for k, v in raw.items()]
    )
    labels: dict[str, int] = {}
    seen: dict[str, str] = {}
    for name, value in pairs:
        if value is None or not 0 <= value < 65536:
            raise MaskSAMError(
                f"{source}: label '{name}' needs an integer value 0-65535; fix 'labels'."
            )
        if not name.strip() or name in labels:
            raise MaskSAMError(f"{source}: label name '{name}' is empty or repeated.")
        key = name_key(name)
        if key in seen:
            raise MaskSAMError(
                f"{source}: label names '{seen[key]}' and '{name}' differ only in spaces or "
                "case, so they would show as one segment name; rename one of them."
            )
        seen[key] = name
        if value in labels.values():
            raise MaskSAMError(f"{source}: label value {value} is used twice; fix 'labels'.")
        labels[name] = value
    if require_background and 0 not in labels.values():
        raise MaskSAMError(
            f"{source}: 'labels' must declare the background as value 0 (e.g. \"background\": 0)."
        )
    return dict(sorted(labels.items(), key=lambda item: item[1]))


@dataclass(frozen=True)
class LabelFile:
    """What a label file declares: ``labels`` ``{name: value}`` sorted by value (background 0
    included) and, from a ``dataset.json``, its ``channel_names`` in channel order."""

    labels: dict[str, int]
    channel_names: list[str] | None = None


def read_label_file(source: str | os.PathLike | Mapping[str, Any]) -> LabelFile:
    """The labels of a JSON label file, of a folder holding one, or of its parsed content.

    Accepted: an nnU-Net/MSD ``dataset.json`` (``labels``, optional ``channel_names``), a model's
    ``config.json`` (``labels`` as a list of ``{value, name, ...}``), a folder holding one of
    those (``dataset.json`` first), a JSON list of names (value = position, the first being
    ``background``) or a JSON mapping ``{name: value}`` / ``{"value": name}``. The rules are
    :func:`parse_labels`'s: background 0 required, region-based labels refused. Raises
    MaskSAMError (one line) otherwise.
    """
    if isinstance(source, Mapping):
        return _label_file_content(dict(source), "the labels")
    path = Path(source)
    if path.is_dir():
        candidates = [path / "dataset.json", path / "config.json"]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    from .files import read_small_file  # lazily: labels stays a light, torch-free import

    try:
        data = json.loads(read_small_file(path, max_bytes=MAX_LABEL_FILE_BYTES,
                                          what="Label file"))
    except FileNotFoundError as exc:
        raise MaskSAMError(f"Label file {path} does not exist; pass a dataset.json, a model's "
                           "config.json or a JSON list of names.") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MaskSAMError(f"Label file {path} is not valid JSON ({exc}); fix the file.") from exc
    return _label_file_content(data, str(path))


def _label_file_content(data: Any, source: str) -> LabelFile:
    channels = None
    raw = data
    if isinstance(data, dict) and "labels" in data:
        raw = data["labels"]
        channels = _channel_names(data.get("channel_names"), source)
    if isinstance(raw, list) and raw and all(isinstance(e, Mapping) for e in raw):
        try:  # a model config's entries
            raw = {str(e["name"]): e["value"] for e in raw}
        except KeyError:
            raise MaskSAMError(f"{source}: every label entry needs a 'value' and a 'name'.") \
                from None
    elif isinstance(raw, list):
        if not all(isinstance(n, str) for n in raw):
            raise MaskSAMError(f"{source}: a label list must hold names (strings).")
        if not raw or raw[0].strip().lower() != "background":
            shown = json.dumps(["background", *raw[:2]])
            raise MaskSAMError(
                f"{source}: a label list gives value 0 to its first name, which must be "
                f"'background' (got {raw[:1]}); write {shown[:-1]}, ...] or a mapping "
                '{"background": 0, "liver": 1, ...}.'
            )
        raw = {name: value for value, name in enumerate(raw)}
    if not isinstance(raw, dict):
        raise MaskSAMError(
            f"{source}: expected a dataset.json, a model's config.json, a list of names "
            '(background first) or a mapping {"background": 0, "liver": 1, ...}.'
        )
    return LabelFile(parse_labels(raw, source=source), channels)


def _channel_names(raw: Any, source: str) -> list[str] | None:
    """``{"0": "CT", "1": "T2"}`` -> ``["CT", "T2"]``; None when absent."""
    if not isinstance(raw, dict):
        return None
    order = {k: as_int(k) for k in raw}
    if any(v is None for v in order.values()):
        raise MaskSAMError(f"{source}: 'channel_names' keys must be channel numbers 0, 1, ...")
    return [str(raw[k]) for k in sorted(raw, key=lambda k: order[k])]
