import json

import pytest

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.models.preset import load_preset
from nnssl_joint.pretrain.autoconfig import DatasetStats, auto_configure, slice_activation_bytes
from nnssl_joint.pretrain.config import (
    CONFIG_ENV_VAR,
    PLANS_SECTION,
    DataConfig,
    PretrainConfig,
    load_pretrain_config,
)


def test_env_file_overrides_plans_section_and_records_explicit_keys(tmp_path, monkeypatch):
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"optim": {"num_epochs": 7}, "objective": {"num_prototypes_2d": 12, "lambda_mask": 0.5}}))
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


def _stats(n2d=10, nvol=6, z=40, inplane=(128, 128)):
    shapes = [(1, *inplane)] * n2d + [(z, *inplane)] * nvol
    return DatasetStats.from_shapes(shapes)


def test_autoconfig_follows_the_data_and_the_budget():
    preset = load_preset("cpu")
    stats = _stats()
    assert stats.n_images_2d == 10 and stats.n_volumes == 6 and stats.n_slices_total == 10 + 6 * 40
    r = auto_configure(stats, preset, "cpu", DataConfig(), None, None)
    assert r["view_size"] % preset.encoder.total_stride == 0 and r["view_size"] <= 64
    assert r["n_slices"] == 16  # capped on CPU, volumes have 40 slices
    assert r["num_prototypes_3d"] == 3 and r["num_prototypes_2d"] == round(250 / 8)
    small_volumes = auto_configure(_stats(z=5), preset, "cpu", DataConfig(), None, None)
    assert small_volumes["n_slices"] == 5
    tight = auto_configure(stats, preset, "cpu", DataConfig(memory_budget_gb=0.01), None, None)
    roomy = auto_configure(stats, preset, "cpu", DataConfig(memory_budget_gb=8), None, None)
    assert tight["batch_size_2d"] < roomy["batch_size_2d"]
    only_2d = auto_configure(_stats(nvol=0), preset, "cpu", DataConfig(), None, None)
    assert only_2d["batch_size_3d"] == 0


def test_autoconfig_keeps_explicit_values_and_rejects_bad_sizes():
    preset = load_preset("cpu")
    r = auto_configure(_stats(), preset, "cpu", DataConfig(view_size=48, n_slices=7, batch_size_2d=3), 5, 2)
    assert (r["view_size"], r["n_slices"], r["batch_size_2d"], r["num_prototypes_2d"], r["num_prototypes_3d"]) == \
        (48, 7, 3, 5, 2)
    with pytest.raises(ValueError, match="multiple of"):
        auto_configure(_stats(), preset, "cpu", DataConfig(view_size=40), None, None)
    with pytest.raises(ValueError, match="too small"):
        auto_configure(_stats(), preset, "cpu", DataConfig(view_size=16), None, None)


def test_activation_estimate_grows_with_view_and_width():
    cpu, gpu = load_preset("cpu"), load_preset("gpu")
    assert slice_activation_bytes(cpu, 64) == pytest.approx(4 * slice_activation_bytes(cpu, 32), rel=0.01)
    assert slice_activation_bytes(gpu, 64) > 1.5 * slice_activation_bytes(cpu, 64)
