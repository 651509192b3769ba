"""Plan a dataset's preprocessing: target spacing from the headers, CT statistics from pixels."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .dataset_json import DatasetSpec
from .io import DEFAULT_MAX_VOXELS, read_image_info, read_volume
from .normalization import compute_ct_stats, scheme_for_channel
from .orientation import canonical_transform
from .preprocessing import PreprocessConfig
from .resampling import fingerprint


def canonical_spacings(spec: DatasetSpec) -> list[tuple[float, float, float]]:
    """Each case's spacing ``(x, y, z)`` in the canonical frame, from headers only."""
    return [
        canonical_transform(read_image_info(case.image_paths[0]).geometry).canonical.spacing
        for case in spec.cases
    ]


def plan_preprocessing(
    spec: DatasetSpec,
    *,
    samples_per_case: int = 10_000,
    seed: int = 0,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> PreprocessConfig:
    """A :class:`PreprocessConfig` for a (validated) dataset.

    Target spacing: :func:`resampling.fingerprint` of the canonical spacings. CT channels:
    :func:`compute_ct_stats` over the foreground of every case (one case in memory at a time).
    """
    target = fingerprint(canonical_spacings(spec))
    schemes = [scheme_for_channel(name) for name in spec.channel_names]
    stats = []
    for channel, scheme in enumerate(schemes):
        if scheme != "CT":
            stats.append(None)
            continue

        def pairs(channel: int = channel) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for case in spec.cases:
                if case.label_path is None:
                    continue
                image = read_volume(case.image_paths[channel], max_voxels=max_voxels)
                label = read_volume(case.label_path, max_voxels=max_voxels)
                yield image.array, label.array

        stats.append(compute_ct_stats(pairs(), samples_per_case=samples_per_case, seed=seed))
    return PreprocessConfig(
        target_spacing=target,
        channel_names=list(spec.channel_names),
        normalization=schemes,
        ct_stats=stats,
    )
