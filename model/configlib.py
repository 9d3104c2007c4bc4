"""Typed, nested dataclass configs loaded from YAML with dotted overrides.

Every config section is a ``@dataclass`` whose fields carry their documentation in
``field(metadata={"help": ...})``. Loading walks the YAML mapping against the
dataclass fields and rejects unknown keys and wrong types with a
:class:`ConfigError` that names the dotted key, the bad value and what is allowed.
Sections validate value ranges in their ``validate()`` method.

A class may hold *open sections*: one field marked ``doc(..., sections=True)`` (a dict
of section name -> section dataclass) whose entries are written and read as keys of the
class itself, typed by ``cls.config_sections(data)`` (name -> dataclass) and written by
``obj.saved_sections()``. :class:`model.config.ModelConfig` resolves the architectures'
sections (``model.moe``, ...) through the spec registry this way.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import typing
from typing import Any, get_args, get_origin

import yaml

from polytron.model.errors import PolytronError


class ConfigError(PolytronError, ValueError):
    """A bad configuration value. The message names the key, value and what is allowed."""


def doc(text: str, **kw) -> dict:
    """Field metadata carrying the field's docstring."""
    return {"help": text, **kw}


def bad(key: str, value: Any, allowed: str) -> ConfigError:
    """Build the one-line error for a bad value."""
    return ConfigError(f"config key '{key}': got {value!r}; allowed: {allowed}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints widen to float)."""
    origin = get_origin(tp)
    if origin is typing.Union:
        for arg in get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise bad(key, value, _type_name(tp))
    if origin is typing.Literal:
        if value in get_args(tp):
            return value
        raise bad(key, value, _type_name(tp))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad(key, value, _type_name(tp))
        (elem,) = get_args(tp)[:1] or (Any,)
        return [_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise bad(key, value, "null")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad(key, value, f"a mapping of {tp.__name__} fields")
        return from_dict(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad(key, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad(key, value, "an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise bad(key, value, "a number")
        if not math.isfinite(number):
            raise bad(key, value, "a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad(key, value, "a string")
    raise bad(key, value, _type_name(tp))


def _is_sections(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("sections"))


def open_sections(cls: Any, data: Any = None) -> dict[str, type]:
    """Section name -> dataclass of the open sections ``cls`` (a dataclass type) resolves
    through its ``config_sections`` (empty if it has no open sections)."""
    if not any(_is_sections(f) for f in dataclasses.fields(cls)):
        return {}
    return cls.config_sections(data if isinstance(data, dict) else None)


def _flatten_sections(cls: type, data: dict) -> dict:
    """``dataclasses.asdict`` nests open sections under their field; read them as keys."""
    for f in dataclasses.fields(cls):
        if _is_sections(f) and isinstance(data.get(f.name), dict):
            return {**{k: v for k, v in data.items() if k != f.name}, **data[f.name]}
    return data


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init and not _is_sections(f)}
    data = _flatten_sections(cls, data)
    sections = open_sections(cls, data)
    for k in data:
        if k not in names and k not in sections:
            raise ConfigError(
                f"unknown config key '{prefix}{k}'; allowed keys in "
                f"'{prefix.rstrip('.') or 'top level'}': {', '.join(sorted(names | set(sections)))}")
    kwargs = {k: _coerce(prefix + k, v, hints[k] if k in names else sections[k]) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain-data (YAML-safe) view of a config dataclass (as ``dataclasses.asdict``, with
    open sections written as keys of their owner)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        owner: Any = obj                      # a config with open sections has saved_sections()
        out = {}
        for f in dataclasses.fields(obj):
            if _is_sections(f):
                out.update({name: to_dict(s) for name, s in owner.saved_sections().items()})
            else:
                out[f.name] = to_dict(getattr(obj, f.name))
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_dict(v) for v in obj)
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if key.startswith("set."):
        key = key[4:]
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    """Set ``data[path[0]][path[1]]... = value``, creating mappings as needed."""
    node = data
    for p in path[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{'.'.join(path)}': '{p}' is not a section")
        node = nxt
    node[path[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error
    (plain PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str) -> dict:
    """Read a YAML mapping with one clear error for a missing file, bad syntax or a
    duplicate key."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a YAML file: {path}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"YAML syntax error in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def field_docs(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, help, default) for every field, recursively; used for --help-config."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_sections(f):
            for name, section in open_sections(cls).items():
                out += field_docs(section, prefix + name + ".")
            continue
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out += field_docs(tp, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append((prefix + f.name, f.metadata.get("help", ""), default))
    return out
