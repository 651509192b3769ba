"""Per-slice training targets from a label map.

Every slice of a label map ``(B, T, H, W)`` yields one target per class present in it (background,
class 0, included): a binary mask and its tight box (normalized xyxy, pixel-edge convention of
:mod:`.boxes`: a mask covering the whole slice has box ``(0, 0, 1, 1)``). Targets are ordered by
class index, so target ``j`` of a slice is its ``j``-th present class in ascending order; the
matcher's target indices refer to this order.

The matcher and the criterion never build full-resolution masks: they use :class:`DenseTargets`
(which classes are present, their boxes) and read the label map at sampled points
(:func:`sample_label_onehot`, :func:`sample_label_masks`), exactly as bilinear
``grid_sample(..., align_corners=False, padding_mode="border")`` on the binary masks would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .boxes import spans_from_presence

__all__ = [
    "DenseTargets",
    "check_labels",
    "dense_targets",
    "resolve_slice_valid",
    "sample_label_masks",
    "sample_label_onehot",
    "targets_from_labels",
]


@dataclass
class DenseTargets:
    """Targets of all slices as dense per-class tensors.

    Attributes:
        present: ``(B, T, K)`` bool, class ``k`` has at least one pixel in slice ``t`` (always
            False on invalid slices).
        boxes: ``(B, T, K, 4)`` float32 normalized xyxy boxes (zeros where not present).
    """

    present: Tensor
    boxes: Tensor


def check_labels(labels: Tensor, num_classes: int) -> None:
    """Raise ``ValueError`` unless ``labels`` is an integer ``(B, T, H, W)`` map in ``[0, K)``."""
    if labels.dim() != 4:
        raise ValueError(f"labels must be (B, T, H, W), got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must hold integer class indices, got dtype {labels.dtype}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (background included), got {num_classes}")
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes - 1}] (num_classes={num_classes}, "
                f"background included), found values in [{lo}, {hi}]"
            )


def resolve_slice_valid(
    slice_valid: Tensor | None, batch: int, depth: int, device: torch.device | str
) -> Tensor:
    """``(B, T)`` bool validity mask on ``device``; all True when ``slice_valid`` is None."""
    if slice_valid is None:
        return torch.ones(batch, depth, dtype=torch.bool, device=device)
    if tuple(slice_valid.shape) != (batch, depth):
        raise ValueError(
            f"slice_valid must be (B, T) = ({batch}, {depth}), got {tuple(slice_valid.shape)}"
        )
    return slice_valid.to(device=device, dtype=torch.bool)


def dense_targets(
    labels: Tensor, num_classes: int, slice_valid: Tensor | None = None
) -> DenseTargets:
    """Class presence and tight boxes for every (batch item, slice, class).

    Args:
        labels: ``(B, T, H, W)`` integer class map, values in ``[0, num_classes)``.
        num_classes: K, background included.
        slice_valid: optional ``(B, T)`` bool; invalid (padding) slices get no targets.

    Returns:
        :class:`DenseTargets` with ``present (B, T, K)`` and ``boxes (B, T, K, 4)``.
    """
    check_labels(labels, num_classes)
    batch, depth, height, width = labels.shape
    valid = resolve_slice_valid(slice_valid, batch, depth, labels.device)
    lab = labels.long()
    # rows[b, t, i, k]: row i of slice t contains class k (likewise cols), without a one-hot map.
    rows = torch.zeros(batch, depth, height, num_classes, dtype=torch.bool, device=lab.device)
    rows.scatter_(3, lab, True)
    cols = torch.zeros(batch, depth, width, num_classes, dtype=torch.bool, device=lab.device)
    cols.scatter_(3, lab.transpose(2, 3), True)
    present = rows.any(dim=2) & valid[..., None]
    y0, y1 = spans_from_presence(rows)
    x0, x1 = spans_from_presence(cols)
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=lab.device)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1).float() / scale
    boxes = boxes * present[..., None]
    return DenseTargets(present=present, boxes=boxes)


def targets_from_labels(
    labels: Tensor, num_classes: int, slice_valid: Tensor | None = None
) -> list[list[dict[str, Tensor]]]:
    """Per batch item, per slice: one target per class present (background included).

    Args:
        labels: ``(B, T, H, W)`` integer class map, values in ``[0, num_classes)``.
        num_classes: K, background included.
        slice_valid: optional ``(B, T)`` bool; invalid slices get empty targets (M = 0).

    Returns:
        ``out[b][t] = {"labels": (M,) int64, "masks": (M, H, W) bool, "boxes": (M, 4) float32}``
        with classes in ascending order and boxes normalized xyxy (see module doc).
    """
    dense = dense_targets(labels, num_classes, slice_valid)
    out: list[list[dict[str, Tensor]]] = []
    for b in range(labels.shape[0]):
        row = []
        for t in range(labels.shape[1]):
            classes = dense.present[b, t].nonzero().squeeze(1)
            masks = labels[b, t].unsqueeze(0) == classes.view(-1, 1, 1)
            row.append({"labels": classes, "masks": masks, "boxes": dense.boxes[b, t, classes]})
        out.append(row)
    return out


def _bilinear_corners(points: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Flat pixel indices and bilinear weights of the 4 neighbours of each point.

    Matches ``grid_sample(align_corners=False, padding_mode="border")`` at ``grid = 2 * p - 1``.

    Args:
        points: ``(..., P, 2)`` normalized ``(x, y)`` in ``[0, 1]``.

    Returns:
        ``idx (..., P, 4)`` int64 into ``H * W`` and ``weights (..., P, 4)`` float32.
    """
    x = (points[..., 0].float() * width - 0.5).clamp(0, width - 1)
    y = (points[..., 1].float() * height - 0.5).clamp(0, height - 1)
    x0f, y0f = x.floor(), y.floor()
    wx, wy = x - x0f, y - y0f
    x0, y0 = x0f.long(), y0f.long()
    x1, y1 = (x0 + 1).clamp(max=width - 1), (y0 + 1).clamp(max=height - 1)
    idx = torch.stack([y0 * width + x0, y0 * width + x1, y1 * width + x0, y1 * width + x1], -1)
    weights = torch.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx], -1)
    return idx, weights


def sample_label_onehot(labels: Tensor, points: Tensor, num_classes: int) -> Tensor:
    """Bilinearly sampled one-hot label maps at points shared by all slices of a batch item.

    Args:
        labels: ``(B, T, H, W)`` integer class map.
        points: ``(B, P, 2)`` normalized ``(x, y)`` in ``[0, 1]``.
        num_classes: K.

    Returns:
        ``(B, T, P, K)`` float32: the value of class ``k``'s binary mask at each point.
    """
    batch, depth, height, width = labels.shape
    n_points = points.shape[1]
    idx, weights = _bilinear_corners(points, height, width)  # (B, P, 4)
    flat = labels.reshape(batch, depth, height * width).long()
    corner = flat.gather(2, idx.reshape(batch, 1, n_points * 4).expand(-1, depth, -1))
    corner = corner.view(batch, depth, n_points, 4)
    out = torch.zeros(batch, depth, n_points, num_classes, device=labels.device)
    return out.scatter_add_(3, corner, weights.unsqueeze(1).expand(-1, depth, -1, -1))


def sample_label_masks(
    labels: Tensor, batch_idx: Tensor, slice_idx: Tensor, classes: Tensor, points: Tensor
) -> Tensor:
    """Bilinearly sampled binary masks ``labels[b, t] == c`` at per-mask points.

    Args:
        labels: ``(B, T, H, W)`` integer class map.
        batch_idx, slice_idx, classes: ``(M,)`` int64, which slice and class each mask is.
        points: ``(M, P, 2)`` normalized ``(x, y)`` in ``[0, 1]``.

    Returns:
        ``(M, P)`` float32 mask values in ``[0, 1]``.
    """
    batch, depth, height, width = labels.shape
    n_masks, n_points = points.shape[:2]
    idx, weights = _bilinear_corners(points, height, width)  # (M, P, 4)
    flat = labels.reshape(batch * depth, height * width)
    rows = (batch_idx * depth + slice_idx).view(n_masks, 1)
    corner = flat[rows, idx.view(n_masks, n_points * 4)].view(n_masks, n_points, 4)
    return ((corner == classes.view(n_masks, 1, 1)) * weights).sum(-1)
