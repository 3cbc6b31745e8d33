"""Strict dataclass configs from TOML files and dicts (standard library only).

`load_config(cls, path, overrides)` reads a TOML file, applies `key=value` command-line overrides,
and builds the dataclass. Every field is type-checked; an unknown key names the file and suggests
the nearest valid one ("unknown key 'learning_rat' in run.toml; did you mean 'learning_rate'?").
Nested dataclasses are TOML tables.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path


class ConfigValueError(ValueError):
    pass


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            return False
        inner = args[0] if args else typing.Any
        return all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def from_dict(cls, data: dict, *, source: str = "config", prefix: str = ""):
    """Build dataclass `cls` from `data`, strictly."""
    if not isinstance(data, dict):
        raise ConfigValueError(f"{source}: '{prefix or cls.__name__}' must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(fields))}"
            raise ConfigValueError(f"{source}: unknown key '{where}'{hint}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = from_dict(annotation, value, source=source, prefix=f"{where}.")
            continue
        if isinstance(value, list) and typing.get_origin(annotation) is tuple:
            value = tuple(value)
        if not _type_ok(value, annotation):
            raise ConfigValueError(f"{source}: '{where}' = {value!r} has the wrong type (expected {_name(annotation)})")
        if annotation is float and isinstance(value, int):
            value = float(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigValueError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigValueError(f"{source}: {prefix}{e}") from None


def _name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def parse_override(text: str) -> tuple[list[str], object]:
    """'a.b=3' -> (['a', 'b'], 3); the value is parsed as TOML, or kept as a string."""
    if "=" not in text:
        raise ConfigValueError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), **values):
    """TOML file, then keyword values, then `key=value` overrides (later wins)."""
    data: dict = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigValueError(f"{path}: not valid TOML ({e})") from None
    data.update(values)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return from_dict(cls, data, source=source)


def to_dict(config) -> dict:
    """A plain dict (TOML-writable: None values dropped, tuples as lists)."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return clean(dataclasses.asdict(config))


def dumps_toml(data: dict, _prefix: str = "") -> str:
    """Minimal TOML writer for configs: scalars, lists of scalars, nested tables."""
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    out = "\n".join(lines)
    for key, value in tables:
        out += f"\n\n[{_prefix}{key}]\n" + dumps_toml(value, f"{_prefix}{key}.")
    return out.strip() + "\n"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
