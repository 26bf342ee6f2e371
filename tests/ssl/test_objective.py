"""Tests for nnssl_joint.ssl.objective: the combined objective's config, stages and loss sum."""

from __future__ import annotations

import json

import pytest
import torch

from nnssl_joint.ssl import ObjectiveConfig, StagePlan, combine_losses


def test_round_trip_through_json() -> None:
    config = ObjectiveConfig(lambda_mask=0.5, schedule="staged", clustering="deepcluster", queue_length_2d=64)
    data = json.loads(json.dumps(config.to_dict()))
    assert ObjectiveConfig.from_dict(data) == config
    assert ObjectiveConfig.from_dict({}) == ObjectiveConfig()


def test_from_dict_rejects_unknown_key_and_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="lambda_intre") as error:
        ObjectiveConfig.from_dict({"lambda_intre": 1.0})
    assert "lambda_intra" in str(error.value) and "mask_ratio" in str(error.value)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"lambda_inter": -0.1}, "lambda_inter"),
        ({"schedule": "alternating"}, "schedule"),
        ({"clustering": "kmeans"}, "clustering"),
        ({"mask_ratio": 0.0}, "mask_ratio"),
        ({"temperature": 0}, "temperature"),
        ({"num_prototypes_2d": 10.5}, "num_prototypes_2d"),
        ({"slice_level_3d_loss": "yes"}, "slice_level_3d_loss"),
        ({"stage_a_epochs": -1}, "stage_a_epochs"),
        ({"head_norm_3d": "batch"}, "head_norm_3d"),
        ({"inter_code_standardization": 1}, "inter_code_standardization"),
        ({"schedule": "staged", "lambda_mask": 0.0}, "stage B"),
        ({"lambda_intra": 0, "lambda_intra_3d": 0, "lambda_inter": 0, "lambda_mask": 0}, "all loss weights"),
    ],
)
def test_invalid_values_are_reported(values: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ObjectiveConfig.from_dict(values)


def test_integers_are_accepted_for_floats() -> None:
    config = ObjectiveConfig.from_dict({"lambda_intra": 2})
    assert config.lambda_intra == 2.0 and isinstance(config.lambda_intra, float)


def test_joint_schedule_activates_every_term_every_epoch() -> None:
    config = ObjectiveConfig.paper()  # the paper's four terms
    default = ObjectiveConfig()  # and ours: the dense and the contrastive volume term beside them
    for epoch in (0, 1, 150, 999):
        plan = config.stage_at(epoch)
        assert plan.name == "joint"
        assert plan.active_terms == ("intra", "intra_3d", "inter", "mask")
        assert not plan.freeze_intra
        assert default.stage_at(epoch).active_terms == ("intra", "intra_3d", "inter", "mask", "dense",
                                                        "volume_contrast")
    weighted = ObjectiveConfig.paper(lambda_inter=0.25, lambda_mask=0.0,
                                     slice_level_3d_loss=False).stage_at(3)
    assert dict(weighted.weights) == {"intra": 1.0, "inter": 0.25}


def test_staged_schedule_stages() -> None:
    config = ObjectiveConfig.paper(schedule="staged", stage_a_epochs=10, stage_b_epochs=5, lambda_inter=0.5)
    for epoch in (0, 9):
        plan = config.stage_at(epoch)
        assert (plan.name, plan.active_terms, plan.freeze_intra) == ("A", ("intra",), False)
        assert not plan.needs_volumes
    for epoch in (10, 14):
        plan = config.stage_at(epoch)
        assert (plan.name, plan.active_terms, plan.freeze_intra) == ("B", ("mask",), True)
        assert plan.needs_volumes and not plan.needs_images
    for epoch in (15, 500):
        plan = config.stage_at(epoch)
        assert (plan.name, plan.active_terms, plan.freeze_intra) == (
            "C",
            ("intra", "intra_3d", "inter"),
            False,
        )
        assert plan.weights["inter"] == 0.5
    without_intra = ObjectiveConfig.paper(
        schedule="staged", stage_a_epochs=1, stage_b_epochs=1, staged_keep_intra=False
    )
    assert without_intra.stage_at(2).active_terms == ("inter",)
    skipped_b = ObjectiveConfig.paper(schedule="staged", stage_a_epochs=2, stage_b_epochs=0)
    assert skipped_b.stage_at(2).name == "C"
    with pytest.raises(ValueError, match="epoch"):
        config.stage_at(-1)


def test_authors_release_preset() -> None:
    config = ObjectiveConfig.authors_release(stage_a_epochs=1, stage_b_epochs=1)
    assert config.schedule == "staged" and config.mask_loss_all_positions and not config.slice_level_3d_loss
    assert config.stage_at(5).active_terms == ("intra", "inter")


def test_combine_losses_weights_and_skips() -> None:
    terms = {
        "intra": torch.tensor(2.0),
        "inter": torch.tensor(3.0),
        "mask": None,
        "intra_3d": torch.tensor(7.0),
    }
    weights = {"intra": 0.5, "inter": 2.0, "mask": 1.0, "intra_3d": 0.0}
    assert combine_losses(terms, weights).item() == pytest.approx(0.5 * 2.0 + 2.0 * 3.0)
    plan = StagePlan("B", {"mask": 1.0, "inter": 1.0}, freeze_intra=True)
    assert combine_losses(terms, plan).item() == pytest.approx(3.0)  # missing mask skipped
    with pytest.raises(ValueError, match="no active loss term"):
        combine_losses({"intra": torch.tensor(1.0)}, {"mask": 1.0})


def test_combine_losses_keeps_gradients() -> None:
    x = torch.tensor(1.5, requires_grad=True)
    combine_losses({"intra": x * x, "inter": 3 * x}, {"intra": 1.0, "inter": 0.5}).backward()
    assert x.grad.item() == pytest.approx(2 * 1.5 + 1.5)
