"""``mkt score``: score a Parquet file of requests with a run's serving export, reading the cached knowledge from a
store: the reference a serving system reproduces (KEEP 5.3: the request (u, i, c, v) -> cached knowledge -> the
downstream model).

A request is one row in the dataset's columns (raw ids, as ``mkt build`` / ``mkt synth`` write them: the schema's
features, behaviour sequences and dense columns; ``entity`` and ``label`` may be absent: a request is a target-entity
row and its label unknown). For each batch of ``cache.batch_size`` requests:

1. the rows are decoded as the trainer's reader decodes them (raw ids -> table rows:
   :func:`mkt_torchrec.data.reader.batch_of_rows`);
2. a cached stage 2 (its ``serving.json`` has ``knowledge``) looks up the user, item and (user, category) keys of the
   rows in the version (three batched lookups: :class:`mkt_torchrec.cache.knowledge.CachedKnowledge`) and appends the
   vectors to the dense features; a key the version lacks gives zeros, as in training;
3. the exported model (``RUN/serving/model.pt2``, loaded tensors-only) gives each row's click probability.

The output is a Parquet file ``row`` (the request's position), ``user_id`` (raw) and ``score``, written under a
temporary name and renamed when complete. The version defaults to the one the run trained with; another version is
refused unless it holds this schema's knowledge (schema digest), and, unless ``any_mem``, the knowledge of the same MEM
checkpoint (``any_mem``: score with an older or newer MEM's version, to measure what a stale cache costs).
The summary holds rows/s and the latency percentiles of the lookups and of the model, per batch.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mkt_torchrec.rundir import RunDir


def _percentiles(ms: List[float]) -> Optional[Dict[str, float]]:
    if not ms:
        return None
    p = np.percentile(np.asarray(ms), [50, 95, 99])
    return {"p50": round(float(p[0]), 3), "p95": round(float(p[1]), 3), "p99": round(float(p[2]), 3)}


def _knowledge_hook(run: RunDir, spec: Dict[str, Any], cfg: Any, uri: Optional[str], version: Optional[str],
                    any_mem: bool) -> Any:
    """The cache lookup of a cached stage 2's export, checked against the run; None for a run without one."""
    from mkt_torchrec.cache.knowledge import CachedKnowledge

    if "knowledge" not in spec:
        if uri or version:
            raise ValueError(f"{run.name}: its serving model computes the MEM's knowledge itself (trained with "
                             "model.tem.knowledge=mem); --cache / --version do not apply")
        return None
    if not uri:
        raise ValueError(f"{run.name}: its serving model reads the MEM's knowledge from a cache: pass --cache URI (the "
                         f"store version {spec['knowledge'].get('cache_version')!r} was loaded into)")
    version = version or spec["knowledge"].get("cache_version")
    hook = CachedKnowledge(cfg.with_settings({"cache.uri": uri, "cache.version": version}))
    meta, trained = hook.info.meta, (run.record().get("cache") or {})
    if meta.get("schema_digest") != cfg.schema_digest():
        raise ValueError(f"{hook.store.display}: version {version!r} was built with schema {meta.get('schema_digest')}; "
                         f"this run's schema is {cfg.schema_digest()}")
    if not any_mem and meta.get("mem_digest") != trained.get("mem_digest"):
        raise ValueError(f"{hook.store.display}: version {version!r} was built from MEM {meta.get('mem_digest')}; the "
                         f"run trained with MEM {trained.get('mem_digest')} (pass --any-mem to score with another "
                         "MEM's knowledge, e.g. to measure a stale cache)")
    return hook


def score_requests(run_dir: str, requests: str, out: str, cache_uri: Optional[str] = None,
                   version: Optional[str] = None, batch_size: int = 4096, any_mem: bool = False,
                   progress: Optional[Callable[[int], None]] = None, threads: Optional[int] = None) -> Dict[str, Any]:
    """Score ``requests`` (a Parquet file) with ``run_dir``'s serving export into ``out`` (a Parquet file); returns
    the summary (rows, rows/s, per-batch latency percentiles and totals of the lookups and the model, keys found).
    ``threads``: torch's intra-op threads for the model (None: torch's default; on a busy machine 1 is steadier:
    ``tools/bench_score.py``).

    Raises:
        FileNotFoundError: the run has no serving export, or ``requests`` does not exist.
        ValueError: a request file without a column the schema needs, a bad value (naming the file and row), a
            version the store lacks or that does not fit the run (naming both digests), an unreachable store.
    """
    from mkt_torchrec.data.reader import batch_of_rows
    from mkt_torchrec.models.serving import SERVING_FILE, load_serving, padded_ids, serving_keys

    run = RunDir(run_dir)
    run.pull("serving")
    spec_path = os.path.join(run.serving, "serving.json")
    if not os.path.isfile(spec_path):
        raise FileNotFoundError(f"{run.name}: no serving export (serving/serving.json); run mkt export first")
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    cfg = run.config()
    hook = _knowledge_hook(run, spec, cfg, cache_uri, version, any_mem)
    if not os.path.isfile(requests):
        raise FileNotFoundError(f"{requests}: no such request file")
    try:
        file = pq.ParquetFile(requests)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{requests}: not a Parquet file ({str(e).splitlines()[0]})") from None
    needed = [c for c in [cfg.schema.user_id_feature, *cfg.schema.sparse_keys, *cfg.schema.dense]
              if c not in file.schema_arrow.names]
    if needed:
        raise ValueError(f"{requests}: lacks the columns {sorted(set(needed))[:6]} the run's schema reads")
    if threads is not None:
        torch.set_num_threads(threads)
    model = load_serving(os.path.join(run.serving, SERVING_FILE))
    keys = serving_keys(cfg.schema)
    lookup_ms: List[float] = []
    model_ms: List[float] = []
    rows, scores, users = 0, [], []
    started = time.perf_counter()
    for record_batch in file.iter_batches(batch_size=batch_size):
        t = pa.Table.from_batches([record_batch])
        n = t.num_rows
        for name, value, typ in (("entity", 1, pa.int8()), ("label", 0, pa.int8())):
            if name not in t.column_names:
                t = t.append_column(name, pa.array(np.full(n, value), type=typ))
        batch = batch_of_rows(t, cfg.schema, f"{requests} (rows {rows}..{rows + n - 1})")
        dense = batch.dense_features
        if hook is not None:
            t0 = time.perf_counter()
            extra = hook.vectors(batch.sparse_features)
            lookup_ms.append((time.perf_counter() - t0) * 1e3)
            dense = torch.cat([dense, torch.from_numpy(extra)], dim=1)
        t0 = time.perf_counter()
        with torch.no_grad():
            probs = model(padded_ids(batch.sparse_features, cfg.schema, keys), dense)
        model_ms.append((time.perf_counter() - t0) * 1e3)
        scores.append(probs.numpy().astype(np.float32))
        users.append(batch.user_id.numpy())
        rows += n
        if progress is not None:
            progress(n)
    seconds = time.perf_counter() - started
    table = pa.table({"row": pa.array(np.arange(rows, dtype=np.int64)),
                      "user_id": pa.array(np.concatenate(users) if users else np.zeros(0, np.int64)),
                      "score": pa.array(np.concatenate(scores) if scores else np.zeros(0, np.float32))})
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    partial = os.path.join(parent, f".{os.path.basename(out)}.partial")
    pq.write_table(table, partial)
    os.replace(partial, out)
    return {"out": out, "rows": rows, "batches": len(model_ms), "batch_size": batch_size,
            "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1) if seconds > 0 else None,
            "lookup_ms": _percentiles(lookup_ms), "model_ms": _percentiles(model_ms),
            "lookup_ms_total": round(sum(lookup_ms), 3), "model_ms_total": round(sum(model_ms), 3),
            "cache": None if hook is None else {"store": hook.store.display, "version": hook.version,
                                                "found": hook.coverage()}}
