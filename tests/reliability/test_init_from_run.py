"""``init_from`` through ``nnUNetv2_train -tr JointSSLPretrainTrainer``: a fresh run starts from the file's
weights (at learning rate 0 its encoder ends exactly as the file's), and a run resumed with ``--c`` keeps its
own checkpoint and does not read the file again (it may be gone by then)."""

from __future__ import annotations

import shutil

import torch
from reliability_helpers import BASE_ID, REFERENCE_CONFIG, Workspace, load, train_cli, write_config


def _config(epochs: int, init_from: str) -> dict:
    return {**REFERENCE_CONFIG, "init_from": init_from,
            "optim": {**REFERENCE_CONFIG["optim"], "num_epochs": epochs, "iterations_per_epoch": 2,
                      "lr": 0.0}}


def test_a_fresh_run_starts_from_the_file_and_a_resumed_run_does_not_read_it_again(base, reference, tmp_path):
    source = tmp_path / "init.pth"
    shutil.copy(reference["run_dir"] / "checkpoint_final.pth", source)
    ws = Workspace.create(tmp_path, raw=base["ws"].raw, pre=base["ws"].pre)
    res = train_cli(ws, BASE_ID, write_config(tmp_path / "one.json", _config(1, str(source))))
    run_dir = ws.run_dir(base["dataset"])
    log = next(run_dir.glob("training_log_*.txt")).read_text()
    assert f"init_from {source}: " in log and " tensors loaded" in log, res.stdout[-2000:]

    expected = load(source)["network_weights"]
    final = load(run_dir / "checkpoint_final.pth")["network_weights"]
    encoder = [k for k in expected if k.startswith(("encoder.", "slice_embedding.", "slice_transformer."))]
    assert encoder and all(torch.equal(final[k], expected[k]) for k in encoder)
    # the control: the same run without init_from ends at its own draw, not at the file's weights
    control = Workspace.create(tmp_path / "control", raw=base["ws"].raw, pre=base["ws"].pre)
    own = {**_config(1, str(source)), "init_from": None}
    train_cli(control, BASE_ID, write_config(tmp_path / "own.json", own))
    drawn = load(control.run_dir(base["dataset"]) / "checkpoint_final.pth")["network_weights"]
    assert not any(torch.equal(drawn[k], expected[k]) for k in encoder if k.endswith("conv.weight"))

    source.unlink()  # --c resumes from the run's checkpoint; the file is not needed any more
    train_cli(ws, BASE_ID, write_config(tmp_path / "two.json", _config(2, str(source))), resume=True)
    logs = "".join(p.read_text() for p in run_dir.glob("training_log_*.txt"))
    assert logs.count("init_from ") == 1
    assert load(run_dir / "checkpoint_final.pth")["current_epoch"] == 2
