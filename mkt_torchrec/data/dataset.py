"""A dataset on disk: ``DIR/manifest.json`` plus Parquet files per split.

Layout::

    DIR/manifest.json            format version, schema digest, columns, per-split files and row counts
    DIR/train/part-00000.parquet
    DIR/test/part-00000.parquet

:class:`DatasetWriter` writes into ``DIR.tmp-<pid>`` and renames it to ``DIR`` only when every file and the
manifest are complete, so an interrupted run never leaves a dataset that looks finished.
:func:`open_dataset` reads the manifest and checks every file's footer against the config's schema;
:func:`open_dataset_shared` does the same for all ranks of a process group, reading each footer once in total.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from mkt_torchrec.config import SchemaConfig
from mkt_torchrec.fsutil import check_replaceable, replace_dir
from mkt_torchrec.data.schema import ENTITY_CODES, arrow_schema, check_columns

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class FileInfo:
    path: str  # relative to the dataset directory
    rows: int
    row_groups: list[int]  # rows per row group


@dataclass
class Manifest:
    format_version: int
    schema_digest: str
    columns: list[str]
    optional_columns: list[str]
    splits: dict[str, list[FileInfo]]
    rows: dict[str, dict[str, int]]  # split -> entity -> rows
    source: dict[str, Any] = field(default_factory=dict)  # how it was made (synth params, tenrec inputs)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "schema_digest": self.schema_digest,
            "columns": self.columns,
            "optional_columns": self.optional_columns,
            "splits": {s: [vars(f) for f in fs] for s, fs in self.splits.items()},
            "rows": self.rows,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> "Manifest":
        try:
            if d["format_version"] != FORMAT_VERSION:
                raise ValueError(f"format_version {d['format_version']} (this code reads {FORMAT_VERSION})")
            return cls(
                format_version=d["format_version"],
                schema_digest=d["schema_digest"],
                columns=list(d["columns"]),
                optional_columns=list(d.get("optional_columns", [])),
                splits={s: [FileInfo(**f) for f in fs] for s, fs in d["splits"].items()},
                rows={s: dict(v) for s, v in d["rows"].items()},
                source=dict(d.get("source", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: not a valid manifest ({type(e).__name__}: {e})") from None

    def split_rows(self, split: str) -> int:
        return sum(f.rows for f in self.splits.get(split, []))


class DatasetWriter:
    """Streams Arrow tables into sharded Parquet files; publishes the dataset atomically on ``close``.

    Args:
        out_dir: the dataset directory to create.
        schema: the feature schema (decides the columns).
        optional: optional columns to write (``true_prob``, ``activity``).
        rows_per_file: rows per Parquet file (a new file starts after this many rows).
        row_group_rows: rows per row group (the reader's unit of work).
        overwrite: replace an existing ``out_dir`` (only once the new one is complete).

    Example:
        >>> with DatasetWriter("data/ds", cfg.schema) as w:   # doctest: +SKIP
        ...     w.write("train", table)
        ...     w.set_source({"kind": "synth"})
    """

    def __init__(self, out_dir: str, schema: SchemaConfig, optional: tuple[str, ...] = (),
                 rows_per_file: int = 1_000_000, row_group_rows: int = 100_000, overwrite: bool = False,
                 schema_digest: str = "") -> None:
        self.out_dir = os.path.abspath(out_dir)
        if os.path.exists(self.out_dir) and not overwrite:
            raise FileExistsError(f"{out_dir}: already exists (pass --overwrite to replace it)")
        check_replaceable(self.out_dir, (MANIFEST,), "a dataset")
        self.schema = arrow_schema(schema, optional)
        self.optional = list(optional)
        self.rows_per_file = rows_per_file
        self.row_group_rows = row_group_rows
        self.schema_digest = schema_digest
        self.tmp_dir = f"{self.out_dir}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        os.makedirs(self.tmp_dir)
        self._writers: dict[str, Optional[pq.ParquetWriter]] = {}
        self._files: dict[str, list[FileInfo]] = {}
        self._rows: dict[str, dict[str, int]] = {}
        self._pending: dict[str, list[pa.Table]] = {}
        self._pending_rows: dict[str, int] = {}
        self._source: dict[str, Any] = {}
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
        """Append rows to ``split``. Columns are cast to the dataset schema (a mismatch raises)."""
        if table.num_rows == 0:
            return
        table = table.select(self.schema.names).cast(self.schema)
        ent = table.column("entity").to_numpy()
        counts = self._rows.setdefault(split, {"source": 0, "target": 0})
        for name, code in ENTITY_CODES.items():
            counts[name] += int((ent == code).sum())
        self._pending.setdefault(split, []).append(table)
        self._pending_rows[split] = self._pending_rows.get(split, 0) + table.num_rows
        if self._pending_rows[split] >= self.row_group_rows:
            self._flush(split, final=False)

    def _flush(self, split: str, final: bool) -> None:
        pending = pa.concat_tables(self._pending.pop(split, []))
        self._pending_rows[split] = 0
        start = 0
        n = pending.num_rows
        while n - start >= self.row_group_rows or (final and start < n):
            take = min(self.row_group_rows, n - start)
            self._write_row_group(split, pending.slice(start, take))
            start += take
        if start < n:
            self._pending[split] = [pending.slice(start)]
            self._pending_rows[split] = n - start

    def _write_row_group(self, split: str, rg: pa.Table) -> None:
        files = self._files.setdefault(split, [])
        writer = self._writers.get(split)
        if writer is None or files[-1].rows >= self.rows_per_file:
            if writer is not None:
                writer.close()
            rel = os.path.join(split, f"part-{len(files):05d}.parquet")
            os.makedirs(os.path.join(self.tmp_dir, split), exist_ok=True)
            writer = pq.ParquetWriter(os.path.join(self.tmp_dir, rel), self.schema, compression="zstd")
            self._writers[split] = writer
            files.append(FileInfo(path=rel, rows=0, row_groups=[]))
        writer.write_table(rg, row_group_size=rg.num_rows)
        files[-1].rows += rg.num_rows
        files[-1].row_groups.append(rg.num_rows)

    def close(self) -> Manifest:
        """Flush, write the manifest, and rename the temporary directory into place."""
        if self._closed:
            raise RuntimeError("DatasetWriter already closed")
        for split in list(self._pending):
            self._flush(split, final=True)
        for w in self._writers.values():
            if w is not None:
                w.close()
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            schema_digest=self.schema_digest,
            columns=self.schema.names,
            optional_columns=self.optional,
            splits=self._files,
            rows=self._rows,
            source=self._source,
        )
        tmp_manifest = os.path.join(self.tmp_dir, MANIFEST)
        with open(tmp_manifest, "w", encoding="utf-8") as f:
            json.dump(manifest.to_json(), f, indent=2)
        replace_dir(self.tmp_dir, self.out_dir)
        self._closed = True
        return manifest

    def abort(self) -> None:
        """Drop everything written so far."""
        for w in self._writers.values():
            try:
                if w is not None:
                    w.close()
            except Exception:  # noqa: BLE001 - best effort while already failing
                pass
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._closed = True


def _read_manifest(data_dir: str) -> Manifest:
    """Read and parse ``DIR/manifest.json`` (no file checks)."""
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        hint = " (an interrupted write leaves only a .tmp-* directory)" if os.path.isdir(data_dir) else ""
        raise FileNotFoundError(f"{data_dir}: not a dataset, {MANIFEST} is missing{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable manifest: {e}") from None
    return Manifest.from_json(raw, path)


def _files_in_order(manifest: Manifest) -> list[FileInfo]:
    """Every file of every split, in manifest order (the order checks report failures in)."""
    return [fi for files in manifest.splits.values() for fi in files]


def _check_file(data_dir: str, fi: FileInfo, expected: pa.Schema) -> None:
    """Read one file's footer and check its columns; raise ``ValueError`` naming the file and column."""
    fpath = os.path.join(data_dir, fi.path)
    try:
        file_schema = pq.read_schema(fpath)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{fpath}: unreadable Parquet file: {e}") from None
    check_columns(file_schema, expected, fpath)


def open_dataset(data_dir: str, schema: SchemaConfig, check_files: bool = True) -> Manifest:
    """Read ``DIR/manifest.json`` and check that every file has the columns ``schema`` needs.

    Every call reads every file's footer; in a process group use :func:`open_dataset_shared`, which reads
    each footer once in total.

    Raises:
        FileNotFoundError / ValueError: naming the directory, file and column at fault.
    """
    manifest = _read_manifest(data_dir)
    if check_files:
        expected = arrow_schema(schema)
        for fi in _files_in_order(manifest):
            _check_file(data_dir, fi, expected)
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
    files = _files_in_order(manifest)
    lo, hi = len(files) * comm.rank // comm.world, len(files) * (comm.rank + 1) // comm.world

    def check_share() -> None:  # a contiguous share: the lowest failing rank holds the first bad file
        expected = arrow_schema(schema)
        for fi in files[lo:hi]:
            _check_file(data_dir, fi, expected)

    comm.phase(check_share)
    return manifest
