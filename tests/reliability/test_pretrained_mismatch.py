"""Pretrained weights that do not fit fail before training, with a message naming the cause: the
configuration (a 2d file into 3d_fullres and back), the architecture preset, the channel count, a
pretraining checkpoint instead of the exported file, a checkpoint not written by nnssl_joint, a state
dict, a truncated or missing file, plans without the plugin's architectures. The files come from the
shared reference pretraining run."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from reliability_helpers import BIN, Workspace, load, nnunet_env, volumes, write_dataset, write_image

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.export import build_downstream_network, load_pretraining_checkpoint
from nnssl_joint.finetune import check_pretrained_weights, split_parameters
from nnssl_joint.models.preset import load_preset

HINT = "nnssl_joint export ..."


def fails(network, path, preset: dict | None, *fragments: str) -> str:
    with pytest.raises(NnsslJointError) as info:
        check_pretrained_weights(network, str(path), preset, HINT)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return str(info.value)


@pytest.fixture(scope="module")
def files(reference) -> dict:
    d = reference["run_dir"]
    return {"2d": d / "pretrained_for_2d.pth", "3d_fullres": d / "pretrained_for_3d_fullres.pth",
            "final": d / "checkpoint_final.pth"}


CPU = load_preset("cpu").to_dict()


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_matching_files_pass(files, configuration):
    net = build_downstream_network("cpu", configuration, 1)
    assert "non-segmentation-head keys present with matching shapes" in \
        check_pretrained_weights(net, str(files[configuration]), CPU, HINT)
    # nnU-Net compiles the network on CUDA (names get an _orig_mod. prefix): the check and the split into
    # pretrained parts / the rest must see through it
    compiled = torch.compile(net)
    check_pretrained_weights(compiled, str(files[configuration]), CPU, HINT)
    assert len(split_parameters(compiled)[0]) == len(split_parameters(net)[0]) > 10


@pytest.mark.parametrize(("file", "network"), [("2d", "3d_fullres"), ("3d_fullres", "2d")])
def test_file_of_the_other_configuration(files, file, network):
    fails(build_downstream_network("cpu", network, 1), files[file], CPU,
          f"holds the weights of the '{file}' network", f"this is the '{network}' network",
          f"pass pretrained_for_{network}.pth")


def test_other_architecture_preset(files):
    gpu = load_preset("gpu").to_dict()
    fails(build_downstream_network("cpu", "3d_fullres", 1), files["3d_fullres"], gpu,
          "pretrained with architecture preset 'cpu' but the plans use preset 'gpu'", "--preset cpu")
    # without the plans' preset the network's own is compared
    fails(build_downstream_network("gpu", "3d_fullres", 1), files["3d_fullres"], None,
          "preset 'cpu' but the plans use preset 'gpu'")


def test_other_channel_count(files):
    fails(build_downstream_network("cpu", "3d_fullres", 2), files["3d_fullres"], CPU,
          "input channels differ", "1 input channel(s) in the file, the network 2", HINT)


def test_pretraining_checkpoint_instead_of_the_exported_file(files):
    fails(build_downstream_network("cpu", "3d_fullres", 1), files["final"], CPU,
          "it is a pretraining checkpoint, not a downstream file", HINT)


def test_through_plane_network_with_the_file_of_the_paper_network(files):
    """A pretraining run's pretrained_for_3d_fullres.pth has no through-plane convolutions: the message
    says so and points to an export for the plans, instead of calling it a pretraining checkpoint."""
    from nnssl_joint.models.downstream import SliceWiseUNet3D

    net = SliceWiseUNet3D(1, 2, True, CPU, through_plane_convs=True)
    message = fails(net, files["3d_fullres"], CPU, "through_plane_convs: true", "export for these plans",
                    HINT)
    assert "pretraining checkpoint" not in message


def test_network_from_plans_without_the_plugin(files):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    net = PlainConvUNet(1, 4, (8, 16, 32, 64), torch.nn.Conv2d, 3, (1, 2, 2, 2), 2, 2, 2, conv_bias=True,
                        norm_op=torch.nn.InstanceNorm2d)
    fails(net, files["2d"], None, "the network is PlainConvUNet, not one of the plugin's architectures",
          "--downstream", "-p nnsslJointPlans")


def test_checkpoint_not_written_by_nnssl_joint(files, tmp_path):
    net = build_downstream_network("cpu", "2d", 1)
    plain = tmp_path / "nnunet_checkpoint.pth"
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer", "current_epoch": 1000},
               plain)
    fails(net, plain, CPU, "was not written by nnssl_joint (trainer 'nnUNetTrainer'",
          "JointSSLPretrainTrainer")
    state_dict = tmp_path / "state_dict.pth"
    torch.save(net.state_dict(), state_dict)
    fails(net, state_dict, CPU, "has no 'network_weights'")
    text = tmp_path / "weights.pth"
    text.write_text("not a checkpoint")
    fails(net, text, CPU, "cannot be read as a PyTorch checkpoint")


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_file(files, tmp_path, keep):
    truncated = tmp_path / "pretrained_for_3d_fullres.pth"
    data = files["3d_fullres"].read_bytes()
    truncated.write_bytes(data[: int(len(data) * keep)])
    message = fails(build_downstream_network("cpu", "3d_fullres", 1), truncated, CPU,
                    str(truncated), "cannot be read as a PyTorch checkpoint", "truncated")
    assert "checkpoint_final.pth" in message
    with pytest.raises(NnsslJointError, match="does not exist"):
        load_pretraining_checkpoint(tmp_path / "missing.pth")


def test_finetune_trainer_refuses_the_2d_file_for_3d_fullres_before_training(base, reference, tmp_path):
    """Through nnUNetv2_train -tr JointSSLFinetuneTrainer -pretrained_weights, like a user."""
    from nnssl_joint.planning.downstream import plan_and_preprocess_downstream

    ws = Workspace.create(tmp_path)
    rng = np.random.default_rng(11)
    folder = write_dataset(ws.raw, 503, "Labeled", volumes(rng, [8, 8, 8]))
    (folder / "labelsTr").mkdir()
    for i in range(3):
        label = np.zeros((8, 32, 32), np.uint8)
        label[3:5, 10:20, 12:22] = 1
        write_image(label, folder / "labelsTr" / f"vol{i}.nii.gz")
    dataset_json = json.loads((folder / "dataset.json").read_text())
    dataset_json["labels"] = {"background": 0, "organ": 1}
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    with nnunet_env(ws):
        plan_and_preprocess_downstream(503, configurations=("3d_fullres",), num_processes=1,
                                       num_processes_fingerprint=1)
    (ws.pre / "Dataset503_Labeled" / "splits_final.json").write_text(
        json.dumps([{"train": ["vol0", "vol1"], "val": ["vol2"]}]))
    weights = tmp_path / "pretrained_for_2d.pth"
    shutil.copy(reference["run_dir"] / "pretrained_for_2d.pth", weights)
    res = subprocess.run([str(BIN / "nnUNetv2_train"), "503", "3d_fullres", "0", "-p", "nnsslJointPlans",
                          "-tr",
                          "JointSSLFinetuneTrainer", "-device", "cpu", "-pretrained_weights", str(weights)],
                         env=ws.env(nnUNet_n_proc_DA="0"), cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode != 0
    assert "holds the weights of the '2d' network (JointSSLUNet2D), but this is the '3d_fullres' network" \
           in res.stderr, res.stderr[-3000:]
    assert "Epoch 0" not in res.stdout
    assert load(weights)["nnssl_joint"]["configuration"] == "2d"
