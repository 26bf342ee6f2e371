"""The installed layout: nnU-Net finds every plugin trainer, from an editable checkout and from a
built wheel; pyproject's package list is complete; the console script answers --help."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]


def _trainer_classes(folder: Path) -> list[str]:
    """Names of the nnUNetTrainer subclasses defined in the trainer modules (parsed, not imported)."""
    names = []
    for path in sorted(folder.glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.bases:
                names.append(node.name)
    return names


def _lookup_script(names: list[str]) -> str:
    return (
        "import sys\n"
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name\n"
        f"for name in {names!r}:\n"
        "    cls = recursive_find_trainer_class_by_name(name)\n"
        # nnU-Net drops the module from sys.modules after the lookup; a method's code knows the file
        "    code = next(v.__code__ for v in vars(cls).values() if hasattr(v, '__code__'))\n"
        "    print('FOUND', name, code.co_filename)\n"
    )


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def test_package_list_is_complete():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "nnssl_joint").rglob("__init__.py")}
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert config["package-dir"]["nnssl_joint.trainers"] == "trainers"
    assert config["package-dir"]["nnssl_joint.presets"] == "plans"


def test_trainer_folder_holds_trainer_modules_only():
    names = _trainer_classes(REPO / "trainers")
    assert "JointSSLPretrainTrainer" in names
    for path in (REPO / "trainers").glob("*.py"):
        if path.name != "__init__.py":
            assert "nnUNetTrainer" in path.read_text(), f"{path.name} is not a trainer module"


def test_cli_help_and_trainer_path_editable(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nnssl_joint.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("trainer-path", "make-synthetic", "prepare", "plan_and_preprocess", "export"):
        assert command in out
        sub = subprocess.run([sys.executable, "-m", "nnssl_joint.cli", command, "--help"],
                             capture_output=True, text=True, check=False)
        assert sub.returncode == 0 and "usage" in sub.stdout, sub.stderr
    path = subprocess.run([sys.executable, "-m", "nnssl_joint.cli", "trainer-path"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert Path(path) == REPO / "trainers"
    names = _trainer_classes(REPO / "trainers")
    res = subprocess.run([sys.executable, "-c", _lookup_script(names)], capture_output=True, text=True,
                         env=_env(nnUNet_extTrainer=path), cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in names:
        assert f"FOUND {name} {path}" in res.stdout


def test_built_wheel_ships_trainers_and_nnunet_finds_them(tmp_path):
    pytest.importorskip("build")
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o",
                            str(tmp_path / "dist"), str(REPO)], check=False, capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("nnssl_joint-*.whl"))
    members = zipfile.ZipFile(wheel).namelist()
    for name in ("nnssl_joint/trainers/nnssl_joint_pretrain.py", "nnssl_joint/presets/cpu.json",
                 "nnssl_joint/presets/gpu.json", "nnssl_joint/ssl/sinkhorn.py"):
        assert name in members
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                    str(site), str(wheel)], check=True, capture_output=True)
    # the installed copy must shadow the editable checkout: PYTHONPATH comes first on sys.path
    env = _env(PYTHONPATH=str(site))
    path = subprocess.run([sys.executable, "-m", "nnssl_joint.cli", "trainer-path"], capture_output=True,
                          text=True, check=True, env=env, cwd=tmp_path).stdout.strip()
    assert Path(path) == site / "nnssl_joint" / "trainers"
    names = _trainer_classes(Path(path))
    res = subprocess.run([sys.executable, "-c", _lookup_script(names)], capture_output=True, text=True,
                         env=_env(PYTHONPATH=str(site), nnUNet_extTrainer=path), cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in names:
        assert f"FOUND {name} {path}" in res.stdout
