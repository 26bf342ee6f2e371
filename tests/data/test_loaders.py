"""Tests of the slice / volume / joint view loaders (nnssl_joint/data/loaders.py).

The data are nnU-Net's own preprocessing of a tiny mixed dataset (see conftest.py): volumes of 5, 9, 12
(`ramp_z12`, slice n brighter by 10 * n) and 20 slices, and three 2D images, all about 40 x 40 in-plane.
"""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.nnunet_dataset import (
    infer_dataset_class,
    nnUNetDatasetBlosc2,
    nnUNetDatasetNumpy,
)

from nnssl_joint.data.augment import STRONG
from nnssl_joint.data.loaders import (
    JointLoader,
    SampleIndex,
    SliceViewsLoader,
    VolumeViewsLoader,
    case_sampling_probabilities,
    case_shape,
    dataset_summary,
    window_start_range,
)
from nnssl_joint.errors import NnsslJointError

VIEW, PATCH = (16, 16), (32, 32)


@pytest.fixture(scope="module")
def n_slices(case_slices):
    return dict(case_slices)


@pytest.fixture(scope="module")
def volumes(case_slices):
    return {k: v for k, v in case_slices.items() if v > 1}


@pytest.fixture(scope="module")
def dataset(preprocessed_folder):
    return infer_dataset_class(preprocessed_folder)(preprocessed_folder)


@pytest.fixture(scope="module")
def summary(dataset):
    return dataset_summary(dataset)


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    torch.manual_seed(0)


def _only(loader, case: str) -> np.ndarray:
    """Sampling probabilities that always draw `case` from `loader.indices`."""
    return np.array([1.0 if k == case else 0.0 for k in loader.indices])


# ----------------------------------------------------------------------------------------- summary / index
def test_dataset_summary_reads_preprocessed_shapes(dataset, summary, n_slices):
    assert isinstance(dataset, nnUNetDatasetBlosc2)
    assert summary["n_cases"] == 7 and summary["n_cases_2d"] == 3 and summary["n_cases_3d"] == 4
    assert summary["n_slices_total"] == sum(n_slices.values())
    for key, n in n_slices.items():
        case = summary["cases"][key]
        assert case["n_slices"] == n and case["is_2d"] == (n == 1) and case["n_channels"] == 1
        assert tuple(dataset.load_case(key)[0].shape) == (1, n, *case["shape_in_plane"])
    assert summary["cases"]["img_c"]["shape_in_plane"] == [48, 36]
    assert summary["median_shape_in_plane"] == [40.0, 40.0]
    assert summary["median_shape_3d"] == [10.5, 40.0, 40.0]


def test_case_shape_of_numpy_datasets(tmp_path):
    data = np.zeros((2, 3, 10, 12), dtype=np.float32)
    nnUNetDatasetNumpy.save_case(data, np.zeros((1, 3, 10, 12), np.int16), {}, str(tmp_path / "packed"))
    np.save(tmp_path / "unpacked.npy", data)
    dataset = nnUNetDatasetNumpy(str(tmp_path), identifiers=["packed", "unpacked"])
    assert case_shape(dataset, "packed") == case_shape(dataset, "unpacked") == (2, 3, 10, 12)


def test_sampling_probabilities(dataset, n_slices):
    counts = np.array([n_slices[k] for k in dataset.identifiers])
    is_2d = counts == 1
    proportional = case_sampling_probabilities(dataset)
    assert np.isclose(proportional.sum(), 1) and np.allclose(proportional, counts / counts.sum())
    for fraction in (0.0, 0.01, 0.5, 0.9):
        p = case_sampling_probabilities(dataset.identifiers, {k: n_slices[k] for k in n_slices}, fraction)
        assert np.isclose(p.sum(), 1) and np.all(p > 0)
        assert p[is_2d].sum() >= fraction - 1e-12
        volumes = p[~is_2d] / counts[~is_2d]
        assert np.allclose(volumes, volumes[0])  # still uniform over volume slices
    assert np.allclose(case_sampling_probabilities(dataset, None, 0.01), proportional)  # already above 1 %
    assert np.isclose(case_sampling_probabilities(dataset, None, 0.5)[is_2d].sum(), 0.5)
    with pytest.raises(NnsslJointError, match=r"\[0, 1\)"):
        case_sampling_probabilities(dataset, None, 1.0)


# ------------------------------------------------------------------------------------------- slice loader
def test_slice_loader_batch_layout(dataset, n_slices):
    loader = SliceViewsLoader(dataset, 6, VIEW, PATCH, n_small_views=3, small_view_size=(8, 8))
    batch = next(loader)
    assert set(batch) == {"global_views", "small_views", "keys", "slice_index"}
    assert batch["global_views"].shape == (6, 2, 1, 16, 16) and batch["global_views"].dtype == torch.float32
    assert batch["small_views"].shape == (6, 3, 1, 8, 8) and batch["small_views"].dtype == torch.float32
    assert batch["slice_index"].shape == (6,) and batch["slice_index"].dtype == torch.int64
    assert len(batch["keys"]) == 6 and all(isinstance(k, str) for k in batch["keys"])
    for key, s in zip(batch["keys"], batch["slice_index"].tolist()):
        assert 0 <= s < n_slices[key]
    assert torch.isfinite(batch["global_views"]).all()
    assert next(SliceViewsLoader(dataset, 2, VIEW, PATCH))["small_views"] is None


def test_slice_loader_uses_every_slice_and_reports_it(dataset):
    loader = SliceViewsLoader(dataset, 32, VIEW, PATCH)
    loader.sampling_probabilities = _only(loader, "ramp_z12")
    slices, means = [], []
    for _ in range(3):
        batch = next(loader)
        slices += batch["slice_index"].tolist()
        means += batch["global_views"].mean(dim=(1, 2, 3, 4)).tolist()
    assert set(slices) == set(range(12))
    # the ramp's slice n is 10 * n brighter: the reported index must track the content
    assert np.corrcoef(slices, means)[0, 1] > 0.8


def test_views_of_an_item_differ_but_are_correlated(dataset):
    loader = SliceViewsLoader(dataset, 48, VIEW, PATCH,
                              sampling_probabilities=case_sampling_probabilities(dataset))
    views = next(loader)["global_views"]
    assert not torch.allclose(views[:, 0], views[:, 1])
    flat = views[:, 0].flatten(1)
    distances = torch.cdist(flat, flat) + torch.eye(len(flat)) * 1e9
    assert distances.min() > 1e-3  # no two items of the batch are the same picture
    means = views.mean(dim=(2, 3, 4)).numpy()
    same_item = np.corrcoef(means[:, 0], means[:, 1])[0, 1]
    other_item = np.corrcoef(means[:, 0], np.roll(means[:, 1], 1))[0, 1]
    assert same_item > 0.6 and same_item > other_item + 0.3, (same_item, other_item)


def test_images_smaller_than_the_patch_are_cropped_not_padded(dataset, summary):
    no_rotation = replace(STRONG, p_rotation=0.0)  # rotated corners may legitimately leave the image
    slices = SliceViewsLoader(dataset, 16, VIEW, (64, 64), config=no_rotation)  # every image is <= 48 px
    assert torch.all(next(slices)["global_views"] != 0)
    volumes = VolumeViewsLoader(dataset, 4, 8, VIEW, (64, 64), config=no_rotation, summary=summary)
    batch = next(volumes)
    views = batch["views"].permute(0, 3, 1, 2, 4, 5)[batch["valid"]]  # (valid slices, views, C, h, w)
    assert torch.all(views != 0)


# ------------------------------------------------------------------------------------------ volume loader
def test_volume_loader_never_draws_2d_images(dataset, summary, volumes):
    loader = VolumeViewsLoader(dataset, 4, 8, VIEW, PATCH, summary=summary)
    assert sorted(loader.indices) == sorted(volumes)
    seen = set()
    for _ in range(5):
        batch = next(loader)
        seen.update(batch["keys"])
        assert batch["views"].shape == (4, 2, 1, 8, 16, 16) and batch["views"].dtype == torch.float32
        assert batch["valid"].dtype == torch.bool and batch["slice_start"].dtype == torch.int64
    assert seen <= set(volumes)


@pytest.mark.parametrize("case, n", [("vol_z05", 16), ("vol_z09", 16), ("ramp_z12", 16), ("vol_z20", 16),
                                     ("vol_z05", 5), ("vol_z20", 4)])
def test_volume_windows_are_padded_exactly_where_slices_are_missing(dataset, summary, volumes, case, n):
    loader = VolumeViewsLoader(dataset, 2, n, VIEW, PATCH, summary=summary)
    loader.sampling_probabilities = _only(loader, case)
    batch = next(loader)
    z = volumes[case]
    for b in range(2):
        start = int(batch["slice_start"][b])
        expected = torch.tensor([0 <= start + i < z for i in range(n)])
        assert torch.equal(batch["valid"][b], expected)
        assert int(expected.sum()) == min(z, n)  # short volumes are padded, never cut or dropped
        if z >= n:
            assert 0 <= start <= z - n
        padded = batch["views"][b][:, :, ~expected]
        assert torch.all(padded == 0)
        assert torch.all(batch["views"][b][:, :, expected].flatten(2).std(dim=2) > 0)


@pytest.mark.parametrize("n", [8, 16])
def test_volume_views_keep_slice_correspondence(dataset, summary, n):
    loader = VolumeViewsLoader(dataset, 3, n, VIEW, PATCH, summary=summary)
    loader.sampling_probabilities = _only(loader, "ramp_z12")
    for _ in range(2):
        batch = next(loader)
        for b in range(3):
            valid = batch["valid"][b]
            for v in range(2):
                means = batch["views"][b, v, 0, valid].mean(dim=(1, 2))
                assert torch.all(means[1:] > means[:-1]), means


def test_volume_loader_refuses_a_2d_only_dataset(preprocessed_folder, n_slices):
    images_only = nnUNetDatasetBlosc2(preprocessed_folder,
                                      identifiers=sorted(k for k, v in n_slices.items() if v == 1))
    with pytest.raises(NnsslJointError, match="no volumes"):
        VolumeViewsLoader(images_only, 2, 4, VIEW, PATCH)


# ------------------------------------------------------------------------------------------- joint loader
def _joint(dataset, summary, with_volumes: bool = True) -> JointLoader:
    slices = SliceViewsLoader(dataset, 4, VIEW, PATCH, n_small_views=2, small_view_size=(8, 8),
                              sampling_probabilities=case_sampling_probabilities(dataset))
    volumes = VolumeViewsLoader(dataset, 2, 8, VIEW, PATCH, summary=summary) if with_volumes else None
    return JointLoader(slices, volumes)


def _assert_joint_batch(batch: dict, with_volumes: bool = True) -> None:
    assert set(batch) == {"slices", "volumes"}
    assert batch["slices"]["global_views"].shape == (4, 2, 1, 16, 16)
    assert batch["slices"]["small_views"].shape == (4, 2, 1, 8, 8)
    if with_volumes:
        assert batch["volumes"]["views"].shape == (2, 2, 1, 8, 16, 16)
        assert batch["volumes"]["valid"].shape == (2, 8)
    else:
        assert batch["volumes"] is None


@pytest.mark.parametrize("with_volumes", [True, False])
def test_joint_loader_single_threaded(dataset, summary, with_volumes):
    augmenter = SingleThreadedAugmenter(_joint(dataset, summary, with_volumes), None)
    _assert_joint_batch(next(augmenter), with_volumes)


def test_joint_loader_single_threaded_is_deterministic(dataset, summary):
    def draw() -> dict:
        np.random.seed(123)
        torch.manual_seed(123)
        augmenter = SingleThreadedAugmenter(_joint(dataset, summary), None)
        return [next(augmenter) for _ in range(2)]

    first, second = draw(), draw()
    for a, b in zip(first, second):
        assert a["slices"]["keys"] == b["slices"]["keys"] and a["volumes"]["keys"] == b["volumes"]["keys"]
        for part, key in [("slices", "global_views"), ("slices", "small_views"), ("slices", "slice_index"),
                          ("volumes", "views"), ("volumes", "valid"), ("volumes", "slice_start")]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert not torch.equal(first[0]["slices"]["global_views"], first[1]["slices"]["global_views"])


def test_joint_loader_is_picklable(dataset, summary):
    loader = pickle.loads(pickle.dumps(_joint(dataset, summary)))  # what a spawned worker receives
    _assert_joint_batch(next(loader))


@pytest.mark.timeout(120)
def test_joint_loader_in_nnunet_multithreaded_augmenter(dataset, summary):
    augmenter = NonDetMultiThreadedAugmenter(_joint(dataset, summary), None, num_processes=2, num_cached=2,
                                             seeds=None, pin_memory=False, wait_time=0.02)
    try:
        batches = [next(augmenter) for _ in range(4)]
    finally:
        augmenter._finish()
    for batch in batches:
        _assert_joint_batch(batch)
    views = [b["slices"]["global_views"] for b in batches]
    assert not all(torch.equal(views[0], v) for v in views[1:])


# ---------------------------------------------------------------- global sample indices (DeepCluster)
@pytest.mark.parametrize("n", [1, 4, 5, 8, 16])
def test_window_start_range_is_what_the_volume_loader_draws(dataset, summary, volumes, n):
    loader = VolumeViewsLoader(dataset, 16, n, VIEW, PATCH, summary=summary)
    for case, z in volumes.items():
        loader.sampling_probabilities = _only(loader, case)
        lowest, highest = window_start_range(z, n)
        drawn = {int(s) for _ in range(4) for s in next(loader)["slice_start"]}
        assert drawn <= set(range(lowest, highest + 1)), (case, drawn, lowest, highest)
        if highest - lowest < 16:  # few positions: 64 draws see every one
            assert drawn == set(range(lowest, highest + 1)), (case, drawn)


def test_sample_index_is_dense_unique_and_independent_of_case_order(n_slices):
    index = SampleIndex(n_slices, 8)
    shuffled = SampleIndex(dict(reversed(list(n_slices.items()))), 8)
    assert index.to_dict() == shuffled.to_dict() and index.cases == sorted(n_slices)
    slice_ids = [index.slice_index(k, s) for k, z in n_slices.items() for s in range(z)]
    assert sorted(slice_ids) == list(range(sum(n_slices.values()))) == list(range(index.num_slices))
    window_ids = [index.window_index(k, start) for k, z in n_slices.items() if z > 1
                  for start in range(window_start_range(z, 8)[0], window_start_range(z, 8)[1] + 1)]
    assert sorted(window_ids) == list(range(index.num_windows))
    assert [shuffled.slice_index(k, 0) for k in n_slices] == [index.slice_index(k, 0) for k in n_slices]
    assert index.slice_indices("vol_z05", -2, 8).tolist() == [-1, -1] + [index.slice_index("vol_z05", s)
                                                                          for s in range(5)] + [-1]
    assert SampleIndex.from_dict(index.to_dict()).to_dict() == index.to_dict()
    with pytest.raises(NnsslJointError, match="not in the SampleIndex"):
        index.slice_index("unknown", 0)
    with pytest.raises(ValueError, match="items"):
        index.slice_index("img_a", 1)  # a 2D image has one slice


def test_loaders_emit_global_indices_that_match_keys_and_slices(dataset, summary, n_slices):
    index = SampleIndex.from_summary(summary, 8)
    slices = SliceViewsLoader(dataset, 16, VIEW, PATCH, sample_index=index)
    batch = next(slices)
    assert batch["index"].dtype == torch.int64 and batch["index"].shape == (16,)
    assert batch["index"].tolist() == [index.slice_index(k, int(s))
                                       for k, s in zip(batch["keys"], batch["slice_index"])]
    volume_loader = VolumeViewsLoader(dataset, 6, 8, VIEW, PATCH, summary=summary, sample_index=index)
    batch = next(volume_loader)
    assert batch["index"].shape == (6,) and batch["slice_indices"].shape == (6, 8)
    for b, key in enumerate(batch["keys"]):
        start = int(batch["slice_start"][b])
        assert int(batch["index"][b]) == index.window_index(key, start)
        for position in range(8):
            expected = index.slice_index(key, start + position) if batch["valid"][b, position] else -1
            assert int(batch["slice_indices"][b, position]) == expected
    with pytest.raises(NnsslJointError, match="windows of 8 slices"):
        VolumeViewsLoader(dataset, 2, 4, VIEW, PATCH, summary=summary, sample_index=index)


def test_indices_draw_no_random_numbers(dataset, summary):
    """The batches are the same with and without a sample index (the default SwAV runs do not change)."""
    index = SampleIndex.from_summary(summary, 8)
    batches = []
    for sample_index in (None, index):
        np.random.seed(3)
        torch.manual_seed(3)
        joint = JointLoader(SliceViewsLoader(dataset, 4, VIEW, PATCH, sample_index=sample_index),
                            VolumeViewsLoader(dataset, 2, 8, VIEW, PATCH, summary=summary,
                                              sample_index=sample_index))
        batches.append(joint.generate_train_batch())
    for part, key in (("slices", "global_views"), ("volumes", "views")):
        assert torch.equal(batches[0][part][key], batches[1][part][key])
    assert "index" not in batches[0]["slices"] and "index" in batches[1]["slices"]


def test_coordinate_maps_draw_no_random_numbers_and_match_the_views(dataset, summary):
    """``coordinates=True`` (the dense term) adds each view's coordinate maps and leaves the views alone."""
    batches = []
    for coordinates in (False, True):
        np.random.seed(5)
        torch.manual_seed(5)
        joint = JointLoader(SliceViewsLoader(dataset, 4, VIEW, PATCH, n_small_views=1, small_view_size=(8, 8),
                                             coordinates=coordinates),
                            VolumeViewsLoader(dataset, 2, 8, VIEW, PATCH, summary=summary,
                                              coordinates=coordinates))
        batches.append(joint.generate_train_batch())
    for part, key in (("slices", "global_views"), ("slices", "small_views"), ("volumes", "views")):
        assert torch.equal(batches[0][part][key], batches[1][part][key])
    assert "global_coords" not in batches[0]["slices"] and "coords" not in batches[0]["volumes"]
    slices, volumes = batches[1]["slices"], batches[1]["volumes"]
    assert slices["global_coords"].shape == (4, 2, 3, *VIEW)
    assert volumes["coords"].shape == (2, 2, 3, *VIEW)
    for coords in (slices["global_coords"], volumes["coords"]):
        weight = coords[:, :, 2]
        assert float(weight.min()) >= -1e-6 and float(weight.max()) <= 1 + 1e-6
        inside = weight > 0.999
        assert inside.float().mean() > 0.5
        # positions lie inside the initial patch (continuous pixel coordinates)
        for axis, size in ((0, PATCH[0]), (1, PATCH[1])):
            values = coords[:, :, axis][inside]
            assert float(values.min()) >= 0 and float(values.max()) <= size
        # the two views of an item are different crops
        assert not torch.allclose(coords[:, 0, :2], coords[:, 1, :2])
