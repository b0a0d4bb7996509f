"""Typed command configs: frozen dataclasses loaded from YAML plus `key=value` overrides.

Every command has one config dataclass whose fields carry `metadata={"help": ...}` (plus `"choices"`
for a free string checked against a set: that constant, for help texts) and whose `__post_init__`
validates with messages that say how to fix the value. `load_config` merges a YAML file and dotted
CLI overrides (`scale.n_products=500`), converts values to the declared field types, rejects unknown
keys by name and names the required keys given nowhere (`MissingConfigKeys`). It lives in `schemas/`
(the ground floor) so that `abtest/` and `evaluation/` can use it without importing `jobs/`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names it and says what is accepted."""


class MissingConfigKeys(ConfigError):
    """Required keys (no default) given nowhere; `keys` are dotted (`score.date`), for the CLI to name its flags."""

    def __init__(self, keys: list[str]):
        self.keys = keys
        super().__init__(f"missing required key{'s' if len(keys) > 1 else ''} {', '.join(keys)}")


def config_date(value: Any, field: str = "date") -> dt.date:
    """A config field's YYYY-MM-DD value as a date; a ConfigError naming the field otherwise.

    Exactly that form: `date.fromisoformat` alone also takes `20240313` and `2024-W11-3`."""
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value, flags=re.ASCII):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            pass  # the form is right, the day is not (2024-02-30)
    raise ConfigError(f"{field}: must look like YYYY-MM-DD, got {value!r}")


def help_field(help: str, default: Any = dataclasses.MISSING, choices: Sequence[str] = (), **kwargs: Any) -> Any:
    """A dataclass field with help text (and the values a free string accepts, `choices`); no default: a required
    key. Mutable defaults go through `default_factory`."""
    metadata = {"help": help, "choices": tuple(choices)} if choices else {"help": help}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def is_required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def field_choices(field: dataclasses.Field, annotation: Any) -> tuple[Any, ...]:
    """The values a field accepts when they are a fixed set: a `Literal`'s (also inside `X | None`), or its
    `choices` metadata; () otherwise."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    literal = next((option for option in options if typing.get_origin(option) is typing.Literal), None)
    return typing.get_args(literal) if literal is not None else field.metadata.get("choices", ())


def check_choices(config: Any) -> None:
    """ConfigError naming the first field of `config` whose value is outside the `choices` its `help_field` declares."""
    for field in dataclasses.fields(config):
        allowed = field.metadata.get("choices", ())
        if allowed and getattr(config, field.name) not in allowed:
            raise ConfigError(f"{field.name}: {getattr(config, field.name)!r} is not one of {list(allowed)}")


def _convert(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{where}: {value!r} fits none of {annotation}: {'; '.join(errors)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {annotation.__name__} fields, got {value!r}")
        return _build(annotation, value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_convert(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = args if args else (Any, Any)
        return {_convert(k, key_type, where): _convert(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation in (int, float, str, Path):
        if annotation in (int, float) and isinstance(value, bool):  # int(True) would pass as 1
            raise ConfigError(f"{where}: expected {'a whole number' if annotation is int else 'a number'}, got {value!r}")
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        try:
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
    return value


def _build(cls: type[T], values: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown keys {unknown}; known keys: {sorted(known)}")
    kwargs = {
        name: _convert(value, hints[name], f"{where}.{name}" if where else name) for name, value in values.items()
    }
    missing = [f.name for f in dataclasses.fields(cls) if f.init and is_required(f) and f.name not in values]
    if missing:  # checked here: the constructor's TypeError would name its __init__, not the keys
        raise MissingConfigKeys([f"{where}.{name}" if where else name for name in missing])
    return cls(**kwargs)


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = target
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x,y"]` -> nested dict; values are parsed as YAML scalars (`1`, `true`, `[1, 2]`)."""
    result: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value (dotted keys for sections)")
        _set_dotted(result, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return result


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> T:
    """Build `cls` from a YAML file, then `key=value` overrides, then already-typed `values` (last wins)."""
    loaded_values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of keys to values")
        loaded_values = loaded
    merged = _merge(_merge(loaded_values, parse_overrides(overrides or [])), values or {})
    return _build(cls, merged, "")


def config_to_dict(config: Any, settable_only: bool = False) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config (paths as strings), for manifests and logs; `settable_only`: without
    the fields a config derives itself (init=False), so the dict loads back as a config file."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init or not settable_only}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(config)
