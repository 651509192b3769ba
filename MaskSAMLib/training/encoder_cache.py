"""The CPU recipe's cache: the frozen encoder's output of every training slice, computed once.

With ``encoder_mode="frozen"`` the image encoder sees each slice on its own (no depth adapters
inside it, nothing of it trains), so its output for a slice never changes during training. It is
computed once per slice, exactly as sliding-window inference presents the slice (a whole slice
that fits the input, padded symmetrically with the volume's minimum), stored in float16 on disk
(``cache_dir/encoded/<key>/<case>.npz``-like folders of ``.npy`` files, memory-mapped when read)
and reused by every later run on the same data, model weights and preprocessing.

A training step then runs only what trains: the stem, the depth adapter after the encoder, the
prompt generator and SAM's mask decoder. Spatial and intensity augmentations would change the
encoder's input, so the cached path trains without them (slice order may still be reversed,
which only reorders cached slices).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.loader import Case
from ..errors import MaskSAMError
from ..modeling.masksam import MaskSAM

#: Slices per encoder call while filling the cache.
ENCODE_CHUNK = 4


def encoder_key(model: MaskSAM) -> str:
    """Hash of what fixes the encoder's output: its weights, input size and the fixed path."""
    digest = hashlib.sha256()
    digest.update(f"{model.config.backbone.name}:{model.img_size}:"
                  f"{model.config.backbone.input_scaling}".encode())
    for name, tensor in sorted(model.image_encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def padded_slices(
    image: np.ndarray, size: int, num_slices: int
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``image (C, Z, Y, X)`` padded as sliding-window inference pads it: symmetrically with the
    volume's minimum to ``size x size`` slices and at least ``num_slices`` slices.

    Returns the padded array and the ``(front, top, left)`` offsets. Refuses slices larger than
    ``size`` (the cached recipe needs a plan that fits a slice: ``fit_size``).
    """
    c, z, y, x = image.shape
    if y > size or x > size:
        raise MaskSAMError(
            f"A preprocessed slice of {y} x {x} pixels does not fit the {size} x {size} input; "
            "the cpu recipe needs the fit plan (whole slices in the input)."
        )
    zz = max(z, num_slices)
    front, top, left = (zz - z) // 2, (size - y) // 2, (size - x) // 2
    out = np.full((c, zz, size, size), float(image.min()), dtype=np.float32)
    out[:, front:front + z, top:top + y, left:left + x] = image
    return out, (front, top, left)


@dataclass
class EncodedCase:
    """One case's cached encoder output: ``neck (Z, D, h, w)`` and features, float16 memmaps."""

    neck: np.ndarray
    features: list[np.ndarray]

    def fill_window_cache(self, store: dict) -> None:
        """Put every slice into a sliding-window encoder cache (keys of a one-tile volume)."""
        for z in range(self.neck.shape[0]):
            store[(z, 0, 0, False, False)] = (
                torch.from_numpy(np.array(self.neck[z])),
                [torch.from_numpy(np.array(f[z])) for f in self.features],
            )

    def slices(self, indices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The encoder output of ``indices`` as float32 tensors ``(len, ...)``."""
        neck = torch.from_numpy(np.ascontiguousarray(self.neck[indices])).float()
        feats = [torch.from_numpy(np.ascontiguousarray(f[indices])).float()
                 for f in self.features]
        return neck, feats


def _load(folder: Path, count: int) -> EncodedCase | None:
    try:
        neck = np.load(folder / "neck.npy", mmap_mode="r")
        feats = [np.load(folder / f"feature{i}.npy", mmap_mode="r") for i in range(count)]
    except (OSError, ValueError):
        return None
    if any(f.shape[0] != neck.shape[0] for f in feats):
        return None
    return EncodedCase(neck, feats)


@torch.no_grad()
def encode_cases(
    model: MaskSAM,
    cases: list[Case],
    cache_dir: Path,
    *,
    on_case: Callable[[int, int, str], None] | None = None,
) -> dict[str, EncodedCase]:
    """Encoder output of every slice of ``cases`` (from the cache, or computed and cached).

    Entries are written to a temporary folder and renamed into place, so an interrupted run
    leaves no half-written entry (a damaged one is recomputed).
    """
    if not model.caches_encoder:
        raise MaskSAMError("Only a model with encoder_mode 'frozen' has a cacheable encoder.")
    was_training = model.training
    model.eval()
    root = Path(cache_dir) / "encoded" / encoder_key(model)
    count = len(model.image_encoder.feature_channels)
    out: dict[str, EncodedCase] = {}
    try:
        for i, case in enumerate(cases):
            image, _ = padded_slices(case.image, model.img_size, model.num_slices)
            content = hashlib.sha256(image.tobytes()).hexdigest()[:16]
            folder = root / f"{case.case_id}-{content}"
            entry = _load(folder, count) if folder.is_dir() else None
            if entry is None:
                entry = _encode_case(model, image, folder, count)
            out[case.case_id] = entry
            if on_case is not None:
                on_case(i + 1, len(cases), case.case_id)
    finally:
        model.train(was_training)
    return out


def _encode_case(model: MaskSAM, image: np.ndarray, folder: Path, count: int) -> EncodedCase:
    z = image.shape[1]
    tensor = torch.from_numpy(image).transpose(0, 1)  # (Z, C, S, S)
    device = next(model.parameters()).device
    necks, feats = [], [[] for _ in range(count)]
    for start in range(0, z, ENCODE_CHUNK):
        neck, features = model.encode_slices(tensor[start:start + ENCODE_CHUNK].to(device))
        necks.append(neck.float().cpu().half().numpy())
        for store, f in zip(feats, features, strict=True):
            store.append(f.float().cpu().half().numpy())
    arrays = {"neck": np.concatenate(necks)}
    arrays.update({f"feature{i}": np.concatenate(f) for i, f in enumerate(feats)})
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        # Caching is an optimisation: keep the arrays in memory if the disk refuses them.
        return EncodedCase(arrays["neck"], [arrays[f"feature{i}"] for i in range(count)])
    entry = _load(folder, count)
    if entry is None:
        raise MaskSAMError(f"The encoder cache {folder} could not be read back; delete it.")
    return entry


class CachedPatchSampler:
    """Training windows of whole slices with their cached encoder output.

    The batch of iteration ``i`` is a pure function of ``(seed, i)`` as in
    :class:`~MaskSAMLib.data.loader.PatchSampler`: a case, a window of ``T`` consecutive slices
    (centred on a foreground voxel with probability ``foreground_fraction``), the slice order
    reversed with probability one half when ``mirror_slices``.
    """

    def __init__(
        self,
        cases: list[Case],
        encoded: dict[str, EncodedCase],
        *,
        num_slices: int,
        size: int,
        batch_size: int,
        seed: int,
        foreground_fraction: float = 0.33,
        mirror_slices: bool = True,
        item_offset: int = 0,
    ) -> None:
        if not cases:
            raise ValueError("no training cases")
        self.cases = cases
        self.encoded = encoded
        self.num_slices = num_slices
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.foreground_fraction = foreground_fraction
        self.mirror_slices = mirror_slices
        self.item_offset = item_offset
        self._padded: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}

    def _case_arrays(self, case: Case) -> tuple[np.ndarray, np.ndarray, int]:
        if case.case_id not in self._padded:
            image, (front, top, left) = padded_slices(case.image, self.size, self.num_slices)
            label = np.zeros(image.shape[1:], dtype=np.int64)
            z, y, x = case.label.shape
            label[front:front + z, top:top + y, left:left + x] = case.label
            self._padded[case.case_id] = (image, label, front)
        return self._padded[case.case_id]

    def batch(self, iteration: int) -> dict[str, object]:
        """``image (B, C, T, S, S)``, ``label (B, T, S, S)`` and ``encoded`` (neck, features)
        of the ``B*T`` slices ordered (B, T)."""
        images, labels, necks, feats = [], [], [], []
        t = self.num_slices
        for b in range(self.batch_size):
            rng = np.random.default_rng([self.seed, iteration, self.item_offset + b])
            case = self.cases[int(rng.integers(len(self.cases)))]
            image, label, front = self._case_arrays(case)
            z = image.shape[1]
            if rng.random() < self.foreground_fraction and len(case.foreground):
                center = front + int(case.foreground[int(rng.integers(len(case.foreground)))][0])
            else:
                center = int(rng.integers(z))
            z0 = min(max(center - t // 2, 0), z - t)
            index = list(range(z0, z0 + t))
            if self.mirror_slices and rng.random() < 0.5:
                index = index[::-1]
            img = image[:, index]
            lab = label[index]
            neck, features = self.encoded[case.case_id].slices(index)
            images.append(torch.from_numpy(img))
            labels.append(torch.from_numpy(lab))
            necks.append(neck)
            feats.append(features)
        encoded = (torch.cat(necks), [torch.cat(f) for f in zip(*feats, strict=True)])
        return {"image": torch.stack(images), "label": torch.stack(labels), "encoded": encoded}
