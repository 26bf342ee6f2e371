"""JointSSLPretrainTrainer: joint 2D/3D self-supervised pretraining inside nnU-Net.

    export nnUNet_extTrainer=$(nnssl_joint trainer-path)
    nnUNetv2_train 900 joint_ssl all -tr JointSSLPretrainTrainer -p nnsslJointPlans [-device cpu] [--c]

Thin orchestration: the configuration (nnssl_joint.pretrain.config), self-configuration
(nnssl_joint.pretrain.autoconfig), the model and losses (nnssl_joint.pretrain.model), the data loaders
(nnssl_joint.data.loaders) and logging (nnssl_joint.pretrain.run_logging) live in the library.
"""

from __future__ import annotations

import json
import os
from time import time

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from torch import autocast
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nnssl_joint.common.checkpoint_io import atomic_write_text, save_nnunet_checkpoint
from nnssl_joint.common.modules import unwrap
from nnssl_joint.common.seeding import capture_rng, restore_rng, seed_everything
from nnssl_joint.models.preset import load_preset
from nnssl_joint.pretrain import runtime
from nnssl_joint.pretrain.autoconfig import DatasetStats, SelfConfiguration, auto_configure, describe
from nnssl_joint.pretrain.checkpoint import load_initial_weights
from nnssl_joint.pretrain.config import load_pretrain_config
from nnssl_joint.pretrain.model import JointSSLModel
from nnssl_joint.pretrain.run_logging import IterationLossFile, JointSSLLocalLogger
from nnssl_joint.pretrain.schedule import WarmupCosineLR
from nnssl_joint.probe.during_training import run_epoch_probe, start_epoch_probe
from nnssl_joint.ssl.objective import LOSS_TERMS, combine_losses


class JointSSLPretrainTrainer(nnUNetTrainer):
    """Pretrains f_intra (2D encoder) and f_inter (deformable slice Transformer) with
    L = l_intra L_intra + l_intra3d L_intra_3d + l_inter L_inter + l_mask L_mask
    (Nguyen et al., AAAI 2023)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and not torch.cuda.is_available():
            # nnU-Net assumes CUDA under DDP; on CPU (gloo: tests, CPU clusters) stay on the CPU without AMP
            self.device = torch.device("cpu")
            self.grad_scaler = None
        elif self.is_ddp:
            # nnU-Net picks cuda:<global rank>; on several nodes (torchrun) the GPU index is the local rank
            self.device = torch.device(
                "cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
        self.ssl_config, self.ssl_config_sources = load_pretrain_config(
            self.configuration_manager.configuration)
        optim = self.ssl_config.optim
        self.num_epochs = optim.num_epochs
        self.num_iterations_per_epoch = optim.iterations_per_epoch
        self.num_val_iterations_per_epoch = 0
        self.initial_lr = optim.lr
        self.weight_decay = optim.weight_decay
        self.enable_deep_supervision = False
        self.save_every = max(1, optim.save_every)
        self.logger.local_logger = JointSSLLocalLogger()
        self.iteration = 0
        self.resolved: SelfConfiguration | None = None
        self.stats: DatasetStats | None = None
        self.dataset_summary: dict = {}
        self.sample_index = None  # nnssl_joint.data.loaders.SampleIndex, built in initialize()
        self.deepcluster = self.ssl_config.objective.clustering == "deepcluster"
        self._epoch_outputs_start = 0.0
        self._consecutive_nonfinite = 0
        self._best_loss: float | None = None
        self.loss_file = IterationLossFile(join(self.output_folder, "losses.tsv"))

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        if self.was_initialized:
            raise RuntimeError("initialize() called twice")
        self.num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                               self.dataset_json)
        self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        cfg = self.ssl_config
        # before anything draws random numbers (weights, prototypes); --c then restores the saved RNG state
        seed = seed_everything(cfg.seed, self.local_rank)
        self.preset = load_preset(cfg.preset)
        self.stats, self.dataset_summary = runtime.dataset_stats(self.preprocessed_dataset_folder,
                                                                 self.dataset_class)
        self.resolved = auto_configure(self.stats, self.preset, self.device.type, cfg,
                                       self.num_iterations_per_epoch, self.num_input_channels)
        if self.is_ddp:
            self.resolved = self.resolved.for_process(dist.get_world_size(), dist.get_rank())
        self.print_to_log_file(describe(self.stats, self.resolved))
        self.print_to_log_file(f"configuration sources: {', '.join(self.ssl_config_sources)}; "
                               + ("not seeded (seed null)" if seed is None else f"seed {cfg.seed}"))
        if self.stats.n_volumes == 0:
            self.print_to_log_file("WARNING: the dataset holds no volumes (every case has one slice): "
                                   "L_intra_3d, L_inter and L_mask are disabled; only the 2D encoder is "
                                   "pretrained.")

        # global sample indices of the dataset (keys of DeepCluster-v2's memory banks; same on every rank)
        self.sample_index = runtime.sample_index(self.dataset_summary, self.resolved.n_slices)
        self.network = JointSSLModel(self.preset, self.num_input_channels,
                                     self.resolved.objective(cfg.objective),
                                     slice_memory_size=self.sample_index.num_slices,
                                     window_memory_size=self.sample_index.num_windows,
                                     kmeans_seed=cfg.seed or 0).to(self.device)
        if self.deepcluster:
            self.print_to_log_file(
                f"DeepCluster-v2: memory banks of {self.sample_index.num_slices} slices and "
                f"{self.sample_index.num_windows} windows of {self.resolved.n_slices} slices, "
                f"{cfg.objective.deepcluster_heads} k-means heads, K 2D={self.resolved.num_prototypes_2d} "
                f"3D={self.resolved.num_prototypes_3d}; k-means at the start of every epoch on the banks "
                "filled so far (the DeepCluster terms are 0 until a bank's first k-means)")
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        if self.is_ddp:
            # DeepCluster-v2's banks, centroids and labels are identical on every rank by construction
            # (all-gathered updates, distributed k-means): no need to broadcast them before every forward
            self.network = DDP(self.network,
                               device_ids=[self.device.index] if self.device.type == "cuda" else None,
                               find_unused_parameters=True, broadcast_buffers=not self.deepcluster)
        self.was_initialized = True
        if self.local_rank == 0:
            atomic_write_text(json.dumps(self.effective_config(), indent=2),
                              join(self.output_folder, "nnssl_joint_config.json"))

    def effective_config(self) -> dict:
        return {"config": self.ssl_config.to_dict(), "resolved": self.resolved.to_dict(),
                "preset": self.preset.to_dict(),
                "sources": self.ssl_config_sources, "input_channels": self.num_input_channels}

    def configure_optimizers(self):
        optim = self.ssl_config.optim
        params = runtime.parameter_groups(self.network, optim.weight_decay, optim.volume_lr_factor,
                                          optim.volume_head_lr_factor)
        optimizer = torch.optim.AdamW(params, lr=self.initial_lr, betas=(0.9, 0.999))
        base_lrs = [self.initial_lr * group["lr_factor"] for group in optimizer.param_groups]
        scheduler = WarmupCosineLR(optimizer, base_lrs, self.num_epochs, optim.warmup_epochs,
                                   optim.min_lr_ratio)
        return optimizer, scheduler

    @property
    def model(self) -> JointSSLModel:
        return unwrap(self.network)

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # no decoder during pretraining

    def plot_network_architecture(self):
        pass

    def get_dataloaders(self):
        dl_train = runtime.build_joint_loader(self, self.resolved)
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            mt_train = SingleThreadedAugmenter(dl_train, None)
        else:
            # seeds=None would leave the workers' torch RNG unseeded: forked workers would repeat each other's
            # torch draws (noise, bias fields); seeds from the run's RNG differ per worker, rank and resume
            mt_train = NonDetMultiThreadedAugmenter(data_loader=dl_train, transform=None,
                                                    num_processes=n_proc, num_cached=max(4, n_proc // 2),
                                                    seeds=runtime.augmenter_seeds(n_proc),
                                                    pin_memory=self.device.type == "cuda", wait_time=0.002)
        return mt_train, None

    def on_train_start(self):
        super().on_train_start()
        if self.local_rank == 0:
            removed = runtime.remove_stale_temp_files(self.output_folder)
            if removed:
                self.print_to_log_file(f"removed temporary files of an interrupted run: {removed}")
            dropped = self.loss_file.restart_at(self.iteration)
            if dropped:
                self.print_to_log_file(f"losses.tsv: dropped {dropped} row(s) written after the checkpoint")
        if self.ssl_config.init_from is not None and self.iteration == 0:  # a fresh start, not --c
            loaded = load_initial_weights(self.model, self.ssl_config.init_from, self.preset,
                                          self.num_input_channels)
            self.print_to_log_file(
                f"init_from {self.ssl_config.init_from}: {loaded['loaded']} tensors loaded"
                + (f"; this run's own draw: {', '.join(loaded['own_draw'])}" if loaded["own_draw"] else "")
                + (f"; in the file, not in this network: {', '.join(loaded['unused'])}"
                   if loaded["unused"] else ""))
        self.print_to_log_file(
            f"JointSSLPretrainTrainer: preset '{self.preset.name}', "
            f"schedule '{self.ssl_config.objective.schedule}', "
            f"{self.num_epochs} epochs x {self.num_iterations_per_epoch} iterations, effective configuration "
            f"in {join(self.output_folder, 'nnssl_joint_config.json')}")
        start_epoch_probe(self)

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.stage = self.ssl_config.objective.stage_at(self.current_epoch)
        self.print_to_log_file(f"stage {self.stage.name}: terms {dict(self.stage.weights)}"
                               + (", f_intra frozen" if self.stage.freeze_intra else ""))
        if self.deepcluster:
            self.recompute_clusters()
        self._epoch_outputs_start = time()

    def recompute_clusters(self) -> None:
        """DeepCluster-v2: k-means on the memory banks as the previous epochs left them (every rank, same
        result), pseudo-labels for this epoch. Nothing to cluster at the start of the first epoch."""
        report = self.model.recompute_clusters()
        for key, what in (("2d", "slices (L_intra, L_intra_3d)"), ("3d", "windows (L_inter)")):
            r = report[key]
            if r["done"]:
                self.print_to_log_file(
                    f"DeepCluster-v2 k-means #{int(r['recomputes'])} on {int(r['samples'])} {what}, "
                    f"K={int(r['clusters'])}: NMI to the previous pseudo-labels {r['nmi']:.3f}")
            elif r["samples"] > 0:  # an empty bank (e.g. windows during staged stage A) says nothing new
                self.print_to_log_file(
                    f"DeepCluster-v2: {int(r['samples'])} {what} in the memory bank, fewer than K="
                    f"{int(r['clusters'])}: no k-means yet"
                    + (f", the pseudo-labels of k-means #{int(r['recomputes'])} stay" if r["recomputes"]
                       else ", the term stays 0"))

    def train_step(self, batch: dict) -> dict:
        slices, volumes = runtime.batch_to_device(batch, self.device)
        if not self.stage.needs_volumes:
            volumes = None
        if not self.stage.needs_images:
            slices = None
        self.optimizer.zero_grad(set_to_none=True)
        buffers = runtime.snapshot_buffers(self.model)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            terms = self.network(slices, volumes, self.iteration, self.stage)
            loss = combine_losses(terms, self.stage)
        finite = bool(torch.isfinite(loss).item())
        if self.is_ddp:  # every rank must take the same decision, or DDP hangs
            flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
            dist.all_reduce(flag)
            finite = flag.item() == 0
        out = {"loss": float(loss.detach()), "finite": finite,
               "n_slices": runtime.count_slices(slices, volumes), "n_volumes": 0 if volumes is None else
               int(volumes["views"].shape[0])}
        for term in LOSS_TERMS:
            if term in terms:
                out[term] = float(terms[term].detach())
        for key in ("_assign_2d", "_assign_3d"):
            if key in terms:
                out[key] = terms[key].cpu().numpy()
        if self.local_rank == 0:
            self.loss_file.append(self.iteration, self.current_epoch, out)
        if not finite:
            runtime.restore_buffers(self.model, buffers)
            self.model.discard_memory_updates()
            self._consecutive_nonfinite += 1
            self.print_to_log_file(
                f"WARNING: non-finite loss {out['loss']} ({ {t: out.get(t) for t in LOSS_TERMS} }) at "
                f"iteration {self.iteration}; step skipped. Cases: {runtime.batch_case_ids(batch)}")
            limit = self.ssl_config.optim.max_consecutive_nonfinite
            if self._consecutive_nonfinite >= limit:
                raise RuntimeError(
                    f"{self._consecutive_nonfinite} non-finite losses in a row (limit "
                    f"optim.max_consecutive_nonfinite={limit}); stopping. Last batch's cases: "
                    f"{runtime.batch_case_ids(batch)}. Lower optim.lr, check the data of these cases, or "
                    "resume from the last checkpoint with --c.")
            self.iteration += 1
            return out
        self._consecutive_nonfinite = 0
        self.model.update_memory_banks()  # DeepCluster-v2: this step's embeddings (no-op for SwAV)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            self._clip_gradients()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            self._clip_gradients()
            self.optimizer.step()
        self.iteration += 1
        return out

    def _clip_gradients(self) -> None:
        optim = self.ssl_config.optim
        runtime.clip_gradients(self.network, optim.grad_clip, optim.grad_clip_mode)

    def on_train_epoch_end(self, train_outputs: list[dict]):
        seconds = max(1e-9, time() - self._epoch_outputs_start)
        summary = runtime.summarize_epoch(train_outputs, self.model, seconds, self.is_ddp)
        for key, value in summary.items():
            self.logger.log(key, value, self.current_epoch)
        self._last_summary = summary

    def on_validation_epoch_start(self):
        pass

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        pass

    def on_epoch_end(self):
        self.logger.log("epoch_end_timestamps", time(), self.current_epoch)
        s = self._last_summary
        terms = ", ".join(f"L_{t} {s[f'loss_{t}']:.4f}" for t in LOSS_TERMS if not np.isnan(s[f"loss_{t}"]))
        self.print_to_log_file(f"train_loss {s['train_losses']:.4f} ({terms})")
        self.print_to_log_file(
            f"throughput: {s['slices_per_s']:.1f} slices/s, {s['volumes_per_s']:.2f} volumes/s; prototype "
            f"usage entropy 2D {s['entropy_2d']:.3f} 3D {s['entropy_3d']:.3f}")
        epoch_time = self.logger.get_value("epoch_end_timestamps", -1) - self.logger.get_value(
            "epoch_start_timestamps", -1)
        self.print_to_log_file(f"Epoch time: {epoch_time:.2f} s")
        num_prototypes = {"2d": self.model.intra_loss.prototypes.weight.shape[0],
                          "3d": self.model.inter_loss.prototypes.weight.shape[0]}
        previous = None  # the losses of the epoch before (the logger is restored on resume)
        if self.current_epoch >= 1:
            try:
                previous = {f"loss_{t}": self.logger.get_value(f"loss_{t}", self.current_epoch - 1)
                            for t in LOSS_TERMS}
            except (KeyError, IndexError):  # a checkpoint whose log lacks that epoch: not judged
                previous = None
        for warning in runtime.monitor_warnings(s, self.current_epoch, num_prototypes,
                                                self.ssl_config.optim.collapse_entropy_threshold,
                                                swav=not self.deepcluster, previous=previous):
            self.print_to_log_file(warning)
        if (self.current_epoch + 1) % self.save_every == 0 and self.current_epoch != self.num_epochs - 1:
            self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
        if np.isfinite(s["train_losses"]) and (self._best_loss is None
                                               or s["train_losses"] < self._best_loss):
            self._best_loss = s["train_losses"]
            self.save_checkpoint(join(self.output_folder, "checkpoint_best.pth"))
        run_epoch_probe(self)  # optional (config section 'probe'); keeps the training's random streams
        if self.local_rank == 0:
            self.logger.plot_progress_png(self.output_folder)
        self.current_epoch += 1

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0 and not self.disable_checkpointing:
            written = runtime.export_downstream_weights(self,
                                                        join(self.output_folder, "checkpoint_final.pth"))
            for path in written:
                self.print_to_log_file(f"pretrained weights for fine-tuning: {path}")

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("pretraining has no segmentation validation; skipped")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank == 0:  # the record below is only needed where the file is written
            record = {**self.effective_config(), "iteration": self.iteration, "rng": capture_rng()}
            if self.deepcluster:  # the keys of the memory banks in network_weights
                record["sample_index"] = self.sample_index.to_dict()
            save_nnunet_checkpoint(self, self.model, self._best_loss, filename, {"nnssl_joint": record})

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            path, checkpoint = runtime.newest_training_state(checkpoint, self.device)
            if os.path.basename(path) != os.path.basename(filename_or_checkpoint):
                self.print_to_log_file(f"{os.path.basename(path)} is newer than "
                                       f"{os.path.basename(filename_or_checkpoint)}: resuming from it")
        extra = runtime.check_resume_compatible(checkpoint, self.effective_config())
        if self.deepcluster:
            runtime.check_sample_index(extra.get("sample_index"), self.sample_index)
        self.model.load_state_dict(checkpoint["network_weights"])
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_loss = checkpoint["_best_ema"]
        self.iteration = extra["iteration"]
        restore_rng(extra["rng"])
        self.print_to_log_file(f"resumed from epoch {self.current_epoch}, iteration {self.iteration}")

