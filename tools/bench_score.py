"""Benchmark: ``mkt score`` end to end against each knowledge store (issue 26), and the full serving path beside it.

``mkt score`` (:func:`mkt_torchrec.cache.score.score_requests`, called in-process here) serves a cached stage 2: per
batch of requests it decodes the rows, looks the MEM's knowledge up in a store (three batched lookups: user, item,
(user, category)) and runs the exported model (``RUN/serving/model.pt2``). This tool loads ``--snapshot`` (the
knowledge snapshot the run's version came from, :func:`mkt_torchrec.cache.snapshot.load_snapshot`) into

* ``sqlite``: a fresh SQLite file;
* ``redis``: a fresh ``redis-server`` started on a free localhost port (no persistence) and stopped at the end;
  skipped with a note where ``redis-server`` or the ``redis`` client is not installed;

and, with ``--full-run`` (a stage 2 of the same MEM trained with ``model.tem.knowledge=mem``: its export computes the
knowledge itself), adds ``full``: the same requests through that export, no store, to compare serving costs.

For each configuration (store x batch size): one untimed warm-up call on the first ``--warmup-rows`` requests (the
first model calls of a process and of a batch shape are slow), then ``--repeat`` timed calls over all requests. The
passes of the configurations are interleaved (pass 1 of every configuration, then pass 2, ...) so that a load
change on a shared machine falls on all of them alike. Per configuration it reports the median over passes of
``rows_per_s`` (the summary's rows / s of the scoring loop: Parquet read, decode, lookups, model; the model load and
the store's open are outside it); the per-batch latency percentiles ``lookup_ms`` / ``model_ms`` p50 / p95 / p99 of
all passes' batches pooled (the same two spans the summary times, recorded per batch by wrapping
:meth:`CachedKnowledge.vectors` and the loaded model: a pass's own percentiles would rest on 3 batches at batch 4096
of 9k requests); ``lookup_share`` / ``model_share``: the time in lookups / in the model over the loop's time (the
rest is reading and decoding the requests and writing the scores); and the fraction of keys found. The SQLite and
Redis passes must write identical scores (checked).

Requests (``--requests``) default to the run's dataset's test split, target rows (``entity == 1``), less ``label``
and ``entity`` (as a serving request comes), optionally cut to ``--max-rows``.

Prints progress and a Markdown table, then ONE JSON object on the last line: per configuration and batch size the
figures above, the machine (with its load averages before and after: the project's machine is shared) and the run.

Usage:
    python tools/bench_score.py --run RUN --snapshot SNAPSHOT                 # batches 64 / 512 / 4096, 3 passes
    python tools/bench_score.py --run RUN --snapshot SNAPSHOT --full-run FULL --batch-size 512 4096 --repeat 5
    python tools/bench_score.py --run RUN --snapshot SNAPSHOT --requests requests.parquet --stores sqlite
"""

from __future__ import annotations

import argparse
import contextlib
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
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import pyarrow.parquet as pq
from _bench import peak_rss_mb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _default_requests(run: str, out: str, max_rows: Optional[int]) -> str:
    """The run's dataset's test split, target rows, without ``label`` / ``entity``, written to ``out``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from mkt_torchrec import storage
    from mkt_torchrec.rundir import RunDir

    data = RunDir(run).record()["data"]
    test = storage.join(data, "test")
    files = [f for f in storage.listdir(test) if f.endswith(".parquet")]
    if not files:
        raise FileNotFoundError(f"{storage.display(test)}: no Parquet files (the test split of the run's dataset)")
    fs, base = storage.filesystem(test)
    tables = []
    for f in files:
        t = pq.read_table(f"{base.rstrip('/')}/{f}", filesystem=fs)
        tables.append(t.filter(pc.equal(t["entity"], 1)).drop_columns(["label", "entity"]))
    table = pa.concat_tables(tables)
    if max_rows is not None:
        table = table.slice(0, max_rows)
    pq.write_table(table, out)
    return out


def _prefix(requests: str, rows: int, out: str) -> str:
    """The first ``rows`` requests, the warm-up file."""
    pq.write_table(pq.read_table(requests).slice(0, rows), out)
    return out


def _start_redis(workdir: str) -> tuple[str, subprocess.Popen]:
    import redis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save",
                             "", "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=1)
    for _ in range(400):
        try:
            client.ping()
            client.close()
            return f"redis://127.0.0.1:{port}/0", proc
        except redis.exceptions.ConnectionError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server on port {port} did not answer (exit code {proc.poll()})")


def _redis_missing() -> Optional[str]:
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (make install adds Debian's redis-server package)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis client is not installed (make install adds it)"
    return None


class _Clock:
    """Per-batch milliseconds of the two calls ``score_requests`` times (its ``lookup_ms`` and ``model_ms`` spans),
    recorded while :meth:`on`, so that percentiles can pool the batches of every pass.

    It wraps :meth:`CachedKnowledge.vectors` (the lookups) and the module ``load_serving`` returns (the model);
    ``score_requests`` imports ``load_serving`` at call time, so the wrapped loader is the one it uses.
    """

    def __init__(self) -> None:
        self.lookup_ms: List[float] = []
        self.model_ms: List[float] = []

    @contextlib.contextmanager
    def on(self) -> Iterator[None]:
        from mkt_torchrec.cache.knowledge import CachedKnowledge
        from mkt_torchrec.models import serving

        vectors, load = CachedKnowledge.vectors, serving.load_serving

        def timed_vectors(hook: Any, kjt: Any) -> np.ndarray:
            t = time.perf_counter()
            try:
                return vectors(hook, kjt)
            finally:
                self.lookup_ms.append((time.perf_counter() - t) * 1e3)

        def timed_load(*a: Any, **kw: Any) -> Any:
            model = load(*a, **kw)

            def call(*inputs: Any) -> Any:
                t = time.perf_counter()
                try:
                    return model(*inputs)
                finally:
                    self.model_ms.append((time.perf_counter() - t) * 1e3)

            return call

        CachedKnowledge.vectors, serving.load_serving = timed_vectors, timed_load  # type: ignore[method-assign]
        try:
            yield
        finally:
            CachedKnowledge.vectors, serving.load_serving = vectors, load  # type: ignore[method-assign]


def _percentiles(ms: List[float]) -> Optional[Dict[str, float]]:
    if not ms:
        return None
    p50, p95, p99 = np.percentile(np.asarray(ms), [50, 95, 99])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3)}


def _summarize(passes: List[Dict[str, Any]], clock: _Clock) -> Dict[str, Any]:
    if len(clock.model_ms) != sum(p["batches"] for p in passes):
        raise RuntimeError(f"timed {len(clock.model_ms)} model calls in {sum(p['batches'] for p in passes)} batches")
    seconds = sum(p["seconds"] for p in passes)
    cached = passes[0]["cache"] is not None
    return {"rows": passes[0]["rows"], "batches": passes[0]["batches"],
            "rows_per_s": round(float(np.median([p["rows_per_s"] for p in passes])), 1),
            "rows_per_s_passes": [p["rows_per_s"] for p in passes],
            "lookup_ms": _percentiles(clock.lookup_ms), "model_ms": _percentiles(clock.model_ms),
            "lookup_share": round(sum(clock.lookup_ms) / 1e3 / seconds, 4) if cached and seconds > 0 else None,
            "model_share": round(sum(clock.model_ms) / 1e3 / seconds, 4) if seconds > 0 else None,
            "found": passes[-1]["cache"]["found"] if cached else None}


def _table(results: Dict[str, Dict[str, Any]]) -> List[str]:
    def ms(d: Optional[Dict[str, float]]) -> str:
        return "-" if d is None else f"{d['p50']:.2f} / {d['p95']:.2f} / {d['p99']:.2f}"

    def pct(x: Optional[float]) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    lines = ["| serving path | batch | rows/s | lookup ms p50 / p95 / p99 | model ms p50 / p95 / p99 | time in lookups "
             "| time in model |", "|---|---:|---:|---|---|---:|---:|"]
    for name, per_batch in results.items():
        if "skipped" in per_batch:
            lines.append(f"| {name} | - | skipped: {per_batch['skipped']} | | | | |")
            continue
        for batch, r in per_batch.items():
            lines.append(f"| {name} | {batch} | {r['rows_per_s']:,.0f} | {ms(r['lookup_ms'])} | "
                         f"{ms(r['model_ms'])} | {pct(r['lookup_share'])} | {pct(r['model_share'])} |")
    return lines


def _machine() -> Dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a cached stage-2 run directory with its serving export")
    p.add_argument("--snapshot", required=True, help="the knowledge snapshot the run's cache version came from")
    p.add_argument("--full-run", default=None,
                   help="a stage-2 run of the same MEM trained with model.tem.knowledge=mem, for comparison")
    p.add_argument("--requests", default=None,
                   help="a Parquet file of requests (default: the run's dataset's test split, target rows)")
    p.add_argument("--max-rows", type=int, default=None, help="score at most this many of the default requests")
    p.add_argument("--batch-size", type=int, nargs="+", default=[64, 512, 4096], help="request batch sizes")
    p.add_argument("--repeat", type=int, default=3, help="timed passes per configuration (default 3)")
    p.add_argument("--warmup-rows", type=int, default=8192,
                   help="requests in the untimed warm-up call of each configuration (default 8192)")
    p.add_argument("--stores", nargs="+", default=["sqlite", "redis"], choices=["sqlite", "redis"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's, one per core); 1 is steadier on a busy machine")
    p.add_argument("--workdir", default=None, help="where the files go (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.repeat < 1 or min(args.batch_size) < 1:
        p.error("--repeat and --batch-size must be positive")

    from mkt_torchrec.cache.score import score_requests
    from mkt_torchrec.cache.snapshot import load_snapshot

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    machine = _machine()
    out: Dict[str, Any] = {"run": args.run, "snapshot": args.snapshot, "full_run": args.full_run,
                           "batch_sizes": args.batch_size, "repeat": args.repeat, "warmup_rows": args.warmup_rows,
                           "machine": machine, "stores": {}, "results": {}}
    servers: List[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        try:
            requests = args.requests or _default_requests(args.run, os.path.join(workdir, "requests.parquet"),
                                                          args.max_rows)
            rows = pq.ParquetFile(requests).metadata.num_rows
            warmup = _prefix(requests, args.warmup_rows, os.path.join(workdir, "warmup.parquet"))
            out["requests"] = {"file": args.requests or "test split, target rows", "rows": rows}
            print(f"requests: {rows} rows from {args.requests or 'the dataset test split (target rows)'}", flush=True)

            configs: Dict[str, Dict[str, Any]] = {}  # name -> score_requests arguments
            for name in args.stores:
                reason = _redis_missing() if name == "redis" else None
                if reason:
                    print(f"{name}: skipped: {reason}", flush=True)
                    out["results"][name] = {"skipped": reason}
                    continue
                if name == "sqlite":
                    uri = os.path.join(workdir, "knowledge.db")
                    library = f"sqlite {sqlite3.sqlite_version}"
                else:
                    uri, server = _start_redis(workdir)
                    servers.append(server)
                    library = "redis-server " + subprocess.run([shutil.which("redis-server"), "--version"],
                                                               capture_output=True, text=True).stdout.split()[2]
                start = time.perf_counter()
                loaded = load_snapshot(args.snapshot, uri)
                seconds = time.perf_counter() - start
                out["stores"][name] = {"library": library, "version": loaded.version, "entries": loaded.rows,
                                       "load_s": round(seconds, 3)}
                print(f"{name}: loaded version {loaded.version} ({sum(loaded.rows.values())} entries) in "
                      f"{seconds:.2f} s ({library})", flush=True)
                configs[name] = {"run_dir": args.run, "cache_uri": uri}
            if args.full_run:
                configs["full"] = {"run_dir": args.full_run, "cache_uri": None}

            scores: Dict[str, np.ndarray] = {}
            for batch in args.batch_size:
                for kw in configs.values():
                    score_requests(requests=warmup, out=os.path.join(workdir, "warmup-scores.parquet"),
                                   batch_size=batch, **kw)
                passes: Dict[str, List[Dict[str, Any]]] = {name: [] for name in configs}
                clocks = {name: _Clock() for name in configs}
                for _ in range(args.repeat):
                    for name, kw in configs.items():
                        scored = os.path.join(workdir, f"scores-{name}.parquet")
                        with clocks[name].on():
                            passes[name].append(score_requests(requests=requests, out=scored, batch_size=batch,
                                                               **kw))
                        scores[name] = pq.read_table(scored, columns=["score"])["score"].to_numpy()
                if "sqlite" in scores and "redis" in scores and not np.array_equal(scores["sqlite"], scores["redis"]):
                    raise RuntimeError(f"batch {batch}: SQLite and Redis gave different scores (max difference "
                                       f"{np.abs(scores['sqlite'] - scores['redis']).max():g})")
                for name in configs:
                    r = _summarize(passes[name], clocks[name])
                    out["results"].setdefault(name, {})[str(batch)] = r
                    lk = r["lookup_ms"] or {}
                    print(f"{name}: batch {batch}: {r['rows_per_s']:.0f} rows/s (passes {r['rows_per_s_passes']}), "
                          f"lookup p50/p95/p99 {lk.get('p50')}/{lk.get('p95')}/{lk.get('p99')} ms, model "
                          f"{r['model_ms']['p50']}/{r['model_ms']['p95']}/{r['model_ms']['p99']} ms, lookups "
                          f"{r['lookup_share']} / model {r['model_share']} of the time, found {r['found']}", flush=True)
        finally:
            for server in servers:
                server.terminate()
                server.wait(timeout=10)
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    out["peak_rss_mb"] = peak_rss_mb()
    print("\n".join(_table(out["results"])), flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
