import torch
from torch import nn

from nnssl_joint.common.modules import unwrap


class Compiled(nn.Module):
    """What torch.compile returns: the network under ``_orig_mod``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._orig_mod = module


def test_unwrap_looks_through_every_wrapper_in_any_nesting():
    net = nn.Sequential(nn.Linear(2, 2))
    assert unwrap(net) is net
    assert unwrap(nn.DataParallel(net)) is net
    assert unwrap(Compiled(net)) is net
    assert unwrap(nn.DataParallel(Compiled(net))) is net
    assert list(unwrap(Compiled(nn.DataParallel(net))).state_dict()) == ["0.weight", "0.bias"]
    assert isinstance(unwrap(Compiled(net))(torch.zeros(1, 2)), torch.Tensor)
