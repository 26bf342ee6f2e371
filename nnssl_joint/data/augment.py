"""View augmentations for joint 2D/3D self-supervised pretraining (METHOD.md, "Data").

Every view is built from batchgeneratorsv2 transforms, applied to one sample at a time as nnU-Net does:

- a random resized crop (:class:`RandomResizedCropTransform`, a :class:`SpatialTransform` whose parameters
  are drawn like torchvision's RandomResizedCrop, plus an optional in-plane rotation) that maps a box of a
  random area fraction and aspect ratio of the input patch onto the view size;
- in-plane mirroring;
- intensity changes: smooth multiplicative bias field (:class:`MultiplicativeBiasFieldTransform`, our own:
  batchgeneratorsv2 has none), brightness, contrast, gamma, Gaussian blur, simulated low resolution and
  Gaussian noise.

2D images and slices are (C, H, W). Volume stacks are (C, N, H, W): their spatial transform runs on the
(C * N, H, W) reshape (nnU-Net's Convert3DTo2DTransform), so every slice and channel gets the *same*
in-plane crop, rotation and flip, and slice n of one view is slice n of the other. No transform touches the
slice axis. Blur and low resolution also run on that reshape with one parameter set for all slices; the
remaining intensity transforms run on (C, N, H, W) per channel over the whole stack, so a volume view looks
like one acquisition (one brightness, contrast, gamma, bias field for all its slices), while the two views
of a volume draw their own parameters.

Gamma never inverts the image (nnU-Net's p_invert_image): an invariance to inverted contrast is not one we
want pretrained features to have.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from batchgeneratorsv2.helpers.scalar_type import RandomScalar, sample_scalar
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, ImageOnlyTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from torch.nn.functional import interpolate

from nnssl_joint.errors import NnsslJointError

__all__ = [
    "STRONG",
    "WEAK",
    "MultiplicativeBiasFieldTransform",
    "RandomResizedCropTransform",
    "ViewAugmentationConfig",
    "coordinate_maps",
    "slice_view_transforms",
    "volume_view_transforms",
]


def _check_range(name: str, value: Sequence[float], low: float, high: float) -> tuple[float, float]:
    if len(value) != 2 or not (low <= value[0] <= value[1] <= high):
        raise NnsslJointError(f"{name} must be (min, max) with {low} <= min <= max <= {high}, "
                              f"got {tuple(value)}")
    return float(value[0]), float(value[1])


class RandomResizedCropTransform(SpatialTransform):
    """Random resized crop with optional in-plane rotation, for 2D samples (C, H, W).

    A box covering a fraction ``area`` of the input's area with aspect ratio (width / height) in
    ``aspect_ratio`` (log-uniform) is placed uniformly inside the input, rotated by an angle from
    ``rotation`` (radians) with probability ``p_rotation`` about its centre, and resampled bilinearly onto
    ``patch_size``. Parts of a rotated box that leave the input are zero (image) / ``padding_value_seg``
    (segmentation), as in nnU-Net. Only the parameter sampling differs from :class:`SpatialTransform`; its
    image and segmentation resampling are used unchanged.
    """

    def __init__(self, patch_size: Sequence[int], area: Sequence[float] = (0.25, 1.0),
                 aspect_ratio: Sequence[float] = (3 / 4, 4 / 3), p_rotation: float = 0.0,
                 rotation: RandomScalar = (-math.pi / 6, math.pi / 6), padding_value_seg: float = -1):
        if len(patch_size) != 2:
            raise NnsslJointError(f"RandomResizedCropTransform is 2D: patch_size must be (h, w), "
                                  f"got {patch_size}")
        super().__init__(tuple(int(i) for i in patch_size), patch_center_dist_from_border=0, random_crop=True,
                         p_rotation=p_rotation, rotation=rotation, border_mode_seg="constant",
                         padding_value_seg=padding_value_seg)
        self.area = _check_range("area", area, 1e-6, 1.0)
        self.aspect_ratio = _check_range("aspect_ratio", aspect_ratio, 1e-3, 1e3)

    def get_parameters(self, **data_dict) -> dict:
        image = data_dict["image"]
        if image.ndim != 3:
            raise NnsslJointError(f"RandomResizedCropTransform expects (C, H, W), "
                                  f"got shape {tuple(image.shape)}")
        height, width = image.shape[1:]
        area = np.random.uniform(*self.area) * height * width
        ratio = math.exp(np.random.uniform(math.log(self.aspect_ratio[0]), math.log(self.aspect_ratio[1])))
        box_h = min(math.sqrt(area / ratio), height)
        box_w = min(math.sqrt(area * ratio), width)
        # continuous pixel coordinates: pixel k covers [k, k + 1), its centre is k + 0.5
        centre_y = np.random.uniform(box_h / 2, height - box_h / 2)
        centre_x = np.random.uniform(box_w / 2, width - box_w / 2)
        angle = (sample_scalar(self.rotation, image=image, dim=0) if np.random.uniform() < self.p_rotation
                 else 0.0)

        out_h, out_w = self.patch_size
        offset_y = (torch.arange(out_h, dtype=torch.float32) - (out_h - 1) / 2) * (box_h / out_h)
        offset_x = (torch.arange(out_w, dtype=torch.float32) - (out_w - 1) / 2) * (box_w / out_w)
        offset_y, offset_x = torch.meshgrid(offset_y, offset_x, indexing="ij")
        cos, sin = math.cos(angle), math.sin(angle)
        y = centre_y + cos * offset_y - sin * offset_x
        x = centre_x + sin * offset_y + cos * offset_x
        # grid_sample (align_corners=False) wants (x, y) in [-1, 1], -1 being the outer edge of pixel 0
        grid = torch.stack((2 * x / width - 1, 2 * y / height - 1), dim=-1)
        return {"grid": grid, "center_location_in_pixels": [centre_y, centre_x], "affine": None,
                "elastic_offsets": None}


class MultiplicativeBiasFieldTransform(ImageOnlyTransform):
    """Smooth multiplicative intensity inhomogeneity (MR bias field), in-plane.

    Per channel, a field f = exp(s * b) is drawn, b being bicubically upsampled Gaussian noise on a
    ``control_points`` x ``control_points`` grid scaled to max |b| = 1 and s ~ ``strength``. It varies over
    the last two axes and is the same along any axes before them (the slices of a stack). Our data are
    z-scored, so the field multiplies the intensity above the channel minimum m: x' = m + (x - m) * f, which
    is what a multiplicative field does to the raw, non-negative signal.
    """

    def __init__(self, strength: RandomScalar = (0.05, 0.3), control_points: int = 4,
                 synchronize_channels: bool = False, p_per_channel: float = 1.0):
        super().__init__()
        if control_points < 2:
            raise NnsslJointError(f"control_points must be >= 2, got {control_points}")
        self.strength = strength
        self.control_points = int(control_points)
        self.synchronize_channels = synchronize_channels
        self.p_per_channel = float(p_per_channel)

    def _field(self, shape: Sequence[int], strength: float) -> torch.Tensor:
        coarse = torch.randn(1, 1, self.control_points, self.control_points)
        field = interpolate(coarse, size=tuple(shape), mode="bicubic", align_corners=True)[0, 0]
        return torch.exp(field * (strength / field.abs().max().clamp_min(1e-6)))

    def get_parameters(self, **data_dict) -> dict:
        image = data_dict["image"]
        if image.ndim < 3:
            raise NnsslJointError(f"bias field needs (C, ..., H, W), got shape {tuple(image.shape)}")
        channels = torch.where(torch.rand(image.shape[0]) < self.p_per_channel)[0].tolist()
        in_plane = image.shape[-2:]
        if self.synchronize_channels and channels:
            field = self._field(in_plane, sample_scalar(self.strength, image=image, channel=None))
            fields = [field] * len(channels)
        else:
            fields = [self._field(in_plane, sample_scalar(self.strength, image=image, channel=c))
                      for c in channels]
        return {"channels": channels, "fields": fields}

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        for c, field in zip(params["channels"], params["fields"]):
            x = img[c]
            minimum = x.min()
            x.sub_(minimum).mul_(field.to(x.dtype)).add_(minimum)
        return img


@dataclass(frozen=True)
class ViewAugmentationConfig:
    """Settings of one view pipeline; the probabilities are per view (per sample) as in nnU-Net.

    ``crop_area`` is the fraction of the loader's initial patch area a view covers (torchvision's
    RandomResizedCrop ``scale``); ``aspect_ratio`` its width / height range. Ranges are (min, max).
    """

    crop_area: tuple[float, float] = (0.25, 1.0)
    aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    p_rotation: float = 0.5
    max_rotation_deg: float = 30.0
    mirror: bool = True
    p_bias_field: float = 0.3
    bias_field_strength: tuple[float, float] = (0.05, 0.3)
    p_brightness: float = 0.5
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.5
    contrast: tuple[float, float] = (0.75, 1.25)
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_blur: float = 0.3
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    p_low_resolution: float = 0.2
    low_resolution_scale: tuple[float, float] = (0.5, 1.0)
    p_noise: float = 0.3
    noise_variance: tuple[float, float] = (0.0, 0.1)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> ViewAugmentationConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise NnsslJointError(f"unknown augmentation settings {unknown}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


STRONG = ViewAugmentationConfig()
"""The default: every transform with a moderate probability."""

WEAK = ViewAugmentationConfig(crop_area=(0.5, 1.0), p_rotation=0.2, p_bias_field=0.0, p_brightness=0.3,
                              p_contrast=0.3, p_gamma=0.1, p_blur=0.1, p_low_resolution=0.0, p_noise=0.1)
"""Crop, flip and mild intensity changes only (e.g. an asymmetric second view, or feature extraction)."""


def coordinate_maps(height: int, width: int) -> torch.Tensor:
    """(3, height, width): each pixel's continuous (y, x) centre (pixel k covers [k, k + 1)) and an in-image
    weight of 1. Passed through a view pipeline as its ``regression_target``, which the spatial steps
    resample like the image (bilinear, zero padding) and mirror, and which no intensity step touches, it
    tells where each pixel of the view came from; the weight falls below 1 where the view leaves the
    source (the dense term, :mod:`nnssl_joint.ssl.dense`)."""
    y = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width) + 0.5
    x = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width) + 0.5
    return torch.stack((y, x, torch.ones(height, width)))


def _maybe(transform: BasicTransform, probability: float) -> list[BasicTransform]:
    return [RandomTransform(transform, apply_probability=probability)] if probability > 0 else []


def _spatial(view_size: Sequence[int], config: ViewAugmentationConfig) -> list[BasicTransform]:
    max_angle = math.radians(config.max_rotation_deg)
    transforms: list[BasicTransform] = [RandomResizedCropTransform(
        view_size, area=config.crop_area, aspect_ratio=config.aspect_ratio, p_rotation=config.p_rotation,
        rotation=(-max_angle, max_angle))]
    if config.mirror:
        transforms.append(MirrorTransform(allowed_axes=(0, 1)))
    return transforms


def _in_plane_filters(config: ViewAugmentationConfig, synchronize_channels: bool) -> list[BasicTransform]:
    """Blur and low resolution; with synchronize_channels every channel (every slice) gets the same
    setting."""
    return [
        *_maybe(GaussianBlurTransform(blur_sigma=config.blur_sigma, synchronize_channels=synchronize_channels,
                                      synchronize_axes=False, p_per_channel=1.0), config.p_blur),
        *_maybe(SimulateLowResolutionTransform(scale=config.low_resolution_scale,
                                               synchronize_channels=synchronize_channels,
                                               synchronize_axes=True,
                                               ignore_axes=None, p_per_channel=1.0), config.p_low_resolution),
    ]


def _intensity(config: ViewAugmentationConfig) -> list[BasicTransform]:
    """Per-channel intensity changes over the whole sample (all slices of a stack alike)."""
    return [
        *_maybe(MultiplicativeBiasFieldTransform(strength=config.bias_field_strength), config.p_bias_field),
        *_maybe(MultiplicativeBrightnessTransform(multiplier_range=BGContrast(config.brightness),
                                                  synchronize_channels=False), config.p_brightness),
        *_maybe(ContrastTransform(contrast_range=BGContrast(config.contrast), preserve_range=True,
                                  synchronize_channels=False), config.p_contrast),
        *_maybe(GammaTransform(gamma=BGContrast(config.gamma), p_invert_image=0.0, synchronize_channels=False,
                               p_per_channel=1.0, p_retain_stats=1.0), config.p_gamma),
    ]


def _noise(config: ViewAugmentationConfig) -> list[BasicTransform]:
    return _maybe(GaussianNoiseTransform(noise_variance=config.noise_variance, synchronize_channels=False),
                  config.p_noise)


def _config(strong: bool, config: ViewAugmentationConfig | None) -> ViewAugmentationConfig:
    return config if config is not None else (STRONG if strong else WEAK)


def slice_view_transforms(view_size: tuple[int, int], strong: bool = True,
                          config: ViewAugmentationConfig | None = None) -> BasicTransform:
    """Pipeline turning a 2D patch (C, H, W) into one view (C, *view_size).

    ``config`` overrides ``strong`` (which picks :data:`STRONG` or :data:`WEAK`). The input tensor is left
    as it is: the spatial step returns a new tensor, and the in-place intensity steps work on that.
    """
    cfg = _config(strong, config)
    return ComposeTransforms([*_spatial(view_size, cfg), *_in_plane_filters(cfg, False), *_intensity(cfg),
                              *_noise(cfg)])


def volume_view_transforms(view_size: tuple[int, int], strong: bool = True,
                           config: ViewAugmentationConfig | None = None) -> BasicTransform:
    """Pipeline turning a stack (C, N, H, W) into one view (C, N, *view_size) that keeps slice order.

    One in-plane crop/rotation/flip, blur and low-resolution setting for all N slices and C channels (run on
    the (C * N, H, W) reshape), then per-channel intensity changes over the whole stack. No slice-axis flips,
    rotations or resampling, so slice n of two views of the same stack shows the same anatomy.
    """
    cfg = _config(strong, config)
    return ComposeTransforms([
        Convert3DTo2DTransform(),
        *_spatial(view_size, cfg),
        *_in_plane_filters(cfg, True),
        Convert2DTo3DTransform(),
        *_intensity(cfg),
        *_noise(cfg),
    ])
