"""One loader for every JSON configuration of the plugin: defaults <- plans section <- JSON file.

The plugin's configurations (pretraining, fine-tuning, benchmark budgets) are dataclasses whose fields
carry their defaults and type annotations. :func:`load_layered` merges partial, nested JSON objects into
those defaults, in order, and builds the dataclass. Every source is checked against the annotations
before anything is built, and every error names the source (file or plans section), the dotted key and
the expected type, e.g. ``cfg.json: key 'optim.lr' must be a number, got 'fast' (str)``. Validation of
values (ranges, choices) stays in the dataclasses' ``__post_init__``; its ``ValueError`` is reported with
the sources that were merged.

Plain Python only (no torch, no nnU-Net), so light modules can use it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from nnssl_joint.errors import NnsslJointError

T = TypeVar("T")

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               type(None): "null", dict: "a JSON object", list: "a list"}


@dataclasses.dataclass(frozen=True)
class Layer:
    """One source of values: where it came from (for messages) and its partial, nested values."""

    source: str
    values: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Loaded:
    """The built configuration, the sources merged (``"defaults"`` first) and the dotted keys any source
    set."""

    config: Any
    sources: tuple[str, ...]
    explicit_keys: frozenset[str]


def read_json_file(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; ``what`` says how the user named the file (e.g.
    ``NNSSL_JOINT_CONFIG=...``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise NnsslJointError(f"{what} does not name a file; point it at a JSON file or unset it")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NnsslJointError(f"{path}: not valid JSON ({e}); fix the file named by {what}") from e
    if not isinstance(values, dict):
        raise NnsslJointError(f"{path}: expected a JSON object of configuration keys, got "
                              f"{type(values).__name__}; fix the file named by {what}")
    return values


def layers_from(plans_configuration: Mapping[str, Any] | None, plans_section: str | None,
                env_var: str | None) -> list[Layer]:
    """The usual sources: the plans configuration's ``plans_section`` and the file named by ``env_var``."""
    layers = []
    if plans_section and plans_configuration and plans_section in plans_configuration:
        layers.append(Layer(f"plans section '{plans_section}'", plans_configuration[plans_section]))
    env_file = os.environ.get(env_var, "") if env_var else ""
    if env_file:
        layers.append(Layer(env_file, read_json_file(env_file, f"{env_var}={env_file}")))
    return layers


def load_layered(cls: type[T], layers: list[Layer]) -> Loaded:
    """Defaults of ``cls`` <- each layer in order; returns the built dataclass with its provenance."""
    merged: dict[str, Any] = {}
    explicit: set[str] = set()
    for layer in layers:
        if not isinstance(layer.values, Mapping):
            raise NnsslJointError(f"{layer.source}: expected a JSON object, got "
                                  f"{type(layer.values).__name__}")
        check_values(cls, layer.values, layer.source)
        _deep_update(merged, layer.values, "", explicit)
    sources = ("defaults", *(layer.source for layer in layers))
    return Loaded(build(cls, merged, " <- ".join(sources)), sources, frozenset(explicit))


def build(cls: type[T], values: Mapping[str, Any], where: str = "configuration") -> T:
    """``cls`` with ``values`` (partial, nested) over its defaults; type-checked, value errors name
    ``where``."""
    check_values(cls, values, where)
    try:
        return _build(cls, values)
    except (ValueError, TypeError) as e:  # NnsslJointError is a ValueError: its message gains the sources too
        raise NnsslJointError(f"{where}: {e}") from e


def check_values(cls: type, values: Mapping[str, Any], where: str, prefix: str = "") -> None:
    """Every key of ``values`` is a field of ``cls`` and every value fits the field's annotation."""
    hints = _hints(cls)
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise NnsslJointError(f"{where}: unknown key '{dotted}'; valid keys at this level: "
                                  f"{sorted(hints)}")
        annotation = hints[key]
        nested = _dataclass_of(annotation)
        if nested is not None and isinstance(value, Mapping):
            check_values(nested, value, where, f"{dotted}.")
            continue
        if not _fits(value, annotation):
            raise NnsslJointError(f"{where}: key '{dotted}' must be {describe_type(annotation)}, got "
                                  f"{value!r} ({type(value).__name__})")


def describe_type(annotation: Any) -> str:
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    names = []
    for option in options:
        if dataclasses.is_dataclass(option):
            names.append("a JSON object")
        elif typing.get_origin(option) is typing.Literal:
            names.append(" or ".join(repr(a) for a in typing.get_args(option)))
        else:
            names.append(_TYPE_NAMES.get(typing.get_origin(option) or option, str(option)))
    return " or ".join(dict.fromkeys(names))


# ----------------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if f.init and not f.name.startswith("_") and not f.metadata.get("internal")}


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _dataclass_of(annotation: Any) -> type | None:
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    for option in options:
        if dataclasses.is_dataclass(option):
            return option
    return None


def _fits(value: Any, annotation: Any) -> bool:
    if annotation is Any:
        return True
    if _is_union(annotation):
        return any(_fits(value, option) for option in typing.get_args(annotation))
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin in (dict, Mapping):
        return isinstance(value, Mapping)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:  # JSON writes 1.0 as 1
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, (Mapping, annotation))
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def _deep_update(target: dict[str, Any], values: Mapping[str, Any], prefix: str, explicit: set[str]) -> None:
    for key, value in values.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _deep_update(target[key], value, f"{prefix}{key}.", explicit)
        else:
            target[key] = dict(value) if isinstance(value, Mapping) else value
            if isinstance(value, Mapping):
                explicit.update(f"{prefix}{key}.{k}" for k in _dotted(value))
            else:
                explicit.add(f"{prefix}{key}")


def _dotted(values: Mapping[str, Any]) -> list[str]:
    out = []
    for key, value in values.items():
        out += [f"{key}.{k}" for k in _dotted(value)] if isinstance(value, Mapping) and value else [key]
    return out


def _build(cls: type[T], values: Mapping[str, Any]) -> T:
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        nested = _dataclass_of(hints[key])
        if nested is not None and isinstance(value, Mapping):
            value = _build(nested, value)
        elif isinstance(value, list) and typing.get_origin(hints[key]) is tuple:
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)
