"""Numerical faults, provoked with corrupted preprocessed data (a copy of the shared dataset):
non-finite losses skip the step and name the batch's cases, a skipped step leaves no trace (the 3D
feature queue is not poisoned), N in a row stop the run with a clear message, and a collapse of the
prototype assignments is reported."""

from __future__ import annotations

import math
import re

import numpy as np
from reliability_helpers import (
    BASE_ID,
    REFERENCE_CONFIG,
    copy_preprocessed,
    load,
    read_losses,
    train_cli,
    write_config,
)

from nnssl_joint.pretrain.config import PAPER_OPTIM
from nnssl_joint.ssl.objective import PAPER_OBJECTIVE

BAD_CASE = "D501_vol2"  # the 12-slice volume


def _config(**changes) -> dict:
    config = {k: dict(v) for k, v in REFERENCE_CONFIG.items()}
    for section, values in changes.items():
        config.setdefault(section, {}).update(values)
    return config


def test_nan_steps_are_skipped_named_and_training_recovers(base, tmp_path):
    def one_nan_slice(case: str, data: np.ndarray) -> np.ndarray | None:
        if case != BAD_CASE:
            return None
        data[:, data.shape[1] // 2] = np.nan
        return data

    ws = copy_preprocessed(base["ws"], base["dataset"], tmp_path, one_nan_slice)
    # the 3D queue takes part from the first iteration: a NaN pushed into it would poison every later step.
    # L_inter's 3D SwAV queue is the paper's (none by default since the twenty-third pass); the contrastive
    # volume term's queue (a default) is run state the final check covers as well
    config = _config(optim={"num_epochs": 1, "iterations_per_epoch": 8, "max_consecutive_nonfinite": 8},
                     objective={"queue_start_iteration": 0,
                                "queue_length_3d": PAPER_OBJECTIVE["queue_length_3d"]})
    res = train_cli(ws, BASE_ID, write_config(tmp_path / "nan.json", config))
    rows = read_losses(ws.run_dir(base["dataset"]))
    assert len(rows) == 8
    flags = [r["finite"] for r in rows]
    assert not all(flags), "the NaN slice was never drawn; choose another seed"
    first_bad = flags.index(False)
    assert any(flags[first_bad + 1:]), f"no finite step after the first NaN step: {flags}"
    assert all(math.isfinite(r["loss"]) == r["finite"] for r in rows)
    warnings = re.findall(r"WARNING: non-finite loss nan .* at iteration (\d+); step skipped\. Cases: "
                          r"\[(.*)\]", res.stdout)
    assert [int(i) for i, _ in warnings] == [r["iteration"] for r in rows if not r["finite"]]
    assert all(f"'{BAD_CASE}'" in cases for _, cases in warnings)
    final = load(ws.run_dir(base["dataset"]) / "checkpoint_final.pth")
    weights = final["network_weights"]  # both queues are there, and finite with the rest
    assert any(k.startswith("inter_loss.queues.") for k in weights)
    assert "volume_contrast.queue.features" in weights
    assert all(bool(v.isfinite().all()) for v in weights.values() if v.is_floating_point())
    assert sum(final["logging"]["nonfinite_steps"]) == flags.count(False)
    assert all(math.isfinite(v) for v in final["logging"]["train_losses"])


def test_consecutive_nonfinite_losses_stop_the_run_with_a_clear_message(base, tmp_path):
    ws = copy_preprocessed(base["ws"], base["dataset"], tmp_path,
                           lambda case, data: np.full_like(data, np.nan))
    config = _config(optim={"max_consecutive_nonfinite": 3})
    res = train_cli(ws, BASE_ID, write_config(tmp_path / "allnan.json", config), expect_ok=False)
    assert res.returncode != 0
    assert len(re.findall(r"WARNING: non-finite loss nan .* step skipped\. Cases: \['D50", res.stdout)) == 3
    assert "3 non-finite losses in a row (limit optim.max_consecutive_nonfinite=3); stopping" in res.stderr
    assert "check the data of these cases" in res.stderr and "Last batch's cases: ['D50" in res.stderr
    run_dir = ws.run_dir(base["dataset"])
    assert [r["finite"] for r in read_losses(run_dir)] == [False] * 3
    assert not (run_dir / "checkpoint_final.pth").exists()


#: a deliberately collapsing 3D objective: the paper's (PAPER_OBJECTIVE: L_inter's whole gradient through
#: f_inter, no contrastive volume term, per-slice statistics) with the LayerNorm 3D head and Sinkhorn codes
#: over its 3D queue, which joins after the first epoch (the default before the running-statistics head): the
#: volume features share one dominant component, the stale queue rows take the other prototypes and every
#: window lands on one. Stated in full: the defaults since the twenty-third pass do not collapse (3D entropy
#: about 0.9)
COLLAPSING_OBJECTIVE = {**PAPER_OBJECTIVE, "head_norm_3d": "layer", "inter_codes": "sinkhorn",
                        "inter_code_standardization": False}
#: the paper's optimiser (one global clipping norm, one learning rate) and 2 volume windows per step, the
#: configuration of the collapse
COLLAPSING_OPTIM = dict(PAPER_OPTIM)
COLLAPSING_DATA = {"batch_size_3d": 2}


def test_prototype_collapse_is_detected_and_reported(base, tmp_path):
    """A deliberately collapsing configuration on the shared dataset (3 volumes for 2 3D prototypes): the 3D
    assignments collapse onto one prototype while the 2D ones stay spread. The log warns for exactly the
    epochs whose logged entropy is below the threshold with enough samples to judge, from the second epoch
    on."""
    from reliability_helpers import Workspace

    ws = Workspace.create(tmp_path, raw=base["ws"].raw, pre=base["ws"].pre)
    res = train_cli(ws, BASE_ID,
                    write_config(tmp_path / "collapse.json", _config(objective=COLLAPSING_OBJECTIVE,
                                                                     optim=COLLAPSING_OPTIM,
                                                                     data=COLLAPSING_DATA)),
                    timeout=900)
    ckpt = load(ws.run_dir(base["dataset"]) / "checkpoint_final.pth")
    logged, meta = ckpt["logging"], ckpt["nnssl_joint"]
    threshold = meta["config"]["optim"]["collapse_entropy_threshold"]
    expected, healthy = [], []
    for key in ("2d", "3d"):
        k = meta["resolved"][f"num_prototypes_{key}"]
        for epoch, (h, n) in enumerate(zip(logged[f"entropy_{key}"], logged[f"entropy_{key}_samples"])):
            if epoch >= 1 and n >= 4 * k:
                (expected if h < threshold else healthy).append((epoch, key))
    assert expected and healthy, ("the run needs collapsed and healthy epochs: "
                                  f"{ {k: logged[k] for k in logged if k.startswith('entropy_')} }, K: "
                                  f"{meta['resolved']['num_prototypes_2d']}, "
                                  f"{meta['resolved']['num_prototypes_3d']}")
    assert any(key == "3d" for _, key in expected), ("the deliberately collapsing 3D objective "
                                                     "did not collapse")
    reported, epoch = [], None
    for line in (res.stdout + res.stderr).splitlines():
        if m := re.search(r": Epoch (\d+)$", line):
            epoch = int(m.group(1))
        if m := re.search(r"WARNING: possible cluster collapse: entropy_(2d|3d) = ([0-9.]+) < ", line):
            reported.append((epoch, m.group(1)))
    assert sorted(reported) == sorted(expected)
