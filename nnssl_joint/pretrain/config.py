"""The one typed configuration of a pretraining run.

Every hyperparameter lives here with its default. Users change values without writing a subclass:

* a JSON file named by the environment variable ``NNSSL_JOINT_CONFIG`` (partial: only the keys to
  change, nested like :meth:`PretrainConfig.to_dict`), and/or
* a section ``"nnssl_joint_pretrain"`` inside the plans' configuration (``nnssl_joint plan_and_preprocess``
  writes one with the preset), which the environment file overrides.

``"auto"`` (or ``null``) values are filled in by :mod:`nnssl_joint.pretrain.autoconfig` from the
dataset fingerprint and the device's memory budget. The effective configuration is written to the run
folder (``nnssl_joint_config.json``) and into every checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Union

from nnssl_joint.common.typed_config import Layer, Loaded, layers_from, load_layered
from nnssl_joint.errors import NnsslJointError
from nnssl_joint.ssl.objective import ObjectiveConfig, staged_stage_lengths

CONFIG_ENV_VAR = "NNSSL_JOINT_CONFIG"
PLANS_SECTION = "nnssl_joint_pretrain"

GRAD_CLIP_MODES = ("global", "per_part")
#: the paper's optimiser settings where they differ from the defaults (the plugin's defaults before the
#: twenty-third pass; with ``objective.PAPER_OBJECTIVE`` the paper's configuration,
#: ``plans/pretrain/paper.json``)
PAPER_OPTIM: dict[str, Any] = {"grad_clip_mode": "global", "volume_lr_factor": 1.0}
#: optimisers the trainer builds (``optim.optimizer``); AdamW with decoupled weight decay
OPTIMIZERS = ("adamw",)

Auto = Union[int, str, None]  # noqa: UP007 (a runtime alias, used in annotations)


@dataclass
class DataConfig:
    view_size: Auto = "auto"  # in-plane size of the global views (multiple of the preset's total stride)
    small_view_size: Auto = "auto"  # multi-crop view size (half the global view by default)
    n_small_views: int = 2
    n_slices: Auto = "auto"  # N: contiguous slices per volume window
    batch_size_2d: Auto = "auto"  # images/slices per iteration for L_intra
    batch_size_3d: Auto = "auto"  # volume windows per iteration for L_inter / L_mask
    # view augmentation strength: "weak" (crop, flip, mild intensity) or "strong" (adds rotation, blur,
    # low resolution, bias field, gamma, noise). On the generated data the 2D SwAV loss stayed at log(K)
    # for 150 iterations with "strong" views of 32 px and fell with "weak" ones, hence the default.
    augmentation: str = "weak"
    min_2d_fraction: float = 0.25  # minimum share of 2D images among sampled slices when both exist
    memory_budget_gb: float | str | None = "auto"  # auto: 80% of GPU memory, 3 GB on CPU


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # the one optimiser the trainer builds (OPTIMIZERS); other values are refused
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    min_lr_ratio: float = 0.01  # cosine decay to lr * min_lr_ratio
    grad_clip: float = 3.0
    #: "global": one norm over all gradients is clipped to ``grad_clip`` (the paper's setting, PAPER_OPTIM);
    #: "per_part" (default): each top-level part of the network (encoder, slice embedding g, f_inter, each
    #: head, each loss's prototypes) is clipped to ``grad_clip`` on its own, so a term with large gradients on
    #: its own head cannot shrink the steps of the parts it does not reach (docs/pretraining.md, eighth pass)
    grad_clip_mode: str = "per_part"
    #: learning rate of the parts only the volume terms train (f_inter, the 3D projection head and prototypes,
    #: the masked-slice decoder) relative to ``lr``; 1.0: one rate for the whole network (PAPER_OPTIM); 0.1
    #: (default): f_inter's feed-forward blocks otherwise grow one output shared by every slice (sixth pass)
    volume_lr_factor: float = 0.1
    #: learning rate of the 3D projection head and the 3D prototypes (what L_inter trains once
    #: ``objective.inter_trains_transformer`` is false) relative to ``lr``; null: ``volume_lr_factor``
    volume_head_lr_factor: float | None = None
    num_epochs: int = 100
    iterations_per_epoch: int = 250
    save_every: int = 5  # epochs between checkpoint_latest.pth writes
    max_consecutive_nonfinite: int = 5  # stop after this many non-finite losses in a row
    collapse_entropy_threshold: float = 0.3  # warn when normalised prototype-usage entropy falls below

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise NnsslJointError(f"optim.optimizer must be one of {OPTIMIZERS} (the trainer builds AdamW "
                                  f"only), got {self.optimizer!r}; remove the key or set it to 'adamw'")
        if self.grad_clip_mode not in GRAD_CLIP_MODES:
            raise NnsslJointError(f"optim.grad_clip_mode must be one of {GRAD_CLIP_MODES}, got "
                                  f"{self.grad_clip_mode!r}")
        if not self.volume_lr_factor > 0:
            raise NnsslJointError(f"optim.volume_lr_factor must be > 0 (1.0: one learning rate for the whole "
                                  f"network), got {self.volume_lr_factor!r}")
        if self.volume_head_lr_factor is not None and not self.volume_head_lr_factor > 0:
            raise NnsslJointError(f"optim.volume_head_lr_factor must be > 0, or null for volume_lr_factor's "
                                  f"rate, got {self.volume_head_lr_factor!r}")


@dataclass
class ProbeConfig:
    """The frozen-encoder probe during pretraining (``nnssl_joint.probe``, docs/probe.md). Off unless
    ``target`` names a labeled dataset planned with ``nnssl_joint plan_and_preprocess -d ID --downstream``."""

    target: Union[int, str, None] = None  # noqa: UP007 (dataset id or name; null = no probe)
    every_epochs: int = 5  # probe after every this many epochs, and after the last one
    configuration: str = "3d_fullres"  # whose preprocessing the target's cases get
    fit_cases: Union[int, None] = None  # noqa: UP007 (null: all non-test labeled cases)

    def __post_init__(self) -> None:
        if self.every_epochs < 1:
            raise ValueError(f"probe.every_epochs must be >= 1, got {self.every_epochs}")
        if self.configuration not in ("2d", "3d_fullres"):
            raise ValueError(f"probe.configuration must be '2d' or '3d_fullres', got {self.configuration!r}")


@dataclass
class PretrainConfig:
    preset: str = "cpu"
    #: seeds Python, NumPy and torch at the start of a run (rank r of a DDP run uses seed + r); with
    #: nnUNet_n_proc_DA=0 a CPU run is then repeatable exactly. null: no seeding (OS entropy)
    seed: int | None = 0
    #: a JointSSLPretrainTrainer checkpoint whose network weights start this run (tensors matched by name
    #: and shape; e.g. a 2D-only pretraining continued with the volume terms); read at a fresh start only,
    #: not when a run resumes with --c. null: the run's own random draw
    init_from: str | None = None
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    #: dotted keys a source set explicitly (``"objective.num_prototypes_2d"``); the values that depend on
    #: the data and were not set (prototype counts, prototype freezing, queue start) are self-configured
    explicit_keys: frozenset[str] = field(default_factory=frozenset, repr=False, compare=False,
                                         metadata={"internal": True})

    def __post_init__(self) -> None:
        objective, epochs = self.objective, self.optim.num_epochs
        if objective.schedule == "staged" and objective.stage_a_epochs + objective.stage_b_epochs >= epochs:
            a, b = staged_stage_lengths(epochs)
            raise ValueError(
                f"objective.schedule 'staged' with stage_a_epochs={objective.stage_a_epochs} + "
                f"stage_b_epochs={objective.stage_b_epochs} >= optim.num_epochs={epochs}: stage C (L_inter, "
                f"the joint stage) would never run. Give stage C at least one epoch (e.g. stage_a_epochs "
                f"{a}, stage_b_epochs {b}, the proportions of the benchmark's staged arm) or use schedule "
                "'joint'")

    @property
    def explicit_objective_keys(self) -> set[str]:
        return {k[len("objective."):] for k in self.explicit_keys if k.startswith("objective.")}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("explicit_keys")
        d["objective"] = self.objective.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "configuration") -> PretrainConfig:
        """Defaults <- ``d`` (partial, nested like :meth:`to_dict`); keys and types checked."""
        return _with_keys(load_layered(cls, [Layer(where, d)]))


def load_pretrain_config(plans_configuration: dict | None = None) -> tuple[PretrainConfig, list[str]]:
    """Defaults <- plans section <- ``$NNSSL_JOINT_CONFIG`` file. Returns the config and the sources used."""
    loaded = load_layered(PretrainConfig, layers_from(plans_configuration, PLANS_SECTION, CONFIG_ENV_VAR))
    return _with_keys(loaded), list(loaded.sources)


def _with_keys(loaded: Loaded) -> PretrainConfig:
    return replace(loaded.config, explicit_keys=loaded.explicit_keys)
