"""Turn a pretraining checkpoint into weights that nnU-Net's stock ``-pretrained_weights`` accepts.

nnU-Net's loader (nnunetv2/run/load_pretrained_weights.py) wants every key of the downstream network
except ``.seg_layers.`` in the file, with identical shapes. A pretraining checkpoint holds the encoder
(f_intra), the slice embedding (g) and the slice Transformer (f_inter) but no decoder, so this module
builds the full downstream network, fills in the pretrained tensors and saves its state dict:

* at the end of pretraining, for the preset's ``2d`` and ``3d_fullres`` networks at the pretraining
  channel count (``pretrained_for_2d.pth``, ``pretrained_for_3d_fullres.pth`` next to
  ``checkpoint_final.pth``);
* on demand with ``nnssl_joint export`` for a given dataset/plans/configuration, which also adapts the
  input stem when the channel count differs (averaged over the pretrained input channels and
  repeated, scaled so a constant input gives the same response).
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnssl_joint.common.checkpoint_io import atomic_torch_save
from nnssl_joint.errors import NnsslJointError
from nnssl_joint.models.downstream import PRETRAINED_PARTS, JointSSLUNet2D, SliceWiseUNet3D, resolve_preset
from nnssl_joint.models.preset import ArchitecturePreset

# the first convolution's weight; dynamic-network-architectures registers it under two names
STEM_KEY_SUFFIXES = ("stages.0.0.convs.0.conv.weight", "stages.0.0.convs.0.all_modules.0.weight")
DOWNSTREAM_CLASSES = {"2d": JointSSLUNet2D, "3d_fullres": SliceWiseUNet3D}
STOCK_ENCODER_ALIAS = "decoder.encoder."
#: negative slope of nnU-Net's initial weights, ``InitWeights_He(1e-2)`` (kaiming_normal_)
HE_NEG_SLOPE = 1e-2
#: an encoder convolution's weight (in a pretraining checkpoint or, with ``decoder.``, a stock 2d file's copy)
ENCODER_CONV = re.compile(r"^((?:decoder\.)?encoder\.stages\.\d+\.\d+\.convs\.\d+)\.conv\.weight$")
#: ``encoder_scale`` of an export: ``nnunet`` scales every encoder convolution to the norm of nnU-Net's
#: initial weights (same function), ``pretrained`` (the default) keeps the pretraining's scale
ENCODER_SCALES = ("nnunet", "pretrained")
#: where the export records the factors of ``encoder_scale: nnunet``
RESCALE_RECORD = "encoder_rescaled_to_he_norm"


def load_pretraining_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate a JointSSLPretrainTrainer checkpoint (or an exported file)."""
    path = Path(path)
    if not path.is_file():
        raise NnsslJointError(f"pretrained weights file {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, pickle.UnpicklingError) as e:
        raise NnsslJointError(
            f"{path} cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e}); the file is truncated "
            "or not a checkpoint. Use checkpoint_final.pth / checkpoint_latest.pth of a finished pretraining "
            "run") from e
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise NnsslJointError(f"{path} has no 'network_weights'; it is not an nnU-Net/nnssl_joint checkpoint")
    meta = ckpt.get("nnssl_joint")
    if meta is None or "preset" not in meta:
        raise NnsslJointError(
            f"{path} was not written by nnssl_joint (trainer '{ckpt.get('trainer_name', 'unknown')}', no "
            "'nnssl_joint' record): its weights do not follow the plugin's architecture presets. Use a "
            "JointSSLPretrainTrainer checkpoint")
    return ckpt


#: record of an exported file: whether the encoder was pretrained with ``objective.norm_over_window`` (the
#: probe then reads its windows with window statistics, as the pretraining's own read-outs do)
NORM_OVER_WINDOW_RECORD = "norm_over_window"


def pretraining_record(ckpt: dict) -> dict[str, Any]:
    """What an exported file keeps of the pretraining it came from besides the weights: whether its encoder
    took window statistics (:data:`NORM_OVER_WINDOW_RECORD`; a checkpoint that does not record the key had
    per-slice statistics, the only kind before it existed)."""
    meta = ckpt["nnssl_joint"]
    if NORM_OVER_WINDOW_RECORD in meta:  # an exported file, exported again
        return {NORM_OVER_WINDOW_RECORD: bool(meta[NORM_OVER_WINDOW_RECORD])}
    objective = meta.get("config", {}).get("objective", {})
    return {NORM_OVER_WINDOW_RECORD: bool(objective.get(NORM_OVER_WINDOW_RECORD, False))}


def he_norm(weight: torch.Tensor) -> float:
    """Expected Frobenius norm of ``weight`` under nnU-Net's ``InitWeights_He(1e-2)`` (kaiming_normal_, fan
    in): sqrt(numel * 2 / ((1 + a^2) * fan_in)) = sqrt(2 * out_channels / (1 + a^2))."""
    return float((2.0 * weight.shape[0] / (1 + HE_NEG_SLOPE ** 2)) ** 0.5)


def scale_encoder_to_nnunet_init(weights: dict[str, torch.Tensor]
                                 ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``weights`` with every encoder convolution (weight and bias, under all of its names) scaled to the
    expected norm of nnU-Net's initial weights, and the factor of each.

    Every convolution of the encoder is followed by an InstanceNorm, so a factor c > 0 leaves the network's
    function unchanged (up to the norm's epsilon), but SGD's relative step on that convolution scales with
    1 / c^2. Pretraining starts from PyTorch's default initialisation (about 0.41x the He norm) and ends at
    0.40-0.75x of it, so fine-tuning with nnU-Net's schedule, tuned for He-initialised weights, would move
    the pretrained encoder 2-6x further, relative to its size, than a run from scratch moves its own
    (docs/pretraining.md, fifteenth and eighteenth passes). Measured on the demo's 3d_fullres task at one
    schedule (5 seeds, 32 held-out cases): with only encoder stage 0 transferred the rescale gained +1.0
    [+0.5, +1.6] Dice points (5 of 5 seeds), with the whole encoder +0.6 [-1.2, +3.4] (joint) and -0.7
    [-1.4, -0.0] (2D-only): not a default, an opt-in (``encoder_scale: nnunet``)."""
    factors = {}
    for key, value in weights.items():
        match = ENCODER_CONV.match(key)
        if match:
            factors[match.group(1)] = he_norm(value) / float(value.norm())
    if not factors:
        raise NnsslJointError("no encoder convolution (encoder.stages.*.convs.*.conv.weight) in the weights: "
                              "not a pretraining checkpoint or exported file of nnssl_joint")
    return scale_encoder_blocks(weights, factors), factors


def scale_encoder_blocks(weights: dict[str, torch.Tensor], factors: dict[str, float], inverse: bool = False
                         ) -> dict[str, torch.Tensor]:
    """``weights`` with each convolution block of ``factors`` (weight and bias, under both of the names
    dynamic-network-architectures registers) multiplied by its factor, or divided by it (``inverse``: back
    to the pretraining's scale, as the probe reads an exported file)."""
    out = dict(weights)
    for block, factor in factors.items():
        for name in ("conv.weight", "conv.bias", "all_modules.0.weight", "all_modules.0.bias"):
            key = f"{block}.{name}"
            if key in weights:
                out[key] = weights[key] / factor if inverse else weights[key] * factor
    return out


def check_encoder_scale(encoder_scale: str) -> None:
    if encoder_scale not in ENCODER_SCALES:
        raise NnsslJointError(f"encoder scale {encoder_scale!r}: choose from {', '.join(ENCODER_SCALES)}")


def pretrained_weights_to_export(ckpt: dict[str, Any], encoder_scale: str
                                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checkpoint's weights as an export fills them in, and what the export's record adds."""
    check_encoder_scale(encoder_scale)
    if encoder_scale == "pretrained":
        return ckpt["network_weights"], {}
    if ckpt["nnssl_joint"].get(RESCALE_RECORD):  # an exported file, rescaled already
        return ckpt["network_weights"], {RESCALE_RECORD: ckpt["nnssl_joint"][RESCALE_RECORD]}
    weights, factors = scale_encoder_to_nnunet_init(ckpt["network_weights"])
    return weights, {RESCALE_RECORD: factors}


def adapt_stem(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a first-conv weight (out, in_old, ...) to ``in_channels`` input channels."""
    old = weight.shape[1]
    if old == in_channels:
        return weight
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, *([1] * (weight.dim() - 2))) * (old / in_channels)


def fill_pretrained(network: nn.Module, pretrained: dict[str, torch.Tensor], adapt_channels: bool = True
                    ) -> dict[str, list[str]]:
    """Copy every pretrained key of the network's pretrained parts into ``network``.

    Returns {'loaded': [...], 'adapted': [...]}. Raises NnsslJointError naming the keys when a
    pretrained part is missing or has another shape (other preset)."""
    state = network.state_dict()
    loaded, adapted, missing, mismatched = [], [], [], []
    for key, value in state.items():
        if not key.startswith(tuple(f"{p}." for p in PRETRAINED_PARTS)):
            continue
        if key not in pretrained:
            missing.append(key)
            continue
        src = pretrained[key]
        if src.shape != value.shape:
            if adapt_channels and key.endswith(STEM_KEY_SUFFIXES) and src.shape[0] == value.shape[0] \
                    and src.shape[2:] == value.shape[2:]:
                state[key] = adapt_stem(src, value.shape[1]).to(value.dtype)
                adapted.append(key)
                continue
            mismatched.append(f"{key}: checkpoint {tuple(src.shape)} vs network {tuple(value.shape)}")
            continue
        state[key] = src.to(value.dtype)
        loaded.append(key)
    if missing or mismatched:
        raise NnsslJointError(
            "the pretrained weights do not fit this network (different architecture preset?). "
            + (f"Missing keys ({len(missing)}): {missing[:6]}{' ...' if len(missing) > 6 else ''}. "
               if missing else "")
            + (f"Shape mismatches ({len(mismatched)}): {mismatched[:6]}. " if mismatched else "")
            + "Plan the downstream dataset with the pretraining run's preset "
              "(nnssl_joint plan_and_preprocess -d ID --downstream --preset NAME)")
    # nnU-Net's stock PlainConvUNet registers its encoder a second time under decoder.encoder.*
    for key in state:
        if key.startswith(STOCK_ENCODER_ALIAS) and f"encoder.{key[len(STOCK_ENCODER_ALIAS):]}" in state:
            state[key] = state[f"encoder.{key[len(STOCK_ENCODER_ALIAS):]}"]
    network.load_state_dict(state)
    return {"loaded": loaded, "adapted": adapted}


def with_stock_encoder_alias(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` plus every ``encoder.*`` tensor again as ``decoder.encoder.*``: the key set of nnU-Net's
    stock 2D ``PlainConvUNet`` (whose ``UNetDecoder`` holds the encoder as a submodule), so a 2D file of
    a preset with nnU-Net's topology (``--preset nnunet``) loads with stock ``-pretrained_weights`` too.
    The plugin's own networks ignore the extra keys."""
    aliases = {f"decoder.{k}": v for k, v in weights.items() if k.startswith("encoder.")}
    return {**weights, **aliases}


def build_downstream_network(preset: ArchitecturePreset | dict | str, configuration: str, input_channels: int,
                             num_classes: int = 2, deep_supervision: bool = True) -> nn.Module:
    if configuration not in DOWNSTREAM_CLASSES:
        raise NnsslJointError(f"configuration '{configuration}' has no plugin network; use one of "
                              f"{sorted(DOWNSTREAM_CLASSES)}")
    net = DOWNSTREAM_CLASSES[configuration](input_channels, num_classes, deep_supervision,
                                           preset=resolve_preset(preset).to_dict())
    net.apply(net.initialize)
    return net


def export_file(network: nn.Module, meta: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    weights = network.state_dict()
    if meta.get("configuration") == "2d":
        weights = with_stock_encoder_alias(weights)
    atomic_torch_save({"network_weights": weights, "nnssl_joint": meta, "trainer_name": "nnssl_joint.export"},
                      out)
    return out


def export_for_presets(checkpoint_path: str | Path, out_folder: str | Path, seed: int = 0,
                       encoder_scale: str = "pretrained") -> list[Path]:
    """Write ``pretrained_for_2d.pth`` and ``pretrained_for_3d_fullres.pth`` for the checkpoint's preset
    and channel count (decoders freshly initialised with ``seed``); ``encoder_scale``: one of
    :data:`ENCODER_SCALES` (:func:`scale_encoder_to_nnunet_init`)."""
    ckpt = load_pretraining_checkpoint(checkpoint_path)
    meta = ckpt["nnssl_joint"]
    weights, record = pretrained_weights_to_export(ckpt, encoder_scale)
    written = []
    for configuration in DOWNSTREAM_CLASSES:
        torch.manual_seed(seed)
        net = build_downstream_network(meta["preset"], configuration, int(meta["input_channels"]))
        fill_pretrained(net, weights, adapt_channels=False)
        written.append(export_file(net, {"preset": meta["preset"], "input_channels": meta["input_channels"],
                                         "source": str(checkpoint_path), "configuration": configuration,
                                         **record, **pretraining_record(ckpt)},
                                   Path(out_folder) / f"pretrained_for_{configuration}.pth"))
    return written


def export_for_plans(checkpoint_path: str | Path, dataset: str | int, configuration: str,
                     plans_identifier: str, out: str | Path, seed: int = 0,
                     encoder_scale: str = "pretrained") -> tuple[Path, dict[str, list[str]]]:
    """Build the downstream network exactly as nnU-Net will (plans + dataset.json of the preprocessed
    dataset) and fill in the pretrained parts, adapting the stem to the dataset's channel count;
    ``encoder_scale`` as in :func:`export_for_presets`."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    ckpt = load_pretraining_checkpoint(checkpoint_path)
    weights, record = pretrained_weights_to_export(ckpt, encoder_scale)
    if nnUNet_preprocessed is None:
        raise NnsslJointError("environment variable nnUNet_preprocessed is not set; export it (see the "
                              "README)")
    name = maybe_convert_to_dataset_name(dataset)
    folder = Path(nnUNet_preprocessed) / name
    plans_file = folder / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise NnsslJointError(f"plans file {plans_file} does not exist; run nnssl_joint plan_and_preprocess "
                              f"-d {dataset} --downstream first, or pass the right -p")
    pm = PlansManager(str(plans_file))
    if configuration not in pm.available_configurations:
        raise NnsslJointError(f"configuration '{configuration}' is not in {plans_file}; available: "
                              f"{pm.available_configurations}")
    cm = pm.get_configuration(configuration)
    dataset_json = load_json(str(folder / "dataset.json"))
    lm = pm.get_label_manager(dataset_json)
    torch.manual_seed(seed)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import,
                                 determine_num_input_channels(pm, cm, dataset_json),
                                 lm.num_segmentation_heads, allow_init=True, deep_supervision=True)
    stock = not cm.network_arch_class_name.startswith("nnssl_joint.")
    if stock and not (configuration == "2d" and cm.network_arch_class_name.endswith("PlainConvUNet")):
        raise NnsslJointError(
            f"configuration '{configuration}' of {plans_file} uses {cm.network_arch_class_name}: pretrained "
            "weights fit the plugin's architectures (nnssl_joint plan_and_preprocess --downstream) and "
            "nnU-Net's stock 2d PlainConvUNet when pretrained with --preset nnunet")
    try:
        report = fill_pretrained(net, weights, adapt_channels=True)
    except NnsslJointError as e:
        if not stock:
            raise
        raise NnsslJointError(f"{checkpoint_path} does not fit the stock 2d network of {plans_file}: {e} "
                              f"For stock plans, pretrain with the preset of those plans (preset file: "
                              f"{plans_file}, or --preset nnunet in the demo/benchmark)") from None
    meta = {"preset": ckpt["nnssl_joint"]["preset"] if stock else net.preset.to_dict(),
            "source": str(checkpoint_path), "dataset": name, "configuration": configuration,
            "plans": plans_identifier, **record, **pretraining_record(ckpt)}
    return export_file(net, meta, out), report


def _cmd_export(args: argparse.Namespace) -> int:
    out, report = export_for_plans(args.checkpoint, args.d, args.c, args.p, args.o,
                                   encoder_scale=args.encoder_scale)
    print(f"wrote {out}: {len(report['loaded'])} pretrained tensors loaded"
          + (f", input stem adapted: {report['adapted']}" if report["adapted"] else ""))
    print(f"use it with: nnUNetv2_train {args.d} {args.c} FOLD -p {args.p} -pretrained_weights {out}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="build downstream weights from a pretraining checkpoint for given plans",
        description="Build the downstream network of DATASET/CONFIG/PLANS exactly as nnU-Net will, fill in "
        "the pretrained encoder / slice embedding / slice Transformer (adapting the input stem to the "
        "dataset's channel count) and save a file for nnUNetv2_train -pretrained_weights.",
    )
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint_final.pth of a JointSSLPretrainTrainer run")
    p.add_argument("-d", required=True, help="downstream dataset name or id")
    p.add_argument("-c", required=True, choices=sorted(DOWNSTREAM_CLASSES), help="configuration")
    p.add_argument("-p", "--plans", dest="p", default="nnsslJointPlans",
                   help="plans identifier (default: nnsslJointPlans); nnUNetPlans for nnU-Net's stock 2d "
                   "network, which fits a checkpoint pretrained with that topology (--preset nnunet)")
    p.add_argument("-o", required=True, help="output file")
    p.add_argument("--encoder-scale", choices=ENCODER_SCALES, default="pretrained",
                   help="pretrained (default): the pretraining's own scale of the encoder convolutions "
                   "(0.4-0.75x nnU-Net's initial weights, so fine-tuning moves them further, relative to "
                   "their size, than a run from scratch moves its own); nnunet: each scaled to the norm of "
                   "nnU-Net's initial weights, the same function (each is followed by an InstanceNorm); "
                   "measured in docs/pretraining.md, eighteenth pass")
    p.set_defaults(func=_cmd_export)
