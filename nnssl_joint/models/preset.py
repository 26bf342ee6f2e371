"""Architecture presets: the fixed encoder topology and slice-Transformer size shared by pretraining
and fine-tuning, so that pretrained weights fit the downstream networks one to one.

Presets ship as JSON in the repository's ``plans/`` folder (installed as ``nnssl_joint.presets``).
nnU-Net still chooses spacing, patch and batch size; a preset only fixes what the weights depend on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TransformerConfig:
    depth: int = 2
    heads: int = 4
    dim_head: int = 32
    ffn_dim: int = 256
    dropout: float = 0.1
    downsample: int = 2
    offset_scale: float = 2.0
    offset_kernel: int = 4
    #: "deformable" (the paper's f_inter), "full" (all slices, same parameters) or "auto" (full below
    #: DeformableSliceAttention.AUTO_FULL_BELOW slices); see DeformableSliceAttention for what switching
    #: by N means for a pretrained model. Presets without the key (and older checkpoints) get "deformable".
    attention: str = "deformable"
    #: "none" (the paper's f_inter) or "batch": a BatchNorm over the input slice tokens (statistics over the
    #: valid slices of all windows of the global batch, running statistics in eval), which removes the
    #: component every slice embedding shares before f_inter (models/slice_transformer.py, TokenBatchNorm).
    #: Presets without the key (and older checkpoints) get "none".
    input_norm: str = "none"
    #: False (the authors' layer): post-norm, LayerNorm after each residual sum; True: pre-norm, LayerNorm
    #: on each branch's input and one final LayerNorm over the per-slice outputs (a final_norm parameter).
    #: Presets without the key (and older checkpoints) get False.
    norm_first: bool = False
    #: True: the last linear map of each residual branch (the attention's to_out, the FFN's second Linear)
    #: starts at zero, so every layer starts as the identity on its residual stream (with norm_first, f_inter
    #: starts as its final LayerNorm). False (the authors'): PyTorch's default initialisation. Presets
    #: without the key (and older checkpoints) get False.
    zero_init_residual: bool = False


Pair = tuple[int, int]


def _pair(value: int | Sequence[int]) -> Pair:
    if isinstance(value, int):
        return (value, value)
    y, x = (int(v) for v in value)
    return (y, x)


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


@dataclass(frozen=True)
class EncoderConfig:
    """A dynamic-network-architectures PlainConvEncoder with Conv2d, InstanceNorm2d and LeakyReLU,
    the building blocks nnU-Net's 2D U-Net uses.

    ``strides``: one per stage, an int (square) or a pair (y, x) as nnU-Net's planner gives for
    non-square patches; ``kernel_size``: one int for every stage, or one int or pair per stage."""

    features_per_stage: tuple[int, ...] = (16, 32, 64, 128, 128)
    strides: tuple[int | Pair, ...] = (1, 2, 2, 2, 2)
    kernel_size: int | tuple[int | Pair, ...] = 3
    n_conv_per_stage: tuple[int, ...] = (2, 2, 2, 2, 2)
    n_conv_per_stage_decoder: tuple[int, ...] = (2, 2, 2, 2)

    @property
    def n_stages(self) -> int:
        return len(self.features_per_stage)

    @property
    def stage_strides(self) -> list[Pair]:
        """(y, x) stride of every stage."""
        return [_pair(s) for s in self.strides]

    @property
    def stage_kernel_sizes(self) -> list[Pair]:
        """(y, x) kernel size of every stage."""
        if isinstance(self.kernel_size, int):
            return [(self.kernel_size, self.kernel_size)] * self.n_stages
        return [_pair(k) for k in self.kernel_size]

    @property
    def total_strides(self) -> Pair:
        """(y, x) downsampling from the input to the bottleneck: in-plane sizes must be multiples."""
        y = x = 1
        for sy, sx in self.stage_strides:
            y, x = y * sy, x * sx
        return (y, x)

    @property
    def total_stride(self) -> int:
        """The smallest size divisible by the total stride of both axes (a square view that fits)."""
        return _lcm(*self.total_strides)


@dataclass(frozen=True)
class ProjectionConfig:
    hidden_dim: int = 256
    out_dim: int = 64


@dataclass(frozen=True)
class ArchitecturePreset:
    name: str = "cpu"
    description: str = ""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    embedding_dim: int = 128
    #: global pooling of each encoder stage in the slice embedding g (see models/slice_embedding.py)
    slice_pooling: str = "max"
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)

    def __post_init__(self) -> None:
        enc = self.encoder
        n = enc.n_stages
        kernels = 1 if isinstance(enc.kernel_size, int) else len(enc.kernel_size)
        if len(enc.strides) != n or len(enc.n_conv_per_stage) != n \
                or len(enc.n_conv_per_stage_decoder) != n - 1 or kernels not in (1, n):
            raise ValueError(
                f"preset '{self.name}': encoder.strides, encoder.n_conv_per_stage (and a per-stage "
                f"kernel_size) need {n} entries and encoder.n_conv_per_stage_decoder {n - 1} (one per "
                "encoder stage in features_per_stage)"
            )
        if self.embedding_dim < 1:
            raise ValueError(f"preset '{self.name}': embedding_dim must be positive, "
                             f"got {self.embedding_dim}")
        from nnssl_joint.models.slice_transformer import INPUT_NORMS

        if self.transformer.input_norm not in INPUT_NORMS:
            raise ValueError(f"preset '{self.name}': transformer.input_norm must be one of "
                             f"{', '.join(INPUT_NORMS)}, got {self.transformer.input_norm!r}")
        for key in ("norm_first", "zero_init_residual"):
            if not isinstance(getattr(self.transformer, key), bool):  # ValueError like every preset error
                raise ValueError(f"preset '{self.name}': transformer.{key} must be true or false, "  # noqa: TRY004
                                 f"got {getattr(self.transformer, key)!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("features_per_stage", "n_conv_per_stage", "n_conv_per_stage_decoder"):
            d["encoder"][k] = list(d["encoder"][k])
        d["encoder"]["strides"] = [s if isinstance(s, int) else list(s) for s in self.encoder.strides]
        if not isinstance(self.encoder.kernel_size, int):
            d["encoder"]["kernel_size"] = [k if isinstance(k, int) else list(k)
                                           for k in self.encoder.kernel_size]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchitecturePreset:
        def build(klass, values: dict, where: str):
            valid = {f.name for f in fields(klass)}
            unknown = set(values) - valid
            if unknown:
                raise ValueError(
                    f"unknown key(s) {sorted(unknown)} in architecture preset section '{where}'; "
                    f"valid keys: {sorted(valid)}"
                )
            return values

        top = dict(build(cls, d, "top level"))
        enc = dict(build(EncoderConfig, top.get("encoder", {}), "encoder"))
        for k in ("features_per_stage", "n_conv_per_stage", "n_conv_per_stage_decoder"):
            if k in enc:
                enc[k] = tuple(int(v) for v in enc[k])
        for k in ("strides", "kernel_size"):
            if isinstance(enc.get(k), (list, tuple)):
                enc[k] = tuple(int(v) if isinstance(v, int) else _pair(v) for v in enc[k])
        top["encoder"] = EncoderConfig(**enc)
        top["transformer"] = TransformerConfig(**build(TransformerConfig, top.get("transformer", {}),
                                                       "transformer"))
        top["projection"] = ProjectionConfig(**build(ProjectionConfig, top.get("projection", {}),
                                                     "projection"))
        return cls(**top)


def same_preset(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two stored preset dicts (``ArchitecturePreset.to_dict()`` of a checkpoint, plans file or
    run) describe one architecture: compared after :meth:`ArchitecturePreset.from_dict`, so a dict written
    before a key existed equals one that holds the key at its default. Dicts that do not parse compare as
    they are."""
    if a is None or b is None:
        return a == b
    try:
        return ArchitecturePreset.from_dict(a).to_dict() == ArchitecturePreset.from_dict(b).to_dict()
    except (TypeError, ValueError):
        return a == b


def available_presets() -> list[str]:
    """Names of the presets shipped with the plugin."""
    folder = resources.files("nnssl_joint.presets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_preset(name_or_path: str | Path) -> ArchitecturePreset:
    """Load a shipped preset by name (``cpu``, ``gpu``) or a JSON file by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        text = path.read_text()
    else:
        candidate = resources.files("nnssl_joint.presets") / f"{name_or_path}.json"
        if not candidate.is_file():
            raise ValueError(
                f"unknown architecture preset '{name_or_path}': use one of {available_presets()} "
                "or the path of a preset JSON file"
            )
        text = candidate.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"architecture preset '{name_or_path}' is not valid JSON: {e}") from e
    if "configurations" in data and "plans_name" in data:  # nnU-Net plans: take their 2d topology
        return preset_from_nnunet_plans(data, "2d")
    return ArchitecturePreset.from_dict(data)


#: what nnU-Net's default planner builds its 2D U-Net from; a plans configuration with other building
#: blocks has no preset equivalent
_STOCK_BLOCKS = {"conv_op": "torch.nn.modules.conv.Conv2d",
                 "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                 "nonlin": "torch.nn.LeakyReLU"}


def preset_from_nnunet_plans(plans: dict[str, Any], configuration: str = "2d",
                             base: str = "cpu") -> ArchitecturePreset:
    """The preset whose 2D encoder is exactly the encoder of ``configuration`` in nnU-Net plans (features,
    strides, kernel sizes, convolutions per stage, decoder convolutions), so weights pretrained with it
    load into nnU-Net's stock ``PlainConvUNet`` of those plans. Slice embedding, Transformer and projection
    come from the shipped preset ``base``. Raises ValueError naming what does not fit."""
    where = f"plans '{plans.get('plans_name')}' configuration '{configuration}'"
    if configuration not in plans.get("configurations", {}):
        raise ValueError(f"{where} does not exist (the plans have {sorted(plans.get('configurations', {}))})")
    arch = plans["configurations"][configuration].get("architecture", {})
    name = arch.get("network_class_name", "")
    if not name.endswith("PlainConvUNet"):
        raise ValueError(f"{where} uses {name or 'no architecture'}; a preset can only copy nnU-Net's "
                         "default PlainConvUNet (plan with nnU-Net's default ExperimentPlanner, plans "
                         "nnUNetPlans)")
    kw = arch["arch_kwargs"]
    for key, expected in _STOCK_BLOCKS.items():
        if kw.get(key) != expected:
            raise ValueError(f"{where}: arch_kwargs.{key} is {kw.get(key)!r}, the plugin's encoder uses "
                             f"{expected}")
    if not kw.get("conv_bias", False) or not (kw.get("norm_op_kwargs") or {}).get("affine", False):
        raise ValueError(f"{where}: the plugin's encoder uses conv_bias true and an affine InstanceNorm2d")

    def simple(values: list[list[int]]) -> tuple[int | Pair, ...]:
        return tuple(v[0] if v[0] == v[1] else (int(v[0]), int(v[1])) for v in values)

    kernels = simple(kw["kernel_sizes"])
    encoder = EncoderConfig(features_per_stage=tuple(int(f) for f in kw["features_per_stage"]),
                            strides=simple(kw["strides"]),
                            kernel_size=(kernels[0] if len(set(kernels)) == 1 and isinstance(kernels[0], int)
                                         else kernels),
                            n_conv_per_stage=tuple(int(n) for n in kw["n_conv_per_stage"]),
                            n_conv_per_stage_decoder=tuple(int(n) for n in kw["n_conv_per_stage_decoder"]))
    return replace(load_preset(base), name="nnunet", encoder=encoder,
                   description=f"2D encoder of nnU-Net's {where} (dataset {plans.get('dataset_name')}); "
                   f"slice embedding, Transformer and projection of preset '{base}'")
