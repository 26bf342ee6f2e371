"""Downstream segmentation networks that the pretrained weights initialise, referenced from nnU-Net
plans by dotted path (``architecture.network_class_name``).

- :class:`JointSSLUNet2D`: nnU-Net's 2D U-Net whose encoder is the pretrained f_intra.
- :class:`SliceWiseUNet3D`: f_intra on every slice of a 3D patch, f_inter across the slices, and
  nnU-Net's 3D decoder, whose deeper stages work on slice-averaged features (Nguyen et al., AAAI 2023,
  downstream 3D use; the authors' release discarded f_inter downstream, we inject it).

Both take ``(input_channels, num_classes, deep_supervision, preset)`` with ``preset`` a preset name or
an ``ArchitecturePreset.to_dict()`` dict, so plans can store them as JSON ``arch_kwargs``. Parts that
pretraining trains are built by :mod:`nnssl_joint.models.encoder` under the same attribute names as in
the pretraining model (``encoder``, ``slice_embedding``, ``slice_transformer``), which makes their
state_dict keys and shapes identical, as nnU-Net's ``load_pretrained_weights`` demands.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from nnssl_joint.common.modules import unwrap
from nnssl_joint.models.encoder import (
    EncoderSpec,
    build_encoder_2d,
    build_slice_embedding,
    build_slice_transformer,
    encoder_spec_2d,
    encoder_spec_slicewise_3d,
)
from nnssl_joint.models.norms import use_volume_statistics
from nnssl_joint.models.preset import ArchitecturePreset, load_preset

#: Top-level parts whose weights come from pretraining; everything else is initialised for the task.
PRETRAINED_PARTS = ("encoder", "slice_embedding", "slice_transformer")

#: Default of ``SliceWiseUNet3D(pool_slices_from_stage=...)``: the decoder halves the slice axis at every
#: downsampling stage from stage 1 on (as nnU-Net's 3D U-Net does on isotropic data). Chosen by
#: measurement (docs/benchmarks.md, ``scripts/bench_network3d.py``): with the gpu preset only pooling from
#: stage 1 brings the FLOPs per training iteration near stock nnU-Net's (1.03x without encoder
#: recomputation; from stage 2: 1.38x, stage 3: 1.71x, never: 2.17x).
DEFAULT_POOL_SLICES_FROM_STAGE = 1


def resolve_preset(preset: ArchitecturePreset | dict[str, Any] | str) -> ArchitecturePreset:
    """A preset from an ``ArchitecturePreset``, its ``to_dict()`` form, a shipped preset name or a
    JSON path. Plans should store the dict: a name follows later edits of the shipped file."""
    if isinstance(preset, ArchitecturePreset):
        return preset
    if isinstance(preset, dict):
        return ArchitecturePreset.from_dict(preset)
    if isinstance(preset, str):
        return load_preset(preset)
    raise ValueError(f"preset must be a preset name, a path or an ArchitecturePreset dict, "
                     f"got {type(preset).__name__}")


def pool_op_kernel_sizes(preset: ArchitecturePreset, spatial_dims: int) -> list[list[int]]:
    """The per-stage downsampling of the downstream network, as nnU-Net plans store it
    (``pool_op_kernel_sizes``). nnU-Net derives the deep-supervision target scales from it, so plans
    for these networks must carry exactly this: (s, s) for 2D, (1, s, s) for the slice-wise 3D net."""
    if spatial_dims == 2:
        return [list(s) for s in encoder_spec_2d(preset).strides]
    if spatial_dims == 3:
        return [list(s) for s in encoder_spec_slicewise_3d(preset).strides]
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


def _check_in_plane(preset: ArchitecturePreset, in_plane: Sequence[int]) -> None:
    total = preset.encoder.total_strides
    if any(int(s) % t for s, t in zip(in_plane, total)):
        raise ValueError(
            f"in-plane size {tuple(int(s) for s in in_plane)} is not divisible by {total}, the total (y, x) "
            f"stride of architecture preset '{preset.name}' (strides {list(preset.encoder.strides)}); use a "
            f"patch size whose in-plane axes are multiples of {total}"
        )


def _check_strides(preset: ArchitecturePreset, strides: Sequence[Sequence[int]] | None,
                   spatial_dims: int) -> None:
    """Plans carry ``strides`` (nnU-Net derives deep-supervision scales from them); they must be the
    preset's."""
    if strides is None:
        return
    expected = pool_op_kernel_sizes(preset, spatial_dims)
    if [list(map(int, s)) for s in strides] != expected:
        raise ValueError(
            f"plans arch_kwargs 'strides' {strides} do not match architecture preset '{preset.name}' "
            f"({expected}); re-plan with nnssl_joint plan_and_preprocess --downstream instead of editing the "
            "plans"
        )


def _check_classes(input_channels: int, num_classes: int) -> None:
    if input_channels < 1 or num_classes < 1:
        raise ValueError(f"input_channels and num_classes must be >= 1, got {input_channels} and "
                         f"{num_classes}")


class _PresetUNet(AbstractDynamicNetworkArchitectures):
    """What both downstream nets share: the preset, nnU-Net's He initialisation and the
    dynamic_network_architectures stem keys (used by tools that adapt the input channels)."""

    def __init__(self, preset: ArchitecturePreset | dict[str, Any] | str) -> None:
        super().__init__()
        self.preset = resolve_preset(preset)
        self.key_to_encoder = "encoder.stages"
        self.key_to_stem = "encoder.stages.0"
        self.keys_to_in_proj = ("encoder.stages.0.0.convs.0.all_modules.0", "encoder.stages.0.0.convs.0.conv")

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """nnU-Net calls ``network.apply(network.initialize)`` after construction."""
        InitWeights_He(1e-2)(module)
        if isinstance(module, (SliceContextInjection, ThroughPlaneConv)):
            module.reset_parameters()


class JointSSLUNet2D(_PresetUNet):
    """nnU-Net's 2D U-Net (``PlainConvUNet`` topology) whose encoder is the pretrained f_intra.

    Attributes ``encoder`` (``PlainConvEncoder``, skips returned) and ``decoder`` (``UNetDecoder``,
    deep supervision via ``decoder.deep_supervision``). The decoder is built from an
    :class:`~nnssl_joint.models.encoder.EncoderSpec` instead of the encoder module, so the encoder's
    tensors are not registered a second time as ``decoder.encoder.*``.
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = True,
                 preset: ArchitecturePreset | dict[str, Any] | str = "cpu",
                 strides: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__(preset)
        _check_classes(input_channels, num_classes)
        _check_strides(self.preset, strides, 2)
        self.encoder = build_encoder_2d(self.preset, input_channels, return_skips=True)
        self.decoder = UNetDecoder(encoder_spec_2d(self.preset), num_classes,
                                   list(self.preset.encoder.n_conv_per_stage_decoder), deep_supervision)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if x.dim() != 4:
            raise ValueError(f"JointSSLUNet2D expects (B, C, H, W), got {tuple(x.shape)}")
        _check_in_plane(self.preset, x.shape[2:])
        return self.decoder(self.encoder(x))

    def initialize(self, module: nn.Module) -> None:
        """nnU-Net calls ``network.apply(network.initialize)`` after construction.

        Draws the same initial weights as stock nnU-Net's ``PlainConvUNet`` of the same topology and seed.
        There the decoder holds the encoder as a child, so ``apply`` visits the encoder twice: its weights
        are drawn, drawn again, and the decoder's come after the second draw. Here the decoder holds no
        encoder, so the second draw happens when ``apply`` reaches the encoder module itself (after its
        children). A 2d run from random initialisation then starts exactly where stock nnU-Net starts.
        """
        _PresetUNet.initialize(module)
        if module is self.encoder:
            for child in self.encoder.children():
                child.apply(_PresetUNet.initialize)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Feature-map elements per sample, counted like dynamic_network_architectures' U-Nets (which
        nnU-Net's planner calibrates its memory budget against). ``input_size`` = (H, W)."""
        if len(input_size) != 2:
            raise ValueError(f"give the 2D patch size (H, W) without batch/channel axes, "
                             f"got {tuple(input_size)}")
        return self.encoder.compute_conv_feature_map_size(input_size) + \
            self.decoder.compute_conv_feature_map_size(input_size)


class SliceContextInjection(nn.Module):
    """Adds a per-slice context vector to every in-plane position of that slice's feature map.

    ``proj`` maps f_inter's output of slice z (B, Z, d) to a channel vector (B, Z, C) that is
    broadcast over (Y, X) of slice z of a (B, C, Z, Y, X) map. ``proj`` starts at zero, so a freshly
    initialised network computes exactly the pretrained slice-wise 2D features.
    """

    def __init__(self, dim: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, features: Tensor, per_slice: Tensor) -> Tensor:
        context = self.proj(per_slice)  # (B, Z, C)
        return features + context.transpose(1, 2)[..., None, None]


class ThroughPlaneConv(nn.Module):
    """A residual convolution along the slice axis only, for a stage output of the slice-wise encoder.

    ``x + conv(x)`` with ``conv`` a (3, 1, 1) Conv3d over (B, C, Z, Y, X): each slice's features receive a
    learned mix of its two neighbours' at the same in-plane position, which the 2D encoder cannot see (a
    stock 3D U-Net's (3, 3, 3) kernels can). ``conv`` starts at zero, so at initialisation the block is
    the identity and a pretrained f_intra computes exactly its pretrained features; zero padding at the
    first and last slice, so any Z >= 1 works. Factorised like the (2+1)D convolutions of video networks:
    the in-plane part stays the pretrained 2D kernel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, kernel_size=(3, 1, 1), padding=(1, 0, 0))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x)


def slice_strides(preset: ArchitecturePreset, pool_slices_from_stage: int | None) -> list[int]:
    """The decoder's stride along the slice axis per encoder stage: 2 at the stages from
    ``pool_slices_from_stage`` on that downsample in-plane, else 1 (``None``: 1 everywhere)."""
    n = preset.encoder.n_stages
    if pool_slices_from_stage is None:
        return [1] * n
    if isinstance(pool_slices_from_stage, bool) or not isinstance(pool_slices_from_stage, int) \
            or not 1 <= pool_slices_from_stage < n:
        raise ValueError(f"pool_slices_from_stage must be None or an int in [1, {n - 1}] (a stage of "
                         f"architecture preset '{preset.name}'), got {pool_slices_from_stage!r}")
    return [2 if i >= pool_slices_from_stage and max(s) > 1 else 1
            for i, s in enumerate(preset.encoder.stage_strides)]


def _pool_slices(x: Tensor, factor: int) -> Tensor:
    """Average (B, C, Z, ...) over windows of ``factor`` slices; the last window may be partial, so
    Z -> ceil(Z / factor) for any Z."""
    if factor == 1:
        return x
    kernel = min(factor, x.shape[2])  # fewer slices than the factor: one window over all of them
    return F.avg_pool3d(x, (kernel, 1, 1), (factor, 1, 1), ceil_mode=True) if x.dim() == 5 else \
        F.avg_pool1d(x, kernel, factor, ceil_mode=True)


class SliceAxisUNetDecoder(UNetDecoder):
    """nnU-Net's ``UNetDecoder`` over slice-wise skips whose deeper levels have fewer slices.

    Built from an :class:`~nnssl_joint.models.encoder.EncoderSpec` with strides (z, s, s), z in {1, 2},
    so transposed convolutions are (z, s, s) and parameter names are ``UNetDecoder``'s. ``forward``
    takes skips whose slice counts are ``ceil(Z / prod(z strides so far))`` (as :func:`_pool_slices`
    makes them), crops each transposed-convolution output to its skip's slice count (any Z works),
    and with deep supervision resamples every output to the full slice count Z (linear along the
    slice axis), because nnU-Net derives its targets from the plans' (1, s, s) strides.
    """

    def forward(self, skips: Sequence[Tensor]) -> Tensor | list[Tensor]:
        lres_input = skips[-1]
        seg_outputs = []
        for s in range(len(self.stages)):
            skip = skips[-(s + 2)]
            x = self.transpconvs[s](lres_input)
            if x.shape[2] != skip.shape[2]:
                x = x[:, :, :skip.shape[2]]
            x = self.stages[s](torch.cat((x, skip), 1))
            if self.deep_supervision or s == len(self.stages) - 1:
                seg_outputs.append(self.seg_layers[s if self.deep_supervision else -1](x))
            lres_input = x
        seg_outputs = seg_outputs[::-1]
        if not self.deep_supervision:
            return seg_outputs[0]
        z = seg_outputs[0].shape[2]
        return [o if o.shape[2] == z else F.interpolate(o, size=(z, *o.shape[3:]), mode="trilinear")
                for o in seg_outputs]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """As ``UNetDecoder``'s (``input_size`` = (Z, Y, X) of the encoder input), with ceil division
        along the slice axis and the full-Z copies of the deep-supervision outputs."""
        sizes = [list(input_size)]
        for stride in self.encoder.strides[1:]:
            previous = sizes[-1]
            sizes.append([-(-previous[0] // stride[0]), *(i // j for i, j in zip(previous[1:], stride[1:]))])
        output = np.int64(0)
        for s in range(len(self.stages)):
            size = sizes[-(s + 2)]
            output += self.stages[s].compute_conv_feature_map_size(size)
            output += np.prod([self.encoder.output_channels[-(s + 2)], *size], dtype=np.int64)
            if self.deep_supervision or s == len(self.stages) - 1:
                output += np.prod([self.num_classes, *size], dtype=np.int64)
                if size[0] != input_size[0]:
                    output += np.prod([self.num_classes, input_size[0], *size[1:]], dtype=np.int64)
        return output


class SliceWiseUNet3D(_PresetUNet):
    """3D segmentation from the pretrained 2D encoder f_intra and slice Transformer f_inter.

    For a patch x (B, C, Z, Y, X), Z being the slice axis: the first spatial axis, which the
    pretrained encoder never downsamples. nnU-Net's plans put the axis of largest spacing first
    (``transpose_forward``), which for anisotropic scans is the acquisition's slice axis.

    1. ``encoder`` (f_intra, 2D) runs on all B*Z slices at once; each stage output is viewed as
       (B, C_s, Z, Y_s, X_s) without copying (strides (1, s, s)).
    2. ``slice_embedding`` (g) turns each slice's stage outputs into a token: (B, Z, d).
    3. ``slice_transformer`` (f_inter) mixes the Z tokens: per-slice outputs (B, Z, d). No absolute
       position embedding, so any Z >= 1 works.
    4. From stage ``pool_slices_from_stage`` on, each skip is averaged over 2, 4, 8 ... neighbouring
       slices (``ceil(Z / 2**k)`` slices at the k-th such stage; parameter-free, so the pretrained
       features are pooled, not changed), as nnU-Net's 3D U-Net downsamples the first axis.
    5. ``slice_context`` (:class:`SliceContextInjection`) adds a zero-initialised linear map of each
       slice's output (averaged like the bottleneck's slices) to every in-plane position of that
       slice of the bottleneck.
    6. ``decoder`` (:class:`SliceAxisUNetDecoder`): nnU-Net's ``UNetDecoder`` in 3D (Conv3d,
       InstanceNorm3d, kernel (3, k, k), transposed convolutions (z, s, s) with z = 2 where the slice
       axis was pooled), deep supervision via ``decoder.deep_supervision``; every output has Z slices.

    ``pool_slices_from_stage`` (int in [1, n_stages - 1] or ``None``; default
    :data:`DEFAULT_POOL_SLICES_FROM_STAGE` = 1): ``None`` keeps all Z slices at every decoder level, the
    behaviour before this option existed, at about 2.2x the FLOPs of nnU-Net's own 3D U-Net per
    training iteration with the gpu preset (docs/benchmarks.md). Keep it for networks fine-tuned or
    exported (``pretrained_for_3d_fullres.pth``) before the option existed: their decoder's transposed
    convolutions have the (1, s, s) shape, so add ``"pool_slices_from_stage": null`` to the plans'
    ``arch_kwargs`` (or re-export). The encoder, slice embedding and Transformer (the pretrained
    parts) are the same for every value, and so are the plans' ``strides`` (deep supervision keeps
    nnU-Net's (1, s, s) targets: pooled outputs are resampled to all slices).

    ``recompute_encoder`` (bool, default ``True``): while training, encoder stages 1.. keep only their
    outputs and recompute the rest in backward (``torch.utils.checkpoint``); results and gradients
    are the same. The 2D encoder never pools the slice axis, so its activations at deep stages are
    Z / z_s times larger than a 3D encoder's; recomputing them keeps the activations stored for
    backward at about stock nnU-Net's (gpu preset: 1.0x instead of 1.25x) for about 9% more FLOPs.

    ``through_plane_convs`` (bool, default ``False``): after every encoder stage, a zero-initialised
    residual (3, 1, 1) convolution along the slice axis (:class:`ThroughPlaneConv`), whose output feeds
    the next stage, the skip and the slice embedding: the encoder then mixes neighbouring slices at
    every resolution, as a 3D U-Net does, while the pretrained in-plane kernels stay as they are (the
    network starts as the one without them). Not part of the pretrained weights: export for such plans
    with ``nnssl_joint export -p PLANS``. Costs one C x C x 3 kernel per stage (about a sixth of a stage's
    convolutions).

    ``norm_over_volume`` (bool, default ``False``): the encoder's InstanceNorms take their statistics over
    all Z slices of each sample (:class:`VolumeInstanceNorm2d`, as stock nnU-Net's InstanceNorm3d over the
    patch) instead of over each slice alone. Same parameters, so pretrained weights load as they are; the
    pretrained features then see other statistics than in pretraining (per slice). The downstream planner
    writes ``true`` into new 3d_fullres plans; the default here stays ``False`` for plans without the key.

    Why the bottleneck, additive and zero-initialised: f_inter's outputs are slice-level descriptors
    computed from globally pooled features, and the bottleneck is the level with the widest receptive
    field and the most semantic channels, where such a vector is meaningful as a per-slice channel
    shift; the decoder's transposed and (3, k, k) convolutions carry it to every resolution, at the
    cost of one d x C_bottleneck matrix and one addition on the smallest map (injecting at every skip
    would copy each full-resolution skip). Broadcasting per slice needs no positional encoding, so it
    holds for any Z and in-plane size. The zero start means fine-tuning begins from the pretrained 2D
    features untouched (no random perturbation of the pretrained path) and the Transformer's share
    grows only as far as the task's gradient asks for it. Consequence: at initialisation the output
    does not depend on f_inter and f_inter's gradient is exactly zero (it is multiplied by the zero
    matrix); ``slice_context.proj`` does receive gradient, and after its first update f_inter does too.
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = True,
                 preset: ArchitecturePreset | dict[str, Any] | str = "cpu",
                 strides: Sequence[Sequence[int]] | None = None,
                 pool_slices_from_stage: int | None = DEFAULT_POOL_SLICES_FROM_STAGE,
                 recompute_encoder: bool = True, through_plane_convs: bool = False,
                 norm_over_volume: bool = False) -> None:
        super().__init__(preset)
        for name, value in (("recompute_encoder", recompute_encoder),
                            ("through_plane_convs", through_plane_convs),
                            ("norm_over_volume", norm_over_volume)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be true or false, got {value!r}")
        self.recompute_encoder = recompute_encoder
        _check_classes(input_channels, num_classes)
        _check_strides(self.preset, strides, 3)
        self.pool_slices_from_stage = pool_slices_from_stage
        z_strides = slice_strides(self.preset, pool_slices_from_stage)
        #: per encoder stage, how many input slices one decoder slice averages (1, .., 2, 4, ...)
        self.slice_factors = [int(f) for f in np.cumprod(z_strides)]
        self.encoder = build_encoder_2d(self.preset, input_channels, return_skips=True)
        #: the encoder's norms when they take statistics over the volume (``norm_over_volume``), else []
        self.volume_norms = use_volume_statistics(self.encoder) if norm_over_volume else []
        #: one :class:`ThroughPlaneConv` per encoder stage, or None (the network of the paper)
        features = self.preset.encoder.features_per_stage
        self.through_plane = (nn.ModuleList([ThroughPlaneConv(c) for c in features])
                              if through_plane_convs else None)
        self.slice_embedding = build_slice_embedding(self.preset)
        self.slice_transformer = build_slice_transformer(self.preset)
        self.slice_context = SliceContextInjection(self.preset.embedding_dim,
                                                   self.preset.encoder.features_per_stage[-1])
        self.decoder = SliceAxisUNetDecoder(decoder_spec_slicewise_3d(self.preset, pool_slices_from_stage),
                                            num_classes, list(self.preset.encoder.n_conv_per_stage_decoder),
                                            deep_supervision)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if x.dim() != 5:
            raise ValueError(f"SliceWiseUNet3D expects (B, C, Z, Y, X) with Z the slice axis, "
                             f"got {tuple(x.shape)}")
        b, c, z, h, w = x.shape
        _check_in_plane(self.preset, (h, w))
        slices = x.transpose(1, 2).reshape(b * z, c, h, w)
        for norm in self.volume_norms:
            norm.slices = z
        skips_2d = self._encode(slices, b)
        tokens = self.slice_embedding(skips_2d).unflatten(0, (b, z))
        per_slice, _ = self.slice_transformer(tokens)
        # views, not copies (unless pooled): the decoder only concatenates the skips, which reads
        # strided tensors fine
        skips = [_pool_slices(s.unflatten(0, (b, z)).transpose(1, 2), f)
                 for s, f in zip(skips_2d, self.slice_factors)]
        per_slice = _pool_slices(per_slice.transpose(1, 2), self.slice_factors[-1]).transpose(1, 2)
        skips[-1] = self.slice_context(skips[-1], per_slice)
        return self.decoder(skips)

    def _encode(self, slices: Tensor, batch: int) -> list[Tensor]:
        """f_intra's stage outputs (B*Z, C, Y, X), each followed by its through-plane convolution when the
        network has them; with ``recompute_encoder`` (while training with gradients) stages 1.. keep only
        their outputs and recompute their insides in backward (activation checkpointing)."""
        recompute = self.recompute_encoder and self.training and torch.is_grad_enabled()
        if not recompute and self.through_plane is None:
            return self.encoder(slices)
        skips = []
        x = slices
        for i, stage in enumerate(self.encoder.stages):
            x = stage(x) if i == 0 or not recompute else checkpoint(stage, x, use_reentrant=False)
            if self.through_plane is not None:
                x3d = x.unflatten(0, (batch, -1)).transpose(1, 2)  # (B, C, Z, Y, X)
                x = self.through_plane[i](x3d).transpose(1, 2).flatten(0, 1)
            skips.append(x)
        return skips

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Feature-map elements per sample, in the unit of dynamic_network_architectures' U-Nets
        (conv outputs; nnU-Net's planner calibrates its memory budget against that unit).
        ``input_size`` = (Z, Y, X). Counts the 2D encoder on all Z slices, the slice-pooled skips, the
        3D decoder, the bottleneck copy made by the context addition, and the (small)
        token/Transformer activations."""
        if len(input_size) != 3:
            raise ValueError(f"give the 3D patch size (Z, Y, X) without batch/channel axes, "
                             f"got {tuple(input_size)}")
        z, h, w = (int(i) for i in input_size)
        _check_in_plane(self.preset, (h, w))
        encoder = z * self.encoder.compute_conv_feature_map_size([h, w])
        decoder = self.decoder.compute_conv_feature_map_size([z, h, w])
        pooled = through_plane = 0
        sy = sx = 1
        for f, (ty, tx), ch in zip(self.slice_factors, self.preset.encoder.stage_strides,
                                   self.preset.encoder.features_per_stage):
            sy, sx = sy * ty, sx * tx
            if f > 1:
                pooled += ch * -(-z // f) * (h // sy) * (w // sx)
            if self.through_plane is not None:  # each block's convolution output and residual sum
                through_plane += 2 * ch * z * (h // sy) * (w // sx)
        bottleneck = self.preset.encoder.features_per_stage[-1] * -(-z // self.slice_factors[-1]) * \
            (h // sy) * (w // sx)
        t = self.preset.transformer
        d = self.preset.embedding_dim
        inner = t.heads * t.dim_head
        # per layer: q, k, v, attention output, two residual sums/norms, FFN hidden
        transformer = z * (sum(self.preset.encoder.features_per_stage) + d) + \
            t.depth * z * (4 * inner + 4 * d + t.ffn_dim)
        return np.int64(encoder + decoder + pooled + bottleneck + transformer + through_plane)


def decoder_spec_slicewise_3d(preset: ArchitecturePreset, pool_slices_from_stage: int | None) -> EncoderSpec:
    """The 3D topology the decoder of :class:`SliceWiseUNet3D` mirrors: f_intra's slice-wise view
    (``encoder_spec_slicewise_3d``: strides (1, s, s), kernels (3, k, k)) with slice-axis stride 2 at
    the stages :func:`slice_strides` pools."""
    spec = encoder_spec_slicewise_3d(preset)
    z_strides = slice_strides(preset, pool_slices_from_stage)
    return replace(spec, strides=[[zs, *s[1:]] for zs, s in zip(z_strides, spec.strides)])


def pretrained_key_groups(network: nn.Module) -> dict[str, list[str]]:
    """The network's state_dict keys by part, in state_dict order.

    Groups ``encoder``, ``slice_embedding``, ``slice_transformer`` (:data:`PRETRAINED_PARTS`, filled
    from pretraining) and the newly initialised ``decoder``, ``slice_context`` and ``seg_layers``
    (keys containing ``.seg_layers.``, which nnU-Net's loader never transfers); any other top-level
    module gets a group of its own name. Empty groups are left out. DDP / DataParallel /
    ``torch.compile`` wrappers are looked through, so keys carry no ``module.``/``_orig_mod.`` prefix.
    """
    module = unwrap(network)
    groups: dict[str, list[str]] = {name: [] for name in (*PRETRAINED_PARTS, "decoder", "slice_context",
                                                          "seg_layers")}
    for key in module.state_dict():
        group = "seg_layers" if ".seg_layers." in key else key.split(".", 1)[0]
        groups.setdefault(group, []).append(key)
    return {name: keys for name, keys in groups.items() if keys}


__all__ = [
    "DEFAULT_POOL_SLICES_FROM_STAGE",
    "PRETRAINED_PARTS",
    "JointSSLUNet2D",
    "SliceAxisUNetDecoder",
    "SliceContextInjection",
    "SliceWiseUNet3D",
    "ThroughPlaneConv",
    "decoder_spec_slicewise_3d",
    "pool_op_kernel_sizes",
    "pretrained_key_groups",
    "resolve_preset",
    "slice_strides",
]

