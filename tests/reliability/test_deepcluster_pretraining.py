"""``objective.clustering: deepcluster`` through the trainer (nnU-Net's run_training, in this process, on
the shared tiny dataset): the first epoch fills the memory banks while only L_mask trains, k-means runs at
the start of every later epoch and changes the pseudo-labels, the DeepCluster terms then fall, and a run
resumed from a checkpoint continues bit for bit (banks, centroids, labels and k-means counters are in the
checkpoint)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_helpers import (
    BASE_ID,
    PLANS,
    REFERENCE_CONFIG,
    TRAINER,
    Workspace,
    assert_same_tensors,
    load,
    nnunet_env,
    read_losses,
    train_in_process,
    write_config,
)

CONFIG = {**REFERENCE_CONFIG, "objective": {"clustering": "deepcluster"}}
DC_TERMS = ("L_intra", "L_intra_3d", "L_inter")


@pytest.fixture(scope="module")
def dc_run(base: dict, module_tmp_path: Path) -> dict:
    root = module_tmp_path / "deepcluster"
    root.mkdir()
    ws = Workspace.create(root, raw=base["ws"].raw, pre=base["ws"].pre)
    config = write_config(root / "dc.json", CONFIG)
    log = train_in_process(ws, BASE_ID, config)
    return {"ws": ws, "config": config, "run_dir": ws.run_dir(base["dataset"]), "log": log}


def test_first_epoch_fills_the_banks_then_kmeans_every_epoch_and_the_terms_fall(dc_run):
    rows = read_losses(dc_run["run_dir"])
    assert [r["epoch"] for r in rows] == [i // 5 for i in range(20)] and all(r["finite"] for r in rows)
    for r in rows[:5]:  # before the first k-means the DeepCluster terms are 0; L_mask trains
        assert all(r[t] == 0.0 for t in DC_TERMS) and r["L_mask"] > 0
    assert all(r["L_intra"] > 0 and r["L_intra_3d"] > 0 for r in rows[5:])
    log = dc_run["log"]
    assert "DeepCluster-v2: memory banks of 34 slices and 21 windows" in log
    nmi_2d = [float(m) for m in re.findall(r"k-means #\d+ on \d+ slices .*NMI to the previous pseudo-labels "
                                           r"([0-9.]+)", log)]
    assert len(re.findall(r"k-means #\d+ on \d+ slices", log)) == 3 and len(nmi_2d) == 2
    assert all(v < 0.99 for v in nmi_2d)  # the pseudo-labels change from epoch to epoch

    def two_d(epoch: int) -> float:
        return float(np.mean([r["L_intra"] + r["L_intra_3d"] for r in rows if r["epoch"] == epoch]))

    assert two_d(3) < two_d(1), [two_d(e) for e in (1, 2, 3)]

    final = load(dc_run["run_dir"] / "checkpoint_final.pth")
    weights = final["network_weights"]
    assert int(weights["intra_loss.num_recomputes"]) == 3 and int(weights["inter_loss.num_recomputes"]) == 3
    assert int(weights["slice_bank.filled"].sum()) == 34  # every slice of the dataset was seen
    assert int((weights["intra_loss.assignments"] >= 0).sum()) == 3 * 34  # 3 heads
    record = final["nnssl_joint"]
    assert record["config"]["objective"]["clustering"] == "deepcluster"
    assert sum(record["sample_index"]["slices_per_case"].values()) == 34
    # entropy monitor: NaN before the first k-means, the centroids' usage afterwards
    entropy = final["logging"]["entropy_2d"]
    assert np.isnan(entropy[0]) and all(0 <= v <= 1 for v in entropy[1:])


def test_the_checkpoint_rebuilds_the_network_and_the_diagnostics_read_the_centroids(dc_run):
    from nnssl_joint.pretrain.checkpoint import load_pretraining_model

    model, record = load_pretraining_model(dc_run["run_dir"] / "checkpoint_final.pth")
    assert model.deepcluster and model.slice_bank.size == 34 and model.window_bank.size == 21
    k2 = int(record["resolved"]["num_prototypes_2d"])
    scores = model.intra_loss.prototypes(torch.nn.functional.normalize(torch.randn(5, model.slice_bank.dim)))
    assert scores.shape == (5, k2)


def test_resume_from_a_checkpoint_continues_bit_for_bit(base, dc_run, tmp_path):
    from nnunetv2.run.run_training import run_training

    from nnssl_joint.common.seeding import capture_rng, restore_rng

    ws = Workspace.create(tmp_path, raw=base["ws"].raw, pre=base["ws"].pre)
    run_dir = ws.run_dir(base["dataset"])
    shutil.copytree(dc_run["run_dir"], run_dir)
    for name in ("checkpoint_final.pth", "pretrained_for_2d.pth", "pretrained_for_3d_fullres.pth"):
        (run_dir / name).unlink()
    # nnU-Net deleted checkpoint_latest at the end; the best one is epoch 0's (the DeepCluster terms are 0
    # there): the resumed run clusters the bank it restores at the start of epoch 1, then trains 3 epochs
    best = load(run_dir / "checkpoint_best.pth")
    assert not (run_dir / "checkpoint_latest.pth").exists() and best["current_epoch"] == 1
    assert int(best["network_weights"]["slice_bank.filled"].sum()) > 0
    assert int(best["network_weights"]["intra_loss.num_recomputes"]) == 0
    rng = capture_rng()
    try:
        with nnunet_env(ws, NNSSL_JOINT_CONFIG=str(dc_run["config"]), nnUNet_n_proc_DA="0"):
            run_training(str(BASE_ID), "joint_ssl", "all", TRAINER, PLANS, continue_training=True,
                         device=torch.device("cpu"))
    finally:
        restore_rng(rng)
    assert read_losses(run_dir) == read_losses(dc_run["run_dir"])
    assert_same_tensors(load(run_dir / "checkpoint_final.pth")["network_weights"],
                        load(dc_run["run_dir"] / "checkpoint_final.pth")["network_weights"], "final weights")


def test_resuming_with_the_other_clustering_or_other_data_is_refused(dc_run):
    from nnssl_joint.data.loaders import SampleIndex
    from nnssl_joint.errors import NnsslJointError
    from nnssl_joint.pretrain import runtime

    checkpoint = load(dc_run["run_dir"] / "checkpoint_final.pth")
    record = checkpoint["nnssl_joint"]
    swav = {**record, "config": {**record["config"], "objective": {**record["config"]["objective"],
                                                                   "clustering": "swav"}}}
    with pytest.raises(NnsslJointError, match="objective.clustering='deepcluster'.*'swav'"):
        runtime.check_resume_compatible(checkpoint, swav)
    index = SampleIndex.from_dict(record["sample_index"])
    runtime.check_sample_index(record["sample_index"], index)
    changed = dict(index.slices_per_case)
    changed[next(iter(changed))] += 1
    with pytest.raises(NnsslJointError, match="memory banks"):
        runtime.check_sample_index(record["sample_index"], SampleIndex(changed, index.n_slices))
