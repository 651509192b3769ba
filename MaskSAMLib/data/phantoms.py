"""Synthetic CT-like abdominal phantoms written as an nnU-Net v2 raw dataset (demos and tests).

Coordinates. Anatomy is defined in physical space, in the LPS convention that ITK and
SimpleITK use: +x points to the patient's **left**, +y to **posterior**, +z to **superior**.
So ``kidney_left`` and ``spleen`` sit at larger x than the spine, ``liver`` and ``kidney_right``
at smaller x (in RAS terms, as Slicer displays it, the left kidney has the more negative R
coordinate). Every voxel centre is mapped to physical space through the case's own grid
(origin, spacing, direction) and the anatomy is evaluated there, so the *same physical body* can
be stored in any voxel order: each case gets one of the 48 axis permutations/flips as its
direction matrix, and image and label always share one exact grid.

Shapes are written in body coordinates ``u``: in-plane ``u = (p - centre) / R`` with ``R`` the
body's half width in mm (so the body is an ellipse of semi-axes 1 x ~0.72), and along the body
axis ``u_z = (z - centre_z) / H`` with ``H`` half the scanned length. Organs are deformed
ellipsoids (a few low-frequency sinusoidal lobes on the radius) and tubes, with per-case random
position, size, rotation and intensity. Intensities are Hounsfield units: air -1000, fat
~-100, muscle ~50, liver ~60, spleen ~48, kidneys ~160 cortex / ~110 medulla (contrast),
aorta ~180, vertebral cortex ~700 and cancellous bone ~230; then mild smoothing (1 mm) and
Gaussian noise. Spacing is anisotropic (thin in-plane, thick slices along z).

Each case is a pure function of ``(seed, index)``: ``make_phantoms(cases=4)`` writes the same
first four cases as ``make_phantoms(cases=8)`` with the same seed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import permutations, product
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import MaskSAMError
from ..files import atomic_directory, write_image

PHANTOM_LABELS: dict[str, int] = {
    "background": 0,
    "liver": 1,
    "spleen": 2,
    "kidney_left": 3,
    "kidney_right": 4,
    "aorta": 5,
    "spine": 6,
}
CASE_PREFIX = "phantom"
FILE_ENDING = ".nii.gz"
DEFAULT_SIZE = (80, 80, 32)  # voxels along (left-right, anterior-posterior, inferior-superior)

_AIR, _FAT, _MUSCLE, _GAS, _CSF = -1000.0, -100.0, 50.0, -850.0, 15.0

Vec = tuple[np.ndarray, np.ndarray, np.ndarray]  # three arrays of one shape: x, y, z components


def _rotation(angle_z: float, angle_y: float) -> np.ndarray:
    """3x3 rotation: about y (tilt) then about z (in-plane angle), radians."""
    cz, sz, cy, sy = math.cos(angle_z), math.sin(angle_z), math.cos(angle_y), math.sin(angle_y)
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    return rz @ ry


@dataclass(frozen=True)
class _Field:
    """A smooth random field in [-1, 1]: a normalised sum of a few sinusoids."""

    freqs: np.ndarray  # (K, 3) cycles per unit of the coordinates it is evaluated on
    phases: np.ndarray  # (K,)
    amps: np.ndarray  # (K,), summing to 1

    @classmethod
    def sample(cls, rng: np.random.Generator, k: int, low: float, high: float) -> _Field:
        dirs = rng.normal(size=(k, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        freqs = dirs * rng.uniform(low, high, size=(k, 1))
        amps = rng.uniform(0.3, 1.0, size=k)
        return cls(freqs, rng.uniform(0.0, 2.0 * math.pi, size=k), amps / amps.sum())

    def __call__(self, q: Vec) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(*(c.shape for c in q)), dtype=np.float64)
        for f, phase, amp in zip(self.freqs, self.phases, self.amps, strict=True):
            out += amp * np.sin(2.0 * math.pi * (f[0] * q[0] + f[1] * q[1] + f[2] * q[2]) + phase)
        return out


@dataclass(frozen=True)
class _Blob:
    """A deformed ellipsoid in body coordinates ``u``."""

    center: np.ndarray  # (3,)
    radii: np.ndarray  # (3,)
    rotation: np.ndarray  # (3, 3); columns are the blob's local axes in u
    lobes: _Field  # radial deformation, evaluated on local normalised coordinates
    wobble: float  # amplitude of the deformation (fraction of the radius)
    taper: float = 0.0  # thins the blob in local y/z towards local +x (a wedge, e.g. the liver)

    def inside(self, u: Vec, scale: float = 1.0) -> np.ndarray:
        d = [u[i] - self.center[i] for i in range(3)]
        q = tuple(
            sum(self.rotation[b, a] * d[b] for b in range(3)) / self.radii[a] for a in range(3)
        )
        thin = np.clip(1.0 - self.taper * q[0], 0.3, None) if self.taper else 1.0
        radius = np.sqrt(q[0] ** 2 + (q[1] / thin) ** 2 + (q[2] / thin) ** 2)
        # The deformation is bounded by +-wobble: evaluate it only where it can matter.
        near = radius < scale * (1.0 + self.wobble)
        out = np.zeros(radius.shape, dtype=bool)
        lobes = self.lobes(tuple(c[near] for c in q))
        out[near] = radius[near] < scale * (1.0 + self.wobble * lobes)
        return out


def _blob(
    rng: np.random.Generator,
    center: Sequence[float],
    radii: Sequence[float],
    *,
    angle: float = 0.0,
    tilt: float = 0.0,
    taper: float = 0.0,
    wobble: float = 0.12,
    jitter: float = 0.04,
) -> _Blob:
    """Sample a blob around nominal ``center``/``radii`` (u units) and angles (degrees)."""
    c = np.asarray(center, dtype=np.float64) + rng.uniform(-jitter, jitter, size=3)
    r = np.asarray(radii, dtype=np.float64) * rng.uniform(0.88, 1.12, size=3)
    angle_z = math.radians(angle + rng.uniform(-8, 8))
    rot = _rotation(angle_z, math.radians(tilt + rng.uniform(-5, 5)))
    return _Blob(c, r, rot, _Field.sample(rng, 4, 0.25, 0.7), wobble, taper)


@dataclass(frozen=True)
class _Anatomy:
    """One random body: all the random draws that do not depend on the voxel grid."""

    body_ry: float
    fat_inner: float
    body_shape: np.ndarray  # (4,): amplitudes/phases of the 2- and 3-lobed outline
    visceral: _Field
    texture: _Field
    gas: list[_Blob]
    muscles: list[_Blob]
    liver: _Blob
    spleen: _Blob
    kidneys: list[tuple[_Blob, _Blob]]  # (kidney, hilum) for left then right
    aorta: tuple[float, float, float, float, float]  # x, y, radius, bend amplitude, bend phase
    spine: tuple[float, float, float, float]  # y of body centre, body radius, disc period, phase
    hu: dict[str, float]


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    side = {"left": 1.0, "right": -1.0}  # +x is the patient's left (LPS)
    kidneys = []
    for name, z in (("left", -0.1), ("right", -0.2)):
        s = side[name]
        kidney = _blob(rng, (s * 0.40, 0.30, z), (0.14, 0.18, 0.36), angle=s * 20, tilt=-s * 10)
        medial = kidney.center + np.array([-s * 0.85 * kidney.radii[0], -0.02, 0.0])
        hilum_radii = np.array([0.05, 0.05, 0.14]) * rng.uniform(0.88, 1.12, size=3)
        lobes = _Field.sample(rng, 4, 0.25, 0.7)
        hilum = _Blob(medial, hilum_radii, kidney.rotation, lobes, wobble=0.05)
        kidneys.append((kidney, hilum))
    gas = [
        _blob(
            rng,
            (rng.uniform(-0.3, 0.6), rng.uniform(-0.55, -0.15), rng.uniform(-0.9, 0.6)),
            (0.07, 0.06, 0.12),
            wobble=0.2,
            jitter=0.0,
        )
        for _ in range(int(rng.integers(3, 7)))
    ]
    muscles = [_blob(rng, (s * 0.21, 0.50, 0.0), (0.12, 0.09, 5.0), jitter=0.01) for s in (1, -1)]
    hu = {
        "fat": _FAT + rng.uniform(-10, 10),
        "visceral": rng.uniform(-40, -10),
        "liver": 60 + rng.uniform(-6, 6),
        "spleen": 48 + rng.uniform(-5, 5),
        "cortex": 160 + rng.uniform(-15, 15),
        "medulla": 110 + rng.uniform(-10, 10),
        "aorta": 180 + rng.uniform(-20, 20),
        "bone": 700 + rng.uniform(-60, 60),
        "cancellous": 230 + rng.uniform(-30, 30),
        "disc": 90 + rng.uniform(-10, 10),
    }
    return _Anatomy(
        body_ry=rng.uniform(0.68, 0.76),
        fat_inner=rng.uniform(0.86, 0.92),
        body_shape=np.concatenate([rng.uniform(0.0, 0.04, 2), rng.uniform(0, 2 * math.pi, 2)]),
        visceral=_Field.sample(rng, 12, 1.5, 3.5),
        texture=_Field.sample(rng, 5, 1.5, 4.0),
        gas=gas,
        muscles=muscles,
        liver=_blob(rng, (-0.45, -0.08, 0.30), (0.42, 0.40, 0.62), angle=-10, taper=0.35),
        spleen=_blob(rng, (0.58, 0.28, 0.40), (0.17, 0.25, 0.32), angle=-30),
        kidneys=kidneys,
        aorta=(
            0.07 + rng.uniform(-0.02, 0.02),
            0.08 + rng.uniform(-0.02, 0.02),
            0.065 * rng.uniform(0.9, 1.1),
            rng.uniform(0.0, 0.025),
            rng.uniform(0, 2 * math.pi),
        ),
        spine=(
            0.30 + rng.uniform(-0.02, 0.02),
            0.12 * rng.uniform(0.92, 1.08),
            rng.uniform(0.5, 0.65),
            rng.uniform(0, 1),
        ),
        hu=hu,
    )


def _render(anat: _Anatomy, u: Vec) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate the anatomy at body coordinates ``u`` -> (HU float32, label uint8), u's shape."""
    ux, uy, uz = u
    hu = np.full(ux.shape, _AIR, dtype=np.float32)
    label = np.zeros(ux.shape, dtype=np.uint8)

    def paint(mask: np.ndarray, value: float | np.ndarray, lab: int) -> None:
        hu[mask] = value[mask] if isinstance(value, np.ndarray) else value
        label[mask] = lab

    a2, a3, p2, p3 = anat.body_shape
    theta = np.arctan2(uy, ux)
    outline = 1.0 + a2 * np.sin(2 * theta + p2) + a3 * np.sin(3 * theta + p3) - 0.03 * uz
    body_r = np.sqrt(ux**2 + (uy / anat.body_ry) ** 2) / outline
    body = body_r < 1.0
    inner = body_r < anat.fat_inner - 0.04
    hu[body] = anat.hu["fat"]
    hu[body & (body_r < anat.fat_inner)] = _MUSCLE  # abdominal wall
    visceral = anat.visceral(tuple(c[inner] for c in u))
    hu[inner] = np.clip(anat.hu["visceral"] + 250.0 * visceral, -110.0, 40.0)
    for blob in anat.gas:
        paint(inner & blob.inside(u), _GAS, 0)
    for blob in anat.muscles:
        paint(body & blob.inside(u), _MUSCLE, 0)

    for name in ("liver", "spleen"):
        mask = inner & getattr(anat, name).inside(u)
        paint(mask, anat.hu[name], PHANTOM_LABELS[name])
        hu[mask] += 6.0 * anat.texture(tuple(c[mask] for c in u))

    ax, ay, ar, bend, phase = anat.aorta
    dist = np.hypot(ux - ax - bend * np.sin(math.pi * uz + phase), uy - ay)
    paint(inner & (dist < ar), anat.hu["aorta"], PHANTOM_LABELS["aorta"])

    for (kidney, hilum), name in zip(anat.kidneys, ("kidney_left", "kidney_right"), strict=True):
        k = inner & kidney.inside(u)
        paint(k, anat.hu["cortex"], PHANTOM_LABELS[name])
        paint(k & kidney.inside(u, scale=0.62), anat.hu["medulla"], PHANTOM_LABELS[name])
        paint(k & hilum.inside(u), anat.hu["fat"], 0)

    sy, sr, period, sphase = anat.spine
    canal_y = sy + sr + 0.065
    arch = np.hypot(ux, uy - canal_y) < 0.1
    process = (ux / 0.03) ** 2 + ((uy - canal_y - 0.11) / 0.065) ** 2 < 1.0
    paint(body & (arch | process), 500.0, PHANTOM_LABELS["spine"])
    paint(np.hypot(ux, uy - canal_y) < 0.055, _CSF, 0)
    dist = np.hypot(ux, uy - sy)
    vertebra = body & (dist < sr)
    disc = np.mod(uz / period + sphase, 1.0) < 0.2
    paint(vertebra & ~disc & (dist >= sr - 0.025), anat.hu["bone"], PHANTOM_LABELS["spine"])
    paint(vertebra & ~disc & (dist < sr - 0.025), anat.hu["cancellous"], PHANTOM_LABELS["spine"])
    paint(vertebra & disc, anat.hu["disc"], 0)
    return hu, label


def _orientations() -> list[np.ndarray]:
    """The 48 axis-aligned direction matrices (columns: physical direction of voxel axes)."""
    out = []
    for perm, signs in product(permutations(range(3)), product((1.0, -1.0), repeat=3)):
        d = np.zeros((3, 3))
        for axis, (phys, sign) in enumerate(zip(perm, signs, strict=True)):
            d[phys, axis] = sign
        out.append(d)
    return out


def _check_range(name: str, value: Sequence[float], low: float, high: float) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not (low <= lo <= hi <= high):
        raise MaskSAMError(f"{name} must be a range (min, max) in [{low}, {high}], got {value}.")
    return lo, hi


def make_phantom_case(
    seed: int,
    index: int,
    *,
    size: Sequence[int] = DEFAULT_SIZE,
    size_jitter: float = 0.1,
    inplane_spacing: Sequence[float] = (1.0, 1.6),
    slice_spacing: Sequence[float] = (2.5, 5.0),
    noise_hu: float = 15.0,
    direction: Sequence[float] | None = None,
) -> tuple[sitk.Image, sitk.Image]:
    """One phantom case -> (CT image int16 in HU, label map uint8) sharing one exact grid.

    ``size`` is the nominal voxel count along (left-right, anterior-posterior,
    inferior-superior); each axis varies by up to +-``size_jitter`` per case. In-plane spacing
    (one value for both in-plane axes) and the slice spacing along z are drawn from the given
    ranges (mm). ``direction`` (9 values, SimpleITK row-major order) overrides the case's random
    axis-aligned orientation; oblique directions are accepted too (each voxel axis takes the
    size and spacing of the physical axis it is closest to). Deterministic in (seed, index).
    """
    rng = np.random.default_rng([int(seed), int(index)])
    anat = _sample_anatomy(rng)
    jitter = rng.uniform(1.0 - size_jitter, 1.0 + size_jitter, size=3)
    n_phys = np.maximum(np.round(np.asarray(size, dtype=np.float64) * jitter), 8).astype(int)
    s_in = round(float(rng.uniform(*inplane_spacing)), 3)
    s_phys = np.array([s_in, s_in, round(float(rng.uniform(*slice_spacing)), 3)])
    center = np.array([rng.uniform(-30, 30), rng.uniform(-40, 20), rng.uniform(-400, 0)])
    orients = _orientations()
    d = orients[int(np.random.default_rng([int(seed), 48]).permutation(48)[index % 48])]
    if direction is not None:
        d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
        if not np.allclose(d.T @ d, np.eye(3), atol=1e-6):
            raise MaskSAMError("The phantom direction must be an orthonormal 3x3 matrix.")
    phys_of_axis = np.argmax(np.abs(d), axis=0)
    if sorted(phys_of_axis) != [0, 1, 2]:
        raise MaskSAMError("The phantom direction maps two voxel axes to one physical axis.")
    n, s = n_phys[phys_of_axis], s_phys[phys_of_axis]
    origin = center - d @ (s * (n - 1) / 2.0)

    fov = n_phys * s_phys
    radius = min(0.5 * fov[0], 0.5 * fov[1] / anat.body_ry) * rng.uniform(0.84, 0.92)
    slack = 0.5 * fov[:2] - radius * np.array([1.0, anat.body_ry])
    body_center = center + np.array([*(0.5 * slack * rng.uniform(-1, 1, 2)), 0.0])
    scale = np.array([radius, radius, 0.5 * fov[2]])

    # Physical point of every voxel, in numpy (k, j, i) order: p = origin + D @ (s * index).
    idx = np.ogrid[: n[2], : n[1], : n[0]]
    steps = (idx[2], idx[1], idx[0])  # voxel axis i, j, k
    u = tuple(
        (origin[c] + sum(d[c, a] * s[a] * steps[a] for a in range(3)) - body_center[c]) / scale[c]
        for c in range(3)
    )
    u = tuple(np.broadcast_to(c, (n[2], n[1], n[0])) for c in u)
    hu, label = _render(anat, u)

    hu = ndimage.gaussian_filter(hu, sigma=[1.0 / s[2], 1.0 / s[1], 1.0 / s[0]])
    noise = ndimage.gaussian_filter(rng.normal(size=hu.shape).astype(np.float32), 0.5)
    hu += noise * np.float32(noise_hu / max(float(noise.std()), 1e-6))
    image = sitk.GetImageFromArray(np.clip(np.rint(hu), -1024, 3071).astype(np.int16))
    image.SetSpacing([float(v) for v in s])
    image.SetOrigin([float(v) for v in origin])
    image.SetDirection([float(v) + 0.0 for v in d.flatten()])
    label_image = sitk.GetImageFromArray(label)
    label_image.CopyInformation(image)
    return image, label_image


def make_phantoms(
    out_dir: str | Path,
    *,
    cases: int = 8,
    seed: int = 0,
    size: Sequence[int] = DEFAULT_SIZE,
    size_jitter: float = 0.1,
    inplane_spacing: Sequence[float] = (1.0, 1.6),
    slice_spacing: Sequence[float] = (2.5, 5.0),
    noise_hu: float = 15.0,
    vary_orientation: bool = True,
    on_case: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a synthetic nnU-Net v2 raw dataset to ``out_dir`` and return its path.

    Layout: ``dataset.json`` (``channel_names {"0": "CT"}``, ``labels`` = :data:`PHANTOM_LABELS`,
    ``numTraining``, ``file_ending ".nii.gz"``), ``imagesTr/phantom_000_0000.nii.gz`` and
    ``labelsTr/phantom_000.nii.gz``, ... The folder is built as a temporary sibling and renamed
    into place, so a failure leaves nothing behind; an existing non-empty ``out_dir`` is refused
    untouched. ``vary_orientation=False`` stores every case in the identity (LPS) direction.
    ``on_case(done, total)`` is called after each case is written (progress reporting).
    See :func:`make_phantom_case` for the other parameters.
    """
    if isinstance(cases, bool) or not isinstance(cases, int) or not 1 <= cases <= 10000:
        raise MaskSAMError(f"--cases must be an integer from 1 to 10000, got {cases!r}.")
    sizes = tuple(int(v) for v in size)
    if len(sizes) != 3 or not all(16 <= v <= 1024 for v in sizes):
        raise MaskSAMError(f"The phantom size needs 3 values from 16 to 1024 voxels, got {size}.")
    if not 0.0 <= size_jitter < 0.5:
        raise MaskSAMError(f"size_jitter must be in [0, 0.5), got {size_jitter}.")
    inplane = _check_range("The in-plane spacing", inplane_spacing, 0.05, 20.0)
    slices = _check_range("The slice spacing", slice_spacing, 0.05, 50.0)
    if not 0.0 <= noise_hu <= 1000.0:
        raise MaskSAMError(f"The noise level must be in [0, 1000] HU, got {noise_hu}.")
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for index in range(cases):
            image, label = make_phantom_case(
                seed,
                index,
                size=sizes,
                size_jitter=size_jitter,
                inplane_spacing=inplane,
                slice_spacing=slices,
                noise_hu=noise_hu,
                direction=None if vary_orientation else np.eye(3).flatten(),
            )
            case_id = f"{CASE_PREFIX}_{index:03d}"
            write_image(image, tmp / "imagesTr" / f"{case_id}_0000{FILE_ENDING}")
            write_image(label, tmp / "labelsTr" / f"{case_id}{FILE_ENDING}")
            if on_case is not None:
                on_case(index + 1, cases)
        dataset = {
            "name": "MaskSAMPhantoms",
            "description": "Synthetic CT-like abdominal phantoms (MaskSAMLib.data.phantoms); "
            "LPS physical coordinates, varied voxel orientations. Not patient data.",
            "channel_names": {"0": "CT"},
            "labels": dict(PHANTOM_LABELS),
            "numTraining": cases,
            "file_ending": FILE_ENDING,
            "phantom": {
                "seed": seed,
                "size": list(sizes),
                "size_jitter": size_jitter,
                "inplane_spacing": list(inplane),
                "slice_spacing": list(slices),
                "noise_hu": noise_hu,
                "vary_orientation": vary_orientation,
            },
        }
        (tmp / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n", encoding="utf-8")
    return out
