"""Fingerprint, plan and preprocess a dataset without labels, with nnU-Net's own classes subclassed.

nnU-Net's pipeline assumes labels in three places; each is replaced here by a subclass:

* :class:`UnlabeledFingerprintExtractor` (``DatasetFingerprintExtractor``): intensity statistics are
  sampled from the image itself, from the voxels inside nnU-Net's nonzero crop mask
  (``crop_to_nonzero``, the same mask nnU-Net normalises with when ``use_mask_for_norm``), not from
  label foreground. For CT channels voxels below -1024 HU (scanner padding outside the field of view)
  are left out. The same number of voxels is drawn from every case, so a 2D image weighs as much as a
  volume. ``labelsTr`` is never opened. The fingerprint keeps nnU-Net's keys (``spacings``,
  ``shapes_after_crop``, ``foreground_intensity_properties_per_channel``,
  ``median_relative_size_after_cropping``) and adds ``case_identifiers``,
  ``relative_sizes_after_cropping`` and ``intensity_properties_per_channel_and_scheme``.
* :class:`JointSSLPlanner` (``ExperimentPlanner``): writes plans ``nnsslJointPlans`` with one
  2D-type configuration ``joint_ssl``. Its patch is in-plane; nnU-Net's 2D preprocessing keeps the
  slice axis spacing of every case, so volumes keep all their slices and 2D images stay one slice.
  No transpose (the slice axis is the file's z axis for every case: a global transpose would turn
  2D images sideways). In-plane target spacing per :class:`SpacingSpec`.
* :class:`UnlabeledPreprocessor` (``DefaultPreprocessor``): never reads a label. nnU-Net's path for
  cases without a segmentation stores, as ``<case>_seg.b2nd``, the nonzero mask (-1 outside the
  image region, 0 inside); properties get an empty ``class_locations`` so nnU-Net's own data loaders
  fall back to random crops. Output format is nnU-Net's (``.b2nd`` + ``.pkl``), read by
  ``nnunetv2.training.dataloading.nnunet_dataset``. Honours ``resample_in_plane: false`` (native
  spacing) and per-case normalisation.

Normalisation: nnU-Net's ``determine_normalization_scheme_and_whether_mask_is_used_for_norm`` picks
the scheme per channel from ``channel_names`` (CT: clip to the 0.5/99.5 percentiles and z-score with
dataset statistics; anything else: per-image z-score). If provenance.json (written by
``nnssl_joint prepare``) records cases of one channel whose modalities map to different schemes
(e.g. CT and MR merged), the configuration gets ``per_case_normalization`` and every case is
normalised with its own modality's scheme; CT statistics then come from the CT cases only.

nnU-Net resolves planners and preprocessors by name inside its own package only, so
:func:`plan_and_preprocess_unlabeled` calls these classes directly.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from nnunetv2.configuration import ANISO_THRESHOLD, default_num_processes
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import (
    channel_name_to_normalization_mapping,
)
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.json_export import recursive_fix_for_json_export
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnssl_joint import __version__
from nnssl_joint.naming import nnunet_preprocessed, nnunet_raw
from nnssl_joint.planning.errors import (
    DatasetJsonError,
    DatasetNotFoundError,
    PlanningError,
    PreprocessingVerificationError,
)
from nnssl_joint.planning.estimate import ThreadIndependentEstimateMixin
from nnssl_joint.planning.raw import (
    PROVENANCE_FILE,
    RawCase,
    case_normalization_schemes,
    channel_names_of,
    choose_reader,
    dataset_folders_with_id,
    find_raw_dataset,
    inspect_raw_dataset,
    load_dataset_json,
    load_provenance,
    normalization_schemes_for,
    read_case,
)
from nnssl_joint.planning.settings import DEFAULT_PLANS_NAME, PRETRAINING_CONFIGURATION, SpacingSpec

#: CT voxels below this (HU) are scanner padding outside the field of view, not anatomy or air
CT_PADDING_BELOW_HU = -1024.0
#: nnU-Net's rule: use the nonzero mask for z-scoring when cropping removed more than a quarter of the image
_MASK_FOR_NORM_RELATIVE_SIZE = 0.75
_NORMALIZERS = {cls.__name__: cls for cls in channel_name_to_normalization_mapping.values()}


def _intensity_statistics(samples: np.ndarray) -> dict:
    """nnU-Net's ``foreground_intensity_properties_per_channel`` entry for a sample of voxels."""
    p00_5, median, p99_5 = np.percentile(samples, (0.5, 50.0, 99.5))
    return {
        "mean": float(np.mean(samples)),
        "median": float(median),
        "std": float(np.std(samples)),
        "min": float(np.min(samples)),
        "max": float(np.max(samples)),
        "percentile_99_5": float(p99_5),
        "percentile_00_5": float(p00_5),
    }


def _run_jobs(fn: Callable, jobs: Sequence[tuple], num_processes: int, description: str) -> list:
    """``[fn(*job) for job in jobs]``, in a spawned pool when ``num_processes > 1`` (as nnU-Net does)."""
    num_processes = max(1, min(num_processes, len(jobs)))
    if num_processes == 1:
        return [fn(*job) for job in jobs]
    print(f"{description}: {len(jobs)} cases, {num_processes} processes")
    with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
        workers = list(pool._pool)
        pending = [pool.apply_async(fn, job) for job in jobs]
        while not all(r.ready() for r in pending):
            if not all(w.is_alive() for w in workers):
                raise RuntimeError(
                    f"{description}: a worker process died (probably out of memory; look for an error "
                    "above). Use fewer processes (-np / -npfp)."
                )
            time.sleep(0.1)
        return [r.get() for r in pending]


class UnlabeledFingerprintExtractor(DatasetFingerprintExtractor):
    """nnU-Net's dataset fingerprint for a dataset without labels (intensities from the images themselves)."""

    #: voxels drawn per case for the intensity statistics (nnU-Net: 1e8 / number of cases)
    max_intensity_samples_per_case = 100_000

    def __init__(self, dataset_name_or_id: int | str, num_processes: int = 8, verbose: bool = False):
        super().__init__(dataset_name_or_id, num_processes, verbose)
        self.case_schemes = case_normalization_schemes(Path(self.input_folder), self.dataset_json,
                                                       list(self.dataset))

    @staticmethod
    def analyze_case(image_files: list[str], segmentation_file: str | None, reader_writer_class,
                     num_samples: int = 10000, channel_schemes: list[str] | None = None,
                     case_identifier: str | None = None):
        """nnU-Net's per-case analysis without a label; ``segmentation_file`` is ignored.

        Returns nnU-Net's tuple (shape after crop, spacing, sampled intensities per channel, their
        statistics per channel, relative size after cropping). Voxels are sampled (with replacement,
        ``num_samples`` per case) inside the nonzero mask; for channels normalised as CT, voxels below
        :data:`CT_PADDING_BELOW_HU` are excluded unless nothing else is left.
        """
        case = RawCase(case_identifier or Path(image_files[0]).name, tuple(str(f) for f in image_files))
        images = read_case(reader_writer_class, case, len(channel_schemes) if channel_schemes else None)
        data_cropped, nonzero_seg, _ = crop_to_nonzero(images.data)
        inside = nonzero_seg[0] >= 0

        rng = np.random.RandomState(1234)
        samples, statistics = [], []
        for c in range(data_cropped.shape[0]):
            region = inside
            if channel_schemes is not None and channel_schemes[c] == "CTNormalization":
                body = inside & (data_cropped[c] >= CT_PADDING_BELOW_HU)
                region = body if body.any() else inside
            voxels = data_cropped[c][region]
            drawn = rng.choice(voxels, num_samples, replace=True) if voxels.size else np.empty(0, np.float32)
            samples.append(drawn)
            statistics.append(_intensity_statistics(drawn) if drawn.size else {})
        shape_after_crop = tuple(int(s) for s in data_cropped.shape[1:])
        relative_size = float(np.prod(shape_after_crop) / np.prod(images.data.shape[1:]))
        return shape_after_crop, images.spacing, samples, statistics, relative_size

    def run(self, overwrite_existing: bool = False) -> dict:
        """Compute (or load) and save ``dataset_fingerprint.json``; written only when every case succeeded."""
        output_file = nnunet_preprocessed() / self.dataset_name / "dataset_fingerprint.json"
        if output_file.is_file() and not overwrite_existing:
            return load_json(str(output_file))

        identifiers = list(self.dataset)
        first_images = self.dataset[identifiers[0]]["images"]
        reader = choose_reader(self.dataset_json, first_images[0], Path(self.input_folder))
        num_samples = int(min(self.max_intensity_samples_per_case,
                              max(1, self.num_foreground_voxels_for_intensitystats // len(identifiers))))
        jobs = [
            (self.dataset[k]["images"], None, reader, num_samples, self.case_schemes[k], k)
            for k in identifiers
        ]
        results = _run_jobs(type(self).analyze_case, jobs, self.num_processes,
                            "Extracting unlabeled fingerprint")

        channel_names = channel_names_of(self.dataset_json)
        per_channel, per_channel_and_scheme = {}, {}
        for c, channel_name in channel_names.items():
            c_int = int(c)
            pooled = np.concatenate([r[2][c_int] for r in results])
            if pooled.size == 0:
                raise PlanningError(
                    f"Channel {c} ({channel_name}) of {self.dataset_name} has no nonzero voxel in any case; "
                    f"intensity statistics cannot be computed. Check the images."
                )
            per_channel[c] = _intensity_statistics(pooled)
            per_channel_and_scheme[c] = {}
            for scheme in sorted({self.case_schemes[k][c_int] for k in identifiers}):
                group = [r[2][c_int] for r, k in zip(results, identifiers)
                         if self.case_schemes[k][c_int] == scheme]
                group_samples = np.concatenate(group)
                if group_samples.size:
                    per_channel_and_scheme[c][scheme] = _intensity_statistics(group_samples)

        relative_sizes = [r[4] for r in results]
        fingerprint = {
            "spacings": [[float(s) for s in r[1]] for r in results],
            "shapes_after_crop": [list(r[0]) for r in results],
            "foreground_intensity_properties_per_channel": per_channel,
            "median_relative_size_after_cropping": float(np.median(relative_sizes)),
            "case_identifiers": identifiers,
            "relative_sizes_after_cropping": relative_sizes,
            "intensity_properties_per_channel_and_scheme": per_channel_and_scheme,
            "nnssl_joint": {
                "version": __version__,
                "fingerprint_extractor": f"{__name__}.{type(self).__name__}",
                "intensity_samples": "voxels inside nnU-Net's nonzero crop mask (CT channels: without voxels "
                f"below {CT_PADDING_BELOW_HU:g} HU), {num_samples} per case",
            },
        }
        recursive_fix_for_json_export(fingerprint)
        output_file.parent.mkdir(parents=True, exist_ok=True)
        save_json(fingerprint, str(output_file), sort_keys=False)
        return fingerprint


@functools.lru_cache(maxsize=4)
def _case_schemes_of_raw_dataset(raw_folder: str) -> tuple[dict[str, list[str]], list[str]]:
    """(schemes per case recorded in provenance.json, schemes from dataset.json), cached per worker
    process."""
    folder = Path(raw_folder)
    dataset_json = load_dataset_json(folder)
    recorded = list((load_provenance(folder) or {}).get("cases", {}))
    per_case = case_normalization_schemes(folder, dataset_json, recorded)
    return per_case, normalization_schemes_for(list(channel_names_of(dataset_json).values()))


class JointSSLPlanner(ThreadIndependentEstimateMixin, ExperimentPlanner):
    """Plans ``nnsslJointPlans`` with the single 2D-type pretraining configuration ``joint_ssl``.

    ``spacing`` (a :class:`SpacingSpec` or its string) sets the in-plane target spacing; an nnU-Net
    ``overwrite_target_spacing`` (z, y, x) is taken as a fixed in-plane spacing (y, x). The architecture
    fields are nnU-Net's 2D U-Net plan for that spacing and the median in-plane size; the slice axis is
    neither resampled nor transposed.
    """

    def __init__(self, dataset_name_or_id: int | str, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = DEFAULT_PLANS_NAME,
                 overwrite_target_spacing: Sequence[float] | None = None, suppress_transpose: bool = True,
                 spacing: str | float | SpacingSpec = "median"):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing=None, suppress_transpose=True)
        if overwrite_target_spacing is not None:
            self.spacing = SpacingSpec("fixed", (float(overwrite_target_spacing[-2]),
                                                 float(overwrite_target_spacing[-1])))
        else:
            self.spacing = SpacingSpec.parse(spacing)
        if "intensity_properties_per_channel_and_scheme" not in self.dataset_fingerprint:
            raise PlanningError(
                f"The fingerprint of {self.dataset_name} was not made by "
                f"{UnlabeledFingerprintExtractor.__name__} (no "
                "'intensity_properties_per_channel_and_scheme'). Rerun `nnssl_joint plan_and_preprocess`."
            )

    def determine_in_plane_target_spacing(self) -> np.ndarray:
        """(y, x) target spacing: fixed value, else the median in-plane spacing (reference size for
        native)."""
        if self.spacing.mode == "fixed":
            return np.array(self.spacing.value, dtype=float)
        return np.median(np.array(self.dataset_fingerprint["spacings"], dtype=float)[:, 1:], axis=0)

    def _case_schemes(self) -> dict[str, list[str]]:
        return case_normalization_schemes(Path(self.raw_dataset_folder), self.dataset_json,
                                          list(self.dataset))

    def determine_per_case_normalization(self) -> dict | None:
        """``per_case_normalization`` for the configuration if one channel mixes normalisation schemes, else
        None."""
        schemes = self._case_schemes()
        n_channels = len(channel_names_of(self.dataset_json))
        if all(len({s[c] for s in schemes.values()}) == 1 for c in range(n_channels)):
            return None
        fingerprint = self.dataset_fingerprint
        relative_size = dict(zip(fingerprint["case_identifiers"],
                                 fingerprint["relative_sizes_after_cropping"]))
        properties, use_mask = {}, {}
        for c in range(n_channels):
            properties[str(c)], use_mask[str(c)] = {}, {}
            for scheme in sorted({s[c] for s in schemes.values()}):
                cases = [k for k, s in schemes.items() if s[c] == scheme]
                properties[str(c)][scheme] = (
                    fingerprint["intensity_properties_per_channel_and_scheme"][str(c)][scheme]
                )
                cropped_a_lot = np.median([relative_size[k] for k in cases]) < _MASK_FOR_NORM_RELATIVE_SIZE
                use_mask[str(c)][scheme] = bool(
                    cropped_a_lot
                    and _NORMALIZERS[scheme].leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true
                )
        return {
            "case_schemes_from": f"{PROVENANCE_FILE} (channel_names of each case, mapped as nnU-Net maps "
                                 "channel names)",
            "intensity_properties": properties,
            "use_mask_for_norm": use_mask,
        }

    def _warn_about_slice_axis(self, spacings: np.ndarray, shapes: np.ndarray) -> None:
        """Volumes whose coarsest axis is not the file's z axis are still sliced along z; say so."""
        identifiers = self.dataset_fingerprint["case_identifiers"]
        odd = [
            k for k, sp, sh in zip(identifiers, spacings, shapes)
            if sh[0] > 1 and np.argmax(sp) != 0 and sp.max() > ANISO_THRESHOLD * sp.min()
        ]
        if odd:
            warnings.warn(
                f"{len(odd)} volume(s) (e.g. {odd[0]}) have their coarsest spacing in-plane, not along the "
                "file's z axis. The pretraining configuration takes slices along z for every case; reorient "
                "those volumes (z = the acquisition's slice axis) if that is not intended.", stacklevel=2,
            )

    def plan_experiment(self) -> dict:
        """Plan the ``joint_ssl`` configuration, save the plans, copy dataset.json (and provenance.json)."""
        spacings = np.array(self.dataset_fingerprint["spacings"], dtype=float)
        shapes = np.array(self.dataset_fingerprint["shapes_after_crop"], dtype=float)
        self._warn_about_slice_axis(spacings, shapes)
        target = self.determine_in_plane_target_spacing()
        new_shapes = shapes.copy()
        if self.spacing.resamples:
            new_shapes[:, 1:] = np.round(shapes[:, 1:] * spacings[:, 1:] / target)
        median_shape = np.median(new_shapes, axis=0)
        approximate_n_voxels = float(np.prod(median_shape, dtype=np.float64) * len(self.dataset))

        configuration = self.get_plans_for_configuration(
            [float(s) for s in target], median_shape[1:],
            self.generate_data_identifier(PRETRAINING_CONFIGURATION), approximate_n_voxels, {},
        )
        configuration["batch_dice"] = True
        configuration["spacing_mode"] = self.spacing.mode
        configuration["resample_in_plane"] = self.spacing.resamples
        per_case = self.determine_per_case_normalization()
        if per_case is not None:
            configuration["per_case_normalization"] = per_case

        transpose = [0, 1, 2]
        plans = {
            "dataset_name": self.dataset_name,
            "plans_name": self.plans_identifier,
            "original_median_spacing_after_transp": [float(i) for i in np.median(spacings, axis=0)],
            "original_median_shape_after_transp": [int(i) for i in np.round(np.median(shapes, axis=0))],
            "image_reader_writer": self.determine_reader_writer().__name__,
            "transpose_forward": transpose,
            "transpose_backward": transpose,
            "configurations": {PRETRAINING_CONFIGURATION: configuration},
            "experiment_planner_used": type(self).__name__,
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel":
                self.dataset_fingerprint["foreground_intensity_properties_per_channel"],
            "nnssl_joint": {
                "version": __version__,
                "pretraining_configuration": PRETRAINING_CONFIGURATION,
                "spacing": str(self.spacing),
                "fingerprint_extractor": f"{__name__}.{UnlabeledFingerprintExtractor.__name__}",
                "planner": f"{__name__}.{type(self).__name__}",
                "preprocessor": f"{__name__}.{UnlabeledPreprocessor.__name__}",
            },
        }
        preprocessed = nnunet_preprocessed() / self.dataset_name
        preprocessed.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(self.raw_dataset_folder) / "dataset.json", preprocessed / "dataset.json")
        if (Path(self.raw_dataset_folder) / PROVENANCE_FILE).is_file():
            shutil.copy(Path(self.raw_dataset_folder) / PROVENANCE_FILE, preprocessed / PROVENANCE_FILE)
        self.plans = plans
        self.save_plans(plans)
        return plans


class UnlabeledPreprocessor(DefaultPreprocessor):
    """nnU-Net's DefaultPreprocessor for unlabeled cases, native spacing and per-case normalisation."""

    def __init__(self, verbose: bool = True):
        super().__init__(verbose)
        self.raw_dataset_folder: str | None = None
        self._current_case: str | None = None

    def run(self, dataset_name_or_id: int | str, configuration_name: str, plans_identifier: str,
            num_processes: int) -> None:
        folder = find_raw_dataset(dataset_name_or_id)
        self.raw_dataset_folder = str(folder)
        super().run(folder.name, configuration_name, plans_identifier, num_processes)

    def run_case_save(self, output_filename_truncated: str, image_files: list[str], seg_file: str | None,
                      plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                      dataset_json: dict | str) -> None:
        # Labels are never used for pretraining (nnU-Net passes labelsTr paths that need not exist).
        # The case id tells _normalize which modality this case has; one task runs at a time per process.
        self._current_case = os.path.basename(output_filename_truncated)
        try:
            super().run_case_save(output_filename_truncated, image_files, None, plans_manager,
                                  configuration_manager, dataset_json)
        finally:
            self._current_case = None

    def run_case_npy(self, data: np.ndarray, seg: np.ndarray | None, properties: dict,
                     plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                     dataset_json: dict | str):
        if not configuration_manager.configuration.get("resample_in_plane", True):
            own_spacing = [float(properties["spacing"][i]) for i in plans_manager.transpose_forward][1:]
            configuration_manager = ConfigurationManager({**configuration_manager.configuration,
                                                          "spacing": own_spacing})
        data, seg, properties = super().run_case_npy(data, seg, properties, plans_manager,
                                                     configuration_manager, dataset_json)
        properties.setdefault("class_locations", {})
        return data, seg, properties

    def _normalize(self, data: np.ndarray, seg: np.ndarray, configuration_manager: ConfigurationManager,
                   foreground_intensity_properties_per_channel: dict) -> np.ndarray:
        per_case = configuration_manager.configuration.get("per_case_normalization")
        if per_case is None or self._current_case is None or self.raw_dataset_folder is None:
            return super()._normalize(data, seg, configuration_manager,
                                      foreground_intensity_properties_per_channel)
        recorded, default = _case_schemes_of_raw_dataset(self.raw_dataset_folder)
        schemes = recorded.get(self._current_case, default)
        for c in range(data.shape[0]):
            normalizer = _NORMALIZERS[schemes[c]](
                use_mask_for_norm=per_case["use_mask_for_norm"][str(c)][schemes[c]],
                intensityproperties=per_case["intensity_properties"][str(c)][schemes[c]],
            )
            data[c] = normalizer.run(data[c], seg[0])
        return data


@dataclass(frozen=True)
class PreprocessedCase:
    """One preprocessed case as found on disk. Shapes are (slices, y, x)."""

    identifier: str
    dim: int
    raw_shape: tuple[int, int, int]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    mean: float | None = None  # channel 0 where it was normalised (deep verification only)
    std: float | None = None


def verify_preprocessed(dataset: int | str, plans_name: str = DEFAULT_PLANS_NAME,
                        configuration: str = PRETRAINING_CONFIGURATION,
                        deep: bool = False) -> list[PreprocessedCase]:
    """Check that every raw case is preprocessed with the slice count and in-plane size planning implies.

    2D cases must have one slice; volumes all slices of their nonzero crop; the in-plane size must be
    the cropped size resampled to the configuration's spacing (own spacing in native mode). ``deep``
    also decompresses every case and checks that its voxels are finite (and reports mean/std).
    """
    raw_folder = find_raw_dataset(dataset)
    preprocessed = nnunet_preprocessed() / raw_folder.name
    plans_file = preprocessed / f"{plans_name}.json"
    if not plans_file.is_file():
        raise PreprocessingVerificationError(f"{plans_file} does not exist; run `nnssl_joint "
                                             "plan_and_preprocess`.")
    plans_manager = PlansManager(str(plans_file))
    manager = plans_manager.get_configuration(configuration)
    data_folder = preprocessed / manager.data_identifier
    raw = inspect_raw_dataset(raw_folder)
    dims = {k: v["dim"] for k, v in (load_provenance(raw_folder) or {}).get("cases", {}).items()}

    missing = [c.identifier for c in raw.cases if not (data_folder / f"{c.identifier}.pkl").is_file()]
    if missing:
        raise PreprocessingVerificationError(
            f"{len(missing)} of {len(raw.cases)} case(s) are missing from {data_folder}: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Rerun `nnssl_joint "
            "plan_and_preprocess`."
        )
    loader = infer_dataset_class(str(data_folder))(str(data_folder))
    per_case = manager.configuration.get("per_case_normalization")
    recorded_schemes, default_schemes = _case_schemes_of_raw_dataset(str(raw_folder))
    transpose = plans_manager.transpose_forward
    rows, problems = [], []
    for case in raw.cases:
        data, seg, _, properties = loader.load_case(case.identifier)
        shape = tuple(int(s) for s in data.shape[1:])
        raw_shape = tuple(int(s) for s in properties["shape_before_cropping"])
        cropped = properties["shape_after_cropping_and_before_resampling"]
        dim = dims.get(case.identifier, 2 if raw_shape[0] == 1 else 3)
        spacing = [float(properties["spacing"][i]) for i in transpose]
        target = (spacing if not manager.configuration.get("resample_in_plane", True)
                  else [spacing[0], *manager.spacing])
        expected = tuple(int(s) for s in compute_new_shape(cropped, spacing, target))
        if shape != expected or (dim == 2 and shape[0] != 1) or tuple(seg.shape[1:]) != shape:
            problems.append(f"{case.identifier}: shape {shape}, expected {expected} (dim {dim}), seg "
                            f"{tuple(seg.shape[1:])}")
        mean = std = None
        if deep:
            voxels = np.asarray(data[:])
            if not np.isfinite(voxels).all():
                problems.append(f"{case.identifier}: non-finite voxels after preprocessing")
            # statistics over the region the normaliser used: the nonzero mask if use_mask_for_norm
            if per_case is None:
                use_mask = manager.use_mask_for_norm[0]
            else:
                scheme = recorded_schemes.get(case.identifier, default_schemes)[0]
                use_mask = per_case["use_mask_for_norm"]["0"][scheme]
            inside = np.asarray(seg[:])[0] >= 0
            channel0 = voxels[0][inside] if use_mask and inside.any() else voxels[0].ravel()
            mean, std = float(channel0.mean()), float(channel0.std())
        rows.append(PreprocessedCase(case.identifier, dim, raw_shape, shape, tuple(target), mean, std))
    if problems:
        raise PreprocessingVerificationError(
            f"{len(problems)} preprocessed case(s) in {data_folder} do not match the plans: "
            + "; ".join(problems[:5])
            + (" ..." if len(problems) > 5 else "")
        )
    return rows


def format_summary(rows: list[PreprocessedCase], max_rows: int = 60) -> str:
    """The summary table printed after preprocessing (case, dim, slices, in-plane shape)."""
    deep = any(r.mean is not None for r in rows)
    header = ["case", "dim", "slices", "in-plane raw", "in-plane preprocessed", "spacing (y, x)"]
    header += ["mean", "std"] if deep else []
    lines = []
    for r in rows:
        line = [r.identifier, f"{r.dim}D",
                f"{r.shape[0]}" + (f" (of {r.raw_shape[0]})" if r.shape[0] != r.raw_shape[0] else ""),
                f"{r.raw_shape[1]}x{r.raw_shape[2]}", f"{r.shape[1]}x{r.shape[2]}",
                f"{r.spacing[1]:.3g} x {r.spacing[2]:.3g}"]
        line += [f"{r.mean:.2f}", f"{r.std:.2f}"] if deep else []
        lines.append(line)
    shown = lines if len(lines) <= max_rows else lines[: max_rows - 1]
    widths = [max(len(x[i]) for x in [header, *shown]) for i in range(len(header))]
    text = ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in [header, *shown]]
    if len(shown) < len(lines):
        text.append(f"... {len(lines) - len(shown)} more (full table in the .tsv next to the plans)")
    n_2d = sum(r.dim == 2 for r in rows)
    text.append(f"{len(rows)} cases: {n_2d} 2D, {len(rows) - n_2d} 3D; {sum(r.shape[0] for r in rows)} "
                "slices in total")
    return "\n".join(text)


def _write_summary_tsv(rows: list[PreprocessedCase], path: Path) -> None:
    lines = ["case\tdim\tslices\traw_shape\tpreprocessed_shape\tspacing\tmean\tstd"]
    for r in rows:
        lines.append("\t".join([r.identifier, str(r.dim), str(r.shape[0]), "x".join(map(str, r.raw_shape)),
                                "x".join(map(str, r.shape)), ",".join(f"{s:g}" for s in r.spacing),
                                "" if r.mean is None else f"{r.mean:.4f}",
                                "" if r.std is None else f"{r.std:.4f}"]))
    path.write_text("\n".join(lines) + "\n")


def plan_and_preprocess_unlabeled(dataset: int | str, spacing: str | float | SpacingSpec = "median",
                                  plans_name: str = DEFAULT_PLANS_NAME,
                                  num_processes: int = default_num_processes,
                                  num_processes_fingerprint: int = default_num_processes,
                                  verify: bool = False,
                                  gpu_memory_target_in_gb: float = 8) -> list[PreprocessedCase]:
    """Fingerprint, plan (``plans_name``, configuration ``joint_ssl``) and preprocess one unlabeled dataset.

    The raw dataset is validated first (dataset.json, channel files); every image is then read and
    checked during fingerprinting (readable, finite, channel count). Nothing is planned or preprocessed
    unless that succeeded; a preprocessed dataset folder created by a failing run is removed again.
    Afterwards every case is checked in the preprocessed folder, a summary table is printed and saved
    as ``<plans_name>_<configuration>_cases.tsv`` next to the plans. ``verify`` decompresses every
    preprocessed case as part of that check and adds the per-case mean/std of channel 0.
    """
    spacing = SpacingSpec.parse(spacing)
    raw_root, preprocessed_root = nnunet_raw(), nnunet_preprocessed()
    raw = inspect_raw_dataset(find_raw_dataset(dataset, raw_root))
    unlabeled_entries = [k for k, v in raw.dataset_json.get("dataset", {}).items() if "label" not in v]
    if unlabeled_entries:
        raise DatasetJsonError(
            f"{raw.folder / 'dataset.json'}: case {unlabeled_entries[0]!r} (and {len(unlabeled_entries) - 1} "
            "more) in 'dataset' has no 'label' entry, which nnU-Net's file listing requires. Add one per "
            "case (the file need not exist and is never read, e.g. \"label\": "
            f"\"labelsTr/{unlabeled_entries[0]}.nii.gz\"), or run `nnssl_joint prepare` to get an imagesTr "
            "layout."
        )
    clashes = [p.name for p in dataset_folders_with_id(preprocessed_root, raw.dataset_id)
               if p.name != raw.name]
    if clashes:
        raise DatasetNotFoundError(
            f"Dataset id {raw.dataset_id} names {raw.name} in nnUNet_raw but {clashes[0]} in "
            f"nnUNet_preprocessed={preprocessed_root}; nnU-Net needs one name per id. Delete or rename the "
            "stale folder."
        )

    preprocessed = preprocessed_root / raw.name
    created = not preprocessed.exists()
    num_processes = max(1, min(num_processes, len(raw.cases)))
    try:
        UnlabeledFingerprintExtractor(raw.name, num_processes_fingerprint).run(overwrite_existing=True)
        planner = JointSSLPlanner(raw.name, gpu_memory_target_in_gb=gpu_memory_target_in_gb,
                                  plans_name=plans_name, spacing=spacing)
        plans = planner.plan_experiment()
        data_folder = preprocessed / plans["configurations"][PRETRAINING_CONFIGURATION]["data_identifier"]
        try:
            UnlabeledPreprocessor(verbose=False).run(raw.name, PRETRAINING_CONFIGURATION, plans_name,
                                                     num_processes)
        except BaseException:
            shutil.rmtree(data_folder, ignore_errors=True)
            raise
    except BaseException:
        if created:
            shutil.rmtree(preprocessed, ignore_errors=True)
        raise

    rows = verify_preprocessed(raw.name, plans_name, PRETRAINING_CONFIGURATION, deep=verify)
    _write_summary_tsv(rows, preprocessed / f"{plans_name}_{PRETRAINING_CONFIGURATION}_cases.tsv")
    print(f"\n{raw.name}: plans {plans_name} ({preprocessed / (plans_name + '.json')}), configuration "
          f"{PRETRAINING_CONFIGURATION}, in-plane spacing {spacing}, data in {data_folder}")
    print(format_summary(rows))
    return rows
