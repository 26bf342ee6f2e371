"""Budgets, pretraining objectives and the configuration files they become
(nnssl_joint/experiments/budgets.py)."""

from __future__ import annotations

import json

import pytest

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.experiments.budgets import DEMO_BUDGETS, PRETRAIN_RUNS, TrainingBudget


def test_configs_share_the_finetuning_budget_and_switch_terms_off():
    from nnssl_joint.finetune import FinetuneConfig
    from nnssl_joint.pretrain.config import PretrainConfig
    from nnssl_joint.ssl.objective import PAPER_OBJECTIVE

    budget = DEMO_BUDGETS["small"].training
    ft = budget.finetune_config()
    assert ft["num_epochs"] == budget.finetune_epochs
    assert ft["iterations_per_epoch"] == budget.finetune_iterations
    joint = budget.pretrain_config("joint", seed=3)
    intra = budget.pretrain_config("intra", seed=3)
    assert joint["optim"] == intra["optim"] and joint["seed"] == 3
    assert "objective" not in joint and "preset" not in joint
    assert intra["objective"] == PRETRAIN_RUNS["intra"] == {"lambda_intra_3d": 0.0, "lambda_inter": 0.0,
                                                               "lambda_mask": 0.0,
                                                               "lambda_volume_contrast": 0.0}
    FinetuneConfig.from_dict(ft)  # every key is a real fine-tuning key
    # the defaults (twenty-third pass): the dense term is on and is not a volume term, so 2D-only keeps it
    assert PretrainConfig.from_dict(intra).objective.stage_at(0).active_terms == ("intra", "dense")
    assert PretrainConfig.from_dict(joint).objective.stage_at(0).active_terms == (
        "intra", "intra_3d", "inter", "mask", "dense", "volume_contrast")
    # on the paper's objective 2D-only is L_intra alone and joint the paper's four terms
    paper_intra = budget.pretrain_config("intra", seed=3, objective_overrides=PAPER_OBJECTIVE)
    paper_joint = budget.pretrain_config("joint", seed=3, objective_overrides=PAPER_OBJECTIVE)
    assert PretrainConfig.from_dict(paper_intra).objective.stage_at(0).active_terms == ("intra",)
    assert PretrainConfig.from_dict(paper_joint).objective.stage_at(0).active_terms == (
        "intra", "intra_3d", "inter", "mask")
    assert PretrainConfig.from_dict(budget.pretrain_config("joint", 0, preset="gpu")).preset == "gpu"


def test_demo_budget_record_is_flat_and_the_training_part_is_validated():
    record = DEMO_BUDGETS["tiny"].to_dict()
    assert record["n_3d"] == 4 and record["finetune_epochs"] == 2 and record["shape_3d"] == [32, 32, 32]
    with pytest.raises(NnsslJointError, match="finetune_iterations must be an integer"):
        TrainingBudget(1, 1, 1, "4", 1, 0, False)


def test_budget_names_and_json_overrides(tmp_path):
    assert TrainingBudget.resolve("tiny").finetune_epochs == 2
    spec = tmp_path / "budget.json"
    spec.write_text(json.dumps({"finetune_epochs": 7}))
    budget = TrainingBudget.resolve(str(spec))
    assert (budget.finetune_epochs == 7
            and budget.pretrain_epochs == TrainingBudget.named("small").pretrain_epochs)
    spec.write_text(json.dumps({"finetune_epoch": 7}))
    with pytest.raises(NnsslJointError, match=r"budget.json: unknown key 'finetune_epoch'"):
        TrainingBudget.resolve(str(spec))
    spec.write_text(json.dumps({"finetune_epochs": 0}))
    with pytest.raises(NnsslJointError, match="finetune_epochs must be >= 1"):
        TrainingBudget.resolve(str(spec))
    with pytest.raises(NnsslJointError, match="neither a budget name"):
        TrainingBudget.resolve("huge")


@pytest.mark.parametrize("epochs", [1, 2, 3, 8, 50])
@pytest.mark.parametrize("arm", ["intra", "joint", "staged"])
def test_pretraining_configs_of_every_arm_are_valid(arm, epochs):
    from nnssl_joint.pretrain.config import PretrainConfig

    budget = TrainingBudget(pretrain_epochs=epochs, pretrain_iterations=5, finetune_epochs=1,
                               finetune_iterations=1, finetune_val_iterations=0, finetune_warmup_epochs=0,
                               test_time_augmentation=False)
    config = PretrainConfig.from_dict(budget.pretrain_config(arm, seed=0))
    objective = config.objective
    if arm == "staged":
        assert objective.schedule == "staged"
        # every stage the epochs allow is reached, and the last epoch trains L_inter
        assert objective.stage_at(epochs - 1).is_active("inter")
    if arm == "intra":
        assert objective.lambda_inter == 0 and objective.lambda_mask == 0 and objective.lambda_intra_3d == 0


def test_finetune_config_of_the_budget_is_a_valid_seeded_config():
    from nnssl_joint.finetune import FinetuneConfig

    config = FinetuneConfig.from_dict(TrainingBudget.named("tiny").finetune_config(seed=3))
    assert config.seed == 3
    with pytest.raises(NnsslJointError, match="seed must be a non-negative integer"):
        FinetuneConfig.from_dict({"seed": -1})


@pytest.mark.parametrize("name", list(DEMO_BUDGETS))
def test_built_in_budgets_give_every_arm_the_same_schedule(name):
    """No built-in budget warms up the runs from pretrained weights (a warm-up only they get cost 2.6
    held-out Dice points on the demo's task); the nnunet_warmup recipe keeps nnU-Net's own warm-up share."""
    from nnssl_joint.experiments.budgets import nnunet_warmup_epochs
    from nnssl_joint.finetune import FinetuneConfig

    budget = DEMO_BUDGETS[name].training
    plugin = FinetuneConfig.from_dict(budget.finetune_config(seed=0))
    assert plugin.warmup_epochs_for(pretrained=True) == plugin.warmup_epochs_for(pretrained=False) == 0
    nnunet = FinetuneConfig.from_dict(budget.finetune_config(seed=0, recipe="nnunet_warmup"))
    assert nnunet.warmup_epochs == nnunet_warmup_epochs(budget.finetune_epochs) >= 1
    assert nnunet.warmup_epochs_for(pretrained=False) == 0


def test_nnunet_warmup_share_and_an_explicit_budget_warmup(tmp_path):
    from nnssl_joint.experiments.budgets import nnunet_warmup_epochs

    # nnU-Net's 50 of 1000 epochs: the earlier small / medium / large values 1, 2, 5 at 20, 40, 100 epochs
    assert [nnunet_warmup_epochs(n) for n in (2, 20, 40, 100, 1000)] == [1, 1, 2, 5, 50]
    assert nnunet_warmup_epochs(1) == 0  # fewer than the epochs, as FinetuneConfig requires
    spec = tmp_path / "budget.json"
    spec.write_text(json.dumps({"finetune_warmup_epochs": 3}))
    budget = TrainingBudget.resolve(str(spec))
    assert budget.finetune_config()["warmup_epochs"] == 3
    assert budget.finetune_config(recipe="nnunet_warmup")["warmup_epochs"] == 3


def test_demo_and_benchmark_do_not_import_each_other():
    import ast
    from pathlib import Path

    import nnssl_joint.experiments as package

    folder = Path(package.__file__).parent
    for module, other in (("demo", "benchmark"), ("benchmark", "demo")):
        tree = ast.parse((folder / f"{module}.py").read_text())
        imported = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree)
                     if isinstance(node, ast.Import) for alias in node.names}
        assert f"nnssl_joint.experiments.{other}" not in imported, f"{module}.py imports {other}.py"


def test_default_preset_is_nnunets_topology_on_cpu_and_gpu_on_cuda():
    from nnssl_joint.experiments.budgets import default_preset
    from nnssl_joint.experiments.pipeline import NNUNET_PRESET

    assert default_preset(None, "cpu") == NNUNET_PRESET
    assert default_preset(None, "cuda") == "gpu"
    assert default_preset("cpu", "cpu") == "cpu" and default_preset("x.json", "cuda") == "x.json"
    with pytest.raises(NnsslJointError, match="--device"):
        default_preset(None, "tpu")
