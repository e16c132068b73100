"""YAML for config files and ``--set`` values: ``yaml.safe_load`` with what no hand-written config needs refused.

PyYAML's ``safe_load`` runs no code, but it keeps the last of two equal keys silently, expands aliases without
limit and recurses once per nesting level. A config is small and written by a person, so :func:`load` refuses,
with a one-line :class:`~mkt_torchrec.typed.ConfigError` naming the file and line (``configs/x.yaml:7: ...``):

* a key twice in one mapping, at any level (``safe_load`` kept the last: a second ``data:`` section put every key
  of the first back to its default); the message names the lines of both;
* anchors, aliases and merge keys (``&a``, ``*a``, ``<<:``): 3.8 KB of nested aliases expand past 3 GB (the
  "billion laughs"); no shipped config uses them, and writing a value out twice is cheap;
* nesting deeper than :data:`~mkt_torchrec.typed.MAX_DEPTH` levels (PyYAML's composer recursed into a RecursionError at about 1,000);
* a list or mapping of more than :data:`~mkt_torchrec.typed.MAX_ITEMS` entries, a scalar of more than
  :data:`~mkt_torchrec.typed.MAX_CHARS` characters, a file of more than :data:`MAX_FILE_CHARS` characters.

Everything else reads as ``yaml.safe_load`` reads it (YAML 1.1: ``yes`` is true, ``1e-3`` a string, syntax
errors are ``yaml.YAMLError`` with the file's name in their marks). The typed builder
(:func:`mkt_torchrec.typed.build`) bounds the same sizes again for configs that do not come from YAML (run.json).

Example:
    >>> load("data: {batch_size: 64}", "--set data")
    {'data': {'batch_size': 64}}
"""

from __future__ import annotations

from typing import Any, NoReturn, TextIO, Union

import yaml
from yaml.error import Mark
from yaml.events import AliasEvent, NodeEvent, ScalarEvent
from yaml.nodes import MappingNode, Node

from mkt_torchrec.typed import MAX_CHARS, MAX_DEPTH, MAX_ITEMS, ConfigError, short

# MAX_DEPTH (64): our configs nest 5 levels (schema.tables.item_id.rows); PyYAML's recursion ends near 1,000
MAX_FILE_CHARS = 4 * 1024 * 1024  # a schema of 10,000 features is about 1 MB of YAML; configs/ are under 10 KB

_MERGE = "tag:yaml.org,2002:merge"


class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys, anchors / aliases / merge keys, and bounds nesting depth,
    entries per collection and scalar length; errors are :class:`ConfigError` naming ``source`` and the line.

    Args:
        text: the YAML text.
        source: what errors name: a file's path, or ``override KEY`` for a ``--set`` value.
        lines: name the line after ``source`` (``path:7``); off for a one-line ``--set`` value.
    """

    def __init__(self, text: str, source: str, lines: bool = True) -> None:
        super().__init__(text)
        self.name = source  # in the marks of PyYAML's own syntax errors, as when it reads an open file
        self.source = source
        self.lines = lines
        self.depth = 0

    def where(self, mark: Mark) -> str:
        return f"{self.source}:{mark.line + 1}" if self.lines else self.source

    def refuse(self, mark: Mark, message: str) -> NoReturn:
        raise ConfigError(f"{self.where(mark)}: {message}")

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            self.refuse(event.start_mark, f"alias *{event.anchor[:40]}: anchors and aliases are not "
                                          "allowed in a config (write the value out)")
        if isinstance(event, NodeEvent) and event.anchor is not None:
            self.refuse(event.start_mark, f"anchor &{event.anchor[:40]}: anchors and aliases are not "
                                          "allowed in a config (write the value out)")
        if isinstance(event, ScalarEvent) and len(event.value) > MAX_CHARS:
            self.refuse(event.start_mark, f"a value of {len(event.value):,} characters ({short(event.value)}); "
                                          f"at most {MAX_CHARS:,}")
        if parent is not None and len(parent.value) >= MAX_ITEMS:
            start = f" (the one from line {parent.start_mark.line + 1})" if self.lines else ""
            self.refuse(event.start_mark, f"more than {MAX_ITEMS:,} entries in one list or mapping{start}")
        if self.depth >= MAX_DEPTH:
            self.refuse(event.start_mark, f"nested more than {MAX_DEPTH} levels deep")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        if isinstance(node, MappingNode):
            first: dict[Any, Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    self.refuse(key_node.start_mark, "merge keys (<<) are not allowed in a config (write the keys "
                                                     "out)")
                key = self.construct_object(key_node, deep=deep)
                try:
                    seen = first.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: SafeConstructor names it
                    continue
                if seen is not key_node.start_mark:
                    self.refuse(key_node.start_mark, f"duplicate key {short(key)}: also at {self.where(seen)} "
                                                     "(a key may appear once in a mapping; YAML would keep the last)")
        return super().construct_mapping(node, deep=deep)


def load(stream: Union[str, TextIO], source: str) -> Any:
    """The value of one YAML document, read as ``yaml.safe_load`` does with the limits above.

    Args:
        stream: an open text file (at most :data:`MAX_FILE_CHARS` characters are read), or YAML text (a ``--set``
            value: errors name its line only if it has several).
        source: named by errors: the file's path, or ``override KEY``.

    Raises:
        ConfigError: a duplicate key, an anchor / alias / merge key, or a size or depth over its bound.
        yaml.YAMLError: not valid YAML (as ``yaml.safe_load``).
    """
    text = stream if isinstance(stream, str) else stream.read(MAX_FILE_CHARS + 1)
    if len(text) > MAX_FILE_CHARS:
        raise ConfigError(f"{source}: more than {MAX_FILE_CHARS:,} characters: too large for a config "
                          f"(configs/ hold a few KB)")
    loader = BoundedLoader(text, source, lines=not isinstance(stream, str) or "\n" in text.rstrip("\n"))
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
