"""A dataset on disk: ``DIR/manifest.json`` plus Parquet files per split.

Layout::

    DIR/manifest.json            format version, schema digest, columns, per-split files, row groups and the
                                 entity of each row group, row counts, mean values per row of each sparse key
    DIR/train/part-00000.parquet
    DIR/test/part-00000.parquet

**Entity-pure row groups (format 2).** Every row group holds rows of one entity only, and the manifest records
which (``FileInfo.row_group_entity``, codes of :data:`~mkt_torchrec.data.schema.ENTITY_CODES`), so a reader of
one entity (stage 2 reads ``target``) opens only that entity's row groups and never decodes a row of the other.
The writer buffers rows per (split, entity) and writes a row group when a buffer is full, so row groups follow
the order their last row arrived, and within one entity rows keep their arrival order exactly. Format 1
datasets (mixed row groups, no per-row-group entity) still open and read whole; reading one entity of them
raises and names :func:`rewrite_dataset`, which streams a dataset into format 2.

**Splits on disk and splits read.** The files hold the splits ``train`` and ``test``. Readers see ``train``,
``valid`` and ``test``: with a validation fraction ``f > 0`` (``data.validation_fraction``) the last ``f`` of
each entity's rows of the ``train`` files, in manifest order (files in order, row groups in order, rows in
order: time order for ``mkt tenrec`` data; ``mkt synth`` writes blocks of users, each in random order, so there
``valid`` is a sample of the last block's rows), are the split ``valid`` and the rest is ``train``.
The cut is made from the manifest alone, to the row (a row group may be shared by the two), so every dataset has
a validation split without being rewritten. :meth:`Manifest.split_units` gives a split's row ranges and
:meth:`Manifest.split_rows` their count; :func:`validation_rows` says how many rows of an entity ``valid`` takes.

:class:`DatasetWriter` publishes a dataset only when every file and the manifest are complete, so an interrupted
run never leaves a dataset that looks finished. ``DIR`` is a local path or a URI (``s3://``, ``gs://``, ...;
:mod:`mkt_torchrec.storage`): locally the writer fills ``DIR.tmp-<pid>`` and renames it to ``DIR``; on an object
store, which cannot rename, it writes files named with the attempt's token under ``DIR`` and ``manifest.json``
last, so a reader that finds a manifest finds every file it names. Another writer (the Spark engine of
``mkt build``, whose executors write the files) publishes a manifest it assembled with :func:`stage_dataset`
and :func:`publish_manifest`.
:func:`open_dataset` reads the manifest (its structure checked by :data:`MANIFEST_SCHEMA`, each file listed once,
the entities' row counts those of the row groups) and checks every file's footer against the config's schema and
against the manifest (rows, row groups, each row group's entity); :func:`open_dataset_shared` does the same for
all ranks of a process group, reading each footer once in total. So a manifest that lists a train file under test,
or lies about a file, fails every reader alike with one line naming the file and the key.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mkt_torchrec import storage
from mkt_torchrec.config import SchemaConfig
from mkt_torchrec.data.schema import ENTITY_CODES, arrow_schema, check_columns
from mkt_torchrec.manifest_schema import validate

FORMAT_VERSION = 2  # 2: entity-pure row groups, FileInfo.row_group_entity, Manifest.mean_lengths
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
TRAIN_SPLIT, VALID_SPLIT = "train", "valid"  # read splits cut from the train files by a validation fraction
REWRITE_HINT = ("rewrite it with `mkt rewrite --config CONFIG --data {data} --out NEW` (mkt_torchrec.data.dataset."
                "rewrite_dataset), or regenerate it with `mkt synth` / `mkt tenrec` of this release")


_COUNT = {"type": "integer", "minimum": 0}
_PER_ENTITY = {"type": "object", "additionalProperties": _COUNT}
# The manifest's structure (mkt_torchrec.manifest_schema); what a schema cannot state is Manifest.from_json's.
MANIFEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["format_version", "schema_digest", "columns", "splits", "rows"],
    "properties": {
        "format_version": {"type": "integer"},
        "schema_digest": {"type": "string"},
        "columns": {"type": "array", "items": {"type": "string"}},
        "optional_columns": {"type": "array", "items": {"type": "string"}},
        "splits": {"type": "object", "additionalProperties": {"type": "array", "items": {
            "type": "object", "required": ["path", "rows", "row_groups"], "additionalProperties": False,
            "properties": {
                "path": {"type": "string", "minLength": 1},
                "rows": _COUNT,
                "row_groups": {"type": "array", "items": _COUNT},
                "row_group_entity": {"type": ["array", "null"], "items": {"enum": sorted(ENTITY_CODES.values())}},
            }}}},
        "rows": {"type": "object", "additionalProperties": _PER_ENTITY},
        "source": {"type": "object"},
        "mean_lengths": {"type": "object", "additionalProperties": {
            "type": "object", "additionalProperties": {"type": "number", "minimum": 0}}},
        "clicks": {"type": "object", "additionalProperties": _PER_ENTITY},
    },
}


class RowRange(NamedTuple):
    """Rows ``start .. stop-1`` of row group ``row_group`` of file ``file`` (index in its split's file list)."""

    file: int
    row_group: int
    start: int
    stop: int


def validation_rows(rows: int, fraction: float) -> int:
    """How many of an entity's ``rows`` train rows the split ``valid`` takes (its last ones).

    ``fraction * rows`` rounded to the nearest row, halves up (``fraction`` taken as the decimal it prints as, so
    0.1 of 25 rows is 3), then kept within ``[1, rows - 1]`` so each side has a row of the entity; a single row
    goes to ``valid`` (each entity of the train files is represented in ``valid``). 0 if ``fraction`` or
    ``rows`` is 0.

    Example:
        >>> [validation_rows(n, 0.1) for n in (0, 1, 2, 10, 14, 15, 25)]
        [0, 1, 1, 1, 1, 2, 3]
    """
    if fraction <= 0 or rows <= 0:
        return 0
    if rows == 1:
        return 1
    nearest = math.floor(Fraction(repr(float(fraction))) * rows + Fraction(1, 2))
    return max(1, min(rows - 1, nearest))


def physical_split(split: str, manifest: Optional["Manifest"] = None) -> str:
    """The split of the files a read split comes from (``valid`` is cut from ``train``, unless the manifest has
    valid files of its own)."""
    if manifest is not None and manifest.has_valid_files:
        return split
    return TRAIN_SPLIT if split == VALID_SPLIT else split


def _entity_code(entity: Union[int, str, None]) -> Optional[int]:
    if entity is None or isinstance(entity, int):
        if entity is not None and entity not in ENTITY_CODES.values():
            raise ValueError(f"entity code {entity} is not one of {ENTITY_CODES}")
        return entity
    if entity not in ENTITY_CODES:
        raise ValueError(f"entity must be one of {sorted(ENTITY_CODES)} or None, got {entity!r}")
    return ENTITY_CODES[entity]


@dataclass
class FileInfo:
    path: str  # relative to the dataset directory
    rows: int
    row_groups: list[int]  # rows per row group
    row_group_entity: Optional[list[int]] = None  # entity code of each row group; None in a format-1 dataset

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "rows": self.rows, "row_groups": self.row_groups}
        if self.row_group_entity is not None:
            d["row_group_entity"] = self.row_group_entity
        return d


@dataclass
class Manifest:
    format_version: int
    schema_digest: str
    columns: list[str]
    optional_columns: list[str]
    splits: dict[str, list[FileInfo]]
    rows: dict[str, dict[str, int]]  # split -> entity -> rows
    source: dict[str, Any] = field(default_factory=dict)  # how it was made (synth params, tenrec inputs)
    # split -> sparse key -> mean values per row (single-valued: fraction non-null; sequence or side column: mean
    # length after truncation to max_len). The planner's pooling factors. Empty in a format-1 dataset.
    mean_lengths: dict[str, dict[str, float]] = field(default_factory=dict)
    # split -> entity -> rows with a click (label > 0.5): the click rates fresh output layers start at. Empty in a
    # dataset written before they were counted.
    clicks: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "schema_digest": self.schema_digest,
            "columns": self.columns,
            "optional_columns": self.optional_columns,
            "splits": {s: [f.to_json() for f in fs] for s, fs in self.splits.items()},
            "rows": self.rows,
            "source": self.source,
            "mean_lengths": self.mean_lengths,
            "clicks": self.clicks,
        }

    @classmethod
    def from_json(cls, d: Any, where: str) -> "Manifest":
        """Parse a manifest document: its structure (:data:`MANIFEST_SCHEMA`), then what a schema cannot state (row
        groups add up, each file listed once, the entities' row counts those of the row groups).

        Raises:
            ValueError: one line naming ``where`` and the key at fault.
        """
        validate(d, MANIFEST_SCHEMA, where)
        try:
            version = d["format_version"]
            if version not in READABLE_VERSIONS:
                raise ValueError(f"format_version {version} (this code reads {list(READABLE_VERSIONS)})")
            splits = {s: [FileInfo(**f) for f in fs] for s, fs in d["splits"].items()}
            for fi in (fi for fs in splits.values() for fi in fs):
                _check_file_info(fi, version)
            manifest = cls(
                format_version=version,
                schema_digest=d["schema_digest"],
                columns=list(d["columns"]),
                optional_columns=list(d.get("optional_columns", [])),
                splits=splits,
                rows={s: dict(v) for s, v in d["rows"].items()},
                source=dict(d.get("source", {})),
                mean_lengths={s: {k: float(m) for k, m in v.items()} for s, v in d.get("mean_lengths", {}).items()},
                clicks={s: {e: int(n) for e, n in v.items()} for s, v in d.get("clicks", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: not a valid manifest ({type(e).__name__}: {e})") from None
        _check_listed_once(manifest, where)
        _check_entity_rows(manifest, where)
        return manifest

    @property
    def entity_pure(self) -> bool:
        """Every row group holds one entity and the manifest says which (format 2 and later)."""
        return self.format_version >= 2

    @property
    def has_valid_files(self) -> bool:
        """The files hold a ``valid`` split of their own (``mkt build`` with ``source.split.valid_from``): it is read
        whole, ``train`` is every train row and ``data.validation_fraction`` cuts nothing."""
        return VALID_SPLIT in self.splits

    def read_splits(self) -> list[str]:
        """The splits a reader can read: the files' splits, and ``valid`` if there is a ``train`` split."""
        return sorted(set(self.splits) | ({VALID_SPLIT} if TRAIN_SPLIT in self.splits else set()))

    def split_units(self, split: str, entity: Union[int, str, None] = None,
                    validation_fraction: float = 0.0) -> list[RowRange]:
        """The row ranges of a read split, in manifest order: whole row groups, except where the validation cut
        falls inside one (see the module docstring).

        Args:
            split: ``train`` / ``valid`` (cut from the train files by ``validation_fraction``), or another split
                of the files (``test``), read whole.
            entity: ``source`` / ``target`` (or its code) for that entity's rows only; ``None``: every row.
            validation_fraction: the last fraction of each entity's train rows that ``valid`` takes; 0: ``train``
                is every train row and ``valid`` is empty.

        Raises:
            ValueError: one entity, or a validation fraction > 0, of a format-1 dataset (its row groups mix
                entities; :func:`rewrite_dataset` makes them pure).
        """
        code = _entity_code(entity)
        if self.has_valid_files:
            validation_fraction = 0.0
        files = self.splits.get(physical_split(split, self), [])
        carve = split in (TRAIN_SPLIT, VALID_SPLIT) and validation_fraction > 0
        if split == VALID_SPLIT and not carve and not self.has_valid_files:
            return []
        if not self.entity_pure and (carve or code is not None):
            what = (f"validation_fraction={validation_fraction} cannot cut each entity's last rows" if carve
                    else f"entity={entity!r} cannot read only its rows")
            raise ValueError(f"format {self.format_version} dataset has row groups of mixed entities, so {what}")
        if not carve:
            return [RowRange(fi, rg, 0, n) for fi, f in enumerate(files) for rg, n in enumerate(f.row_groups)
                    if code is None or f.row_group_entity[rg] == code]  # type: ignore[index]
        cut = {}  # entity code -> rows of the entity that stay in train
        for c in ENTITY_CODES.values():
            rows = self.split_rows(TRAIN_SPLIT, c)
            cut[c] = rows - validation_rows(rows, validation_fraction)
        seen = dict.fromkeys(ENTITY_CODES.values(), 0)  # rows of each entity before the row group
        out = []
        for fi, f in enumerate(files):
            for rg, (n, c) in enumerate(zip(f.row_groups, f.row_group_entity, strict=True)):  # type: ignore[arg-type]
                first, seen[c] = seen[c], seen[c] + n
                if code is not None and c != code:
                    continue
                keep = min(n, max(0, cut[c] - first))  # rows of this row group that stay in train
                lo, hi = (0, keep) if split == TRAIN_SPLIT else (keep, n)
                if hi > lo:
                    out.append(RowRange(fi, rg, lo, hi))
        return out

    def split_rows(self, split: str, entity: Union[int, str, None] = None, validation_fraction: float = 0.0) -> int:
        """Rows of a read split (of one entity if ``entity``, a name or code, is given), from the manifest alone.

        ``split`` and ``validation_fraction`` are those of :meth:`split_units`: with ``validation_fraction=0`` it
        counts the files' split, so a trainer counts what its reader reads with
        ``split_rows("train", "target", validation_fraction=cfg.data.validation_fraction)``.
        """
        code = _entity_code(entity)
        if self.has_valid_files:
            validation_fraction = 0.0
        carve = split in (TRAIN_SPLIT, VALID_SPLIT) and validation_fraction > 0
        if carve or (split == VALID_SPLIT and not self.has_valid_files) or (code is not None and self.entity_pure):
            return sum(r.stop - r.start for r in self.split_units(split, code, validation_fraction))
        if code is None:
            return sum(f.rows for f in self.splits.get(split, []))
        names = {c: name for name, c in ENTITY_CODES.items()}
        return self.rows.get(split, {}).get(names[code], 0)  # a format-1 dataset counts entities per split only


def _check_file_info(fi: FileInfo, version: int) -> None:
    """A file entry's row groups add up, and (format 2) each has an entity code."""
    if sum(fi.row_groups) != fi.rows:
        raise ValueError(f"{fi.path}: row groups of {sum(fi.row_groups)} rows but rows={fi.rows}")
    if version < 2:
        return
    codes = fi.row_group_entity
    if codes is None or len(codes) != len(fi.row_groups):
        raise ValueError(f"{fi.path}: row_group_entity must give the entity of each of its "
                         f"{len(fi.row_groups)} row groups, got {codes!r}")
    if any(c not in ENTITY_CODES.values() for c in codes):
        raise ValueError(f"{fi.path}: row_group_entity holds a code other than {sorted(ENTITY_CODES.values())}")


def _keyed_files(manifest: Manifest) -> list[tuple[str, FileInfo]]:
    """Every file of every split with its manifest key (``splits.train[3]``), in manifest order."""
    return [(f"splits.{split}[{i}]", fi) for split, files in manifest.splits.items() for i, fi in enumerate(files)]


def _check_listed_once(manifest: Manifest, where: str) -> None:
    """A file is listed once in the whole manifest: listed twice its rows count twice, and a train file listed under
    test makes training rows test rows (paths compared as normalised relative paths: ``./a`` is ``a``)."""
    seen: dict[str, str] = {}
    for key, fi in _keyed_files(manifest):
        norm = posixpath.normpath(fi.path)
        if norm in seen:
            raise ValueError(f"{where}: key '{key}.path': {fi.path!r} is listed twice (also at '{seen[norm]}'); a "
                             "file belongs to one split, once")
        seen[norm] = key


def _check_entity_rows(manifest: Manifest, where: str) -> None:
    """``rows`` (split -> entity -> rows) is what the files hold: per entity from ``row_group_entity`` (format 2),
    per split from the files' rows (format 1)."""
    names = {c: name for name, c in ENTITY_CODES.items()}
    for split in sorted(set(manifest.splits) | set(manifest.rows)):
        files = manifest.splits.get(split, [])
        said = manifest.rows.get(split, {})
        if manifest.entity_pure:
            held = dict.fromkeys(ENTITY_CODES, 0)
            for fi in files:
                for n, c in zip(fi.row_groups, fi.row_group_entity or [], strict=True):
                    held[names[c]] += n
            for entity in sorted(set(held) | set(said)):
                if said.get(entity, 0) != held.get(entity, 0):
                    raise ValueError(f"{where}: key 'rows.{split}.{entity}': {said.get(entity, 0)}, but the split's "
                                     f"row groups of that entity (row_group_entity) hold {held.get(entity, 0)} rows")
        elif sum(said.values()) != sum(fi.rows for fi in files):
            raise ValueError(f"{where}: key 'rows.{split}': {sum(said.values())} rows in all, but the split's files "
                             f"hold {sum(fi.rows for fi in files)}")


class DatasetWriter:
    """Streams Arrow tables into sharded Parquet files; publishes the dataset atomically on ``close``.

    Rows are buffered per (split, entity) and written as entity-pure row groups of ``row_group_rows`` rows as
    soon as a buffer holds that many (the rest at ``close``), so a row group's rows are all of one entity, and
    row groups follow the order their last row arrived. Memory: up to ``row_group_rows`` rows per (split,
    entity) buffer.

    Args:
        out_dir: the dataset directory to create: a local path or a URI (``s3://bucket/ds``).
        schema: the feature schema (decides the columns, and the ``max_len`` of each sequence that
            ``Manifest.mean_lengths`` truncates to).
        optional: optional columns to write (``true_prob``, ``activity``).
        rows_per_file: rows per Parquet file (a new file starts after this many rows).
        row_group_rows: rows per row group (the reader's unit of work); the last of each (split, entity) may be
            smaller.
        overwrite: replace an existing ``out_dir`` (only once the new one is complete).
        schema_digest: recorded in the manifest.

    Example:
        >>> with DatasetWriter("data/ds", cfg.schema) as w:   # doctest: +SKIP
        ...     w.write("train", table)
        ...     w.set_source({"kind": "synth"})
    """

    def __init__(self, out_dir: str, schema: SchemaConfig, optional: tuple[str, ...] = (),
                 rows_per_file: int = 1_000_000, row_group_rows: int = 100_000, overwrite: bool = False,
                 schema_digest: str = "") -> None:
        self.out_dir = storage.absolute(out_dir)
        self._staged = stage_dataset(out_dir, overwrite)
        self.schema = arrow_schema(schema, optional)
        self.optional = list(optional)
        self.rows_per_file = rows_per_file
        self.row_group_rows = row_group_rows
        self.schema_digest = schema_digest
        self._max_len = {k: schema.max_len_of(k) for k in schema.sparse_keys}
        self._aligned = {c: schema.sequence_of(c) for c in schema.side_keys}  # side column -> its sequence
        self._writers: dict[str, tuple[pq.ParquetWriter, pa.NativeFile]] = {}  # split -> open file
        self._files: dict[str, list[FileInfo]] = {}
        self._rows: dict[str, dict[str, int]] = {}
        self._values: dict[str, dict[str, int]] = {}  # split -> sparse key -> values (after truncation)
        self._pending: dict[tuple[str, int], list[pa.Table]] = {}  # (split, entity code) -> buffered rows
        self._pending_rows: dict[tuple[str, int], int] = {}
        self._last_arrival: dict[tuple[str, int], int] = {}  # arrival number of the newest buffered row
        self._arrived = 0  # rows passed to write() so far
        self._source: dict[str, Any] = {}
        self._clicks: dict[str, dict[str, int]] = {}
        self._closed = False

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def set_source(self, source: dict[str, Any]) -> None:
        self._source = source

    def write(self, split: str, table: pa.Table) -> None:
        """Append rows to ``split``. Columns are cast to the dataset schema (a mismatch raises); each row goes to
        its entity's buffer, written as a row group once it holds ``row_group_rows`` rows."""
        if table.num_rows == 0:
            return
        table = table.select(self.schema.names).cast(self.schema)
        ent = table.column("entity").to_numpy()
        bad = np.flatnonzero(~np.isin(ent, list(ENTITY_CODES.values())))
        if bad.size:
            raise ValueError(f"{self.out_dir}: split {split!r}: entity {ent[bad[0]]} in row {bad[0]} of a write; "
                             f"entity must be one of {ENTITY_CODES}")
        self._check_aligned(split, table)
        counts = self._rows.setdefault(split, {"source": 0, "target": 0})
        clicks = self._clicks.setdefault(split, {"source": 0, "target": 0})
        clicked = table.column("label").to_numpy(zero_copy_only=False) > 0.5
        self._count_values(split, table)
        full = []
        for name, code in ENTITY_CODES.items():
            mine = ent == code
            n = int(mine.sum())
            if n == 0:
                continue
            counts[name] += n
            clicks[name] += int(clicked[mine].sum())
            key = (split, code)
            self._pending.setdefault(key, []).append(table if n == table.num_rows else table.filter(pa.array(mine)))
            self._pending_rows[key] = self._pending_rows.get(key, 0) + n
            self._last_arrival[key] = self._arrived + int(np.flatnonzero(mine)[-1])
            if self._pending_rows[key] >= self.row_group_rows:
                full.append(key)
        self._arrived += table.num_rows
        for key in sorted(full, key=self._last_arrival.__getitem__):  # the buffer whose last row came first
            self._flush(key, final=False)

    def _check_aligned(self, split: str, table: pa.Table) -> None:
        """Every side column has as many values per row as its sequence (one per step)."""
        for column, seq in self._aligned.items():
            side = pc.list_value_length(table.column(column)).fill_null(-1).to_numpy()  # -1: a null list
            steps = pc.list_value_length(table.column(seq)).fill_null(-1).to_numpy()
            bad = np.flatnonzero(side != steps)
            if bad.size:
                i = int(bad[0])
                raise ValueError(f"{self.out_dir}: split {split!r}: column {column!r} row {i} of a write has "
                                 f"{side[i]} values but its sequence {seq!r} has {steps[i]} (one per step)")

    def _count_values(self, split: str, table: pa.Table) -> None:
        """Add the values per sparse key of ``table`` (sequences truncated to ``max_len``) to ``split``'s sums."""
        add_value_counts(self._values.setdefault(split, dict.fromkeys(self._max_len, 0)), table, self._max_len)

    def _flush(self, key: tuple[str, int], final: bool) -> None:
        """Write the full row groups buffered for ``key`` (and the rest too if ``final``)."""
        pending = pa.concat_tables(self._pending.pop(key, []))
        self._pending_rows[key] = 0
        start = 0
        n = pending.num_rows
        while n - start >= self.row_group_rows or (final and start < n):
            take = min(self.row_group_rows, n - start)
            self._write_row_group(key[0], key[1], pending.slice(start, take))
            start += take
        if start < n:
            self._pending[key] = [pending.slice(start)]
            self._pending_rows[key] = n - start

    def _write_row_group(self, split: str, entity: int, rg: pa.Table) -> None:
        files = self._files.setdefault(split, [])
        if split not in self._writers or files[-1].rows >= self.rows_per_file:
            self._close_file(split)
            rel = f"{split}/part-{len(files):05d}.parquet"
            sink = self._staged.open_output(rel)
            self._writers[split] = (parquet_writer(sink, self.schema), sink)
            files.append(FileInfo(path=self._staged.name(rel), rows=0, row_groups=[], row_group_entity=[]))
        writer = self._writers[split][0]
        writer.write_table(rg, row_group_size=rg.num_rows)
        files[-1].rows += rg.num_rows
        files[-1].row_groups.append(rg.num_rows)
        files[-1].row_group_entity.append(entity)  # type: ignore[union-attr]

    def _close_file(self, split: str) -> None:
        """Finish ``split``'s open file (its footer; on an object store the upload completes on ``close``)."""
        writer, sink = self._writers.pop(split, (None, None))
        if writer is not None:
            try:
                writer.close()
            finally:
                sink.close()

    def _mean_lengths(self) -> dict[str, dict[str, float]]:
        out = {}
        for split, sums in self._values.items():
            rows = sum(self._rows[split].values())
            out[split] = {k: v / rows for k, v in sums.items()} if rows else {}
        return out

    def close(self) -> Manifest:
        """Flush, then publish the files and the manifest (:func:`publish_manifest`)."""
        if self._closed:
            raise RuntimeError("DatasetWriter already closed")
        for key in sorted(self._pending, key=self._last_arrival.__getitem__):
            self._flush(key, final=True)
        for split in list(self._writers):
            self._close_file(split)
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            schema_digest=self.schema_digest,
            columns=self.schema.names,
            optional_columns=self.optional,
            splits=self._files,
            rows=self._rows,
            source=self._source,
            mean_lengths=self._mean_lengths(),
            clicks=self._clicks,
        )
        publish_manifest(self._staged, manifest)
        self._closed = True
        return manifest

    def abort(self) -> None:
        """Drop everything written so far (a dataset already at ``out_dir`` stays as it was)."""
        for split in list(self._writers):
            try:
                self._close_file(split)
            except Exception:  # noqa: BLE001 - best effort while already failing
                pass
        self._staged.abort()
        self._closed = True


def add_value_counts(sums: dict[str, int], table: pa.Table, max_len: dict[str, Optional[int]]) -> None:
    """Add ``table``'s values per sparse key to ``sums`` (a single-valued key: its non-null rows; a sequence or side
    column: its lengths cut at ``max_len``): what ``Manifest.mean_lengths`` divides by the rows."""
    for key, limit in max_len.items():
        col = table.column(key)
        if limit is None:
            sums[key] += len(col) - col.null_count
        else:
            sums[key] += int(np.minimum(pc.list_value_length(col).to_numpy(), limit).sum())


def parquet_writer(sink: Any, schema: pa.Schema) -> pq.ParquetWriter:
    """The Parquet writer of every dataset file: zstd at level 1, dictionary pages for single-valued columns only.

    Why: a sequence column's values are mostly distinct ids, where a dictionary costs encoding time and saves
    nothing; level 1 encodes faster than the default at about the same size (1.55M Tenrec rows: 1.04 s and 37.5 MB
    against 1.44 s and 35.7 MB).
    """
    single = [f.name for f in schema if not pa.types.is_list(f.type)]
    return pq.ParquetWriter(sink, schema, compression="zstd", compression_level=1, use_dictionary=single)


def _manifest_files(data: bytes) -> list[str]:
    """The files a manifest's bytes reference (none if they do not parse: such files are left alone)."""
    try:
        return [f["path"] for fs in json.loads(data)["splits"].values() for f in fs]
    except (ValueError, KeyError, TypeError):
        return []


def stage_dataset(out_dir: str, overwrite: bool = False) -> storage.StagedDirectory:
    """Where a writer puts a new dataset's files until :func:`publish_manifest` makes it the dataset at ``out_dir``.

    Write each file with ``staged.open_output(rel)`` (any process: the object pickles) and record
    ``staged.name(rel)`` as its :attr:`FileInfo.path`; call ``staged.abort()`` to drop the attempt.

    Args:
        out_dir: the dataset directory (a local path or a URI).
        overwrite: replace an existing dataset there (never a directory that is not one).

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false, or it is not a dataset.
        OSError: its store cannot be reached (one line).
    """
    return storage.StagedDirectory(out_dir, MANIFEST, "a dataset", overwrite=overwrite, references=_manifest_files)


def publish_manifest(staged: storage.StagedDirectory, manifest: Manifest) -> None:
    """Write ``manifest`` last and make the staged files the dataset (the old version's files go).

    The manifest is checked as a reader will parse it first (row groups add up, each has an entity), so a bad
    manifest assembled elsewhere fails here, not in every later reader.

    Example:
        >>> staged = stage_dataset("s3://bucket/ds")                           # doctest: +SKIP
        >>> ...   # executors write staged.open_output("train/part-00000.parquet"), the driver gathers FileInfo
        >>> publish_manifest(staged, manifest)                                 # doctest: +SKIP
    """
    doc = manifest.to_json()
    Manifest.from_json(doc, storage.display(storage.join(staged.final, MANIFEST)))
    staged.publish(json.dumps(doc, indent=2).encode("utf-8"))


def _read_manifest(data_dir: str) -> Manifest:
    """Read and parse ``DIR/manifest.json`` (no file checks)."""
    path = storage.join(data_dir, MANIFEST)
    if not storage.is_file(path):
        storage.check_reachable(data_dir)  # a missing bucket would read as a missing manifest
        raise FileNotFoundError(f"{storage.display(data_dir)}: not a dataset, {MANIFEST} is missing"
                                f"{_missing_manifest_hint(data_dir)}")
    if not storage.is_uri(path):
        from mkt_torchrec.rundir import read_json

        return Manifest.from_json(read_json(path, "a dataset manifest"), path)
    where = storage.display(path)
    try:
        doc = json.loads(storage.read_bytes(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: not a dataset manifest")  # noqa: TRY004 - a bad file, as read_json says
    return Manifest.from_json(doc, where)


def _missing_manifest_hint(data_dir: str) -> str:
    """Why a directory without a manifest may be there: an interrupted write, or logs that are not a dataset."""
    if not storage.exists(data_dir):
        return ""
    held = storage.some_files(data_dir)
    if held and all(storage.is_attempt_file(p) for p in held):
        return " (an interrupted write leaves its files but no manifest: write it again with --overwrite)"
    if any(p.endswith(".parquet") for p in held):
        return (" and it holds Parquet files: logs such as a Spark job's output are not a dataset; `mkt build` "
                "turns them into one")
    return " (an interrupted write leaves only a .tmp-* directory)"


def _files_in_order(manifest: Manifest) -> list[FileInfo]:
    """Every file of every split, in manifest order (the order checks report failures in)."""
    return [fi for files in manifest.splits.values() for fi in files]


def _check_file(data_dir: str, key: str, fi: FileInfo, expected: pa.Schema) -> None:
    """Read one file's footer, once, and check its columns and that it holds what the manifest says at ``key``
    (its rows, row groups and, format 2, each row group's entity: the footer's min / max statistics of ``entity``,
    or, where a writer left none, that row group's ``entity`` column); raise a one-line ``ValueError`` naming the
    file and the key (or column)."""
    fpath = storage.display(storage.join(data_dir, fi.path))
    try:
        fs, path = storage.filesystem(storage.join(data_dir, fi.path))
        meta = pq.read_metadata(path, filesystem=fs)
        file_schema = meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{fpath}: unreadable Parquet file: {e}") from None
    check_columns(file_schema, expected, fpath)
    lie = f"{fpath}: the manifest's key '{key}.{{}}' says {{}} but the file {{}}"
    if meta.num_rows != fi.rows:
        raise ValueError(lie.format("rows", fi.rows, f"holds {meta.num_rows} rows (its footer)"))
    groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    if groups != fi.row_groups:
        raise ValueError(lie.format("row_groups", fi.row_groups, f"has row groups of {groups} rows (its footer)"))
    if fi.row_group_entity is None:
        return
    column = file_schema.get_field_index("entity")
    for i, code in enumerate(fi.row_group_entity):
        stats = meta.row_group(i).column(column).statistics
        if stats is not None and stats.has_min_max:
            held, how = sorted({int(stats.min), int(stats.max)}), "its footer's statistics"
        else:  # no statistics: read the row group's entity column (a byte a row)
            table = pq.ParquetFile(path, filesystem=fs, metadata=meta).read_row_group(i, columns=["entity"])
            held, how = sorted(pc.unique(table.column(0)).to_pylist()), "its entity column"
        if held != [code] and set(held) <= set(ENTITY_CODES.values()):  # a code outside them: the reader names its row
            raise ValueError(lie.format(f"row_group_entity[{i}]", code, f"holds entity code(s) {held} in row group "
                                        f"{i} ({how}; an entity-pure row group holds one)"))


def open_dataset(data_dir: str, schema: SchemaConfig, check_files: bool = True) -> Manifest:
    """Read ``DIR/manifest.json`` and check that every file has the columns ``schema`` needs and holds the rows,
    row groups and row-group entities the manifest says (:func:`_check_file`; one footer read per file).

    Every call reads every file's footer; in a process group use :func:`open_dataset_shared`, which reads
    each footer once in total.

    Args:
        data_dir: the dataset directory: a local path or a URI (``s3://bucket/ds``).

    Raises:
        FileNotFoundError / ValueError: naming the directory, file and column at fault.
        OSError: the store cannot be reached, refuses the credentials, or lacks the bucket (one line).
    """
    manifest = _read_manifest(data_dir)
    if check_files:
        expected = arrow_schema(schema)
        for key, fi in _keyed_files(manifest):
            _check_file(data_dir, key, fi, expected)
    return manifest


# An error carried through a collective: (exception class name, message). Only these classes travel as
# themselves; anything else arrives as a RuntimeError naming its class and the rank it happened on.
def open_dataset_shared(data_dir: str, schema: SchemaConfig, group: Any = None) -> Manifest:
    """:func:`open_dataset` for every rank of a process group, reading each file's footer once in total.

    Rank 0 of ``group`` reads the manifest and broadcasts it, so every rank returns an equal
    :class:`Manifest`. The footer checks are split across the ranks in contiguous shares of the manifest's
    file order, and the outcomes are gathered (:class:`mkt_torchrec.collective.Collective`), so every rank
    learns of a bad file.

    Every rank of ``group`` must call it. Errors never leave a rank out of a collective: every rank raises the
    same exception (the manifest's error, or else the first failing file in manifest order) with the message
    :func:`open_dataset` gives. With ``torch.distributed`` uninitialised or a world of one it *is*
    :func:`open_dataset`.

    Args:
        data_dir: the dataset directory (the same path on every rank).
        schema: the feature schema the files must satisfy.
        group: the process group; ``None`` for the default one.

    Raises:
        FileNotFoundError / ValueError: on every rank, naming the directory, file and column at fault.
        RuntimeError: on every rank, if a rank failed in an unexpected way (names the rank and error).

    Example:
        >>> info = init_distributed()                                        # doctest: +SKIP
        >>> manifest = open_dataset_shared("data/ds", cfg.schema)            # doctest: +SKIP
        >>> reader = ParquetReader("data/ds", "train", cfg.schema, cfg.data, info.rank, info.world_size,
        ...                        manifest=manifest)                        # doctest: +SKIP
    """
    import torch.distributed as dist

    from mkt_torchrec.collective import Collective

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return open_dataset(data_dir, schema)
    comm = Collective(group=group)
    manifest = comm.on_root(lambda: _read_manifest(data_dir))
    files = _keyed_files(manifest)
    lo, hi = len(files) * comm.rank // comm.world, len(files) * (comm.rank + 1) // comm.world

    def check_share() -> None:  # a contiguous share: the lowest failing rank holds the first bad file
        expected = arrow_schema(schema)
        for key, fi in files[lo:hi]:
            _check_file(data_dir, key, fi, expected)

    comm.phase(check_share)
    return manifest


def check_entity_readable(manifest: Manifest, data_dir: str, entity: str) -> None:
    """Raise a one-line ``ValueError`` if ``entity``'s rows of the dataset cannot be read alone (format 1)."""
    if not manifest.entity_pure:
        raise ValueError(f"{data_dir}: format {manifest.format_version} dataset has row groups of mixed entities, "
                         f"so entity={entity!r} cannot read only its rows; " + REWRITE_HINT.format(data=data_dir))


def check_split_readable(manifest: Manifest, data_dir: str, split: str, validation_fraction: float) -> None:
    """Raise a one-line ``ValueError`` if the read split ``split`` does not exist or cannot be cut."""
    if split not in manifest.read_splits():
        raise ValueError(f"{data_dir}: no split {split!r}; splits: {manifest.read_splits()}")
    if split == VALID_SPLIT and validation_fraction <= 0 and not manifest.has_valid_files:
        raise ValueError(f"{data_dir}: split {VALID_SPLIT!r} is empty with data.validation_fraction=0 (it is the "
                         f"last fraction of each entity's {TRAIN_SPLIT} rows); set data.validation_fraction > 0")
    if split in (TRAIN_SPLIT, VALID_SPLIT) and validation_fraction > 0 and not manifest.entity_pure \
            and not manifest.has_valid_files:
        raise ValueError(f"{data_dir}: format {manifest.format_version} dataset has row groups of mixed entities, "
                         f"so data.validation_fraction={validation_fraction} cannot cut each entity's last "
                         f"{TRAIN_SPLIT} rows; set data.validation_fraction=0 to read the {TRAIN_SPLIT} split "
                         "whole, or " + REWRITE_HINT.format(data=data_dir))


def rewrite_dataset(src: str, dst: str, schema: SchemaConfig, overwrite: bool = False,
                    row_group_rows: Optional[int] = None, rows_per_file: Optional[int] = None) -> Manifest:
    """Stream the dataset ``src`` (any readable format) into a new dataset ``dst`` of this format.

    Reads one row group at a time, in file order, through a :class:`DatasetWriter`, so memory is a row group
    plus the writer's buffers; within each split and entity the rows keep their order. The new manifest keeps
    ``src``'s schema digest and source, and adds ``source["rewritten_from"]``.

    Args:
        src: the dataset to read (left untouched).
        dst: the dataset to write (atomically).
        schema: the feature schema both datasets are for.
        overwrite: replace an existing ``dst`` that is a dataset.
        row_group_rows / rows_per_file: the new layout; default: ``src``'s largest row group and file.

    Returns:
        The manifest of ``dst``.

    Example:
        >>> rewrite_dataset("data/old", "data/new", cfg.schema)   # doctest: +SKIP
    """
    if storage.absolute(src) == storage.absolute(dst):
        raise ValueError(f"{dst}: rewrite needs a new directory, not the dataset it reads")
    old = open_dataset(src, schema)
    files = _files_in_order(old)
    with DatasetWriter(dst, schema, optional=tuple(old.optional_columns),
                       rows_per_file=rows_per_file or max([f.rows for f in files], default=1_000_000),
                       row_group_rows=row_group_rows or max([n for f in files for n in f.row_groups], default=100_000),
                       overwrite=overwrite, schema_digest=old.schema_digest) as writer:
        for split, split_files in old.splits.items():
            for fi in split_files:
                fs, path = storage.filesystem(storage.join(src, fi.path))
                pf = pq.ParquetFile(path, filesystem=fs)
                for rg in range(pf.num_row_groups):
                    writer.write(split, pf.read_row_group(rg))
        writer.set_source({**old.source, "rewritten_from": {"path": storage.absolute(src),
                                                            "format_version": old.format_version}})
        return writer.close()
