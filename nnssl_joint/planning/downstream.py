"""Planner for labeled downstream datasets whose configurations use the plugin's architectures.

``nnssl_joint plan_and_preprocess -d ID --downstream [--preset cpu|gpu]`` runs nnU-Net's fingerprint
extraction, this planner and nnU-Net's DefaultPreprocessor, writing ``nnsslJointPlans.json`` with a
``2d`` configuration (``JointSSLUNet2D``: nnU-Net's 2D U-Net whose encoder is the pretrained f_intra)
and a ``3d_fullres`` configuration (``SliceWiseUNet3D``: f_intra on every slice + the deformable
slice Transformer + nnU-Net's 3D decoder).

nnU-Net's self-configuration stays: target spacing, normalisation, resampling, the patch size (shrunk
from nnU-Net's initial aspect-ratio patch until the memory estimate fits the GPU memory target) and
the batch size come from the dataset fingerprint exactly as in ``ExperimentPlanner``. Only the
encoder topology is fixed by the preset, so the pretrained weights fit: in-plane patch axes are
multiples of the preset's total stride and the slice axis of the 3D patch is never pooled (any slice
count works). No 3d_lowres/cascade: their networks would not match the pretrained encoder.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnssl_joint import __version__
from nnssl_joint.models.downstream import pool_op_kernel_sizes, resolve_preset
from nnssl_joint.models.preset import ArchitecturePreset
from nnssl_joint.naming import PLANS_NAME
from nnssl_joint.planning.estimate import ThreadIndependentEstimateMixin

DOWNSTREAM_PLANS_NAME = PLANS_NAME
ARCHITECTURES = {
    2: "nnssl_joint.models.downstream.JointSSLUNet2D",
    3: "nnssl_joint.models.downstream.SliceWiseUNet3D",
}


def _round_up(value: float, multiple: int) -> int:
    return int(max(multiple, np.ceil(value / multiple) * multiple))


class JointSSLDownstreamPlanner(ThreadIndependentEstimateMixin, ExperimentPlanner):
    def __init__(self, dataset_name_or_id: str | int, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = DOWNSTREAM_PLANS_NAME,
                 overwrite_target_spacing: list[float] | None = None, suppress_transpose: bool = False,
                 preset: ArchitecturePreset | dict | str = "cpu") -> None:
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.preset = resolve_preset(preset)
        self.lowres_creation_threshold = 0.0  # never search a 3d_lowres configuration

    def architecture(self, dims: int) -> dict[str, Any]:
        # nnU-Net reads arch_kwargs['strides'] for the deep-supervision scales
        kwargs: dict[str, Any] = {"preset": self.preset.to_dict(),
                                  "strides": pool_op_kernel_sizes(self.preset, dims)}
        if dims == 3:
            # the 2D encoder's InstanceNorms take their statistics over the patch, as stock nnU-Net's
            # InstanceNorm3d (docs/finetuning.md: per-slice statistics cost the large organ 7 points on the
            # benchmark target). Written into the plans rather than made the class default, so plans written
            # before it keep the network they were trained with.
            kwargs["norm_over_volume"] = True
        return {"network_class_name": ARCHITECTURES[dims], "arch_kwargs": kwargs, "_kw_requires_import": []}

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        dims = len(spacing)
        strides = self.preset.encoder.total_strides  # (y, x)
        minimum = [2 * t for t in strides]  # InstanceNorm needs more than one element at the bottleneck
        num_input_channels = len(self.dataset_json["channel_names"])
        num_labels = len(self.dataset_json["labels"])
        median_shape = np.asarray(median_shape[:dims], dtype=float)

        # nnU-Net's initial patch: the spacing's aspect ratio at 256^3 / 2048^2 voxels, clipped to the
        # median shape
        tmp = 1 / np.asarray(spacing, dtype=float)
        target = 256 ** 3 if dims == 3 else 2048 ** 2
        initial = np.minimum(np.round(tmp * (target / np.prod(tmp)) ** (1 / dims)), median_shape)
        patch = [int(max(1, round(initial[0])))] if dims == 3 else []
        patch += [_round_up(v, t) if v >= m else m for v, t, m in zip(initial[-2:], strides, minimum)]
        step = ([1] if dims == 3 else []) + list(strides)
        arch = self.architecture(dims)

        def estimate(p: list[int]) -> float:
            key = f"{p}_{dims}"
            if key not in _cache:
                _cache[key] = self.static_estimate_VRAM_usage(
                    tuple(p), num_input_channels, num_labels, arch["network_class_name"], arch["arch_kwargs"],
                    arch["_kw_requires_import"])
            return float(_cache[key])

        reference = (self.UNet_reference_val_2d if dims == 2 else self.UNet_reference_val_3d) * \
            (self.UNet_vram_target_GB / self.UNet_reference_val_corresp_GB)
        ref_bs = self.UNet_reference_val_corresp_bs_2d if dims == 2 else self.UNet_reference_val_corresp_bs_3d
        lower = ([1] if dims == 3 else []) + minimum
        current = estimate(patch)
        while current / ref_bs * 2 > reference:
            # shrink the axis that is largest relative to the median shape, as nnU-Net does
            order = np.argsort([p / m for p, m in zip(patch, median_shape)])[::-1]
            axis = next((a for a in order if patch[a] - step[a] >= lower[a]), None)
            if axis is None:
                break
            patch = deepcopy(patch)
            patch[axis] -= step[axis]
            current = estimate(patch)

        batch_size = round(reference / current * ref_bs)
        bs_5_percent = round(approximate_n_voxels_dataset * self.max_dataset_covered
                             / np.prod(patch, dtype=np.float64))
        batch_size = int(max(min(batch_size, bs_5_percent), self.UNet_min_batch_size))

        resampling_data, resampling_data_kwargs, resampling_seg, resampling_seg_kwargs = (
            self.determine_resampling())
        resampling_softmax, resampling_softmax_kwargs = self.determine_segmentation_softmax_export_fn()
        normalization_schemes, mask_is_used_for_norm = (
            self.determine_normalization_scheme_and_whether_mask_is_used_for_norm())
        return {
            "data_identifier": data_identifier,
            "preprocessor_name": self.preprocessor_name,
            "batch_size": batch_size,
            # same types as nnU-Net's planner (it does arithmetic on these before saving)
            "patch_size": np.array(patch, dtype=int),
            "median_image_size_in_voxels": median_shape,
            "spacing": spacing,
            "normalization_schemes": normalization_schemes,
            "use_mask_for_norm": mask_is_used_for_norm,
            "resampling_fn_data": resampling_data.__name__,
            "resampling_fn_seg": resampling_seg.__name__,
            "resampling_fn_data_kwargs": resampling_data_kwargs,
            "resampling_fn_seg_kwargs": resampling_seg_kwargs,
            "resampling_fn_probabilities": resampling_softmax.__name__,
            "resampling_fn_probabilities_kwargs": resampling_softmax_kwargs,
            "architecture": arch,
        }

    def plan_experiment(self) -> dict:
        plans = super().plan_experiment()
        configurations = plans["configurations"]
        for name in ("3d_lowres", "3d_cascade_fullres"):
            configurations.pop(name, None)
        if "3d_fullres" in configurations:
            configurations["3d_fullres"].pop("next_stage", None)
        plans["nnssl_joint"] = {"version": __version__, "preset": self.preset.to_dict(),
                                "purpose": "downstream fine-tuning"}
        self.plans = plans
        self.save_plans(plans)
        return plans

    def save_plans(self, plans: dict) -> None:
        # nnU-Net keeps configurations of an existing plans file; lowres/cascade would reference networks
        # that do not exist here, so drop them before and after the merge
        for name in ("3d_lowres", "3d_cascade_fullres"):
            plans["configurations"].pop(name, None)
        super().save_plans(plans)


def plan_and_preprocess_downstream(dataset_id: int, preset: str | None = "cpu",
                                   plans_name: str = DOWNSTREAM_PLANS_NAME,
                                   configurations: tuple[str, ...] = ("2d", "3d_fullres"),
                                   num_processes: int = 4, num_processes_fingerprint: int = 4,
                                   gpu_memory_target_in_gb: float = 8.0, verify: bool = False) -> dict:
    """Fingerprint (nnU-Net's), plan (:class:`JointSSLDownstreamPlanner`) and preprocess (nnU-Net's
    DefaultPreprocessor) a labeled dataset. Returns the plans."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        preprocess_dataset,
    )

    preset = preset or "cpu"
    extract_fingerprint_dataset(dataset_id, num_processes=num_processes_fingerprint,
                                check_dataset_integrity=verify, clean=True, verbose=False)
    planner = JointSSLDownstreamPlanner(dataset_id, gpu_memory_target_in_gb=gpu_memory_target_in_gb,
                                        plans_name=plans_name, preset=preset)
    plans = planner.plan_experiment()
    available = [c for c in configurations if c in plans["configurations"]]
    preprocess_dataset(dataset_id, plans_name, tuple(available), [num_processes] * len(available),
                       verbose=False)
    return plans
