from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from nnssl_joint.common.typed_config import Layer, build, layers_from, load_layered, read_json_file
from nnssl_joint.errors import NnsslJointError


@dataclass
class Inner:
    size: int | str = "auto"
    rate: float = 0.5
    name: str = "x"

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ValueError(f"rate must be >= 0, got {self.rate}")


@dataclass
class Outer:
    seed: int | None = 0
    flag: bool = False
    shape: tuple[int, int] = (1, 2)
    inner: Inner = field(default_factory=Inner)


def test_layers_merge_in_order_nested_and_record_the_keys_they_set():
    loaded = load_layered(Outer, [Layer("plans", {"inner": {"size": 4, "rate": 1}}),
                                  Layer("file.json", {"inner": {"size": 8}, "seed": None, "shape": [3, 4]})])
    assert loaded.config == Outer(seed=None, shape=(3, 4), inner=Inner(size=8, rate=1))
    assert loaded.sources == ("defaults", "plans", "file.json")
    assert loaded.explicit_keys == {"inner.size", "inner.rate", "seed", "shape"}


@pytest.mark.parametrize("values, message", [
    ({"sead": 1}, ("file.json: unknown key 'sead'; valid keys at this level: ['flag', 'inner', 'seed', "
                   "'shape']")),
    ({"inner": {"sise": 1}}, "file.json: unknown key 'inner.sise'"),
    ({"flag": 1}, "file.json: key 'flag' must be true or false, got 1 (int)"),
    ({"seed": 1.5}, "file.json: key 'seed' must be an integer or null, got 1.5 (float)"),
    ({"inner": {"rate": "fast"}}, "file.json: key 'inner.rate' must be a number, got 'fast' (str)"),
    ({"inner": {"size": [1]}}, "file.json: key 'inner.size' must be an integer or a string, got [1] (list)"),
    ({"inner": 3}, "file.json: key 'inner' must be a JSON object, got 3 (int)"),
])
def test_errors_name_source_key_and_expected_type(values, message):
    with pytest.raises(NnsslJointError) as e:
        load_layered(Outer, [Layer("file.json", values)])
    assert str(e.value).startswith(message)


def test_value_errors_of_the_dataclass_name_the_sources():
    with pytest.raises(NnsslJointError, match=r"defaults <- a.json: rate must be >= 0, got -1"):
        load_layered(Outer, [Layer("a.json", {"inner": {"rate": -1}})])
    assert build(Inner, {"rate": 2}).rate == 2


def test_sources_from_plans_section_and_environment_file(tmp_path, monkeypatch):
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"seed": 3}))
    monkeypatch.setenv("MY_CONFIG", str(f))
    layers = layers_from({"section": {"flag": True}}, "section", "MY_CONFIG")
    assert [layer.source for layer in layers] == ["plans section 'section'", str(f)]
    assert load_layered(Outer, layers).config == Outer(seed=3, flag=True)
    monkeypatch.delenv("MY_CONFIG")
    assert layers_from(None, "section", "MY_CONFIG") == []


def test_bad_files_are_named_with_the_fix(tmp_path):
    with pytest.raises(NnsslJointError, match="MY_CONFIG=nope does not name a file"):
        read_json_file(tmp_path / "nope.json", "MY_CONFIG=nope")
    broken = tmp_path / "broken.json"
    broken.write_text("{oops")
    with pytest.raises(NnsslJointError, match=f"{broken}: not valid JSON"):
        read_json_file(broken, "MY_CONFIG")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(NnsslJointError, match="expected a JSON object of configuration keys, got list"):
        read_json_file(listed, "MY_CONFIG")
