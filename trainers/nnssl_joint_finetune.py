"""JointSSLFinetuneTrainer: nnU-Net fine-tuning of the plugin's 2d / 3d_fullres networks.

    export nnUNet_extTrainer=$(nnssl_joint trainer-path)
    nnUNetv2_train 100 3d_fullres 0 -p nnsslJointPlans -tr JointSSLFinetuneTrainer \
        -pretrained_weights .../pretrained_for_3d_fullres.pth

nnU-Net's trainer plus: learning-rate warm-up, optionally frozen pretrained parts for the first
epochs and a lower learning rate for the pretrained parts (all three only in runs from pretrained weights;
a run from random initialisation trains with stock nnU-Net's schedule),
epochs/iterations from a JSON file
(``NNSSL_JOINT_FINETUNE_CONFIG``), and a check of ``-pretrained_weights`` before training starts.
"""

from __future__ import annotations

import json

import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnssl_joint.common.checkpoint_io import atomic_write_text, save_nnunet_checkpoint
from nnssl_joint.common.modules import unwrap
from nnssl_joint.common.seeding import seed_everything
from nnssl_joint.finetune import (
    GroupPolyLR,
    check_pretrained_encoder_stages,
    check_pretrained_weights,
    continues_from_checkpoint,
    describe_stages,
    freeze_pretrained,
    load_finetune_config,
    new_parts_state,
    pretrained_weights_from_argv,
    split_parameters,
)


class JointSSLFinetuneTrainer(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.finetune_config, self.finetune_sources = load_finetune_config(
            self.configuration_manager.configuration)
        cfg = self.finetune_config
        self.num_epochs = cfg.num_epochs
        self.num_iterations_per_epoch = cfg.iterations_per_epoch
        self.num_val_iterations_per_epoch = cfg.val_iterations_per_epoch
        self.initial_lr = cfg.initial_lr
        self.weight_decay = cfg.weight_decay
        self.save_every = cfg.save_every
        self._frozen: bool | None = None
        # learning-rate factor and frozen epochs of the pretrained parts, set in initialize() once it is known
        # whether the run starts from pretrained weights
        self._lr_factor, self._freeze_epochs = 1.0, 0
        self._warmup_epochs = 0
        # pretrained_encoder_stages of a run from pretrained weights (None: every pretrained part transfers)
        self._stages: int | None = None
        # new_parts_init 'run': this run's own initialisation of the non-pretrained parts, taken before
        # nnU-Net's loader overwrites it with the file's and put back by keep_run_initialisation()
        self._run_new_parts: dict[str, torch.Tensor] | None = None

    def initialize(self):
        # before the network is built: its initial weights and (with nnUNet_n_proc_DA=0) every batch and
        # augmentation follow from the seed
        seed_everything(self.finetune_config.seed, self.local_rank)
        weights = pretrained_weights_from_argv()
        # a run resumed with --c gets no -pretrained_weights; the record of its start says how it began. A new
        # start (no --c, or --c without a checkpoint) ignores and replaces the record of an earlier run there
        start_record = join(self.output_folder, "nnssl_joint_finetune_start.json")
        resuming = continues_from_checkpoint(self.output_folder)
        pretrained = weights is not None or (resuming and isfile(start_record)
                                             and load_json(start_record)["pretrained_weights"] is not None)
        # before super().initialize(), which builds the optimizer from them
        self.initial_lr = self.finetune_config.initial_lr_for(pretrained=pretrained)
        self._lr_factor, self._freeze_epochs = self.finetune_config.pretrained_parts_schedule(pretrained)
        self._warmup_epochs = self.finetune_config.warmup_epochs_for(pretrained)
        # the re-initialised encoder stages are new parts for the learning rate and freezing (a resumed run
        # builds the same groups as its start)
        self._stages = self.finetune_config.pretrained_encoder_stages if pretrained else None
        super().initialize()
        if self.local_rank == 0 and not resuming:
            atomic_write_text(json.dumps({"pretrained_weights": weights}), start_record)
        self.print_to_log_file(f"fine-tuning configuration ({', '.join(self.finetune_sources)}): "
                               f"{json.dumps(self.finetune_config.to_dict())}")
        if self.local_rank == 0:
            atomic_write_text(json.dumps(self.finetune_config.to_dict(), indent=2),
                              join(self.output_folder, "nnssl_joint_finetune_config.json"))
        self.print_to_log_file(f"recipe '{self.finetune_config.recipe}', initial learning rate "
                               f"{self.initial_lr:g} ({'pretrained' if pretrained else 'random'} "
                               f"initialisation), {self._warmup_epochs} warm-up epoch(s); pretrained "
                               f"parts: learning rate x {self._lr_factor:g}, frozen for "
                               f"{self._freeze_epochs} epoch(s)"
                               + ("" if pretrained else " (warmup_epochs, freeze_pretrained_epochs and "
                                  "pretrained_lr_factor act only on runs from pretrained weights)"))
        if weights is not None:
            module = unwrap(self.network)
            preset = self.configuration_manager.network_arch_init_kwargs.get("preset")
            hint = (f"nnssl_joint export --checkpoint <pretraining checkpoint_final.pth> -d "
                    f"{self.plans_manager.dataset_name} -c {self.configuration_name} "
                    f"-p {self.plans_manager.plans_name} -o pretrained_for_this_task.pth, then pass that "
                    f"file")
            self.print_to_log_file(check_pretrained_weights(module, weights, preset, hint))
            if self.finetune_config.new_parts_init == "run":
                stages = self.finetune_config.pretrained_encoder_stages
                check_pretrained_encoder_stages(module, stages)
                # after super().initialize(): under DDP every rank holds rank 0's draw by now
                self._run_new_parts = new_parts_state(self.network, stages)
                if stages is not None:
                    self.print_to_log_file(
                        f"pretrained_encoder_stages {stages}: {describe_stages(stages)}; the other stages, "
                        f"the slice embedding and the slice Transformer start, like the decoder, from this "
                        f"run's own initialisation")

    def keep_run_initialisation(self) -> int:
        """With ``new_parts_init: run``, put this run's own initialisation of the non-pretrained parts back
        after nnU-Net's loader (``maybe_load_checkpoint``, after :meth:`initialize`) replaced it with the
        file's; returns how many tensors were restored (0 otherwise; called once, from on_train_start)."""
        if self._run_new_parts is None:
            return 0
        restored, self._run_new_parts = self._run_new_parts, None
        result = unwrap(self.network).load_state_dict(restored, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"keep_run_initialisation: unexpected keys {result.unexpected_keys[:4]}")
        self.print_to_log_file(f"new_parts_init 'run': {len(restored)} tensors outside the transferred parts "
                               f"keep this run's own initialisation (seed {self.finetune_config.seed}) "
                               "instead of the file's")
        return len(restored)

    def on_train_start(self):
        self.keep_run_initialisation()
        super().on_train_start()

    def configure_optimizers(self):
        module = unwrap(self.network)
        pretrained, other = split_parameters(module, self._stages)
        lrs = [self.initial_lr * self._lr_factor, self.initial_lr]
        groups = [{"params": pretrained, "lr": lrs[0]}, {"params": other, "lr": lrs[1]}]
        optimizer = torch.optim.SGD(groups, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        return optimizer, GroupPolyLR(optimizer, lrs, self.num_epochs, self._warmup_epochs,
                                      self.finetune_config.recipe)

    def on_train_epoch_start(self):
        frozen = self.current_epoch < self._freeze_epochs
        if frozen != self._frozen:
            n = freeze_pretrained(unwrap(self.network), frozen, self._stages)
            self.print_to_log_file(f"pretrained parts {'frozen' if frozen else 'trainable'} ({n} tensors)")
            self._frozen = frozen
        super().on_train_epoch_start()

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint content, written atomically (temp file + rename)."""
        save_nnunet_checkpoint(self, unwrap(self.network), self._best_ema, filename)
