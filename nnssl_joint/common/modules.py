"""Looking through the wrappers nnU-Net puts around a network."""

from __future__ import annotations

from torch import nn


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel and ``torch.compile`` wrappers (in any nesting): its
    parameter and state-dict names carry no ``module.`` / ``_orig_mod.`` prefix."""
    module = network
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module
