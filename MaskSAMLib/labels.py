"""Label sets: nnU-Net ``labels`` mappings validated once for every command."""

from __future__ import annotations

from typing import Any

from .errors import MaskSAMError


def parse_labels(raw: Any, *, source: str) -> dict[str, int]:
    """Validate an nnU-Net style ``{name: value}`` mapping.

    Background 0 is required; values are unique non-negative integers below 65536;
    region-based labels (lists/tuples of values) are refused.

    Returns:
        ``{name: value}`` in the file's order.
    """
    if not isinstance(raw, dict) or not raw:
        raise MaskSAMError(f"{source}: labels must be a non-empty JSON object {{name: value}}.")
    labels: dict[str, int] = {}
    for name, value in raw.items():
        if isinstance(value, (list, tuple)):
            raise MaskSAMError(
                f"{source}: label {name!r} is region-based ({value}); MaskSAM needs one integer "
                "value per class. Convert the regions to plain classes."
            )
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536:
            raise MaskSAMError(
                f"{source}: label {name!r} has value {value!r}; use integers from 0 to 65535."
            )
        if not isinstance(name, str) or not name.strip():
            raise MaskSAMError(f"{source}: every label needs a non-empty name.")
        labels[name] = value
    values = list(labels.values())
    if len(set(values)) != len(values):
        raise MaskSAMError(f"{source}: label values must be unique, got {sorted(values)}.")
    if 0 not in values:
        raise MaskSAMError(
            f"{source}: no background label; add \"background\": 0 to the labels."
        )
    return labels
