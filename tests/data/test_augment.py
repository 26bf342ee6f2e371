"""Tests of the view augmentations (nnssl_joint/data/augment.py)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from nnssl_joint.data.augment import (
    STRONG,
    MultiplicativeBiasFieldTransform,
    RandomResizedCropTransform,
    ViewAugmentationConfig,
    coordinate_maps,
    slice_view_transforms,
    volume_view_transforms,
)
from nnssl_joint.errors import NnsslJointError

# spatial part only, plus the linear in-plane filters: every output is a linear function of its input
LINEAR_ONLY = replace(STRONG, p_bias_field=0.0, p_brightness=0.0, p_contrast=0.0, p_gamma=0.0, p_noise=0.0,
                      p_rotation=1.0, p_blur=0.5, p_low_resolution=0.5)


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    torch.manual_seed(0)


def test_full_area_crop_without_rotation_is_identity():
    transform = RandomResizedCropTransform((32, 32), area=(1.0, 1.0), aspect_ratio=(1.0, 1.0))
    image = torch.randn(2, 32, 32)
    assert torch.equal(transform(image=image.clone())["image"], image)


def test_crop_box_stays_inside_the_input():
    transform = RandomResizedCropTransform((16, 16), area=(0.1, 1.0), aspect_ratio=(0.5, 2.0))
    image = torch.ones(1, 40, 30)
    for _ in range(20):
        out = transform(image=image.clone())["image"]
        assert out.shape == (1, 16, 16)
        assert torch.allclose(out, torch.ones_like(out))  # no zero padding reached


def test_rotated_crop_pads_segmentation_with_minus_one():
    transform = RandomResizedCropTransform((32, 32), area=(1.0, 1.0), aspect_ratio=(1.0, 1.0), p_rotation=1.0,
                                           rotation=math.pi / 4)
    out = transform(image=torch.ones(1, 32, 32), segmentation=torch.zeros(1, 32, 32, dtype=torch.int16))
    seg = out["segmentation"]
    assert seg.dtype == torch.int16 and set(seg.unique().tolist()) == {-1, 0}
    assert seg[0, 0, 0] == -1 and seg[0, 16, 16] == 0  # corners left the rotated input, the centre did not


def test_bias_field_is_smooth_positive_and_shared_across_slices():
    transform = MultiplicativeBiasFieldTransform(strength=(0.3, 0.3))
    image = torch.rand(2, 5, 24, 24) + 1.0
    image[:, :, 0, 0] = 0.5  # a known channel minimum
    out = transform(image=image.clone())["image"]
    ratio = (out - 0.5) / (image - 0.5).clamp_min(1e-6)
    ratio = ratio[..., 1:, 1:]
    assert torch.allclose(out[:, :, 0, 0], torch.full((2, 5), 0.5))
    assert ratio.min() > math.exp(-0.31) and ratio.max() < math.exp(0.31)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-4)  # same field on every slice
    assert not torch.allclose(ratio[0], ratio[1])  # channels draw their own field
    assert (ratio[..., 1:, :] - ratio[..., :-1, :]).abs().max() < 0.1  # smooth


def test_slice_views_shape_dtype_and_input_untouched():
    transform = slice_view_transforms((24, 20))
    image = torch.randn(2, 48, 40)
    original = image.clone()
    views = [transform(image=image)["image"] for _ in range(2)]
    assert all(v.shape == (2, 24, 20) and v.dtype == torch.float32 for v in views)
    assert torch.equal(image, original)
    assert not torch.allclose(views[0], views[1])


def test_volume_views_apply_one_spatial_transform_to_all_slices_and_channels():
    transform = volume_view_transforms((16, 16), config=LINEAR_ONLY)
    texture = torch.randn(32, 32)
    scale = torch.arange(1, 7, dtype=torch.float32)
    stack = texture * scale[:, None, None]  # slice n = (n + 1) * texture
    image = torch.stack((stack, 2 * stack))  # channel 1 = 2 * channel 0
    for _ in range(5):
        out = transform(image=image.clone())["image"]
        assert out.shape == (2, 6, 16, 16)
        expected = out[0, :1] * scale[:, None, None]
        assert torch.allclose(out[0], expected, atol=1e-4)
        assert torch.allclose(out[1], 2 * out[0], atol=1e-4)


def test_volume_views_keep_slice_order_under_full_augmentation():
    transform = volume_view_transforms((24, 24))
    n = 10
    texture = torch.randn(n, 40, 40) * 0.3
    stack = (texture + 0.2 * torch.arange(n, dtype=torch.float32)[:, None, None])[None]
    stack = (stack - stack.mean()) / stack.std()  # z-scored like nnU-Net's preprocessing
    for _ in range(10):
        means = transform(image=stack.clone())["image"][0].mean(dim=(1, 2))
        assert torch.all(means[1:] > means[:-1]), means


def test_volume_views_of_a_one_slice_window():
    out = volume_view_transforms((8, 8))(image=torch.randn(1, 1, 16, 16))["image"]
    assert out.shape == (1, 1, 8, 8)


def test_config_round_trip_and_errors():
    config = replace(STRONG, crop_area=(0.3, 0.9), p_noise=0.0)
    assert ViewAugmentationConfig.from_dict(config.to_dict()) == config
    with pytest.raises(NnsslJointError, match="unknown augmentation settings"):
        ViewAugmentationConfig.from_dict({"p_flip": 0.5})
    with pytest.raises(NnsslJointError, match="area"):
        RandomResizedCropTransform((8, 8), area=(0.5, 1.5))
    with pytest.raises(NnsslJointError, match=r"\(C, H, W\)"):
        RandomResizedCropTransform((8, 8))(image=torch.zeros(1, 4, 16, 16))


GEOMETRY_ONLY = replace(STRONG, p_bias_field=0.0, p_brightness=0.0, p_contrast=0.0, p_gamma=0.0, p_noise=0.0,
                        p_blur=0.0, p_low_resolution=0.0, p_rotation=1.0)


def _smooth(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.sin(y / 7) + torch.cos(x / 5) + 0.01 * y


@pytest.mark.parametrize("volume", [False, True])
def test_coordinate_maps_say_where_each_view_pixel_came_from(volume):
    """A view of a smooth image f(y, x) must equal f at the view's coordinate maps (rotated crops, flips);
    the maps of another draw must not fit."""
    height, width = 96, 80
    yy, xx = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    image = _smooth(yy, xx)[None]
    maps = coordinate_maps(height, width)
    if volume:  # 4 slices, slice k brighter by k: one in-plane map for all of them
        image = torch.stack([image[0] + k for k in range(4)])[None]
        maps = maps[:, None]
        transform = volume_view_transforms((48, 48), config=GEOMETRY_ONLY)
    else:
        transform = slice_view_transforms((48, 48), config=GEOMETRY_ONLY)
    results = []
    for _ in range(6):
        out = transform(image=image.clone(), regression_target=maps.clone())
        coords = out["regression_target"][:, 0] if volume else out["regression_target"]
        view = out["image"][0] if volume else out["image"]
        results.append((view, coords))
        inside = coords[2] > 0.999
        assert inside.float().mean() > 0.5
        for k in range(view.shape[0]):
            error = (_smooth(coords[0], coords[1]) + (k if volume else 0) - view[k])[inside].abs().max()
            assert float(error) < 0.02  # bilinear interpolation of a smooth function
    (view_a, _), (_, coords_b) = results[0], results[1]
    inside = coords_b[2] > 0.999
    assert float((_smooth(coords_b[0], coords_b[1]) - view_a[0])[inside].abs().max()) > 0.5
