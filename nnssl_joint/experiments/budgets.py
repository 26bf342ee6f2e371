"""Training lengths, pretraining objectives and the configuration files they become, for the demo and
the benchmark.

A :class:`TrainingBudget` says how long each pretraining and each fine-tuning run trains (the same for
every arm); a :class:`DemoBudget` adds the sizes of the generated data. The pretraining runs behind the
arms differ only in their objective (:func:`pretrain_objective`). :meth:`TrainingBudget.pretrain_config`
and :meth:`TrainingBudget.finetune_config` build the partial JSON files the trainers read
(``NNSSL_JOINT_CONFIG``, ``NNSSL_JOINT_FINETUNE_CONFIG``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from nnssl_joint.common.typed_config import build, read_json_file
from nnssl_joint.errors import NnsslJointError

#: weights of the terms that read 3D windows (the volume terms); the 2D-only arm switches every one off
VOLUME_TERM_WEIGHTS = ("lambda_intra_3d", "lambda_inter", "lambda_mask", "lambda_volume_contrast")
#: pretraining runs of the demo: objective weights (a weight 0 switches a term off)
PRETRAIN_RUNS: dict[str, dict[str, Any]] = {
    "joint": {},  # the plugin's defaults: every term
    "intra": {key: 0.0 for key in VOLUME_TERM_WEIGHTS},
}
PRETRAIN_LABELS = {
    "joint": "joint (L_intra + L_intra_3d + L_inter + L_mask + volume contrast + dense)",
    "intra": "2D-only (L_intra + dense)",
    "staged": "staged (L_intra, then L_mask with f_intra frozen, then L_inter)",
}

#: fine-tuning recipes (``nnssl_joint.finetune.FinetuneConfig.recipe``) a benchmark or demo can ask for
FINETUNE_RECIPES = ("plugin", "nnunet_warmup")
#: initial learning rate of pretrained networks under the ``nnunet_warmup`` recipe: nnU-Net's 1e-2 divided
#: by 10, as nnU-Net's pretrained-weights fine-tuning lowers it for networks that start from weights
PRETRAINED_INITIAL_LR = 1e-3
#: share of the epochs nnU-Net's pretrained-weights trainer (``nnUNetTrainer_warmup``) warms up: 50 of 1000
NNUNET_WARMUP_FRACTION = 50 / 1000


def nnunet_warmup_epochs(num_epochs: int) -> int:
    """Warm-up epochs of the ``nnunet_warmup`` recipe when the budget sets none: nnU-Net's share
    (:data:`NNUNET_WARMUP_FRACTION`) of ``num_epochs``, at least 1, and fewer than ``num_epochs``."""
    return min(max(1, round(NNUNET_WARMUP_FRACTION * num_epochs)), num_epochs - 1)


def warmup_epochs_of(budget_warmup: int, finetune_epochs: int, recipe: str) -> int:
    """Warm-up epochs the runs from pretrained weights get: the budget's ``finetune_warmup_epochs``, or under
    the ``nnunet_warmup`` recipe, where the budget sets none, :func:`nnunet_warmup_epochs`."""
    if recipe == "nnunet_warmup" and not budget_warmup:
        return nnunet_warmup_epochs(finetune_epochs)
    return budget_warmup


#: ``--preset`` of the demo and the benchmark when none is given, by ``--device``. On CPU ``nnunet``: the 2D
#: topology nnU-Net's own planner gives the target, so the plugin's network from scratch is stock nnU-Net's
#: (issue 16: the narrow ``cpu`` preset trailed stock nnU-Net by 22 Dice points from scratch on a generated
#: 2d task, docs/finetuning.md); it costs about 2.8x the ``cpu`` preset's time per iteration on the demo's
#: task. On CUDA ``gpu`` (nnU-Net's usual widths).
DEFAULT_PRESETS = {"cpu": "nnunet", "cuda": "gpu"}
#: ``--preset`` of the demo when none is given. On CPU the narrow ``cpu`` preset: the demo is the quick tour
#: (the ``nnunet`` preset would make it about 3x longer); its report states every arm's gap to stock nnU-Net,
#: which it trains beside the plugin's arms. Measurements use ``nnssl_joint benchmark`` (``nnunet`` on CPU).
DEMO_DEFAULT_PRESETS = {"cpu": "cpu", "cuda": "gpu"}


def default_preset(preset: str | None, device: str, defaults: dict[str, str] | None = None) -> str:
    """``preset`` if given, else the default of ``device`` in ``defaults`` (:data:`DEFAULT_PRESETS`)."""
    if preset is not None:
        return preset
    defaults = DEFAULT_PRESETS if defaults is None else defaults
    if device not in defaults:
        raise NnsslJointError(f"--device must be one of {', '.join(defaults)}, got {device!r}")
    return defaults[device]


def pretrain_objective(arm: str, epochs: int) -> dict[str, Any]:
    """The objective overrides of the pretraining run behind ``arm`` (``{}``: the plugin's defaults)."""
    if arm in PRETRAIN_RUNS:
        return dict(PRETRAIN_RUNS[arm])
    if arm == "staged":
        # A: L_intra, B: L_mask with f_intra frozen, C: L_inter + L_intra, scaled to the budget
        from nnssl_joint.ssl.objective import staged_stage_lengths

        a, b = staged_stage_lengths(epochs)
        return {"schedule": "staged", "stage_a_epochs": a, "stage_b_epochs": b}
    raise NnsslJointError(f"no pretraining behind arm {arm!r}; pretraining arms are "
                          f"{', '.join([*PRETRAIN_RUNS, 'staged'])}")


def overrides_not_applied(arm: str, objective: dict[str, Any], overrides: dict[str, Any] | None
                          ) -> dict[str, Any]:
    """The ``overrides`` that the run behind ``arm`` does not take: the weights of the terms the arm switches
    off (``objective`` sets them to 0: the 2D-only arm's volume terms). ``--pretrain-objective`` is the same
    for every arm, so ``{"lambda_volume_contrast": 1}`` means "in the arms that have volume terms"; applied
    to 2D-only it would make that arm joint pretraining under another name."""
    return {key: value for key, value in (overrides or {}).items()
            if key in VOLUME_TERM_WEIGHTS and objective.get(key) == 0.0 and value != 0.0}


def set_aside_sentence(overrides: dict[str, Any] | None, arms: Iterable[str]) -> str:
    """A sentence naming the ``--pretrain-objective`` keys the 2D-only arm does not take ("" if none, or if
    ``arms`` of the run have no 2D-only arm)."""
    if "intra" not in arms:
        return ""
    keys = overrides_not_applied("intra", PRETRAIN_RUNS["intra"], overrides)
    if not keys:
        return ""
    return (f"2D-only pretraining leaves out {', '.join(f'{k}={v!r}' for k, v in keys.items())} "
            "(a volume term; the arm has none).")


def merge_objective(arm: str, objective: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``objective`` (the arm's) plus ``overrides`` (the same for every arm). A weight of a term the arm
    switches off stays 0 (:func:`overrides_not_applied`: the 2D-only arm stays 2D-only); any other override
    of a key the arm sets is refused (the staged arm's schedule: a benchmark that changed it would compare
    nothing)."""
    merged = dict(objective)
    set_aside = overrides_not_applied(arm, objective, overrides)
    for key, value in (overrides or {}).items():
        if key in set_aside:
            continue
        if key in objective and objective[key] != value:
            raise NnsslJointError(f"the pretraining objective override {key}={value!r} contradicts arm "
                                  f"{arm!r}, which sets {key}={objective[key]!r}; leave {key} out of the "
                                  f"override")
        merged[key] = value
    return merged


def _read_json_object(spec: str, option: str, what: str) -> dict[str, Any]:
    """JSON text (starting with ``{``) or the path of a JSON file holding one object, for ``option``."""
    text = spec.strip()
    if text.startswith("{"):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise NnsslJointError(f"{option} is not valid JSON ({e}): {text!r}") from e
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise NnsslJointError(f"{option} {text!r} is neither JSON text nor a file")
        values = read_json_file(path, f"{option} {path}")
    if not isinstance(values, dict):
        raise NnsslJointError(f"{option} must be a JSON object of {what}, got {values!r}")
    return dict(values)


#: ``--pretrain-objective`` / ``--pretrain-options`` value that names the paper's objective / optimiser
#: settings (``objective.PAPER_OBJECTIVE``, ``config.PAPER_OPTIM``: the defaults before the twenty-third pass)
PAPER = "paper"


def read_objective_overrides(spec: str | None) -> dict[str, Any]:
    """``--pretrain-objective``: JSON text (``{"lambda_mask": 0.0}``), a JSON file of objective keys, or
    ``paper`` (:data:`PAPER`: the paper's objective where it differs from the defaults), checked against
    :class:`nnssl_joint.ssl.objective.ObjectiveConfig` (unknown keys, types, ranges)."""
    if spec is None or not spec.strip():
        return {}
    from nnssl_joint.ssl.objective import PAPER_OBJECTIVE, ObjectiveConfig

    if spec.strip() == PAPER:
        return dict(PAPER_OBJECTIVE)
    values = _read_json_object(spec, "--pretrain-objective", "objective keys")
    try:
        ObjectiveConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise NnsslJointError(f"--pretrain-objective: {e}") from e
    return values


#: sections of a pretraining configuration ``--pretrain-options`` may set; the objective has
#: ``--pretrain-objective``, the preset ``--preset`` and the seed ``--seed``
PRETRAIN_OPTION_SECTIONS = ("data", "optim")
#: top-level keys of the pretraining configuration that ``--pretrain-options`` also takes (``init_from``: a
#: pretraining checkpoint every pretraining arm starts from, e.g. to continue a 2D-only run with volume terms)
PRETRAIN_OPTION_KEYS = ("init_from",)
#: pretraining keys the budget sets (a longer run is another budget, not an option)
PRETRAIN_KEYS_SET_ELSEWHERE = ("optim.num_epochs", "optim.iterations_per_epoch", "optim.save_every")


def read_pretrain_options(spec: str | None) -> dict[str, Any]:
    """``--pretrain-options``: JSON text (``{"data": {"batch_size_3d": 8}, "optim": {"grad_clip_mode":
    "per_part"}}``) or a JSON file of ``data`` and ``optim`` keys of the pretraining configuration
    (:class:`nnssl_joint.pretrain.config.PretrainConfig`) for every pretraining arm, and ``init_from`` (made
    absolute); other sections and the keys the budget sets (:data:`PRETRAIN_KEYS_SET_ELSEWHERE`) are
    refused; names, types, ranges checked. ``paper`` (:data:`PAPER`): the paper's optimiser settings where
    they differ from the defaults (``config.PAPER_OPTIM``)."""
    if spec is None or not spec.strip():
        return {}
    if spec.strip() == PAPER:
        from nnssl_joint.pretrain.config import PAPER_OPTIM

        return {"optim": dict(PAPER_OPTIM)}
    values = _read_json_object(spec, "--pretrain-options", "pretraining configuration sections")
    check_pretrain_options(values)
    if isinstance(values.get("init_from"), str):  # the pretraining runs in another working directory
        values["init_from"] = str(Path(values["init_from"]).resolve())
    return values


def check_pretrain_options(options: dict[str, Any]) -> None:
    """Only :data:`PRETRAIN_OPTION_SECTIONS`, each an object, none of :data:`PRETRAIN_KEYS_SET_ELSEWHERE`,
    and a valid partial :class:`nnssl_joint.pretrain.config.PretrainConfig`."""
    from nnssl_joint.pretrain.config import PretrainConfig

    elsewhere = {"objective": "--pretrain-objective", "preset": "--preset", "seed": "--seed"}
    for section, values in options.items():
        if section in PRETRAIN_OPTION_KEYS:
            if values is not None and not Path(str(values)).is_file():
                raise NnsslJointError(f"--pretrain-options: {section} {values!r} is not a file; name "
                                      "checkpoint_final.pth of a JointSSLPretrainTrainer run")
            continue
        if section in elsewhere:
            raise NnsslJointError(f"--pretrain-options: {section!r} is set with {elsewhere[section]}, "
                                  f"not here")
        if section not in PRETRAIN_OPTION_SECTIONS:
            raise NnsslJointError(f"--pretrain-options: unknown section {section!r}; sections: "
                                  f"{', '.join(PRETRAIN_OPTION_SECTIONS)}; keys: "
                                  f"{', '.join(PRETRAIN_OPTION_KEYS)}")
        if not isinstance(values, dict):
            raise NnsslJointError(f"--pretrain-options: {section!r} must be an object of keys, "
                                  f"got {values!r}")
        for key in values:
            if f"{section}.{key}" in PRETRAIN_KEYS_SET_ELSEWHERE:
                raise NnsslJointError(f"--pretrain-options: {section}.{key} is set by the budget, not here; "
                                      f"use --budget (a JSON file of pretrain_* keys) instead")
    try:
        PretrainConfig.from_dict(options, "--pretrain-options")
    except (TypeError, ValueError) as e:  # NnsslJointError is a ValueError: one message shape for all
        raise NnsslJointError(f"--pretrain-options: {e}") from e


#: fine-tuning keys that the budget (lengths, warm-up), ``--recipe`` and the benchmark's seeds set:
#: ``--finetune`` may not change them (a longer run is another budget, not an override)
FINETUNE_KEYS_SET_ELSEWHERE = ("num_epochs", "iterations_per_epoch", "val_iterations_per_epoch",
                               "warmup_epochs", "save_every", "recipe", "seed")


def read_finetune_overrides(spec: str | None) -> dict[str, Any]:
    """``--finetune``: JSON text (``{"pretrained_lr_factor": 0.1}``) or a JSON file of fine-tuning keys
    (:class:`nnssl_joint.finetune.FinetuneConfig`) for every run of the plugin's networks; keys the budget,
    the recipe or the seeds set are refused (:data:`FINETUNE_KEYS_SET_ELSEWHERE`). Types, ranges and the
    combination with the recipe are checked by :meth:`TrainingBudget.finetune_config`."""
    if spec is None or not spec.strip():
        return {}
    values = _read_json_object(spec, "--finetune", "fine-tuning keys")
    check_finetune_override_keys(values)
    return values


def check_finetune_override_keys(overrides: dict[str, Any]) -> None:
    """Every key of ``overrides`` is a :class:`nnssl_joint.finetune.FinetuneConfig` field that neither the
    budget, nor the recipe, nor the seeds set (:data:`FINETUNE_KEYS_SET_ELSEWHERE`)."""
    from nnssl_joint.finetune import FinetuneConfig

    known = {f.name for f in fields(FinetuneConfig)}
    for key in overrides:
        if key not in known:
            raise NnsslJointError(f"--finetune: unknown fine-tuning key {key!r}; known keys: "
                                  f"{', '.join(sorted(known - set(FINETUNE_KEYS_SET_ELSEWHERE)))}")
        if key in FINETUNE_KEYS_SET_ELSEWHERE:
            raise NnsslJointError(f"--finetune: {key!r} is set by the budget, --recipe or the seeds, not "
                                  f"here; use --budget (a JSON file of finetune_* keys) or --recipe instead")


@dataclass(frozen=True)
class TrainingBudget:
    """How long each pretraining and each fine-tuning run trains (the same for every arm).

    ``finetune_warmup_epochs``: warm-up epochs of the fine-tuning runs from pretrained weights (recipe
    ``plugin``; runs from scratch never warm up). 0 in every built-in budget, so every arm trains with the
    same schedule, stock nnU-Net's: one warm-up epoch, given only to the pretrained arms, cost 2.6 held-out
    Dice points by itself on the demo's task (docs/pretraining.md, seventeenth pass). Under the
    ``nnunet_warmup`` recipe 0 means nnU-Net's own share, :func:`nnunet_warmup_epochs`."""

    pretrain_epochs: int
    pretrain_iterations: int
    finetune_epochs: int
    finetune_iterations: int
    finetune_val_iterations: int
    finetune_warmup_epochs: int
    test_time_augmentation: bool

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "test_time_augmentation":
                if not isinstance(value, bool):
                    raise NnsslJointError(f"budget: test_time_augmentation must be true or false, "
                                          f"got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise NnsslJointError(f"budget: {f.name} must be an integer, got {value!r}")
            minimum = 0 if f.name in ("finetune_val_iterations", "finetune_warmup_epochs") else 1
            if value < minimum:
                raise NnsslJointError(f"budget: {f.name} must be >= {minimum}, got {value}")

    @classmethod
    def named(cls, name: str) -> TrainingBudget:
        if name not in DEMO_BUDGETS:
            raise NnsslJointError(f"unknown budget {name!r}; choose from {', '.join(DEMO_BUDGETS)}")
        return DEMO_BUDGETS[name].training

    @classmethod
    def resolve(cls, spec: str) -> TrainingBudget:
        """A budget name (tiny, small, medium, large: the demo's training lengths) or a JSON file whose keys
        override the ``small`` budget."""
        if spec in DEMO_BUDGETS:
            return cls.named(spec)
        path = Path(spec).expanduser()
        if not path.is_file():
            names = ", ".join(sorted(DEMO_BUDGETS))
            raise NnsslJointError(f"--budget {spec!r} is neither a budget name ({names}) nor a JSON file")
        values = read_json_file(path, f"--budget {path}")
        return build(cls, {**asdict(cls.named("small")), **values}, f"--budget {path}")

    def pretrain_config(self, arm: str, seed: int, preset: str | None = None,
                        objective_overrides: dict[str, Any] | None = None,
                        options: dict[str, Any] | None = None) -> dict[str, Any]:
        """The partial pretraining configuration (``NNSSL_JOINT_CONFIG``) of the run behind ``arm``;
        ``preset``: an architecture preset name or file (None: the pretraining default);
        ``objective_overrides``: objective keys for every arm (e.g. ``{"lambda_mask": 0.0}``), which may
        not change a key the arm itself sets (:func:`merge_objective`); ``options``: ``data`` and ``optim``
        keys and ``init_from`` for every arm (:func:`read_pretrain_options`), not the lengths the budget
        sets."""
        if options:
            check_pretrain_options(options)
        options = options or {}
        config: dict[str, Any] = {"seed": int(seed),
                                  "optim": {**options.get("optim", {}),
                                            "num_epochs": self.pretrain_epochs,
                                            "iterations_per_epoch": self.pretrain_iterations,
                                            "save_every": 1}}
        if options.get("data"):
            config["data"] = dict(options["data"])
        for key in PRETRAIN_OPTION_KEYS:
            if options.get(key) is not None:
                config[key] = options[key]
        if preset is not None:
            config["preset"] = str(preset)
        objective = merge_objective(arm, pretrain_objective(arm, self.pretrain_epochs), objective_overrides)
        if objective:
            config["objective"] = objective
        return config

    def finetune_config(self, seed: int | None = None, recipe: str = "plugin",
                        overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The fine-tuning configuration (``NNSSL_JOINT_FINETUNE_CONFIG``), identical for every arm of a
        seed; ``seed``: seed the fine-tuning (the demo's is not seeded, the benchmark's is). ``recipe``:
        ``plugin`` (warm-up ``finetune_warmup_epochs``, 0 in the built-in budgets, then poly, lr 1e-2 for
        every arm; the trainer warms up runs from pretrained weights only, so scratch runs follow stock
        nnU-Net's schedule) or ``nnunet_warmup`` (nnU-Net's pretrained-weights recipe: linear warm-up of the
        whole network for ``finetune_warmup_epochs``, or :func:`nnunet_warmup_epochs` where that is 0, then
        poly from the end of the warm-up; initial lr :data:`PRETRAINED_INITIAL_LR` when the run starts from
        pretrained weights). ``overrides``: further :class:`nnssl_joint.finetune.FinetuneConfig` keys
        (``--finetune``), not the ones set here (:data:`FINETUNE_KEYS_SET_ELSEWHERE`)."""
        if recipe not in FINETUNE_RECIPES:
            raise NnsslJointError(f"fine-tuning recipe {recipe!r}: choose from {', '.join(FINETUNE_RECIPES)}")
        config: dict[str, Any] = {"num_epochs": self.finetune_epochs,
                                  "iterations_per_epoch": self.finetune_iterations,
                                  "val_iterations_per_epoch": self.finetune_val_iterations,
                                  "initial_lr": 1e-2,
                                  "warmup_epochs": warmup_epochs_of(self.finetune_warmup_epochs,
                                                                    self.finetune_epochs, recipe),
                                  "save_every": 1}
        if recipe != "plugin":
            config["recipe"] = recipe
            config["pretrained_initial_lr"] = PRETRAINED_INITIAL_LR
        if seed is not None:
            config["seed"] = int(seed)
        if overrides:
            from nnssl_joint.finetune import FinetuneConfig

            check_finetune_override_keys(overrides)
            config.update(overrides)
            # types, ranges and the combination with the recipe, before anything runs
            FinetuneConfig.from_dict(config, f"--finetune with the budget and recipe {recipe!r}")
        return config


@dataclass(frozen=True)
class DemoBudget:
    """A demo budget: the sizes of the generated data and the training lengths."""

    name: str
    n_3d: int
    n_2d: int
    n_test: int
    training: TrainingBudget
    shape_3d: tuple[int, int, int] = (32, 32, 32)
    shape_2d: tuple[int, int] = (64, 64)

    def __post_init__(self) -> None:
        for key in ("n_3d", "n_2d", "n_test"):
            if getattr(self, key) < 1:
                raise NnsslJointError(f"budget {self.name!r}: {key} must be >= 1, got {getattr(self, key)}")

    def to_dict(self) -> dict[str, Any]:
        """One flat record (data sizes and training lengths), as the demo's settings record stores it."""
        return {"name": self.name, "n_3d": self.n_3d, "n_2d": self.n_2d, "n_test": self.n_test,
                **asdict(self.training), "shape_3d": list(self.shape_3d), "shape_2d": list(self.shape_2d)}


def _demo_budget(name: str, n_3d: int, n_2d: int, n_test: int, **training: Any) -> DemoBudget:
    return DemoBudget(name, n_3d, n_2d, n_test, TrainingBudget(**training))


DEMO_BUDGETS = {
    # a smoke test of the whole pipeline (a few minutes); its Dice numbers mean nothing
    "tiny": _demo_budget("tiny", n_3d=4, n_2d=8, n_test=2, pretrain_epochs=2, pretrain_iterations=4,
                         finetune_epochs=2, finetune_iterations=4, finetune_val_iterations=1,
                         finetune_warmup_epochs=0, test_time_augmentation=False),
    # the default: about 20 minutes on 2 idle CPU cores with the stock nnU-Net arm and the probe, 32-45 beside
    # other jobs (README; measured 2026-12-01 to 2026-12-05)
    "small": _demo_budget("small", n_3d=8, n_2d=16, n_test=4, pretrain_epochs=8, pretrain_iterations=50,
                          finetune_epochs=20, finetune_iterations=25, finetune_val_iterations=4,
                          finetune_warmup_epochs=0, test_time_augmentation=False),
    # not timed: 6x the pretraining and 2x the fine-tuning iterations of small
    "medium": _demo_budget("medium", n_3d=16, n_2d=32, n_test=8, pretrain_epochs=25, pretrain_iterations=100,
                           finetune_epochs=40, finetune_iterations=25, finetune_val_iterations=5,
                           finetune_warmup_epochs=0, test_time_augmentation=True),
    # several hours on CPU; well under an hour on a GPU
    "large": _demo_budget("large", n_3d=48, n_2d=96, n_test=16, pretrain_epochs=50, pretrain_iterations=250,
                          finetune_epochs=100, finetune_iterations=50, finetune_val_iterations=10,
                          finetune_warmup_epochs=0, test_time_augmentation=True),
}
