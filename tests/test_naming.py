"""nnssl_joint.naming: nnU-Net locations from the environment, with errors naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.naming import NnUNetPathError, nnunet_path, nnunet_preprocessed, nnunet_raw, nnunet_results


@pytest.mark.parametrize("variable", ["nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"])
def test_unset_variable_is_named_with_the_fix(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    monkeypatch.delenv(variable, raising=False)
    with pytest.raises(NnUNetPathError) as info:
        nnunet_path(variable)
    assert variable in str(info.value)
    assert f"export {variable}=" in str(info.value)
    assert isinstance(info.value, NnsslJointError)


def test_empty_value_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("nnUNet_raw", "  ")
    with pytest.raises(NnUNetPathError, match="nnUNet_raw is not set"):
        nnunet_raw()


def test_paths_are_read_at_call_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv("nnUNet_raw", str(tmp_path / name))
        monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / name / "pp"))
        monkeypatch.setenv("nnUNet_results", str(tmp_path / name / "res"))
        assert nnunet_raw() == tmp_path / name
        assert nnunet_preprocessed() == tmp_path / name / "pp"
        assert nnunet_results() == tmp_path / name / "res"


def test_raw_must_be_an_existing_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "missing"))
    with pytest.raises(NnUNetPathError, match="is not an existing folder"):
        nnunet_raw()
    assert nnunet_raw(must_exist=False) == tmp_path / "missing"
