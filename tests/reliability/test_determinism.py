"""Determinism on the CPU: the configuration's ``seed`` makes a single-process run (nnUNet_n_proc_DA=0)
repeat exactly; ``losses.tsv`` in the run folder holds the loss of every iteration."""

from __future__ import annotations

import json
import math

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
    train_cli,
    write_config,
)


def test_same_seed_gives_the_same_first_20_losses_and_weights(base, reference, tmp_path):
    ws = Workspace.create(tmp_path, raw=base["ws"].raw, pre=base["ws"].pre)
    train_cli(ws, BASE_ID, reference["config"])
    run_dir = ws.run_dir(base["dataset"])
    first, second = read_losses(reference["run_dir"]), read_losses(run_dir)
    assert [r["iteration"] for r in first] == list(range(20))
    assert [r["epoch"] for r in first] == [i // 5 for i in range(20)]
    assert all(r["finite"] and math.isfinite(r["loss"]) and r["L_inter"] is not None for r in first)
    assert len({r["loss"] for r in first}) == 20  # the values move: equality below is not trivial
    assert second == first
    assert_same_tensors(load(run_dir / "checkpoint_final.pth")["network_weights"],
                        load(reference["run_dir"] / "checkpoint_final.pth")["network_weights"],
                        "final weights")
    assert "seed 0" in reference["log"]


def test_another_seed_gives_other_losses(base, reference, tmp_path):
    ws = Workspace.create(tmp_path, raw=base["ws"].raw, pre=base["ws"].pre)
    config = json.loads(json.dumps(REFERENCE_CONFIG))
    config["seed"] = 1
    config["optim"].update(num_epochs=1, iterations_per_epoch=2)  # iteration 0 comes before any update
    res = train_cli(ws, BASE_ID, write_config(tmp_path / "seed1.json", config))
    assert "seed 1" in res.stdout
    other = read_losses(ws.run_dir(base["dataset"]))
    assert len(other) == 2 and other[0]["loss"] != read_losses(reference["run_dir"])[0]["loss"]
    saved = load(ws.run_dir(base["dataset"]) / "checkpoint_final.pth")["nnssl_joint"]["config"]
    assert saved["seed"] == 1


def test_augmentation_workers_get_distinct_seeds_from_the_run_seed(base, reference):
    """nnUNet_n_proc_DA > 0: batchgenerators seeds only what it is given; without seeds, forked workers
    would share the parent's torch RNG state and draw the same torch random numbers."""
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnssl_joint.common.seeding import capture_rng, restore_rng

    saved = capture_rng()
    seeds = []
    try:
        with nnunet_env(reference["ws"], NNSSL_JOINT_CONFIG=str(reference["config"]), nnUNet_n_proc_DA="2"):
            for _ in range(2):
                trainer = get_trainer_from_args(str(BASE_ID), "joint_ssl", "all", TRAINER, PLANS,
                                                device=torch.device("cpu"))
                trainer.initialize()
                augmenter, _ = trainer.get_dataloaders()  # workers start at the first batch only
                seeds.append(augmenter.seeds)
    finally:
        restore_rng(saved)
    assert len(set(seeds[0])) == 2 and all(isinstance(s, int) for s in seeds[0])
    assert seeds[0] == seeds[1]  # drawn from the seeded RNG


def _two_runs(base, tmp_path, config: dict) -> list:
    """Train ``config`` twice, in fresh workspaces over the base data; the two run folders."""
    runs = []
    for name in ("a", "b"):
        ws = Workspace.create(tmp_path / name, raw=base["ws"].raw, pre=base["ws"].pre)
        train_cli(ws, BASE_ID, write_config(tmp_path / f"{name}.json", config))
        runs.append(ws.run_dir(base["dataset"]))
    return runs


def test_dense_term_runs_through_the_trainer_and_repeats_exactly(base, tmp_path):
    """objective.lambda_dense > 0: the loaders carry coordinate maps, L_dense is logged, the dense head is in
    the checkpoint, and two runs with one seed give the same losses and weights (the query cells are drawn
    with torch's generator, which the seed fixes)."""
    config = json.loads(json.dumps(REFERENCE_CONFIG))
    config["optim"].update(num_epochs=2, iterations_per_epoch=3)
    config["objective"] = {"lambda_dense": 1.0, "dense_stage": 1, "dense_queries": 64}
    runs = _two_runs(base, tmp_path, config)
    losses = read_losses(runs[0])
    assert len(losses) == 6 and all(r["L_dense"] is not None and math.isfinite(r["L_dense"]) for r in losses)
    assert all(r["L_dense"] > 0 for r in losses)
    assert read_losses(runs[1]) == losses
    checkpoint = load(runs[0] / "checkpoint_final.pth")
    assert any(k.startswith("dense_head.") for k in checkpoint["network_weights"])
    assert checkpoint["nnssl_joint"]["config"]["objective"]["lambda_dense"] == 1.0
    other = load(runs[1] / "checkpoint_final.pth")["network_weights"]
    assert_same_tensors(checkpoint["network_weights"], other, "final weights")


def test_volume_contrast_runs_through_the_trainer_and_repeats_exactly(base, tmp_path):
    """objective.lambda_volume_contrast > 0 with a momentum key network: the volume batches carry case
    numbers, L_volume_contrast is logged, its queue (with the case numbers) and the key network are in the
    checkpoint but not in the pretrained weights, and two runs with one seed give the same losses and
    weights."""
    config = json.loads(json.dumps(REFERENCE_CONFIG))
    config["optim"].update(num_epochs=2, iterations_per_epoch=3)
    config["objective"] = {"lambda_volume_contrast": 1.0, "volume_contrast_queue": 8,
                           "volume_contrast_momentum": 0.9}
    runs = _two_runs(base, tmp_path, config)
    losses = read_losses(runs[0])
    assert len(losses) == 6
    assert all(r["L_volume_contrast"] is not None and math.isfinite(r["L_volume_contrast"]) for r in losses)
    assert read_losses(runs[1]) == losses
    checkpoint = load(runs[0] / "checkpoint_final.pth")
    weights = checkpoint["network_weights"]
    assert int(weights["volume_contrast.queue.count"]) == 8  # 6 steps x 2 views x a step's windows, capped
    assert (weights["volume_contrast.queue.labels"] >= 0).all()
    key_network = {k for k in weights if k.startswith("volume_key_network.")}
    assert key_network and not any(k.startswith("volume_key_network.") for k in
                                   load(runs[0] / "pretrained_for_2d.pth")["network_weights"])
    assert checkpoint["nnssl_joint"]["config"]["objective"]["lambda_volume_contrast"] == 1.0
    assert_same_tensors(weights, load(runs[1] / "checkpoint_final.pth")["network_weights"], "final weights")
