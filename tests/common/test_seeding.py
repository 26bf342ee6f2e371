import random

import numpy as np
import pytest
import torch

from nnssl_joint.common.seeding import capture_rng, restore_rng, seed_everything
from nnssl_joint.errors import NnsslJointError
from nnssl_joint.pretrain.config import PretrainConfig


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seed_setting_is_checked():
    assert PretrainConfig().seed == 0
    assert PretrainConfig.from_dict({"seed": None}).seed is None
    assert seed_everything(None) is None
    assert seed_everything(5, rank=2) == 7
    for bad in (-1, 1.5, "0", True):
        with pytest.raises(NnsslJointError, match="seed must be a non-negative integer or null"):
            seed_everything(bad)


def test_same_seed_same_draws_and_ranks_differ():
    seed_everything(3)
    first = draws()
    seed_everything(3)
    assert draws() == first
    seed_everything(3, rank=1)
    assert draws() != first


def test_captured_state_replays_every_stream():
    seed_everything(11)
    draws()
    state = capture_rng()
    expected = draws()
    draws()
    restore_rng(state)
    assert draws() == expected
