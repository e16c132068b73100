"""The on-disk row format of a dataset, derived from a :class:`~mkt_torchrec.config.SchemaConfig`.

One Parquet row per impression:

=================  ====================  ==========================================================
column             Arrow type            meaning
=================  ====================  ==========================================================
``entity``         int8, not null        0 = source entity, 1 = target entity
``label``          int8, not null        click (0/1)
each feature       int64, nullable       raw id; an entity-specific feature is null for the other entity
each sequence      list<int64> not null  behaviour sequence, oldest first (may be empty)
each side column   list<int64> not null  a sequence's side feature, one raw value per sequence step
each dense         float32, nullable     dense value; null reads as 0
``true_prob``      float32 (optional)    the row's true click probability (synthetic data only)
``activity``       int32 (optional)      the user's number of past behaviours (user-group breakdowns)
=================  ====================  ==========================================================

Raw ids become table rows in the reader (:func:`map_ids`), so a dataset does not depend on table sizes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from mkt_torchrec.config import SchemaConfig, TableConfig

ENTITY_CODES = {"source": 0, "target": 1}
OPTIONAL_COLUMNS = {"true_prob": pa.float32(), "activity": pa.int32()}


def arrow_schema(schema: SchemaConfig, optional: tuple[str, ...] = ()) -> pa.Schema:
    """The Arrow schema of a dataset for ``schema``, with the named optional columns."""
    fields = [pa.field("entity", pa.int8(), nullable=False), pa.field("label", pa.int8(), nullable=False)]
    fields += [pa.field(n, pa.int64()) for n in schema.features]
    fields += [
        pa.field(n, pa.list_(pa.field("item", pa.int64(), nullable=False)), nullable=False)
        for n in list(schema.sequences) + schema.side_keys
    ]
    fields += [pa.field(n, pa.float32()) for n in schema.dense]
    for name in optional:
        if name not in OPTIONAL_COLUMNS:
            raise ValueError(f"unknown optional column {name!r}; known: {sorted(OPTIONAL_COLUMNS)}")
        fields.append(pa.field(name, OPTIONAL_COLUMNS[name]))
    return pa.schema(fields)


def check_columns(file_schema: pa.Schema, expected: pa.Schema, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` and the column if ``file_schema`` lacks or mistypes a column."""
    for f in expected:
        idx = file_schema.get_field_index(f.name)
        if idx < 0:
            raise ValueError(f"{where}: missing column {f.name!r} (type {f.type})")
        got = file_schema.field(idx).type
        ok = got == f.type or (pa.types.is_list(got) and pa.types.is_list(f.type)
                               and got.value_type == f.type.value_type)
        if not ok:
            raise ValueError(f"{where}: column {f.name!r} has type {got}, expected {f.type}")


# --------------------------------------------------------------------------------------------------------
# Raw id -> table row
# --------------------------------------------------------------------------------------------------------

_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def table_salt(table_name: str) -> np.uint64:
    """A stable 64-bit salt per table, so equal ids in different tables land in unrelated rows."""
    return np.uint64(int.from_bytes(hashlib.blake2b(table_name.encode(), digest_size=8).digest(), "little"))


def mix64(x: np.ndarray, salt: np.uint64) -> np.ndarray:
    """A fast 64-bit mix of ``x`` with ``salt`` as a new uint64 array (multiply-xorshift-multiply, the
    structure of splitmix64's finaliser with one round fewer; uint64 arithmetic wraps, as intended).

    Works in place on one output and one scratch array: this runs over every id the reader sees.
    """
    z = x.astype(np.uint64, copy=True)
    z *= _GOLDEN
    z += salt
    tmp = np.right_shift(z, np.uint64(31))
    z ^= tmp
    z *= _M2
    np.right_shift(z, np.uint64(29), out=tmp)
    z ^= tmp
    return z


def map_ids(ids: np.ndarray, table_name: str, table: TableConfig) -> np.ndarray:
    """Map raw int64 ids to int64 row indices in ``[0, table.rows)``."""
    if ids.size == 0:
        return ids.astype(np.int64)
    if table.id_mapping == "modulo":
        if ids.min() < 0:
            raise ValueError(f"table {table_name!r}: id_mapping 'modulo' needs ids >= 0, got {int(ids.min())}")
        return ids % table.rows
    with np.errstate(over="ignore"):
        z = mix64(ids, table_salt(table_name))
        np.remainder(z, np.uint64(table.rows), out=z)
    return z.view(np.int64)  # every value is < rows < 2**63


def hash_strings(values: "pa.Array | list[str]", namespace: str = "") -> np.ndarray:
    """Stable int64 ids for string values (e.g. Tenrec's ``\\N``-bearing columns), namespaced.

    Uses blake2b per distinct value (values are dictionary-encoded first, so the Python loop runs once per
    distinct string, not per row).
    """
    arr = pa.array(values) if not isinstance(values, (pa.Array, pa.ChunkedArray)) else values
    enc = arr.dictionary_encode()
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    prefix = namespace.encode() + b"\x1f"
    codes = np.array(
        [int.from_bytes(hashlib.blake2b(prefix + s.encode(), digest_size=8).digest(), "little", signed=True)
         for s in enc.dictionary.to_pylist()], dtype=np.int64)
    idx = enc.indices.to_numpy(zero_copy_only=False)
    return codes[idx]
