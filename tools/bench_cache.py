"""Benchmark: batched lookups of knowledge vectors in each key-value store (issue 26's General Knowledge Center).

Loads one version of ``--keys`` random int64 keys with ``--dim``-wide float32 vectors into each store, then times
``--lookups`` batches of each ``--batch`` size of random keys (``--missing`` of them absent), one batch at a time
as a scorer would issue them. The stores:

* ``sqlite``: :class:`mkt_torchrec.cache.sqlite_store.SQLiteStore`, through ``open_store`` and ``lookup`` (its
  real read path: one ``SELECT ... IN (...)`` with the version check);
* ``lmdb``: LMDB (``pip install lmdb``) with the same layout, written here (not a store of the package): a
  registry sub-database and one sub-database per kind, the key as 8 big-endian bytes; a lookup is one read
  transaction with the version check and a ``Cursor.getmulti`` of the sorted keys, placed back by the same
  ``assemble`` the SQLite store uses;
* ``redis``: :class:`mkt_torchrec.cache.redis_store.RedisStore` against ``--redis URI`` or, without it, a
  ``redis-server`` this tool starts on a free localhost port (no persistence).

Prints progress, then ONE JSON object on the last line: per store the load rate and per batch size
``rows_per_s`` (keys looked up per second, one client) and the latency percentiles ``p50_ms`` / ``p95_ms`` /
``p99_ms`` of one batch, plus the machine it ran on.

Usage:
    python tools/bench_cache.py                                  # 1M keys, dim 16, batches 64 / 512 / 4096
    python tools/bench_cache.py --keys 1000000 --dim 16 --batch 512 --lookups 2000
    python tools/bench_cache.py --stores sqlite redis --redis redis://127.0.0.1:6379/15   # an existing server
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

import numpy as np
from _bench import peak_rss_mb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

VERSION, KIND = "bench-v1", "user"
LOAD_BATCH = 50_000


def _data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Unique even int64 keys (absent keys are odd) and their vectors."""
    rng = np.random.default_rng(args.seed)
    keys = np.unique(rng.integers(0, 2**61, int(args.keys * 1.01)) * 2)[:args.keys]
    rng.shuffle(keys)
    return keys.astype(np.int64), rng.standard_normal((keys.size, args.dim)).astype(np.float32)


def _queries(args: argparse.Namespace, keys: np.ndarray, batch: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(args.seed + batch)
    out = []
    for _ in range(count):
        q = keys[rng.integers(0, keys.size, batch)]
        absent = rng.random(batch) < args.missing
        q[absent] += 1  # odd: never stored
        out.append(q)
    return out


class LMDBStore:
    """The LMDB candidate: same data model and version check as the package's stores, lookups only."""

    def __init__(self, path: str):
        import lmdb

        self.env = lmdb.open(path, map_size=1 << 40, max_dbs=4, readahead=False, metasync=False, sync=False)
        self.registry = self.env.open_db(b"versions")
        self.db = self.env.open_db(f"{VERSION}:{KIND}".encode())

    def load(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        for i in range(0, keys.size, LOAD_BATCH):
            raw = keys[i:i + LOAD_BATCH].astype(">i8").tobytes()
            blob = vectors[i:i + LOAD_BATCH].astype("<f4").tobytes()
            width = vectors.shape[1] * 4
            with self.env.begin(write=True, db=self.db) as txn:
                txn.cursor().putmulti([(raw[j * 8:(j + 1) * 8], blob[j * width:(j + 1) * width])
                                       for j in range(len(raw) // 8)])
        with self.env.begin(write=True) as txn:
            txn.put(VERSION.encode(), json.dumps({"dims": {KIND: vectors.shape[1]}}).encode(), db=self.registry)
        self.env.sync(True)

    def lookup(self, keys: np.ndarray, dim: int):
        from mkt_torchrec.cache.store import KnowledgeStore

        unique = np.unique(keys)
        raw = unique.astype(">i8").tobytes()
        with self.env.begin(buffers=False) as txn:
            if txn.get(VERSION.encode(), db=self.registry) is None:
                raise LookupError(VERSION)
            pairs = txn.cursor(db=self.db).getmulti([raw[j:j + 8] for j in range(0, len(raw), 8)])
        found = np.frombuffer(b"".join(k for k, _ in pairs), ">i8").astype(np.int64)
        return KnowledgeStore.assemble(keys, found, b"".join(v for _, v in pairs), dim)

    def size_mb(self) -> float:
        return self.env.info()["last_pgno"] * self.env.stat()["psize"] / 2**20


def _start_redis(workdir: str) -> tuple[str, subprocess.Popen]:
    import redis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save",
                             "", "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(400):
        try:
            client.ping()
            return f"redis://127.0.0.1:{port}/0", proc
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server on port {port} did not answer")


def _bench_store(name: str, args: argparse.Namespace, keys: np.ndarray, vectors: np.ndarray,
                 workdir: str) -> dict:
    from mkt_torchrec.cache import open_store

    server = None
    result: dict = {}
    if name == "lmdb":
        path = os.path.join(workdir, "lmdb")
        store = LMDBStore(path)
        start = time.perf_counter()
        store.load(keys, vectors)
        result["load_rows_per_s"] = keys.size / (time.perf_counter() - start)
        result["size_mb"] = store.size_mb()
        import lmdb

        result["library"] = f"lmdb {'.'.join(map(str, lmdb.version()))} (py-lmdb {lmdb.__version__})"

        def lookup(q):
            return store.lookup(q, args.dim)
    else:
        if name == "sqlite":
            uri = os.path.join(workdir, "knowledge.db")
            result["library"] = f"sqlite {sqlite3.sqlite_version}"
        else:
            uri = args.redis
            if uri is None:
                uri, server = _start_redis(workdir)
            result["library"] = "redis-server " + subprocess.run(
                [shutil.which("redis-server") or "redis-server", "--version"], capture_output=True,
                text=True).stdout.split()[2] if shutil.which("redis-server") else "redis (remote)"
        store = open_store(uri)
        if name == "redis":
            store.r.flushdb()
            before = store.r.info("memory")["used_memory"]
        start = time.perf_counter()
        with store.begin(VERSION, {KIND: args.dim}) as writer:
            for i in range(0, keys.size, LOAD_BATCH):
                writer.put(KIND, keys[i:i + LOAD_BATCH], vectors[i:i + LOAD_BATCH])
            writer.publish({"bench": True})
        result["load_rows_per_s"] = keys.size / (time.perf_counter() - start)
        result["size_mb"] = (sum(os.path.getsize(f) for f in (uri, uri + "-wal") if os.path.exists(f)) / 2**20
                             if name == "sqlite"
                             else (store.r.info("memory")["used_memory"] - before) / 2**20)

        def lookup(q):
            return store.lookup(VERSION, KIND, q)
    print(f"{name}: loaded {keys.size} keys at {result['load_rows_per_s']:.0f} rows/s ({result['size_mb']:.0f} MB)",
          flush=True)
    result["lookup"] = {}
    for batch in args.batch:
        queries = _queries(args, keys, batch, args.lookups + args.warmup)
        check, found = lookup(queries[0])  # correctness of what is timed: found flags and a vector
        assert np.array_equal(found, queries[0] % 2 == 0), name  # stored keys are even, absent ones odd
        first = int(np.flatnonzero(found)[0])
        row = int(np.flatnonzero(keys == queries[0][first])[0])
        assert np.array_equal(check[first], vectors[row]), name
        for q in queries[:args.warmup]:
            lookup(q)
        latencies = []
        for q in queries[args.warmup:]:
            t = time.perf_counter()
            lookup(q)
            latencies.append(time.perf_counter() - t)
        lat = np.array(latencies)
        p50, p95, p99 = np.percentile(lat, [50, 95, 99]) * 1000
        result["lookup"][str(batch)] = {"rows_per_s": batch * lat.size / lat.sum(), "p50_ms": p50, "p95_ms": p95,
                                        "p99_ms": p99, "batches": int(lat.size)}
        print(f"{name}: batch {batch}: {batch * lat.size / lat.sum():.0f} rows/s, p50 {p50:.3f} ms, p95 "
              f"{p95:.3f} ms, p99 {p99:.3f} ms", flush=True)
    if name != "lmdb":
        store.close()
    if server is not None:
        server.terminate()
        server.wait(timeout=10)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=1_000_000, help="keys in the version (default 1M)")
    p.add_argument("--dim", type=int, default=16, help="vector width (default 16)")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 512, 4096], help="lookup batch sizes")
    p.add_argument("--lookups", type=int, default=500, help="timed batches per batch size (default 500)")
    p.add_argument("--warmup", type=int, default=20, help="untimed batches first (default 20)")
    p.add_argument("--missing", type=float, default=0.1, help="fraction of looked-up keys that are absent")
    p.add_argument("--stores", nargs="+", default=["sqlite", "lmdb", "redis"], choices=["sqlite", "lmdb", "redis"])
    p.add_argument("--redis", default=None, help="an existing Redis (its database is FLUSHED); default: start one")
    p.add_argument("--workdir", default=None, help="where the files go (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    keys, vectors = _data(args)
    print(f"data: {keys.size} keys x dim {args.dim} ({vectors.nbytes / 2**20:.0f} MB of vectors)", flush=True)
    out = {"keys": int(keys.size), "dim": args.dim, "missing": args.missing, "batches": args.batch,
           "lookups": args.lookups, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                "python": platform.python_version(),
                                                "processor": platform.processor() or platform.machine()},
           "stores": {}}
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for name in args.stores:
            reason = None
            if name == "lmdb":
                try:
                    import lmdb  # noqa: F401
                except ImportError:
                    reason = "the lmdb package is not installed (pip install lmdb)"
            if name == "redis" and args.redis is None and shutil.which("redis-server") is None:
                reason = "redis-server is not installed and no --redis URI was given"
            out["stores"][name] = ({"skipped": reason} if reason else
                                   _bench_store(name, args, keys, vectors, workdir))
            if reason:
                print(f"{name}: skipped: {reason}", flush=True)
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
