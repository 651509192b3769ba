"""Model surgery: changes to a built MaskSAM's structure that keep its trained weights.

:func:`extend_classes` grows the class head for classes a fine-tuning dataset adds
(``masksam train --init``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import LabelSpec
from ..errors import MaskSAMError
from .masksam import MaskSAM


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
