"""Targets, Hungarian matching and the Mask2Former-style criterion (MaskSAMLib.training)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from MaskSAMLib.training.boxes import (
    box_xyxy_from_mask,
    generalized_box_iou,
    generalized_box_iou_elementwise,
)
from MaskSAMLib.training.criterion import SetCriterion, uncertain_points
from MaskSAMLib.training.matcher import HungarianMatcher
from MaskSAMLib.training.settings import MatchCosts
from MaskSAMLib.training.targets import (
    sample_label_masks,
    sample_label_onehot,
    targets_from_labels,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def blocky_labels(batch: int, depth: int, size: int, num_classes: int, seed: int) -> torch.Tensor:
    """Label maps of 4x4-pixel blocks, so that they survive 2x downsampling exactly."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num_classes, (batch, depth, size // 4, size // 4), generator=g)
    return coarse.repeat_interleave(4, 2).repeat_interleave(4, 3)


def random_outputs(b: int, t: int, n: int, k: int, size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "pred_logits": torch.randn(b, n, t, k + 1, generator=g),
        "pred_masks": torch.randn(b, n, t, size, size, generator=g),
        "aux_masks": torch.randn(b, n, t, size // 2, size // 2, generator=g),
        "aux_boxes": torch.rand(b, n, t, 4, generator=g),
    }


# -- targets and boxes ---------------------------------------------------------------------------


def test_targets_from_small_label_map() -> None:
    labels = torch.zeros(1, 3, 4, 6, dtype=torch.int64)
    labels[0, 0, 1:3, 3:5] = 2  # rows 1-2, cols 3-4
    labels[0, 1] = 1
    labels[0, 2, 0, 0] = 3
    valid = torch.tensor([[True, True, False]])
    targets = targets_from_labels(labels, num_classes=4, slice_valid=valid)
    s0, s1, s2 = targets[0]
    assert s0["labels"].tolist() == [0, 2]
    assert s0["masks"].shape == (2, 4, 6)
    assert s0["masks"][1].sum() == 4 and bool(s0["masks"][1, 1, 3])
    assert torch.equal(s0["masks"][0], labels[0, 0] == 0)
    torch.testing.assert_close(
        s0["boxes"], torch.tensor([[0, 0, 1, 1], [3 / 6, 1 / 4, 5 / 6, 3 / 4]])
    )
    assert s1["labels"].tolist() == [1]
    assert bool(s1["masks"].all())
    torch.testing.assert_close(s1["boxes"], torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    assert s2["labels"].numel() == 0 and s2["masks"].shape == (0, 4, 6)
    with pytest.raises(ValueError, match="labels must lie in"):
        targets_from_labels(labels, num_classes=3)


def test_box_from_mask_pixel_edges() -> None:
    masks = torch.zeros(3, 4, 5, dtype=torch.bool)
    masks[0, 2, 1] = True  # one pixel: row 2, column 1
    masks[2] = True
    boxes = box_xyxy_from_mask(masks)
    torch.testing.assert_close(
        boxes, torch.tensor([[1 / 5, 2 / 4, 2 / 5, 3 / 4], [0, 0, 0, 0], [0, 0, 1, 1]])
    )


def test_generalized_box_iou_known_values() -> None:
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0], [1.0, 1.0, 3.0, 3.0]])
    giou = generalized_box_iou(a, b)
    expected = torch.tensor(
        [
            [1.0, 0.0 - (3 - 2) / 3, 0.0 - (9 - 5) / 9],
            [1 / 4, 0.0 - (6 - 5) / 6, 1 / 7 - (9 - 7) / 9],
        ]
    )
    torch.testing.assert_close(giou, expected)
    torch.testing.assert_close(generalized_box_iou_elementwise(a, b[:2]), giou.diagonal())


def test_label_sampling_equals_grid_sample_of_binary_masks() -> None:
    labels = torch.randint(0, 3, (2, 3, 7, 5))
    points = torch.rand(2, 50, 2)
    points[:, :4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.5, 0.03]])
    onehot = F.one_hot(labels, 3).permute(0, 1, 4, 2, 3).float()  # (B, T, K, H, W)
    grid = (2 * points - 1).view(2, 1, 50, 1, 2).expand(-1, 3, -1, -1, -1).reshape(6, 50, 1, 2)
    ref = F.grid_sample(
        onehot.flatten(0, 1), grid, padding_mode="border", align_corners=False
    ).view(2, 3, 3, 50)
    torch.testing.assert_close(sample_label_onehot(labels, points, 3), ref.transpose(2, 3))
    b, t, c = torch.tensor([1, 0]), torch.tensor([2, 1]), torch.tensor([0, 2])
    got = sample_label_masks(labels, b, t, c, points[b])
    torch.testing.assert_close(got, torch.stack([ref[1, 2, 0], ref[0, 1, 2]]))


def test_uncertain_points_concentrate_where_logits_are_small() -> None:
    logits = torch.full((3, 1, 8, 40), 10.0)
    logits[..., 10:30] = 0.0  # uncertain band: x in [0.25, 0.75]
    torch.manual_seed(0)
    points = uncertain_points(logits, 1000, 2.0, 0.75)
    assert points.shape == (3, 1000, 2)
    inside = ((points[..., 0] > 0.225) & (points[..., 0] < 0.775)).float().mean()
    assert inside > 0.8  # uniform points would give 0.55


# -- matcher -------------------------------------------------------------------------------------

COST_TERMS = [
    "cost_class",
    "cost_mask",
    "cost_dice",
    "cost_box_l1",
    "cost_giou",
    "cost_aux_mask",
    "cost_aux_dice",
]


def quadrant_labels(batch: int, depth: int, seed: int) -> torch.Tensor:
    """16x16 slices: background plus up to 4 classes, each in its own quadrant (distinct boxes)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(batch, depth, 16, 16, dtype=torch.int64)
    for b in range(batch):
        for t in range(depth):
            quadrants = torch.randperm(4, generator=g).tolist()
            for cls in range(1, 5):
                if torch.rand((), generator=g) < 0.2:
                    continue  # class absent from this slice
                y, x = divmod(quadrants[cls - 1], 2)
                h, w = (4 * int(v) for v in torch.randint(1, 3, (2,), generator=g))
                labels[b, t, 8 * y : 8 * y + h, 8 * x : 8 * x + w] = cls
    return labels


def permuted_predictions(labels: torch.Tensor, num_classes: int, queries: int, seed: int):
    """Outputs whose query perm[b][t][j] is a confident copy of target j; others say no object."""
    b_size, t_size, size, _ = labels.shape
    targets = targets_from_labels(labels, num_classes)
    g = torch.Generator().manual_seed(seed)
    outputs = random_outputs(b_size, t_size, queries, num_classes, size, seed)
    outputs["pred_logits"] = torch.zeros(b_size, queries, t_size, num_classes + 1)
    outputs["pred_logits"][..., num_classes] = 8.0
    outputs["pred_masks"] = torch.full_like(outputs["pred_masks"], -8.0)
    outputs["aux_masks"] = torch.full_like(outputs["aux_masks"], -8.0)
    perms = []
    for b in range(b_size):
        perms.append([])
        for t in range(t_size):
            perm = torch.randperm(queries, generator=g)
            perms[b].append(perm)
            tgt = targets[b][t]
            for j, cls in enumerate(tgt["labels"].tolist()):
                q = int(perm[j])
                outputs["pred_logits"][b, q, t] = 0.0
                outputs["pred_logits"][b, q, t, cls] = 8.0
                mask = tgt["masks"][j].float()
                outputs["pred_masks"][b, q, t] = 16.0 * mask - 8.0
                outputs["aux_masks"][b, q, t] = 16.0 * mask[::2, ::2] - 8.0
                outputs["aux_boxes"][b, q, t] = tgt["boxes"][j]
    return outputs, perms, targets


@pytest.mark.parametrize("term", ["all", *COST_TERMS])
def test_matcher_recovers_known_permutation(term: str) -> None:
    labels = quadrant_labels(2, 3, seed=1)
    outputs, perms, targets = permuted_predictions(labels, 5, queries=7, seed=2)
    weights = {} if term == "all" else {name: float(name == term) for name in COST_TERMS}
    matcher = HungarianMatcher(costs=MatchCosts(num_points=400, **weights))
    indices = matcher(outputs, labels)
    for b in range(2):
        for t in range(3):
            q_idx, j_idx = indices[b][t]
            assert len(j_idx) == len(targets[b][t]["labels"])
            assert sorted(j_idx.tolist()) == list(range(len(j_idx)))
            assert torch.equal(q_idx, perms[b][t][j_idx]), (term, b, t)


def test_matcher_cost_matrix_hand_values() -> None:
    labels = torch.ones(1, 1, 4, 4, dtype=torch.int64)  # class 1 everywhere, class 0 absent
    logits = torch.tensor([[[[0.5, -1.0, 0.2]], [[1.0, 2.0, -0.5]]]])  # (1, N=2, 1, K+1=3)
    a = [0.7, -1.3]  # constant mask logit per query
    c = [2.0, 0.1]  # constant aux mask logit per query
    outputs = {
        "pred_logits": logits,
        "pred_masks": torch.tensor(a).view(1, 2, 1, 1, 1).expand(1, 2, 1, 4, 4),
        "aux_masks": torch.tensor(c).view(1, 2, 1, 1, 1).expand(1, 2, 1, 2, 2),
        "aux_boxes": torch.tensor([[[[0.0, 0.0, 0.5, 1.0]], [[0.2, 0.2, 0.6, 0.6]]]]),
    }
    points = 64
    cost = HungarianMatcher(costs=MatchCosts(num_points=points)).cost_matrix(outputs, labels)
    assert cost.shape == (1, 1, 2, 2) and cost.dtype == torch.float32

    def dice_full(x: float) -> float:  # target 1 at every point
        s = sigmoid(x)
        return 1 - (2 * points * s + 1) / (points * s + points + 1)

    giou = [0.5, 0.16]  # boxes inside the (0, 0, 1, 1) target: IoU = area, enclosing = target
    l1 = [0.5, 0.2 + 0.2 + 0.4 + 0.4]
    for n in range(2):
        p = torch.softmax(logits[0, n, 0], -1)[1].item()
        expected = (
            -0.2 * p
            + 1.2 * softplus(-a[n])
            + 1.2 * dice_full(a[n])
            + 0.5 * softplus(-c[n])
            + 0.5 * dice_full(c[n])
            + 0.5 * l1[n]
            - 0.2 * giou[n]
        )
        assert cost[0, 0, n, 1].item() == pytest.approx(expected, rel=1e-5)
        # Absent class 0: target 0 at every point (its box is all zeros).
        p0 = torch.softmax(logits[0, n, 0], -1)[0].item()
        dice0 = 1 - 1 / (points * sigmoid(a[n]) + 1)
        assert cost[0, 0, n, 0].item() > -0.2 * p0 + 1.2 * softplus(a[n]) + 1.2 * dice0 - 1e-5


def test_too_many_targets_for_queries_is_refused() -> None:
    labels = torch.tensor([0, 1, 2, 0]).view(1, 1, 2, 2)
    outputs = random_outputs(1, 1, 2, 3, 2)
    with pytest.raises(ValueError, match="3 target classes .* only 2 queries"):
        HungarianMatcher(costs=MatchCosts(num_points=16))(outputs, labels)
    with pytest.raises(ValueError, match="only 2 queries"):
        SetCriterion(num_classes=3, num_points=16)(outputs, labels)


# -- criterion -----------------------------------------------------------------------------------


def fixed_matcher(indices):
    return lambda outputs, labels, slice_valid: indices


def test_each_loss_term_against_hand_computed_values() -> None:
    labels = torch.zeros(1, 2, 4, 4, dtype=torch.int64)
    labels[0, 0] = 2  # slice 0: class 2 everywhere; slice 1: class 0 (background) everywhere
    logits = torch.tensor(
        [
            [
                [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 2.0, 0.0], [0.0, 0.5, -0.5, 1.5]],
                [[0.3, 0.0, 0.0, -0.2], [0.0, 1.0, 0.0, 0.0], [2.0, 0.0, 1.0, 0.5]],
            ]
        ]
    ).transpose(1, 2)  # written (B=1, T=2, N=3, K+1=4); the network's order is (B, N, T, K+1)
    a = {(0, 1): 0.8, (1, 2): -0.4}  # constant pred mask logit of the matched (slice, query)
    c = {(0, 1): 1.5, (1, 2): -2.0}  # the same for aux masks
    pred_masks = torch.randn(1, 3, 2, 4, 4)
    aux_masks = torch.randn(1, 3, 2, 2, 2)
    for (t, q), v in a.items():
        pred_masks[0, q, t] = v
        aux_masks[0, q, t] = c[(t, q)]
    boxes = torch.rand(1, 3, 2, 4)  # (B, N, T, 4)
    boxes[0, 1, 0] = torch.tensor([0.25, 0.25, 0.75, 0.75])
    boxes[0, 2, 1] = torch.tensor([0.5, 0.0, 1.5, 1.0])
    outputs = {
        "pred_logits": logits,
        "pred_masks": pred_masks,
        "aux_masks": aux_masks,
        "aux_boxes": boxes,
    }
    one = torch.tensor([0])
    indices = [[(torch.tensor([1]), one), (torch.tensor([2]), one)]]
    points = 50
    crit = SetCriterion(num_classes=3, matcher=fixed_matcher(indices), num_points=points)
    out = crit(outputs, labels)

    targets = [[3, 2, 3], [3, 3, 0]]  # class per (slice, query); 3 = no object
    num = den = 0.0
    for t in range(2):
        for q in range(3):
            row = logits[0, q, t].tolist()
            nll = math.log(sum(math.exp(v) for v in row)) - row[targets[t][q]]
            w = 0.1 if targets[t][q] == 3 else 1.0
            num, den = num + w * nll, den + w
    expected = {"loss_ce": num / den}

    def dice_full(x: float) -> float:
        s = sigmoid(x)
        return 1 - (2 * points * s + 1) / (points * s + points + 1)

    expected["loss_mask"] = sum(softplus(-v) for v in a.values()) / 2
    expected["loss_dice"] = sum(dice_full(v) for v in a.values()) / 2
    expected["loss_aux_mask"] = sum(softplus(-v) for v in c.values()) / 2
    expected["loss_aux_dice"] = sum(dice_full(v) for v in c.values()) / 2
    expected["loss_bbox"] = ((0.25 * 4) + (0.5 + 0 + 0.5 + 0)) / 2
    expected["loss_giou"] = ((1 - 0.25) + (1 - 1 / 3)) / 2  # IoU .25 / 1/3; enclosing = union
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, rel=1e-5), key
    weights = {
        "loss_ce": 0.2,
        "loss_mask": 1.2,
        "loss_dice": 1.2,
        "loss_aux_mask": 0.5,
        "loss_aux_dice": 0.5,
        "loss_bbox": 0.5,
        "loss_giou": 0.2,
    }
    total = sum(weights[k] * v for k, v in expected.items())
    assert out["loss"].item() == pytest.approx(total, rel=1e-5)

    # The number of targets is averaged across processes through reduce_fn, clamped to >= 1.
    crit10 = SetCriterion(
        num_classes=3,
        matcher=fixed_matcher(indices),
        num_points=points,
        reduce_fn=lambda x: torch.full_like(x, 10.0),
    )
    out10 = crit10(outputs, labels)
    for key, value in expected.items():
        scale = 1.0 if key == "loss_ce" else 2 / 10  # CE is a weighted mean over queries
        assert out10[key].item() == pytest.approx(value * scale, rel=1e-5), key


def test_mask_loss_prefers_the_right_mask() -> None:
    labels = blocky_labels(1, 1, 16, 2, seed=3)
    fg = (labels[0, 0] == 1).float()
    indices = [[(torch.tensor([0]), torch.tensor([1]))]]
    crit = SetCriterion(
        num_classes=2, matcher=fixed_matcher(indices), num_points=200, losses=("masks",)
    )
    outputs = random_outputs(1, 1, 2, 2, 16)
    losses = {}
    for name, sign in (("right", 1.0), ("wrong", -1.0)):
        outputs["pred_masks"][0, 0, 0] = sign * 10.0 * (2 * fg - 1)
        losses[name] = crit(outputs, labels)
    assert losses["right"]["loss_dice"] < 0.2 < 0.8 < losses["wrong"]["loss_dice"]
    assert 3 * losses["right"]["loss_mask"] < losses["wrong"]["loss_mask"]


def test_invalid_slices_contribute_nothing() -> None:
    labels = blocky_labels(2, 3, 16, 4, seed=4)
    valid = torch.tensor([[True, False, True], [False, True, True]])
    outputs = {k: v.requires_grad_() for k, v in random_outputs(2, 3, 6, 4, 16, 5).items()}
    crit = SetCriterion(num_classes=4, num_points=300)
    torch.manual_seed(0)
    base = crit(outputs, labels, valid)
    base["loss"].backward()
    grads = {k: v.grad.clone() for k, v in outputs.items()}
    assert (
        grads["pred_logits"][0, :, 1].abs().sum() == 0
        and grads["pred_masks"][1, :, 0].abs().sum() == 0
    )
    assert grads["aux_masks"][0, :, 1].abs().sum() == 0
    assert grads["aux_boxes"][1, :, 0].abs().sum() == 0
    # Changing the invalid slices' outputs and labels leaves every term unchanged.
    other = random_outputs(2, 3, 6, 4, 16, 6)
    changed = {k: v.detach().clone() for k, v in outputs.items()}
    for b, t in ((0, 1), (1, 0)):
        for key in ("pred_logits", "pred_masks", "aux_masks", "aux_boxes"):  # all (B, N, T, ...)
            changed[key][b, :, t] = other[key][b, :, t]
    labels2 = labels.clone()
    labels2[0, 1] = 3
    torch.manual_seed(0)
    again = crit(changed, labels2, valid)
    for key in base:
        assert again[key].item() == pytest.approx(base[key].item(), rel=1e-6), key
    # No valid slice at all: zero loss that still backpropagates.
    none = crit(outputs, labels, torch.zeros(2, 3, dtype=torch.bool))
    assert none["loss"].item() == 0.0
    none["loss"].backward()


def test_gradients_reach_every_output() -> None:
    labels = blocky_labels(1, 2, 16, 3, seed=7)
    outputs = {k: v.requires_grad_() for k, v in random_outputs(1, 2, 4, 3, 16, 8).items()}
    out = SetCriterion(num_classes=3, num_points=100)(outputs, labels)
    assert set(out) == {
        "loss",
        "loss_ce",
        "loss_mask",
        "loss_dice",
        "loss_aux_mask",
        "loss_aux_dice",
        "loss_bbox",
        "loss_giou",
    }
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    for key, value in outputs.items():
        assert value.grad is not None and value.grad.abs().sum() > 0, key
        assert torch.isfinite(value.grad).all(), key


def test_optimizing_outputs_with_the_criterion_fits_the_labels() -> None:
    torch.manual_seed(0)
    labels = blocky_labels(1, 2, 16, 4, seed=9)
    params = {k: (0.5 * v).requires_grad_() for k, v in random_outputs(1, 2, 6, 4, 16, 10).items()}
    crit = SetCriterion(num_classes=4, matcher=HungarianMatcher(costs=MatchCosts(num_points=256)),
                        num_points=256)
    opt = torch.optim.Adam(params.values(), lr=0.1)
    history = []
    for _ in range(50):
        loss = crit(params, labels)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.35 * history[0], history
    targets = targets_from_labels(labels, 4)
    indices = crit.matcher(params, labels)
    with torch.no_grad():
        for t in range(2):
            q_idx, j_idx = indices[0][t]
            assert len(q_idx) == len(targets[0][t]["labels"])
            for q, j in zip(q_idx.tolist(), j_idx.tolist(), strict=True):
                cls = int(targets[0][t]["labels"][j])
                mask = targets[0][t]["masks"][j]
                pred = params["pred_masks"][0, q, t] > 0
                dice = 2 * (pred & mask).sum() / (pred.sum() + mask.sum())
                assert dice > 0.9, (t, cls, float(dice))
                assert int(params["pred_logits"][0, q, t].argmax()) == cls
                box_err = (params["aux_boxes"][0, q, t] - targets[0][t]["boxes"][j]).abs().max()
                assert box_err < 0.1
