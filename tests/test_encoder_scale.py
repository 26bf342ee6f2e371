"""The export's encoder scale (nnssl_joint.export.scale_encoder_to_nnunet_init): with ``encoder_scale:
nnunet`` every encoder convolution of an exported file has the norm of nnU-Net's initial weights and the
exported network computes the same function as the default export at the pretraining's own scale;
scripts/rescale_pretrained_encoder.py turns a default export into exactly that, and refuses to rescale
twice; the probe reads a rescaled file as the pretraining's encoder (tests/probe)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.export import ENCODER_CONV, RESCALE_RECORD, export_for_presets, he_norm
from nnssl_joint.models.downstream import JointSSLUNet2D, SliceWiseUNet3D
from nnssl_joint.models.preset import load_preset
from nnssl_joint.pretrain.model import JointSSLModel
from nnssl_joint.ssl.objective import ObjectiveConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rescale_pretrained_encoder.py"


@pytest.fixture(scope="module")
def checkpoint(module_tmp_path):
    preset = load_preset("cpu")
    torch.manual_seed(0)
    model = JointSSLModel(preset, 1, ObjectiveConfig())  # PyTorch's default initialisation, as pretraining
    path = module_tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": model.state_dict(), "trainer_name": "JointSSLPretrainTrainer",
                "nnssl_joint": {"preset": preset.to_dict(), "input_channels": 1}}, path)
    return path


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["network_weights"]


def _output(cls, weights, shape):
    net = cls(1, 2, False, load_preset("cpu").to_dict())
    own = net.state_dict().keys()  # a 2d file also carries decoder.encoder.* for stock PlainConvUNet
    net.load_state_dict({k: v for k, v in weights.items() if k in own})
    net.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        return net(torch.randn(*shape))


def test_the_export_scales_the_encoder_to_nnunets_init_norm_and_keeps_the_function(checkpoint, tmp_path):
    raw, scaled = tmp_path / "raw", tmp_path / "scaled"
    export_for_presets(checkpoint, raw)  # the default, as at the end of pretraining
    export_for_presets(checkpoint, scaled, encoder_scale="nnunet")
    n_stages = load_preset("cpu").encoder.n_stages
    for configuration, cls, shape in (("3d_fullres", SliceWiseUNet3D, (1, 1, 6, 32, 32)),
                                      ("2d", JointSSLUNet2D, (2, 1, 64, 64))):
        before = _weights(raw / f"pretrained_for_{configuration}.pth")
        saved = torch.load(scaled / f"pretrained_for_{configuration}.pth", weights_only=False)
        after, factors = saved["network_weights"], saved["nnssl_joint"][RESCALE_RECORD]
        assert RESCALE_RECORD not in torch.load(raw / f"pretrained_for_{configuration}.pth",
                                                weights_only=False)["nnssl_joint"]
        assert len(factors) == 2 * n_stages
        assert all(f > 1.3 for f in factors.values())  # PyTorch's default init is about 0.41x the He norm
        convs = [k for k in after if ENCODER_CONV.match(k)]
        for key in convs:
            block = key[:-len(".conv.weight")]
            assert float(after[key].norm()) == pytest.approx(he_norm(after[key]), rel=1e-5)
            factor = float(after[key].norm() / before[key].norm())
            for name in ("conv.bias", "all_modules.0.weight", "all_modules.0.bias"):
                assert torch.allclose(after[f"{block}.{name}"], before[f"{block}.{name}"] * factor, rtol=1e-5)
        # nothing else changes: norms, slice parts, the decoder draw
        assert all(torch.equal(after[k], before[k]) for k in after
                   if not k.startswith(("encoder.stages", "decoder.encoder.stages")))
        if configuration == "2d":  # both copies of a stock PlainConvUNet's encoder rescaled alike
            aliases = [k for k in after if k.startswith("decoder.encoder.stages")]
            assert aliases and all(torch.equal(after[k], after[k[len("decoder."):]]) for k in aliases)
        out_before, out_after = _output(cls, before, shape), _output(cls, after, shape)
        assert torch.allclose(out_before, out_after, atol=1e-3 * float(out_before.abs().max()))
    with pytest.raises(NnsslJointError, match="encoder scale 'he': choose from nnunet, pretrained"):
        export_for_presets(checkpoint, tmp_path / "bad", encoder_scale="he")


def test_the_script_turns_a_default_export_into_the_rescaled_one_and_refuses_twice(checkpoint, tmp_path):
    export_for_presets(checkpoint, tmp_path / "raw")
    export_for_presets(checkpoint, tmp_path / "scaled", encoder_scale="nnunet")
    for configuration in ("3d_fullres", "2d"):
        path = tmp_path / "raw" / f"pretrained_for_{configuration}.pth"
        result = subprocess.run([sys.executable, str(SCRIPT), str(path)], check=False, capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stderr
        expected = _weights(tmp_path / "scaled" / f"pretrained_for_{configuration}.pth")
        got = _weights(path)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
        again = subprocess.run([sys.executable, str(SCRIPT), str(path)], check=False, capture_output=True,
                               text=True)
        assert again.returncode != 0 and "was rescaled before" in again.stderr
        assert all(torch.equal(v, got[k]) for k, v in _weights(path).items())
    # a file the export rescaled already: refused as well
    scaled = tmp_path / "scaled" / "pretrained_for_3d_fullres.pth"
    again = subprocess.run([sys.executable, str(SCRIPT), str(scaled)], check=False, capture_output=True,
                           text=True)
    assert again.returncode != 0 and "was rescaled before" in again.stderr
