"""The defaults since the twenty-third pass and the paper's objective beside them: one record of the paper's
values in code (PAPER_OBJECTIVE, PAPER_OPTIM), the same in the shipped NNSSL_JOINT_CONFIG file, named by
``paper`` in the demo's and the benchmark's options, and a resume across the change refused by name."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.experiments import budgets
from nnssl_joint.pretrain import runtime
from nnssl_joint.pretrain.config import PAPER_OPTIM, OptimConfig, PretrainConfig
from nnssl_joint.ssl.objective import PAPER_OBJECTIVE, ObjectiveConfig

REPO = Path(__file__).resolve().parents[2]


def _paper_file() -> dict:
    return json.loads((REPO / "plans" / "pretrain" / "paper.json").read_text())


def test_paper_file_holds_the_paper_values_and_ships_with_the_package() -> None:
    paper = _paper_file()
    assert paper == {"objective": PAPER_OBJECTIVE, "optim": PAPER_OPTIM}
    installed = resources.files("nnssl_joint.presets") / "pretrain" / "paper.json"
    assert json.loads(installed.read_text()) == paper
    # a valid partial configuration, as NNSSL_JOINT_CONFIG reads it
    config = PretrainConfig.from_dict(paper, "plans/pretrain/paper.json")
    assert config.objective == ObjectiveConfig.paper()
    assert config.optim.grad_clip_mode == "global" and config.optim.volume_lr_factor == 1.0


def test_every_paper_value_differs_from_the_default() -> None:
    defaults, paper = ObjectiveConfig(), ObjectiveConfig.paper()
    for key, value in PAPER_OBJECTIVE.items():
        assert getattr(paper, key) == value
        assert getattr(defaults, key) != value, key
    optim = OptimConfig()
    for key, value in PAPER_OPTIM.items():
        assert getattr(optim, key) != value, key
    # everything else is shared
    differ = {k for k, v in defaults.to_dict().items() if paper.to_dict()[k] != v}
    assert differ == set(PAPER_OBJECTIVE)


def test_defaults_are_the_configuration_that_did_not_collapse() -> None:
    """The twenty-second pass's keys (ppnoq + window statistics), as measured (docs/pretraining.md)."""
    config = ObjectiveConfig()
    assert (config.lambda_volume_contrast, config.volume_contrast_momentum) == (1.0, 0.99)
    assert (config.lambda_dense, config.dense_slice_offset) == (1.0, 2)
    assert config.queue_length_3d == 0 and config.volume_encoder_gradient_scale == 0.1
    assert not config.inter_trains_transformer and config.norm_over_window
    optim = OptimConfig()
    assert optim.grad_clip_mode == "per_part" and optim.volume_lr_factor == 0.1


def test_authors_release_builds_on_the_paper() -> None:
    release = ObjectiveConfig.authors_release()
    for key, value in PAPER_OBJECTIVE.items():
        assert getattr(release, key) == value, key
    assert release.schedule == "staged" and release.mask_loss_all_positions
    assert not release.slice_level_3d_loss


def test_paper_named_in_the_demo_and_benchmark_options() -> None:
    assert budgets.read_objective_overrides("paper") == PAPER_OBJECTIVE
    assert budgets.read_pretrain_options(" paper ") == {"optim": PAPER_OPTIM}
    budget = budgets.TrainingBudget.named("tiny")
    intra = budget.pretrain_config("intra", 0, objective_overrides=PAPER_OBJECTIVE,
                                   options={"optim": PAPER_OPTIM})
    # the 2D-only arm stays 2D-only and takes the paper's other keys; nothing is "left out"
    assert all(intra["objective"][k] == 0.0 for k in budgets.VOLUME_TERM_WEIGHTS)
    assert intra["objective"]["lambda_dense"] == 0.0 and intra["optim"]["grad_clip_mode"] == "global"
    assert budgets.set_aside_sentence(PAPER_OBJECTIVE, ("intra", "joint")) == ""
    joint = budget.pretrain_config("joint", 0, objective_overrides=PAPER_OBJECTIVE)
    assert joint["objective"] == PAPER_OBJECTIVE
    # a non-zero volume weight is still set aside for the 2D-only arm, and said so
    assert "lambda_inter=0.5" in budgets.set_aside_sentence({"lambda_inter": 0.5}, ("intra",))


def _record(objective: dict, optim: dict) -> dict:
    preset = {"name": "cpu"}
    resolved = {"view_size": 32, "n_slices": 8, "num_prototypes_2d": 8, "num_prototypes_3d": 2}
    return {"preset": preset, "resolved": resolved, "config": {"objective": objective, "optim": optim}}


def test_resume_across_the_defaults_change_is_refused_by_name() -> None:
    current = _record(ObjectiveConfig().to_dict(), PretrainConfig().optim.__dict__)
    assert runtime.check_resume_compatible({"nnssl_joint": current}, current) is current
    # a checkpoint of the paper's configuration
    paper = _record(ObjectiveConfig.paper().to_dict(), {**OptimConfig().__dict__, **PAPER_OPTIM})
    with pytest.raises(NnsslJointError) as error:
        runtime.check_resume_compatible({"nnssl_joint": paper}, current)
    message = str(error.value)
    assert "objective.norm_over_window" in message and "optim.volume_lr_factor" in message
    assert "plans/pretrain/paper.json" in message
    # a checkpoint written before norm_over_window existed had the paper's value of then
    old = ObjectiveConfig.paper().to_dict()
    del old["norm_over_window"]
    changed = runtime._changed_training_keys({"objective": old}, {"objective": ObjectiveConfig().to_dict()})
    assert changed["objective.norm_over_window"] == (False, True)
    # the same values in an old record are no change
    same = {"objective": old, "optim": PAPER_OPTIM}
    assert runtime._changed_training_keys(same, {"objective": ObjectiveConfig.paper().to_dict(),
                                                 "optim": {**OptimConfig().__dict__, **PAPER_OPTIM}}) == {}
