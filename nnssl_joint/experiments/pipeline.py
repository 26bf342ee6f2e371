"""What the demo and the benchmark share: resumable steps that run nnU-Net and the plugin as
subprocesses, progress lines, nnU-Net splits and Dice evaluation.

A :class:`Pipeline` runs a list of :class:`Step` s. A finished step leaves a marker
(``OUT/<state>/<key>.done.json``); a re-run with the same settings skips it, so a killed run continues
where it stopped (an interrupted nnU-Net training resumes from its latest checkpoint with ``--c``, which
the steps add themselves). A settings record written on the first run refuses a re-run with other
settings in the same folder instead of mixing two experiments.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.naming import (
    PLANS_NAME,
    PRETRAIN_FOLD,
    PRETRAIN_TRAINER,
    PRETRAINING_CONFIGURATION,
    STOCK_PLANS_NAME,
    pretrain_run_folder,
)

#: ``--preset nnunet``: the 2D encoder topology nnU-Net's own planner gives the target
NNUNET_PRESET = "nnunet"

# ----------------------------------------------------------------------------------------------------
# small pure helpers


def format_seconds(seconds: float) -> str:
    """``2m10s`` style durations for progress lines."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s"


def case_identifiers(folder: Path, file_ending: str) -> list[str]:
    """Case ids of an nnU-Net labels folder (``CASE<file_ending>``), sorted."""
    return sorted(p.name[: -len(file_ending)] for p in Path(folder).iterdir() if p.name.endswith(file_ending))


def few_label_split(identifiers: Sequence[str], labeled: int, seed: int) -> dict[str, list[str]]:
    """Fold 0 of the demo: ``labeled`` training cases and one other validation case, drawn by ``seed``.

    Only training cases (imagesTr/labelsTr) enter; the test cases (imagesTs/labelsTs) never do."""
    identifiers = sorted(identifiers)
    if len(identifiers) < labeled + 1:
        raise NnsslJointError(f"{labeled} labeled training case(s) and one validation case need "
                              f"{labeled + 1} labeled training cases, the dataset has {len(identifiers)}")
    order = np.random.default_rng(seed).permutation(len(identifiers))
    train = sorted(identifiers[i] for i in order[:labeled])
    val = [identifiers[order[labeled]]]
    return {"train": train, "val": val}


def write_splits(preprocessed_dataset_folder: Path,
                 splits: dict[str, list[str]] | Sequence[dict[str, list[str]]]) -> Path:
    """Write nnU-Net's ``splits_final.json``; one split becomes fold 0, a list becomes folds 0, 1, ..."""
    folds = [splits] if isinstance(splits, dict) else list(splits)
    path = Path(preprocessed_dataset_folder) / "splits_final.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    from nnssl_joint.common.checkpoint_io import atomic_write_text

    # atomic: a training of another worker may read the file while it is rewritten
    atomic_write_text(json.dumps([{"train": list(s["train"]), "val": list(s["val"])} for s in folds],
                                 indent=2) + "\n",
                      path)
    return path


def read_label(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice 2|P∩R| / (|P| + |R|) per label; NaN where the label is absent from both (undefined)."""
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from reference shape "
                         f"{reference.shape}")
    scores: dict[int, float] = {}
    for label in labels:
        p = prediction == label
        r = reference == label
        denominator = int(p.sum()) + int(r.sum())
        scores[int(label)] = (float("nan") if denominator == 0
                              else 2.0 * float(np.logical_and(p, r).sum()) / denominator)
    return scores


def evaluate_predictions(prediction_folder: Path, reference_folder: Path, file_ending: str,
                         labels: Sequence[int]) -> dict[str, dict[int, float]]:
    """Dice per case and label for every reference case; a missing prediction is an error."""
    scores = {}
    for case in case_identifiers(reference_folder, file_ending):
        pred = Path(prediction_folder) / f"{case}{file_ending}"
        if not pred.is_file():
            raise NnsslJointError(f"no prediction {pred} for test case {case}")
        scores[case] = dice_per_class(read_label(pred),
                                      read_label(Path(reference_folder) / f"{case}{file_ending}"),
                                      labels)
    return scores


# ----------------------------------------------------------------------------------------------------
# progress output

_EPOCH = re.compile(r"^\S+ \S+: Epoch (\d+)\s*$")
_PREDICTING = re.compile(r"^Predicting (\S+):")


class StepProgress:
    """One line per step: ``[4/10] pretraining, joint ... epoch 3/8 [###-----] 1m10s``.

    On a terminal the line is redrawn in place as the subprocess reports epochs / predicted cases; in
    a log (no terminal) each epoch gets its own line."""

    def __init__(self, index: int, total: int, title: str, stream: TextIO | None = None) -> None:
        self.prefix = f"[{index}/{total}] {title}"
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self.total_units = 0
        self.done_units = 0
        self.unit = ""
        self.after = ""
        self.last_len = 0
        self._draw("...")

    def expect(self, total: int, unit: str, after: str = "") -> None:
        """Count ``unit`` lines (``epoch`` or ``case``) up to ``total``; ``after``: shown when training
        ends."""
        self.total_units, self.done_units, self.unit, self.after = int(total), 0, unit, after

    def feed(self, line: str) -> None:
        """Parse one line of subprocess output for epochs / cases."""
        m = _EPOCH.match(line.strip())
        if m and self.unit == "epoch":
            self.done_units = int(m.group(1)) + 1
            self._draw(self._bar(f"epoch {self.done_units}/{self.total_units}"), newline=not self.tty)
            return
        if line.strip().endswith("Training done.") and self.unit == "epoch" and self.after:
            self._draw(self._bar(self.after), newline=not self.tty)
            return
        m = _PREDICTING.match(line.strip())
        if m and self.unit == "case":
            self.done_units += 1
            self._draw(self._bar(f"predicting case {self.done_units}/{self.total_units}"),
                       newline=not self.tty)

    def note(self, text: str) -> None:
        self._draw(text, newline=not self.tty)

    def _bar(self, text: str, width: int = 20) -> str:
        if self.total_units <= 0:
            return text
        filled = round(width * min(1.0, max(0, self.done_units - 1) / self.total_units))
        return f"[{'#' * filled}{'-' * (width - filled)}] {text}"

    def _draw(self, text: str, newline: bool = False) -> None:
        line = f"{self.prefix} {text} {format_seconds(time.monotonic() - self.start)}"
        if self.tty:
            pad = max(0, self.last_len - len(line))
            self.stream.write("\r" + line + " " * pad)
            self.last_len = len(line)
        elif newline or not self.last_len:
            self.stream.write(line + "\n")
            self.last_len = len(line)
        self.stream.flush()

    def finish(self, text: str = "done") -> float:
        seconds = time.monotonic() - self.start
        line = f"{self.prefix} {text} {format_seconds(seconds)}"
        if self.tty:
            self.stream.write("\r" + line + " " * max(0, self.last_len - len(line)) + "\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return seconds


# ----------------------------------------------------------------------------------------------------
# the driver


@dataclass
class Step:
    key: str
    title: str
    run: Callable[[StepProgress], dict[str, Any] | None]
    #: rebuilt on every run, even when a marker says it finished (reports)
    always: bool = False
    #: independent of the other steps of its kind: when another process on the same output folder is
    #: running it, skip it instead of waiting (several workers, e.g. one per GPU, share the runs)
    parallel: bool = False
    #: keys of the earlier steps this one needs; None: every earlier step. When another process runs a
    #: step, a worker goes on with the later steps that do not need it (directly or through a step that
    #: needs it) and comes back to it afterwards, instead of waiting at once
    needs: tuple[str, ...] | None = None


@dataclass
class StepRecord:
    key: str
    title: str
    seconds: float
    skipped: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """Resumable steps in an output folder; subprocesses get the nnU-Net environment of ``nnunet_env``."""

    #: hidden folder of markers and the settings record
    state_dir = ".pipeline"
    #: what the settings record guards, for the refusal message
    kind = "run"

    def __init__(self, out: Path, device: str = "cpu", stream: TextIO | None = None) -> None:
        self.out = Path(out)
        self.device = device
        self.stream = stream or sys.stdout
        self.records: list[StepRecord] = []

    # -------------------------------------------------------------- overridable hooks
    def settings_record(self) -> dict[str, Any]:
        """What a resumed run must share with the run that created the folder."""
        return {}

    @staticmethod
    def old_budget_warmup(changed: list[str], previous: dict[str, Any]) -> int | None:
        """The fine-tuning warm-up a folder's differing budget record holds (the built-in budgets had one
        until 2026-12-05), None where the budget does not differ or had none."""
        if "budget" not in changed:
            return None
        return (previous.get("budget") or {}).get("finetune_warmup_epochs") or None

    def settings_hint(self, changed: list[str], previous: dict[str, Any]) -> str:
        """How to continue a folder whose recorded settings (``previous``) differ in ``changed`` ('' if no
        hint). The one shared by the demo and the benchmark: the built-in budgets' warm-up, which became 0."""
        old = self.old_budget_warmup(changed, previous)
        if old is None:
            return ""
        return (f"; it was made when the built-in budgets warmed up the runs from pretrained weights ({old} "
                "epoch(s)), which they no longer do (docs/label_efficiency.md): choose another --out")

    def state(self) -> dict[str, Any]:
        """Values a later step needs that an earlier (possibly skipped) step found; saved in markers."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state` saved."""

    # -------------------------------------------------------------- folders
    @property
    def state_folder(self) -> Path:
        return self.out / self.state_dir

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def marker(self, key: str) -> Path:
        return self.state_folder / f"{key}.done.json"

    @property
    def raw(self) -> Path:
        """nnUNet_raw of the subprocesses: generated datasets or links to the user's."""
        return self.out / "raw"

    @property
    def preprocessed(self) -> Path:
        return self.out / "preprocessed"

    @property
    def configs(self) -> Path:
        """The JSON files handed to the trainers (NNSSL_JOINT_CONFIG, NNSSL_JOINT_FINETUNE_CONFIG)."""
        return self.out / "configs"

    def results_root(self, kind: str, arm: str) -> Path:
        """nnUNet_results of one run kind (``pretrain`` / ``finetune``) and arm: every arm trains into its
        own root, so nnU-Net's run folders of different arms never collide."""
        return self.out / "results" / f"{kind}_{arm}"

    def pretrain_run_folder(self, run: str, dataset_name: str) -> Path:
        return pretrain_run_folder(self.results_root("pretrain", run), dataset_name)

    # -------------------------------------------------------------- environment and commands
    def env(self, results: Path | None = None, training: bool = False, **extra: str) -> dict[str, str]:
        """The nnU-Net environment of a subprocess over this pipeline's raw and preprocessed folders."""
        return self.nnunet_env(self.raw, self.preprocessed, results or self.out / "results", training,
                               **extra)

    def nnunet_env(self, raw: Path, preprocessed: Path, results: Path, training: bool = False,
                   **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["nnUNet_raw"] = str(raw)
        env["nnUNet_preprocessed"] = str(preprocessed)
        env["nnUNet_results"] = str(results)
        from nnssl_joint.cli import trainer_path

        env["nnUNet_extTrainer"] = str(trainer_path())
        env.setdefault("nnUNet_def_n_proc", "1")
        env["PYTHONUNBUFFERED"] = "1"  # progress lines as they happen, not when a pipe buffer fills
        # OpenMP threads that sleep instead of spinning while they wait: measured on 2 shared cores, a
        # fine-tuning epoch took 8-10 s instead of 67-97 s next to another busy process, and about the
        # same (2.2 s vs 1.9 s) alone
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if training:
            # one process on a small CPU: data augmentation workers compete with the training for cores
            env.setdefault("nnUNet_n_proc_DA", "0" if self.device == "cpu" else "4")
        else:
            # nnU-Net's own planner (the stock `nnunet` arm) crashes with nnUNet_n_proc_DA=0; the plugin's
            # planners do not (nnssl_joint.planning.estimate)
            env.pop("nnUNet_n_proc_DA", None)
        for key in ("NNSSL_JOINT_CONFIG", "NNSSL_JOINT_FINETUNE_CONFIG"):
            env.pop(key, None)
        env.update(extra)
        return env

    def run_command(self, cmd: Sequence[str], env: dict[str, str], log_name: str,
                    progress: StepProgress | None = None) -> None:
        """Run ``cmd``, appending its output to ``logs/<log_name>.log`` and feeding it to ``progress``."""
        log_path = self.logs / f"{log_name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        tail: list[str] = []
        with open(log_path, "a") as log:
            log.write(f"\n$ {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1, cwd=self.out)
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    log.write(line)
                    tail = (tail + [line.rstrip()])[-15:]
                    if progress is not None:
                        progress.feed(line)
                rc = proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        if rc != 0:
            raise NnsslJointError(f"`{shlex.join(cmd)}` failed (exit {rc}); full output in {log_path}. "
                                  "Last lines:\n"
                                  + "\n".join(tail))

    def plugin_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "nnssl_joint.cli", *args]

    def nnunet_command(self, name: str) -> list[str]:
        candidate = Path(sys.executable).with_name(name)
        if candidate.exists():
            return [str(candidate)]
        found = shutil.which(name)
        if found is None:
            raise NnsslJointError(f"{name} not found next to {sys.executable} or on PATH; install nnunetv2 "
                                  "in this environment")
        return [found]

    def train_command(self, dataset_id: int, configuration: str, fold: int | str, trainer: str, plans: str,
                      run_folder: Path,
                      pretrained_weights: Path | None = None) -> tuple[list[str], bool, Path | None]:
        """``nnUNetv2_train``, resuming with ``--c`` when ``run_folder`` holds a checkpoint (nnU-Net refuses
        ``--c`` together with ``-pretrained_weights``; the checkpoint holds them), otherwise starting from
        ``pretrained_weights`` if given. Returns (command, resumed, the weights file passed or None)."""
        cmd = self.nnunet_command("nnUNetv2_train") + [str(dataset_id), configuration, str(fold),
                                                       "-tr", trainer, "-p", plans, "-device", self.device]
        resume = any((run_folder / f).is_file() for f in ("checkpoint_latest.pth", "checkpoint_final.pth"))
        if resume:
            cmd.append("--c")
            pretrained_weights = None
        elif pretrained_weights is not None:
            cmd += ["-pretrained_weights", str(pretrained_weights)]
        return cmd, resume, pretrained_weights

    def predict_command(self, images: Path, out: Path, dataset_id: int, configuration: str, fold: int | str,
                        trainer: str, plans: str, tta: bool) -> list[str]:
        """``nnUNetv2_predict`` of ``images`` with the final checkpoint of one fold, one process each."""
        cmd = self.nnunet_command("nnUNetv2_predict") + [
            "-i", str(images), "-o", str(out), "-d", str(dataset_id), "-c", configuration, "-p", plans,
            "-tr", trainer, "-f", str(fold), "-chk", "checkpoint_final.pth", "-device", self.device,
            "-npp", "1", "-nps", "1"]
        if not tta:
            cmd.append("--disable_tta")
        return cmd

    def write_config(self, name: str, config: dict[str, Any]) -> Path:
        """``configs/<name>.json`` (atomic: a worker may start a training that reads it meanwhile)."""
        from nnssl_joint.common.checkpoint_io import atomic_write_text

        path = self.configs / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(config, indent=2) + "\n", path)
        return path

    def check_same_config(self, name: str, config: dict[str, Any], run_folder: Path) -> None:
        """Before ``run_folder`` is resumed: ``configs/<name>.json``, which the interrupted run trained with,
        must equal ``config`` (a loss weight is not part of the checkpoint, so a run resumed under another
        configuration, e.g. after an update of the plugin changed an arm's keys, would mix two objectives)."""
        path = self.configs / f"{name}.json"
        if not path.is_file():
            return
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError:
            previous = None
        current = json.loads(json.dumps(config))
        if previous == current:
            return
        changed = _changed_keys(previous, current) if isinstance(previous, dict) else ["the whole file"]
        raise NnsslJointError(
            f"{run_folder} was trained with {path}, and this run would continue it with another "
            f"configuration (differences: {', '.join(changed)}); delete {run_folder} to train that run anew, "
            "or choose another --out")

    # -------------------------------------------------------------- steps the demo and the benchmark share
    def prepare_pretraining(self, source_ids: Sequence[int], dataset_id: int, name: str,
                            progress: StepProgress) -> None:
        """``nnssl_joint prepare``: merge the unlabeled sources into one pretraining dataset."""
        args = ["prepare", "-d", *map(str, source_ids), "-o", str(dataset_id), "--name", name]
        if any(self.raw.glob(f"Dataset{int(dataset_id):03d}_*")):  # left by an interrupted run
            args.append("--overwrite")
        self.run_command(self.plugin_command(*args), self.env(), "prepare", progress)

    def plan_pretraining(self, dataset_id: int, progress: StepProgress) -> None:
        self.run_command(self.plugin_command("plan_and_preprocess", "-d", str(dataset_id),
                                             "-np", "1", "-npfp", "1"),
                         self.env(), "plan_pretrain", progress)

    def plan_downstream(self, dataset_id: int, dataset_name: str, configuration: str, progress: StepProgress,
                        log_name: str, preset: str | None = None) -> dict[str, Any]:
        """``nnssl_joint plan_and_preprocess --downstream`` of a labeled dataset; the plans must hold
        ``configuration``. Returns the plans."""
        args = ["plan_and_preprocess", "-d", str(dataset_id), "--downstream", "-np", "1", "-npfp", "1"]
        if preset is not None:
            args += ["--preset", str(preset)]
        self.run_command(self.plugin_command(*args), self.env(), log_name, progress)
        plans = json.loads((self.preprocessed / dataset_name / f"{PLANS_NAME}.json").read_text())
        if configuration not in plans["configurations"]:
            raise NnsslJointError(f"the plans of {dataset_name} have no configuration '{configuration}' "
                                  f"(they have {sorted(plans['configurations'])}); for a 2D dataset use "
                                  "-c 2d")
        return plans

    def plan_stock(self, dataset_id: int, dataset_name: str, configuration: str, preprocess: bool,
                   progress: StepProgress) -> dict[str, Any]:
        """``nnUNetv2_plan_and_preprocess`` with nnU-Net's default planner (plans ``nnUNetPlans``);
        ``preprocess`` False: fingerprint and plans only. Returns the plans."""
        cmd = self.nnunet_command("nnUNetv2_plan_and_preprocess") + ["-d", str(dataset_id),
                                                                      "-c", configuration,
                                                                      "-np", "1", "-npfp", "1"]
        if not preprocess:
            cmd.append("--no_pp")
        self.run_command(cmd, self.env(), "plan_stock", progress)
        return json.loads((self.preprocessed / dataset_name / f"{STOCK_PLANS_NAME}.json").read_text())

    def derive_nnunet_preset(self, plans: dict[str, Any], progress: StepProgress) -> Any:
        """``--preset nnunet``: the preset of the 2D topology of nnU-Net's plans, written to
        ``configs/preset_nnunet.json`` (the file pretraining and downstream planning get)."""
        from nnssl_joint.models.preset import preset_from_nnunet_plans

        preset = preset_from_nnunet_plans(plans, "2d", base="gpu" if self.device == "cuda" else "cpu")
        self.write_config("preset_nnunet", preset.to_dict())
        progress.note(f"preset from nnU-Net's 2d plans: features {list(preset.encoder.features_per_stage)}, "
                      f"strides {[list(x) for x in preset.encoder.stage_strides]}")
        return preset

    def preset_file(self, preset: str) -> str:
        """What pretraining and the downstream planner get for ``preset``: a shipped name or a file."""
        return str(self.configs / "preset_nnunet.json") if preset == NNUNET_PRESET else preset

    def pretrain(self, run: str, config: dict[str, Any], dataset_id: int, dataset_name: str, epochs: int,
                 required: Sequence[str], progress: StepProgress) -> dict[str, Any]:
        """One ``JointSSLPretrainTrainer`` run (resumed with ``--c`` when interrupted) into its own results
        root; ``required``: files the run folder must hold afterwards."""
        folder = self.pretrain_run_folder(run, dataset_name)
        cmd, resume, _ = self.train_command(dataset_id, PRETRAINING_CONFIGURATION, PRETRAIN_FOLD,
                                            PRETRAIN_TRAINER, PLANS_NAME, folder)
        if resume:
            self.check_same_config(f"pretrain_{run}", config, folder)
        config_file = self.write_config(f"pretrain_{run}", config)
        progress.expect(epochs, "epoch", "exporting the pretrained weights")
        self.run_command(cmd, self.env(self.results_root("pretrain", run), training=True,
                                       NNSSL_JOINT_CONFIG=str(config_file)), f"pretrain_{run}", progress)
        for name in required:
            if not (folder / name).is_file():
                raise NnsslJointError(f"pretraining finished without {folder / name}; see "
                                      f"{self.logs / f'pretrain_{run}.log'}")
        return {"run_folder": str(folder), "resumed": resume}

    # -------------------------------------------------------------- driver
    def check_settings(self) -> None:
        self.state_folder.mkdir(parents=True, exist_ok=True)
        record_file = self.state_folder / "settings.json"
        record = json.loads(json.dumps(self.settings_record(), default=str))
        if record_file.is_file():
            previous = json.loads(record_file.read_text())
            if previous != record:
                changed = sorted(k for k in set(previous) | set(record) if previous.get(k) != record.get(k))
                raise NnsslJointError(
                    f"{self.out} holds a {self.kind} with other settings "
                    f"(differences: {', '.join(changed)}); "
                    "re-run with the same flags to continue it, or choose another --out"
                    + self.settings_hint(changed, previous))
        else:
            record_file.write_text(json.dumps(record, indent=2) + "\n")

    def run_steps(self, steps: Sequence[Step]) -> None:
        """Run ``steps`` in order, skipping those whose marker exists.

        A step runs under an exclusive lock on ``<key>.lock`` in the state folder (``flock``: the kernel
        drops it when the process dies, so a killed run leaves no stale lock). Several processes may
        work on one output folder: a ``parallel`` step another process is running is skipped; any other
        step another process is running is put off, together with the later steps that need it
        (:attr:`Step.needs`), while the steps that do not need it run; the put-off steps are taken up
        again in order once those are done, and a worker waits for a step only when nothing else is left
        that it could run."""
        total = len(steps)
        needs: dict[str, set[str]] = {}  # step key -> the keys it needs (None in the step: every earlier one)
        for index, step in enumerate(steps):
            needs[step.key] = {s.key for s in steps[:index]} if step.needs is None else set(step.needs)
        pending = [(index, step) for index, step in enumerate(steps, 1)]
        announced: set[str] = set()
        while pending:
            put_off: list[tuple[int, Step]] = []
            busy: set[str] = set()  # keys of the put-off steps
            for position, (index, step) in enumerate(pending):
                if needs[step.key] & busy:
                    put_off.append((index, step))
                    busy.add(step.key)
                    continue
                # wait for a busy step only when no later pending step could run without it and without
                # the steps already put off (so that every pass runs or waits for at least one step)
                later = [s for _, s in pending[position + 1:]]
                wait = not self._something_runs_without(busy | {step.key}, later, needs)
                outcome = self._attempt(step, index, total, wait, announce=step.key not in announced)
                if outcome == "busy":
                    announced.add(step.key)
                    put_off.append((index, step))
                    busy.add(step.key)
            pending = put_off

    @staticmethod
    def _something_runs_without(keys: set[str], later: Sequence[Step], needs: dict[str, set[str]]) -> bool:
        """Whether one of the ``later`` pending steps needs none of the steps ``keys`` (directly or through
        a step that needs one of them)."""
        blocked = set(keys)
        for candidate in later:
            if needs[candidate.key] & blocked:
                blocked.add(candidate.key)
            else:
                return True
        return False

    def _attempt(self, step: Step, index: int, total: int, wait: bool, announce: bool = True) -> str:
        """Run ``step`` unless its marker exists: "done" (ran or skipped), or "busy" when another process
        runs it and ``wait`` is False (a ``parallel`` step busy elsewhere is skipped: "done")."""
        if self._skip_if_done(step, index, total):
            return "done"
        lock = None if step.always else self._lock(step, index, total, wait, announce)
        if lock is False:
            return "done"
        if lock == "busy":
            return "busy"
        try:
            if lock is not None and self._skip_if_done(step, index, total):
                return "done"  # another process finished it while we waited
            self._run_step(step, index, total)
        finally:
            if lock:
                lock.close()
        return "done"

    def _skip_if_done(self, step: Step, index: int, total: int) -> bool:
        marker = self.marker(step.key)
        if step.always or not marker.is_file():
            return False
        done = json.loads(marker.read_text())
        self.restore(done.get("state", {}))
        print(f"[{index}/{total}] {step.title}: done in an earlier run "
              f"({format_seconds(done['seconds'])}), skipped",
              file=self.stream, flush=True)
        self.records.append(StepRecord(step.key, step.title, done["seconds"], True, done.get("info", {})))
        return True

    def try_lock(self, key: str) -> tuple[Any, str | None]:
        """Open ``<key>.lock`` in the state folder and try to take its exclusive ``flock`` without waiting:
        (the open file, None) when taken, (the open file, the holder it names) when another process holds
        it; then ``fcntl.flock(handle, fcntl.LOCK_EX)`` waits for it. The kernel drops the lock when the
        holder dies, so a killed run leaves no stale lock."""
        import fcntl

        path = self.state_folder / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")  # noqa: SIM115 (the caller holds it for as long as it needs the lock)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            return handle, handle.read().strip() or "another process"
        return handle, None

    def _lock(self, step: Step, index: int, total: int, wait: bool = True, announce: bool = True) -> Any:
        """The open, locked lock file; False when the step is ``parallel`` and another process runs it;
        "busy" when another process runs it and ``wait`` is False."""
        import fcntl

        handle, owner = self.try_lock(step.key)
        if owner is not None:
            if step.parallel:
                handle.close()
                print(f"[{index}/{total}] {step.title}: running in {owner}, skipped here", file=self.stream,
                      flush=True)
                return False
            if not wait:
                handle.close()
                if announce:
                    print(f"[{index}/{total}] {step.title}: running in {owner}; going on with the steps that "
                          "do not need it, back to it afterwards", file=self.stream, flush=True)
                return "busy"
            print(f"[{index}/{total}] {step.title}: waiting for {owner}", file=self.stream, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        import socket

        handle.write(f"process {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        return handle

    def _run_step(self, step: Step, index: int, total: int) -> None:
        marker = self.marker(step.key)
        progress = StepProgress(index, total, step.title, self.stream)
        info = step.run(progress) or {}
        seconds = progress.finish()
        self.records.append(StepRecord(step.key, step.title, seconds, False, info))
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"seconds": seconds, "info": info, "state": self.state(),
                                   "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2, default=str))
        os.replace(tmp, marker)


def resolve_preset_choice(preset: str | None, device: str) -> str:
    """``--preset`` of the demo and the benchmark, one choice for pretraining and downstream planning.
    None follows the device (``gpu`` on CUDA, else ``cpu``); a shipped name, ``nnunet`` (the 2D topology
    of nnU-Net's own plans of the target) or an existing JSON file (returned as an absolute path) pass."""
    from nnssl_joint.models.preset import available_presets

    if preset is None:
        return "gpu" if device == "cuda" else "cpu"
    if preset == NNUNET_PRESET or preset in available_presets():
        return preset
    path = Path(preset).expanduser()
    if path.suffix == ".json" and path.is_file():
        return str(path.resolve())
    raise NnsslJointError(f"--preset {preset!r}: use one of "
                          f"{', '.join([*available_presets(), NNUNET_PRESET])} or the path of a preset JSON "
                          "file (or of nnU-Net plans, whose 2d configuration is taken)")


def check_presets_agree(plans_file: Path, pretrained_file: Path) -> None:
    """The downstream plans were made with the preset the pretraining run used; otherwise stop before any
    fine-tuning with both presets named."""
    import torch

    from nnssl_joint.models.preset import same_preset

    plans_preset = json.loads(Path(plans_file).read_text()).get("nnssl_joint", {}).get("preset")
    meta = torch.load(pretrained_file, map_location="cpu", weights_only=False).get("nnssl_joint", {})
    if not same_preset(plans_preset, meta.get("preset")):
        raise NnsslJointError(
            f"{plans_file} was planned with preset '{(plans_preset or {}).get('name')}' but "
            f"{pretrained_file} was pretrained with preset '{meta.get('preset', {}).get('name')}'; "
            "pretraining and downstream planning must use one --preset. Re-run with one --preset in a new "
            "--out")


def stop_on_sigterm() -> None:
    """SIGTERM ends a run like Ctrl-C: the running nnU-Net subprocess is killed, finished steps stay."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run_interruptibly(name: str, run: Callable[[], Any]) -> int:
    """Run a resumable command: SIGTERM and Ctrl-C stop it with exit code 130 and a hint to re-run."""
    stop_on_sigterm()
    try:
        run()
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; re-run the same command to continue", file=sys.stderr)
        return 130
    return 0


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the keys whose values differ between two nested dictionaries."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b or (key in old) != (key in new):
            changed.append(f"{prefix}{key}")
    return changed

