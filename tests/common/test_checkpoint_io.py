import os

import pytest
import torch

from nnssl_joint.common.checkpoint_io import atomic_torch_save, atomic_write_text


def test_atomic_writes_replace_the_target_and_leave_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "checkpoint.pth"
    atomic_torch_save({"a": torch.arange(3)}, target)
    atomic_torch_save({"a": torch.arange(4)}, target)
    assert torch.equal(torch.load(target)["a"], torch.arange(4))
    atomic_write_text("hello", tmp_path / "note.txt")
    assert (tmp_path / "note.txt").read_text() == "hello"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["checkpoint.pth", "note.txt"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "checkpoint.pth"
    atomic_torch_save({"a": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"a": Unpicklable()}, target)
    assert torch.load(target) == {"a": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
