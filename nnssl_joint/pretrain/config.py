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

import json
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.ssl.objective import ObjectiveConfig

CONFIG_ENV_VAR = "NNSSL_JOINT_CONFIG"
PLANS_SECTION = "nnssl_joint_pretrain"

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
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    min_lr_ratio: float = 0.01  # cosine decay to lr * min_lr_ratio
    grad_clip: float = 3.0
    num_epochs: int = 100
    iterations_per_epoch: int = 250
    save_every: int = 5  # epochs between checkpoint_latest.pth writes
    max_consecutive_nonfinite: int = 5  # stop after this many non-finite losses in a row
    collapse_entropy_threshold: float = 0.3  # warn when normalised prototype-usage entropy falls below


@dataclass
class PretrainConfig:
    preset: str = "cpu"
    #: seeds Python, NumPy and torch at the start of a run (rank r of a DDP run uses seed + r); with
    #: nnUNet_n_proc_DA=0 a CPU run is then repeatable exactly. null: no seeding (OS entropy)
    seed: int | None = 0
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    #: objective keys a user set explicitly; the others that depend on the data (prototype counts,
    #: prototype freezing, queue start) are self-configured
    explicit_objective_keys: set[str] = field(default_factory=set, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("explicit_objective_keys")
        d["objective"] = self.objective.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "configuration") -> PretrainConfig:
        cfg = cls()
        cfg.update(d, where)
        return cfg

    def update(self, d: dict[str, Any], where: str = "configuration") -> None:
        """Apply a partial nested dict; unknown keys are an error that names the key and the source."""
        if not isinstance(d, dict):
            raise NnsslJointError(f"{where}: expected a JSON object, got {type(d).__name__}")
        for key, value in d.items():
            if key == "objective":
                if not isinstance(value, dict):
                    raise NnsslJointError(f"{where}: objective: expected a JSON object, got {value!r}")
                self.explicit_objective_keys |= set(value)
                merged = {**self.objective.to_dict(), **(value or {})}
                try:
                    self.objective = ObjectiveConfig.from_dict(merged)
                except ValueError as e:
                    raise NnsslJointError(f"{where}: objective: {e}") from e
            elif key in ("data", "optim"):
                _update_dataclass(getattr(self, key), value, f"{where}: {key}")
            else:
                _set_field(self, key, value, where)


def _set_field(obj: Any, key: str, value: Any, where: str) -> None:
    valid = {f.name: f for f in fields(obj)}
    if key not in valid:
        raise NnsslJointError(
            f"{where}: unknown key '{key}'; valid keys: {sorted(valid)}"
        )
    current = getattr(obj, key)
    if value is None and "None" in str(valid[key].type):
        setattr(obj, key, value)
        return
    if is_dataclass(current):
        _update_dataclass(current, value, f"{where}: {key}")
        return
    if isinstance(current, bool) and not isinstance(value, bool):
        raise NnsslJointError(f"{where}: '{key}' must be true or false, got {value!r}")
    if isinstance(current, (int, float)) and not isinstance(current, bool) and not isinstance(value, (int, float)):
        raise NnsslJointError(f"{where}: '{key}' must be a number, got {value!r}")
    setattr(obj, key, value)


def _update_dataclass(obj: Any, values: Any, where: str) -> None:
    if not isinstance(values, dict):
        raise NnsslJointError(f"{where}: expected a JSON object, got {values!r}")
    for k, v in values.items():
        _set_field(obj, k, v, where)


def load_pretrain_config(plans_configuration: dict | None = None) -> tuple[PretrainConfig, list[str]]:
    """Defaults <- plans section <- ``$NNSSL_JOINT_CONFIG`` file. Returns the config and the sources used."""
    cfg = PretrainConfig()
    sources = ["defaults"]
    if plans_configuration and PLANS_SECTION in plans_configuration:
        cfg.update(plans_configuration[PLANS_SECTION], f"plans section '{PLANS_SECTION}'")
        sources.append(f"plans section '{PLANS_SECTION}'")
    env_file = os.environ.get(CONFIG_ENV_VAR)
    if env_file:
        path = Path(env_file)
        if not path.is_file():
            raise NnsslJointError(
                f"{CONFIG_ENV_VAR}={env_file} does not name a file; point it at a JSON file or unset it"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise NnsslJointError(f"{path}: not valid JSON ({e}); fix the file named by {CONFIG_ENV_VAR}") from e
        cfg.update(data, str(path))
        sources.append(str(path))
    return cfg, sources
