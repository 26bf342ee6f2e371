"""Small torch.distributed helpers shared by the clustering objectives.

Every collective here is a no-op wrapper around ``torch.distributed`` that keeps the losses
testable in a single process: callers decide once with :func:`use_distributed` and pass the
boolean down.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def distributed_ready() -> bool:
    """True when torch.distributed is available, initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def use_distributed(distributed: bool | None) -> bool:
    """Resolve a ``distributed`` argument: ``None`` means auto (:func:`distributed_ready`).

    ``True`` requires an initialised process group; a world of one rank is accepted and behaves
    like a single process.
    """
    if distributed is None:
        return distributed_ready()
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed=True but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first or pass distributed=None (auto) / False."
        )
    return bool(distributed)


def world_size_and_rank(distributed: bool) -> tuple[int, int]:
    """(world size, rank), or (1, 0) when not distributed."""
    if not distributed:
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


def all_reduce_(tensor: Tensor, op: str, distributed: bool) -> Tensor:
    """In-place all-reduce with ``op`` in {"sum", "max"}; returns ``tensor`` for chaining."""
    if distributed:
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        dist.all_reduce(tensor, op=reduce_op)
    return tensor


def rank_sizes(local_size: int, device: torch.device, distributed: bool) -> list[int]:
    """Leading sizes of every rank's local tensor, in rank order."""
    if not distributed:
        return [local_size]
    world_size = dist.get_world_size()
    size = torch.tensor([local_size], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def all_gather_cat(tensor: Tensor, distributed: bool, sizes: list[int] | None = None) -> Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0 in rank order.

    Ranks may hold different leading sizes (including zero): tensors are padded to the largest
    size for the collective and cut back afterwards. Not differentiable. ``sizes``, every rank's
    leading size from :func:`rank_sizes`, saves that collective when the caller already has it
    (several gathers of tensors with the same leading size).
    """
    if not distributed:
        return tensor
    if sizes is None:
        sizes = rank_sizes(tensor.shape[0], tensor.device, distributed)
    elif len(sizes) != dist.get_world_size() or sizes[dist.get_rank()] != tensor.shape[0]:
        raise ValueError(f"all_gather_cat: sizes {sizes} do not fit this rank's leading size "
                         f"{tensor.shape[0]} in a world of {dist.get_world_size()}.")
    largest = max(sizes)
    padded = tensor.new_zeros((largest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(gathered, sizes)], dim=0)
