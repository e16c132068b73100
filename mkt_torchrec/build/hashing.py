"""The one 64-bit id hash of ``mkt build``, reproducible by an online system in any language.

**Definition.** A string value ``s`` (an id, a category; an integer hashed by ``transform: hash`` is first written
in decimal, ``123``; a boolean as ``true`` / ``false``) becomes::

    id(s) = int(md5(utf8(s)).hexdigest()[:15], 16)        # the first 60 bits of MD5, a non-negative int64

and with ``by_entity: true`` the hashed text is ``"source|" + s`` or ``"target|" + s``. Test vector:
``id("abc") = 648541476951500027`` (md5 ``900150983cd24fb0...``), ``id("source|abc") = 246645285092654989``.

Why MD5's first 60 bits: every engine has MD5 built in (DuckDB, Spark SQL, Hive, Flink, Presto, BigQuery, Redis
scripts, every language's standard library), so the id an online server computes is the one training saw, with
no library to pin; 60 bits keep ids non-negative (``id_mapping: modulo`` needs that) and below the converters'
reserved ``MISSING_RAW`` (2**61 - 1); two of a billion distinct values collide with probability ~4e-10. The id is
a raw id: the reader still maps it to a table row per table (:func:`mkt_torchrec.data.schema.map_ids`).

In SQL the hash is written ``mkt_hash(text)``; :func:`render` replaces it with each engine's own expression.
"""

from __future__ import annotations

import hashlib

import sqlglot
from sqlglot import exp

HASH_BITS = 60
ENTITY_PREFIXES = ("source|", "target|")

# mkt_hash(x) in each engine's SQL: the first 15 hex digits of md5(x) as a BIGINT
_ENGINE_SQL = {
    "duckdb": "CAST(('0x' || SUBSTR(MD5(__x), 1, 15)) AS BIGINT)",
    "spark": "CAST(CONV(SUBSTR(MD5(__x), 1, 15), 16, 10) AS BIGINT)",
}


def hash_id(value: str) -> int:
    """The id of one string value (the reference an online system reproduces)."""
    return int(hashlib.md5(value.encode("utf-8")).hexdigest()[:15], 16)


def render(sql: str, engine: str) -> str:
    """``sql`` (DuckDB's dialect, with ``mkt_hash(...)``) as the engine's SQL: one text, transpiled by sqlglot.

    Raises:
        ValueError: an unknown engine.
    """
    if engine not in _ENGINE_SQL:
        raise ValueError(f"unknown engine {engine!r}; expected one of {sorted(_ENGINE_SQL)}")
    dialect = "spark" if engine == "spark" else "duckdb"
    template = sqlglot.parse_one(_ENGINE_SQL[engine], read=dialect)

    def substitute(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.Anonymous) and node.name.lower() == "mkt_hash":
            (arg,) = node.expressions
            return template.copy().transform(
                lambda n: arg.copy() if isinstance(n, exp.Column) and n.name == "__x" else n)
        return node

    tree = sqlglot.parse_one(sql, read="duckdb").transform(substitute)
    return tree.sql(dialect=dialect)
