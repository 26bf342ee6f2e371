"""``init_from``: a pretraining run that starts from another run's weights (e.g. a 2D-only pretraining
continued with the volume terms). Every weight of the file lands in the new network, the run's own state
(queues, the momentum key network) does not come from the file, the key network copies the loaded online
network, and a file of another preset, channel count or prototype count is refused naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.models.preset import ArchitecturePreset, load_preset
from nnssl_joint.pretrain.checkpoint import load_initial_weights
from nnssl_joint.pretrain.config import PretrainConfig
from nnssl_joint.pretrain.model import JointSSLModel
from nnssl_joint.ssl.objective import PAPER_OBJECTIVE, ObjectiveConfig

PROTOTYPES = {"num_prototypes_2d": 8, "num_prototypes_3d": 4}
#: L_inter's 3D SwAV queue (the paper's length; the defaults have none since the twenty-third pass): run state
#: in the file and in the new network that must stay the run's own
SWAV_QUEUE = {"queue_length_3d": PAPER_OBJECTIVE["queue_length_3d"]}
#: the 2D-only arm's objective (no volume term; the benchmark's "intra" run), with a 3D SwAV queue
INTRA = ObjectiveConfig(**PROTOTYPES, **SWAV_QUEUE, lambda_intra_3d=0.0, lambda_inter=0.0, lambda_mask=0.0,
                        lambda_volume_contrast=0.0, lambda_dense=1.0)
#: a joint objective with queues and a momentum key network: run state the file must not overwrite
JOINT = ObjectiveConfig(**PROTOTYPES, **SWAV_QUEUE, lambda_dense=1.0, lambda_volume_contrast=1.0,
                        volume_contrast_momentum=0.99, volume_contrast_queue=16)


def _model(objective: ObjectiveConfig, seed: int, preset: ArchitecturePreset | None = None) -> JointSSLModel:
    torch.manual_seed(seed)
    return JointSSLModel(preset or load_preset("cpu"), 1, objective)


def _save(model: JointSSLModel, path: Path, channels: int = 1) -> Path:
    """A checkpoint as JointSSLPretrainTrainer writes it (the parts load_initial_weights reads)."""
    torch.save({"network_weights": model.state_dict(), "trainer_name": "JointSSLPretrainTrainer",
                "nnssl_joint": {"preset": model.preset.to_dict(), "input_channels": channels,
                                "config": {}, "resolved": {}}}, path)
    return path


def _trained(objective: ObjectiveConfig) -> JointSSLModel:
    """A network whose every tensor differs from a fresh draw (as after pretraining)."""
    model = _model(objective, seed=1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) + 0.5)
    return model


def _is_queue(name: str) -> bool:
    return ".queues." in name or name.startswith("volume_contrast.queue")


def test_a_2d_only_run_starts_a_joint_run_and_the_key_network_follows(tmp_path):
    source = _trained(INTRA)
    path = _save(source, tmp_path / "checkpoint_final.pth")
    model = _model(JOINT, seed=2)
    queues_before = {k: v.clone() for k, v in model.state_dict().items() if _is_queue(k)}
    assert any(k.startswith("volume_contrast.") for k in queues_before)
    assert any(".queues." in k for k in queues_before) and any(_is_queue(k) for k in source.state_dict())

    loaded = load_initial_weights(model, path, model.preset, 1)

    state = model.state_dict()
    weights = {k: v for k, v in source.state_dict().items() if not _is_queue(k)}
    assert loaded["loaded"] == len(weights) and loaded["own_draw"] == [] and loaded["unused"] == []
    for name, tensor in weights.items():
        assert torch.equal(state[name], tensor), name
    for name, tensor in queues_before.items():  # the run's own queues, empty as at any start
        assert torch.equal(state[name], tensor), name
    # the momentum keys start as a copy of the loaded online network, not of the run's own draw
    for part in ("encoder", "slice_embedding", "slice_transformer"):
        for name, tensor in getattr(model, part).state_dict().items():
            assert torch.equal(state[f"volume_key_network.{part}.{name}"], tensor), (part, name)


def test_a_joint_file_into_a_2d_only_run_names_what_it_leaves_out(tmp_path):
    path = _save(_trained(JOINT), tmp_path / "joint.pth")
    model = _model(INTRA, seed=2)
    loaded = load_initial_weights(model, path, model.preset, 1)
    assert loaded["unused"] == ["volume_contrast", "volume_key_network"]
    assert loaded["loaded"] == len([k for k in model.state_dict() if not _is_queue(k)])


def test_a_network_without_the_dense_head_keeps_its_own_draw_of_it(tmp_path):
    # the paper's 2D-only arm (L_intra alone): no dense head in its file
    no_dense = ObjectiveConfig.paper(**PROTOTYPES, lambda_intra_3d=0.0, lambda_inter=0.0, lambda_mask=0.0)
    assert _trained(no_dense).dense_head is None
    path = _save(_trained(no_dense), tmp_path / "plain.pth")
    model = _model(INTRA, seed=2)
    own = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("dense_head.")}
    assert own
    loaded = load_initial_weights(model, path, model.preset, 1)
    assert loaded["own_draw"] == ["dense_head"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in own.items())


def test_the_default_2d_only_run_starts_the_default_joint_run(tmp_path):
    """The defaults (twenty-third pass): the 2D-only arm (the volume weights 0) has the dense head, the joint
    run the dense head, the contrastive volume term's queue and the momentum key network, no SwAV queue."""
    intra = ObjectiveConfig(**PROTOTYPES, lambda_intra_3d=0.0, lambda_inter=0.0, lambda_mask=0.0,
                            lambda_volume_contrast=0.0)
    source = _trained(intra)
    assert source.dense_head is not None and source.volume_contrast is None
    path = _save(source, tmp_path / "checkpoint_final.pth")
    model = _model(ObjectiveConfig(**PROTOTYPES), seed=2)
    assert model.dense_head is not None and model.volume_key_network is not None
    queues_before = {k: v.clone() for k, v in model.state_dict().items() if _is_queue(k)}
    assert queues_before and all(k.startswith("volume_contrast.queue") for k in queues_before)

    loaded = load_initial_weights(model, path, model.preset, 1)

    state = model.state_dict()
    assert loaded["loaded"] == len(source.state_dict())
    assert loaded["own_draw"] == [] and loaded["unused"] == []
    for name, tensor in source.state_dict().items():  # the dense head included
        assert torch.equal(state[name], tensor), name
    for name, tensor in queues_before.items():
        assert torch.equal(state[name], tensor), name
    for part in ("encoder", "slice_embedding", "slice_transformer"):
        for name, tensor in getattr(model, part).state_dict().items():
            assert torch.equal(state[f"volume_key_network.{part}.{name}"], tensor), (part, name)


def test_files_that_do_not_fit_are_refused_naming_the_file_and_the_fix(tmp_path):
    model = _model(JOINT, seed=2)
    with pytest.raises(NnsslJointError, match=r"init_from: .*missing\.pth does not exist"):
        load_initial_weights(model, tmp_path / "missing.pth", model.preset, 1)

    d = model.preset.to_dict()
    wider = ArchitecturePreset.from_dict({**d, "name": "wide", "encoder": {
        **d["encoder"], "features_per_stage": [f * 2 for f in d["encoder"]["features_per_stage"]]}})
    path = _save(_model(INTRA, seed=1, preset=wider), tmp_path / "wide.pth")
    with pytest.raises(NnsslJointError, match=r"wide\.pth was pretrained with preset 'wide'"):
        load_initial_weights(model, path, model.preset, 1)

    path = _save(_trained(INTRA), tmp_path / "two_channels.pth", channels=2)
    with pytest.raises(NnsslJointError, match=r"two_channels\.pth has 2 input channel\(s\), this dataset 1"):
        load_initial_weights(model, path, model.preset, 1)

    other_k = ObjectiveConfig(**{**INTRA.to_dict(), "num_prototypes_2d": 16})
    path = _save(_model(other_k, seed=1), tmp_path / "k16.pth")
    with pytest.raises(NnsslJointError, match=r"intra_loss\.prototypes\.weight \(16, .*num_prototypes_2d"):
        load_initial_weights(model, path, model.preset, 1)

    exported = tmp_path / "exported.pth"  # keys of a fine-tuning network, none of the pretraining's
    torch.save({"network_weights": {"decoder.encoder.stages.0.weight": torch.zeros(1)},
                "nnssl_joint": {"preset": model.preset.to_dict(), "input_channels": 1}}, exported)
    with pytest.raises(NnsslJointError, match=r"exported\.pth holds none of the pretraining network's"):
        load_initial_weights(model, exported, model.preset, 1)
    # nothing was half-loaded by the refusals
    fresh = _model(JOINT, seed=2)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fresh.state_dict().items())


def test_init_from_is_a_typed_key_of_the_configuration():
    assert PretrainConfig().init_from is None
    assert PretrainConfig.from_dict({"init_from": "/runs/a/checkpoint_final.pth"}).init_from == \
        "/runs/a/checkpoint_final.pth"
    with pytest.raises(ValueError, match="init_from"):
        PretrainConfig.from_dict({"init_from": 3})


def test_a_resume_that_changes_init_from_is_refused_naming_both_values():
    """``--c`` keeps the checkpoint's weights and never reads init_from again, so a changed value would be
    silently ignored; the same value (its file may be gone) resumes, and a checkpoint without the key (written
    before init_from existed) is not compared."""
    from nnssl_joint.pretrain import runtime

    def record(init_from):
        config = PretrainConfig.from_dict({"init_from": init_from}).to_dict()
        return {"preset": {"name": "cpu"}, "config": config,
                "resolved": {"view_size": 32, "n_slices": 8, "num_prototypes_2d": 8, "num_prototypes_3d": 2}}

    started = record("/runs/2d/checkpoint_final.pth")
    assert runtime.check_resume_compatible({"nnssl_joint": started}, record("/runs/2d/checkpoint_final.pth"))
    for changed in (None, "/runs/other/checkpoint_final.pth"):
        with pytest.raises(NnsslJointError) as error:
            runtime.check_resume_compatible({"nnssl_joint": started}, record(changed))
        message = str(error.value)
        assert "'/runs/2d/checkpoint_final.pth'" in message and repr(changed) in message
        assert "start a new run without --c" in message
    own_draw = record(None)  # a run from its own draw, resumed with a file
    with pytest.raises(NnsslJointError, match="init_from=None"):
        runtime.check_resume_compatible({"nnssl_joint": own_draw}, record("/runs/2d/checkpoint_final.pth"))
    before_the_key = record(None)
    del before_the_key["config"]["init_from"]
    assert runtime.check_resume_compatible({"nnssl_joint": before_the_key}, record("/x.pth"))
