"""A versioned key-value store of knowledge vectors: KEEP's General Knowledge Center behind one small interface.

KEEP (Zhang et al., "KEEP: An Industrial Pre-Training Framework for Online Recommendation via Knowledge
Extraction and Plugging", CIKM 2022, arXiv 2208.10174; sections 3.2 and 5.2-5.3) caches the pre-trained model's
knowledge in a key-value service so serving does not recompute it, and keeps several versions (KEEP keeps 5) so a
downstream model reads the version it was trained with. This module is that service's client side:

* a *version* (a string such as ``mem-20261201-ab12cd34``) holds several *kinds* (``user``, ``item``,
  ``user_category``, ...), each a map from an int64 key to a float32 vector whose width is fixed per kind;
* a version is written through a :class:`VersionWriter` (``store.begin(version, dims)``, ``put`` in batches,
  ``publish(meta)``) and becomes visible all at once, in one transaction, or not at all;
* :meth:`KnowledgeStore.lookup` names its version; a version that is not published is an error naming the
  version, the store and the versions it has: never a silent fallback to another version;
* :meth:`KnowledgeStore.prune` keeps the newest ``keep`` published versions (KEEP's 5 by default), unpublishing a
  version atomically before its data is deleted, so a reader sees a whole version or none.

:func:`open_store` picks the backend from the URI: a plain path or ``sqlite:///path`` is the embedded store (one
SQLite file, no server; :mod:`mkt_torchrec.cache.sqlite_store`), ``redis://[user:password@]host:port/db`` is Redis
for serving at scale (:mod:`mkt_torchrec.cache.redis_store`).

**Why SQLite is the embedded default.** Chosen by ``tools/bench_cache.py``: batched lookups of random keys (10% of
them absent), one batch at a time, through each store's read path including its version check. The rule, fixed
before the 1M-key run: LMDB (a C extension from PyPI, a map size to preset, no SQL to inspect a file with) would
become the default only if it cut SQLite's p99 latency at batch 512 by half or more; otherwise SQLite, which is in
Python's standard library.

BENCHMARK
    ``python tools/bench_cache.py --keys 1000000 --dim 16 --batch 64 512 4096 --lookups 2000`` on this project's
    2-core x86_64 CPU machine (Linux 6.18, Python 3.11.7, SQLite 3.40.1, LMDB 0.9.36 / py-lmdb 3.0.0,
    redis-server 7.0.15 on localhost; shared with other jobs, load average 1.5-3 during the run). One client, one
    batch at a time, 10% of the keys absent; rows/s = keys looked up per second; latency of one batch in ms:

    ======  ===========  ===========================  ===========================  ===========================
    store   load rows/s  batch 64: rows/s p50/p95/p99  batch 512                    batch 4096
    ======  ===========  ===========================  ===========================  ===========================
    sqlite  172k         222k  0.29 / 0.33 / 0.35     307k  1.65 / 1.82 / 1.94     370k  11.9 / 13.6 / 14.4
    lmdb    334k         288k  0.22 / 0.26 / 0.28     351k  1.45 / 1.53 / 1.57     508k   7.7 / 10.2 / 11.2
    redis   337k         143k  0.40 / 0.66 / 0.70     284k  1.73 / 2.30 / 2.98     229k  16.5 / 24.7 / 31.3
    ======  ===========  ===========================  ===========================  ===========================

    Sizes: SQLite file + WAL 166 MB, LMDB 293 MB, Redis 130 MB of memory (1M x 16 float32 = 61 MB of vectors).
    Two more runs at batch 512 only (2000 batches, the stores in either order) gave p99 2.25 / 1.88 ms (SQLite)
    against 1.86 / 1.57 ms (LMDB). A first run with 500 batches gave 3.3 against 1.6 ms, which alone would have met
    the rule; SQLite's p95 / p99 in it were twice its p50 (the machine was busy) and the three longer runs did not
    repeat it. LMDB looks up 1.1-1.4x more rows/s, its p99 is 1.2-1.3x lower at every batch size, and it loads
    2x faster: short of the rule. SQLite stays the default (standard library; a file any ``sqlite3`` shell reads);
    ``lmdb`` is not a dependency.

**Choices the papers leave open, made here.**

* Keys are int64 (the dataset's id space, :mod:`mkt_torchrec.data`); vectors are stored as little-endian float32
  bytes, so a lookup returns them bit-exact. ``put`` refuses any other dtype rather than casting silently.
* A key written twice in one version keeps its last vector (``INSERT OR REPLACE`` / ``HSET``).
* "Oldest" means published first: versions are ordered by a publish sequence number kept in the store, not by
  their names or the clocks of the machines that loaded them.
* Loading a version that is already published is a no-op: ``begin`` returns a writer whose
  ``already_published`` is True, whose ``put`` does nothing and whose ``publish`` returns False. Two loaders of one
  version racing: each writes its own staging area, the first ``publish`` wins, the second returns False and
  deletes its staging data.
* An abandoned writer (its process killed) leaves its staging data invisible; the next ``begin`` or ``prune``
  deletes it when the writer's process is gone (same host: its pid no longer runs) or its last ``put`` is older
  than ``stale_after_s`` (default one hour: a writer must not pause longer than that between puts). On Redis the
  staging keys also carry that TTL, so they expire even if no one calls ``begin`` again.
* Credentials come only from the URI's user information or, for Redis, the ``REDISCLI_AUTH`` variable (the one
  ``redis-cli`` reads); errors and logs show the URI with its password masked (:func:`display`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from mkt_torchrec.storage import display as _display_uri

DEFAULT_KEEP = 5  # KEEP keeps 5 versions of its knowledge (section 5.3)
STALE_AFTER_S = 3600.0  # a writer silent for this long is abandoned
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # versions and kinds: safe in Redis keys and logs
VECTOR_DTYPE = np.dtype("<f4")
KEY_DTYPE = np.dtype("<i8")


class VersionNotPublished(LookupError):
    """A lookup named a version the store does not have published (one line: version, store, versions it has)."""


class StoreUnreachable(OSError):
    """The store could not be opened or reached (one line naming its URI, password masked)."""


class Lookup(NamedTuple):
    """What :meth:`KnowledgeStore.lookup` returns for N keys."""

    vectors: np.ndarray  # (N, D) float32; rows of absent keys are zeros
    found: np.ndarray  # (N,) bool


@dataclass(frozen=True)
class VersionInfo:
    """A published version: its name, the caller's ``meta``, each kind's width and row count, and its place."""

    version: str
    meta: dict[str, Any]
    dims: dict[str, int]
    rows: dict[str, int]
    sequence: int  # publish order in this store: the oldest has the smallest
    published_at: float  # seconds since the epoch, the publishing machine's clock (informative only)
    token: str = field(default="", repr=False)  # the writer that loaded it: names its data (backend detail)

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "meta": self.meta, "dims": self.dims, "rows": self.rows,
                           "sequence": self.sequence, "published_at": self.published_at, "token": self.token},
                          sort_keys=True)

    @staticmethod
    def from_json(text: str | bytes) -> VersionInfo:
        d = json.loads(text)
        return VersionInfo(d["version"], d["meta"], d["dims"], d["rows"], d["sequence"], d["published_at"],
                           d["token"])


@dataclass(frozen=True)
class WriterRecord:
    """Who is loading what, kept in the store so another process can tell an abandoned load from a live one."""

    token: str
    version: str
    dims: dict[str, int]
    host: str
    pid: int
    heartbeat: float

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @staticmethod
    def from_json(text: str | bytes) -> WriterRecord:
        return WriterRecord(**json.loads(text))

    @staticmethod
    def new(version: str, dims: Mapping[str, int]) -> WriterRecord:
        return WriterRecord(os.urandom(8).hex(), version, dict(dims), socket.gethostname(), os.getpid(), time.time())

    def abandoned(self, stale_after_s: float, now: float | None = None) -> bool:
        """The writer's process is gone (same host) or it has been silent for ``stale_after_s``."""
        if (now if now is not None else time.time()) - self.heartbeat > stale_after_s:
            return True
        return self.host == socket.gethostname() and not _pid_alive(self.pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def check_name(what: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{what} {name!r}: must be 1-128 characters of letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def check_dims(dims: Mapping[str, int]) -> dict[str, int]:
    if not dims:
        raise ValueError("dims: a version needs at least one kind ({kind: dim})")
    out = {}
    for kind, dim in dims.items():
        check_name("kind", kind)
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"kind {kind!r}: dim must be a positive integer, got {dim!r}")
        out[kind] = int(dim)
    return out


def as_keys(keys: Any, what: str) -> np.ndarray:
    """``keys`` as a 1-D little-endian int64 array, or a one-line error naming ``what``."""
    arr = np.asarray(keys)
    if arr.ndim != 1:
        raise ValueError(f"{what}: keys must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, KEY_DTYPE)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what}: keys must be integers (int64), got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{what}: key {int(arr.max())} does not fit in int64")
    return arr.astype(KEY_DTYPE, copy=False)


class VersionWriter(ABC):
    """Loads one version: ``put`` in batches, then ``publish`` makes it visible at once (or ``abort``).

    Used as a context manager, leaving the block without ``publish`` (an exception included) aborts: the staging
    data is deleted and nothing becomes visible.

    Example::

        with store.begin("mem-20261201-ab12cd34", dims={"user": 16}) as writer:
            if not writer.already_published:
                writer.put("user", np.arange(3), np.ones((3, 16), np.float32))
                writer.publish({"mem_digest": "..."})
    """

    def __init__(self, store: KnowledgeStore, version: str, dims: dict[str, int], already_published: bool):
        self.store = store
        self.version = version
        self.dims = dims
        self.already_published = already_published  # begin found it published: put / publish are no-ops
        self._done = already_published

    def put(self, kind: str, keys: Any, vectors: Any) -> None:
        """Write ``vectors`` (N, dims[kind]) float32 under ``keys`` (N,) int64 of ``kind``; not yet visible."""
        if self.already_published:
            return
        if self._done:
            raise RuntimeError(f"version {self.version!r}: this writer has already published or aborted")
        if kind not in self.dims:
            raise ValueError(f"version {self.version!r}: kind {kind!r} is not among this version's kinds "
                             f"{sorted(self.dims)}")
        dim = self.dims[kind]
        keys = as_keys(keys, f"version {self.version!r} kind {kind!r}")
        vec = np.asarray(vectors)
        if vec.ndim != 2 or vec.shape[1] != dim:
            raise ValueError(f"kind {kind!r}: vectors must be (N, {dim}) (its dim is {dim}), got shape {vec.shape}")
        if vec.shape[0] != keys.shape[0]:
            raise ValueError(f"kind {kind!r}: {keys.shape[0]} keys but {vec.shape[0]} vectors")
        if vec.dtype != np.float32:
            raise ValueError(f"kind {kind!r}: vectors must be float32 (stored bit-exact), got {vec.dtype}")
        if keys.size:
            self._put(kind, keys, np.ascontiguousarray(vec, dtype=VECTOR_DTYPE))

    def publish(self, meta: Mapping[str, Any] | None = None) -> bool:
        """Make the version visible, atomically, with ``meta`` (JSON-serialisable). False when the version was
        already published (by an earlier load, or a concurrent one that published first): then nothing changed."""
        if self.already_published:
            return False
        if self._done:
            raise RuntimeError(f"version {self.version!r}: this writer has already published or aborted")
        meta = dict(meta or {})
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise ValueError(f"version {self.version!r}: meta must be JSON-serialisable ({e})") from None
        self._done = True
        try:
            return self._publish(meta)
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                self._abort()
            raise

    def abort(self) -> None:
        """Delete what this writer staged; nothing becomes visible. Idempotent."""
        if not self._done:
            self._done = True
            self._abort()

    def __enter__(self) -> VersionWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    @abstractmethod
    def _put(self, kind: str, keys: np.ndarray, vectors: np.ndarray) -> None: ...

    @abstractmethod
    def _publish(self, meta: dict[str, Any]) -> bool: ...

    @abstractmethod
    def _abort(self) -> None: ...


class KnowledgeStore(ABC):
    """The interface every backend implements. Public methods validate; backends implement the ``_`` methods.

    One store object per process (and per thread): connections are not shared across ``fork``.
    """

    def __init__(self, uri: str, stale_after_s: float = STALE_AFTER_S):
        self.uri = uri
        self.stale_after_s = stale_after_s

    @property
    def display(self) -> str:
        """The URI as errors and logs show it: a password masked."""
        return _display_uri(self.uri)

    # -- writing -----------------------------------------------------------------------------------------------

    def begin(self, version: str, dims: Mapping[str, int]) -> VersionWriter:
        """Start loading ``version`` with ``dims`` ({kind: width}); first clean up abandoned writers' leftovers."""
        check_name("version", version)
        dims = check_dims(dims)
        self._cleanup()
        return self._begin(version, dims)

    # -- reading -----------------------------------------------------------------------------------------------

    def versions(self) -> list[VersionInfo]:
        """The published versions, oldest (first published) first."""
        return sorted(self._versions(), key=lambda v: v.sequence)

    def info(self, version: str) -> VersionInfo:
        """The published ``version``, or :class:`VersionNotPublished`."""
        for v in self.versions():
            if v.version == version:
                return v
        raise self.not_published(version)

    def lookup(self, version: str, kind: str, keys: Any) -> Lookup:
        """The vectors of ``keys`` (N,) in ``kind`` of ``version``: (N, D) float32 and found (N,) bool.

        One round trip / one query per call (large batches are chunked). Errors if ``version`` is not published.
        """
        keys = as_keys(keys, f"lookup of version {version!r} kind {kind!r}")
        return self._lookup(version, kind, keys)

    # -- retiring ----------------------------------------------------------------------------------------------

    def prune(self, keep: int = DEFAULT_KEEP) -> list[str]:
        """Drop the oldest published versions so that at most ``keep`` stay; returns the dropped names, oldest
        first. Each is unpublished atomically before its data is deleted."""
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ValueError(f"keep must be a non-negative integer, got {keep!r}")
        self._cleanup()
        published = self.versions()
        dropped = [v.version for v in published[:max(0, len(published) - keep)]]
        return [v for v in dropped if self.drop(v)]

    def drop(self, version: str) -> bool:
        """Unpublish ``version`` (atomically), then delete its data. False if it was not published."""
        check_name("version", version)
        return self._drop(version)

    @abstractmethod
    def close(self) -> None:
        """Release the connection."""

    def __enter__(self) -> KnowledgeStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- helpers for backends ----------------------------------------------------------------------------------

    def not_published(self, version: str) -> VersionNotPublished:
        have = [v.version for v in self.versions()]
        return VersionNotPublished(f"version {version!r} is not published in {self.display} (it has: "
                                   f"{', '.join(have) if have else 'no versions'})")

    @staticmethod
    def unknown_kind(info: VersionInfo, kind: str) -> ValueError:
        return ValueError(f"version {info.version!r} has no kind {kind!r} (its kinds: {sorted(info.dims)})")

    @staticmethod
    def assemble(keys: np.ndarray, found_keys: np.ndarray, found_blob: bytes, dim: int) -> Lookup:
        """Place the rows a backend found (``found_keys`` and their vectors' bytes, in any order) at the
        positions of ``keys`` (duplicates allowed); absent keys get zeros and found False."""
        vectors = np.zeros((keys.shape[0], dim), np.float32)
        found = np.zeros(keys.shape[0], bool)
        if found_keys.size:
            rows = np.frombuffer(found_blob, VECTOR_DTYPE).reshape(-1, dim)  # (M, D)
            order = np.argsort(found_keys, kind="stable")
            sorted_keys = found_keys[order]
            pos = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
            found = sorted_keys[pos] == keys
            vectors[found] = rows[order[pos[found]]]
        return Lookup(vectors, found)

    @abstractmethod
    def _begin(self, version: str, dims: dict[str, int]) -> VersionWriter: ...

    @abstractmethod
    def _versions(self) -> list[VersionInfo]: ...

    @abstractmethod
    def _lookup(self, version: str, kind: str, keys: np.ndarray) -> Lookup: ...

    @abstractmethod
    def _drop(self, version: str) -> bool: ...

    @abstractmethod
    def _cleanup(self) -> None:
        """Delete what abandoned writers and interrupted drops left behind."""


def open_store(uri: str, stale_after_s: float = STALE_AFTER_S) -> KnowledgeStore:
    """The store at ``uri``: a plain path or ``sqlite:///path`` (a file, created if missing) or
    ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS). An unknown scheme or an unreachable store is
    a one-line error naming the URI (its password masked)."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"cache store URI must be a non-empty string, got {uri!r}")
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("", "sqlite"):
        from mkt_torchrec.cache.sqlite_store import SQLiteStore

        return SQLiteStore(uri, stale_after_s)
    if scheme in ("redis", "rediss"):
        from mkt_torchrec.cache.redis_store import RedisStore

        return RedisStore(uri, stale_after_s)
    raise ValueError(f"{_display_uri(uri)}: unknown cache store scheme {scheme!r} (use a path, sqlite:///PATH or "
                     "redis://HOST:PORT/DB)")
