"""Shared data of the reliability tests: one tiny prepared + preprocessed 2D/3D dataset and one
uninterrupted, seeded reference pretraining run on it (4 epochs x 5 iterations, a checkpoint every epoch),
which the determinism and kill/resume tests compare against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from reliability_helpers import (
    BASE_ID,
    REFERENCE_CONFIG,
    Workspace,
    pngs,
    prepare_and_plan,
    train_cli,
    volumes,
    write_config,
    write_dataset,
)


@pytest.fixture(scope="session")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """3 volumes (8-12 slices) and 4 PNGs, 32 x 32, merged into Dataset900_Base and preprocessed."""
    root = tmp_path_factory.mktemp("reliability")
    ws = Workspace.create(root)
    rng = np.random.default_rng(0)
    write_dataset(ws.raw, 501, "Vols", volumes(rng, [10, 8, 12]),
                  spacings={f"vol{i}": (2.0, 1.0, 1.0) for i in range(3)})
    write_dataset(ws.raw, 502, "Pngs", pngs(rng, 4), channel_names={"0": "Xray"}, file_ending=".png")
    name = prepare_and_plan(ws, [501, 502], BASE_ID, "Base")
    return {"root": root, "ws": ws, "dataset": name}


@pytest.fixture(scope="session")
def reference(base: dict) -> dict:
    """The uninterrupted run every other run of this configuration must reproduce bit for bit."""
    root: Path = base["root"]
    ws = Workspace.create(root / "reference", raw=base["ws"].raw, pre=base["ws"].pre)
    config = write_config(root / "reference.json", REFERENCE_CONFIG)
    res = train_cli(ws, BASE_ID, config)
    return {"ws": ws, "config": config, "run_dir": ws.run_dir(base["dataset"]),
            "log": res.stdout + res.stderr}
