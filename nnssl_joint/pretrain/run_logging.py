"""nnU-Net-style logging of a pretraining run: every loss term, learning rate, throughput, epoch time
and the prototype-usage entropy per epoch, stored in nnU-Net's logger (so it lands in checkpoints) and
drawn into ``progress.png``."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from nnunetv2.training.logging.nnunet_logger import LocalLogger

from nnssl_joint.common.checkpoint_io import atomic_write_text
from nnssl_joint.probe.during_training import PROBE_LOG_KEYS
from nnssl_joint.ssl.objective import LOSS_TERMS

#: per-epoch values logged besides nnU-Net's own keys
EXTRA_KEYS = (
    *[f"loss_{t}" for t in LOSS_TERMS],
    "slices_per_s",
    "volumes_per_s",
    "entropy_2d",
    "entropy_3d",
    "entropy_2d_samples",
    "entropy_3d_samples",
    "nonfinite_steps",
    *PROBE_LOG_KEYS,  # the optional per-epoch probe (NaN between probes, empty when off)
)


class JointSSLLocalLogger(LocalLogger):
    """nnU-Net's LocalLogger with the pretraining keys and a progress plot of all loss terms."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__(verbose)
        for key in EXTRA_KEYS:
            self.my_fantastic_logging[key] = []

    def load_checkpoint(self, checkpoint: dict) -> None:
        super().load_checkpoint(checkpoint)
        for key in EXTRA_KEYS:
            self.my_fantastic_logging.setdefault(key, [])

    def plot_progress_png(self, output_folder: str) -> None:
        log = self.my_fantastic_logging
        n = min(len(log["train_losses"]), len(log["epoch_end_timestamps"]), len(log["lrs"]))
        if n == 0:
            return
        x = np.arange(n)
        probed = len(log["probe_dice"]) >= n and any(np.isfinite(v) for v in log["probe_dice"][:n])
        fig, axes = plt.subplots(5 if probed else 4, 1, figsize=(12, 20 if probed else 16))
        ax = axes[0]
        ax.plot(x, log["train_losses"][:n], color="k", lw=2, label="total (weighted)")
        for term in LOSS_TERMS:
            values = log[f"loss_{term}"][:n]
            if len(values) == n and not all(v is None or np.isnan(v) for v in values):
                ax.plot(x, [np.nan if v is None else v for v in values], lw=1.5, label=f"L_{term}")
        ax.set_ylabel("loss")
        ax.legend(loc="upper right")
        ax = axes[1]
        for key, label in (("entropy_2d", "2D prototypes"), ("entropy_3d", "3D prototypes")):
            values = log[key][:n]
            if len(values) == n:
                ax.plot(x, [np.nan if v is None else v for v in values], label=label)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("prototype usage entropy\n(1 = uniform, 0 = collapse)")
        ax.legend(loc="lower right")
        ax = axes[2]
        durations = [e - s for e, s in zip(log["epoch_end_timestamps"][:n],
                                           log["epoch_start_timestamps"][:n])]
        ax.plot(x, durations, label="epoch time [s]")
        values = log["slices_per_s"][:n]
        if len(values) == n:
            ax2 = ax.twinx()
            ax2.plot(x, values, color="tab:orange", label="slices/s")
            ax2.set_ylabel("slices/s")
            ax2.legend(loc="upper right")
        ax.set_ylabel("time [s]")
        ax.legend(loc="upper left")
        ax = axes[3]
        ax.plot(x, log["lrs"][:n])
        ax.set_ylabel("learning rate")
        ax.set_xlabel("epoch")
        if probed:
            _plot_probe(axes[4], x, log, n)
            axes[4].set_xlim(axes[0].get_xlim())  # same epochs axis as the panels above
            axes[4].set_xlabel("epoch")
        fig.tight_layout()
        tmp = os.path.join(output_folder, ".progress.png.tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, os.path.join(output_folder, "progress.png"))


def _plot_probe(ax, x: np.ndarray, log: dict, n: int) -> None:
    """The per-epoch probe (nnssl_joint.probe.during_training): scores in [0, 1] left, RankMe right."""
    for key, label in (("probe_dice", "linear-probe Dice"), ("probe_knn_dice", "kNN Dice"),
                       ("probe_retrieval_top1", "Z retrieval@1"),
                       ("probe_slice_position_r2", "slice position R^2"),
                       ("probe_entropy_2d", "2D prototype entropy"),
                       ("probe_entropy_3d", "3D prototype entropy"),
                       ("probe_z_cosine", "mean cosine of Z")):
        values = np.array(log[key][:n], dtype=float)
        if np.isfinite(values).any():
            ax.plot(x[np.isfinite(values)], values[np.isfinite(values)], marker="o",
                    lw=2 if key == "probe_dice" else 1, label=label)
    ax.set_ylabel("probe (frozen encoder)")
    ax.legend(loc="upper left", fontsize=8)
    ranks = ax.twinx()
    for key, label, style in (("probe_rankme_slices", "RankMe e", "--"), ("probe_rankme_z", "RankMe Z", ":")):
        values = np.array(log[key][:n], dtype=float)
        if np.isfinite(values).any():
            ranks.plot(x[np.isfinite(values)], values[np.isfinite(values)], style, color="grey", marker=".",
                       label=label)
    ranks.set_ylabel("effective rank")
    ranks.legend(loc="upper right", fontsize=8)


class IterationLossFile:
    """``losses.tsv`` in the run folder: one row per training iteration (rank 0's batch), appended as the
    run goes, with the weighted total, each term (empty when inactive) and whether the step was taken.

    Floats are written with ``repr`` so they read back bit for bit. A resumed run first drops the rows of
    iterations it is about to redo (written after the checkpoint it resumes from, or a half-written last
    line), so the file always reads like one uninterrupted run.
    """

    COLUMNS = ("iteration", "epoch", "loss", *[f"L_{t}" for t in LOSS_TERMS], "finite")

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def restart_at(self, iteration: int) -> int:
        """Keep the complete rows of iterations before ``iteration``; returns how many were dropped.

        A file written by a version with other loss columns (one term more or less) keeps its rows: each is
        read by its own header and rewritten in the current columns (empty for a term it did not have)."""
        kept, dropped = [], 0
        if self.path.is_file():
            lines = self.path.read_text().splitlines(keepends=True)
            header = lines[0].rstrip("\n").split("\t") if lines else list(self.COLUMNS)
            for line in lines[1:]:
                fields = line.rstrip("\n").split("\t")
                if line.endswith("\n") and len(fields) == len(header) and int(fields[0]) < iteration:
                    values = dict(zip(header, fields))
                    kept.append("\t".join(values.get(c, "") for c in self.COLUMNS) + "\n")
                else:
                    dropped += 1
        atomic_write_text("\t".join(self.COLUMNS) + "\n" + "".join(kept), self.path)
        return dropped

    def append(self, iteration: int, epoch: int, out: dict) -> None:
        terms = ["" if t not in out else repr(float(out[t])) for t in LOSS_TERMS]
        row = [str(iteration), str(epoch), repr(float(out["loss"])), *terms, str(int(bool(out["finite"])))]
        header = "" if self.path.is_file() else "\t".join(self.COLUMNS) + "\n"
        with open(self.path, "a") as f:
            f.write(header + "\t".join(row) + "\n")

    @classmethod
    def read(cls, path: str | os.PathLike) -> list[dict]:
        """Rows as dicts (floats, None for inactive terms, ints for iteration/epoch, bool for finite)."""
        lines = Path(path).read_text().splitlines()
        rows = []
        for line in lines[1:]:
            values = dict(zip(cls.COLUMNS, line.split("\t")))
            rows.append({k: (int(v) if k in ("iteration", "epoch") else v == "1" if k == "finite"
                             else None if v == "" else float(v)) for k, v in values.items()})
        return rows
