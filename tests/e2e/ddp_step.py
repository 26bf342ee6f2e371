"""One JointSSLPretrainTrainer.train_step on a fixed global batch, in WORLD processes (gloo on CPU).

Usage: python ddp_step.py WORLD OUT.json   (nnU-Net env vars and NNSSL_JOINT_CONFIG set by the caller)
Each rank builds the trainer through nnU-Net's own get_trainer_from_args, initialises it under DDP,
takes its contiguous share of the global batch and runs the trainer's train_step, then draws one batch
from the trainer's own data loaders. Rank 0 writes the mean loss over ranks, a parameter checksum after
the step and the (2D, 3D) batch size each rank's loaders drew.
"""

import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def global_batch(channels: int, view: int, n_slices: int, b2: int, b3: int) -> dict:
    g = torch.Generator().manual_seed(1234)
    valid = torch.ones(b3, n_slices, dtype=torch.bool)
    mask = torch.zeros(b3, n_slices, dtype=torch.bool)
    mask[:, 1] = True
    return {
        "slices": {"global_views": torch.randn(b2, 2, channels, view, view, generator=g), "small_views": None,
                   "keys": [f"s{i}" for i in range(b2)]},
        # case numbers for the contrastive volume term: the middle two windows share a case across the ranks
        "volumes": {"views": torch.randn(b3, 2, channels, n_slices, view, view, generator=g), "valid": valid,
                    "mask": mask, "keys": [f"v{i}" for i in range(b3)],
                    "case": torch.tensor([0] + [1] * (b3 - 2) + [2])[:b3]},
    }


def shard(batch: dict, rank: int, world: int) -> dict:
    out = {}
    for part, d in batch.items():
        n = len(d["keys"])
        lo, hi = rank * n // world, (rank + 1) * n // world
        out[part] = {k: (v[lo:hi] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in d.items()}
    return out


def worker(rank: int, world: int, port: int, out_file: str) -> None:
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from nnunetv2.run.run_training import get_trainer_from_args

    torch.manual_seed(0)
    trainer = get_trainer_from_args("900", "joint_ssl", "all", "JointSSLPretrainTrainer", "nnsslJointPlans",
                                    device=torch.device("cpu"))
    trainer.initialize()
    cfg = trainer.ssl_config
    trainer.stage = cfg.objective.stage_at(0)
    view, n = trainer.resolved.view_size, trainer.resolved.n_slices
    batch = shard(global_batch(trainer.num_input_channels, view, n, 8, 4), rank, world)
    trainer.network.train()
    out = trainer.train_step(batch)
    # the trainer's own loaders (after the step, so that drawing does not change it): each rank's batch
    loader, _ = trainer.get_dataloaders()
    drawn = next(loader)
    drawn_sizes = (int(drawn["slices"]["global_views"].shape[0]), int(drawn["volumes"]["views"].shape[0]))
    losses, sizes = [None] * world, [None] * world
    if world > 1:
        dist.all_gather_object(losses, out["loss"])
        dist.all_gather_object(sizes, drawn_sizes)
    else:
        losses, sizes = [out["loss"]], [drawn_sizes]
    # gradients after DDP's all-reduce (and clipping), before the next zero_grad
    params = {k: p.grad.detach().double() for k, p in trainer.model.named_parameters() if p.grad is not None}
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump({"loss": sum(losses) / world, "per_rank": losses, "loader_batch_per_rank": sizes,
                       "terms": {k: out[k] for k in ("intra", "intra_3d", "inter", "mask",
                                                     "volume_contrast")},
                       "checksums": {k: float(v.sum()) for k, v in params.items()},
                       "abs": {k: float(v.abs().sum()) for k, v in params.items()}}, f)
    if world > 1:
        dist.barrier()  # both ranks done before the teardown (see tests/ssl/test_centering_ddp.py)
        dist.destroy_process_group()


if __name__ == "__main__":
    world, out_file = int(sys.argv[1]), sys.argv[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if world == 1:
        worker(0, 1, port, out_file)
    else:
        mp.spawn(worker, args=(world, port, out_file), nprocs=world, join=True)
