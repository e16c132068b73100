"""The one 64-bit id hash of ``mkt build``, reproducible by an online system in any language.

**Definition.** A string value ``s`` (an id, a category; an integer hashed by ``transform: hash`` is first written
in decimal, ``123``; a boolean as ``true`` / ``false``) becomes::

    id(s) = int(md5(utf8(s)).hexdigest()[:15], 16)        # the first 60 bits of MD5, a non-negative int64

and with ``by_entity: true`` the hashed text is ``"source|" + s`` or ``"target|" + s``. Test vector:
``id("abc") = 648541476951500027`` (md5 ``900150983cd24fb0...``), ``id("source|abc") = 246645285092654989``.

Why MD5's first 60 bits: every engine has MD5 built in (DuckDB, Spark SQL, Hive, Flink, Presto, BigQuery, Redis
scripts, every language's standard library), so the id an online server computes is the one training saw, with
no library to pin; 60 bits keep ids non-negative (``id_mapping: modulo`` needs that) and below the converters'
reserved ``MISSING_RAW`` (2**61 - 1); among a million distinct values of one feature the chance that any two share
an id is about 4e-7 (a billion: about 0.35, against the table's own hashing into far fewer rows). The id is
a raw id: the reader still maps it to a table row per table (:func:`mkt_torchrec.data.schema.map_ids`).

The ids are computed where the logs are read (:func:`mkt_torchrec.build.inputs.hash_strings`, each distinct
value once per batch, with a bounded cache), on the one machine or on every Spark executor alike, so both engines
see the same ids by construction; the SQL (:mod:`mkt_torchrec.build.plan`) only moves them.
"""

from __future__ import annotations

import hashlib

import sqlglot

HASH_BITS = 60
ENTITY_PREFIXES = ("source|", "target|")

DIALECTS = {"duckdb": "duckdb", "spark": "spark"}


def hash_id(value: str) -> int:
    """The id of one string value (the reference an online system reproduces)."""
    return int(hashlib.md5(value.encode("utf-8")).hexdigest()[:15], 16)


def render(sql: str, engine: str) -> str:
    """``sql`` (DuckDB's dialect) in the engine's dialect: one text, transpiled by sqlglot.

    Raises:
        ValueError: an unknown engine.
    """
    if engine not in DIALECTS:
        raise ValueError(f"unknown engine {engine!r}; expected one of {sorted(DIALECTS)}")
    return sqlglot.transpile(sql, read="duckdb", write=DIALECTS[engine])[0]
