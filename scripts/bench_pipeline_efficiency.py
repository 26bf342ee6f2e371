"""Benchmark: how much of a pretraining iteration is spent outside the networks (pipeline efficiency).

One process, the default self-configuration of ``JointSSLPretrainTrainer`` on generated data:

* ``real``: the trainer's own data loader (``nnUNet_n_proc_DA`` workers, nnU-Net's default unless
  ``--da-processes`` is given) and ``train_step``, as in training;
* ``premade``: the same ``train_step`` on one batch drawn once and reused (networks forward + backward +
  optimizer only, no data wait);

the two alternate iteration by iteration, so that a changing machine load affects both alike.

``efficiency = time per premade iteration / time per real iteration`` (1.0: the data pipeline costs
nothing). The breakdown of the real iterations: data wait, encoder (f_intra + g), f_inter, losses
(projection heads, Sinkhorn, queues, prototypes), the rest of the forward pass, backward + gradient
clipping, optimizer, per-iteration logging; plus the in-process cost of loading + augmenting one batch
(what the workers do). Prints JSON.

    python scripts/bench_pipeline_efficiency.py [--iterations 20] [--warmup 3] [--da-processes N]
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def prepare(work: Path, env: dict[str, str], n_3d: int, n_2d: int, shape_3d: str) -> None:
    if (work / "pre" / "Dataset900_Bench" / "nnsslJointPlans.json").is_file():
        return
    for cmd in (["make-synthetic", "--n-3d", str(n_3d), "--n-2d", str(n_2d), "--n-train", "2",
                 "--n-test", "1", "--shape-3d", shape_3d],
                ["prepare", "-d", "501", "502", "-o", "900", "--name", "Bench"],
                ["plan_and_preprocess", "-d", "900", "-np", "1", "-npfp", "1"]):
        res = subprocess.run([str(BIN / "nnssl_joint"), *cmd], env=env, capture_output=True, text=True,
                             check=False)
        if res.returncode != 0:
            sys.exit(f"nnssl_joint {' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")


class Timers:
    """Wall time per named part, accumulated over forward hooks and wrapped calls."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.total: dict[str, float] = defaultdict(float)
        self._start: dict[str, list[float]] = defaultdict(list)

    def begin(self, name: str) -> None:
        self.sync()
        self._start[name].append(time.perf_counter())

    def end(self, name: str) -> None:
        self.sync()
        self.total[name] += time.perf_counter() - self._start[name].pop()

    def hook(self, module, name: str) -> None:
        module.register_forward_pre_hook(lambda *_: self.begin(name))
        module.register_forward_hook(lambda *_: self.end(name))

    def wrap(self, owner, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            self.begin(name)
            try:
                return original(*args, **kwargs)
            finally:
                self.end(name)

        setattr(owner, attribute, timed)


def measure(args: argparse.Namespace) -> dict:
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    from nnssl_joint.pretrain import runtime

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    trainer = get_trainer_from_args("900", "joint_ssl", "all", "JointSSLPretrainTrainer", "nnsslJointPlans",
                                    device=device)
    trainer.initialize()
    trainer.stage = trainer.ssl_config.objective.stage_at(0)
    trainer.network.train()
    model = trainer.model
    timers = Timers(sync)
    timers.hook(model, "forward (all)")
    timers.hook(model.encoder, "encoder")
    timers.hook(model.slice_embedding, "encoder")  # g belongs to the slice embedding e = g(f_intra(x))
    timers.hook(model.slice_transformer, "f_inter")
    for name in ("intra_loss", "inter_loss", "projection_2d", "projection_3d"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            timers.hook(getattr(model, name), "losses (heads, Sinkhorn, queues)")
    timers.wrap(trainer.optimizer, "step", "optimizer")
    timers.wrap(trainer.loss_file, "append", "logging")

    loader, _ = trainer.get_dataloaders()
    premade = next(loader)
    for _ in range(args.warmup):
        trainer.train_step(next(loader))
        trainer.train_step(premade)
    # real and premade iterations alternate, so that a drifting machine load affects both alike
    totals: dict[str, dict[str, float]] = {"real": defaultdict(float), "premade": defaultdict(float)}
    steps: dict[str, list[float]] = {"real": [], "premade": []}
    for _ in range(args.iterations):
        for mode in ("real", "premade"):
            timers.total.clear()
            t0 = time.perf_counter()
            timers.begin("data wait")
            batch = next(loader) if mode == "real" else premade
            timers.end("data wait")
            timers.begin("train_step")
            trainer.train_step(batch)
            timers.end("train_step")
            steps[mode].append(time.perf_counter() - t0)
            for key, value in timers.total.items():
                totals[mode][key] += value
    parts, premade_parts = totals["real"], totals["premade"]
    real_steps, premade_steps = steps["real"], steps["premade"]
    if hasattr(loader, "_finish"):
        loader._finish()

    # what the augmentation workers do, measured in this process: load + crop + augment one batch
    in_process = runtime.build_joint_loader(trainer, trainer.resolved)
    next(in_process)
    t0 = time.perf_counter()
    for _ in range(args.iterations):
        next(in_process)
    load_augment_s = (time.perf_counter() - t0) / args.iterations

    n = args.iterations
    real_s, premade_s = statistics.mean(real_steps), statistics.mean(premade_steps)
    forward_other = parts["forward (all)"] - sum(parts.get(k, 0.0) for k in (
        "encoder", "f_inter", "losses (heads, Sinkhorn, queues)"))
    backward = (parts["train_step"] - parts["forward (all)"] - parts.get("optimizer", 0.0)
                - parts.get("logging", 0.0))
    breakdown = {
        "data wait": parts["data wait"], "encoder (f_intra + g)": parts.get("encoder", 0.0),
        "f_inter": parts.get("f_inter", 0.0), "losses (heads, Sinkhorn, queues)":
        parts.get("losses (heads, Sinkhorn, queues)", 0.0), "forward, other": forward_other,
        "backward + grad clip": backward, "optimizer": parts.get("optimizer", 0.0),
        "logging": parts.get("logging", 0.0),
    }
    total = sum(breakdown.values())
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
                   f"torch {torch.__version__}, device {device}",
        "settings": trainer.resolved.to_dict(),
        "da_processes": get_allowed_n_proc_DA(),
        "iterations": n, "warmup": args.warmup,
        "real_s_per_iteration": round(real_s, 4),
        "real_s_per_iteration_median": round(statistics.median(real_steps), 4),
        "premade_s_per_iteration_median": round(statistics.median(premade_steps), 4),
        "premade_s_per_iteration": round(premade_s, 4),
        "efficiency": round(premade_s / real_s, 3),
        "real_breakdown_s_per_iteration": {k: round(v / n, 4) for k, v in breakdown.items()},
        "real_breakdown_share": {k: round(v / total, 3) for k, v in breakdown.items()},
        "premade_train_step_s_per_iteration": round(premade_parts["train_step"] / n, 4),
        "load_and_augment_in_process_s_per_batch": round(load_augment_s, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None, help="folder for the generated data (default: a temporary one)")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--n-3d", type=int, default=8)
    ap.add_argument("--n-2d", type=int, default=16)
    ap.add_argument("--shape-3d", default="32,64,64")
    ap.add_argument("--da-processes", type=int, default=None,
                    help="nnUNet_n_proc_DA for the real loader (default: nnU-Net's default for this machine)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args()
    if args.iterations < 1 or args.warmup < 0:
        ap.error("--iterations must be >= 1 and --warmup >= 0")
    work = Path(args.work or tempfile.mkdtemp(prefix="nnssl_efficiency_"))
    env = dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "pre"),
               nnUNet_results=str(work / "res"), nnUNet_extTrainer=str(REPO / "trainers"),
               nnUNet_def_n_proc="1")
    env.pop("nnUNet_n_proc_DA", None)  # the real loader uses nnU-Net's default unless --da-processes
    prepare(work, env, args.n_3d, args.n_2d, args.shape_3d)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results",
                                           "nnUNet_extTrainer", "nnUNet_def_n_proc")})
    if args.da_processes is not None:
        os.environ["nnUNet_n_proc_DA"] = str(args.da_processes)
    result = measure(args)
    result["work"] = str(work)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
