"""The serving knowledge store: Redis (``open_store("redis://[user:password@]host:port/db")``).

Layout, all under the prefix ``mkt:cache:`` of the URI's database:

* ``versions``: a hash, version -> :class:`VersionInfo` JSON (its writer token, dims, rows, sequence, meta);
* ``sequence``: the publish counter that orders versions;
* ``writers``: a hash, token -> :class:`WriterRecord` JSON (host, pid, heartbeat) of loads in progress;
* ``trash``: a set of data keys that a drop unpublished but has not deleted yet (an interrupted drop's leftovers);
* ``data:<token>:<kind>``: one hash per loaded (version, kind), field = the key as 8 little-endian bytes, value =
  the vector as little-endian float32 bytes. Naming data by the writer's token, not the version, keeps two loads
  of one version, or a drop and a reload of it, from ever touching each other's data.

* **Atomic publish**: ``WATCH versions sequence``, then one ``MULTI``: ``PERSIST`` the data keys, ``HSET`` the
  registry, bump the sequence, remove the writer record. Until then the data keys carry a TTL of
  ``stale_after_s`` (refreshed on each ``put``), so an abandoned load's data expires even if no one cleans it.
* **A lookup is one round trip**: a ``MULTI`` with ``HGET versions <version>`` and ``HMGET`` of the batch's keys,
  so the version check and the read are one atomic snapshot (the writer token is cached per version and checked
  against the registry's in that same transaction).
* **Drop**: one ``MULTI`` removes the registry entry and records the data keys in ``trash``; then ``UNLINK``
  (Redis frees them in the background) and clear them from ``trash``.
* One hash per (version, kind) lives on one Redis node: a single server (or a primary with replicas) holds the
  cache. Redis Cluster would need the keys spread by hash tag: not done here.
* Credentials: the URI's user information, else the password in ``REDISCLI_AUTH`` (what ``redis-cli`` reads).
  Neither is ever put in a message: errors name the URI with its password masked.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from mkt_torchrec.cache.store import (
    STALE_AFTER_S,
    VECTOR_DTYPE,
    KnowledgeStore,
    Lookup,
    StoreUnreachable,
    VersionInfo,
    VersionWriter,
    WriterRecord,
)

PREFIX = "mkt:cache:"
REGISTRY, SEQUENCE, WRITERS, TRASH = (PREFIX + n for n in ("versions", "sequence", "writers", "trash"))
PASSWORD_VARIABLE = "REDISCLI_AUTH"
CHUNK = 10_000  # fields per HSET / HMGET command (several commands still go in one round trip)


def _data_key(token: str, kind: str) -> str:
    return f"{PREFIX}data:{token}:{kind}"


def _fields(keys: np.ndarray) -> list[bytes]:
    raw = keys.astype("<i8", copy=False).tobytes()
    return [raw[i:i + 8] for i in range(0, len(raw), 8)]


class RedisStore(KnowledgeStore):
    """Versions of knowledge vectors in a Redis database (see the module docstring).

    Example::

        store = RedisStore("redis://127.0.0.1:6379/0", stale_after_s=3600)
    """

    def __init__(self, uri: str, stale_after_s: float = STALE_AFTER_S):
        super().__init__(uri, stale_after_s)
        import redis

        self._redis_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                              redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)
        self._watch_error = redis.exceptions.WatchError
        self._secret = urlsplit(uri).password or os.environ.get(PASSWORD_VARIABLE) or None
        extra = {} if urlsplit(uri).password else {"password": os.environ.get(PASSWORD_VARIABLE) or None}
        self._infos: dict[str, VersionInfo] = {}
        with self._guard("connect to"):
            try:
                self.r = redis.Redis.from_url(uri, socket_connect_timeout=5, socket_timeout=60, **extra)
            except ValueError as e:
                raise StoreUnreachable(f"{self.display}: not a Redis URI ({e})") from None
            self.r.ping()

    @contextlib.contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Redis errors as one line naming the store (its password masked), never the password itself."""
        try:
            yield
        except self._redis_errors as e:
            message = " ".join(str(e).split())
            if self._secret:
                message = message.replace(self._secret, "***")
            raise StoreUnreachable(f"{self.display}: cannot {action} the Redis knowledge cache "
                                   f"({type(e).__name__}: {message})") from None

    def close(self) -> None:
        self.r.close()

    # -- writing -----------------------------------------------------------------------------------------------

    def _begin(self, version: str, dims: dict[str, int]) -> VersionWriter:
        with self._guard("write to"):
            if self.r.hexists(REGISTRY, version):
                return RedisWriter(self, version, dims, None)
            record = WriterRecord.new(version, dims)
            self.r.hset(WRITERS, record.token, record.to_json())
        return RedisWriter(self, version, dims, record)

    # -- reading -----------------------------------------------------------------------------------------------

    def _versions(self) -> list[VersionInfo]:
        with self._guard("read from"):
            return [VersionInfo.from_json(v) for v in self.r.hvals(REGISTRY)]

    def _info(self, version: str) -> VersionInfo:
        info = self._infos.get(version)
        if info is None:
            with self._guard("read from"):
                text = self.r.hget(REGISTRY, version)
            if text is None:
                raise self.not_published(version)
            info = self._infos[version] = VersionInfo.from_json(text)
        return info

    def _lookup(self, version: str, kind: str, keys: np.ndarray) -> Lookup:
        fields = _fields(keys)
        for _ in range(2):  # a second pass only if the version was dropped and loaded again since it was cached
            info = self._info(version)
            if kind not in info.dims:
                raise self.unknown_kind(info, kind)
            with self._guard("read from"):
                pipe = self.r.pipeline(transaction=True)
                pipe.hget(REGISTRY, version)
                for i in range(0, len(fields), CHUNK):
                    pipe.hmget(_data_key(info.token, kind), fields[i:i + CHUNK])
                registered, *chunks = pipe.execute()
            if registered is None:
                self._infos.pop(version, None)
                raise self.not_published(version)
            current = VersionInfo.from_json(registered)
            if current.token == info.token:
                break
            self._infos[version] = current
        else:
            raise self.not_published(version)
        values = [v for chunk in chunks for v in chunk]
        dim = info.dims[kind]
        found = np.fromiter((v is not None for v in values), bool, len(values))
        vectors = np.zeros((len(values), dim), np.float32)
        blob = b"".join(v for v in values if v is not None)
        if len(blob) != int(found.sum()) * dim * VECTOR_DTYPE.itemsize:
            raise ValueError(f"{self.display}: version {version!r} kind {kind!r} holds vectors that are not "
                             f"{dim} float32 wide")
        if blob:
            vectors[found] = np.frombuffer(blob, VECTOR_DTYPE).reshape(-1, dim)  # (found, D)
        return Lookup(vectors, found)

    # -- retiring ----------------------------------------------------------------------------------------------

    def _drop(self, version: str) -> bool:
        with self._guard("drop from"), self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(REGISTRY)
                    text = pipe.hget(REGISTRY, version)
                    if text is None:
                        pipe.unwatch()
                        return False
                    info = VersionInfo.from_json(text)
                    keys = [_data_key(info.token, kind) for kind in info.dims]
                    pipe.multi()
                    pipe.hdel(REGISTRY, version)
                    pipe.sadd(TRASH, *keys)
                    pipe.execute()
                    break
                except self._watch_error:
                    continue
            self._infos.pop(version, None)
            self._delete(keys)
        return True

    def _delete(self, keys: list[str]) -> None:
        if keys:
            pipe = self.r.pipeline(transaction=False)
            pipe.unlink(*keys)
            pipe.srem(TRASH, *keys)
            pipe.execute()

    def _cleanup(self) -> None:
        with self._guard("clean up"):
            for token, text in self.r.hgetall(WRITERS).items():
                record = WriterRecord.from_json(text)
                if record.abandoned(self.stale_after_s):
                    self.r.hdel(WRITERS, token)
                    self.r.unlink(*[_data_key(record.token, kind) for kind in record.dims])
            self._delete([k.decode() for k in self.r.smembers(TRASH)])


class RedisWriter(VersionWriter):
    """Loads one version into a :class:`RedisStore`: each ``put`` is one pipelined round trip."""

    def __init__(self, store: RedisStore, version: str, dims: dict[str, int], record: WriterRecord | None):
        super().__init__(store, version, dims, already_published=record is None)
        self.redis = store
        self.record = record
        self.keys = {kind: _data_key(record.token, kind) for kind in dims} if record else {}
        self.rows_put = dict.fromkeys(dims, 0)

    def _put(self, kind: str, keys: np.ndarray, vectors: np.ndarray) -> None:
        store, key = self.redis, self.keys[kind]
        blob, width = vectors.tobytes(), vectors.shape[1] * vectors.itemsize
        fields = _fields(keys)
        with store._guard("write to"):
            pipe = store.r.pipeline(transaction=False)
            pipe.hset(WRITERS, self.record.token,
                      WriterRecord(**{**self.record.__dict__, "heartbeat": time.time()}).to_json())
            for i in range(0, len(fields), CHUNK):
                pipe.hset(key, mapping={f: blob[(i + j) * width:(i + j + 1) * width]
                                        for j, f in enumerate(fields[i:i + CHUNK])})
            pipe.pexpire(key, int(store.stale_after_s * 1000))
            new_record = pipe.execute()[0]
        if new_record:  # our record was gone: another process cleaned this load up as abandoned
            self._abort()
            raise RuntimeError(f"version {self.version!r}: this load was cleaned up as abandoned (silent for more "
                               f"than {store.stale_after_s:.0f} s) in {store.display}")
        self.rows_put[kind] += len(fields)

    def _publish(self, meta: dict[str, Any]) -> bool:
        store = self.redis
        with store._guard("publish to"), store.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(REGISTRY, SEQUENCE)
                    if pipe.hexists(REGISTRY, self.version):
                        pipe.unwatch()
                        break
                    rows = {kind: int(pipe.hlen(key)) for kind, key in self.keys.items()}
                    lost = [k for k in self.dims if self.rows_put[k] and not rows[k]]
                    if lost:
                        raise RuntimeError(f"version {self.version!r}: the staged data of kinds {lost} expired "
                                           f"(a pause over {store.stale_after_s:.0f} s) in {store.display}")
                    sequence = int(pipe.get(SEQUENCE) or 0) + 1
                    info = VersionInfo(self.version, meta, self.dims, rows, sequence, time.time(), self.record.token)
                    pipe.multi()
                    for key in self.keys.values():
                        pipe.persist(key)
                    pipe.hset(REGISTRY, self.version, info.to_json())
                    pipe.set(SEQUENCE, sequence)
                    pipe.hdel(WRITERS, self.record.token)
                    pipe.execute()
                    return True
                except self.redis._watch_error:
                    continue
        self._abort()  # published meanwhile by another load: ours is a duplicate
        return False

    def _abort(self) -> None:
        with self.redis._guard("clean up"):
            pipe = self.redis.r.pipeline(transaction=True)
            pipe.hdel(WRITERS, self.record.token)
            pipe.unlink(*self.keys.values())
            pipe.execute()
