"""Learning-rate schedule of the pretraining run: linear warm-up, then cosine decay, per epoch.

It follows nnU-Net's convention ``scheduler.step(epoch)`` so the trainer's epoch loop drives it."""

from __future__ import annotations

import math

from torch.optim import Optimizer


class WarmupCosineLR:
    def __init__(self, optimizer: Optimizer, base_lrs: list[float], num_epochs: int, warmup_epochs: int,
                 min_lr_ratio: float) -> None:
        self.optimizer = optimizer
        self.base_lrs = list(base_lrs)
        self.num_epochs = max(1, num_epochs)
        self.warmup_epochs = max(0, warmup_epochs)
        self.min_lr_ratio = min_lr_ratio

    def factor(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return (epoch + 1) / (self.warmup_epochs + 1)
        span = max(1, self.num_epochs - self.warmup_epochs)
        progress = min(1.0, (epoch - self.warmup_epochs) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def step(self, epoch: int) -> None:
        f = self.factor(epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f
