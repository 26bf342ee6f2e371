"""nnUNetTrainerBudget: stock nnU-Net training with a given length and seed, the benchmark's ``nnunet`` arm.

    NNSSL_JOINT_FINETUNE_CONFIG=budget.json \
        nnUNetv2_train 100 3d_fullres 0 -p nnUNetPlans -tr nnUNetTrainerBudget

Everything is nnU-Net's own (plans from nnU-Net's planner, its network, loss, augmentation, SGD with poly
decay at nnU-Net's initial learning rate); only the training length (``num_epochs``,
``iterations_per_epoch``, ``val_iterations_per_epoch``, ``save_every``) and the ``seed`` are read, from the
same file as ``JointSSLFinetuneTrainer``, so the stock baseline trains exactly as long and on the same seed
as the plugin's arms. Keys of the plugin's fine-tuning recipe are ignored (and named in the log).
Checkpoints are written atomically, so an interrupted benchmark resumes from an intact file.
"""

from __future__ import annotations

import json

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnssl_joint.common.checkpoint_io import save_nnunet_checkpoint
from nnssl_joint.common.modules import unwrap
from nnssl_joint.common.seeding import seed_everything
from nnssl_joint.finetune import FinetuneConfig, load_finetune_config

#: the keys this trainer takes from the fine-tuning configuration
BUDGET_KEYS = ("num_epochs", "iterations_per_epoch", "val_iterations_per_epoch", "save_every", "seed")


class nnUNetTrainerBudget(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_config, self.budget_sources = load_finetune_config()
        cfg = self.budget_config
        self.num_epochs = cfg.num_epochs
        self.num_iterations_per_epoch = cfg.iterations_per_epoch
        self.num_val_iterations_per_epoch = cfg.val_iterations_per_epoch
        self.save_every = cfg.save_every

    def initialize(self):
        seed_everything(self.budget_config.seed, self.local_rank)
        super().initialize()
        used = {k: getattr(self.budget_config, k) for k in BUDGET_KEYS}
        defaults = FinetuneConfig()
        ignored = sorted(k for k, v in self.budget_config.to_dict().items()
                         if k not in BUDGET_KEYS and v != getattr(defaults, k))
        self.print_to_log_file(f"nnUNetTrainerBudget ({', '.join(self.budget_sources)}): {json.dumps(used)}; "
                               f"stock nnU-Net otherwise (initial lr {self.initial_lr:g})"
                               + (f"; ignored recipe keys {ignored}" if ignored else ""))

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint content, written atomically (temp file + rename)."""
        save_nnunet_checkpoint(self, unwrap(self.network), self._best_ema, filename)
