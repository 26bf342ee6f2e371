import itertools

import pytest
import torch

from nnssl_joint.pretrain.schedule import WarmupCosineLR


def test_linear_warmup_then_cosine_down_to_the_floor():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, [2.0], num_epochs=12, warmup_epochs=2, min_lr_ratio=0.1)
    lrs = []
    for epoch in range(12):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:3] == pytest.approx([2 / 3, 4 / 3, 2.0])  # warm-up reaches the base lr
    assert all(a > b for a, b in itertools.pairwise(lrs[2:]))  # then decays monotonically
    assert lrs[7] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # half-way through the cosine
    sched.step(100)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)  # never below lr * min_lr_ratio
