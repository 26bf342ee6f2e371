"""Benchmark: pretraining throughput (slices/s, volumes/s) and peak RSS of JointSSLPretrainTrainer at
the default (self-configured) CPU settings, on generated data, through the real nnU-Net command line.
Prints JSON. Everything lives in a temporary folder (or --work).

    python scripts/bench_pretrain.py [--epochs 2] [--iterations 10] [--n-3d 8] [--n-2d 16]
        [--shape-3d 32,64,64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict) -> str:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout + res.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--n-3d", type=int, default=8)
    ap.add_argument("--n-2d", type=int, default=16)
    ap.add_argument("--shape-3d", default="32,64,64")
    ap.add_argument("--shape-2d", default="64,64")
    ap.add_argument("--da-processes", type=int, default=0, help="nnUNet_n_proc_DA for training")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="nnssl_bench_"))
    env = dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "pre"),
               nnUNet_results=str(work / "res"), nnUNet_extTrainer=str(REPO / "trainers"),
               nnUNet_def_n_proc="1")
    env.pop("nnUNet_n_proc_DA", None)
    t0 = time.perf_counter()
    if not (work / "pre" / "Dataset900_Bench" / "nnsslJointPlans.json").is_file():
        run([str(BIN / "nnssl_joint"), "make-synthetic", "--n-3d", str(args.n_3d), "--n-2d", str(args.n_2d),
             "--n-train", "2", "--n-test", "1", "--shape-3d", args.shape_3d, "--shape-2d", args.shape_2d],
            env)
        run([str(BIN / "nnssl_joint"), "prepare", "-d", "501", "502", "-o", "900", "--name", "Bench"], env)
        run([str(BIN / "nnssl_joint"), "plan_and_preprocess", "-d", "900", "-np", "1", "-npfp", "1"], env)
    prep_s = time.perf_counter() - t0
    cfg = work / "cfg.json"
    cfg.write_text(json.dumps({"optim": {"num_epochs": args.epochs,
                                         "iterations_per_epoch": args.iterations}}))
    train_env = dict(env, NNSSL_JOINT_CONFIG=str(cfg), nnUNet_n_proc_DA=str(args.da_processes))
    t0 = time.perf_counter()
    log = run([str(BIN / "nnUNetv2_train"), "900", "joint_ssl", "all", "-tr", "JointSSLPretrainTrainer", "-p",
               "nnsslJointPlans", "-device", "cpu"], train_env)
    train_s = time.perf_counter() - t0
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    slices = [float(v) for v in re.findall(r"throughput: ([0-9.]+) slices/s", log)]
    volumes = [float(v) for v in re.findall(r", ([0-9.]+) volumes/s", log)]
    configured = re.search(r"self-configured: (.*)", log)
    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}",
        "settings": configured.group(1) if configured else None,
        "epochs": args.epochs, "iterations_per_epoch": args.iterations, "da_processes": args.da_processes,
        "slices_per_s_per_epoch": slices, "volumes_per_s_per_epoch": volumes,
        "slices_per_s_last_epoch": slices[-1] if slices else None,
        "peak_rss_mb_of_largest_child": round(peak_rss_mb, 1),
        "train_wall_s": round(train_s, 1), "data_prep_wall_s": round(prep_s, 1), "work": str(work),
    }, indent=2))


if __name__ == "__main__":
    main()
