"""Atomic checkpoint writing: a checkpoint is written to a temporary file in the same folder, flushed
to disk and renamed over the target, so a kill at any moment leaves either the previous complete
file or the new complete file, never a truncated one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def _atomic_write(filename: str | os.PathLike, mode: str, write: Callable[[IO], None]) -> None:
    target = Path(filename)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj: Any, filename: str | os.PathLike) -> None:
    _atomic_write(filename, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, filename: str | os.PathLike) -> None:
    _atomic_write(filename, "w", lambda f: f.write(text))


def save_nnunet_checkpoint(trainer: Any, module: torch.nn.Module, best_value: Any, filename: str,
                           extra: dict[str, Any] | None = None) -> None:
    """``nnUNetTrainer.save_checkpoint`` for plugin trainers: rank 0 only, honours
    ``disable_checkpointing``, writes atomically; ``extra`` adds keys to the checkpoint."""
    if trainer.local_rank != 0:
        return
    if trainer.disable_checkpointing:
        trainer.print_to_log_file("No checkpoint written, checkpointing is disabled")
        return
    atomic_torch_save({**nnunet_checkpoint(trainer, module, best_value), **(extra or {})}, filename)


def nnunet_checkpoint(trainer: Any, module: torch.nn.Module, best_value: Any) -> dict[str, Any]:
    """The content of an nnU-Net checkpoint (``nnUNetTrainer.save_checkpoint``) for ``trainer``."""
    return {
        "network_weights": module.state_dict(),
        "optimizer_state": trainer.optimizer.state_dict(),
        "grad_scaler_state": trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
        "logging": trainer.logger.get_checkpoint(),
        "_best_ema": best_value,
        "current_epoch": trainer.current_epoch + 1,
        "init_args": trainer.my_init_kwargs,
        "trainer_name": trainer.__class__.__name__,
        "inference_allowed_mirroring_axes": trainer.inference_allowed_mirroring_axes,
    }
