"""A longer pretraining run (slow-marked): the total loss at the end is lower than at the start, and
every term stays finite. Run with: bash scripts/test.sh -m slow"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_total_loss_decreases_over_a_longer_run(tmp_path):
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "res"), nnUNet_def_n_proc="1",
               nnUNet_extTrainer=str(Path(__file__).resolve().parents[2] / "trainers"))
    env.pop("nnUNet_n_proc_DA", None)

    def run(cmd, e):
        res = subprocess.run(cmd, env=e, cwd=tmp_path, capture_output=True, text=True, check=False,
                             timeout=1800)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    run([str(BIN / "nnssl_joint"), "make-synthetic", "--n-3d", "6", "--n-2d", "12", "--n-train", "1",
         "--n-test", "1", "--shape-3d", "24,48,48", "--shape-2d", "48,48"], env)
    run([str(BIN / "nnssl_joint"), "prepare", "-d", "501", "502", "-o", "900", "--name", "Learn"], env)
    run([str(BIN / "nnssl_joint"), "plan_and_preprocess", "-d", "900", "-np", "1", "-npfp", "1"], env)
    (tmp_path / "cfg.json").write_text(json.dumps({"optim": {"num_epochs": 10, "iterations_per_epoch": 8,
                                                             "warmup_epochs": 1}}))
    run([str(BIN / "nnUNetv2_train"), "900", "joint_ssl", "all", "-tr", "JointSSLPretrainTrainer", "-p",
         "nnsslJointPlans", "-device", "cpu"],
        dict(env, nnUNet_n_proc_DA="0", NNSSL_JOINT_CONFIG=str(tmp_path / "cfg.json")))
    ckpt = torch.load(tmp_path / "res" / "Dataset900_Learn"
                      / "JointSSLPretrainTrainer__nnsslJointPlans__joint_ssl" / "fold_all"
                      / "checkpoint_final.pth", weights_only=False)
    log = ckpt["logging"]
    total = np.array(log["train_losses"])
    assert len(total) == 10 and np.isfinite(total).all()
    for term in ("loss_intra", "loss_intra_3d", "loss_inter", "loss_mask"):
        assert np.isfinite(log[term]).all(), term
    # mean of the last two epochs below the mean of the first two
    assert total[-2:].mean() < total[:2].mean(), total
