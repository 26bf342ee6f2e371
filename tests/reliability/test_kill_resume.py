"""kill -9 of a pretraining run at different moments (during a step, at an epoch end, while a
checkpoint is being written, after the final checkpoint): no checkpoint is ever half-written, leftover
temporary files are never read and are removed by the next run, and ``--c`` resumes from the last
complete checkpoint with the saved model, optimizer, prototypes, queues and RNG, so that the resumed
run reproduces the uninterrupted reference run bit for bit (losses of every iteration, final weights)."""

from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from reliability_helpers import (
    BASE_ID,
    PLANS,
    TRAINER,
    Workspace,
    assert_same_tensors,
    load,
    nnunet_env,
    read_losses,
    train_cli,
    train_command,
    write_config,
)


def expected_resume_file(run_dir: Path) -> Path | None:
    """nnU-Net's --c takes checkpoint_final, else checkpoint_latest, else checkpoint_best; the trainer then
    prefers checkpoint_best over checkpoint_latest when it is newer."""
    if (run_dir / "checkpoint_final.pth").is_file():
        return run_dir / "checkpoint_final.pth"
    found = [run_dir / n for n in ("checkpoint_latest.pth", "checkpoint_best.pth") if (run_dir / n).is_file()]
    return max(found, key=lambda p: (load(p)["current_epoch"], load(p)["nnssl_joint"]["iteration"]),
               default=None)


#: printed by on_train_start after losses.tsv was cut back to the resume point
RUN_START = r"JointSSLPretrainTrainer: preset"
NO_CHECKPOINT = "no checkpoint"


@dataclass
class KillAt:
    """When to send SIGKILL: armed at the ``occurrence``-th stdout line matching ``line`` (at once without
    one), then at the first moment when a file matching the glob ``temp_file`` exists in the run folder, or
    losses.tsv holds ``rows`` iterations (the loss of an iteration is written before its backward pass, so
    the kill lands inside a step however fast the machine is), or right away if neither is given."""

    what: str
    line: str | None = None
    occurrence: int = 1
    temp_file: str | None = None
    rows: int | None = None
    resumes_from: str | None = None  # the checkpoint the next --c must pick (NO_CHECKPOINT: none)


def _rows(run_dir: Path) -> int:
    try:
        return (run_dir / "losses.tsv").read_bytes().count(b"\n") - 1
    except FileNotFoundError:
        return 0


def run_and_kill(ws: Workspace, config: Path, run_dir: Path, kill: KillAt, resume: bool) -> str:
    env = ws.env(NNSSL_JOINT_CONFIG=str(config), nnUNet_n_proc_DA="0")
    proc = subprocess.Popen(train_command(BASE_ID, resume), env=env, cwd=ws.res, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    log, seen = [], 0
    armed = kill.line is None
    # what an earlier kill left behind is no trigger: only a write of this run is
    old_temp = set(run_dir.glob(kill.temp_file)) if kill.temp_file and run_dir.is_dir() else set()
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        while not lines.empty():
            log.append(lines.get())
            if not armed and re.search(kill.line, log[-1]):
                seen += 1
                armed = seen == kill.occurrence
        if armed and (bool(set(run_dir.glob(kill.temp_file)) - old_temp) if kill.temp_file else
                      _rows(run_dir) >= kill.rows if kill.rows else True):
            proc.kill()  # SIGKILL
            proc.wait()
            while not lines.empty():
                log.append(lines.get())
            return "".join(log)
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    raise AssertionError(f"the run ended (rc {proc.returncode}) before the kill "
                         f"'{kill.what}':\n{''.join(log)[-3000:]}")


def assert_no_half_written_checkpoint(run_dir: Path) -> dict[str, dict]:
    complete = {}
    for path in sorted(run_dir.glob("*.pth")):
        ckpt = load(path)  # a truncated file raises here
        assert "network_weights" in ckpt, path
        complete[path.name] = ckpt
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".pth") and p.name.startswith(".")]
    return complete


def stale_temp_files(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir() if p.name.endswith(".tmp") or ".tmp." in p.name}


def assert_trainer_restores_exactly(ws: Workspace, config: Path, checkpoint: Path) -> None:
    """What --c does (nnU-Net's get_trainer_from_args + load_checkpoint), in this process: every tensor of
    the model (prototypes and queues included), the optimizer, counters and RNG equal the file's."""
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnssl_joint.common.seeding import capture_rng, restore_rng

    saved_rng = capture_rng()
    try:
        with nnunet_env(ws, NNSSL_JOINT_CONFIG=str(config), nnUNet_n_proc_DA="0"):
            trainer = get_trainer_from_args(str(BASE_ID), "joint_ssl", "all", TRAINER, PLANS,
                                            device=torch.device("cpu"))
            trainer.load_checkpoint(str(checkpoint))
            rng = capture_rng()
        ckpt = load(checkpoint)
        state = trainer.network.state_dict()
        # the defaults' state beyond the weights: prototypes, volume-term queue, momentum key network
        assert any(".prototypes." in k for k in state) and any(".queue." in k for k in state)
        assert any(k.startswith("volume_key_network.") for k in state)
        assert_same_tensors(state, ckpt["network_weights"], "network")
        opt, saved = trainer.optimizer.state_dict(), ckpt["optimizer_state"]
        assert opt["param_groups"] == saved["param_groups"] and opt["state"].keys() == saved["state"].keys()
        for i in opt["state"]:
            assert_same_tensors(opt["state"][i], saved["state"][i], f"optimizer state {i}")
        meta = ckpt["nnssl_joint"]
        assert trainer.iteration == meta["iteration"] and trainer.current_epoch == ckpt["current_epoch"]
        assert torch.equal(rng["torch"], meta["rng"]["torch"])
        assert np.array_equal(rng["numpy"][1], meta["rng"]["numpy"][1]) \
            and rng["numpy"][2] == meta["rng"]["numpy"][2]
        assert rng["python"] == meta["rng"]["python"]
    finally:
        restore_rng(saved_rng)


def kill_chain(base: dict, reference: dict, tmp_path: Path, kills: list[KillAt], save_every: int = 1) -> None:
    """Kill a run at each moment in turn, resuming with --c in between, then let it finish: it must end
    exactly where the uninterrupted reference run (same seed, save_every 1) ended."""
    ws = Workspace.create(tmp_path, raw=base["ws"].raw, pre=base["ws"].pre)
    run_dir = ws.run_dir(base["dataset"])
    config = json.loads(reference["config"].read_text())
    config["optim"]["save_every"] = save_every  # writes no RNG: the run must still equal the reference
    config = write_config(tmp_path / "kill.json", config)
    expected_start, previous_temp, left_temp = None, set(), False
    for i, kill in enumerate(kills):
        log = run_and_kill(ws, config, run_dir, kill, resume=i > 0)
        if expected_start:
            assert expected_start in log, f"before '{kill.what}': expected '{expected_start}'\n{log[-3000:]}"
        assert not previous_temp & stale_temp_files(run_dir), \
            "temporary files of the previous kill not removed"
        assert_no_half_written_checkpoint(run_dir)
        previous_temp = stale_temp_files(run_dir)
        left_temp |= any(".checkpoint_" in name for name in previous_temp)
        resume_from = expected_resume_file(run_dir)
        if kill.resumes_from:
            assert (resume_from.name if resume_from else NO_CHECKPOINT) == kill.resumes_from, \
                f"after '{kill.what}' --c should resume from {kill.resumes_from}, not {resume_from}"
        print(f"kill {i + 1} ({kill.what}): checkpoints {sorted(p.name for p in run_dir.glob('*.pth'))}, "
              f"temporary files {sorted(previous_temp)}, --c resumes from {resume_from and resume_from.name}")
        if resume_from is None:
            expected_start = "Cannot continue training because there seems to be no checkpoint"
        else:
            assert_trainer_restores_exactly(ws, config, resume_from)
            meta = load(resume_from)
            expected_start = (f"resumed from epoch {meta['current_epoch']}, "
                              f"iteration {meta['nnssl_joint']['iteration']}")
            if resume_from.name == "checkpoint_best.pth" and (run_dir / "checkpoint_latest.pth").is_file():
                expected_start = "checkpoint_best.pth is newer than checkpoint_latest.pth: resuming from it"
    if any(k.temp_file and "checkpoint" in k.temp_file for k in kills):
        assert left_temp, "no kill hit a checkpoint write (the temporary file was already renamed)"

    res = train_cli(ws, BASE_ID, config, resume=True)
    assert expected_start in res.stdout
    if previous_temp:
        assert "removed temporary files of an interrupted run" in res.stdout
    assert stale_temp_files(run_dir) == set()
    ref_dir = reference["run_dir"]
    assert read_losses(run_dir) == read_losses(ref_dir)
    assert len(read_losses(run_dir)) == 20
    final, ref_final = load(run_dir / "checkpoint_final.pth"), load(ref_dir / "checkpoint_final.pth")
    assert_same_tensors(final["network_weights"], ref_final["network_weights"], "final weights vs reference")
    for i in ref_final["optimizer_state"]["state"]:
        assert_same_tensors(final["optimizer_state"]["state"][i], ref_final["optimizer_state"]["state"][i],
                            f"final optimizer state {i} vs reference")
    assert final["nnssl_joint"]["iteration"] == 20 and final["current_epoch"] == 4
    for name in ("pretrained_for_2d.pth", "pretrained_for_3d_fullres.pth"):
        assert_same_tensors(load(run_dir / name)["network_weights"], load(ref_dir / name)["network_weights"],
                            name)


def test_kills_during_a_checkpoint_write_and_a_step_resume_identically(base, reference, tmp_path):
    """save_every 2: checkpoint_latest is written after epoch 1 only (epoch 3 is the last), checkpoint_best
    after every epoch whose loss improved."""
    kill_chain(base, reference, tmp_path, save_every=2, kills=[
        KillAt("while writing the first checkpoint_latest (end of epoch 1)",
               temp_file=".checkpoint_latest.pth.*.tmp", resumes_from="checkpoint_best.pth"),
        KillAt("inside a step of epoch 3, checkpoint_best (epoch 2) newer than checkpoint_latest (epoch 1)",
               line=RUN_START, rows=17, resumes_from="checkpoint_best.pth"),
    ])


def test_seven_kills_at_different_moments_resume_identically(base, reference, tmp_path):
    kill_chain(base, reference, tmp_path, [
        KillAt("inside a step of epoch 0, no checkpoint yet", line=RUN_START, rows=2,
               resumes_from=NO_CHECKPOINT),
        KillAt("while writing the first checkpoint", temp_file=".checkpoint_latest.pth.*.tmp",
               resumes_from=NO_CHECKPOINT),
        KillAt("inside a step of epoch 1", line=RUN_START, rows=8, resumes_from="checkpoint_latest.pth"),
        KillAt("while writing checkpoint_best", temp_file=".checkpoint_best.pth.*.tmp",
               resumes_from="checkpoint_latest.pth"),
        KillAt("at an epoch end, before its checkpoints", line=r"Epoch time"),
        KillAt("while writing checkpoint_final", temp_file=".checkpoint_final.pth.*.tmp"),
        KillAt("after the final checkpoint, before the downstream exports", line=r"Training done\.",
               resumes_from="checkpoint_final.pth"),
    ])


def test_losses_file_drops_rows_after_the_resume_point_and_half_written_lines(tmp_path):
    from nnssl_joint.pretrain.run_logging import IterationLossFile

    losses = IterationLossFile(tmp_path / "losses.tsv")
    for i in range(6):
        losses.append(i, i // 3, {"loss": 1.0 / (i + 1), "intra": 0.1 * i, "finite": i != 4})
    with open(losses.path, "a") as f:
        f.write("6\t2\t0.14")  # killed while writing
    rows = IterationLossFile.read(losses.path)[:6]
    assert [r["loss"] for r in rows] == [1.0 / (i + 1) for i in range(6)]  # exact round trip
    assert rows[1]["L_intra"] == 0.1 and rows[1]["L_mask"] is None and rows[4]["finite"] is False
    assert losses.restart_at(3) == 4
    assert IterationLossFile.read(losses.path) == rows[:3]
    assert losses.restart_at(0) == 3 and IterationLossFile.read(losses.path) == []


def test_losses_file_of_an_older_version_keeps_its_rows_on_resume(tmp_path):
    """A run written before the L_dense and L_volume_contrast columns existed resumes without losing its loss
    history."""
    from nnssl_joint.pretrain.run_logging import IterationLossFile

    old_columns = [c for c in IterationLossFile.COLUMNS if c not in ("L_dense", "L_volume_contrast")]
    fields = [["0", "0", "2.5", "1.5", "", "0.5", "0.5", "", "1"],
              ["1", "0", "2.25", "1.25", "", "0.5", "0.5", "", "1"],
              ["2", "0", "2.0", "1.0", "", "0.5", "0.5", "", "1"]]
    rows = ["\t".join(row) for row in fields]
    assert len(old_columns) == len(rows[0].split("\t"))
    path = tmp_path / "losses.tsv"
    path.write_text("\t".join(old_columns) + "\n" + "\n".join(rows) + "\n")
    losses = IterationLossFile(path)
    assert losses.restart_at(2) == 1
    read = IterationLossFile.read(path)
    assert [r["iteration"] for r in read] == [0, 1]
    assert [r["loss"] for r in read] == [2.5, 2.25] and read[1]["L_intra"] == 1.25
    assert read[0]["L_inter"] == 0.5 and read[0]["L_dense"] is None and read[0]["finite"] is True
    assert read[0]["L_volume_contrast"] is None
    assert path.read_text().splitlines()[0].split("\t") == list(IterationLossFile.COLUMNS)


def test_only_temporary_files_of_interrupted_writes_are_removed(tmp_path):
    from nnssl_joint.pretrain.runtime import remove_stale_temp_files

    stale = [".checkpoint_latest.pth.k3j_x9.tmp", ".checkpoint_final.pth.a1.tmp",
             ".pretrained_for_2d.pth.b2.tmp",
             ".losses.tsv.c3.tmp", ".nnssl_joint_config.json.d4.tmp", ".progress.png.tmp.png"]
    kept = ["checkpoint_latest.pth", "checkpoint_best.pth", "losses.tsv", ".notes.tmp", "my.pth.tmp",
            "training_log.txt"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
