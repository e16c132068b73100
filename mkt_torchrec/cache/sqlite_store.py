"""The embedded knowledge store: one SQLite file, no server (``open_store(PATH)`` or ``open_store("sqlite://PATH")``).

Layout: a registry table of published versions (``mkt_cache_versions``: version -> token, sequence, info JSON), a
table of live writers (``mkt_cache_writers``: token -> host, pid, heartbeat) and one data table per (writer token,
kind), ``mkt_cache_data_<token>_<i>`` with the int64 key as its rowid and the vector as a float32 blob, so a lookup
is a primary-key probe and dropping a version is a ``DROP TABLE``, not millions of row deletes.

* **Atomic publish**: one ``BEGIN IMMEDIATE`` transaction checks that the version is not published, inserts its
  registry row and removes its writer row. Before that its data tables exist but no registry row names them, and a
  lookup reads through the registry, so they are invisible.
* **A lookup is one query** per batch (up to 32,000 keys; larger batches are chunked inside one read
  transaction): ``SELECT key, vec ... WHERE key IN (...) AND EXISTS (registry row of this version and token)``, so
  the version check and the read are one snapshot; a version dropped or replaced meanwhile is detected and refused.
* **Drop**: the registry row is deleted in one transaction, then the tables in another; tables that no registry
  or writer row names (a drop or a load interrupted part-way) are dropped by the next ``begin`` / ``prune``.
* WAL journal (readers never wait for the loader), ``synchronous=NORMAL`` (a power cut may lose the last
  committed transaction but never leaves a half version: acceptable for a cache that can be reloaded),
  ``auto_vacuum=INCREMENTAL`` so dropped versions give their space back to the file system, ``mmap_size`` so
  lookups read pages through a memory map (half the latency of ``read`` calls in tools/bench_cache.py).
* A path, not a URI of an object store: SQLite needs a local (not network) file system. ``sqlite:///abs/x.db``
  is ``/abs/x.db``; ``sqlite://rel/x.db`` is relative. The file is created if missing; its directory is not.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from mkt_torchrec.cache.store import (
    KEY_DTYPE,
    STALE_AFTER_S,
    KnowledgeStore,
    Lookup,
    StoreUnreachable,
    VersionInfo,
    VersionWriter,
    WriterRecord,
)

SCHEMA_VERSION = "1"
_DATA_PREFIX = "mkt_cache_data_"
MAX_PARAMS = 32000  # below SQLITE_MAX_VARIABLE_NUMBER (32766 since SQLite 3.32)
MMAP_BYTES = 1 << 40  # read pages through mmap (halved lookup latency here); capped by SQLITE_MAX_MMAP_SIZE (2 GB)


def _path(uri: str) -> str:
    return uri[len("sqlite://"):] if uri.lower().startswith("sqlite://") else uri


def _tables(token: str, dims: dict[str, int]) -> dict[str, str]:
    """{kind: table name}; kinds are numbered in sorted order (kind names never reach SQL)."""
    return {kind: f"{_DATA_PREFIX}{token}_{i}" for i, kind in enumerate(sorted(dims))}


class SQLiteStore(KnowledgeStore):
    """Versions of knowledge vectors in one SQLite file (see the module docstring).

    Example::

        store = SQLiteStore("/tmp/knowledge.db")
    """

    def __init__(self, uri: str, stale_after_s: float = STALE_AFTER_S):
        super().__init__(uri, stale_after_s)
        self.path = _path(uri)
        self._infos: dict[str, VersionInfo] = {}  # published versions are immutable: cached, re-checked per lookup
        try:
            self.conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self.conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # effective only on a new file (before tables)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
            with self._transaction():
                self.conn.execute("CREATE TABLE IF NOT EXISTS mkt_cache_schema (name TEXT PRIMARY KEY, value TEXT)")
                self.conn.execute("CREATE TABLE IF NOT EXISTS mkt_cache_versions (version TEXT PRIMARY KEY, "
                                  "token TEXT NOT NULL, sequence INTEGER NOT NULL, info TEXT NOT NULL)")
                self.conn.execute("CREATE TABLE IF NOT EXISTS mkt_cache_writers (token TEXT PRIMARY KEY, "
                                  "record TEXT NOT NULL)")
                self.conn.execute("INSERT OR IGNORE INTO mkt_cache_schema VALUES ('schema', ?), ('sequence', '0')",
                                  (SCHEMA_VERSION,))
                found = self.conn.execute("SELECT value FROM mkt_cache_schema WHERE name='schema'").fetchone()[0]
        except sqlite3.Error as e:
            raise StoreUnreachable(f"{self.display}: cannot open the SQLite knowledge cache "
                                   f"({type(e).__name__}: {e})") from None
        if found != SCHEMA_VERSION:
            raise StoreUnreachable(f"{self.display}: knowledge cache schema {found!r}, this code reads "
                                   f"{SCHEMA_VERSION!r}")

    @contextlib.contextmanager
    def _transaction(self, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        self.conn.execute(f"BEGIN {mode}")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()

    # -- writing -----------------------------------------------------------------------------------------------

    def _begin(self, version: str, dims: dict[str, int]) -> VersionWriter:
        if self._registered(version) is not None:
            return SQLiteWriter(self, version, dims, None)
        record = WriterRecord.new(version, dims)
        with self._transaction():
            self.conn.execute("INSERT INTO mkt_cache_writers VALUES (?, ?)", (record.token, record.to_json()))
            for table in _tables(record.token, dims).values():
                self.conn.execute(f'CREATE TABLE "{table}" (key INTEGER PRIMARY KEY, vec BLOB NOT NULL)')
        return SQLiteWriter(self, version, dims, record)

    def _registered(self, version: str) -> VersionInfo | None:
        row = self.conn.execute("SELECT info FROM mkt_cache_versions WHERE version=?", (version,)).fetchone()
        return VersionInfo.from_json(row[0]) if row else None

    # -- reading -----------------------------------------------------------------------------------------------

    def _versions(self) -> list[VersionInfo]:
        return [VersionInfo.from_json(r[0]) for r in self.conn.execute("SELECT info FROM mkt_cache_versions")]

    def _info(self, version: str) -> VersionInfo:
        info = self._infos.get(version) or self._registered(version)
        if info is None:
            raise self.not_published(version)
        self._infos[version] = info
        return info

    def _lookup(self, version: str, kind: str, keys: np.ndarray) -> Lookup:
        for _ in range(2):  # a second pass only if the version was dropped and loaded again since it was cached
            info = self._info(version)
            if kind not in info.dims:
                raise self.unknown_kind(info, kind)
            table = _tables(info.token, info.dims)[kind]
            try:
                rows = self._select(table, info, keys)
            except sqlite3.OperationalError as e:
                if "no such table" not in str(e):
                    raise
                rows = None  # dropped since it was cached
            if rows:  # found rows, read in the same statement as the registry check: the version is published
                break
            # none found: absent keys, or the version is no longer the one cached; ask the registry
            self._infos.pop(version, None)
            if rows is not None and self._info(version).token == info.token:
                break
        else:
            raise self.not_published(version)
        found_keys = np.fromiter((r[0] for r in rows), KEY_DTYPE, len(rows))
        return self.assemble(keys, found_keys, b"".join(r[1] for r in rows), info.dims[kind])

    def _select(self, table: str, info: VersionInfo, keys: np.ndarray) -> list[tuple[int, bytes]]:
        def query(chunk: list[int]) -> list[tuple[int, bytes]]:
            sql = (f'SELECT key, vec FROM "{table}" WHERE key IN ({",".join("?" * len(chunk))}) AND EXISTS '
                   "(SELECT 1 FROM mkt_cache_versions WHERE version=? AND token=?)")
            return self.conn.execute(sql, (*chunk, info.version, info.token)).fetchall()

        unique = np.unique(keys).tolist()
        if len(unique) <= MAX_PARAMS:
            return query(unique) if unique else []
        with self._transaction("DEFERRED"):  # one snapshot across the chunks
            return [row for i in range(0, len(unique), MAX_PARAMS) for row in query(unique[i:i + MAX_PARAMS])]

    # -- retiring ----------------------------------------------------------------------------------------------

    def _drop(self, version: str) -> bool:
        with self._transaction():
            info = self._registered(version)
            if info is None:
                return False
            self.conn.execute("DELETE FROM mkt_cache_versions WHERE version=?", (version,))
        self._infos.pop(version, None)
        self._drop_tables(_tables(info.token, info.dims).values())
        return True

    def _drop_tables(self, tables: Any) -> None:
        tables = list(tables)
        if tables:
            with self._transaction():
                for table in tables:
                    self.conn.execute(f'DROP TABLE IF EXISTS "{table}"')
            self.conn.execute("PRAGMA incremental_vacuum")

    def _cleanup(self) -> None:
        with self._transaction():
            for token, text in self.conn.execute("SELECT token, record FROM mkt_cache_writers").fetchall():
                if WriterRecord.from_json(text).abandoned(self.stale_after_s):
                    self.conn.execute("DELETE FROM mkt_cache_writers WHERE token=?", (token,))
            live = {r[0] for r in self.conn.execute("SELECT token FROM mkt_cache_versions UNION "
                                                    "SELECT token FROM mkt_cache_writers")}
            orphans = [name for (name,) in self.conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE ?", (_DATA_PREFIX + "%",))
                if name[len(_DATA_PREFIX):].rsplit("_", 1)[0] not in live]
        self._drop_tables(orphans)


class SQLiteWriter(VersionWriter):
    """Loads one version into a :class:`SQLiteStore`: each ``put`` is one transaction on this writer's tables."""

    def __init__(self, store: SQLiteStore, version: str, dims: dict[str, int], record: WriterRecord | None):
        super().__init__(store, version, dims, already_published=record is None)
        self.sqlite = store
        self.record = record
        self.tables = _tables(record.token, dims) if record else {}

    def _heartbeat(self, conn: sqlite3.Connection) -> None:
        record = WriterRecord(**{**self.record.__dict__, "heartbeat": time.time()})
        if conn.execute("UPDATE mkt_cache_writers SET record=? WHERE token=?",
                        (record.to_json(), record.token)).rowcount != 1:
            raise RuntimeError(f"version {self.version!r}: this load was cleaned up as abandoned (silent for more "
                               f"than {self.store.stale_after_s:.0f} s) in {self.store.display}")

    def _put(self, kind: str, keys: np.ndarray, vectors: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")  # B-tree inserts in key order (1.8x faster); a repeated key: last wins
        keys, vectors = keys[order], vectors[order]
        width = vectors.shape[1] * vectors.itemsize
        blob = vectors.tobytes()
        rows = zip(keys.tolist(), (blob[i:i + width] for i in range(0, len(blob), width)), strict=True)
        with self.sqlite._transaction() as conn:
            self._heartbeat(conn)
            conn.executemany(f'INSERT OR REPLACE INTO "{self.tables[kind]}" (key, vec) VALUES (?, ?)', rows)

    def _publish(self, meta: dict[str, Any]) -> bool:
        store = self.sqlite
        with store._transaction() as conn:
            first = store._registered(self.version) is None
            if first:
                self._heartbeat(conn)
                rows = {kind: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]
                        for kind, t in self.tables.items()}
                sequence = int(conn.execute("SELECT value FROM mkt_cache_schema WHERE name='sequence'")
                               .fetchone()[0]) + 1
                info = VersionInfo(self.version, meta, self.dims, rows, sequence, time.time(), self.record.token)
                conn.execute("UPDATE mkt_cache_schema SET value=? WHERE name='sequence'", (str(sequence),))
                conn.execute("INSERT INTO mkt_cache_versions VALUES (?, ?, ?, ?)",
                             (self.version, self.record.token, sequence, info.to_json()))
                conn.execute("DELETE FROM mkt_cache_writers WHERE token=?", (self.record.token,))
        if not first:
            self._abort()  # published meanwhile by another load: ours is a duplicate
            return False
        # the loaded pages move from the WAL into the file, where readers reach them through mmap
        store.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return True

    def _abort(self) -> None:
        with self.sqlite._transaction() as conn:
            conn.execute("DELETE FROM mkt_cache_writers WHERE token=?", (self.record.token,))
        self.sqlite._drop_tables(self.tables.values())
