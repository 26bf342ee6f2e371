"""Deterministic synthetic nnU-Net v2 raw datasets for tests, CI and the default demo.

Three kinds of dataset are written in the nnU-Net v2 raw format
(``$nnUNet_raw/DatasetXXX_Name/imagesTr/<case>_0000<ext>``, ``dataset.json``):

* unlabeled 3D volumes (pretraining pool),
* unlabeled 2D images: cross-sections of the same anatomy model plus unrelated textures,
* a labeled 3D segmentation task with ``imagesTr/labelsTr/imagesTs/labelsTs`` (fine-tuning).

The anatomy model: a body ellipsoid with a bright "fat" shell contains up to four organs
(:data:`ORGAN_TEMPLATES`), each a rough ellipsoid (an ellipsoid level set plus smooth noise) with a
per-case random size, position and rotation, its own mean intensity and texture. The second organ is
nested inside the first; the last two overlap. Unlabeled distractor blobs copy the intensity and
texture of an organ. Edges are soft, the image is blurred by a point spread function, multiplied by a
smooth bias field (MRI) and corrupted by noise. Organ contrasts are 1-2.5 noise standard deviations,
so no global intensity threshold recovers an organ: a network must use shape, texture and context.

Conventions:

* Arrays are ``(z, y, x)``; z is the slice axis (SimpleITK ``GetImageFromArray`` order). Spacings
  returned and recorded by this module are ``(z, y, x)`` too, as in nnU-Net's ``properties['spacing']``;
  they are reversed to SimpleITK's ``(x, y, z)`` only when written to a file.
* Anatomy is defined relative to the in-plane field of view, so a 128^3 volume shows the same
  anatomy as a 32^3 one at finer resolution. Anisotropic cases have a z spacing 2-3 times the
  in-plane spacing (the same number of slices then covers a longer stretch of the body).
* Unlabeled datasets have no ``labelsTr``. Their ``dataset.json`` still carries
  ``"labels": {"background": 0}`` because nnU-Net reads the ``labels`` key unconditionally
  (``LabelManager`` accepts a background-only map) and ``"unlabeled": true`` so that readers need not
  guess from the folder layout.
* A 2D image stored as ``.nii.gz`` is a one-slice 3D volume of shape ``(1, H, W)`` with slice spacing
  999 (:data:`SLICE_SPACING_2D`), the value nnU-Net's ``NaturalImage2DIO`` reports for 2D images.
* Case ``i`` of a dataset depends only on ``(seed, dataset kind, i)``: growing ``n_cases`` keeps
  the earlier cases. Every ``dataset.json`` records its generation parameters under ``"synthetic"``;
  a folder whose record matches is left alone, any other existing folder is only replaced with
  ``overwrite=True`` (``--overwrite``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

GENERATOR_VERSION = 1
SUPPORTED_3D_ENDINGS = (".nii.gz", ".nrrd", ".mha")
SUPPORTED_2D_ENDINGS = (".png", ".nii.gz")
SLICE_SPACING_2D = 999.0
MODALITIES = ("MRI", "CT")
IMAGE_KINDS = ("slice", "texture")

# Intensities are built in units of the noise standard deviation; tissue sits TISSUE_LEVEL sigmas
# above air. CT uses a higher level so that, mapped to HU, one sigma is about 17 HU.
_TISSUE_LEVEL = {"MRI": 10.0, "CT": 60.0}
_FAT_CONTRAST = 2.6
_BIAS_AMPLITUDE = 0.1
_PSF_SIGMA_VOXELS = 0.6
_EDGE_WIDTH_VOXELS = 0.35
_ROUGHNESS_CORRELATION = 0.3  # in units of the in-plane half field of view


@dataclass(frozen=True)
class OrganTemplate:
    """Population-level description of one labeled organ (lengths in units of the in-plane half FOV)."""

    name: str
    center: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    contrast: float  # mean intensity minus tissue intensity, in noise sigmas
    texture_correlation: float
    texture_amplitude: float  # in noise sigmas
    roughness: float  # amplitude of the smooth noise added to the ellipsoid level set
    position_jitter: float
    max_rotation_deg: float
    nested_in: int | None = None  # index of the organ this one lies inside


ORGAN_TEMPLATES: tuple[OrganTemplate, ...] = (
    OrganTemplate("liver_like", (0.0, 0.05, -0.33), (0.65, 0.48, 0.4), 1.5, 0.10, 0.7, 0.15, 0.08, 25.0),
    OrganTemplate("lesion_like", (0.0, 0.0, 0.0), (0.26, 0.2, 0.2), 0.2, 0.04, 0.9, 0.2, 0.0, 90.0,
                  nested_in=0),
    OrganTemplate("kidney_like", (0.05, -0.18, 0.42), (0.45, 0.27, 0.19), -1.6, 0.06, 0.5, 0.12, 0.08, 30.0),
    OrganTemplate("vessel_like", (0.0, -0.4, 0.1), (1.5, 0.14, 0.14), 2.2, 0.2, 0.3, 0.1, 0.06, 12.0),
)
MAX_ORGANS = len(ORGAN_TEMPLATES)

# Seed-stream identifiers: each dataset kind draws its cases from its own stream.
_STREAM_UNLABELED_3D = 1
_STREAM_UNLABELED_2D = 2
_STREAM_LABELED_3D = 3


def organ_templates(organs: int | Sequence[str]) -> tuple[OrganTemplate, ...]:
    """The labeled organs of a task, in label order: the first ``organs`` of :data:`ORGAN_TEMPLATES` (an
    int), or the named ones (``nested_in`` re-indexed into the selection; a nested organ needs its parent
    before it)."""
    if isinstance(organs, (int, np.integer)):
        _check_n_organs(int(organs))
        return ORGAN_TEMPLATES[: int(organs)]
    names = [organs] if isinstance(organs, str) else [str(n) for n in organs]
    known = [t.name for t in ORGAN_TEMPLATES]
    if not names or len(set(names)) != len(names) or not set(names) <= set(known):
        raise ValueError(f"organs must be distinct names from {known}, got {names}")
    chosen = []
    for name in names:
        template = ORGAN_TEMPLATES[known.index(name)]
        if template.nested_in is not None:
            parent = ORGAN_TEMPLATES[template.nested_in].name
            if parent not in names[: len(chosen)]:
                raise ValueError(f"organ {name!r} lies inside {parent!r}: list {parent!r} before it, "
                                 f"got {names}")
            template = dataclasses.replace(template, nested_in=names.index(parent))
        chosen.append(template)
    return tuple(chosen)


def organ_labels(organs: int | Sequence[str]) -> dict[str, int]:
    """The nnU-Net ``labels`` map of a labeled synthetic task with these organs
    (:func:`organ_templates`)."""
    return {"background": 0, **{t.name: i + 1 for i, t in enumerate(organ_templates(organs))}}


# ----------------------------------------------------------------------------------------------------
# random fields and filters


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], correlation: Sequence[float]) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with a Gaussian covariance of ``correlation`` voxels per
    axis.

    The field is a sum of Gaussian bumps with i.i.d. weights on a coarse grid whose step equals the
    correlation length, evaluated separably by three small matrix products (no FFT, no scipy), so its
    cost barely depends on the correlation length. Axes with a correlation below one voxel get white noise.
    """
    shape = tuple(int(n) for n in shape)
    bases = [_bump_basis(rng, n, float(c)) for n, c in zip(shape, correlation)]
    weights = rng.standard_normal(tuple(n if b is None else b.shape[1] for n, b in zip(shape, bases)),
                                  dtype=np.float32)
    z_basis, y_basis, x_basis = bases
    field = weights if x_basis is None else weights @ x_basis.T
    field = field if y_basis is None else np.matmul(y_basis, field)
    if z_basis is not None:
        field = (z_basis @ field.reshape(field.shape[0], -1)).reshape(shape)
    return _standardise(field)


def _bump_basis(rng: np.random.Generator, n: int, correlation: float) -> np.ndarray | None:
    """``(n, nodes)`` interpolation matrix from coarse-grid weights to voxels; None for white noise."""
    if correlation < 1.0:
        return None
    # Bumps of std correlation/sqrt(2) at a step of `correlation` give a covariance of std `correlation`
    # whose variance ripples by well under 1 % along the axis.
    bump_sigma = correlation / np.sqrt(2.0)
    margin = 3.0 * bump_sigma
    n_nodes = int(np.ceil((n - 1 + 2 * margin) / correlation)) + 1
    nodes = -margin + rng.uniform(0.0, correlation) + correlation * np.arange(n_nodes)
    x = np.arange(n, dtype=np.float64)[:, None]
    basis = np.exp(-0.5 * ((x - nodes[None]) / bump_sigma) ** 2)
    basis[basis < 1e-6] = 0.0  # far tails would become float32 denormals, which slow matmul by ~30x
    return basis.astype(np.float32)


def _standardise(field: np.ndarray) -> np.ndarray:
    std = float(field.std())
    return ((field - field.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def gaussian_blur(volume: np.ndarray, sigma: Sequence[float]) -> np.ndarray:
    """Separable Gaussian blur (reflecting borders), ``sigma`` in voxels per axis; axes of size 1 are
    skipped."""
    out = volume.astype(np.float32, copy=True)
    for axis, s in enumerate(sigma):
        n = out.shape[axis]
        if s <= 0 or n == 1:
            continue
        radius = int(np.ceil(3.0 * s))
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / s) ** 2)
        taps = (taps / taps.sum()).astype(np.float32)
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")
        acc = np.zeros_like(out)
        for t, w in enumerate(taps):
            acc += w * np.take(padded, np.arange(t, t + n), axis=axis)
        out = acc
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -30.0, 30.0)))).astype(np.float32)


def random_rotation(rng: np.random.Generator, max_angle_deg: float,
                    axis: Sequence[float] | None = None) -> np.ndarray:
    """Rotation matrix (Rodrigues) by a uniform angle in ``[-max, max]`` about ``axis`` (random if None)."""
    a = rng.standard_normal(3) if axis is None else np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    theta = np.deg2rad(rng.uniform(-max_angle_deg, max_angle_deg))
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return np.eye(3) + np.sin(theta) * k + (1.0 - np.cos(theta)) * (k @ k)


# ----------------------------------------------------------------------------------------------------
# anatomy model


@dataclass
class _Blob:
    """One placed rough ellipsoid (lengths in units of the in-plane half FOV, axes ordered z, y, x)."""

    center: np.ndarray
    semi_axes: np.ndarray
    rotation: np.ndarray
    roughness: float


class _Grid:
    """Voxel-centre coordinates of one case in units of the in-plane half field of view."""

    def __init__(self, shape: Sequence[int], spacing: Sequence[float], z_offset: float = 0.0):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = tuple(float(s) for s in spacing)
        self.half_fov = min(self.shape[1] * self.spacing[1], self.shape[2] * self.spacing[2]) / 2.0
        offsets = (z_offset, 0.0, 0.0)
        axes = [((np.arange(n) - (n - 1) / 2.0) * s / self.half_fov + o).astype(np.float32)
                for n, s, o in zip(self.shape, self.spacing, offsets)]
        self.axes = (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])
        self.edge_width = _EDGE_WIDTH_VOXELS * min(self.spacing[1:]) / self.half_fov

    def voxels(self, length: float) -> tuple[float, ...]:
        """A length in half-FOV units expressed in voxels along each axis."""
        return tuple(length * self.half_fov / s for s in self.spacing)

    def noise(self, rng: np.random.Generator, correlation: float) -> np.ndarray:
        return smooth_noise(rng, self.shape, self.voxels(correlation))

    def level(self, blob: _Blob, rng: np.random.Generator) -> np.ndarray:
        """Rough ellipsoid level set (< 0 inside), scaled to approximate a signed distance.

        The scale is the geometric mean of the two shortest semi-axes: most of the surface of a long
        body or tube faces those, and the longest axis must not soften the edges of a body that runs
        through a long z field of view.
        """
        d = [a - c for a, c in zip(self.axes, blob.center.astype(np.float32))]
        q2 = np.zeros(self.shape, dtype=np.float32)
        for i in range(3):
            r = blob.rotation[:, i].astype(np.float32)
            q2 += ((r[0] * d[0] + r[1] * d[1] + r[2] * d[2]) / np.float32(blob.semi_axes[i])) ** 2
        level = np.sqrt(q2) - 1.0 + blob.roughness * self.noise(rng, _ROUGHNESS_CORRELATION)
        scale = np.sqrt(np.prod(np.sort(blob.semi_axes)[:2]))
        return (level * np.float32(scale)).astype(np.float32)

    def soft(self, level: np.ndarray) -> np.ndarray:
        return _sigmoid(-level / self.edge_width)


def _place_body(rng: np.random.Generator, grid: _Grid) -> _Blob:
    # the body always runs through the top and bottom slice, like a torso scan, also when thick slices
    # make the z field of view longer than the in-plane one
    z_extent = max(1.0, grid.shape[0] * grid.spacing[0] / 2.0 / grid.half_fov)
    return _Blob(center=np.array([rng.uniform(-0.1, 0.1), rng.uniform(-0.05, 0.05),
                                  rng.uniform(-0.05, 0.05)]),
                 semi_axes=np.array([rng.uniform(1.1, 1.6) * z_extent, rng.uniform(0.62, 0.78),
                                     rng.uniform(0.8, 0.93)]),
                 rotation=random_rotation(rng, 10.0, axis=(1.0, 0.0, 0.0)),
                 roughness=0.04)


def _place_organ(rng: np.random.Generator, template: OrganTemplate, body: _Blob,
                 placed: Sequence[_Blob]) -> _Blob:
    semi_axes = np.array(template.semi_axes) * rng.uniform(0.75, 1.25, size=3)
    if template.nested_in is None:
        center = body.center + body.rotation @ np.array(template.center)
        center = center + rng.normal(0.0, template.position_jitter, size=3)
    else:
        parent = placed[template.nested_in]
        u = rng.standard_normal(3)
        u *= rng.uniform(0.0, 0.45) / np.linalg.norm(u)
        center = parent.center + parent.rotation @ (parent.semi_axes * u)
    rotation = body.rotation @ random_rotation(rng, template.max_rotation_deg)
    return _Blob(center, semi_axes, rotation, template.roughness)


def _place_distractor(rng: np.random.Generator, body: _Blob) -> _Blob:
    u = rng.standard_normal(3)
    u *= rng.uniform(0.0, 0.75) / np.linalg.norm(u)
    return _Blob(center=body.center + body.rotation @ (body.semi_axes * u),
                 semi_axes=rng.uniform(0.07, 0.2, size=3),
                 rotation=random_rotation(rng, 180.0),
                 roughness=0.25)


def _render_anatomy(rng: np.random.Generator, grid: _Grid, organs: int | Sequence[str], modality: str,
                    require_all_organs: bool) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32, modality units) and label map (uint8) of one case on ``grid``."""
    templates = organ_templates(organs)
    n_organs = len(templates)
    min_voxels = max(4, int(2e-4 * np.prod(grid.shape)))
    for _attempt in range(50):
        body = _place_body(rng, grid)
        body_level = grid.level(body, rng)
        inside = body_level < 0
        organs: list[_Blob] = []
        levels: list[np.ndarray] = []
        label = np.zeros(grid.shape, dtype=np.uint8)
        for k, template in enumerate(templates):
            organs.append(_place_organ(rng, template, body, organs))
            level = np.maximum(grid.level(organs[-1], rng), body_level)
            if template.nested_in is not None:
                level = np.maximum(level, levels[template.nested_in])
            levels.append(level)
            label[level < 0] = k + 1
        counts = np.bincount(label[inside].ravel(), minlength=n_organs + 1)
        if not require_all_organs or counts[1:].min() >= min_voxels:
            break
    else:
        raise RuntimeError(f"could not place all {n_organs} organs ({[t.name for t in templates]}) inside a "
                           f"{grid.shape} grid; "
                           "use a larger shape or fewer organs")

    tissue = _TISSUE_LEVEL[modality]
    image = np.zeros(grid.shape, dtype=np.float32)

    def paint(mask: np.ndarray, contrast: float, texture_correlation: float,
              texture_amplitude: float) -> None:
        value = tissue + contrast + texture_amplitude * grid.noise(rng, texture_correlation)
        image[...] += mask * (value - image)

    body_mask = grid.soft(body_level)
    paint(body_mask, 0.0, 0.12, 0.7)
    fat_thickness = rng.uniform(0.05, 0.1)
    paint(body_mask * _sigmoid((body_level + fat_thickness) / grid.edge_width), _FAT_CONTRAST, 0.05, 0.4)

    contrasts = [t.contrast + rng.uniform(-0.3, 0.3) for t in templates]
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(0, n_organs))
        level = np.maximum(grid.level(_place_distractor(rng, body), rng), body_level)
        paint(grid.soft(level), contrasts[k] + rng.uniform(-0.2, 0.2),
              templates[k].texture_correlation, templates[k].texture_amplitude)
    for template, contrast, level in zip(templates, contrasts, levels):
        paint(grid.soft(level), contrast, template.texture_correlation, template.texture_amplitude)

    image = gaussian_blur(image, (_PSF_SIGMA_VOXELS,) * 3)
    noise = rng.standard_normal((2, *grid.shape), dtype=np.float32)
    if modality == "MRI":
        image *= np.exp(_BIAS_AMPLITUDE * grid.noise(rng, 0.9))
        image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude noise
        image *= rng.uniform(15.0, 40.0)  # arbitrary scanner gain
    else:
        image = -1000.0 + (image + noise[0]) * (1040.0 / tissue)  # air -1000 HU, tissue 40 HU
    return image.astype(np.float32), label


def _check_n_organs(n_organs: int) -> None:
    if not 1 <= n_organs <= MAX_ORGANS:
        raise ValueError(f"n_organs must be between 1 and {MAX_ORGANS}, got {n_organs}")


def _check_shape(shape: Sequence[int], ndim: int) -> tuple[int, ...]:
    shape = tuple(int(n) for n in shape)
    if len(shape) != ndim or min(shape) < 8:
        raise ValueError(f"shape must have {ndim} entries of at least 8 voxels, got {shape}")
    return shape


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")


def make_volume_case(rng: np.random.Generator, shape: Sequence[int] = (32, 32, 32),
                     spacing: Sequence[float] | None = None, n_organs: int = 3,
                     anisotropic: bool | None = None, modality: str = "MRI",
                     require_all_organs: bool = True, organs: Sequence[str] | None = None
                     ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """One synthetic 3D case.

    Args:
        rng: the only source of randomness; the same generator state gives the same case.
        shape: ``(z, y, x)`` voxels, z being the slice axis.
        spacing: ``(z, y, x)`` in mm. ``None`` draws an in-plane spacing in [0.7, 1.3] mm and a
            z spacing equal to it, or 2-3 times it when the case is anisotropic.
        n_organs: labeled organs, the first ``n_organs`` of :data:`ORGAN_TEMPLATES` (labels 1..n).
        anisotropic: only used when ``spacing`` is None; ``None`` makes 40 % of cases anisotropic.
        modality: ``"MRI"`` (arbitrary units, bias field, Rician noise) or ``"CT"`` (HU, no bias field).
        require_all_organs: redraw the geometry until every organ has a few voxels.
        organs: template names to label instead of the first ``n_organs`` (labels 1..len in this order;
            :func:`organ_templates`), e.g. ``("liver_like", "kidney_like", "vessel_like")``.

    Returns:
        ``(image, label, spacing)``: float32 and uint8 arrays of ``shape`` and the ``(z, y, x)`` spacing.
    """
    shape = _check_shape(shape, 3)
    labeled = n_organs if organs is None else organs
    organ_templates(labeled)  # bad organs are refused before any random draw
    _check_modality(modality)
    if spacing is None:
        in_plane = round(float(rng.uniform(0.7, 1.3)), 4)
        if anisotropic is None:
            anisotropic = bool(rng.random() < 0.4)
        z = round(in_plane * float(rng.uniform(2.0, 3.0)), 4) if anisotropic else in_plane
        spacing = (z, in_plane, in_plane)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive (z, y, x) values in mm, got {spacing}")
    image, label = _render_anatomy(rng, _Grid(shape, spacing), labeled, modality, require_all_organs)
    return image, label, spacing


def make_image_case(rng: np.random.Generator, shape: Sequence[int] = (64, 64),
                    kind: str = "slice") -> np.ndarray:
    """One synthetic 2D image (float32, ``(y, x)``).

    ``kind="slice"`` renders a random axial cross-section of the 3D anatomy model (2-4 organs, MRI
    contrast); ``kind="texture"`` draws an unrelated texture: oriented sinusoid gratings, a multi-scale
    smooth random field, or thresholded blobs, each with noise.
    """
    shape = _check_shape(shape, 2)
    if kind == "slice":
        in_plane = float(rng.uniform(0.7, 1.3))
        grid = _Grid((1, *shape), (in_plane, in_plane, in_plane), z_offset=float(rng.uniform(-0.6, 0.6)))
        image, _ = _render_anatomy(rng, grid, int(rng.integers(2, MAX_ORGANS + 1)), "MRI",
                                   require_all_organs=False)
        return image[0]
    if kind == "texture":
        return _make_texture(rng, shape)
    raise ValueError(f"kind must be one of {IMAGE_KINDS}, got {kind!r}")


def _make_texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    shape3 = (1, *shape)
    family = int(rng.integers(0, 3))
    if family == 0:  # oriented gratings with a smooth amplitude envelope
        y, x = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
        image = np.zeros(shape, dtype=np.float64)
        for _ in range(int(rng.integers(1, 4))):
            theta, phase = rng.uniform(0.0, np.pi), rng.uniform(0.0, 2 * np.pi)
            frequency = rng.uniform(0.03, 0.2)
            image += rng.uniform(1.0, 3.0) * np.sin(2 * np.pi * frequency
                                                    * (x * np.cos(theta) + y * np.sin(theta)) + phase)
        envelope = 1.0 + 0.4 * smooth_noise(rng, shape3, (1.0, 12.0, 12.0))[0]
        image = image * envelope + smooth_noise(rng, shape3, (1.0, 20.0, 20.0))[0]
    elif family == 1:  # multi-scale smooth field
        image = sum(rng.uniform(0.2, 1.0) * smooth_noise(rng, shape3, (1.0, c, c))[0]
                    for c in (1.5, 4.0, 10.0, 25.0))
    else:  # thresholded blobs with two textured phases
        correlation = rng.uniform(2.0, 6.0)
        field = smooth_noise(rng, shape3, (1.0, correlation, correlation))[0]
        mask = _sigmoid((field - rng.uniform(-0.5, 0.8)) / 0.15)
        inner = rng.uniform(1.5, 4.0) + 0.5 * smooth_noise(rng, shape3, (1.0, 1.5, 1.5))[0]
        image = mask * inner + (1 - mask) * 0.3 * smooth_noise(rng, shape3, (1.0, 8.0, 8.0))[0]
    image = 10.0 + image + 0.5 * rng.standard_normal(shape)
    return image.astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# writing datasets


def _write_image(array: np.ndarray, path: Path, spacing_zyx: Sequence[float]) -> None:
    itk_image = sitk.GetImageFromArray(array)
    itk_image.SetSpacing([float(s) for s in spacing_zyx[::-1]])  # SimpleITK wants (x, y, z)
    sitk.WriteImage(itk_image, str(path), True)


def _to_png(image: np.ndarray, dtype: str) -> np.ndarray:
    """Percentile window (0.5-99.5) mapped onto the full uint8/uint16 range."""
    lo, hi = np.percentile(image, [0.5, 99.5])
    scaled = np.clip((image - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(image)
    return np.round(scaled * np.iinfo(dtype).max).astype(dtype)


def _case_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), stream, int(index)])


def _case_id(name: str, index: int) -> str:
    return f"{name}_{index:03d}"


def _is_anisotropic(index: int) -> bool:
    # a fixed pattern rather than a coin flip so that any dataset of two or more cases has both kinds
    return index % 3 == 1


def _check_ending(file_ending: str, supported: Sequence[str]) -> None:
    if file_ending not in supported:
        raise ValueError(f"file_ending must be one of {tuple(supported)}, got {file_ending!r}")


def _check_count(value: int, what: str, minimum: int) -> int:
    if int(value) < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {value}")
    return int(value)


@dataclass
class _DatasetPlan:
    """What one writer will put where; ``write`` fills an existing, empty ``folder``."""

    folder: Path
    manifest: dict
    files: list[str]
    write: Callable[[Path], None]

    def status(self) -> str:
        """``"absent"``, ``"up_to_date"`` (same generation record, all files present) or ``"different"``.

        Raises FileExistsError when another folder already uses the same dataset id: nnU-Net refuses
        ambiguous ids.
        """
        prefix = self.folder.name.split("_", 1)[0] + "_"
        clashes = sorted(p for p in self.folder.parent.glob(prefix + "*") if p.is_dir() and p != self.folder)
        if clashes:
            raise FileExistsError(f"{clashes[0]} already uses the id of {self.folder.name}; choose another "
                                  "dataset id (--ids) or remove that folder")
        if not self.folder.exists():
            return "absent"
        try:
            recorded = json.loads((self.folder / "dataset.json").read_text()).get("synthetic")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded == self.manifest and all((self.folder / f).is_file() for f in self.files):
            return "up_to_date"
        return "different"

    def refusal(self) -> FileExistsError:
        return FileExistsError(f"{self.folder} already exists with different content (not written by "
                               "make-synthetic with these parameters); pass --overwrite (overwrite=True) "
                               "to replace it")

    def execute(self, overwrite: bool) -> bool:
        """Write the dataset unless it is up to date; returns whether anything was written."""
        status = self.status()
        if status == "up_to_date":
            return False
        if status == "different":
            if not overwrite:
                raise self.refusal()
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        self.write(self.folder)
        return True


def _dataset_folder(raw_root: str | os.PathLike, dataset_id: int, name: str) -> Path:
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id must be between 1 and 999, got {dataset_id}")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"dataset name must be alphanumeric (with _ or -), got {name!r}")
    return Path(raw_root) / f"Dataset{int(dataset_id):03d}_{name}"


def _manifest(kind: str, **params) -> dict:
    record = {"generator": "nnssl_joint.datasets.synthetic", "version": GENERATOR_VERSION, "kind": kind}
    record.update({k: list(v) if isinstance(v, tuple) else v for k, v in params.items()})
    return record


def _write_dataset_json(folder: Path, *, channel_name: str, labels: dict[str, int], num_training: int,
                        file_ending: str, unlabeled: bool, description: str, manifest: dict) -> None:
    content = {
        "channel_names": {"0": channel_name},
        "labels": labels,
        "numTraining": int(num_training),
        "file_ending": file_ending,
        "name": folder.name,
        "description": description,
        "unlabeled": unlabeled,
        "licence": "CC0-1.0 (synthetic data)",
        "converted_by": "nnssl_joint.datasets.synthetic",
        "synthetic": manifest,
    }
    # written last: a folder without dataset.json is an interrupted run and is never taken as up to date
    (folder / "dataset.json").write_text(json.dumps(content, indent=2) + "\n")


def _plan_unlabeled_3d(raw_root: str | os.PathLike, dataset_id: int, name: str, n_cases: int,
                       shape: Sequence[int], seed: int, file_ending: str, modality: str) -> _DatasetPlan:
    folder = _dataset_folder(raw_root, dataset_id, name)
    n_cases = _check_count(n_cases, "n_cases", 1)
    shape = _check_shape(shape, 3)
    _check_ending(file_ending, SUPPORTED_3D_ENDINGS)
    _check_modality(modality)
    manifest = _manifest("unlabeled_3d", seed=int(seed), n_cases=n_cases, shape=shape,
                         file_ending=file_ending, modality=modality)
    files = [f"imagesTr/{_case_id(name, i)}_0000{file_ending}" for i in range(n_cases)]

    def write(target: Path) -> None:
        (target / "imagesTr").mkdir()
        for i, f in enumerate(files):
            rng = _case_rng(seed, _STREAM_UNLABELED_3D, i)
            image, _, spacing = make_volume_case(rng, shape, n_organs=int(rng.integers(2, MAX_ORGANS + 1)),
                                                 anisotropic=_is_anisotropic(i), modality=modality,
                                                 require_all_organs=False)
            _write_image(image, target / f, spacing)
        _write_dataset_json(target, channel_name=modality, labels={"background": 0}, num_training=n_cases,
                            file_ending=file_ending, unlabeled=True, manifest=manifest,
                            description="Synthetic unlabeled 3D volumes (nnssl_joint pretraining pool)")

    return _DatasetPlan(folder, manifest, files, write)


def _plan_unlabeled_2d(raw_root: str | os.PathLike, dataset_id: int, name: str, n_cases: int,
                       shape: Sequence[int], seed: int, file_ending: str, texture_fraction: float,
                       png_dtype: str) -> _DatasetPlan:
    folder = _dataset_folder(raw_root, dataset_id, name)
    n_cases = _check_count(n_cases, "n_cases", 1)
    shape = _check_shape(shape, 2)
    _check_ending(file_ending, SUPPORTED_2D_ENDINGS)
    if png_dtype not in ("uint8", "uint16"):
        raise ValueError(f"png_dtype must be 'uint8' or 'uint16', got {png_dtype!r}")
    if not 0.0 <= texture_fraction <= 1.0:
        raise ValueError(f"texture_fraction must lie in [0, 1], got {texture_fraction}")
    manifest = _manifest("unlabeled_2d", seed=int(seed), n_cases=n_cases, shape=shape,
                         file_ending=file_ending, texture_fraction=float(texture_fraction),
                         png_dtype=png_dtype if file_ending == ".png" else None)
    files = [f"imagesTr/{_case_id(name, i)}_0000{file_ending}" for i in range(n_cases)]

    def write(target: Path) -> None:
        (target / "imagesTr").mkdir()
        for i, f in enumerate(files):
            rng = _case_rng(seed, _STREAM_UNLABELED_2D, i)
            kind = "texture" if rng.random() < texture_fraction else "slice"
            image = make_image_case(rng, shape, kind)
            if file_ending == ".png":
                sitk.WriteImage(sitk.GetImageFromArray(_to_png(image, png_dtype)), str(target / f))
            else:
                _write_image(image[None], target / f, (SLICE_SPACING_2D, 1.0, 1.0))
        _write_dataset_json(target, channel_name="MRI", labels={"background": 0}, num_training=n_cases,
                            file_ending=file_ending, unlabeled=True, manifest=manifest,
                            description="Synthetic unlabeled 2D images: anatomy cross-sections and textures")

    return _DatasetPlan(folder, manifest, files, write)


def _plan_labeled_3d(raw_root: str | os.PathLike, dataset_id: int, name: str, n_train: int, n_test: int,
                     shape: Sequence[int], seed: int, n_organs: int, file_ending: str,
                     modality: str, organs: Sequence[str] | None = None) -> _DatasetPlan:
    folder = _dataset_folder(raw_root, dataset_id, name)
    n_train = _check_count(n_train, "n_train", 1)
    n_test = _check_count(n_test, "n_test", 0)
    shape = _check_shape(shape, 3)
    selection = organ_templates(n_organs if organs is None else organs)
    chosen = n_organs if organs is None else [t.name for t in selection]
    _check_ending(file_ending, SUPPORTED_3D_ENDINGS)
    _check_modality(modality)
    # a named selection is recorded as such; the default manifest keeps its keys (up-to-date checks)
    named = {} if organs is None else {"organs": list(chosen)}
    manifest = _manifest("labeled_3d", seed=int(seed), n_train=n_train, n_test=n_test, shape=shape,
                         n_organs=len(selection), file_ending=file_ending, modality=modality, **named)
    # one stream of cases: the first n_train go to imagesTr, the next n_test to imagesTs
    splits = [("Tr", i) for i in range(n_train)] + [("Ts", n_train + j) for j in range(n_test)]
    files = [f"{kind}{split}/{_case_id(name, i)}{suffix}{file_ending}"
             for split, i in splits for kind, suffix in (("images", "_0000"), ("labels", ""))]

    def write(target: Path) -> None:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (target / sub).mkdir()
        for split, i in splits:
            rng = _case_rng(seed, _STREAM_LABELED_3D, i)
            image, label, spacing = make_volume_case(rng, shape, n_organs=len(selection), organs=organs,
                                                     anisotropic=_is_anisotropic(i), modality=modality)
            _write_image(image, target / f"images{split}" / f"{_case_id(name, i)}_0000{file_ending}", spacing)
            _write_image(label, target / f"labels{split}" / f"{_case_id(name, i)}{file_ending}", spacing)
        _write_dataset_json(target, channel_name=modality, labels=organ_labels(chosen),
                            num_training=n_train, file_ending=file_ending, unlabeled=False, manifest=manifest,
                            description="Synthetic 3D organ segmentation task (nnssl_joint fine-tuning)")

    return _DatasetPlan(folder, manifest, files, write)


def write_unlabeled_3d(raw_root: str | os.PathLike, dataset_id: int, name: str, n_cases: int,
                       shape: Sequence[int] = (32, 32, 32), seed: int = 0, file_ending: str = ".nii.gz",
                       *, modality: str = "MRI", overwrite: bool = False) -> Path:
    """Unlabeled 3D pretraining pool (``imagesTr`` only): 2-4 organs per case, cases 1, 4, 7, ... anisotropic.

    Returns the dataset folder. An up-to-date folder is left alone; a folder with other content
    raises FileExistsError unless ``overwrite``.
    """
    plan = _plan_unlabeled_3d(raw_root, dataset_id, name, n_cases, shape, seed, file_ending, modality)
    plan.execute(overwrite)
    return plan.folder


def write_unlabeled_2d(raw_root: str | os.PathLike, dataset_id: int, name: str, n_cases: int,
                       shape: Sequence[int] = (64, 64), seed: int = 0, file_ending: str = ".png",
                       *, texture_fraction: float = 0.25, png_dtype: str = "uint8",
                       overwrite: bool = False) -> Path:
    """Unlabeled 2D pool: anatomy cross-sections and, for about ``texture_fraction`` of cases, textures.

    ``.png`` files hold a percentile-windowed ``png_dtype`` (uint8 or uint16) image; ``.nii.gz`` files
    hold the float32 image as a one-slice volume ``(1, H, W)`` with slice spacing :data:`SLICE_SPACING_2D`
    and in-plane spacing 1. Overwrite rules as in :func:`write_unlabeled_3d`.
    """
    plan = _plan_unlabeled_2d(raw_root, dataset_id, name, n_cases, shape, seed, file_ending, texture_fraction,
                              png_dtype)
    plan.execute(overwrite)
    return plan.folder


def write_labeled_3d(raw_root: str | os.PathLike, dataset_id: int, name: str, n_train: int, n_test: int,
                     shape: Sequence[int] = (32, 32, 32), seed: int = 0, n_organs: int = 3,
                     file_ending: str = ".nii.gz", *, modality: str = "MRI", overwrite: bool = False,
                     organs: Sequence[str] | None = None) -> Path:
    """Labeled 3D task: cases ``0..n_train-1`` in ``imagesTr/labelsTr``, the next ``n_test`` in
    ``imagesTs/labelsTs``.

    Every case contains all ``n_organs`` organs (labels 1..n_organs, see :func:`organ_labels`), or the
    named ``organs`` instead; cases 1, 4, 7, ... are anisotropic. Overwrite rules as in
    :func:`write_unlabeled_3d`.
    """
    plan = _plan_labeled_3d(raw_root, dataset_id, name, n_train, n_test, shape, seed, n_organs, file_ending,
                            modality, organs)
    plan.execute(overwrite)
    return plan.folder


DEFAULT_IDS = (501, 502, 503)
DEFAULT_NAMES = ("SynthUnlabeled3D", "SynthUnlabeled2D", "SynthOrgans")
_KINDS = ("unlabeled_3d", "unlabeled_2d", "labeled_3d")


def make_synthetic(raw_root: str | os.PathLike, seed: int = 0, n_3d: int = 8, n_2d: int = 16,
                   n_labeled_train: int = 6, n_labeled_test: int = 4,
                   shape_3d: Sequence[int] = (32, 32, 32), shape_2d: Sequence[int] = (64, 64),
                   ids: Sequence[int] = DEFAULT_IDS, *, n_organs: int = 3, file_ending_3d: str = ".nii.gz",
                   file_ending_2d: str = ".png", names: Sequence[str] = DEFAULT_NAMES,
                   overwrite: bool = False, organs: Sequence[str] | None = None) -> dict[str, dict]:
    """Write the unlabeled 3D pool, the unlabeled 2D pool and the labeled 3D task under ``raw_root``.

    All three targets are checked before anything is written, so a refused overwrite or an id clash
    leaves every folder untouched. Returns ``{"unlabeled_3d" | "unlabeled_2d" | "labeled_3d":
    {"id", "name", "path", "written"}}``; ``written`` is False for a folder that was already up to date.
    """
    if len(ids) != 3 or len({int(i) for i in ids}) != 3:
        raise ValueError(f"ids must be three distinct dataset ids (unlabeled 3D, unlabeled 2D, labeled 3D), "
                         f"got {tuple(ids)}")
    if len(names) != 3:
        raise ValueError(f"names must be three dataset names, got {tuple(names)}")
    plans = [
        _plan_unlabeled_3d(raw_root, ids[0], names[0], n_3d, shape_3d, seed, file_ending_3d, "MRI"),
        _plan_unlabeled_2d(raw_root, ids[1], names[1], n_2d, shape_2d, seed, file_ending_2d, 0.25, "uint8"),
        _plan_labeled_3d(raw_root, ids[2], names[2], n_labeled_train, n_labeled_test, shape_3d, seed,
                         n_organs, file_ending_3d, "MRI", organs),
    ]
    if not overwrite:
        for plan in plans:
            if plan.status() == "different":
                raise plan.refusal()
    Path(raw_root).mkdir(parents=True, exist_ok=True)
    return {kind: {"id": int(dataset_id), "name": plan.folder.name, "path": plan.folder,
                   "written": plan.execute(overwrite)}
            for kind, dataset_id, plan in zip(_KINDS, ids, plans)}


# ----------------------------------------------------------------------------------------------------
# command line


def _int_tuple(length: int) -> Callable[[str], tuple[int, ...]]:
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.replace("x", ",").split(","))
        except ValueError:
            values = ()
        if len(values) != length:
            raise argparse.ArgumentTypeError(f"expected {length} comma-separated integers, got {text!r}")
        return values

    return parse


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``make-synthetic`` sub-command; its handler is stored as ``args.func``."""
    parser = subparsers.add_parser(
        "make-synthetic", help="write the synthetic unlabeled 3D, unlabeled 2D and labeled 3D raw datasets",
        description="Write three deterministic synthetic nnU-Net v2 raw datasets: an unlabeled 3D pool, an "
                    "unlabeled 2D pool and a labeled 3D organ segmentation task.")
    parser.add_argument("--out", default=None,
                        help="nnU-Net raw root to write into (default: the nnUNet_raw environment variable)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    parser.add_argument("--n-3d", type=int, default=8, help="unlabeled 3D volumes (default 8)")
    parser.add_argument("--n-2d", type=int, default=16, help="unlabeled 2D images (default 16)")
    parser.add_argument("--n-train", type=int, default=6, help="labeled training cases (default 6)")
    parser.add_argument("--n-test", type=int, default=4, help="labeled test cases (default 4)")
    parser.add_argument("--n-organs", type=int, default=3, help=f"labeled organs, 1-{MAX_ORGANS} (default 3)")
    parser.add_argument("--organs", type=lambda text: tuple(n.strip() for n in text.split(",") if n.strip()),
                        default=None,
                        help="comma-separated organ names to label instead of the first --n-organs, "
                             f"from {', '.join(t.name for t in ORGAN_TEMPLATES)} (a nested organ after its "
                             "parent)")
    parser.add_argument("--shape-3d", type=_int_tuple(3), default=(32, 32, 32),
                        help="z,y,x (default 32,32,32)")
    parser.add_argument("--shape-2d", type=_int_tuple(2), default=(64, 64), help="y,x (default 64,64)")
    parser.add_argument("--ids", type=_int_tuple(3), default=DEFAULT_IDS,
                        help="dataset ids of unlabeled 3D, unlabeled 2D, labeled 3D (default 501,502,503)")
    parser.add_argument("--file-ending-3d", choices=SUPPORTED_3D_ENDINGS, default=".nii.gz")
    parser.add_argument("--file-ending-2d", choices=SUPPORTED_2D_ENDINGS, default=".png")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing dataset folders whose content differs")
    parser.set_defaults(func=run_make_synthetic)
    return parser


def run_make_synthetic(args: argparse.Namespace) -> int:
    """Handler of ``make-synthetic``: writes the datasets and prints what it wrote."""
    raw_root = args.out or os.environ.get("nnUNet_raw")
    if not raw_root:
        raise SystemExit("make-synthetic: no output folder: pass --out or set the nnUNet_raw environment "
                         "variable")
    try:
        result = make_synthetic(raw_root, seed=args.seed, n_3d=args.n_3d, n_2d=args.n_2d,
                                n_labeled_train=args.n_train, n_labeled_test=args.n_test,
                                shape_3d=args.shape_3d, shape_2d=args.shape_2d, ids=args.ids,
                                n_organs=args.n_organs, file_ending_3d=args.file_ending_3d,
                                file_ending_2d=args.file_ending_2d, overwrite=args.overwrite,
                                organs=args.organs)
    except (FileExistsError, ValueError) as e:
        raise SystemExit(f"make-synthetic: {e}") from e
    for kind, info in result.items():
        manifest = json.loads((info["path"] / "dataset.json").read_text())["synthetic"]
        counts = ", ".join(f"{k}={v}" for k, v in manifest.items() if k.startswith("n_"))
        state = "wrote" if info["written"] else "up to date"
        print(f"{state:>10}  {kind:<12} {info['path']}  ({counts}, shape "
              f"{'x'.join(map(str, manifest['shape']))}, {manifest['file_ending']})")
    return 0
