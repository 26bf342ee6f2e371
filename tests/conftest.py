"""Fixtures shared by every test folder: a per-module scratch folder that does not outlive its module.

The suite writes nnU-Net datasets, preprocessed data and checkpoints (about 1.9 GB over a whole run when every
folder is kept). ``tmp_path_retention_policy = "failed"`` (pyproject.toml) deletes a passing test's
``tmp_path``; :func:`module_tmp_path` does the same for the data a module's tests share, at the end of the
module, so that at any time the disk holds one module's data, not the whole run's.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

#: node ids of the tests whose setup, call or teardown failed in this session
_FAILED = pytest.StashKey[set]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    if outcome.get_result().failed:
        item.config.stash.setdefault(_FAILED, set()).add(item.nodeid)


@pytest.fixture(scope="module")
def module_tmp_path(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for the data the tests of one module share, deleted after the module when every one of its
    tests passed and kept (under pytest's basetemp) for inspection when one failed."""
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield path
    prefix = request.node.nodeid + "::"
    if not any(nodeid.startswith(prefix) for nodeid in request.config.stash.get(_FAILED, set())):
        shutil.rmtree(path, ignore_errors=True)
