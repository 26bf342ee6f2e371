"""scripts/rescale_pretrained_encoder.py: the exported network computes the same function after the rescale,
every encoder convolution ends at nnU-Net's He norm, and a second run refuses instead of rescaling twice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnssl_joint.export import export_for_presets
from nnssl_joint.models.downstream import SliceWiseUNet3D
from nnssl_joint.models.preset import load_preset
from nnssl_joint.pretrain.model import JointSSLModel
from nnssl_joint.ssl.objective import ObjectiveConfig

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "rescale_pretrained_encoder.py"


@pytest.fixture(scope="module")
def rescale(load_script):
    return load_script("rescale_pretrained_encoder")


def test_rescaling_keeps_the_function_and_reaches_the_he_norm(tmp_path, rescale):
    preset = load_preset("cpu")
    torch.manual_seed(0)
    model = JointSSLModel(preset, 1, ObjectiveConfig())  # PyTorch's default initialisation, as pretraining
    checkpoint = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": model.state_dict(), "trainer_name": "JointSSLPretrainTrainer",
                "nnssl_joint": {"preset": preset.to_dict(), "input_channels": 1}}, checkpoint)
    export_for_presets(checkpoint, tmp_path)
    path = tmp_path / "pretrained_for_3d_fullres.pth"
    before = torch.load(path, weights_only=False)["network_weights"]

    result = subprocess.run([sys.executable, str(SCRIPT), str(path)], check=False, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    saved = torch.load(path, weights_only=False)
    after = saved["network_weights"]
    factors = saved["nnssl_joint"]["encoder_rescaled_to_he_norm"]
    convs = [k for k in after if rescale.CONV.match(k)]
    assert len(factors) == len(convs) == 2 * preset.encoder.n_stages
    assert all(f > 1.3 for f in factors.values())  # PyTorch's default init is about 0.41x the He norm
    for key in convs:
        block = key[:-len(".conv.weight")]
        assert float(after[key].norm()) == pytest.approx(rescale.he_norm(after[key]), rel=1e-5)
        factor = float(after[key].norm() / before[key].norm())
        for name in ("conv.bias", "all_modules.0.weight", "all_modules.0.bias"):
            assert torch.allclose(after[f"{block}.{name}"], before[f"{block}.{name}"] * factor, rtol=1e-5)
    assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith("encoder.stages"))

    outputs = []
    for weights in (before, after):
        net = SliceWiseUNet3D(1, 2, False, preset.to_dict())
        net.load_state_dict(weights)
        net.eval()
        torch.manual_seed(1)
        with torch.no_grad():
            outputs.append(net(torch.randn(1, 1, 6, 32, 32)))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-3 * float(outputs[0].abs().max()))

    again = subprocess.run([sys.executable, str(SCRIPT), str(path)], check=False, capture_output=True,
                            text=True)
    assert again.returncode != 0 and "was rescaled before" in again.stderr
    assert torch.equal(torch.load(path, weights_only=False)["network_weights"][convs[0]], after[convs[0]])

    # a 2d file carries the encoder twice (encoder.* and decoder.encoder.*, for stock PlainConvUNet): both
    # copies are rescaled alike, so a stock network that loads both names gets one consistent encoder
    path_2d = tmp_path / "pretrained_for_2d.pth"
    result = subprocess.run([sys.executable, str(SCRIPT), str(path_2d)], check=False, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    weights_2d = torch.load(path_2d, weights_only=False)["network_weights"]
    aliases = [k for k in weights_2d if k.startswith("decoder.encoder.stages")]
    assert aliases and all(torch.equal(weights_2d[k], weights_2d[k[len("decoder."):]]) for k in aliases)
    assert all(float(weights_2d[k].norm()) == pytest.approx(rescale.he_norm(weights_2d[k]), rel=1e-5)
               for k in weights_2d if rescale.CONV.match(k))
