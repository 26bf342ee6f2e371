"""Shared fixtures for the ssl tests: a robust launcher for small CPU/gloo multi-process runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

RANK_TIMEOUT_S = 90.0
#: what a gloo rank prints when it aborts while its process group is torn down, after its results are written
#: (1 of 2 fresh-clone CI runs of test_centering_ddp, 2026-12-05, despite its barrier before the teardown):
#: retried like a port taken by someone else; a run that fails for any other reason is not retried
TEARDOWN_ABORT = "terminate called without an active exception"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launch(script: Path, world_size: int, out_dir: Path) -> tuple[bool, str]:
    """Start ``world_size`` processes of ``script``; returns (success, combined output)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    port = _free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(world_size), str(port), str(out_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + RANK_TIMEOUT_S
    outputs: list[str] = []
    timed_out = False
    for process in processes:
        try:
            out, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            for other in processes:
                other.kill()
            out, _ = process.communicate()
        outputs.append(out or "")
    text = "\n".join(f"--- rank {rank} ---\n{out}" for rank, out in enumerate(outputs))
    if timed_out:
        return False, f"timed out after {RANK_TIMEOUT_S} s\n{text}"
    return all(p.returncode == 0 for p in processes), text


@pytest.fixture
def run_ranks(tmp_path: Path) -> Callable[[Path, int], Path]:
    """Run ``python script RANK WORLD_SIZE PORT OUT_DIR`` on ``world_size`` ranks; returns OUT_DIR.

    Each rank initialises gloo on 127.0.0.1:PORT itself and writes its results into OUT_DIR.
    A port grabbed by someone else between probing and binding is retried with a new port, and so is a rank
    that aborted in gloo's teardown (``TEARDOWN_ABORT``), at most 3 attempts in all.
    """

    def run(script: Path, world_size: int = 2) -> Path:
        text = ""
        for _attempt in range(3):
            ok, text = _launch(script, world_size, tmp_path)
            if ok:
                return tmp_path
            if "address already in use" not in text.lower() and TEARDOWN_ABORT not in text:
                break
        pytest.fail(f"distributed run of {script.name} failed:\n{text}")

    return run
