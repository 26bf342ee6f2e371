"""The probe's labeled data: fit and test cases of an nnU-Net raw dataset, preprocessed by nnU-Net.

Cases are preprocessed with the preprocessor class, plans and configuration of the target's plugin
plans (``nnssl_joint plan_and_preprocess -d ID --downstream`` writes them): nnU-Net's transpose,
crop to the non-zero region, resampling and normalisation, exactly what fine-tuning reads. Test
cases come from ``imagesTs``/``labelsTs`` when the dataset has them, otherwise from a seeded split of
``imagesTr``; the fit cases are all remaining labeled cases, the first ``--fit-cases N`` of a seeded
order of them, or the named ``--fit`` cases. Voxels nnU-Net marks outside the image (-1) count as
background.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.models.preset import ArchitecturePreset
from nnssl_joint.naming import PLANS_NAME, nnunet_preprocessed, nnunet_raw

PROBE_CONFIGURATIONS = ("2d", "3d_fullres")


class ProbeDataError(NnsslJointError):
    """A target dataset the probe cannot use as given."""


@dataclass
class ProbeCase:
    """One preprocessed case: ``image`` (C, Z, Y, X) float32, ``label`` (Z, Y, X) int64 (0 = background)."""

    identifier: str
    image: np.ndarray
    label: np.ndarray


@dataclass
class ProbeTarget:
    dataset_name: str
    configuration: str
    plans_file: Path
    preset: ArchitecturePreset
    input_channels: int
    class_names: list[str]  # index = label value, 0 = background
    fit: list[ProbeCase]
    test: list[ProbeCase]
    split: str  # where the test cases come from
    network_builder: Callable[[], Any] = field(repr=False)
    #: consecutive slices whose InstanceNorm statistics the target's network pools: the 3d_fullres patch depth
    #: where the plans set ``norm_over_volume`` (SliceWiseUNet3D normalises over the patch), else 1
    norm_slices: int = 1
    #: slices per patch of the 3d_fullres network (its f_inter reads that many slice tokens at once); 0 for 2d
    patch_slices: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def record(self) -> dict[str, Any]:
        return {"dataset": self.dataset_name, "configuration": self.configuration,
                "plans": str(self.plans_file), "preset": self.preset.name,
                "input_channels": self.input_channels, "classes": self.class_names,
                "fit_cases": [c.identifier for c in self.fit],
                "test_cases": [c.identifier for c in self.test], "split": self.split,
                "norm_slices": self.norm_slices, "patch_slices": self.patch_slices}


def find_raw_dataset(target: str | int) -> Path:
    """The raw folder of a dataset id (``503``) or name (``Dataset503_SynthOrgans``)."""
    raw = nnunet_raw()
    text = str(target)
    if text.isdigit():
        matches = sorted(raw.glob(f"Dataset{int(text):03d}_*"))
    else:
        matches = [raw / text] if (raw / text).is_dir() else []
    if not matches:
        raise ProbeDataError(f"target dataset {target!r} is not in nnUNet_raw={raw}; "
                             "give the id or folder name of a "
                             "labeled raw dataset (imagesTr + labelsTr + dataset.json)")
    return matches[0]


def _case_ids(folder: Path, ending: str) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(ending)] for p in folder.iterdir() if p.name.endswith(ending))


def choose_cases(pool: Sequence[str], fit_cases: int | None, fit: Sequence[str] | None, seed: int,
                 where: str) -> list[str]:
    """The fit cases: ``fit`` as named, else the first ``fit_cases`` of a seeded order of ``pool``,
    else all."""
    pool = list(pool)
    if fit:
        unknown = [c for c in fit if c not in pool]
        if unknown:
            raise ProbeDataError(f"--fit names case(s) {unknown} that are not labeled fit candidates "
                                 f"of {where}; choose among {pool}")
        return list(fit)
    if fit_cases is None:
        return pool
    if fit_cases < 1 or fit_cases > len(pool):
        raise ProbeDataError(f"--fit-cases {fit_cases} asked, but {where} has {len(pool)} labeled case(s) "
                             f"to fit on ({pool}); pass --fit-cases {len(pool)} or fewer, "
                             "or add labeled cases")
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[i] for i in sorted(order[:fit_cases])]


def split_cases(raw: Path, ending: str, seed: int,
                test_fraction: float = 0.5) -> tuple[list[str], list[str], str]:
    """(fit pool, test cases, description): imagesTs/labelsTs when labelled,
    else a seeded split of labelsTr."""
    train = _case_ids(raw / "labelsTr", ending)
    if not train:
        raise ProbeDataError(f"target {raw.name} has no labels ({raw / 'labelsTr'} is missing or empty); "
                             "the probe needs a labeled dataset. Pass the id of a labeled task "
                             "(labelsTr with one label file per imagesTr case)")
    test = [c for c in _case_ids(raw / "labelsTs", ending)
            if (raw / "imagesTs" / f"{c}_0000{ending}").is_file()]
    if test:
        return train, test, "imagesTs/labelsTs"
    if len(train) < 2:
        raise ProbeDataError(f"target {raw.name} has {len(train)} labeled case and no labelsTs; "
                             "a seeded split needs at least 2 labeled cases (or add imagesTs/labelsTs)")
    order = np.random.default_rng(seed).permutation(len(train))
    n_test = min(len(train) - 1, max(1, round(test_fraction * len(train))))
    test = sorted(train[i] for i in order[:n_test])
    pool = [c for c in train if c not in test]
    return pool, test, f"seeded split of labelsTr (seed {seed}, {n_test} test case(s))"


def network_norm_slices(configuration: str, configuration_manager: Any) -> int:
    """How many consecutive slices share InstanceNorm statistics in the target's plugin network: the patch
    depth for a 3d_fullres ``SliceWiseUNet3D`` planned with ``norm_over_volume`` (the downstream planner's
    choice since 2026-12-05), 1 for 2d and for plans without it (per-slice statistics)."""
    kwargs = configuration_manager.network_arch_init_kwargs
    if configuration == "3d_fullres" and kwargs.get("norm_over_volume"):
        return int(configuration_manager.patch_size[0])
    return 1


def load_target(target: str | int, configuration: str = "3d_fullres", fit_cases: int | None = None,
                fit: Sequence[str] | None = None, seed: int = 0, plans: str = PLANS_NAME) -> ProbeTarget:
    """Choose and preprocess the fit and test cases of ``target`` for ``configuration``
    of its plugin plans."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnssl_joint.models.downstream import resolve_preset

    if configuration not in PROBE_CONFIGURATIONS:
        raise ProbeDataError(f"-c {configuration!r}: the probe runs the plugin's 2D encoder, use one of "
                             f"{PROBE_CONFIGURATIONS}")
    raw = find_raw_dataset(target)
    dataset_json = json.loads((raw / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    pool, test_ids, split = split_cases(raw, ending, seed)
    plans_file = nnunet_preprocessed() / raw.name / f"{plans}.json"
    if not plans_file.is_file():
        raise ProbeDataError(f"{plans_file} does not exist: the target is not planned with the plugin's "
                             "planner. Run nnssl_joint plan_and_preprocess "
                             f"-d {raw.name.split('_')[0][7:]} --downstream first")
    pm = PlansManager(str(plans_file))
    if configuration not in pm.available_configurations:
        raise ProbeDataError(f"configuration {configuration!r} is not in {plans_file} (has "
                             f"{pm.available_configurations}); "
                             "re-plan with nnssl_joint plan_and_preprocess --downstream")
    cm = pm.get_configuration(configuration)
    if not cm.network_arch_class_name.startswith("nnssl_joint."):
        raise ProbeDataError(f"{plans_file} configuration {configuration!r} uses "
                             f"{cm.network_arch_class_name}, not a plugin architecture; "
                             "plan the target with nnssl_joint plan_and_preprocess --downstream")
    lm = pm.get_label_manager(dataset_json)
    if lm.has_regions:
        raise ProbeDataError(f"{raw / 'dataset.json'} defines regions; "
                             "the probe handles plain label maps only")
    labels = dataset_json["labels"]
    names = {int(v): k for k, v in labels.items() if not isinstance(v, (list, tuple))}
    class_names = [names.get(i, f"label_{i}") for i in range(max(names) + 1)]
    if len(class_names) < 2:
        raise ProbeDataError(f"{raw / 'dataset.json'} has no foreground label; the probe needs at least one")
    input_channels = determine_num_input_channels(pm, cm, dataset_json)

    fit_ids = choose_cases(pool, fit_cases, fit, seed, raw.name)
    preprocessor = cm.preprocessor_class(verbose=False)
    channels = sorted(int(k) for k in dataset_json["channel_names"])

    def load(case: str, images: str, labels_folder: str) -> ProbeCase:
        files = [str(raw / images / f"{case}_{c:04d}{ending}") for c in channels]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise ProbeDataError(f"case {case} of {raw.name} lacks image file(s) {missing}")
        data, seg, _ = preprocessor.run_case(files, str(raw / labels_folder / f"{case}{ending}"), pm, cm,
                                             dataset_json)
        return ProbeCase(case, np.ascontiguousarray(data, dtype=np.float32),
                         np.maximum(np.asarray(seg[0], dtype=np.int64), 0))

    test_folders = ("imagesTs", "labelsTs") if split == "imagesTs/labelsTs" else ("imagesTr", "labelsTr")
    fit_cases_loaded = [load(c, "imagesTr", "labelsTr") for c in fit_ids]
    test_cases_loaded = [load(c, *test_folders) for c in test_ids]

    def build_network():
        return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                      cm.network_arch_init_kwargs_req_import, input_channels,
                                      lm.num_segmentation_heads, allow_init=True, deep_supervision=True)

    return ProbeTarget(dataset_name=raw.name, configuration=configuration, plans_file=plans_file,
                       preset=resolve_preset(cm.network_arch_init_kwargs["preset"]),
                       input_channels=input_channels,
                       class_names=class_names, fit=fit_cases_loaded, test=test_cases_loaded, split=split,
                       network_builder=build_network, norm_slices=network_norm_slices(configuration, cm),
                       patch_slices=int(cm.patch_size[0]) if configuration == "3d_fullres" else 0)
