"""A small typed builder: a mapping -> a tree of dataclasses, with errors that name the dotted key; and the
``Args:`` docstring reader that gives each field its meaning (``mkt config``).

Why not a library: the errors must name the dotted key of a YAML file (``schema.tables.item_id.rows: expected
an int, got 'x'``), values are validated by each dataclass's ``_validate(key)``, and YAML 1.1's ``1e-3`` (a
string) must read as a float; the few types the config uses are handled here in one place.

Every value has a size bound, whatever its source (a YAML file, ``--set``, a run's run.json): a list or mapping
holds at most :data:`MAX_ITEMS` entries, a string at most :data:`MAX_CHARS` characters and a free-form (``Any``)
value nests at most :data:`MAX_DEPTH` levels (an int's range is for its field's ``_validate`` to bound).
Messages quote bad values through :func:`short` and a :class:`ConfigError` is at most :data:`MAX_MESSAGE`
characters, so a hostile value cannot make a megabyte of error.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import reprlib
import types
import typing
from typing import Any, Literal, Mapping


MAX_ITEMS = 10_000  # entries of one list or mapping: a schema of 10,000 tables is far past any we know of
MAX_CHARS = 4_096  # characters of one string: PATH_MAX on Linux; paths and URIs are the longest values
MAX_DEPTH = 64  # nesting of a free-form value (our configs nest 5 levels)
MAX_MESSAGE = 600  # characters of one error message: a quoted value is cut, the key it names comes first

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 8
_REPR.maxlevel = 3


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the dotted key (cut at :data:`MAX_MESSAGE`)."""

    def __init__(self, message: str) -> None:
        if len(message) > MAX_MESSAGE:
            message = f"{message[:MAX_MESSAGE]}... ({len(message):,} characters)"
        super().__init__(message)


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to about ``limit`` characters (strings, lists and mappings elided: ``[1, 2, ...]``)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _name(k: Any) -> str:
    """A mapping key as a segment of a dotted key: itself if short and printable, else :func:`short`."""
    return k if isinstance(k, str) and len(k) <= 80 and k.isprintable() else short(k)


def check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def build(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        _check_free_form(value, key)
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return build(non_none[0], value, key)
    if origin is Literal:
        check(value in args, key, f"expected one of {list(args)}, got {short(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        check(isinstance(value, Mapping), key or "config", f"expected a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted((k for k in value if k not in fields), key=str)
        check(not unknown, join(key, _name(unknown[0])) if unknown else key,
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
        check(len(value) <= MAX_ITEMS, key, f"{len(value):,} entries; at most {MAX_ITEMS:,}")
        return {str(k): build(args[1], v, join(key, _name(k))) for k, v in value.items()}
    if origin is list:
        check(isinstance(value, list), key, f"expected a list, got {type(value).__name__}")
        check(len(value) <= MAX_ITEMS, key, f"{len(value):,} items; at most {MAX_ITEMS:,}")
        return [build(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        check(isinstance(value, bool), key, f"expected true/false, got {short(value)}")
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an int, got {short(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {short(value)}")
        return float(value)
    if tp is str:
        if isinstance(value, datetime.date):  # YAML reads an unquoted 2026-11-01 as a date: keep its ISO text
            value = value.isoformat()
        check(isinstance(value, str), key, f"expected a string, got {short(value)}")
        check(len(value) <= MAX_CHARS, key, f"a string of {len(value):,} characters ({short(value)}); at most "
               f"{MAX_CHARS:,}")
        return value
    raise TypeError(f"config type {tp!r} at {key} is not supported")  # a bug in this file, not user input


def _check_free_form(value: Any, key: str) -> None:
    """Bound an ``Any`` value as :func:`build` bounds typed ones: at most :data:`MAX_ITEMS` values in all,
    :data:`MAX_DEPTH` levels, :data:`MAX_CHARS` characters a string (iterative: a deep value cannot recurse)."""
    todo, count = [(value, 0)], 0
    while todo:
        v, depth = todo.pop()
        count += 1
        check(count <= MAX_ITEMS, key, f"more than {MAX_ITEMS:,} values in all")
        check(depth <= MAX_DEPTH, key, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(v, (str, bytes)):
            check(len(v) <= MAX_CHARS, key, f"a string of {len(v):,} characters ({short(v)}); at most {MAX_CHARS:,}")
        elif isinstance(v, (Mapping, list, tuple, set)):
            check(len(v) <= MAX_ITEMS, key, f"{len(v):,} entries; at most {MAX_ITEMS:,}")
            items = [x for kv in v.items() for x in kv] if isinstance(v, Mapping) else v
            todo.extend((x, depth + 1) for x in items)


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
