"""Architecture presets: the fixed encoder topology and slice-Transformer size shared by pretraining
and fine-tuning, so that pretrained weights fit the downstream networks one to one.

Presets ship as JSON in the repository's ``plans/`` folder (installed as ``nnssl_joint.presets``).
nnU-Net still chooses spacing, patch and batch size; a preset only fixes what the weights depend on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
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


@dataclass(frozen=True)
class EncoderConfig:
    """A dynamic-network-architectures PlainConvEncoder with Conv2d, InstanceNorm2d and LeakyReLU,
    the building blocks nnU-Net's 2D U-Net uses."""

    features_per_stage: tuple[int, ...] = (16, 32, 64, 128, 128)
    strides: tuple[int, ...] = (1, 2, 2, 2, 2)
    kernel_size: int = 3
    n_conv_per_stage: tuple[int, ...] = (2, 2, 2, 2, 2)
    n_conv_per_stage_decoder: tuple[int, ...] = (2, 2, 2, 2)

    @property
    def n_stages(self) -> int:
        return len(self.features_per_stage)

    @property
    def total_stride(self) -> int:
        s = 1
        for x in self.strides:
            s *= x
        return s


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
        if len(enc.strides) != n or len(enc.n_conv_per_stage) != n or len(enc.n_conv_per_stage_decoder) != n - 1:
            raise ValueError(
                f"preset '{self.name}': encoder.strides and encoder.n_conv_per_stage need {n} entries and "
                f"encoder.n_conv_per_stage_decoder {n - 1} (one per encoder stage in features_per_stage)"
            )
        if self.embedding_dim < 1:
            raise ValueError(f"preset '{self.name}': embedding_dim must be positive, got {self.embedding_dim}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("features_per_stage", "strides", "n_conv_per_stage", "n_conv_per_stage_decoder"):
            d["encoder"][k] = list(d["encoder"][k])
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
        for k in ("features_per_stage", "strides", "n_conv_per_stage", "n_conv_per_stage_decoder"):
            if k in enc:
                enc[k] = tuple(int(v) for v in enc[k])
        top["encoder"] = EncoderConfig(**enc)
        top["transformer"] = TransformerConfig(**build(TransformerConfig, top.get("transformer", {}), "transformer"))
        top["projection"] = ProjectionConfig(**build(ProjectionConfig, top.get("projection", {}), "projection"))
        return cls(**top)


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
    return ArchitecturePreset.from_dict(data)
