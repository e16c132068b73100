"""A small typed builder: a mapping -> a tree of dataclasses, with errors that name the dotted key; and the
``Args:`` docstring reader that gives each field its meaning (``mkt config``).

Why not a library: the errors must name the dotted key of a YAML file (``schema.tables.item_id.rows: expected
an int, got 'x'``), values are validated by each dataclass's ``_validate(key)``, and YAML 1.1's ``1e-3`` (a
string) must read as a float; the few types the config uses are handled here in one place.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import types
import typing
from typing import Any, Literal, Mapping


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the dotted key."""




def check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def build(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return build(non_none[0], value, key)
    if origin is Literal:
        check(value in args, key, f"expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        check(isinstance(value, Mapping), key or "config", f"expected a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        check(not unknown, join(key, str(unknown[0])) if unknown else key,
               f"unknown key; expected one of {sorted(fields)}")
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = build(hints[name], value[name], join(key, name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                raise ConfigError(f"{join(key, name)}: missing required key")
        return tp(**kwargs)
    if origin is dict:
        check(isinstance(value, Mapping), key, f"expected a mapping, got {type(value).__name__}")
        return {str(k): build(args[1], v, join(key, str(k))) for k, v in value.items()}
    if origin is list:
        check(isinstance(value, list), key, f"expected a list, got {type(value).__name__}")
        return [build(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, datetime.date):  # YAML reads an unquoted 2026-11-01 as a date: keep its ISO text
            value = value.isoformat()
        check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"config type {tp!r} at {key} is not supported")  # a bug in this file, not user input


def validate_tree(obj: Any, key: str) -> None:
    """Call ``_validate(key)`` on every dataclass in the tree that defines it."""
    if dataclasses.is_dataclass(obj):
        if hasattr(obj, "_validate"):
            obj._validate(key)
        for f in dataclasses.fields(obj):
            validate_tree(getattr(obj, f.name), join(key, f.name))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if dataclasses.is_dataclass(v):
                validate_tree(v, join(key, str(k)))




def arg_docs(cls: type) -> dict[str, str]:
    """Field name -> its line(s) in the class docstring's ``Args:`` section (``a / b: text`` documents both)."""
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    names: list[str] = []
    in_args = False
    for line in doc.splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if not in_args or not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        head, sep, text = line.strip().partition(":")
        if indent <= 4 and sep and all(n.strip().isidentifier() for n in head.split("/")):
            names = [n.strip() for n in head.split("/")]
            for n in names:
                out[n] = text.strip()
        elif names:
            for n in names:
                out[n] += " " + line.strip()
    return out


def entry_type(cls: type, name: str) -> Any:
    """The dataclass a ``list[...]`` / ``dict[str, ...]`` field of ``cls`` holds, or None (``mkt config`` lists
    the keys of one entry of an empty one)."""
    args = typing.get_args(typing.get_type_hints(cls)[name])
    return args[-1] if args and dataclasses.is_dataclass(args[-1]) else None
