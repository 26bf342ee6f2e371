"""Benchmark: preprocessing time per case, through the real command lines, on generated data.

Measures, each as wall seconds and seconds per case (one subprocess each, so every figure includes
about 5-10 s of Python/nnU-Net start-up; more cases amortise it):

* ``nnssl_joint prepare`` (read every 2D/3D source case, check it, rewrite it as .nii.gz);
* ``nnssl_joint plan_and_preprocess`` of the merged pretraining dataset (fingerprint, plans, per-case
  normalisation and cropping into nnU-Net's preprocessed format);
* ``nnssl_joint plan_and_preprocess --downstream`` of the labeled 3D task (the plugin's 2d and
  3d_fullres configurations), next to
* stock ``nnUNetv2_plan_and_preprocess -c 2d 3d_fullres`` of the same labeled task (the baseline: same
  data, same process counts, same machine, one after the other).

Prints JSON. Everything lives in a temporary folder (or --work, which must be empty or absent).

    python scripts/bench_preprocess.py [--n-3d 16] [--n-2d 32] [--n-labeled 16] [--shape-3d 32,64,64] [--np 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return seconds


def entry(seconds: float, cases: int) -> dict:
    return {"wall_s": round(seconds, 2), "cases": cases, "s_per_case": round(seconds / max(1, cases), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None)
    ap.add_argument("--n-3d", type=int, default=16, help="unlabeled volumes")
    ap.add_argument("--n-2d", type=int, default=32, help="unlabeled 2D images")
    ap.add_argument("--n-labeled", type=int, default=16, help="labeled training cases of the 3D task")
    ap.add_argument("--shape-3d", default="32,64,64")
    ap.add_argument("--shape-2d", default="128,128")
    ap.add_argument("--np", type=int, default=2, help="-np and -npfp of every planning command")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="nnssl_bench_pre_"))
    if work.exists() and any(work.iterdir()):
        sys.exit(f"--work {work} is not empty; choose an empty or new folder")
    env = dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "pre"),
               nnUNet_results=str(work / "res"), nnUNet_def_n_proc=str(args.np))
    env.pop("nnUNet_n_proc_DA", None)  # nnU-Net's planning crashes with nnUNet_n_proc_DA=0
    plugin = [sys.executable, "-m", "nnssl_joint.cli"]
    nps = ["-np", str(args.np), "-npfp", str(args.np)]
    generate = timed(plugin + ["make-synthetic", "--n-3d", str(args.n_3d), "--n-2d", str(args.n_2d),
                               "--n-train", str(args.n_labeled), "--n-test", "1", "--shape-3d", args.shape_3d,
                               "--shape-2d", args.shape_2d], env)
    n_pool = args.n_3d + args.n_2d
    prepare = timed(plugin + ["prepare", "-d", "501", "502", "-o", "900", "--name", "Bench"], env)
    pretrain = timed(plugin + ["plan_and_preprocess", "-d", "900", *nps], env)
    downstream = timed(plugin + ["plan_and_preprocess", "-d", "503", "--downstream", *nps], env)
    # the baseline works on its own copy of the preprocessed root so that neither run sees the other's files
    stock_env = dict(env, nnUNet_preprocessed=str(work / "pre_stock"))
    stock = timed([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "503", "-c", "2d", "3d_fullres", *nps],
                  stock_env)
    startup = timed(plugin + ["--help"], env)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}",
        "load_average_at_end": list(os.getloadavg()),
        "data": {"volumes": args.n_3d, "images_2d": args.n_2d, "labeled_3d": args.n_labeled,
                 "shape_3d": args.shape_3d, "shape_2d": args.shape_2d, "processes": args.np},
        "generate_s": round(generate, 2),
        "prepare": entry(prepare, n_pool),
        "plan_and_preprocess_pretraining": entry(pretrain, n_pool),
        "plan_and_preprocess_downstream_2d_3d_fullres": entry(downstream, args.n_labeled),
        "stock_nnunet_plan_and_preprocess_2d_3d_fullres": entry(stock, args.n_labeled),
        "downstream_vs_stock": round(downstream / stock, 3),
        "plugin_cli_startup_s": round(startup, 2),
        "work": str(work),
    }
    print(json.dumps(result, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
