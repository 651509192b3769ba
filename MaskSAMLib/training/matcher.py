"""Hungarian matching of queries to per-slice targets, and point sampling of mask logits.

Each slice is matched on its own: the N queries of slice t against the M classes present in it
(background included), by ``scipy.optimize.linear_sum_assignment`` on the cost (MaskSAM)

    w_class * (-p_class) + w_mask * BCE(mask) + w_dice * Dice(mask)
    + w_box_l1 * L1(aux box) + w_giou * (-GIoU(aux box)) + w_aux_mask * BCE(aux mask)
    + w_aux_dice * Dice(aux mask)

with the masks compared on ``num_points`` random points (the same points for predictions and
targets). The cost terms are computed for all slices at once; only the assignment loops.
Points are normalized ``(x, y)`` in ``[0, 1]`` (x along W); sampling is bilinear with
``align_corners=False`` and border padding, so masks of any resolution line up.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .boxes import generalized_box_iou
from .settings import MatchCosts
from .targets import DenseTargets, dense_targets, resolve_slice_valid, sample_label_onehot

__all__ = ["HungarianMatcher", "check_outputs", "point_sample", "sample_query_masks"]

Indices = list[list[tuple[Tensor, Tensor]]]


def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinear values of ``maps`` at normalized points (``grid_sample``, border padding).

    Args:
        maps: ``(R, C, h, w)``; cast to float32 unless already float32/float64.
        points: ``(R, P, 2)`` normalized ``(x, y)`` in ``[0, 1]``.

    Returns:
        ``(R, C, P)``.
    """
    if maps.dtype not in (torch.float32, torch.float64):
        maps = maps.float()
    grid = (2.0 * points - 1.0).to(maps.dtype).unsqueeze(2)
    out = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.squeeze(3)


def sample_query_masks(masks: Tensor, points: Tensor) -> Tensor:
    """Sample all query masks of all slices of a batch item at that item's points.

    Args:
        masks: ``(B, N, T, h, w)`` mask logits.
        points: ``(B, P, 2)`` normalized ``(x, y)``.

    Returns:
        ``(B, T, N, P)`` float32 logits.
    """
    batch, queries, depth = masks.shape[:3]
    flat = masks.flatten(1, 2)  # (B, N*T, h, w): a view, no copy of the masks
    sampled = point_sample(flat, points).float()
    return sampled.view(batch, queries, depth, -1).transpose(1, 2)


def check_outputs(outputs: dict[str, Tensor], labels: Tensor, keys: tuple[str, ...]) -> None:
    """Raise ``ValueError`` when an output named in ``keys`` is missing or mis-shaped."""
    if labels.dim() != 4:
        raise ValueError(f"labels must be (B, T, H, W), got shape {tuple(labels.shape)}")
    batch, depth = labels.shape[:2]
    expected = {
        "pred_logits": ("(B, N, T, K+1)", 4, (0, 2)),
        "pred_masks": ("(B, N, T, H, W)", 5, (0, 2)),
        "aux_masks": ("(B, N, T, h, w)", 5, (0, 2)),
        "aux_boxes": ("(B, N, T, 4)", 4, (0, 2)),
    }
    for key in keys:
        if key not in outputs:
            raise ValueError(f"network outputs lack {key!r} (have {sorted(outputs)})")
        shape = tuple(outputs[key].shape)
        text, ndim, (b_dim, t_dim) = expected[key]
        if len(shape) != ndim or (shape[b_dim], shape[t_dim]) != (batch, depth):
            raise ValueError(
                f"{key} must be {text} with B={batch}, T={depth} (from labels), got {shape}"
            )
    if "aux_boxes" in keys and outputs["aux_boxes"].shape[-1] != 4:
        raise ValueError(f"aux_boxes must end in 4 (xyxy), got {tuple(outputs['aux_boxes'].shape)}")


def mask_costs(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise mean point BCE and Dice loss between query masks and class masks.

    Args:
        logits: ``(..., N, P)`` mask logits at P points.
        targets: ``(..., P, K)`` target mask values in ``[0, 1]`` at the same points.

    Returns:
        ``(bce, dice)``, each ``(..., N, K)``.
    """
    n_points = logits.shape[-1]
    pos = F.softplus(-logits)  # BCE against 1
    neg = F.softplus(logits)  # BCE against 0
    bce = (neg.sum(-1, keepdim=True) + (pos - neg) @ targets) / n_points
    prob = logits.sigmoid()
    numer = 2.0 * (prob @ targets) + 1.0
    denom = prob.sum(-1, keepdim=True) + targets.sum(-2).unsqueeze(-2) + 1.0
    return bce, 1.0 - numer / denom


class HungarianMatcher(nn.Module):
    """One-to-one matching of queries to the classes present in each slice.

    Args:
        costs: the cost weights (:class:`MatchCosts`, the training settings): ``cost_class``
            of ``-p(class)``; ``cost_mask``, ``cost_dice`` of point BCE and Dice of
            ``pred_masks``; ``cost_box_l1``, ``cost_giou`` of L1 and ``-GIoU`` of
            ``aux_boxes``; ``cost_aux_mask``, ``cost_aux_dice`` of point BCE and Dice of
            ``aux_masks``; and ``num_points``, random points per batch item (shared by its
            slices, queries and targets). The defaults when None.
    """

    def __init__(self, *, costs: MatchCosts | None = None) -> None:
        super().__init__()
        weights = {k: float(v) for k, v in asdict(costs or MatchCosts()).items()}
        num_points = int(weights.pop("num_points"))
        for name, value in weights.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not any(weights.values()):
            raise ValueError("at least one matching cost weight must be positive")
        if num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {num_points}")
        self.cost_class = weights["cost_class"]
        self.cost_mask = weights["cost_mask"]
        self.cost_dice = weights["cost_dice"]
        self.cost_box_l1 = weights["cost_box_l1"]
        self.cost_giou = weights["cost_giou"]
        self.cost_aux_mask = weights["cost_aux_mask"]
        self.cost_aux_dice = weights["cost_aux_dice"]
        self.num_points = num_points

    def _needed_keys(self) -> tuple[str, ...]:
        keys = ["pred_logits"]
        if self.cost_mask or self.cost_dice:
            keys.append("pred_masks")
        if self.cost_aux_mask or self.cost_aux_dice:
            keys.append("aux_masks")
        if self.cost_box_l1 or self.cost_giou:
            keys.append("aux_boxes")
        return tuple(keys)

    @torch.no_grad()
    def _costs(
        self, outputs: dict[str, Tensor], labels: Tensor, slice_valid: Tensor | None
    ) -> tuple[Tensor, DenseTargets]:
        check_outputs(outputs, labels, self._needed_keys())
        logits = outputs["pred_logits"].transpose(1, 2)  # (B, T, N, K+1): matched per slice
        device = logits.device
        num_classes = logits.shape[-1] - 1
        labels = labels.to(device)
        valid = resolve_slice_valid(slice_valid, labels.shape[0], labels.shape[1], device)
        dense = dense_targets(labels, num_classes, valid)
        cost = -self.cost_class * logits.float().softmax(-1)[..., :num_classes]  # (B, T, N, K)
        mask_terms = (
            ("pred_masks", self.cost_mask, self.cost_dice),
            ("aux_masks", self.cost_aux_mask, self.cost_aux_dice),
        )
        if any(w_bce or w_dice for _, w_bce, w_dice in mask_terms):
            points = torch.rand(labels.shape[0], self.num_points, 2, device=device)
            onehot = sample_label_onehot(labels, points, num_classes)  # (B, T, P, K)
            for key, w_bce, w_dice in mask_terms:
                if w_bce or w_dice:
                    bce, dice = mask_costs(sample_query_masks(outputs[key], points), onehot)
                    cost = cost + w_bce * bce + w_dice * dice
        if self.cost_box_l1 or self.cost_giou:
            pred = outputs["aux_boxes"].float().transpose(1, 2)  # (B, T, N, 4)
            l1 = (pred.unsqueeze(-2) - dense.boxes.unsqueeze(-3)).abs().sum(-1)
            giou = generalized_box_iou(pred, dense.boxes)
            cost = cost + self.cost_box_l1 * l1 - self.cost_giou * giou
        return cost.float().cpu(), dense

    def cost_matrix(
        self, outputs: dict[str, Tensor], labels: Tensor, slice_valid: Tensor | None = None
    ) -> Tensor:
        """Matching cost of every query against every class: ``(B, T, N, K)`` float32 on CPU.

        Columns of classes absent from a slice are computed but never used for matching.
        """
        return self._costs(outputs, labels, slice_valid)[0]

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, Tensor], labels: Tensor, slice_valid: Tensor | None = None
    ) -> Indices:
        """Match queries to targets in every slice.

        Args:
            outputs: the network's dict, every key ``(B, N, T, ...)`` (``pred_logits (B, N, T,
                K+1)``, ``pred_masks (B, N, T, H, W)``, ``aux_masks (B, N, T, h, w)``,
                ``aux_boxes (B, N, T, 4)``).
            labels: ``(B, T, H, W)`` integer class map in ``[0, K)``.
            slice_valid: optional ``(B, T)`` bool; invalid slices get no matches.

        Returns:
            ``out[b][t] = (query_idx, target_idx)``: int64 CPU tensors of equal length
            ``min(N, M)``, sorted by query; ``target_idx`` indexes the slice's present classes
            in ascending order (the order of :func:`.targets.targets_from_labels`).

        Raises:
            ValueError: a slice has more targets than there are queries.
        """
        cost, dense = self._costs(outputs, labels, slice_valid)
        batch, depth, queries = cost.shape[:3]
        present = dense.present.cpu()
        counts = present.sum(-1)
        if int(counts.max()) > queries:
            b, t = (counts > queries).nonzero()[0].tolist()
            raise ValueError(
                f"slice (b={b}, t={t}) has {int(counts[b, t])} target classes (background "
                f"included) but the model has only {queries} queries; build the model with at "
                "least as many queries as classes that can appear in one slice"
            )
        if not torch.isfinite(cost).all():
            raise ValueError("matching cost is not finite: the network produced NaN or inf")
        empty = torch.zeros(0, dtype=torch.int64)
        out: Indices = []
        for b in range(batch):
            row = []
            for t in range(depth):
                classes = present[b, t].nonzero().squeeze(1)
                if classes.numel() == 0:
                    row.append((empty, empty))
                    continue
                q_idx, j_idx = linear_sum_assignment(cost[b, t][:, classes].numpy())
                row.append(
                    (
                        torch.as_tensor(q_idx, dtype=torch.int64),
                        torch.as_tensor(j_idx, dtype=torch.int64),
                    )
                )
            out.append(row)
        return out
