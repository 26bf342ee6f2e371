"""Data loaders of augmented slice views and volume views over nnU-Net preprocessed data (METHOD.md, "Data").

The pretraining dataset is nnU-Net's preprocessed 2D-type configuration: every case is (C, Z, Y, X), a 2D
image has Z == 1, a volume keeps all its slices, and the segmentation is a dummy. The loaders subclass
:class:`nnUNetDataLoader` and reuse its random patch placement (``get_bbox``), cropping with padding
(``crop_and_pad_nd``) and case loading, so they run inside nnU-Net's ``NonDetMultiThreadedAugmenter`` or
``SingleThreadedAugmenter`` with ``transform=None`` (augmentation happens in the loader, per view).

Batch layouts (float32 unless noted):

- :class:`SliceViewsLoader`: ``{'global_views': (B, 2, C, h, w), 'small_views': (B, M, C, hs, ws) or None,
  'keys': list of B case ids, 'slice_index': (B,) int64}``. Item b is slice ``slice_index[b]`` of case
  ``keys[b]`` (0 for 2D images).
- :class:`VolumeViewsLoader`: ``{'views': (B, 2, C, N, h, w), 'valid': (B, N) bool, 'keys': list of B case
  ids, 'slice_start': (B,) int64}``. Window position n holds slice ``slice_start[b] + n``; it is padding
  (all zero, ``valid`` False) where that slice does not exist.
- :class:`JointLoader`: ``{'slices': <slice batch>, 'volumes': <volume batch or None>}``.

With ``coordinates=True`` the slice batch also holds ``'global_coords'`` (B, 2, 3, h, w) and the volume
batch ``'coords'`` (B, 2, 3, h, w): per view, each pixel's (y, x) position in the item's initial patch (the
window's, the same for all its slices) and an in-image weight (:func:`~nnssl_joint.data.augment.
coordinate_maps`), for the dense term. They draw no random numbers: the views are the same with or
without them.

Given a :class:`SampleIndex` (``sample_index=``), the batches also carry global sample indices for
DeepCluster-v2's memory banks: the slice batch ``'index'`` (B,) int64, the global index of (case, slice);
the volume batch ``'index'`` (B,) int64, the global index of (case, window start), and
``'slice_indices'`` (B, N) int64, the global (case, slice) index of every window position (-1 at padding),
and ``'case'`` (B,) int64, the window's case number (the contrastive volume term's same-case exclusion).
They draw no random numbers: the batches are otherwise the same with or without them.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgenerators.dataloading.data_loader import DataLoader
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import (
    nnUNetBaseDataset,
    nnUNetDatasetBlosc2,
    nnUNetDatasetNumpy,
)
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from threadpoolctl import threadpool_limits

from nnssl_joint.data.augment import (
    STRONG,
    ViewAugmentationConfig,
    coordinate_maps,
    slice_view_transforms,
    volume_view_transforms,
)
from nnssl_joint.errors import NnsslJointError
from nnssl_joint.ssl.deepcluster import GlobalIndex

__all__ = [
    "JointLoader",
    "SampleIndex",
    "SliceViewsLoader",
    "VolumeViewsLoader",
    "case_sampling_probabilities",
    "case_shape",
    "dataset_summary",
    "window_start_range",
]

SMALL_VIEW_CROP_AREA = (0.05, 0.25)
"""Default area fraction of the initial patch covered by a small (multi-crop) view, as in SwAV."""


# ----------------------------------------------------------------------------------------------- shapes
def case_shape(dataset: nnUNetBaseDataset, identifier: str) -> tuple[int, ...]:
    """Shape (C, Z, Y, X) of a preprocessed case, read from the file header without decompressing the data.

    nnU-Net's properties pkl only knows the shape before resampling, so the array itself is asked: blosc2
    opens lazily; .npy is memory-mapped; inside a .npz the header of data.npy is read from the zip member.
    """
    folder = dataset.source_folder
    if isinstance(dataset, nnUNetDatasetBlosc2):
        import blosc2

        return tuple(int(i) for i in blosc2.open(os.path.join(folder, identifier + ".b2nd"), mode="r").shape)
    if isinstance(dataset, nnUNetDatasetNumpy):
        npy = os.path.join(folder, identifier + ".npy")
        if os.path.isfile(npy):
            return tuple(int(i) for i in np.load(npy, mmap_mode="r").shape)
        with zipfile.ZipFile(os.path.join(folder, identifier + ".npz")) as archive, \
                archive.open("data.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(f)
        return tuple(int(i) for i in shape)
    return tuple(int(i) for i in dataset.load_case(identifier)[0].shape)


def dataset_summary(dataset: nnUNetBaseDataset) -> dict:
    """Shapes of all cases of a preprocessed dataset, JSON-serialisable, for the trainer's self-configuration.

    Returns ``{'cases': {id: {'n_slices', 'shape_in_plane': [Y, X], 'n_channels', 'is_2d'}},
    'n_cases', 'n_cases_2d', 'n_cases_3d', 'n_slices_total', 'n_slices_3d', 'n_channels',
    'median_shape_in_plane': [Y, X] (over all cases), 'median_shape_3d': [Z, Y, X] or None (volumes only)}``.
    A case is 2D when Z == 1.
    """
    cases = {}
    for identifier in dataset.identifiers:
        shape = case_shape(dataset, identifier)
        if len(shape) != 4:
            raise NnsslJointError(f"case {identifier} in {dataset.source_folder} has shape {shape}; expected "
                                  f"(C, Z, Y, X) from a 2d-type nnU-Net configuration")
        cases[identifier] = {"n_slices": shape[1], "shape_in_plane": list(shape[2:]), "n_channels": shape[0],
                             "is_2d": shape[1] == 1}
    if not cases:
        raise NnsslJointError(f"no preprocessed cases in {dataset.source_folder}")
    channels = {c["n_channels"] for c in cases.values()}
    if len(channels) != 1:
        raise NnsslJointError(f"cases of {dataset.source_folder} differ in channel count {sorted(channels)}")
    volumes = [c for c in cases.values() if not c["is_2d"]]
    in_plane = np.array([c["shape_in_plane"] for c in cases.values()])
    median_3d = (np.median([[c["n_slices"], *c["shape_in_plane"]] for c in volumes], axis=0).tolist()
                 if volumes else None)
    return {
        "cases": cases,
        "n_cases": len(cases),
        "n_cases_2d": len(cases) - len(volumes),
        "n_cases_3d": len(volumes),
        "n_slices_total": int(sum(c["n_slices"] for c in cases.values())),
        "n_slices_3d": int(sum(c["n_slices"] for c in volumes)),
        "n_channels": channels.pop(),
        "median_shape_in_plane": np.median(in_plane, axis=0).tolist(),
        "median_shape_3d": median_3d,
    }


def _slices_per_case(summary: Mapping) -> dict[str, int]:
    return {k: v["n_slices"] for k, v in summary["cases"].items()}


# ------------------------------------------------------------------------------------- sample indices
def window_start_range(case_slices: int, n_slices: int) -> tuple[int, int]:
    """Lowest and highest first slice of an ``n_slices`` window that :class:`VolumeViewsLoader` draws in a
    case of ``case_slices`` slices: nnU-Net's ``get_bbox`` along the slice axis (patch = final patch, so the
    only padding is that of a case shorter than the window, split over both ends)."""
    if case_slices < 1 or n_slices < 1:
        raise NnsslJointError(f"need case_slices >= 1 and n_slices >= 1, got {case_slices} and {n_slices}")
    need = max(0, n_slices - case_slices)
    return (-need) // 2, case_slices + need // 2 + need % 2 - n_slices


class SampleIndex:
    """Global sample indices of one preprocessed dataset, the keys of DeepCluster-v2's memory banks.

    ``slices``: a :class:`~nnssl_joint.ssl.deepcluster.GlobalIndex` over (case, slice), a 2D image being a
    case of one slice; both the 2D items of :class:`SliceViewsLoader` and the valid slices of the volume
    windows use it, so a slice has one entry however it was drawn. ``windows``: a ``GlobalIndex`` over
    (case, window start) for the windows of ``n_slices`` slices that :class:`VolumeViewsLoader` can draw
    (:func:`window_start_range`; cases of one slice have none). Cases are numbered in sorted identifier
    order, so the indices depend only on the dataset's shapes and N: the same on every DDP rank and in
    every resumed run. :meth:`to_dict` records it (the trainer refuses to resume across a change).
    """

    def __init__(self, slices_per_case: Mapping[str, int], n_slices: int):
        if n_slices < 1:
            raise NnsslJointError(f"n_slices must be >= 1, got {n_slices}")
        self.n_slices = int(n_slices)
        self.slices_per_case = {str(k): int(slices_per_case[k]) for k in sorted(slices_per_case)}
        if not self.slices_per_case or min(self.slices_per_case.values()) < 1:
            raise NnsslJointError("SampleIndex needs at least one case and at least one slice per case")
        self.cases = list(self.slices_per_case)
        self.case_number = {k: i for i, k in enumerate(self.cases)}
        self._window_lowest: dict[str, int] = {}
        windows = []
        for key, z in self.slices_per_case.items():
            lowest, highest = window_start_range(z, self.n_slices)
            self._window_lowest[key] = lowest
            windows.append(highest - lowest + 1 if z >= 2 else 0)
        self.slices = GlobalIndex()
        self.slices.register("slices", list(self.slices_per_case.values()))
        self.windows = GlobalIndex()
        self.windows.register("windows", windows)

    @classmethod
    def from_summary(cls, summary: Mapping, n_slices: int) -> SampleIndex:
        """From :func:`dataset_summary`'s output (all cases of the preprocessed folder)."""
        return cls(_slices_per_case(summary), n_slices)

    @property
    def num_slices(self) -> int:
        """Size of the slice memory bank."""
        return self.slices.size

    @property
    def num_windows(self) -> int:
        """Size of the window memory bank."""
        return self.windows.size

    def _case(self, key: str) -> int:
        if key not in self.case_number:
            raise NnsslJointError(f"case {key!r} is not in the SampleIndex (built from the "
                                  f"{len(self.cases)} cases of the dataset summary)")
        return self.case_number[key]

    def slice_index(self, key: str, slice_number: int) -> int:
        """Global index of slice ``slice_number`` of case ``key``."""
        return self.slices.index("slices", self._case(key), int(slice_number))

    def slice_indices(self, key: str, first_slice: int, count: int) -> torch.Tensor:
        """(count,) global indices of slices ``first_slice ..`` of case ``key``; -1 where no slice exists."""
        z = self.slices_per_case[self.cases[self._case(key)]]
        numbers = torch.arange(int(first_slice), int(first_slice) + int(count))
        inside = (numbers >= 0) & (numbers < z)
        out = torch.full((int(count),), -1, dtype=torch.int64)
        out[inside] = self.slices.indices("slices", torch.full((int(inside.sum()),), self._case(key)),
                                          numbers[inside])
        return out

    def window_index(self, key: str, start: int) -> int:
        """Global index of the window of case ``key`` whose first position is slice ``start`` (may be < 0
        for a case shorter than N)."""
        case = self._case(key)
        return self.windows.index("windows", case, int(start) - self._window_lowest[key])

    def to_dict(self) -> dict:
        return {"n_slices": self.n_slices, "slices_per_case": dict(self.slices_per_case)}

    @classmethod
    def from_dict(cls, data: Mapping) -> SampleIndex:
        return cls(data["slices_per_case"], data["n_slices"])


# --------------------------------------------------------------------------------------------- sampling
def case_sampling_probabilities(dataset: nnUNetBaseDataset | Sequence[str],
                                slices_per_case: Mapping[str, int] | None = None,
                                weight_2d_fraction: float | None = None) -> np.ndarray:
    """Probabilities of drawing each case (in ``dataset.identifiers`` order) for :class:`SliceViewsLoader`.

    The slice loader draws a case with these probabilities and then one of its slices uniformly, so a slice
    of a Z-slice case is drawn with probability p_case / Z. With ``weight_2d_fraction=None`` p_case is
    proportional to Z: every volume slice and every 2D image is equally likely (a 2D image counts as one
    slice). With a fraction f in [0, 1), the 2D images together get at least mass f (shared equally among
    them) and the volumes the rest, still proportional to their slice counts, so a dataset dominated by
    volume slices does not drown its 2D images; when the proportional mass already exceeds f it is kept.
    Every case keeps a positive probability, so every slice is used. ``slices_per_case`` defaults to the
    shapes on disk (:func:`dataset_summary`).
    """
    identifiers = list(dataset.identifiers if isinstance(dataset, nnUNetBaseDataset) else dataset)
    if slices_per_case is None:
        if not isinstance(dataset, nnUNetBaseDataset):
            raise NnsslJointError("slices_per_case is needed when only case identifiers are given")
        slices_per_case = _slices_per_case(dataset_summary(dataset))
    missing = [i for i in identifiers if i not in slices_per_case]
    if missing:
        raise NnsslJointError(f"slices_per_case lacks cases "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    counts = np.array([int(slices_per_case[i]) for i in identifiers], dtype=np.float64)
    if len(counts) == 0 or np.any(counts < 1):
        raise NnsslJointError("every case needs at least one slice, and there must be at least one case")
    probabilities = counts / counts.sum()
    if weight_2d_fraction is None:
        return probabilities
    if not 0.0 <= weight_2d_fraction < 1.0:
        raise NnsslJointError(f"weight_2d_fraction must be in [0, 1) (or None for proportional sampling), "
                              f"got {weight_2d_fraction}; 1 would never draw a volume slice")
    is_2d = counts == 1
    if not is_2d.any() or is_2d.all() or probabilities[is_2d].sum() >= weight_2d_fraction:
        return probabilities
    probabilities[is_2d] = weight_2d_fraction / is_2d.sum()
    probabilities[~is_2d] = (1.0 - weight_2d_fraction) * counts[~is_2d] / counts[~is_2d].sum()
    return probabilities


# ------------------------------------------------------------------------------------------------ loaders
def _dummy_label_manager() -> LabelManager:
    # nnUNetDataLoader only reads the label list and the ignore flag; SSL data have no labels
    return LabelManager({"background": 0}, regions_class_order=None)


def _pair(value: Sequence[int], name: str) -> tuple[int, int]:
    if len(value) != 2 or any(int(v) < 1 for v in value):
        raise NnsslJointError(f"{name} must be two positive ints (h, w), got {tuple(value)}")
    return int(value[0]), int(value[1])


def _bbox_in_plane_inside(lbs: Sequence[int], ubs: Sequence[int], shape: Sequence[int]) -> list[list[int]]:
    """nnU-Net's (Z, Y, X) bbox with the in-plane extent cut to the image (C, Z, Y, X); Z keeps its padding.

    An image smaller than the initial patch is then cropped whole instead of zero-padded, and the random
    resized crop resamples its actual content onto the view instead of views of mostly padding.
    """
    bbox = [[int(lbs[0]), int(ubs[0])]]
    for lb, ub, size in zip(lbs[1:], ubs[1:], shape[2:]):
        bbox.append([max(0, int(lb)), min(int(size), int(ub))])
    return bbox


def _initial_patch(patch_size: Sequence[int] | None, view_size: tuple[int, int]) -> tuple[int, int]:
    return _pair(patch_size, "patch_size") if patch_size is not None else (2 * view_size[0], 2 * view_size[1])


class SliceViewsLoader(nnUNetDataLoader):
    """Batches of 2D items (2D images and single slices of volumes), each in several augmented views.

    Per item: a case drawn with ``sampling_probabilities`` (see :func:`case_sampling_probabilities`; None is
    uniform over cases), one of its slices uniformly, an in-plane ``patch_size`` crop at a uniform random
    position (default twice ``view_size``; cut to the image along an axis where the image is smaller, so
    views never show in-plane padding: the whole image is then the crop), then 2 global views of
    ``view_size`` and ``n_small_views`` small views of ``small_view_size`` (multi-crop), each the result of
    its own random draw of the view pipeline (:func:`slice_view_transforms`). Crop areas are fractions of
    the initial patch: ``config.crop_area`` for global views, ``small_crop_area`` for small ones.
    Batch layout (and the global sample indices a ``sample_index`` adds): see the module docstring.
    """

    def __init__(self, data: nnUNetBaseDataset, batch_size: int, view_size: Sequence[int],
                 patch_size: Sequence[int] | None = None, n_small_views: int = 0,
                 small_view_size: Sequence[int] | None = None,
                 sampling_probabilities: Sequence[float] | np.ndarray | None = None,
                 config: ViewAugmentationConfig = STRONG,
                 small_crop_area: Sequence[float] = SMALL_VIEW_CROP_AREA,
                 global_transforms: BasicTransform | None = None,
                 small_transforms: BasicTransform | None = None,
                 label_manager: LabelManager | None = None,
                 sample_index: SampleIndex | None = None, coordinates: bool = False):
        view_size = _pair(view_size, "view_size")
        patch = _initial_patch(patch_size, view_size)
        self.coordinates = bool(coordinates)
        if sampling_probabilities is not None:
            sampling_probabilities = _check_probabilities(sampling_probabilities, len(data.identifiers))
        super().__init__(data, batch_size, patch, patch, label_manager or _dummy_label_manager(),
                         oversample_foreground_percent=0.0, sampling_probabilities=sampling_probabilities)
        if n_small_views < 0:
            raise NnsslJointError(f"n_small_views must be >= 0, got {n_small_views}")
        self.view_size = view_size
        self.sample_index = sample_index
        self.n_small_views = int(n_small_views)
        self.small_view_size = (_pair(small_view_size, "small_view_size") if small_view_size is not None
                                else (max(1, view_size[0] // 2), max(1, view_size[1] // 2)))
        self.global_transforms = global_transforms or slice_view_transforms(view_size, config=config)
        self.small_transforms = None
        if self.n_small_views:
            self.small_transforms = small_transforms or slice_view_transforms(
                self.small_view_size, config=_with_area(config, small_crop_area))

    def generate_train_batch(self) -> dict:
        keys = [str(k) for k in self.get_indices()]
        batch = len(keys)
        global_views = small_views = global_coords = None
        slice_index = torch.empty(batch, dtype=torch.int64)
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(keys):
                data = self._data.load_case(key)[0]
                lbs, ubs = self.get_bbox(data.shape[1:], False, None)
                patch = torch.from_numpy(
                    crop_and_pad_nd(data, _bbox_in_plane_inside(lbs, ubs, data.shape), 0))
                patch = patch.float()[:, 0]
                slice_index[j] = lbs[0]
                if global_views is None:
                    channels = patch.shape[0]
                    global_views = torch.empty((batch, 2, channels, *self.view_size))
                    if self.n_small_views:
                        small_views = torch.empty((batch, self.n_small_views, channels,
                                                   *self.small_view_size))
                    if self.coordinates:
                        global_coords = torch.empty((batch, 2, 3, *self.view_size))
                for v in range(2):
                    view = self.global_transforms(image=patch.clone(),
                                                  **_coordinate_target(self.coordinates, patch.shape[1:]))
                    global_views[j, v] = view["image"]
                    if self.coordinates:
                        global_coords[j, v] = view["regression_target"]
                for v in range(self.n_small_views):
                    small_views[j, v] = self.small_transforms(image=patch.clone())["image"]
        out = {"global_views": global_views, "small_views": small_views, "keys": keys,
               "slice_index": slice_index}
        if self.coordinates:
            out["global_coords"] = global_coords
        if self.sample_index is not None:
            out["index"] = torch.tensor([self.sample_index.slice_index(k, int(n))
                                         for k, n in zip(keys, slice_index)], dtype=torch.int64)
        return out


class VolumeViewsLoader(nnUNetDataLoader):
    """Batches of volume windows (N contiguous slices), each in 2 augmented views with slice correspondence.

    Only cases with at least 2 slices are drawn (``sampling_probabilities`` is over those, in
    ``self.indices`` order; None is uniform). The window start is uniform over the positions that fit; a
    volume shorter than N is centred in the window and padded (nnU-Net's ``get_bbox``), never dropped: the
    padded positions are zero in both views and False in ``valid``. The in-plane crop works as in
    :class:`SliceViewsLoader`; the views come from :func:`volume_view_transforms`.
    Batch layout (and the global sample indices a ``sample_index`` adds): see the module docstring.
    """

    def __init__(self, data: nnUNetBaseDataset, batch_size: int, n_slices: int, view_size: Sequence[int],
                 patch_size: Sequence[int] | None = None,
                 sampling_probabilities: Sequence[float] | np.ndarray | None = None,
                 config: ViewAugmentationConfig = STRONG,
                 transforms: BasicTransform | None = None,
                 summary: Mapping | None = None,
                 label_manager: LabelManager | None = None,
                 sample_index: SampleIndex | None = None, coordinates: bool = False):
        if n_slices < 1:
            raise NnsslJointError(f"n_slices must be >= 1, got {n_slices}")
        view_size = _pair(view_size, "view_size")
        patch = _initial_patch(patch_size, view_size)
        summary = summary if summary is not None else dataset_summary(data)
        volumes = [k for k in data.identifiers if summary["cases"][k]["n_slices"] >= 2]
        if not volumes:
            raise NnsslJointError(f"no volumes (cases with >= 2 slices) in {data.source_folder}: a 2D-only "
                                  f"dataset has no volume batches; pass volume_loader=None to JointLoader")
        if sampling_probabilities is not None:
            sampling_probabilities = _check_probabilities(sampling_probabilities, len(volumes))
        super().__init__(data, batch_size, (int(n_slices), *patch), (int(n_slices), *patch),
                         label_manager or _dummy_label_manager(), oversample_foreground_percent=0.0,
                         sampling_probabilities=sampling_probabilities)
        self.indices = volumes
        self.n_slices = int(n_slices)
        if sample_index is not None and sample_index.n_slices != self.n_slices:
            raise NnsslJointError(f"sample_index was built for windows of {sample_index.n_slices} slices, "
                                  f"this loader draws {self.n_slices}")
        self.sample_index = sample_index
        self.view_size = view_size
        self.transforms = transforms or volume_view_transforms(view_size, config=config)
        self.coordinates = bool(coordinates)

    def generate_train_batch(self) -> dict:
        keys = [str(k) for k in self.get_indices()]
        batch = len(keys)
        views = coords = None
        valid = torch.empty((batch, self.n_slices), dtype=torch.bool)
        slice_start = torch.empty(batch, dtype=torch.int64)
        positions = torch.arange(self.n_slices)
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(keys):
                data = self._data.load_case(key)[0]
                lbs, ubs = self.get_bbox(data.shape[1:], False, None)
                bbox = _bbox_in_plane_inside(lbs, ubs, data.shape)
                stack = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                slice_start[j] = lbs[0]
                valid[j] = (positions + lbs[0] >= 0) & (positions + lbs[0] < data.shape[1])
                if views is None:
                    views = torch.empty((batch, 2, stack.shape[0], self.n_slices, *self.view_size))
                    if self.coordinates:
                        coords = torch.empty((batch, 2, 3, *self.view_size))
                for v in range(2):
                    target = _coordinate_target(self.coordinates, stack.shape[2:], stack=True)
                    result = self.transforms(image=stack.clone(), **target)
                    view = result["image"]
                    if self.coordinates:
                        coords[j, v] = result["regression_target"][:, 0]
                    view[:, ~valid[j]] = 0  # intensity transforms touched the padding too
                    views[j, v] = view
        out = {"views": views, "valid": valid, "keys": keys, "slice_start": slice_start}
        if self.coordinates:
            out["coords"] = coords
        if self.sample_index is not None:
            out["index"] = torch.tensor([self.sample_index.window_index(k, int(s))
                                         for k, s in zip(keys, slice_start)], dtype=torch.int64)
            out["slice_indices"] = torch.stack([self.sample_index.slice_indices(k, int(s), self.n_slices)
                                                for k, s in zip(keys, slice_start)])
            out["case"] = torch.tensor([self.sample_index.case_number[k] for k in keys], dtype=torch.int64)
        return out


class JointLoader(DataLoader):
    """One slice batch and one volume batch per ``next()``, for one iteration of nnU-Net's training loop.

    A batchgenerators ``DataLoader`` (infinite, so nnU-Net's ``NonDetMultiThreadedAugmenter`` accepts it;
    use ``transform=None`` there) holding a :class:`SliceViewsLoader` and an optional
    :class:`VolumeViewsLoader`. Returns ``{'slices': ..., 'volumes': ... or None}``. Picklable, so worker
    processes (fork or spawn) get their own copy; each worker is seeded by the augmenter.
    """

    def __init__(self, slice_loader: SliceViewsLoader, volume_loader: VolumeViewsLoader | None = None):
        super().__init__(slice_loader._data, slice_loader.batch_size, num_threads_in_multithreaded=1,
                         infinite=True)
        self.slice_loader = slice_loader
        self.volume_loader = volume_loader
        self.indices = list(slice_loader.indices)

    def generate_train_batch(self) -> dict:
        volumes = self.volume_loader.generate_train_batch() if self.volume_loader is not None else None
        return {"slices": self.slice_loader.generate_train_batch(), "volumes": volumes}


def _coordinate_target(wanted: bool, in_plane: Sequence[int], stack: bool = False) -> dict:
    """The view pipeline's extra input for ``coordinates=True``: the coordinate maps of an (H, W) sample as
    its ``regression_target``, (3, H, W), or (3, 1, H, W) for a stack (one in-plane map for all slices);
    nothing otherwise."""
    if not wanted:
        return {}
    maps = coordinate_maps(*in_plane)
    return {"regression_target": maps[:, None] if stack else maps}


def _check_probabilities(probabilities: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.shape != (n,) or np.any(p < 0) or not np.isclose(p.sum(), 1.0):
        raise NnsslJointError(f"sampling_probabilities must be {n} non-negative numbers summing to 1 (one "
                              f"per case the loader draws from), got shape {p.shape} and sum {p.sum():.6g}")
    return p / p.sum()


def _with_area(config: ViewAugmentationConfig, area: Sequence[float]) -> ViewAugmentationConfig:
    return replace(config, crop_area=(float(area[0]), float(area[1])))
