"""Label sets: nnU-Net ``labels`` mappings validated once for every command."""

from __future__ import annotations

from typing import Any

from .errors import MaskSAMError


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
