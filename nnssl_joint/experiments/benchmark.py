"""Label-efficiency benchmark on your own nnU-Net datasets: does pretraining help, and by how much?

    nnssl_joint benchmark --pretrain 501 502 --target 503 --labeled 1,2,4 --seeds 3 \\
        --arms scratch,nnunet,intra,joint --budget small --out benchmark_output

For every seed s and labeled count k, nnU-Net's ``3d_fullres`` (or ``-c 2d``) network of the plugin
is fine-tuned on k labeled cases of the target dataset, once per arm, with the same budget, the same
training cases, the same validation case(s) and the same fine-tuning seed:

* ``scratch``: random initialisation;
* ``intra``: from 2D-only pretraining (L_intra and the dense term) on the ``--pretrain`` datasets;
* ``joint``: from joint 2D/3D pretraining (all terms, the plugin's default);
* ``staged``: from the authors' staged schedule (L_intra, then L_mask with f_intra frozen, then L_inter).

Each pretrained arm pretrains once (seeded by ``--seed``). The fine-tuned networks predict the test
cases; Dice per class and case is computed against the test labels. Mean and spread over the seeds go
into ``OUT/report/benchmark.{json,md,png}``, rewritten after every finished run, so a long run can be
looked at while it goes on.

Test cases: the target's ``imagesTs``/``labelsTs`` when both exist, otherwise ``--test-fraction`` of
its training cases, held out once (by ``--seed``) and for every run. Test labels are read only by the
evaluation after a network has finished training: not by planning, pretraining, fine-tuning or model
selection (fine-tuning keeps nnU-Net's final checkpoint; its validation uses training-pool cases).
When the target is also a pretraining source, only its training pool enters pretraining.

``--heldout ID``: a labeled dataset of the target's distribution that nothing trains or tunes on (not the
target, not a pretraining source; the target's labels, file ending and channels). After fine-tuning, every
run's final checkpoint also predicts its ``imagesTs``/``labelsTs`` (else all of ``imagesTr``/``labelsTr``),
scored and summarised as the test cases, in a report section of its own. A read-out, not part of the
experiment's settings: adding it to a finished folder runs only the read-out steps.

Nothing is written into your nnU-Net folders: ``OUT/raw`` holds links to the source datasets and a
linked copy of the target with the test split made explicit; preprocessed data, results, predictions,
logs and reports live under ``OUT`` too. Every step leaves a marker: re-running the same command
continues a killed run (an interrupted training resumes from its latest checkpoint), and re-running
with more ``--seeds``, ``--labeled`` counts or ``--arms`` adds only the missing runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.experiments.budgets import (
    FINETUNE_RECIPES,
    TrainingBudget,
    default_preset,
    read_finetune_overrides,
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
    format_seconds,
    resolve_preset_choice,
    run_interruptibly,
    write_splits,
)
from nnssl_joint.naming import (
    FINETUNE_TRAINER,
    PLANS_NAME,
    STOCK_BUDGET_TRAINER,
    STOCK_PLANS_NAME,
    dataset_folder_name,
    run_folder,
)

PRETRAIN_NAME = "BenchmarkPretrain"

ARM_LABELS = {
    "scratch": "from scratch",
    "intra": "2D-only pretraining (L_intra + dense)",
    "joint": "joint 2D/3D pretraining",
    "staged": "staged pretraining (authors' schedule)",
    "nnunet": "stock nnU-Net (nnUNetPlans, from scratch)",
}
#: arms that start from random weights: the baselines every pretrained arm is compared with
BASELINES = ("scratch", "nnunet")
#: the fine-tuning key ``new_parts_init`` of every plugin arm unless ``--finetune`` sets it: ``run``, so a run
#: from pretrained weights keeps its own seed's decoder (the one the scratch run of that seed starts from)
#: instead of the exported file's single draw, and a seed varies the same things in every arm. Earlier
#: benchmarks used the file's decoder (``file``; docs/pretraining.md, sixteenth pass)
BENCHMARK_NEW_PARTS_INIT = "run"


def _comma_integers(text: str, flag: str, expected: str) -> list[int]:
    """``"4, 2,2"`` -> ``[2, 4]`` (sorted, unique); otherwise an error naming ``flag`` and ``expected``."""
    try:
        return sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise NnsslJointError(f"{flag} {text!r}: expected {expected}") from None


def parse_labeled(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (sorted, unique, each >= 1)."""
    values = _comma_integers(text, "--labeled", "comma-separated integers such as 1,2,4")
    if not values or values[0] < 1:
        raise NnsslJointError(f"--labeled {text!r}: every count must be >= 1")
    return values


def parse_seed_list(text: str) -> list[int]:
    """``"2,3,4"`` -> ``[2, 3, 4]`` (``--run-seeds``; the range is checked against ``--seeds`` later)."""
    return _comma_integers(text, "--run-seeds", "comma-separated seeds such as 2,3,4")


#: arms of a benchmark without --arms: both baselines and both pretrained arms
DEFAULT_ARMS = ("scratch", "nnunet", "intra", "joint")


def parse_arms(text: str) -> list[str]:
    arms = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARM_LABELS]
    if not arms or unknown:
        raise NnsslJointError(f"--arms {text!r}: unknown arm(s) {unknown}; "
                              f"choose from {', '.join(ARM_LABELS)}")
    return list(dict.fromkeys(arms))


def run_name(labeled: int, seed: int) -> str:
    return f"L{labeled}_s{seed}"


def benchmark_split(identifiers: Sequence[str], labeled: int, seed: int, n_val: int = 1
                    ) -> dict[str, list[str]]:
    """The fine-tuning split of one (labeled count, seed): validation cases first, then the labeled ones,
    from one permutation of the training pool per seed. For one seed the labeled sets are nested
    (the 1 case is among the 2, which are among the 4) and the validation cases are the same for every
    count; adding a count or a seed later never changes an earlier split. ``n_val`` 0: the labeled cases
    validate themselves (as nnU-Net's fold ``all``)."""
    identifiers = sorted(identifiers)
    if len(identifiers) < labeled + n_val:
        raise NnsslJointError(
            f"{labeled} labeled case(s) plus {n_val} validation case(s) need {labeled + n_val} cases in the "
            f"target's training pool, it has {len(identifiers)}; ask for fewer labeled cases (--labeled), "
            "fewer validation cases (--val-cases, 0 validates on the labeled cases) or hold out fewer test "
            "cases (--test-fraction)")
    order = np.random.default_rng([seed, 1]).permutation(len(identifiers))
    train = sorted(identifiers[i] for i in order[n_val:n_val + labeled])
    return {"train": train, "val": sorted(identifiers[i] for i in order[:n_val]) if n_val else list(train)}


def held_out_cases(identifiers: Sequence[str], fraction: float, seed: int, keep: int = 2) -> list[str]:
    """``fraction`` of the cases (at least one, leaving at least ``keep``), drawn once by ``seed``."""
    identifiers = sorted(identifiers)
    if not 0 < fraction < 1:
        raise NnsslJointError(f"--test-fraction must be between 0 and 1, got {fraction}")
    n = max(1, round(fraction * len(identifiers)))
    if len(identifiers) - n < keep:
        raise NnsslJointError(f"the target has {len(identifiers)} labeled training cases and no "
                              f"imagesTs/labelsTs: holding out {n} as test cases leaves "
                              f"{len(identifiers) - n}, fewer than the {keep} the labeled and validation "
                              "cases need. Add cases, provide imagesTs/labelsTs, ask for fewer labeled "
                              "cases (--labeled) or validate on the labeled cases (--val-cases 0)")
    order = np.random.default_rng([seed, 2]).permutation(len(identifiers))
    return sorted(identifiers[i] for i in order[:n])


# ----------------------------------------------------------------------------------------------------
# the target dataset with an explicit test split


def _label_file(folder: Path, dataset_json: dict, identifier: str, split: str = "Tr") -> Path:
    entry = dataset_json.get("dataset", {}).get(identifier) if split == "Tr" else None
    if entry is not None and "label" in entry:
        path = Path(entry["label"]).expanduser()
        return path if path.is_absolute() else (folder / path).resolve()
    return folder / f"labels{split}" / f"{identifier}{dataset_json['file_ending']}"


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    os.symlink(Path(source).resolve(), target)


@dataclass
class TargetSplit:
    """The target's training pool and test cases, found by :func:`split_target` (nothing written)."""

    source: Path
    dataset_json: dict[str, Any]
    cases: list[Any]  # nnssl_joint.planning.raw.RawCase of imagesTr
    pool: list[Any]
    test: list[str]
    own_test: bool

    @property
    def pool_ids(self) -> list[str]:
        return sorted(c.identifier for c in self.pool)


def labels_ts_cases(source: Path, dataset_json: dict, context: str = "") -> dict[str, list[Path]] | None:
    """The dataset's own test cases (every ``labelsTs`` label, sorted) with their ``imagesTs`` files, one
    per channel; None when it has no ``imagesTs``/``labelsTs`` with labels. A label whose images are
    missing is refused, naming the files (``context`` prefixes the message)."""
    from nnssl_joint.planning.raw import channel_names_of

    ending = dataset_json["file_ending"]
    images_ts, labels_ts = Path(source) / "imagesTs", Path(source) / "labelsTs"
    if not (images_ts.is_dir() and labels_ts.is_dir() and any(labels_ts.glob(f"*{ending}"))):
        return None
    n_channels = len(channel_names_of(dataset_json))
    images = {c: [images_ts / f"{c}_{i:04d}{ending}" for i in range(n_channels)]
              for c in case_identifiers(labels_ts, ending)}
    absent = [p.name for files in images.values() for p in files if not p.is_file()]
    if absent:
        raise NnsslJointError(f"{context}{labels_ts} has labels whose images are missing in {images_ts}: "
                              f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}; add them or "
                              "remove those labels")
    return images


def split_target(source: Path, test_fraction: float, seed: int, keep: int = 2) -> TargetSplit:
    """Check the target (labels declared, every training case labeled, test images complete) and split it
    into training pool and test cases: the source's own imagesTs/labelsTs, or ``test_fraction`` of its
    training cases, leaving at least ``keep`` in the pool."""
    from nnssl_joint.planning.raw import list_cases, load_dataset_json

    source = Path(source)
    dataset_json = load_dataset_json(source)
    if "labels" not in dataset_json or len(dataset_json["labels"]) < 2:
        raise NnsslJointError(f"{source / 'dataset.json'}: the target needs 'labels' with at least one "
                              "foreground class; is this an unlabeled (pretraining) dataset?")
    cases = list_cases(source, dataset_json)
    missing = [c.identifier for c in cases if not _label_file(source, dataset_json, c.identifier).is_file()]
    if missing:
        raise NnsslJointError(f"{len(missing)} training case(s) of {source.name} have no label file, e.g. "
                              f"{_label_file(source, dataset_json, missing[0])}; the target must be "
                              "fully labeled")
    own_images = labels_ts_cases(source, dataset_json)
    own_test = own_images is not None
    if own_test:
        test = list(own_images)
        pool = cases
    else:
        held = set(held_out_cases([c.identifier for c in cases], test_fraction, seed, keep))
        test = sorted(held)
        pool = [c for c in cases if c.identifier not in held]
    return TargetSplit(source, dataset_json, cases, pool, test, own_test)


def link_target_dataset(source: Path, destination: Path, test_fraction: float, seed: int, keep: int = 2
                        ) -> dict[str, Any]:
    """Build ``destination`` (a raw dataset of links into ``source``): imagesTr/labelsTr hold the training
    pool, imagesTs/labelsTs the test cases (the source's own, or ``test_fraction`` of its training cases).
    The source is only read. Written into a temporary folder and renamed: no half-built dataset."""
    split = split_target(source, test_fraction, seed, keep)
    source, dataset_json, cases, pool, test, own_test = (split.source, split.dataset_json, split.cases,
                                                         split.pool, split.test, split.own_test)
    ending = dataset_json["file_ending"]
    images_ts, labels_ts = source / "imagesTs", source / "labelsTs"
    tmp = destination.with_name(f".{destination.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    for case in pool:
        for channel, f in enumerate(case.files):
            _link(Path(f), tmp / "imagesTr" / f"{case.identifier}_{channel:04d}{ending}")
        _link(_label_file(source, dataset_json, case.identifier),
              tmp / "labelsTr" / f"{case.identifier}{ending}")
    if own_test:
        for c in test:
            for f in sorted(images_ts.glob(f"{c}_[0-9][0-9][0-9][0-9]{ending}")):
                _link(f, tmp / "imagesTs" / f.name)
            _link(labels_ts / f"{c}{ending}", tmp / "labelsTs" / f"{c}{ending}")
    else:
        by_id = {c.identifier: c for c in cases}
        for c in test:
            for channel, f in enumerate(by_id[c].files):
                _link(Path(f), tmp / "imagesTs" / f"{c}_{channel:04d}{ending}")
            _link(_label_file(source, dataset_json, c), tmp / "labelsTs" / f"{c}{ending}")
    derived = {k: v for k, v in dataset_json.items() if k != "dataset"}
    derived["numTraining"] = len(pool)
    (tmp / "dataset.json").write_text(json.dumps(derived, indent=2) + "\n")
    if destination.is_symlink() or destination.is_file():
        destination.unlink()
    elif destination.exists():
        shutil.rmtree(destination)
    os.replace(tmp, destination)
    return {"source": str(source), "test_source": "imagesTs/labelsTs" if own_test else
            f"{test_fraction:g} of imagesTr held out (seed {seed})", "test_cases": test,
            "training_pool": sorted(c.identifier for c in pool)}


# ----------------------------------------------------------------------------------------------------
# the held-out read-out (--heldout): a labeled dataset of the target's distribution nothing trains or tunes on


@dataclass
class HeldoutSet:
    """The labeled cases of a ``--heldout`` dataset, found by :func:`read_heldout_set` (nothing written, no
    label read)."""

    source: Path
    dataset_json: dict[str, Any]
    #: case -> its image files in channel order
    images: dict[str, list[Path]]
    #: case -> its label file
    labels: dict[str, Path]
    own_test: bool

    @property
    def test_source(self) -> str:
        return "imagesTs/labelsTs" if self.own_test else "all of imagesTr/labelsTr"


def read_heldout_set(source: Path) -> HeldoutSet:
    """The cases of a held-out read-out: ``imagesTs``/``labelsTs`` when both exist, otherwise every case of
    ``imagesTr``/``labelsTr`` (nothing trains on the dataset). Every label needs its images and every
    ``imagesTr`` case its label; refused otherwise, naming the file."""
    from nnssl_joint.planning.raw import list_cases, load_dataset_json

    source = Path(source)
    dataset_json = load_dataset_json(source)
    ending = dataset_json["file_ending"]
    images_ts, labels_ts = source / "imagesTs", source / "labelsTs"
    images = labels_ts_cases(source, dataset_json, f"--heldout {source.name}: ")
    if images is not None:
        return HeldoutSet(source, dataset_json, images, {c: labels_ts / f"{c}{ending}" for c in images}, True)
    try:
        cases = list_cases(source, dataset_json)
    except NnsslJointError as e:
        raise NnsslJointError(f"--heldout {source.name} has no labeled case in imagesTs/labelsTs, and its "
                              f"imagesTr cannot be read: {e}") from None
    labels = {c.identifier: _label_file(source, dataset_json, c.identifier) for c in cases}
    missing = [p for p in labels.values() if not p.is_file()]
    if len(missing) == len(labels):
        raise NnsslJointError(f"--heldout {source.name} has no labeled case: no labels in {labels_ts} (with "
                              f"images in {images_ts}) and none for its imagesTr cases, e.g. {missing[0]}; "
                              "a held-out read-out needs labeled cases")
    if missing:
        raise NnsslJointError(f"--heldout {source.name}: {len(missing)} of its {len(labels)} imagesTr "
                              f"case(s) have no label file, e.g. {missing[0]}; without imagesTs/labelsTs "
                              "every imagesTr case is a held-out case: add the labels or remove those images")
    return HeldoutSet(source, dataset_json, {c.identifier: [Path(f) for f in c.files] for c in cases}, labels,
                      False)


def link_heldout_set(held: HeldoutSet, destination: Path) -> None:
    """``destination/imagesTs`` and ``labelsTs``: links to exactly the held-out cases, named as nnU-Net's
    predictor wants them. Written into a temporary folder and renamed: no half-built folder."""
    ending = held.dataset_json["file_ending"]
    tmp = destination.with_name(f".{destination.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    for case, files in held.images.items():
        for channel, f in enumerate(files):
            _link(f, tmp / "imagesTs" / f"{case}_{channel:04d}{ending}")
        _link(held.labels[case], tmp / "labelsTs" / f"{case}{ending}")
    if destination.exists():
        shutil.rmtree(destination)
    os.replace(tmp, destination)


# ----------------------------------------------------------------------------------------------------
# statistics


def run_mean_dice(per_case: dict[str, dict[str, float]]) -> float:
    """Mean over test cases of the mean over classes (classes absent from both prediction and reference
    are skipped for that case)."""
    values = []
    for scores in per_case.values():
        finite = [v for v in scores.values() if v is not None and not math.isnan(v)]
        if finite:
            values.append(float(np.mean(finite)))
    return float(np.mean(values)) if values else float("nan")


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one value), min, max and n of ``values`` (NaNs dropped)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


#: resamples of the seeds behind the 95% interval of a paired gain
GAIN_BOOTSTRAP_SAMPLES = 10_000


def bootstrap_interval(values: Sequence[float], samples: int = GAIN_BOOTSTRAP_SAMPLES,
                       seed: int = 0) -> list[float] | None:
    """Percentile 95% interval of the mean of ``values`` (one paired gain per seed), resampling the seeds
    with replacement (fixed generator seed: the report is reproducible); None for fewer than two values,
    where the seeds give no spread."""
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return None
    draws = v[np.random.default_rng(seed).integers(0, v.size, (samples, v.size))].mean(axis=1)
    low, high = np.percentile(draws, [2.5, 97.5])
    return [float(low), float(high)]


def aggregate(results: dict[str, dict[str, Any]], arms: Sequence[str], labeled: Sequence[int],
              seeds: Sequence[int], classes: dict[str, str]) -> dict[str, Any]:
    """Per arm and labeled count: Dice mean/spread over seeds (overall and per class) and, for every other
    arm, the paired gain over each baseline (``scratch``, ``nnunet``: same split and fine-tuning seed) in
    Dice points, with its bootstrap 95% interval over seeds (``ci95``)."""
    table: dict[str, dict[str, Any]] = {}
    for arm in arms:
        table[arm] = {}
        for k in labeled:
            runs = [results.get(f"{arm}/{run_name(k, s)}") for s in seeds]
            done = [r for r in runs if r is not None]
            entry = {"dice": spread([r["mean_dice"] for r in done]),
                     "per_seed": {str(s): (r["mean_dice"] if r is not None else None)
                                  for s, r in zip(seeds, runs)},
                     "per_class": {c: spread([float(np.nanmean([case.get(c, float("nan"))
                                                                for case in r["dice"].values()]))
                                              for r in done if any(not math.isnan(case.get(c, float("nan")))
                                                                   for case in r["dice"].values())])
                                   for c in classes}}
            for baseline in BASELINES:
                if arm == baseline or baseline not in arms:
                    continue
                diffs = []
                for s in seeds:
                    a, b = results.get(f"{arm}/{run_name(k, s)}"), results.get(f"{baseline}/{run_name(k, s)}")
                    if a is not None and b is not None:
                        diffs.append(100.0 * (a["mean_dice"] - b["mean_dice"]))
                entry[f"gain_vs_{baseline}_points"] = {**spread(diffs), "ci95": bootstrap_interval(diffs)}
                entry[f"wins_vs_{baseline}"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
            table[arm][str(k)] = entry
    return table


# ----------------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class BenchmarkSettings:
    pretrain: list[str]
    target: str
    out: Path
    labeled: list[int]
    seeds: int = 3
    #: default: both baselines (the plugin's network from scratch, stock nnU-Net) and both pretrained arms, so
    #: every pretrained arm is reported against both (issue 16)
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    budget: str = "small"
    seed: int = 0
    test_fraction: float = 0.25
    val_cases: int = 1
    configuration: str = "3d_fullres"
    device: str = "cpu"
    raw: Path | None = None
    #: architecture preset of pretraining and the plugin's downstream plans: a shipped name, a preset JSON
    #: file, or ``nnunet`` (the 2D topology nnU-Net's planner gives the target); None: follows the device
    #: (budgets.DEFAULT_PRESETS: nnunet on CPU, gpu on CUDA)
    preset: str | None = None
    #: fine-tuning recipe of the plugin's arms (:data:`nnssl_joint.experiments.budgets.FINETUNE_RECIPES`)
    recipe: str = "plugin"
    #: objective keys for every pretraining arm (``--pretrain-objective``: JSON text or file); {}: defaults
    pretrain_objective: dict[str, Any] = field(default_factory=dict)
    #: ``data`` and ``optim`` keys for every pretraining arm (``--pretrain-options``: JSON text or file),
    #: e.g. more windows per step or per-part gradient clipping; {}: the defaults
    pretrain_options: dict[str, Any] = field(default_factory=dict)
    #: fine-tuning keys for every run of the plugin's networks (``--finetune``: JSON text or file), e.g. a
    #: lower learning rate for the pretrained parts; {}: the recipe's defaults. Not for the stock arm
    finetune: dict[str, Any] = field(default_factory=dict)
    #: labeled datasets of the target's distribution that every fine-tuned run also predicts (``--heldout``):
    #: a read-out, not part of the experiment, so not in :meth:`record` (an existing folder takes it)
    heldout: list[str] = field(default_factory=list)
    #: which of the ``seeds`` seeds this invocation fine-tunes (``--run-seeds``), so that several machines
    #: can share one experiment's runs; None: all of them. Not in :meth:`record`: the report still covers
    #: every seed, with the runs another invocation finished in the same folder
    run_seeds: list[int] | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out).expanduser().resolve()
        self.arms = parse_arms(",".join(self.arms))
        self.pretrain = [str(p) for p in self.pretrain]
        self.heldout = list(dict.fromkeys(str(h) for h in self.heldout))
        if self.seeds < 1:
            raise NnsslJointError(f"--seeds must be >= 1, got {self.seeds}")
        if self.run_seeds is not None:
            self.run_seeds = sorted(set(self.run_seeds))
            outside = [v for v in self.run_seeds if not 0 <= v < self.seeds]
            if not self.run_seeds or outside:
                raise NnsslJointError(
                    f"--run-seeds {','.join(map(str, outside or self.run_seeds)) or '(empty)'}: --seeds "
                    f"{self.seeds} defines seeds 0-{self.seeds - 1}; name some of those (e.g. --run-seeds "
                    f"{self.seeds - 1}) or raise --seeds")
        if self.val_cases < 0:
            raise NnsslJointError(f"--val-cases must be >= 0 (0: validate on the labeled cases), "
                                  f"got {self.val_cases}")
        if self.configuration not in ("3d_fullres", "2d"):
            raise NnsslJointError(f"-c must be 3d_fullres or 2d, got {self.configuration!r}")
        if self.device not in ("cpu", "cuda"):
            raise NnsslJointError(f"--device must be cpu or cuda, got {self.device!r}")
        pretrained = [a for a in self.arms if a not in BASELINES]
        if pretrained and not self.pretrain:
            raise NnsslJointError(f"--pretrain is needed for the pretrained arms {pretrained}")
        if self.recipe not in FINETUNE_RECIPES:
            raise NnsslJointError(f"--recipe must be one of {', '.join(FINETUNE_RECIPES)}, "
                                  f"got {self.recipe!r}")
        self.preset = resolve_preset_choice(default_preset(self.preset, self.device), self.device)
        self.budget_spec = TrainingBudget.resolve(self.budget)
        for arm in pretrained:  # a contradiction with an arm's own keys is refused before anything runs
            self.budget_spec.pretrain_config(arm, self.seed, objective_overrides=self.pretrain_objective,
                                             options=self.pretrain_options)
        # same, for --finetune, with the protocol's new_parts_init the runs get (finetune_config_of)
        self.budget_spec.finetune_config(self.seed, self.recipe,
                                         {"new_parts_init": self.new_parts_init, **self.finetune})
        if self.raw is None:
            from nnssl_joint.naming import nnunet_raw

            self.raw = nnunet_raw()
        self.raw = Path(self.raw).expanduser().resolve()

    def record(self) -> dict[str, Any]:
        """What defines the experiment; --labeled, --seeds and --arms may grow between runs."""
        record = {"pretrain": self.pretrain, "target": self.target, "budget": asdict(self.budget_spec),
                  "seed": self.seed, "test_fraction": self.test_fraction, "val_cases": self.val_cases,
                  "configuration": self.configuration}
        # records of earlier versions have neither key and mean preset cpu, recipe plugin: such experiments
        # continue; another preset or recipe is another experiment
        if self.preset != "cpu":
            record["preset"] = self.preset
        if self.recipe != "plugin":
            record["recipe"] = self.recipe
        if self.pretrain_objective:
            record["pretrain_objective"] = self.pretrain_objective
        if self.pretrain_options:
            record["pretrain_options"] = self.pretrain_options
        finetune = {k: v for k, v in self.finetune.items() if k != "new_parts_init"}
        if finetune:
            record["finetune"] = finetune
        # records of earlier versions have no key and meant the file's decoder: such experiments continue with
        # --finetune '{"new_parts_init": "file"}'
        if self.new_parts_init != "file":
            record["new_parts_init"] = self.new_parts_init
        return record

    @property
    def new_parts_init(self) -> str:
        """Where the decoder of the pretrained arms starts (:data:`BENCHMARK_NEW_PARTS_INIT` unless
        ``--finetune`` says otherwise)."""
        return self.finetune.get("new_parts_init", BENCHMARK_NEW_PARTS_INIT)


# ----------------------------------------------------------------------------------------------------
# checks before anything runs


def _is_2d(path: Path) -> tuple[bool, list[int]]:
    """Whether an image file is 2D (a 2D format, a 2D image, or one slice), and its size (header only)."""
    import SimpleITK as sitk

    if path.name.lower().endswith((".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")):
        return True, []
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size = list(reader.GetSize())
    return len(size) == 2 or (len(size) == 3 and size[2] == 1), size


def check_inputs(settings: BenchmarkSettings) -> dict[str, Any]:
    """Every constraint on the datasets and the split, checked before anything is merged, planned or
    trained (seconds, not the hours after which a late step would fail); raises NnsslJointError naming the
    fix. Reads images headers and the label files of training-pool cases that fine-tuning will use; test
    labels are only checked to exist (their content is read by the evaluation alone)."""
    from nnssl_joint.planning.raw import find_raw_dataset, load_dataset_json

    s = settings
    target = find_raw_dataset(s.target, s.raw)
    sources = [find_raw_dataset(source, s.raw) for source in s.pretrain]
    for source in sources:
        load_dataset_json(source)  # exists, readable dataset.json
    keep = max(s.labeled) + s.val_cases
    split = split_target(target, s.test_fraction, s.seed, keep)
    if not split.test:
        raise NnsslJointError(f"{target.name} has no test cases; add imagesTs/labelsTs or use "
                              "--test-fraction")
    pool = split.pool_ids
    used: set[str] = set()
    for seed in range(s.seeds):
        chosen = benchmark_split(pool, max(s.labeled), seed, s.val_cases)  # raises when the pool is too small
        used |= set(chosen["train"]) | set(chosen["val"])
    labels = split.dataset_json["labels"]
    declared = {int(v) for v in labels.values() if not isinstance(v, (list, tuple))}
    region_based = any(isinstance(v, (list, tuple)) for v in labels.values())
    by_id = {c.identifier: c for c in split.pool}
    first = by_id[min(used)]
    is_2d, size = _is_2d(Path(first.files[0]))
    if s.configuration == "3d_fullres" and is_2d:
        raise NnsslJointError(f"{target.name} holds 2D images "
                              f"({Path(first.files[0]).name}{f', size {size}' if size else ''}"
                              "); 3d_fullres needs volumes. Run the benchmark with -c 2d")
    from nnssl_joint.experiments.pipeline import read_label

    for case in sorted(used):
        label_file = _label_file(target, split.dataset_json, case)
        values = {int(v) for v in np.unique(read_label(label_file))}
        if not region_based and not values <= declared:
            raise NnsslJointError(
                f"{label_file} holds label value(s) {sorted(values - declared)} that "
                f"{target / 'dataset.json'} does not declare (labels {dict(labels)}); "
                "add them to 'labels' or fix the label file")
        _, image_size = _is_2d(Path(by_id[case].files[0]))
        _, label_size = _is_2d(label_file)
        if image_size and label_size and image_size != label_size:
            raise NnsslJointError(f"{label_file} has size {label_size} but its image "
                                  f"{by_id[case].files[0]} has {image_size}; every label must have its "
                                  "image's geometry")
    n_channels = len(split.dataset_json.get("channel_names", {}))
    checked = {"target": target.name, "training_pool": len(pool), "test_cases": len(split.test),
               "labeled_and_validation_cases_checked": len(used), "channels": n_channels, "2d": is_2d}
    if s.heldout:
        checked["heldout_cases"] = check_heldout(s, target, split.dataset_json, sources, is_2d)
    return checked


def check_heldout(settings: BenchmarkSettings, target: Path, target_json: dict[str, Any],
                  pretrain_sources: Sequence[Path], target_is_2d: bool) -> dict[str, int]:
    """The ``--heldout`` datasets, before anything runs: neither the target nor a pretraining source, the
    target's labels, file ending, channels and dimensionality, and labeled cases with their images (label
    files are only checked to exist). Returns the number of cases of each."""
    from nnssl_joint.planning.raw import (
        channel_names_of,
        find_raw_dataset,
        load_dataset_json,
        parse_dataset_folder_name,
    )

    pretrain_ids = {parse_dataset_folder_name(p.name)[0] for p in pretrain_sources}
    target_id = parse_dataset_folder_name(target.name)[0]
    target_channels = len(channel_names_of(target_json))
    checked: dict[str, int] = {}
    for name in settings.heldout:
        source = find_raw_dataset(name, settings.raw)
        dataset_id = parse_dataset_folder_name(source.name)[0]
        if dataset_id == target_id:
            raise NnsslJointError(f"--heldout {name} is the target {target.name} itself: its cases train, "
                                  "validate and test the runs. Pass a labeled dataset of the same "
                                  "distribution that nothing trains or tunes on")
        if dataset_id in pretrain_ids:
            raise NnsslJointError(f"--heldout {name} ({source.name}) is one of the --pretrain sources: "
                                  "pretraining sees its images, so it is not held out. Drop it from "
                                  "--pretrain (another experiment, in another --out) or choose another "
                                  "--heldout dataset")
        held_json = load_dataset_json(source)
        path, target_path = source / "dataset.json", target / "dataset.json"
        if held_json.get("labels") != target_json["labels"]:
            raise NnsslJointError(f"{path}: labels {held_json.get('labels')} differ from "
                                  f"{target_json['labels']} of the target ({target_path}); the held-out "
                                  "read-out scores the target's classes, so names and values must be the "
                                  "same: fix its 'labels' (and label files) or choose another --heldout "
                                  "dataset")
        if held_json["file_ending"] != target_json["file_ending"]:
            raise NnsslJointError(f"{path}: file_ending {held_json['file_ending']!r} differs from "
                                  f"the target's {target_json['file_ending']!r} ({target_path}); the "
                                  "fine-tuned networks predict files of the target's format: convert the "
                                  "held-out images and labels")
        channels = len(channel_names_of(held_json))
        if channels != target_channels:
            raise NnsslJointError(f"{path}: {channels} channel(s) (channel_names), the target has "
                                  f"{target_channels} ({target_path}); the fine-tuned networks take the "
                                  "target's channels: choose a held-out dataset with the same channels")
        held = read_heldout_set(source)  # labeled cases with their images
        first = held.images[min(held.images)][0]
        is_2d, size = _is_2d(first)
        if is_2d != target_is_2d:
            raise NnsslJointError(f"--heldout {source.name} holds {'2D' if is_2d else '3D'} images "
                                  f"({first.name}{f', size {size}' if size else ''}), the target "
                                  f"{'2D' if target_is_2d else '3D'} ones; choose a held-out dataset of the "
                                  "target's kind")
        checked[source.name] = len(held.labels)
    return checked


class Benchmark(Pipeline):
    state_dir = ".benchmark"
    kind = "benchmark"

    def __init__(self, settings: BenchmarkSettings, stream: TextIO | None = None) -> None:
        super().__init__(settings.out, settings.device, stream)
        self.settings = settings
        self.budget = settings.budget_spec
        self.report_folder = settings.out / "report"
        self.target_name = ""
        self.target_id = 0
        self.pretrain_id = 0
        self.pretrain_ids: list[int] = []
        self.results: dict[str, dict[str, Any]] = {}
        #: held-out dataset -> ``arm/run`` -> the read-out of that run
        self.heldout_results: dict[str, dict[str, dict[str, Any]]] = {}

    # -------------------------------------------------------------- state
    def settings_record(self) -> dict[str, Any]:
        return self.settings.record()

    def settings_hint(self, changed: list[str], previous: dict[str, Any]) -> str:
        hint = super().settings_hint(changed, previous)
        old = self.old_budget_warmup(changed, previous)
        if old is not None:  # the budgets' old warm-up: a --budget file keeps it
            hint += f", or continue it with a --budget file that sets \"finetune_warmup_epochs\": {old}"
        if "new_parts_init" not in changed:
            return hint
        return hint + ("; a folder of an earlier version fine-tuned the pretrained arms from the exported "
                       "file's decoder: continue it with --finetune '{\"new_parts_init\": \"file\"}'")

    def state(self) -> dict[str, Any]:
        return {"target_name": self.target_name, "target_id": self.target_id, "pretrain_id": self.pretrain_id,
                "pretrain_ids": self.pretrain_ids}

    def restore(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    @property
    def pretrain_arms(self) -> list[str]:
        return [a for a in self.settings.arms if a not in BASELINES]

    @property
    def plugin_arms(self) -> list[str]:
        """Arms that fine-tune the plugin's networks (every arm but stock nnU-Net)."""
        return [a for a in self.settings.arms if a != "nnunet"]

    @property
    def needs_stock_plans(self) -> bool:
        return "nnunet" in self.settings.arms or self.settings.preset == NNUNET_PRESET

    @property
    def preset_argument(self) -> str:
        """What pretraining and the downstream planner get as preset: a name or a file."""
        return self.preset_file(self.settings.preset)

    @property
    def runs(self) -> list[tuple[int, int, str]]:
        """(seed, labeled, arm) of the experiment, in the order they run: all arms and counts of seed 0
        first. The folds and the report cover all of them."""
        return [(s, k, a) for s in range(self.settings.seeds) for k in self.settings.labeled
                for a in self.settings.arms]

    @property
    def own_runs(self) -> list[tuple[int, int, str]]:
        """The runs this invocation trains: those of ``--run-seeds`` (all without it)."""
        chosen = self.settings.run_seeds
        return [r for r in self.runs if chosen is None or r[0] in chosen]

    @property
    def pretrain_dataset(self) -> str:
        return dataset_folder_name(self.pretrain_id, PRETRAIN_NAME)

    def pretrain_folder(self, arm: str) -> Path:
        return self.pretrain_run_folder(arm, self.pretrain_dataset)

    @staticmethod
    def trainer_and_plans(arm: str) -> tuple[str, str]:
        """nnU-Net trainer and plans identifier of an arm's fine-tuning runs."""
        return (STOCK_BUDGET_TRAINER, STOCK_PLANS_NAME) if arm == "nnunet" else (FINETUNE_TRAINER, PLANS_NAME)

    def finetune_folder(self, arm: str, fold: int) -> Path:
        trainer, plans = self.trainer_and_plans(arm)
        return run_folder(self.results_root("finetune", arm), self.target_name, trainer, plans,
                          self.settings.configuration, fold)

    def predictions(self, arm: str, labeled: int, seed: int) -> Path:
        return self.out / "predictions" / arm / run_name(labeled, seed)

    @property
    def heldout_names(self) -> list[str]:
        """Folder names of this invocation's ``--heldout`` datasets, each once."""
        from nnssl_joint.planning.raw import find_raw_dataset

        return list(dict.fromkeys(find_raw_dataset(h, self.settings.raw).name for h in self.settings.heldout))

    def heldout_folder(self, name: str) -> Path:
        """imagesTs/labelsTs: links to the held-out cases of dataset ``name``."""
        return self.out / "heldout" / name

    def heldout_predictions(self, name: str, arm: str, labeled: int, seed: int) -> Path:
        return self.out / "predictions_heldout" / name / arm / run_name(labeled, seed)

    @staticmethod
    def heldout_key(name: str, arm: str, labeled: int, seed: int) -> str:
        return f"heldout_{name}_{arm}_{run_name(labeled, seed)}"

    # -------------------------------------------------------------- steps
    def steps(self) -> list[Step]:
        """The steps in the order one worker runs them; ``needs`` lets a second worker on the same folder
        run what does not wait on the pretraining (nnU-Net's planning, the scratch and stock runs) while
        the first pretrains (:meth:`Pipeline.run_steps`)."""
        stock = ("plan_stock",) if self.needs_stock_plans else ()
        steps = [Step("link", "linking the datasets (test split made explicit)", self.step_link, needs=())]
        if self.needs_stock_plans:
            steps.append(Step("plan_stock", "nnU-Net's own planning of the target (nnUNetPlans)",
                              self.step_plan_stock, needs=("link",)))
        if self.pretrain_arms:
            steps += [Step("prepare", "merging the pretraining datasets",
                           lambda p: self.prepare_pretraining(self.pretrain_ids, self.pretrain_id,
                                                              PRETRAIN_NAME, p), needs=("link",)),
                      Step("plan_pretrain", "planning + preprocessing the pretraining dataset",
                           lambda p: self.plan_pretraining(self.pretrain_id, p), needs=("link", "prepare"))]
            for arm in self.pretrain_arms:  # --preset nnunet: the preset is written by plan_stock
                steps.append(Step(f"pretrain_{arm}", f"pretraining for arm '{arm}'",
                                  lambda p, arm=arm: self.step_pretrain(arm, p),
                                  needs=("link", *stock, "plan_pretrain")))
        if self.plugin_arms:
            steps.append(Step("plan_target", "planning + preprocessing the target dataset",
                              self.step_plan_target, needs=("link", *stock)))
            if self.pretrain_arms:
                self.forget_stale_probe()
                pretrainings = tuple(f"pretrain_{a}" for a in self.pretrain_arms)
                steps.append(Step("probe", "probing the pretrained encoders against random initialisations",
                                  self.step_probe, needs=("link", "plan_target", *pretrainings)))
        target = ("link", *stock, *(("plan_target",) if self.plugin_arms else ()))
        steps.append(Step("splits", "fine-tuning splits", self.step_splits, always=True, needs=target))
        for seed, k, arm in self.own_runs:
            pretrained = () if arm in BASELINES else (f"pretrain_{arm}",)
            steps.append(Step(f"finetune_{arm}_{run_name(k, seed)}",
                              f"seed {seed}, {k} labeled: fine-tuning {arm} + predicting + evaluating",
                              lambda p, s=seed, k=k, a=arm: self.step_finetune(a, k, s, p), parallel=True,
                              needs=(*target, "splits", *pretrained)))
        for name in self.heldout_names:
            steps.append(Step(f"link_heldout_{name}", f"held-out read-out {name}: linking its labeled cases",
                              lambda p, n=name: self.step_link_heldout(n, p)))
            for seed, k, arm in self.own_runs:
                steps.append(Step(self.heldout_key(name, arm, k, seed),
                                  f"seed {seed}, {k} labeled: {arm} predicting + evaluating held-out {name}",
                                  lambda p, n=name, s=seed, k=k, a=arm: self.step_heldout(n, a, k, s, p),
                                  parallel=True))
        steps.append(Step("report", "writing the report", self.step_report, always=True))
        return steps

    def step_link(self, progress: StepProgress) -> dict[str, Any]:
        from nnssl_joint.planning.raw import find_raw_dataset, parse_dataset_folder_name

        s = self.settings
        target_source = find_raw_dataset(s.target, s.raw)
        self.target_id, _ = parse_dataset_folder_name(target_source.name)
        self.target_name = target_source.name
        sources = [find_raw_dataset(p, s.raw) for p in s.pretrain]
        self.pretrain_ids = [parse_dataset_folder_name(f.name)[0] for f in sources]
        used = set(self.pretrain_ids) | {self.target_id}
        self.pretrain_id = next(i for i in range(900, 1000) if i not in used)
        self.raw.mkdir(parents=True, exist_ok=True)
        info = link_target_dataset(target_source, self.raw / self.target_name, s.test_fraction, s.seed,
                                   max(s.labeled) + s.val_cases)
        for folder, dataset_id in zip(sources, self.pretrain_ids):
            if dataset_id == self.target_id:
                continue  # the linked target: its training pool only, never its test cases
            _link(folder, self.raw / folder.name)
        info["pretraining_sources"] = [f.name for f in sources]
        progress.note(f"target {self.target_name}: {len(info['training_pool'])} training-pool cases, "
                      f"{len(info['test_cases'])} test cases ({info['test_source']})")
        return info

    def step_plan_stock(self, progress: StepProgress) -> dict[str, Any]:
        """nnU-Net's own planning of the linked target: the plans of the ``nnunet`` arm, and the topology
        ``--preset nnunet`` takes."""
        s = self.settings
        plans = self.plan_stock(self.target_id, self.target_name, s.configuration, "nnunet" in s.arms,
                                progress)
        info: dict[str, Any] = {"configurations": sorted(plans["configurations"])}
        if s.preset == NNUNET_PRESET:
            info["preset"] = self.derive_nnunet_preset(plans, progress).to_dict()
        return info

    def step_pretrain(self, arm: str, progress: StepProgress) -> dict[str, Any]:
        config = self.budget.pretrain_config(arm, self.settings.seed, self.preset_argument,
                                             self.settings.pretrain_objective, self.settings.pretrain_options)
        return self.pretrain(arm, config, self.pretrain_id, self.pretrain_dataset,
                             self.budget.pretrain_epochs,
                             [f"pretrained_for_{self.settings.configuration}.pth"], progress)

    def step_plan_target(self, progress: StepProgress) -> dict[str, Any]:
        plans = self.plan_downstream(self.target_id, self.target_name, self.settings.configuration, progress,
                                     "plan_target", self.preset_argument)
        return {"configurations": sorted(plans["configurations"])}

    def check_preset_of(self, arm: str) -> Path:
        """The pretrained weights of ``arm``, checked to share the downstream plans' preset (the probe and
        every fine-tuning of the arm check before they start; the planning of the target does not wait
        for the pretraining)."""
        weights = self.pretrain_folder(arm) / f"pretrained_for_{self.settings.configuration}.pth"
        check_presets_agree(self.preprocessed / self.target_name / f"{PLANS_NAME}.json", weights)
        return weights

    def step_probe(self, progress: StepProgress) -> dict[str, Any]:
        """``nnssl_joint probe`` of every pretraining arm next to 5 random initialisations
        (report: probe.*)."""
        from nnssl_joint.probe.run import probe_pretraining_runs

        for arm in self.pretrain_arms:
            self.check_preset_of(arm)
        return probe_pretraining_runs({ARM_LABELS[arm]: self.pretrain_folder(arm)
                                       for arm in self.probe_arms()},
                                      self.target_id, self.settings.configuration, self.logs / "probe.log",
                                      out=self.report_folder, seed=self.settings.seed)

    def probe_arms(self) -> list[str]:
        """The pretraining arms the probe covers: this invocation's and every arm an earlier invocation
        pretrained into the same folder (``--arms`` may grow between invocations)."""
        return [a for a in ARM_LABELS if a not in BASELINES
                and (a in self.pretrain_arms or self.marker(f"pretrain_{a}").is_file())]

    def forget_stale_probe(self) -> None:
        """Remove the probe's marker when the folder holds a pretraining arm the probe did not read (one added
        by a later invocation), so the probe runs again over every arm instead of reporting without it."""
        marker = self.marker("probe")
        if not marker.is_file():
            return
        probed = {w.get("name") for w in json.loads(marker.read_text()).get("info", {}).get("weights", [])}
        arms = self.probe_arms()
        missing = [a for a in arms if ARM_LABELS[a] not in probed]
        if missing:
            marker.unlink()
            print(f"probe: arm(s) {', '.join(missing)} not probed yet; the probe runs again over "
                  f"{', '.join(arms)}", file=self.stream, flush=True)

    def fold_of(self, labeled: int, seed: int) -> int:
        """nnU-Net fold index of (labeled, seed); the registry only grows, so indices never change. Guarded
        by a lock: several workers may register folds at the same time."""
        import fcntl

        from nnssl_joint.common.checkpoint_io import atomic_write_text

        self.state_folder.mkdir(parents=True, exist_ok=True)
        registry_file = self.state_folder / "folds.json"
        with open(self.state_folder / "folds.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            registry = json.loads(registry_file.read_text()) if registry_file.is_file() else []
            name = run_name(labeled, seed)
            if name not in registry:
                registry.append(name)
                atomic_write_text(json.dumps(registry, indent=1) + "\n", registry_file)
            return registry.index(name)

    def step_splits(self, progress: StepProgress) -> dict[str, Any]:
        """splits_final.json with one fold per (labeled, seed) of this and earlier invocations."""
        raw = self.raw / self.target_name
        ending = json.loads((raw / "dataset.json").read_text())["file_ending"]
        pool = case_identifiers(raw / "labelsTr", ending)
        for seed, k, _ in self.runs:
            self.fold_of(k, seed)
        registry = json.loads((self.state_folder / "folds.json").read_text())
        splits = []
        for name in registry:
            k, seed = (int(x) for x in name[1:].split("_s"))
            splits.append(benchmark_split(pool, k, seed, self.settings.val_cases))
        write_splits(self.preprocessed / self.target_name, splits)
        return {"folds": dict(zip(registry, splits))}

    def finetune_config_of(self, arm: str, seed: int) -> tuple[str, dict[str, Any], str, dict[str, Any]]:
        """(recipe, --finetune overrides, file name, configuration) of the fine-tuning runs of ``arm`` and
        ``seed``. The stock arm keeps the plugin recipe's lengths and nothing else (its trainer reads only
        those); every plugin arm of a seed gets the same file, so the arms differ only in their start. A file
        name means one content: without overrides or another recipe the stock arm shares the plugin arms'
        file, ``new_parts_init`` included (its trainer ignores the key), because a stock run rewriting that
        file without it could hand a plugin run started beside it (two workers) the trainer's default."""
        s = self.settings
        recipe = "plugin" if arm == "nnunet" else s.recipe
        overrides = {} if arm == "nnunet" else dict(s.finetune)
        protocol = {"new_parts_init": s.new_parts_init}
        name = (f"finetune_seed{seed}" + ("" if recipe == "plugin" else f"_{recipe}")
                + ("_overrides" if overrides else ""))
        return recipe, overrides, name, self.budget.finetune_config(seed, recipe, {**protocol, **overrides})

    def step_finetune(self, arm: str, labeled: int, seed: int, progress: StepProgress) -> dict[str, Any]:
        s = self.settings
        fold = self.fold_of(labeled, seed)
        recipe, overrides, name, config = self.finetune_config_of(arm, seed)
        config_file = self.write_config(name, config)
        trainer, plans = self.trainer_and_plans(arm)
        folder = self.finetune_folder(arm, fold)
        weights = None
        # trains unless checkpoint_final.pth exists; else only prediction/evaluation were interrupted
        if not (folder / "checkpoint_final.pth").is_file():
            self.forget_heldout_read_outs(arm, labeled, seed, progress)
            start = None if arm in BASELINES else self.check_preset_of(arm)
            cmd, _, weights = self.train_command(self.target_id, s.configuration, fold, trainer, plans,
                                                 folder, start)
            progress.expect(self.budget.finetune_epochs, "epoch", "validating on the validation case(s)")
            self.run_command(cmd, self.env(self.results_root("finetune", arm), training=True,
                                           NNSSL_JOINT_FINETUNE_CONFIG=str(config_file)),
                             f"finetune_{arm}_{run_name(labeled, seed)}", progress)
        # the test labels are read there, after training and prediction finished, and nowhere before
        dice_json = self.predict_and_score(self.raw / self.target_name, self.predictions(arm, labeled, seed),
                                           arm, fold, f"predict_{arm}_{run_name(labeled, seed)}", progress)
        split = json.loads((self.preprocessed / self.target_name / "splits_final.json").read_text())[fold]
        run_plans = json.loads((folder.parent / "plans.json").read_text())
        result = {"arm": arm, "labeled": labeled, "seed": seed, "fold": fold, "run_folder": str(folder),
                  "trainer": trainer, "plans_name": run_plans["plans_name"],
                  "network_class": (run_plans["configurations"][s.configuration]["architecture"]
                                    ["network_class_name"]),
                  "recipe": recipe, "finetune_overrides": overrides,
                  "pretrained_weights": None if weights is None else str(weights),
                  "train_cases": split["train"], "validation_cases": split["val"],
                  "validated_on_training_cases": split["val"] == split["train"],
                  "dice": dice_json, "mean_dice": run_mean_dice(dice_json)}
        self.results[f"{arm}/{run_name(labeled, seed)}"] = result
        progress.note(f"mean Dice {result['mean_dice']:.3f}")
        self.write_report()
        return result

    def step_link_heldout(self, name: str, progress: StepProgress) -> dict[str, Any]:
        """Links to the labeled cases of held-out dataset ``name`` (its source is only read)."""
        from nnssl_joint.planning.raw import find_raw_dataset

        held = read_heldout_set(find_raw_dataset(name, self.settings.raw))
        link_heldout_set(held, self.heldout_folder(name))
        progress.note(f"{len(held.labels)} held-out cases ({held.test_source})")
        return {"dataset": name, "source": str(held.source), "test_source": held.test_source,
                "cases": sorted(held.labels)}

    def forget_heldout_read_outs(self, arm: str, labeled: int, seed: int, progress: StepProgress) -> None:
        """Remove the held-out markers of a run about to be trained (again): they scored a checkpoint that
        no longer exists, and a later ``--heldout`` invocation would otherwise skip them and report it."""
        suffix = f"_{arm}_{run_name(labeled, seed)}.done.json"
        stale = [m for m in self.state_folder.glob("heldout_*.done.json") if m.name.endswith(suffix)]
        for marker in stale:
            marker.unlink()
        if stale:
            progress.note(f"removed {len(stale)} held-out read-out(s) of the earlier checkpoint")

    def finished_finetune(self, key: str, progress: StepProgress) -> dict[str, Any]:
        """The marker info of fine-tuning step ``key``; waits (on its lock, :meth:`Pipeline.try_lock`) while
        another worker runs it. No marker afterwards (the fine-tuning failed or was stopped): NnsslJointError
        naming the run."""
        import fcntl

        handle, owner = self.try_lock(key)
        with handle:  # held only while the marker is read: a worker may want to train
            if owner is not None:
                progress.note(f"waiting for {owner} to finish {key}")
                fcntl.flock(handle, fcntl.LOCK_EX)
            marker = self.marker(key)
            if not marker.is_file():
                raise NnsslJointError(f"the run {key.removeprefix('finetune_')} has no finished fine-tuning "
                                      f"(no {marker}): it failed or was stopped in another worker, see "
                                      f"{self.logs / (key + '.log')}. Re-run the benchmark: it trains the "
                                      "run, then reads it out")
            return json.loads(marker.read_text())["info"]

    def step_heldout(self, name: str, arm: str, labeled: int, seed: int, progress: StepProgress
                     ) -> dict[str, Any]:
        """The final checkpoint of one run predicts the held-out cases of ``name``; Dice per class and case
        against their labels, as :meth:`step_finetune` does for the test cases."""
        finetune_key = f"finetune_{arm}_{run_name(labeled, seed)}"
        run = self.finished_finetune(finetune_key, progress)
        checkpoint = Path(run["run_folder"]) / "checkpoint_final.pth"
        if not checkpoint.is_file():
            raise NnsslJointError(f"{checkpoint} is missing although the run {arm} {run_name(labeled, seed)} "
                                  f"finished; delete {self.marker(finetune_key)} to train it again")
        out = self.heldout_predictions(name, arm, labeled, seed)
        # the held-out labels are read there, after prediction, and nowhere before (check_heldout and the link
        # see file names only); their dataset.json declares the target's labels (check_heldout)
        dice_json = self.predict_and_score(self.heldout_folder(name), out, arm, run["fold"],
                                           self.heldout_key(name, arm, labeled, seed), progress)
        result = {"dataset": name, "arm": arm, "labeled": labeled, "seed": seed, "fold": run["fold"],
                  "run_folder": run["run_folder"], "predictions": str(out), "dice": dice_json,
                  "mean_dice": run_mean_dice(dice_json)}
        self.heldout_results.setdefault(name, {})[f"{arm}/{run_name(labeled, seed)}"] = result
        progress.note(f"mean Dice {result['mean_dice']:.3f} on {name}")
        self.write_report()
        return result

    def predict_and_score(self, folder: Path, out: Path, arm: str, fold: int, log_key: str,
                          progress: StepProgress) -> dict[str, dict[str, float]]:
        """The final checkpoint of ``arm``'s run in nnU-Net fold ``fold`` predicts ``folder/imagesTs`` into
        ``out`` (replaced); returns Dice per case and class (class values as strings) against
        ``folder/labelsTs``, which is read only here, after the prediction finished."""
        dataset_json = json.loads((self.raw / self.target_name / "dataset.json").read_text())
        ending = dataset_json["file_ending"]
        trainer, plans = self.trainer_and_plans(arm)
        if out.exists():
            shutil.rmtree(out)
        cmd = self.predict_command(folder / "imagesTs", out, self.target_id, self.settings.configuration,
                                   fold, trainer, plans, self.budget.test_time_augmentation)
        progress.expect(len(case_identifiers(folder / "labelsTs", ending)), "case")
        self.run_command(cmd, self.env(self.results_root("finetune", arm)), log_key, progress)
        labels = sorted(int(v) for v in dataset_json["labels"].values() if int(v) > 0)
        dice = evaluate_predictions(out, folder / "labelsTs", ending, labels)
        return {case: {str(c): v for c, v in scores.items()} for case, scores in dice.items()}

    def step_report(self, progress: StepProgress) -> dict[str, Any]:
        files = self.write_report()
        return {"files": {k: str(v) for k, v in files.items()}}

    # -------------------------------------------------------------- report
    def collect(self) -> dict[str, Any]:
        """Finished runs (from the markers, so earlier invocations count) and their statistics."""
        for seed, k, arm in self.runs:
            key = f"{arm}/{run_name(k, seed)}"
            marker = self.marker(f"finetune_{arm}_{run_name(k, seed)}")
            if key not in self.results and marker.is_file():
                self.results[key] = json.loads(marker.read_text())["info"]
        raw = self.raw / self.target_name
        dataset_json = json.loads((raw / "dataset.json").read_text())
        classes = {str(v): k for k, v in dataset_json["labels"].items() if int(v) > 0}
        s = self.settings
        seeds = list(range(s.seeds))
        wanted = {f"{a}/{run_name(k, seed)}" for seed, k, a in self.runs}
        link = self.marker("link")
        link_info = json.loads(link.read_text())["info"] if link.is_file() else {}
        heldout = {name: self.collect_heldout(name, classes) for name in self.heldout_report_names()}
        import platform

        return {
            "settings": {**s.record(), "labeled": s.labeled, "seeds": s.seeds, "arms": s.arms,
                         "device": s.device, "out": str(s.out), "raw": str(s.raw), "heldout": s.heldout},
            "target": self.target_name, "classes": classes,
            "test_cases": link_info.get("test_cases"), "test_source": link_info.get("test_source"),
            "pretraining_sources": link_info.get("pretraining_sources"),
            "arms": {a: ARM_LABELS[a] for a in s.arms},
            "finished_runs": len(wanted & set(self.results)), "planned_runs": len(wanted),
            "summary": aggregate(self.results, s.arms, s.labeled, seeds, classes),
            "runs": {k: v for k, v in sorted(self.results.items()) if k in wanted},
            "heldout": heldout,
            "probe": (json.loads(self.marker("probe").read_text())["info"]
                      if self.marker("probe").is_file() else None),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def heldout_report_names(self) -> list[str]:
        """Held-out datasets whose cases are linked in this folder: this invocation's first, then those an
        earlier invocation (or another worker) added, so a run without ``--heldout`` keeps them in the
        report."""
        prefix, suffix = "link_heldout_", ".done.json"
        linked = sorted(p.name[len(prefix):-len(suffix)]
                        for p in self.state_folder.glob(f"{prefix}*{suffix}"))
        return [n for n in dict.fromkeys([*self.heldout_names, *linked]) if n in linked]

    def collect_heldout(self, name: str, classes: dict[str, str]) -> dict[str, Any]:
        """The read-out of held-out dataset ``name``: per-run results (from the markers) and their statistics,
        computed as the test set's."""
        s = self.settings
        results = self.heldout_results.setdefault(name, {})
        for seed, k, arm in self.runs:
            marker = self.marker(self.heldout_key(name, arm, k, seed))
            if f"{arm}/{run_name(k, seed)}" not in results and marker.is_file():
                results[f"{arm}/{run_name(k, seed)}"] = json.loads(marker.read_text())["info"]
        link_info = json.loads(self.marker(f"link_heldout_{name}").read_text())["info"]
        wanted = {f"{a}/{run_name(k, seed)}" for seed, k, a in self.runs}
        return {"dataset": name, "cases": len(link_info["cases"]), "case_ids": link_info["cases"],
                "test_source": link_info["test_source"], "source": link_info["source"],
                "finished_runs": len(wanted & set(results)), "planned_runs": len(wanted),
                "summary": aggregate(results, s.arms, s.labeled, list(range(s.seeds)), classes),
                "runs": {k: v for k, v in sorted(results.items()) if k in wanted}}

    def write_report(self) -> dict[str, Path]:
        from nnssl_joint.experiments.report import write_benchmark_report

        return write_benchmark_report(self.collect(), self.report_folder)

    # -------------------------------------------------------------- driver
    def run(self) -> dict[str, Any]:
        start = time.monotonic()
        checked = check_inputs(self.settings)
        print(f"checks passed in {time.monotonic() - start:.1f}s: {json.dumps(checked)}", file=self.stream,
              flush=True)
        self.check_settings()
        os.environ.update({k: v for k, v in self.env().items() if k.startswith("nnUNet_")})
        s = self.settings
        print(f"nnssl_joint benchmark: target {s.target}, pretraining on {', '.join(s.pretrain) or '-'}, "
              f"arms {','.join(s.arms)}, labeled {','.join(map(str, s.labeled))}, {s.seeds} seed(s)"
              + (f" (here: {','.join(map(str, s.run_seeds))})" if s.run_seeds is not None else "") + ", "
              f"budget {s.budget!r}, preset {s.preset!r}, recipe {s.recipe!r}"
              + (f", fine-tuning overrides {json.dumps(s.finetune)}" if s.finetune else "")
              + (f", held-out read-out on {', '.join(s.heldout)}" if s.heldout else "")
              + f"; output in {s.out}",
              file=self.stream, flush=True)
        aside = set_aside_sentence(s.pretrain_objective, s.arms)
        if aside:
            print(aside, file=self.stream, flush=True)
        self.run_steps(self.steps())
        report = json.loads((self.report_folder / "benchmark.json").read_text())
        print(summary_text(report, time.monotonic() - start), file=self.stream)
        print(f"report: {self.report_folder / 'benchmark.md'}", file=self.stream, flush=True)
        return report


def summary_text(report: dict[str, Any], seconds: float) -> str:
    lines = [(f"Dice (mean ± std over seeds; {report['finished_runs']}/{report['planned_runs']} runs, "
              f"{format_seconds(seconds)} this invocation):")]
    lines += _arm_lines(report["summary"])
    for name, held in (report.get("heldout") or {}).items():
        lines.append(f"Held-out read-out {name} ({held['cases']} cases; {held['finished_runs']}/"
                     f"{held['planned_runs']} runs):")
        lines += _arm_lines(held["summary"])
    return "\n".join(lines)


def _arm_lines(summary: dict[str, Any]) -> list[str]:
    """One line per arm of an :func:`aggregate` summary: mean ± std per labeled count, gains over the
    baselines."""
    lines = []
    for arm, per_k in summary.items():
        parts = []
        for k, entry in per_k.items():
            d = entry["dice"]
            text = ("n/a" if d["mean"] is None
                    else f"{d['mean']:.3f}" + ("" if d["std"] is None else f"±{d['std']:.3f}"))
            for baseline in BASELINES:
                gain = entry.get(f"gain_vs_{baseline}_points")
                if gain and gain["mean"] is not None:
                    text += f" ({gain['mean']:+.1f} pts vs {baseline})"
            parts.append(f"{k} labeled {text}")
        lines.append(f"  {arm:8s} " + " | ".join(parts))
    return lines


# ----------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrain", nargs="+", default=[], metavar="ID",
                        help="raw datasets (ids or DatasetXXX_Name) to pretrain on, 2D and/or 3D, labeled "
                        "or not (labels are ignored); needed for every arm except scratch")
    parser.add_argument("--target", required=True, metavar="ID",
                        help="the labeled raw dataset to fine-tune on (imagesTr/labelsTr, and "
                        "imagesTs/labelsTs or --test-fraction)")
    parser.add_argument("--labeled", default="1,2,4", help="labeled training cases per run, comma-separated "
                        "(default 1,2,4)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per labeled count: each draws its own "
                        "labeled cases and fine-tuning seed (default 3)")
    parser.add_argument("--run-seeds", default=None, metavar="S[,S...]",
                        help="fine-tune only these of the --seeds seeds here (0-based, comma-separated), "
                        "e.g. to share one experiment between machines or workers; pretraining, probe and "
                        "report are the same, and the report includes the runs other invocations finished in "
                        "--out (default: every seed)")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help=f"comma-separated, from {', '.join(ARM_LABELS)} (default "
                        f"{','.join(DEFAULT_ARMS)}: every pretrained arm is compared with the plugin's "
                        "network from scratch and with stock nnU-Net)")
    parser.add_argument("--budget", default="small",
                        help="training lengths: tiny, small (default), medium, large (the demo's) or a JSON "
                        "file overriding keys of small: pretrain_epochs, pretrain_iterations, "
                        "finetune_epochs, finetune_iterations, finetune_val_iterations, "
                        "finetune_warmup_epochs (0 in every built-in budget: the same schedule for "
                        "every arm), test_time_augmentation")
    parser.add_argument("--out", default="benchmark_output",
                        help="output folder (default ./benchmark_output); re-run with the same folder to "
                        "continue or extend")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test hold-out and the pretraining "
                        "runs (default 0)")
    parser.add_argument("--test-fraction", type=float, default=0.25,
                        help="share of imagesTr held out as test cases when the target has no "
                        "imagesTs/labelsTs (default 0.25)")
    parser.add_argument("--val-cases", type=int, default=1,
                        help="validation cases per run, from the training pool (default 1); 0: validate on "
                        "the labeled cases themselves (nnU-Net's fold 'all'), so one labeled case suffices")
    parser.add_argument("--preset", default=None, metavar="cpu|gpu|nnunet|FILE.json",
                        help="architecture preset of pretraining and of the plugin's downstream plans "
                        "(default: gpu with --device cuda, else nnunet); nnunet: the 2D encoder topology "
                        "nnU-Net's own planner gives the target's 2d configuration (from scratch the 2d "
                        "network is stock nnU-Net's), so pretrained_for_2d.pth also loads into stock "
                        "nnUNetPlans 2d networks; cpu: the narrow CPU preset (faster, far behind stock "
                        "nnU-Net from scratch, docs/finetuning.md)")
    parser.add_argument("--recipe", default="plugin", choices=FINETUNE_RECIPES,
                        help="fine-tuning recipe of the plugin's arms: plugin (default: nnU-Net's poly "
                        "schedule, lr 1e-2, with the budget's warm-up, none in the built-in budgets) or "
                        "nnunet_warmup (nnU-Net's pretrained-weights recipe: linear warm-up of the "
                        "whole network, 5%% of the epochs unless the budget sets a warm-up, then poly; lr "
                        "1e-3 for pretrained networks); the warm-up acts on runs from pretrained weights "
                        "only, scratch runs follow nnU-Net's schedule")
    parser.add_argument("--pretrain-objective", default=None, metavar="JSON|FILE.json|paper",
                        help="objective keys for every pretraining arm, as JSON text or a file, e.g. "
                             "'{\"dense_stage\": 1}' (the dense term on stage 1, docs/pretraining.md), or "
                             "'paper' (the paper's objective, with --pretrain-options paper its whole "
                             "configuration); a key an arm sets itself (2D-only's volume weights) is refused")
    parser.add_argument("--pretrain-options", default=None, metavar="JSON|FILE.json|paper",
                        help="data and optim keys of the pretraining configuration for every pretraining "
                             "arm, as JSON text or a file, e.g. '{\"data\": {\"batch_size_3d\": 4}, "
                             "\"optim\": {\"grad_clip_mode\": \"global\", \"volume_lr_factor\": 1.0}}' "
                             "(docs/pretraining.md); the lengths come from --budget")
    parser.add_argument("--finetune", default=None, metavar="JSON|FILE.json",
                        help="fine-tuning keys for every run of the plugin's networks (not the stock arm), "
                             "as JSON text or a file, e.g. '{\"pretrained_lr_factor\": 0.1}' (pretrained "
                             "parts at a tenth of the learning rate) or '{\"freeze_pretrained_epochs\": 5}'; "
                             "both act only on runs that start from pretrained weights. Lengths, warm-up, "
                             "recipe and seed come from --budget, --recipe and --seeds")
    parser.add_argument("-c", "--configuration", default="3d_fullres", choices=("3d_fullres", "2d"),
                        help="the nnU-Net configuration to fine-tune (default 3d_fullres)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="training device (default cpu)")
    parser.add_argument("--raw", default=None, help="where the datasets are (default: $nnUNet_raw)")
    parser.add_argument("--heldout", nargs="+", action="extend", default=[], metavar="ID",
                        help="labeled raw datasets of the target's distribution (same labels, file ending "
                        "and channels) that nothing trains or tunes on: every fine-tuned run also predicts "
                        "their imagesTs/labelsTs (else all of imagesTr/labelsTr) and the report gets a "
                        "section per dataset. A read-out, not part of the experiment: add it to an existing "
                        "--out, only the read-out steps run")


def settings_from_args(args: argparse.Namespace) -> BenchmarkSettings:
    return BenchmarkSettings(pretrain=args.pretrain, target=args.target, out=Path(args.out),
                             labeled=parse_labeled(args.labeled), seeds=args.seeds,
                             arms=parse_arms(args.arms), budget=args.budget, seed=args.seed,
                             test_fraction=args.test_fraction, val_cases=args.val_cases,
                             configuration=args.configuration, device=args.device,
                             raw=None if args.raw is None else Path(args.raw), preset=args.preset,
                             recipe=args.recipe,
                             pretrain_objective=read_objective_overrides(args.pretrain_objective),
                             pretrain_options=read_pretrain_options(args.pretrain_options),
                             finetune=read_finetune_overrides(args.finetune), heldout=args.heldout,
                             run_seeds=None if args.run_seeds is None else parse_seed_list(args.run_seeds))


def run_benchmark(settings: BenchmarkSettings, stream: TextIO | None = None) -> dict[str, Any]:
    return Benchmark(settings, stream).run()


def _cmd_benchmark(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    return run_interruptibly("benchmark", lambda: run_benchmark(settings))


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark",
        help="label-efficiency benchmark on your datasets: scratch vs pretrained arms over seeds",
        description=__doc__.split("\n\n", 1)[0] + " Fine-tunes nnU-Net on 1, 2, 4 ... labeled cases of "
        "--target from scratch and from pretraining on --pretrain, over several seeds, predicts the test "
        "cases and writes OUT/report/benchmark.{json,md,png} (mean and spread over seeds). Resumable and "
        "extendable: re-run with the same --out.")
    add_arguments(parser)
    parser.set_defaults(func=_cmd_benchmark)
