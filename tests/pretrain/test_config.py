import json

import pytest

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.pretrain.config import (
    CONFIG_ENV_VAR,
    PLANS_SECTION,
    PretrainConfig,
    load_pretrain_config,
)


def test_env_file_overrides_plans_section_and_records_explicit_keys(tmp_path, monkeypatch):
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"optim": {"num_epochs": 7},
                             "objective": {"num_prototypes_2d": 12, "lambda_mask": 0.5}}))
    monkeypatch.setenv(CONFIG_ENV_VAR, str(f))
    cfg, sources = load_pretrain_config({PLANS_SECTION: {"optim": {"num_epochs": 3, "lr": 0.5}}})
    assert cfg.optim.num_epochs == 7 and cfg.optim.lr == 0.5
    assert cfg.objective.num_prototypes_2d == 12 and cfg.objective.lambda_mask == 0.5
    assert cfg.explicit_objective_keys == {"num_prototypes_2d", "lambda_mask"}
    assert sources[-1] == str(f)
    again = PretrainConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("bad, needle", [
    ({"optim": {"num_epoch": 3}}, "num_epoch"),
    ({"data": {"n_slices": "auto", "batchsize": 2}}, "batchsize"),
    ({"objective": {"schedule": "sometimes"}}, "schedule"),
    ({"optim": {"lr": "fast"}}, "lr"),
])
def test_bad_config_names_the_key(tmp_path, monkeypatch, bad, needle):
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps(bad))
    monkeypatch.setenv(CONFIG_ENV_VAR, str(f))
    with pytest.raises(NnsslJointError, match=needle) as e:
        load_pretrain_config(None)
    assert str(f) in str(e.value)


def test_missing_and_malformed_config_file(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV_VAR, str(tmp_path / "nope.json"))
    with pytest.raises(NnsslJointError, match="does not name a file"):
        load_pretrain_config(None)
    f = tmp_path / "broken.json"
    f.write_text("{not json")
    monkeypatch.setenv(CONFIG_ENV_VAR, str(f))
    with pytest.raises(NnsslJointError, match="not valid JSON"):
        load_pretrain_config(None)


def test_plans_section_and_file_merge_nested_sections_and_keep_auto_values(tmp_path, monkeypatch):
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"data": {"n_slices": 8}}))
    monkeypatch.setenv(CONFIG_ENV_VAR, str(f))
    cfg, sources = load_pretrain_config({PLANS_SECTION: {"data": {"view_size": 48}, "preset": "gpu"}})
    assert (cfg.data.view_size, cfg.data.n_slices, cfg.preset) == (48, 8, "gpu")
    assert cfg.data.batch_size_2d == "auto"  # never overwritten: the self-configuration is a separate object
    assert sources == ["defaults", f"plans section '{PLANS_SECTION}'", str(f)]
    assert cfg.explicit_keys == {"data.view_size", "data.n_slices", "preset"}


def test_wrong_type_error_names_source_key_and_expected_type(tmp_path, monkeypatch):
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"data": {"n_small_views": "two"}}))
    monkeypatch.setenv(CONFIG_ENV_VAR, str(f))
    with pytest.raises(NnsslJointError) as e:
        load_pretrain_config(None)
    assert str(e.value) == f"{f}: key 'data.n_small_views' must be an integer, got 'two' (str)"


def test_a_staged_schedule_whose_stage_c_never_runs_is_refused_with_lengths_that_fit(tmp_path, monkeypatch):
    """The stage lengths' defaults (100 + 50) fill the default 100 epochs: ``schedule: staged`` alone would
    train L_intra only, silently. The error names the file, the three keys and lengths that leave stage C
    epochs."""
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"objective": {"schedule": "staged"}}))
    monkeypatch.setenv(CONFIG_ENV_VAR, str(f))
    with pytest.raises(NnsslJointError) as e:
        load_pretrain_config(None)
    message = str(e.value)
    assert str(f) in message and "stage_a_epochs=100 + stage_b_epochs=50 >= optim.num_epochs=100" in message
    assert "stage_a_epochs 40, stage_b_epochs 20" in message
    # the lengths it suggests are accepted, and their last epoch is stage C
    config = PretrainConfig.from_dict({"objective": {"schedule": "staged", "stage_a_epochs": 40,
                                                     "stage_b_epochs": 20}})
    assert config.objective.stage_at(99).name == "C" and config.objective.stage_at(59).name == "B"
    # one epoch short of stage C is refused, one epoch of stage C is not; the joint schedule ignores them
    short = {"schedule": "staged", "stage_a_epochs": 6, "stage_b_epochs": 2}
    with pytest.raises(NnsslJointError, match="stage C"):
        PretrainConfig.from_dict({"optim": {"num_epochs": 8}, "objective": short})
    assert PretrainConfig.from_dict({"optim": {"num_epochs": 9}, "objective": {
        "schedule": "staged", "stage_a_epochs": 6, "stage_b_epochs": 2}}).objective.stage_at(8).name == "C"
    assert PretrainConfig.from_dict({"optim": {"num_epochs": 8}}).objective.schedule == "joint"
