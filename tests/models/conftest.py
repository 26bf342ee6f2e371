"""Shared fixtures of the tests/models files: import a benchmark script of scripts/ as a module, and put
torch's thread count back after a benchmark's ``main`` changed it."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def load_script() -> Iterator[Callable[[str], ModuleType]]:
    """``load_script("bench_attention")`` imports scripts/bench_attention.py (registered in sys.modules so
    dataclasses and pickling inside it work); the modules leave sys.modules with the test module."""
    loaded: list[str] = []

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loaded.append(name)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


@pytest.fixture
def restore_torch_threads() -> Iterator[None]:
    """The benchmark scripts set torch's thread count (``--threads``); the tests after them get it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
