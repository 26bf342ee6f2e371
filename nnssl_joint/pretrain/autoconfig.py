"""Self-configuration of a pretraining run, in the spirit of nnU-Net's planner.

The in-plane view size, the slice count N, the 2D and 3D batch sizes and the number of prototypes are
derived from the preprocessed dataset (median shapes, number of images, volumes and slices) and a
memory budget for the device. Anything the user set explicitly in the configuration is kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.models.preset import ArchitecturePreset
from nnssl_joint.ssl.objective import ObjectiveConfig

if TYPE_CHECKING:
    from nnssl_joint.pretrain.config import PretrainConfig

#: the most volume windows per step ``data.batch_size_3d: auto`` gives on CPU; 2 before the twenty-third pass.
#: 4 cost bar 1 (twenty-fourth pass, docs/pretraining.md)
CPU_MAX_WINDOWS = 8
#: the same on CUDA
GPU_MAX_WINDOWS = 16


@dataclass
class DatasetStats:
    n_images_2d: int
    n_volumes: int
    n_slices_total: int  # 2D images + all slices of all volumes
    median_inplane: tuple[int, int]
    median_volume_slices: int

    @classmethod
    def from_shapes(cls, shapes: list[tuple[int, int, int]]) -> DatasetStats:
        """``shapes``: preprocessed (Z, Y, X) of every case; Z == 1 marks a 2D image."""
        if not shapes:
            raise ValueError("the preprocessed dataset holds no cases")
        z = np.array([s[0] for s in shapes])
        inplane = np.array([s[1:] for s in shapes])
        vols = z[z > 1]
        return cls(
            n_images_2d=int((z == 1).sum()),
            n_volumes=int((z > 1).sum()),
            n_slices_total=int(z.sum()),
            median_inplane=(int(np.median(inplane[:, 0])), int(np.median(inplane[:, 1]))),
            median_volume_slices=int(np.median(vols)) if len(vols) else 0,
        )


def slice_activation_bytes(preset: ArchitecturePreset, view_size: int, input_channels: int = 1) -> float:
    """Rough training memory of one slice through the encoder + heads (forward activations kept for
    backward: conv output, norm output and nonlinearity per conv, float32)."""
    enc = preset.encoder
    size = float(view_size)
    total = input_channels * size * size
    for feats, stride, n_conv in zip(enc.features_per_stage, enc.strides, enc.n_conv_per_stage):
        size /= stride
        total += 3 * n_conv * feats * size * size
    return 4.0 * total * 1.5  # + gradients of activations transiently


def _floor_multiple(value: float, multiple: int) -> int:
    return int(value // multiple) * multiple


def default_memory_budget_gb(device_type: str) -> float:
    if device_type == "cuda":
        import torch

        return 0.8 * torch.cuda.get_device_properties(0).total_memory / 1024**3
    return 3.0


@dataclass(frozen=True)
class SelfConfiguration:
    """What a pretraining run derived from its dataset, preset, device and configuration.

    The only input of the data loaders and of the losses' sizes, and what checkpoints record (key
    ``resolved``); the user's configuration keeps its ``"auto"`` values. Batch sizes are global;
    :meth:`for_process` gives each DDP process its share (``*_per_rank``), which its loaders draw.
    """

    view_size: int
    small_view_size: int
    n_small_views: int
    n_slices: int
    batch_size_2d: int
    batch_size_3d: int
    num_prototypes_2d: int
    num_prototypes_3d: int
    freeze_prototypes_iterations: int
    queue_start_iteration: int
    memory_budget_gb: float
    estimated_activation_gb: float
    world_size: int = 1
    rank: int = 0

    def _share(self, total: int) -> int:
        """This process's part of a global batch (the first ``total % world_size`` ranks take one more)."""
        return total // self.world_size + (1 if self.rank < total % self.world_size else 0)

    @property
    def batch_size_2d_per_rank(self) -> int:
        return self._share(self.batch_size_2d)

    @property
    def batch_size_3d_per_rank(self) -> int:
        return self._share(self.batch_size_3d)

    def for_process(self, world_size: int, rank: int) -> SelfConfiguration:
        """This configuration for process ``rank`` of ``world_size``: each takes its share of the global
        batches, as nnU-Net's DDP splits its batch."""
        for key in ("batch_size_2d", "batch_size_3d"):
            total = getattr(self, key)
            if 0 < total < world_size:
                raise NnsslJointError(
                    f"data.{key}={total} is smaller than the number of processes ({world_size}); set "
                    f"data.{key} to at least {world_size} in the file named by NNSSL_JOINT_CONFIG")
        return replace(self, world_size=world_size, rank=rank)

    def objective(self, base: ObjectiveConfig) -> ObjectiveConfig:
        """``base`` with the self-configured sizes: the objective the losses are built with."""
        return replace(base, num_prototypes_2d=self.num_prototypes_2d,
                       num_prototypes_3d=self.num_prototypes_3d,
                       freeze_prototypes_iterations=self.freeze_prototypes_iterations,
                       queue_start_iteration=self.queue_start_iteration)

    def to_dict(self) -> dict[str, Any]:
        """The fields plus this process's batch shares (recorded for the reader of a run folder)."""
        return {**asdict(self), "batch_size_2d_per_rank": self.batch_size_2d_per_rank,
                "batch_size_3d_per_rank": self.batch_size_3d_per_rank}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SelfConfiguration:
        """From :meth:`to_dict`'s output (the derived per-process shares are recomputed)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def auto_configure(
    stats: DatasetStats,
    preset: ArchitecturePreset,
    device_type: str,
    config: PretrainConfig,
    iterations_per_epoch: int,
    input_channels: int = 1,
) -> SelfConfiguration:
    """Fill every ``"auto"``/``None`` value of ``config`` (explicit values pass through), for one process
    holding the global batch (see :meth:`SelfConfiguration.for_process`)."""
    data_cfg = config.data
    explicit = config.explicit_objective_keys
    objective = config.objective
    num_prototypes_2d = objective.num_prototypes_2d if "num_prototypes_2d" in explicit else None
    num_prototypes_3d = objective.num_prototypes_3d if "num_prototypes_3d" in explicit else None

    def is_auto(v: Any) -> bool:
        return v is None or v == "auto"

    stride = preset.encoder.total_stride
    on_gpu = device_type == "cuda"
    budget = data_cfg.memory_budget_gb
    budget_gb = default_memory_budget_gb(device_type) if is_auto(budget) else float(budget)

    view = data_cfg.view_size
    if is_auto(view):
        cap = 192 if on_gpu else 64
        view = _floor_multiple(min(min(stats.median_inplane) * 0.8, cap), stride)
        # InstanceNorm needs more than one element at the bottleneck: at least 2x the total stride
        view = max(view, 2 * stride)
    view = int(view)
    if view % stride:
        raise ValueError(
            f"data.view_size {view} is not a multiple of the preset's total stride {stride}; "
            f"use a multiple of {stride}"
        )
    small = data_cfg.small_view_size
    if is_auto(small):
        small = max(2 * stride, _floor_multiple(view / 2, stride))
    small = int(small)
    n_small = int(data_cfg.n_small_views)
    if small >= view:
        n_small = 0  # the global views are already as small as the encoder allows
    for name, value in (("view_size", view), ("small_view_size", small)):
        if value < 2 * stride:
            raise ValueError(
                f"data.{name} {value} is too small for preset '{preset.name}': the encoder's bottleneck "
                f"would be 1x1, which InstanceNorm cannot normalise; use at least {2 * stride}"
            )

    n_slices = data_cfg.n_slices
    if is_auto(n_slices):
        cap = 32 if on_gpu else 16
        n_slices = max(2, min(stats.median_volume_slices or 2, cap))
    n_slices = int(n_slices)

    per_slice = slice_activation_bytes(preset, view, input_channels)
    per_small = slice_activation_bytes(preset, small, input_channels)
    budget_bytes = budget_gb * 1024**3
    has_3d = stats.n_volumes > 0
    share_2d = 0.5 if has_3d else 1.0

    b2 = data_cfg.batch_size_2d
    if is_auto(b2):
        per_item = 2 * per_slice + n_small * per_small
        cap = 256 if on_gpu else 16
        b2 = int(max(4, min(cap, budget_bytes * share_2d // per_item)))
    b3 = data_cfg.batch_size_3d
    if is_auto(b3):
        if has_3d:
            # up to 8 windows per step on CPU: with 2, Z's in-batch negatives are too few and it collapses
            # (docs/pretraining.md, seventh and twenty-third passes); with 4, L_inter and Z retrieval miss
            # bar 1 on --real (twenty-fourth pass)
            cap = GPU_MAX_WINDOWS if on_gpu else CPU_MAX_WINDOWS
            b3 = int(max(1,
                         min(cap, stats.n_volumes,
                             budget_bytes * (1 - share_2d) // (2 * n_slices * per_slice))))
        else:
            b3 = 0

    k2 = num_prototypes_2d
    if is_auto(k2):
        # SwAV used 3000 prototypes for ImageNet's 1.28M images; small pools need far fewer: about
        # one prototype per 8 distinct slices, at least 8.
        k2 = int(min(3000, max(8, round(stats.n_slices_total / 8))))
    k3 = num_prototypes_3d
    if is_auto(k3):
        k3 = int(min(300, max(2, round(stats.n_volumes / 2)))) if has_3d else 2

    # SwAV's iteration-based defaults assume long epochs; tie them to this run's epoch length
    freeze = (objective.freeze_prototypes_iterations if "freeze_prototypes_iterations" in explicit
              else iterations_per_epoch)
    queue_start = (objective.queue_start_iteration if "queue_start_iteration" in explicit
                   else iterations_per_epoch)
    return SelfConfiguration(
        view_size=view,
        small_view_size=small,
        n_small_views=n_small,
        n_slices=n_slices,
        batch_size_2d=int(b2),
        batch_size_3d=int(b3),
        num_prototypes_2d=int(k2),
        num_prototypes_3d=int(k3),
        freeze_prototypes_iterations=int(freeze),
        queue_start_iteration=int(queue_start),
        memory_budget_gb=round(budget_gb, 2),
        estimated_activation_gb=round(
            (int(b2) * (2 * per_slice + n_small * per_small) + int(b3) * 2 * n_slices * per_slice)
            / 1024**3,
            3,
        ),
    )


def describe(stats: DatasetStats, resolved: SelfConfiguration) -> str:
    r = resolved
    per_rank = (f" (this process of {r.world_size}: 2D={r.batch_size_2d_per_rank} "
                f"3D={r.batch_size_3d_per_rank})"
                if r.world_size > 1 else "")
    return (
        f"dataset: {stats.n_images_2d} 2D images, {stats.n_volumes} volumes, {stats.n_slices_total} slices "
        f"in all, median in-plane {stats.median_inplane}, median volume slices {stats.median_volume_slices}\n"
        f"self-configured: view {r.view_size}px (small views {r.small_view_size}px), N={r.n_slices} slices, "
        f"global batch 2D={r.batch_size_2d} 3D={r.batch_size_3d}{per_rank}, prototypes "
        f"2D={r.num_prototypes_2d} 3D={r.num_prototypes_3d}, budget {r.memory_budget_gb} GB (estimated "
        f"activations {r.estimated_activation_gb} GB)"
    )
