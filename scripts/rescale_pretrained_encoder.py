"""Rescale the encoder convolutions of an exported pretrained-weights file to nnU-Net's initial weight norm
(issue 12, fifteenth pass: does the scale of the pretrained encoder cost fine-tuning?).

Every convolution of the plugin's encoder is followed by an InstanceNorm, so multiplying its weight and
bias by c > 0 leaves the network's function unchanged (up to the norm's epsilon), but its gradient scales
by 1 / c and the relative size of an SGD step by 1 / c^2. The pretraining model starts from PyTorch's default
initialisation (weight norm about 0.41x that of nnU-Net's ``InitWeights_He(1e-2)``, which a run from scratch
gets), and after pretraining the encoder's convolutions are 0.40-0.75x the He norm: at the same learning
rate fine-tuning then moves them 2-6x further, relative to their size, than a run from scratch moves its
own. This script scales each encoder convolution (weight and bias, under all of its state_dict names: 2d
files also carry the encoder as ``decoder.encoder.*`` for stock networks) to the expected He norm
sqrt(2 * out_channels / (1 + 0.01^2)) and writes the file in place (temp file, then rename), printing the
factors.

    python scripts/rescale_pretrained_encoder.py RUN/fold_all/pretrained_for_3d_fullres.pth [more files]
"""
import json
import re
import sys
from pathlib import Path

import torch

from nnssl_joint.common.checkpoint_io import atomic_torch_save
from nnssl_joint.export import load_pretraining_checkpoint

NEG_SLOPE = 1e-2  # nnU-Net's InitWeights_He(1e-2)
# the encoder's convolutions, and their copies under decoder.encoder.* (2d files, for stock PlainConvUNet)
CONV = re.compile(r"^((?:decoder\.)?encoder\.stages\.\d+\.\d+\.convs\.\d+)\.conv\.weight$")


def he_norm(weight: torch.Tensor) -> float:
    """Expected Frobenius norm of ``weight`` under kaiming_normal_(a=0.01, mode fan_in): the square root of
    numel * 2 / ((1 + a^2) * fan_in) = 2 * out_channels / (1 + a^2)."""
    return float((2.0 * weight.shape[0] / (1 + NEG_SLOPE ** 2)) ** 0.5)


def rescale(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    factors = {}
    for key in list(weights):
        match = CONV.match(key)
        if not match:
            continue
        block = match.group(1)
        factor = he_norm(weights[key]) / float(weights[key].norm())
        for name in ("conv.weight", "conv.bias", "all_modules.0.weight", "all_modules.0.bias"):
            if f"{block}.{name}" in weights:
                weights[f"{block}.{name}"] = weights[f"{block}.{name}"] * factor
        factors[block] = round(factor, 3)
    if not factors:
        raise SystemExit("no encoder convolution (encoder.stages.*.convs.*.conv.weight) in the file")
    return factors


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for path in map(Path, sys.argv[1:]):
        ckpt = load_pretraining_checkpoint(path)
        meta = ckpt["nnssl_joint"]
        if meta.get("encoder_rescaled_to_he_norm"):
            raise SystemExit(f"{path} was rescaled before (factors {meta['encoder_rescaled_to_he_norm']}); "
                             "nothing done")
        factors = rescale(ckpt["network_weights"])
        meta["encoder_rescaled_to_he_norm"] = factors
        atomic_torch_save(ckpt, path)
        print(json.dumps({"file": str(path), "factors": factors}))
