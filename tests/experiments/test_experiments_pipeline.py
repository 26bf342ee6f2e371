"""The resumable driver of the demo and the benchmark (nnssl_joint/experiments/pipeline.py), used directly
on tiny fake steps, folders and label arrays; nothing here starts nnU-Net.

(Named test_experiments_pipeline.py: tests/e2e/test_pipeline.py already holds the basename.)"""

from __future__ import annotations

import io
import json
import math
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.experiments import pipeline
from nnssl_joint.experiments.pipeline import Pipeline, Step, StepProgress


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class _CountingPipeline(Pipeline):
    """A pipeline whose ``state`` is one value that a step sets and a later step reads."""

    def __init__(self, out: Path, settings: dict | None = None) -> None:
        super().__init__(out, stream=io.StringIO())
        self.settings = settings or {}
        self.found: str | None = None

    def settings_record(self) -> dict:
        return dict(self.settings)

    def state(self) -> dict:
        return {"found": self.found}

    def restore(self, state: dict) -> None:
        self.found = state.get("found")


def _steps(p: _CountingPipeline, calls: list[str], fail: set[str]) -> list[Step]:
    """``discover`` sets the pipeline's state, ``middle`` fails when asked, ``report`` always runs."""

    def discover(progress: StepProgress) -> None:
        calls.append("discover")
        p.found = "value from discover"

    def make(key: str):
        def run(progress: StepProgress) -> dict:
            calls.append(key)
            if key in fail:
                raise RuntimeError(f"{key} broke")
            return {"key": key}

        return run

    return [Step("discover", "discover", discover), Step("middle", "middle", make("middle")),
            Step("report", "report", make("report"), always=True)]


# ----------------------------------------------------------------------------------------------------
# the driver: markers, retries, state, settings


def test_finished_steps_are_skipped_and_their_state_restored_a_failed_step_is_retried(tmp_path):
    calls: list[str] = []
    first = _CountingPipeline(tmp_path)
    with pytest.raises(RuntimeError, match="middle broke"):
        first.run_steps(_steps(first, calls, fail={"middle"}))
    assert calls == ["discover", "middle"]
    assert first.marker("discover").is_file()
    assert not first.marker("middle").exists()  # a failed step leaves no marker
    marker = json.loads(first.marker("discover").read_text())
    assert marker["state"] == {"found": "value from discover"} and marker["info"] == {}

    calls.clear()
    second = _CountingPipeline(tmp_path)
    second.run_steps(_steps(second, calls, fail=set()))
    assert calls == ["middle", "report"]  # discover skipped, middle retried, report ran
    assert second.found == "value from discover"  # restored from the skipped step's marker
    assert [(r.key, r.skipped) for r in second.records] == [("discover", True), ("middle", False),
                                                            ("report", False)]
    assert second.records[1].info == {"key": "middle"}
    assert "[1/3] discover: done in an earlier run" in second.stream.getvalue()

    calls.clear()
    third = _CountingPipeline(tmp_path)
    third.run_steps(_steps(third, calls, fail=set()))
    assert calls == ["report"]  # an ``always`` step runs every time, despite its marker
    assert not list(third.state_folder.glob("*.tmp"))


def _hold(pipe: Pipeline, key: str):
    """Take ``key``'s lock as another worker would (its own open file: flock conflicts between open files
    even inside one process)."""
    import fcntl

    handle = open(pipe.state_folder / f"{key}.lock", "a+")  # noqa: SIM115
    fcntl.flock(handle, fcntl.LOCK_EX)
    handle.write("process 4242 on another host")
    handle.flush()
    return handle


def _finish_elsewhere(pipe: Pipeline, key: str, handle) -> None:
    """The other worker finishes ``key``: its marker, then its lock released."""
    pipe.marker(key).write_text(json.dumps({"seconds": 60.0, "info": {}, "state": {"found": "elsewhere"}}))
    handle.close()


def _run_in_thread(pipe: Pipeline, steps: list[Step]):
    import threading

    errors: list[BaseException] = []

    def work() -> None:
        try:
            pipe.run_steps(steps)
        except BaseException as error:  # noqa: BLE001 (re-raised by the test)
            errors.append(error)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, errors


def _wait_until(condition, seconds: float = 20.0) -> None:
    import time

    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_a_worker_runs_what_does_not_need_a_step_another_worker_runs_then_comes_back_to_it(tmp_path):
    """Two workers on one folder: while the other holds ``pretrain``, this one runs the steps that do not
    need it (``scratch``), waits only when nothing else is left, then skips the finished ``pretrain`` and
    runs what needed it, in order; ``report`` (no ``needs``: every earlier step) comes last."""
    calls: list[str] = []
    pipe = _CountingPipeline(tmp_path)

    def make(key: str):
        return lambda progress: calls.append(key)

    steps = [Step("link", "link", make("link"), needs=()),
             Step("pretrain", "pretrain", make("pretrain"), needs=("link",)),
             Step("probe", "probe", make("probe"), needs=("pretrain",)),
             Step("scratch", "scratch", make("scratch"), needs=("link",), parallel=True),
             Step("joint", "joint", make("joint"), needs=("probe",), parallel=True),
             Step("report", "report", make("report"), always=True)]
    pipe.state_folder.mkdir(parents=True)
    held = _hold(pipe, "pretrain")
    thread, errors = _run_in_thread(pipe, steps)
    _wait_until(lambda: "waiting for process 4242" in pipe.stream.getvalue())
    assert calls == ["link", "scratch"] and thread.is_alive()  # nothing that needs the pretraining ran
    _finish_elsewhere(pipe, "pretrain", held)
    thread.join(timeout=20)
    assert not thread.is_alive() and not errors
    assert calls == ["link", "scratch", "probe", "joint", "report"]
    out = pipe.stream.getvalue()
    assert out.count("[2/6] pretrain: running in process 4242 on another host; going on with the steps that "
                     "do not need it") == 1
    assert "[2/6] pretrain: done in an earlier run" in out
    assert pipe.found == "elsewhere"  # the other worker's state, restored from its marker
    assert [r.key for r in pipe.records] == ["link", "scratch", "pretrain", "probe", "joint", "report"]


def test_without_needs_a_worker_waits_for_a_busy_step_at_once_and_keeps_the_order(tmp_path):
    """Steps that do not declare ``needs`` need every earlier step (the demo's): nothing can go ahead of a
    busy step, so the worker waits there as before and runs the rest in order."""
    calls: list[str] = []
    pipe = _CountingPipeline(tmp_path)
    steps = _steps(pipe, calls, fail=set())
    pipe.state_folder.mkdir(parents=True)
    held = _hold(pipe, "discover")
    thread, errors = _run_in_thread(pipe, steps)
    _wait_until(lambda: "[1/3] discover: waiting for process 4242" in pipe.stream.getvalue())
    assert calls == [] and thread.is_alive()
    _finish_elsewhere(pipe, "discover", held)
    thread.join(timeout=20)
    assert not thread.is_alive() and not errors
    assert calls == ["middle", "report"] and "going on" not in pipe.stream.getvalue()


def test_a_busy_step_put_off_twice_is_announced_once_and_a_failed_one_is_run_here(tmp_path):
    """Two busy steps with independent followers: each is put off; when the other worker stops without a
    marker (it failed), this worker takes the step over and runs it."""
    calls: list[str] = []
    pipe = _CountingPipeline(tmp_path)

    def make(key: str):
        return lambda progress: calls.append(key)

    steps = [Step("a", "a", make("a"), needs=()), Step("b", "b", make("b"), needs=()),
             Step("after_a", "after_a", make("after_a"), needs=("a",)),
             Step("free", "free", make("free"), needs=())]
    pipe.state_folder.mkdir(parents=True)
    held_a, held_b = _hold(pipe, "a"), _hold(pipe, "b")
    thread, errors = _run_in_thread(pipe, steps)
    _wait_until(lambda: "waiting for" in pipe.stream.getvalue())
    assert calls == ["free"] and thread.is_alive()
    held_b.close()  # b's worker died: no marker, so this worker runs b
    _wait_until(lambda: "b" in calls)
    held_a.close()
    thread.join(timeout=20)
    assert not thread.is_alive() and not errors
    assert sorted(calls) == ["a", "after_a", "b", "free"] and calls.index("after_a") > calls.index("a")
    out = pipe.stream.getvalue()
    assert out.count("[1/4] a: running in process 4242") == 1 and out.count("[2/4] b: running in") == 1


def test_settings_record_is_written_once_and_guards_the_folder(tmp_path):
    record = {"seed": 0, "out": tmp_path / "x"}  # a Path is recorded as its string
    _CountingPipeline(tmp_path, record).check_settings()
    assert json.loads((tmp_path / ".pipeline" / "settings.json").read_text()) == {"seed": 0,
                                                                                "out": str(tmp_path / "x")}
    _CountingPipeline(tmp_path, record).check_settings()  # same settings: resumes
    with pytest.raises(NnsslJointError,
                       match=r"holds a run with other settings \(differences: extra, seed\)"):
        _CountingPipeline(tmp_path, {**record, "seed": 1, "extra": True}).check_settings()


def test_folders_and_written_configs(tmp_path):
    p = Pipeline(tmp_path / "out")
    assert p.marker("a") == tmp_path / "out" / ".pipeline" / "a.done.json"
    assert p.results_root("finetune", "joint") == tmp_path / "out" / "results" / "finetune_joint"
    assert p.results_root("pretrain", "joint") != p.results_root("pretrain", "intra")
    assert p.preset_file("nnunet") == str(tmp_path / "out" / "configs" / "preset_nnunet.json")
    assert p.preset_file("cpu") == "cpu"
    path = p.write_config("pretrain_joint", {"epochs": 2})
    assert path == tmp_path / "out" / "configs" / "pretrain_joint.json"
    assert json.loads(path.read_text()) == {"epochs": 2}


# ----------------------------------------------------------------------------------------------------
# commands and environment


def _fake_nnunet(p: Pipeline, monkeypatch) -> None:
    monkeypatch.setattr(p, "nnunet_command", lambda name: [name])


def test_train_command_resumes_from_a_checkpoint_else_starts_from_the_weights(tmp_path, monkeypatch):
    p = Pipeline(tmp_path, device="cpu")
    _fake_nnunet(p, monkeypatch)
    run_folder = tmp_path / "run"
    weights = tmp_path / "pretrained.pth"
    cmd, resumed, passed = p.train_command(504, "2d", 0, "T", "P", run_folder, weights)
    assert cmd == ["nnUNetv2_train", "504", "2d", "0", "-tr", "T", "-p", "P", "-device", "cpu",
                   "-pretrained_weights", str(weights)]
    assert (resumed, passed) == (False, weights)
    cmd, resumed, passed = p.train_command(504, "2d", "all", "T", "P", run_folder)
    assert "-pretrained_weights" not in cmd and "--c" not in cmd and cmd[3] == "all"
    assert (resumed, passed) == (False, None)
    for checkpoint in ("checkpoint_latest.pth", "checkpoint_final.pth"):
        run_folder.mkdir(exist_ok=True)
        for f in run_folder.iterdir():
            f.unlink()
        (run_folder / checkpoint).write_bytes(b"")
        cmd, resumed, passed = p.train_command(504, "2d", 0, "T", "P", run_folder, weights)
        # nnU-Net refuses --c with -pretrained_weights; the checkpoint holds them
        assert cmd[-1] == "--c" and "-pretrained_weights" not in cmd
        assert (resumed, passed) == (True, None)


def test_an_interrupted_pretraining_is_not_resumed_under_another_configuration(tmp_path, monkeypatch):
    # loss weights are not in the checkpoint: resuming under changed keys would mix two objectives
    p = Pipeline(tmp_path, device="cpu", stream=io.StringIO())
    _fake_nnunet(p, monkeypatch)
    ran = []
    monkeypatch.setattr(p, "run_command", lambda cmd, env, key, progress: ran.append(cmd))
    progress = StepProgress(1, 1, "x", io.StringIO())
    folder = p.pretrain_run_folder("intra", "Dataset900_X")
    config = {"objective": {"lambda_inter": 0.0, "lambda_volume_contrast": 1}, "optim": {"num_epochs": 2}}
    with pytest.raises(NnsslJointError, match="pretraining finished without"):
        p.pretrain("intra", config, 900, "Dataset900_X", 2, ["checkpoint_final.pth"], progress)  # fresh run
    folder.mkdir(parents=True)
    (folder / "checkpoint_latest.pth").write_bytes(b"")
    changed = {"objective": {"lambda_inter": 0.0, "lambda_volume_contrast": 0.0}, "optim": {"num_epochs": 2}}
    with pytest.raises(NnsslJointError, match=r"(?s)differences: objective.lambda_volume_contrast\); delete "
                                              + re.escape(str(folder))):
        p.pretrain("intra", changed, 900, "Dataset900_X", 2, ["checkpoint_final.pth"], progress)
    assert len(ran) == 1 and "--c" not in ran[0]  # nothing was resumed
    assert json.loads((p.configs / "pretrain_intra.json").read_text()) == config  # the record is kept
    (folder / "checkpoint_final.pth").write_bytes(b"")
    p.pretrain("intra", config, 900, "Dataset900_X", 2, ["checkpoint_final.pth"], progress)  # same: resumes
    assert ran[-1][-1] == "--c"


def test_predict_command_uses_the_final_checkpoint_and_tta_flag(tmp_path, monkeypatch):
    p = Pipeline(tmp_path, device="cuda")
    _fake_nnunet(p, monkeypatch)
    cmd = p.predict_command(Path("in"), Path("o"), 7, "3d_fullres", 1, "T", "P", tta=False)
    assert cmd == ["nnUNetv2_predict", "-i", "in", "-o", "o", "-d", "7", "-c", "3d_fullres", "-p", "P",
                   "-tr", "T", "-f", "1", "-chk", "checkpoint_final.pth", "-device", "cuda",
                   "-npp", "1", "-nps", "1", "--disable_tta"]
    assert "--disable_tta" not in p.predict_command(Path("in"), Path("o"), 7, "2d", 0, "T", "P", tta=True)


def test_a_missing_nnunet_command_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.shutil, "which", lambda name: None)
    with pytest.raises(NnsslJointError, match="nnUNetv2_nowhere not found .* install nnunetv2"):
        Pipeline(tmp_path).nnunet_command("nnUNetv2_nowhere")
    monkeypatch.setattr(pipeline.shutil, "which", lambda name: f"/opt/bin/{name}")
    assert Pipeline(tmp_path).nnunet_command("nnUNetv2_nowhere") == ["/opt/bin/nnUNetv2_nowhere"]


def test_env_points_nnunet_at_the_output_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("NNSSL_JOINT_CONFIG", "/stale/config.json")
    monkeypatch.setenv("NNSSL_JOINT_FINETUNE_CONFIG", "/stale/finetune.json")
    monkeypatch.setenv("nnUNet_n_proc_DA", "12")
    monkeypatch.delenv("nnUNet_def_n_proc", raising=False)
    p = Pipeline(tmp_path, device="cpu")
    env = p.env()
    assert (env["nnUNet_raw"], env["nnUNet_preprocessed"], env["nnUNet_results"]) == (
        str(tmp_path / "raw"), str(tmp_path / "preprocessed"), str(tmp_path / "results"))
    assert "NNSSL_JOINT_CONFIG" not in env and "NNSSL_JOINT_FINETUNE_CONFIG" not in env
    assert "nnUNet_n_proc_DA" not in env  # planning crashes with it set
    assert env["nnUNet_def_n_proc"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert Path(env["nnUNet_extTrainer"]).is_dir()

    monkeypatch.delenv("nnUNet_n_proc_DA")
    training = p.env(tmp_path / "r", training=True, NNSSL_JOINT_CONFIG="/new.json")
    assert training["nnUNet_results"] == str(tmp_path / "r") and training["NNSSL_JOINT_CONFIG"] == "/new.json"
    assert training["nnUNet_n_proc_DA"] == "0"
    assert Pipeline(tmp_path, device="cuda").env(training=True)["nnUNet_n_proc_DA"] == "4"
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")  # the user's own value wins in training
    assert p.env(training=True)["nnUNet_n_proc_DA"] == "2"


def test_run_command_logs_feeds_progress_and_reports_failures(tmp_path):
    p = Pipeline(tmp_path, stream=io.StringIO())
    stream = io.StringIO()
    progress = StepProgress(1, 1, "train", stream)
    progress.expect(2, "epoch")
    script = "print('2026-01-01 00:00:00.0: Epoch 0'); print('2026-01-01 00:00:00.0: Epoch 1')"
    p.run_command([sys.executable, "-c", script], p.env(), "train", progress)
    log = (tmp_path / "logs" / "train.log").read_text()
    assert "$ " in log and "Epoch 1" in log
    assert "epoch 2/2" in stream.getvalue()

    failing = "import sys\nfor i in range(20): print(f'line {i}')\nsys.exit(3)"
    with pytest.raises(NnsslJointError, match=r"failed \(exit 3\); full output in .*train.log") as error:
        p.run_command([sys.executable, "-c", failing], p.env(), "train")
    message = str(error.value)
    assert "line 19" in message and "line 5" in message and "line 4\n" not in message  # last 15 lines
    assert (tmp_path / "logs" / "train.log").read_text().count("$ ") == 2  # appended, not replaced


def test_run_interruptibly_returns_130_with_a_hint(capsys):
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert pipeline.run_interruptibly("demo", lambda: None) == 0

        def interrupted():
            raise KeyboardInterrupt

        assert pipeline.run_interruptibly("demo", interrupted) == 130
        assert "demo: interrupted; re-run the same command to continue" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):  # SIGTERM now ends a run like Ctrl-C
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_resolve_preset_choice(tmp_path):
    assert pipeline.resolve_preset_choice(None, "cpu") == "cpu"
    assert pipeline.resolve_preset_choice(None, "cuda") == "gpu"
    assert pipeline.resolve_preset_choice("gpu", "cpu") == "gpu"
    assert pipeline.resolve_preset_choice("nnunet", "cpu") == "nnunet"
    preset = tmp_path / "mine.json"
    preset.write_text("{}")
    assert pipeline.resolve_preset_choice(str(preset), "cpu") == str(preset.resolve())
    with pytest.raises(NnsslJointError, match="path of a preset JSON"):
        pipeline.resolve_preset_choice(str(tmp_path / "missing.json"), "cpu")


# ----------------------------------------------------------------------------------------------------
# progress lines


def test_progress_counts_predicted_cases_and_announces_the_export():
    stream = io.StringIO()
    progress = StepProgress(2, 3, "predict", stream)
    progress.expect(4, "case")
    progress.feed("Predicting case_001:\n")
    progress.feed("Predicting case_002:\n")
    progress.feed("2026-01-01 00:00:00.0: Epoch 3\n")  # not counted: the unit is cases
    assert progress.done_units == 2
    assert "predicting case 2/4" in stream.getvalue().splitlines()[-1]

    stream = io.StringIO()
    progress = StepProgress(1, 1, "pretraining", stream)
    progress.expect(2, "epoch", after="exporting")
    progress.feed("Training done.\n")
    assert stream.getvalue().splitlines()[-1].startswith("[1/1] pretraining [")
    assert "exporting" in stream.getvalue().splitlines()[-1]


def test_progress_redraws_one_line_on_a_terminal():
    stream = _TTY()
    progress = StepProgress(1, 2, "train", stream)
    progress.expect(10, "epoch")
    progress.feed("2026-01-01 00:00:00.0: Epoch 0\n")
    progress.feed("2026-01-01 00:00:00.0: Epoch 9\n")
    progress.finish()
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # redrawn in place, one newline at the end
    assert text.count("\r") == 4
    assert "[##################--] epoch 10/10" in text  # (10 - 1) / 10 of 20 cells


def test_format_seconds_rounds_into_the_next_unit():
    assert pipeline.format_seconds(59.6) == "1m00s"
    assert pipeline.format_seconds(3600) == "1h00m00s"
    assert pipeline.format_seconds(0.2) == "0s"


# ----------------------------------------------------------------------------------------------------
# splits and Dice (what test_demo.py does not already check)


def test_few_label_split_depends_on_the_seed_and_uses_every_case_when_asked():
    ids = [f"c{i:02d}" for i in range(12)]
    splits = {tuple(pipeline.few_label_split(ids, 3, seed)["train"]) for seed in range(6)}
    assert len(splits) > 1
    full = pipeline.few_label_split(ids, 11, seed=3)
    assert sorted(full["train"] + full["val"]) == ids
    assert full["train"] == sorted(full["train"])


def test_write_splits_of_several_folds_replaces_the_file(tmp_path):
    folds = [{"train": ("a", "b"), "val": ("c",)}, {"train": ["a"], "val": ["b"]}]
    path = pipeline.write_splits(tmp_path, folds)
    assert json.loads(path.read_text()) == [{"train": ["a", "b"], "val": ["c"]},
                                            {"train": ["a"], "val": ["b"]}]
    pipeline.write_splits(tmp_path, {"train": ["x"], "val": ["y"]})
    assert json.loads(path.read_text()) == [{"train": ["x"], "val": ["y"]}]


def test_dice_of_a_label_present_on_one_side_only_is_zero():
    reference = np.zeros((3, 3), dtype=np.uint8)
    prediction = np.zeros_like(reference)
    reference[0, 0] = 1  # label 1: missed entirely (empty prediction)
    prediction[2, 2] = 2  # label 2: predicted where the reference is empty
    scores = pipeline.dice_per_class(prediction, reference, [1, 2, 3])
    assert scores[1] == 0.0 and scores[2] == 0.0
    assert math.isnan(scores[3])  # absent from both
    assert pipeline.dice_per_class(prediction, reference, np.array([2]))[2] == 0.0  # numpy labels are keys


def test_evaluate_predictions_scores_only_the_reference_cases(tmp_path):
    import SimpleITK as sitk

    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    reference = np.zeros((1, 4, 4), dtype=np.uint8)
    reference[0, :2] = 1  # 8 voxels
    prediction = np.zeros_like(reference)
    prediction[0, :1] = 1  # 4 voxels inside
    sitk.WriteImage(sitk.GetImageFromArray(reference), str(ref / "a.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(prediction), str(pred / "a.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(reference), str(pred / "extra.nii.gz"))
    assert pipeline.read_label(ref / "a.nii.gz").tolist() == reference.tolist()
    assert pipeline.evaluate_predictions(pred, ref, ".nii.gz", [1]) == {"a": {1: pytest.approx(8 / 12)}}
