"""Multi-process / multi-node pretraining with torchrun.

nnU-Net's ``-num_gpus N`` spawns N processes on one machine (NCCL, CUDA only). For several machines,
or for CPU-only clusters (gloo), start the same trainer under torchrun:

    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 4 --master_addr HOST --master_port 29500 \\
        -m nnssl_joint.distributed_run 900 joint_ssl all -p nnsslJointPlans [--c] \\
        [-tr JointSSLPretrainTrainer]

Every process needs the same nnUNet_* variables, nnUNet_extTrainer and NNSSL_JOINT_CONFIG. The batch
sizes of the configuration are global and split over all processes; Sinkhorn codes, queues and k-means
are synchronised across processes.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset_name_or_id")
    ap.add_argument("configuration")
    ap.add_argument("fold")
    ap.add_argument("-tr", default="JointSSLPretrainTrainer")
    ap.add_argument("-p", default="nnsslJointPlans")
    ap.add_argument("--c", action="store_true", help="continue from the latest checkpoint")
    ap.add_argument("--backend", default=None, help="nccl (default with CUDA) or gloo (default without)")
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("nnssl_joint.distributed_run must be started by torchrun (RANK/WORLD_SIZE are not "
                         "set)")
    use_cuda = torch.cuda.is_available()
    backend = args.backend or ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    trainer = get_trainer_from_args(args.dataset_name_or_id, args.configuration, args.fold, args.tr, args.p,
                                    args.c, device=device)
    maybe_load_checkpoint(trainer, args.c, False, None)
    trainer.run_training()
    trainer.perform_actual_validation(False)
    # every rank waits for the others before the group is torn down: a rank that destroyed it while another
    # still had gloo work in flight was aborted at exit ("terminate called without an active exception",
    # SIGABRT after "Training done.", seen once in a CI run of the torchrun test)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
