"""Seeding and capturing the random streams of Python, NumPy and torch (pretraining and fine-tuning)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from nnssl_joint.errors import NnsslJointError


def seed_everything(seed: Any, rank: int = 0) -> int | None:
    """Seed Python, NumPy and torch (all devices) with ``seed + rank``; ``None`` leaves them alone.

    Ranks get different seeds so that their loaders draw different batches; DDP copies rank 0's
    initial weights to the others. Returns the seed used."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise NnsslJointError(f"seed must be a non-negative integer or null (no seeding), got {seed!r}; fix "
                              "'seed' in the configuration file (NNSSL_JOINT_CONFIG or "
                              "NNSSL_JOINT_FINETUNE_CONFIG)")
    value = (seed + rank) % 2**32
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    return value


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if torch.is_tensor(state["torch"]) else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
