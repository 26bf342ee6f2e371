"""Fine-tuning configuration and pre-flight checks for ``JointSSLFinetuneTrainer``.

One typed configuration instead of a subclass per number (``nnUNetTrainer_250epochs`` ...). Values come
from the defaults, a ``"nnssl_joint_finetune"`` section of the plans' configuration, then a JSON file
named by ``NNSSL_JOINT_FINETUNE_CONFIG`` (partial: only the keys to change).
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from nnssl_joint.common.modules import unwrap
from nnssl_joint.common.typed_config import build, layers_from, load_layered
from nnssl_joint.errors import NnsslJointError
from nnssl_joint.models.downstream import PRETRAINED_PARTS
from nnssl_joint.models.preset import same_preset

FINETUNE_ENV_VAR = "NNSSL_JOINT_FINETUNE_CONFIG"
FINETUNE_PLANS_SECTION = "nnssl_joint_finetune"
#: learning-rate recipes of :class:`FinetuneConfig`
RECIPES = ("plugin", "nnunet_warmup")
#: where the non-pretrained parts of a run from pretrained weights start (``FinetuneConfig.new_parts_init``)
NEW_PARTS_INIT = ("file", "run")


@dataclass
class FinetuneConfig:
    num_epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations_per_epoch: int = 50
    initial_lr: float = 1e-2
    weight_decay: float = 3e-5
    #: linear warm-up of every learning rate before nnU-Net's poly decay (runs from pretrained weights only:
    #: a run from random initialisation follows stock nnU-Net's schedule, poly decay from the first epoch)
    warmup_epochs: int = 0
    #: pretrained parts get no updates for this many epochs (runs from pretrained weights only)
    freeze_pretrained_epochs: int = 0
    #: learning rate of the pretrained parts relative to the rest (runs from pretrained weights only)
    pretrained_lr_factor: float = 1.0
    save_every: int = 50
    #: the learning-rate recipe: ``plugin`` (``warmup_epochs`` of linear warm-up inside nnU-Net's poly decay
    #: over all epochs, optional freezing and lower rate of the pretrained parts) or ``nnunet_warmup``
    #: (nnU-Net's pretrained-weights fine-tuning, ``nnUNetTrainer_warmup``: the whole network warms up
    #: linearly to the initial rate over ``warmup_epochs``, then poly decay over the remaining epochs)
    recipe: str = "plugin"
    #: the initial learning rate of a run started with ``-pretrained_weights`` (null: ``initial_lr``);
    #: nnU-Net's recipe starts pretrained networks lower than random ones
    pretrained_initial_lr: float | None = None
    #: seeds Python, NumPy and torch before the network is built; with nnUNet_n_proc_DA=0 (augmentation
    #: in the training process) a CPU run then repeats exactly. null: nnU-Net's behaviour (no seeding)
    seed: int | None = None
    #: where the parts outside the pretrained ones (decoder, segmentation layers, slice context,
    #: through-plane convolutions) start in a run from pretrained weights. ``file``: the tensors of the
    #: ``-pretrained_weights`` file (nnU-Net's loader copies every key but ``.seg_layers.``; a file exported
    #: by nnssl_joint carries a decoder drawn once, with the export's seed, so every fine-tuning seed starts
    #: from the same decoder). ``run``: this run's own draw, from ``seed``: the decoder a run from scratch
    #: with the same seed starts from, so a seed means the same draw in every arm of a comparison
    new_parts_init: str = "file"
    #: which encoder stages start from the file (null: all of them, with the slice embedding and slice
    #: Transformer). An integer N: stages 0 to N-1, from the input side (the shallow, generic layers); a list
    #: of stage indices: those stages only (e.g. [1, 2, 3, 4]: every stage but the first). The other stages,
    #: the slice embedding and the slice Transformer start from this run's own draw like the decoder (needs
    #: ``new_parts_init: run``) and count as new parts for ``pretrained_lr_factor`` and
    #: ``freeze_pretrained_epochs`` (runs from pretrained weights only). 0 or [] transfers nothing: the
    #: control for everything a run from pretrained weights does besides its start (warm-up, initial rate)
    pretrained_encoder_stages: int | list[int] | None = None

    def __post_init__(self) -> None:
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            raise NnsslJointError(f"fine-tuning config: seed must be a non-negative integer or null, "
                                  f"got {self.seed!r}")
        for name in ("num_epochs", "iterations_per_epoch", "save_every"):
            if getattr(self, name) < 1:
                raise NnsslJointError(f"fine-tuning config: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_iterations_per_epoch", "warmup_epochs", "freeze_pretrained_epochs"):
            if getattr(self, name) < 0:
                raise NnsslJointError(f"fine-tuning config: {name} must be >= 0, got {getattr(self, name)}")
        if self.initial_lr <= 0 or self.pretrained_lr_factor < 0:
            raise NnsslJointError("fine-tuning config: initial_lr must be > 0 and pretrained_lr_factor >= 0")
        if self.pretrained_initial_lr is not None and not self.pretrained_initial_lr > 0:
            raise NnsslJointError(f"fine-tuning config: pretrained_initial_lr must be > 0 or null, got "
                                  f"{self.pretrained_initial_lr!r}")
        if self.recipe not in RECIPES:
            raise NnsslJointError(f"fine-tuning config: recipe must be one of {', '.join(RECIPES)}, "
                                  f"got {self.recipe!r}")
        if self.new_parts_init not in NEW_PARTS_INIT:
            raise NnsslJointError(f"fine-tuning config: new_parts_init must be one of "
                                  f"{', '.join(NEW_PARTS_INIT)}, got {self.new_parts_init!r}")
        stages = self.pretrained_encoder_stages
        if stages is not None:
            if isinstance(stages, (list, tuple)):
                if (not all(_is_index(i) for i in stages)) or len(set(stages)) != len(stages):
                    raise NnsslJointError(f"fine-tuning config: pretrained_encoder_stages as a list must "
                                          f"hold distinct stage indices >= 0, got {stages!r}")
                self.pretrained_encoder_stages = sorted(stages)
            elif not _is_index(stages):
                raise NnsslJointError(f"fine-tuning config: pretrained_encoder_stages must be an integer "
                                      f">= 0, a list of stage indices or null (all stages), got {stages!r}")
            if self.new_parts_init != "run":
                raise NnsslJointError(
                    f"fine-tuning config: pretrained_encoder_stages {stages} re-initialises the encoder "
                    f"stages it does not name, the slice embedding and the slice Transformer from this "
                    f"run's own draw, which needs new_parts_init 'run' (got {self.new_parts_init!r}); add "
                    '"new_parts_init": "run"')
        if self.recipe == "nnunet_warmup":
            if self.freeze_pretrained_epochs or self.pretrained_lr_factor != 1.0:
                raise NnsslJointError(
                    "fine-tuning config: recipe 'nnunet_warmup' trains the whole network at one learning "
                    "rate; set freeze_pretrained_epochs to 0 and pretrained_lr_factor to 1, or use recipe "
                    "'plugin'")
            if self.warmup_epochs >= self.num_epochs:
                raise NnsslJointError(f"fine-tuning config: recipe 'nnunet_warmup' needs warmup_epochs "
                                      f"({self.warmup_epochs}) < num_epochs ({self.num_epochs})")

    def initial_lr_for(self, pretrained: bool) -> float:
        """The initial learning rate of a run from pretrained weights (``pretrained``) or from scratch."""
        if pretrained and self.pretrained_initial_lr is not None:
            return self.pretrained_initial_lr
        return self.initial_lr

    def warmup_epochs_for(self, pretrained: bool) -> int:
        """Warm-up epochs of a run from pretrained weights (``warmup_epochs``) or from scratch (0).

        A run from random initialisation trains exactly as stock nnU-Net's ``nnUNetTrainer`` does (poly decay
        from the full initial rate; nnU-Net warms up only in its pretrained-weights trainer). Measured on the
        demo's 3d_fullres task (docs/finetuning.md, issue 16): with one warm-up epoch at half the rate, the
        stock network itself, in this trainer, never learnt the two small organs it learns without it."""
        return self.warmup_epochs if pretrained else 0

    def pretrained_parts_schedule(self, pretrained: bool) -> tuple[float, int]:
        """(learning-rate factor, frozen epochs) of the pretrained parts (encoder, slice embedding, slice
        Transformer). A run from scratch trains them like the rest (1.0, 0): there is nothing pretrained to
        keep, and the same configuration file can serve both arms of a comparison."""
        if not pretrained:
            return 1.0, 0
        return self.pretrained_lr_factor, self.freeze_pretrained_epochs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "fine-tuning config") -> FinetuneConfig:
        return build(cls, values, where)


def load_finetune_config(plans_configuration: dict | None = None) -> tuple[FinetuneConfig, list[str]]:
    """Defaults <- plans section ``nnssl_joint_finetune`` <- the file named by
    ``NNSSL_JOINT_FINETUNE_CONFIG``."""
    loaded = load_layered(FinetuneConfig,
                          layers_from(plans_configuration, FINETUNE_PLANS_SECTION, FINETUNE_ENV_VAR))
    return loaded.config, list(loaded.sources)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def transferred_stages(pretrained_encoder_stages: int | list[int] | None) -> set[int] | None:
    """The encoder stage indices ``pretrained_encoder_stages`` transfers (None: every pretrained part)."""
    if pretrained_encoder_stages is None:
        return None
    if isinstance(pretrained_encoder_stages, int):
        return set(range(pretrained_encoder_stages))
    return set(pretrained_encoder_stages)


def describe_stages(pretrained_encoder_stages: int | list[int] | None) -> str:
    """What ``pretrained_encoder_stages`` transfers, in words, for the training log."""
    stages = transferred_stages(pretrained_encoder_stages)
    if stages is None:
        return "every pretrained part starts from the file"
    if not stages:
        return "nothing starts from the file"
    return f"encoder stage(s) {', '.join(str(i) for i in sorted(stages))} start from the file"


def is_transferred(key: str, pretrained_encoder_stages: int | list[int] | None = None) -> bool:
    """Whether the state-dict entry ``key`` of a downstream network starts from the pretrained file: the
    pretrained parts (encoder, slice embedding, slice Transformer), or with ``pretrained_encoder_stages``
    only the encoder stages it names (N: stages 0 to N-1; a list: those indices; ``encoder.stages.<i>.``)."""
    top = key.split(".", 1)[0]
    if top not in PRETRAINED_PARTS:
        return False
    stages = transferred_stages(pretrained_encoder_stages)
    if stages is None:
        return True
    parts = key.split(".")
    return top == "encoder" and parts[1] == "stages" and int(parts[2]) in stages


def count_encoder_stages(network: nn.Module) -> int:
    """Number of stages of the downstream network's 2D encoder (``encoder.stages``)."""
    return len(unwrap(network).encoder.stages)


def check_pretrained_encoder_stages(network: nn.Module,
                                    pretrained_encoder_stages: int | list[int] | None) -> None:
    n = count_encoder_stages(network)
    spec = pretrained_encoder_stages
    if isinstance(spec, int) and spec > n:
        raise NnsslJointError(f"fine-tuning config: pretrained_encoder_stages {spec} but the network's "
                              f"encoder has {n} stages; use 0 to {n}, or null for all")
    if isinstance(spec, list) and spec and max(spec) >= n:
        raise NnsslJointError(f"fine-tuning config: pretrained_encoder_stages {spec} names stage {max(spec)} "
                              f"but the network's encoder has {n} stages (indices 0 to {n - 1})")


def split_parameters(network: nn.Module, pretrained_encoder_stages: int | list[int] | None = None
                     ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(pretrained parts, the rest) of a downstream network; with ``pretrained_encoder_stages`` the
    pretrained group is the encoder stages it names only (:func:`is_transferred`)."""
    pretrained, other = [], []
    for name, p in unwrap(network).named_parameters():
        (pretrained if is_transferred(name, pretrained_encoder_stages) else other).append(p)
    return pretrained, other


def new_parts_state(network: nn.Module, pretrained_encoder_stages: int | list[int] | None = None
                    ) -> dict[str, torch.Tensor]:
    """A copy of the state-dict entries of ``network`` that do not start from the file (decoder,
    segmentation layers, ...; with ``pretrained_encoder_stages`` also the encoder stages it does not name,
    the slice embedding and slice Transformer). Entries that are a second name of a transferred tensor (stock
    PlainConvUNet registers its encoder again as ``decoder.encoder.*``) are left out, so restoring the copy
    never touches a transferred tensor."""
    state = unwrap(network).state_dict()
    transferred = {v.data_ptr() for k, v in state.items() if is_transferred(k, pretrained_encoder_stages)}
    return {k: v.detach().clone() for k, v in state.items()
            if not is_transferred(k, pretrained_encoder_stages) and v.data_ptr() not in transferred}


def pretrained_weights_from_argv(argv: list[str] | None = None) -> str | None:
    """nnU-Net gives trainers no access to ``-pretrained_weights``; read it from the command line so the
    weights can be checked before training instead of failing inside nnU-Net's loader."""
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv[:-1]):
        if arg == "-pretrained_weights":
            return argv[i + 1]
    return None


#: the checkpoints nnU-Net's ``--c`` looks for, in order (``nnunetv2.run.run_training.maybe_load_checkpoint``)
RESUME_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


def continues_from_checkpoint(output_folder: str | os.PathLike, argv: list[str] | None = None) -> bool:
    """Whether nnU-Net will load a checkpoint of ``output_folder`` instead of starting a new training:
    ``--c`` with one of :data:`RESUME_CHECKPOINTS` present (without one nnU-Net starts anew), or ``--val`` /
    ``--val_best`` (validation of a finished run). A plain start in a folder that holds an earlier run is a
    new training, whatever that run was."""
    argv = sys.argv if argv is None else argv
    if "--val" in argv or "--val_best" in argv:
        return True
    return "--c" in argv and any(os.path.isfile(os.path.join(output_folder, f)) for f in RESUME_CHECKPOINTS)


def check_pretrained_weights(network: nn.Module, path: str, plans_preset: dict | None,
                             command_hint: str) -> str:
    """Fail early with a message naming the cause when ``path`` will not load into ``network``.

    Checks: readable checkpoint written by nnssl_joint, the network is a plugin architecture, preset
    equal to the plans' (or the network's) preset, a file exported for the network's configuration
    (2d / 3d_fullres), not a pretraining checkpoint without decoder keys (then points to the exported
    file / ``nnssl_joint export``), every non-seg key present with the same shape (input channel
    mismatches named as such). Returns a one-line summary."""
    from nnssl_joint.export import DOWNSTREAM_CLASSES, STEM_KEY_SUFFIXES, load_pretraining_checkpoint

    ckpt = load_pretraining_checkpoint(path)
    meta = ckpt["nnssl_joint"]
    network = unwrap(network)
    configuration = next((c for c, cls in DOWNSTREAM_CLASSES.items() if isinstance(network, cls)), None)
    if configuration is None:
        raise NnsslJointError(
            f"-pretrained_weights {path}: the network is {type(network).__name__}, not one of the plugin's "
            f"architectures ({', '.join(c.__name__ for c in DOWNSTREAM_CLASSES.values())}), so its plans "
            "were not made by nnssl_joint. Plan the dataset with `nnssl_joint plan_and_preprocess -d ID "
            "--downstream` and train with -p nnsslJointPlans")
    if plans_preset is None:
        plans_preset = network.preset.to_dict()
    if not same_preset(meta.get("preset"), plans_preset):
        raise NnsslJointError(
            f"{path} was pretrained with architecture preset '{meta.get('preset', {}).get('name')}' but the "
            f"plans use preset '{plans_preset.get('name')}'; re-plan the downstream dataset with the "
            f"pretraining preset (nnssl_joint plan_and_preprocess -d ID --downstream --preset "
            f"{meta.get('preset', {}).get('name')})")
    exported_for = meta.get("configuration")
    if exported_for is not None and exported_for != configuration:
        raise NnsslJointError(
            f"-pretrained_weights {path} holds the weights of the '{exported_for}' network "
            f"({DOWNSTREAM_CLASSES[exported_for].__name__}), but this is the '{configuration}' network "
            f"({type(network).__name__}); pass pretrained_for_{configuration}.pth of the pretraining run, or "
            f"build one: {command_hint}")
    weights = ckpt["network_weights"]
    state = network.state_dict()
    missing = [k for k in state if ".seg_layers." not in k and k not in weights]
    mismatched = [k for k in state
                  if ".seg_layers." not in k and k in weights and weights[k].shape != state[k].shape]
    if not missing and not mismatched:
        return f"{path}: all {len(state)} non-segmentation-head keys present with matching shapes"
    stem = [k for k in mismatched if k.endswith(STEM_KEY_SUFFIXES)]
    if stem and len(stem) == len(mismatched) and not missing:
        k = stem[0]
        cause = (f"input channels differ: {k} has {weights[k].shape[1]} input channel(s) in the file, the "
                 f"network {state[k].shape[1]}")
    elif missing and not mismatched and all(k.startswith("through_plane.") for k in missing):
        cause = (f"the network has through-plane convolutions (arch_kwargs through_plane_convs: true; "
                 f"{len(missing)} keys, e.g. {missing[:2]}) and the file was exported for a network "
                 f"without them (pretrained_for_3d_fullres.pth of a pretraining run is); export for these "
                 f"plans")
    elif missing and all(k.split(".", 1)[0] not in PRETRAINED_PARTS for k in missing):
        cause = (f"the file holds no weights for the newly initialised parts ({len(missing)} keys, e.g. "
                 f"{missing[:3]}): it is a pretraining checkpoint, not a downstream file")
    else:
        cause = (f"{len(missing)} missing keys {missing[:4]} and {len(mismatched)} shape mismatches "
                 f"{mismatched[:4]} (another architecture or configuration)")
    raise NnsslJointError(f"-pretrained_weights {path} does not fit this network: {cause}. "
                          f"Fix: {command_hint}")


def freeze_pretrained(network: nn.Module, frozen: bool,
                      pretrained_encoder_stages: int | list[int] | None = None) -> int:
    """Set requires_grad of the pretrained parts (:func:`split_parameters`); returns how many tensors were
    touched."""
    pretrained, _ = split_parameters(network, pretrained_encoder_stages)
    for p in pretrained:
        p.requires_grad_(not frozen)
    return len(pretrained)


def poly_with_warmup(epoch: int, num_epochs: int, warmup_epochs: int, exponent: float = 0.9) -> float:
    if epoch < warmup_epochs:
        return (epoch + 1) / (warmup_epochs + 1)
    return (1 - epoch / num_epochs) ** exponent


def warmup_then_poly(epoch: int, num_epochs: int, warmup_epochs: int, exponent: float = 0.9) -> float:
    """nnU-Net's ``nnUNetTrainer_warmup`` schedule as a factor of the initial rate: ``Lin_incr_LRScheduler``
    ((epoch + 1) / W) for the first W epochs, then ``PolyLRScheduler_offset`` (poly over the epochs after
    the warm-up)."""
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    return (1 - (epoch - warmup_epochs) / (num_epochs - warmup_epochs)) ** exponent


SCHEDULES = {"plugin": poly_with_warmup, "nnunet_warmup": warmup_then_poly}


class GroupPolyLR:
    """nnU-Net's poly schedule (``step(epoch)``) with warm-up and one base learning rate per group;
    ``recipe`` picks the warm-up (:data:`SCHEDULES`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lrs: list[float], num_epochs: int,
                 warmup_epochs: int, recipe: str = "plugin") -> None:
        self.optimizer = optimizer
        self.base_lrs = base_lrs
        self.num_epochs = num_epochs
        self.warmup_epochs = warmup_epochs
        self.schedule = SCHEDULES[recipe]

    def step(self, epoch: int) -> None:
        f = self.schedule(epoch, self.num_epochs, self.warmup_epochs)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f
