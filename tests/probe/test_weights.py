"""Names and random initialisation of probe weights (nnssl_joint/probe/weights.py)."""

import torch

from nnssl_joint.export import build_downstream_network
from nnssl_joint.models.downstream import SliceWiseUNet3D
from nnssl_joint.probe.weights import distinct_names, random_weights

RUN = "Dataset900_JointPretrain/JointSSLPretrainTrainer__nnsslJointPlans__joint_ssl/fold_all"


def test_names_tell_runs_apart_and_can_be_given(tmp_path):
    joint, intra = tmp_path / "pretrain_joint" / RUN, tmp_path / "pretrain_intra" / RUN
    names = distinct_names([str(joint), str(intra / "pretrained_for_2d.pth"), f"mine={joint}"])
    assert names == [("pretrain_joint:JointSSLPretrainTrainer", str(joint)),
                     ("pretrain_intra:JointSSLPretrainTrainer/pretrained_for_2d",
                      str(intra / "pretrained_for_2d.pth")),
                     ("mine", str(joint))]
    assert [n for n, _ in distinct_names([str(joint), str(joint)])] == ["JointSSLPretrainTrainer",
                                                                        "JointSSLPretrainTrainer#2"]


def test_random_weights_are_nnunets_initialisation_of_the_plans_network():
    def build():
        return build_downstream_network("cpu", "3d_fullres", 1)  # network.apply(network.initialize)

    a, b, c = random_weights(build, 0), random_weights(build, 0), random_weights(build, 1)
    torch.manual_seed(0)
    reference = build()
    assert isinstance(reference, SliceWiseUNet3D)
    for key, value in reference.encoder.state_dict().items():
        assert torch.equal(a.encoder.state_dict()[key], value)
        assert torch.equal(b.encoder.state_dict()[key], value)
    stem = "stages.0.0.convs.0.conv.weight"
    assert not torch.equal(a.encoder.state_dict()[stem], c.encoder.state_dict()[stem])
    assert a.slice_transformer is not None and a.model is None and not a.encoder.training
