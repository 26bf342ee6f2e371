"""Builders for the pretrained parts (f_intra, g, f_inter) from an :class:`ArchitecturePreset`.

The pretraining model and the downstream networks both build their ``encoder``, ``slice_embedding``
and ``slice_transformer`` here, so their parameter names and shapes agree one to one and nnU-Net's
``-pretrained_weights`` loader accepts the pretraining checkpoint (Nguyen et al., AAAI 2023: the
pretrained 2D encoder initialises 2D networks; encoder + slice Transformer initialise 3D ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from torch import nn

from nnssl_joint.models.preset import ArchitecturePreset
from nnssl_joint.models.slice_embedding import SliceEmbeddingHead
from nnssl_joint.models.slice_transformer import SliceTransformer

# nnU-Net's 2D U-Net blocks (ExperimentPlanner defaults): conv with bias, affine InstanceNorm, LeakyReLU.
_NORM_KWARGS = {"eps": 1e-5, "affine": True}
_NONLIN_KWARGS = {"inplace": True}


def encoder_arch_kwargs(preset: ArchitecturePreset) -> dict[str, Any]:
    """The keyword arguments of dynamic_network_architectures' ``PlainConvEncoder`` for f_intra, in
    nnU-Net's ``arch_kwargs`` layout (ops as classes, per-stage kernel sizes and strides as lists)."""
    enc = preset.encoder
    return {
        "n_stages": enc.n_stages,
        "features_per_stage": list(enc.features_per_stage),
        "conv_op": nn.Conv2d,
        "kernel_sizes": [list(k) for k in enc.stage_kernel_sizes],
        "strides": [list(s) for s in enc.stage_strides],
        "n_conv_per_stage": list(enc.n_conv_per_stage),
        "conv_bias": True,
        "norm_op": nn.InstanceNorm2d,
        "norm_op_kwargs": dict(_NORM_KWARGS),
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": nn.LeakyReLU,
        "nonlin_kwargs": dict(_NONLIN_KWARGS),
    }


def build_encoder_2d(preset: ArchitecturePreset, input_channels: int,
                     return_skips: bool = True) -> PlainConvEncoder:
    """f_intra: the 2D ``PlainConvEncoder`` of the preset. Deterministic given ``torch.manual_seed``."""
    if input_channels < 1:
        raise ValueError(f"input_channels must be >= 1, got {input_channels}")
    return PlainConvEncoder(input_channels, return_skips=return_skips, **encoder_arch_kwargs(preset))


def build_slice_embedding(preset: ArchitecturePreset) -> SliceEmbeddingHead:
    """g: pools every encoder stage and maps the concatenation to ``preset.embedding_dim``."""
    return SliceEmbeddingHead(preset.encoder.features_per_stage, preset.embedding_dim, preset.slice_pooling)


def build_slice_transformer(preset: ArchitecturePreset) -> SliceTransformer:
    """f_inter: the deformable slice Transformer of the preset, over tokens of ``preset.embedding_dim``."""
    t = preset.transformer
    return SliceTransformer(preset.embedding_dim, depth=t.depth, heads=t.heads, dim_head=t.dim_head,
                            ffn_dim=t.ffn_dim, dropout=t.dropout, downsample=t.downsample,
                            offset_scale=t.offset_scale, offset_kernel=t.offset_kernel,
                            attention=t.attention, input_norm=t.input_norm, norm_first=t.norm_first,
                            zero_init_residual=t.zero_init_residual)


@dataclass(frozen=True)
class EncoderSpec:
    """Everything dynamic_network_architectures' ``UNetDecoder`` reads from its ``encoder`` argument
    (in ``__init__`` and ``compute_conv_feature_map_size``), without being an ``nn.Module``.

    ``UNetDecoder`` keeps a reference to its encoder; handing it the real encoder registers every
    encoder tensor a second time as ``decoder.encoder.*``. A spec keeps the state_dict to one copy
    (so a checkpoint of the pretrained parts plus a decoder covers the network) and lets the 3D
    decoder describe a 3D topology that the 2D encoder does not have.
    """

    output_channels: list[int]
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    conv_op: type[nn.Module]
    conv_bias: bool
    norm_op: type[nn.Module]
    norm_op_kwargs: dict[str, Any]
    dropout_op: type[nn.Module] | None
    dropout_op_kwargs: dict[str, Any] | None
    nonlin: type[nn.Module]
    nonlin_kwargs: dict[str, Any]


def encoder_spec_2d(preset: ArchitecturePreset) -> EncoderSpec:
    """The spec of f_intra itself, for a 2D ``UNetDecoder``."""
    kw = encoder_arch_kwargs(preset)
    return EncoderSpec(output_channels=kw["features_per_stage"], strides=kw["strides"],
                       kernel_sizes=kw["kernel_sizes"], conv_op=kw["conv_op"], conv_bias=kw["conv_bias"],
                       norm_op=kw["norm_op"], norm_op_kwargs=kw["norm_op_kwargs"],
                       dropout_op=kw["dropout_op"], dropout_op_kwargs=kw["dropout_op_kwargs"],
                       nonlin=kw["nonlin"], nonlin_kwargs=kw["nonlin_kwargs"])


def encoder_spec_slicewise_3d(preset: ArchitecturePreset) -> EncoderSpec:
    """The 3D view of f_intra applied slice by slice, for a 3D ``UNetDecoder``.

    Strides are (1, s, s): the slice axis (the first spatial axis) is never downsampled. Decoder
    convolutions get kernel 3 along the slice axis so the decoder also mixes neighbouring slices
    locally; the transposed convolutions (kernel = stride) stay in-plane.
    """
    enc = preset.encoder
    return EncoderSpec(output_channels=list(enc.features_per_stage),
                       strides=[[1, *s] for s in enc.stage_strides],
                       kernel_sizes=[[3, *k] for k in enc.stage_kernel_sizes], conv_op=nn.Conv3d,
                       conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs=dict(_NORM_KWARGS),
                       dropout_op=None, dropout_op_kwargs=None, nonlin=nn.LeakyReLU,
                       nonlin_kwargs=dict(_NONLIN_KWARGS))
