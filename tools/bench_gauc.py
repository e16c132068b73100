"""Benchmark: exact GAUC throughput against the pandas + scikit-learn way, and out-of-core evaluation.

In-memory mode (default): ``--rows`` impressions of ``--rows / --rows-per-user`` users are generated, then
exact GAUC (``group_auc_stats(...).result()``, one thread) is timed over all of them (best of ``--repeat``)
and the usual way - pandas ``groupby`` + ``sklearn.metrics.roc_auc_score`` per user - on the rows of a
random subset of users (``--baseline-users``), extrapolated per row. Both give the same GAUC on that subset
(checked). Runs in a fresh child process so that ``peak_rss_mb`` (``/proc/self/status`` VmHWM: unlike
``ru_maxrss`` it does not survive ``execve``) is the benchmark's own.

Out-of-core mode (``--out-of-core``): writes ``--rows`` prediction rows (8 rank files, users spread over all
of them, with ``activity`` and ``true_prob``) chunk by chunk, then runs
``streaming.compute_metrics`` - spilling, score buckets, activity groups, ceiling and a user-level
bootstrap of ``--bootstrap-samples`` - in a child process and reports its time and peak RSS.

Report mode (``--report``): as out of core, for two runs on the same rows (run B: run A's scores plus noise,
rewritten batch by batch), each with its metrics.json from ``compute_metrics``; then ``report.write_report``
of the two (tables, paired bootstrap of ``--bootstrap-samples``, figures from ``eval.plot_sample_rows``) in a
child process, with its time and peak RSS: run it at two ``--rows`` to see that the report's memory does not
grow with the rows (only with the users, ``--rows / --rows-per-user``).

Prints progress to stderr and one JSON object on the last line of stdout.

Usage:
    python tools/bench_gauc.py                                   # 10M rows in memory, under a minute
    python tools/bench_gauc.py --out-of-core --rows 100000000    # 100M rows from Parquet (several minutes)
    python tools/bench_gauc.py --report --rows 2000000 --rows-per-user 400   # 5,000 users
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from _bench import peak_rss_mb

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CHUNK_ROWS = 1 << 20
RANK_FILES = 8


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _child(argv: list[str]) -> dict:
    """Run this script in a fresh process with ``argv``; return the JSON of its last stdout line."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], check=True, stdout=subprocess.PIPE,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _users(n_users: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-user click bias (float32) and activity (int32)."""
    rng = np.random.default_rng(seed)
    return rng.normal(-2.0, 1.0, n_users).astype(np.float32), rng.integers(0, 60, n_users).astype(np.int32)


def _chunk(rows: int, bias: np.ndarray, activity: np.ndarray, seed: int) -> dict:
    """``rows`` impressions of random users: ids, 0/1 labels, float32 scores, activity, true click prob."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, bias.shape[0], rows)
    logit = bias[idx] + rng.standard_normal(rows, dtype=np.float32)
    true_prob = 1.0 / (1.0 + np.exp(-logit))
    score = (1.0 / (1.0 + np.exp(-(logit + 0.8 * rng.standard_normal(rows, dtype=np.float32))))).astype(np.float32)
    return {
        "user_id": idx.astype(np.int64) * 2654435761 + 12345,  # distinct, scattered ids
        "label": (rng.random(rows, dtype=np.float32) < true_prob).astype(np.float32),
        "score": score,
        "activity": activity[idx].astype(np.int64),
        "true_prob": true_prob.astype(np.float32),
        "entity": (rng.random(rows, dtype=np.float32) < 0.5).astype(np.int8),
    }


# --------------------------------------------------------------------------------------------------------
# In-memory: our exact GAUC vs pandas + sklearn
# --------------------------------------------------------------------------------------------------------


def _in_memory(args: argparse.Namespace) -> dict:
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from mkt_torchrec.evaluation.metrics import group_auc_stats

    n_users = max(1, args.rows // args.rows_per_user)
    bias, activity = _users(n_users, args.seed)
    _log(f"generating {args.rows:,} rows of {n_users:,} users ...")
    parts = [_chunk(min(CHUNK_ROWS, args.rows - s), bias, activity, args.seed + 1 + i)
             for i, s in enumerate(range(0, args.rows, CHUNK_ROWS))]
    u = np.concatenate([p["user_id"] for p in parts])
    y = np.concatenate([p["label"] for p in parts])
    s = np.concatenate([p["score"] for p in parts])
    del parts
    group_auc_stats(u[:100_000], y[:100_000], s[:100_000]).result()  # warm-up
    times = []
    for r in range(args.repeat):
        t0 = time.perf_counter()
        res = group_auc_stats(u, y, s).result()
        times.append(time.perf_counter() - t0)
        _log(f"exact GAUC, run {r + 1}/{args.repeat}: {times[-1]:.2f}s ({args.rows / times[-1]:,.0f} rows/s), "
             f"gauc {res.gauc:.6f}, {res.users:,} users")
    rows_per_s = args.rows / min(times)

    rng = np.random.default_rng(args.seed + 99)
    uniq = np.unique(u)
    chosen = rng.choice(uniq, size=min(args.baseline_users, uniq.shape[0]), replace=False)
    m = np.isin(u, chosen)
    df = pd.DataFrame({"user_id": u[m], "label": y[m], "score": s[m]})
    _log(f"baseline: pandas groupby + sklearn roc_auc_score on {len(df):,} rows of {chosen.shape[0]:,} users ...")
    t0 = time.perf_counter()
    aucs, weights = [], []
    for _, g in df.groupby("user_id"):
        if g["label"].nunique() == 2:
            aucs.append(roc_auc_score(g["label"], g["score"]))
            weights.append(len(g))
    baseline_gauc = float(np.average(aucs, weights=weights))
    baseline_s = time.perf_counter() - t0
    baseline_rows_per_s = len(df) / baseline_s
    ours = group_auc_stats(df["user_id"].to_numpy(), df["label"].to_numpy(), df["score"].to_numpy()).result().gauc
    _log(f"baseline: {baseline_s:.2f}s ({baseline_rows_per_s:,.0f} rows/s); same GAUC: |diff| = "
         f"{abs(ours - baseline_gauc):.1e}")
    return {
        "bench": "gauc_in_memory",
        "rows": args.rows,
        "users": int(res.users),
        "rows_per_s": round(rows_per_s),
        "baseline_rows_per_s": round(baseline_rows_per_s),
        "speedup": round(rows_per_s / baseline_rows_per_s, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "seconds": round(min(times), 3),
        "threads": 1,
        "baseline_rows": len(df),
        "baseline_users": int(chosen.shape[0]),
        "baseline_gauc_abs_diff": abs(ours - baseline_gauc),
        "cpu_count": os.cpu_count(),
    }


# --------------------------------------------------------------------------------------------------------
# Out of core: compute_metrics over Parquet predictions
# --------------------------------------------------------------------------------------------------------


def _write_predictions(args: argparse.Namespace, pred_dir: str) -> int:
    """Write ``args.rows`` rows as RANK_FILES part files, chunk by chunk; return the number of users."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_users = max(1, args.rows // args.rows_per_user)
    bias, activity = _users(n_users, args.seed)
    os.makedirs(pred_dir, exist_ok=True)
    names = pa.array(["source", "target"])
    per_file = -(-args.rows // RANK_FILES)
    written, chunk_seed = 0, args.seed + 1
    for r in range(RANK_FILES):
        n_file = min(per_file, args.rows - written)
        writer = None
        for start in range(0, n_file, CHUNK_ROWS):
            c = _chunk(min(CHUNK_ROWS, n_file - start), bias, activity, chunk_seed)
            chunk_seed += 1
            entity = pa.DictionaryArray.from_arrays(pa.array(c.pop("entity")), names).cast(pa.string())
            t = pa.table({"user_id": c["user_id"], "entity": entity, "label": c["label"], "score": c["score"],
                          "activity": c["activity"], "true_prob": c["true_prob"]})
            if writer is None:
                writer = pq.ParquetWriter(os.path.join(pred_dir, f"part-{r:05d}.parquet"), t.schema)
            writer.write_table(t)
        if writer is not None:
            writer.close()
        written += n_file
        _log(f"wrote part-{r:05d}.parquet: {written:,}/{args.rows:,} rows")
    return n_users


def _compute(args: argparse.Namespace) -> dict:
    """Child process: compute_metrics over an existing predictions directory (written to --metrics-out if set,
    as mkt evaluate writes RUN/metrics.json)."""
    from mkt_torchrec.config import EvalConfig
    from mkt_torchrec.evaluation.streaming import compute_metrics

    cfg = EvalConfig(bootstrap_samples=args.bootstrap_samples)
    t0 = time.perf_counter()
    m = compute_metrics(args.compute, cfg, spill_dir=args.spill_dir)
    seconds = time.perf_counter() - t0
    if args.metrics_out:
        with open(args.metrics_out, "w", encoding="utf-8") as f:
            json.dump({**m, "stage": "tem", "ablation": "none", "checkpoint": "bench"}, f)
    summary = {e: {k: m[e][k] for k in ("rows", "users", "auc", "gauc", "auc_ci", "gauc_ci", "ceiling")}
               for e in ("source", "target") if e in m}
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "metrics": summary}


def _out_of_core(args: argparse.Namespace) -> dict:
    work = args.workdir or tempfile.mkdtemp(prefix="mkt-bench-gauc-")
    pred_dir = os.path.join(work, "predictions")
    spill = os.path.join(work, "spill")
    os.makedirs(spill, exist_ok=True)
    try:
        t0 = time.perf_counter()
        existing = os.path.isdir(pred_dir) and any(f.startswith("part-") for f in os.listdir(pred_dir))
        if existing and args.reuse:
            _log(f"reusing {pred_dir}")
            write_s = 0.0
        else:
            _log(f"writing {args.rows:,} prediction rows to {pred_dir} ...")
            _write_predictions(args, pred_dir)
            write_s = time.perf_counter() - t0
            _log(f"written in {write_s:.1f}s")
        disk = sum(os.path.getsize(os.path.join(pred_dir, f)) for f in os.listdir(pred_dir))
        _log(f"compute_metrics (bootstrap {args.bootstrap_samples}) in a child process ...")
        child = _child(["--compute", pred_dir, "--spill-dir", spill, "--bootstrap-samples",
                        str(args.bootstrap_samples)])
        _log(f"compute_metrics: {child['seconds']:.1f}s, peak RSS {child['peak_rss_mb']:.0f} MB")
        users = {e: v["users"] for e, v in child["metrics"].items()}
        return {
            "bench": "gauc_out_of_core",
            "rows": args.rows,
            "users": max(users.values()) if users else 0,
            "users_per_entity": users,
            "rows_per_s": round(args.rows / child["seconds"]),
            "peak_rss_mb": round(child["peak_rss_mb"], 1),
            "seconds": round(child["seconds"], 1),
            "write_seconds": round(write_s, 1),
            "predictions_mb": round(disk / 2**20, 1),
            "bootstrap_samples": args.bootstrap_samples,
            "metrics": child["metrics"],
            "cpu_count": os.cpu_count(),
        }
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _perturbed_copy(src: str, dst: str, seed: int) -> None:
    """Run B: run A's part files with the scores moved by noise (in logit space), batch by batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(dst, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in sorted(os.listdir(src)):
        pf = pq.ParquetFile(os.path.join(src, name))
        writer = None
        for rb in pf.iter_batches(batch_size=CHUNK_ROWS):
            t = pa.Table.from_batches([rb])
            s = np.clip(t.column("score").to_numpy().astype(np.float64), 1e-6, 1 - 1e-6)
            logit = np.log(s / (1 - s)) + 0.5 * rng.standard_normal(s.shape[0])
            t = t.set_column(t.schema.get_field_index("score"), "score",
                             pa.array((1 / (1 + np.exp(-logit))).astype(np.float32)))
            if writer is None:
                writer = pq.ParquetWriter(os.path.join(dst, name), t.schema)
            writer.write_table(t)
        if writer is not None:
            writer.close()


def _report_child(args: argparse.Namespace) -> dict:
    """Child process: write_report of the two runs under --report-child."""
    from mkt_torchrec.config import EvalConfig
    from mkt_torchrec.evaluation.report import write_report

    work = args.report_child
    cfg = EvalConfig(bootstrap_samples=args.bootstrap_samples)
    t0 = time.perf_counter()
    s = write_report({"A": [os.path.join(work, "run-a")], "B": [os.path.join(work, "run-b")]},
                     os.path.join(work, "report"), baseline="A", eval_cfg=cfg, spill_dir=args.spill_dir)
    seconds = time.perf_counter() - t0
    b = next(m for m in s["models"] if m["name"] == "B")
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "paired": b["paired"], "plots": sorted(s["plots"])}


def _report(args: argparse.Namespace) -> dict:
    work = args.workdir or tempfile.mkdtemp(prefix="mkt-bench-report-")
    spill = os.path.join(work, "spill")
    os.makedirs(spill, exist_ok=True)
    try:
        runs = [os.path.join(work, "run-a"), os.path.join(work, "run-b")]
        _log(f"writing {args.rows:,} prediction rows for two runs under {work} ...")
        _write_predictions(args, os.path.join(runs[0], "predictions"))
        _perturbed_copy(os.path.join(runs[0], "predictions"), os.path.join(runs[1], "predictions"), args.seed + 7)
        for run in runs:
            _child(["--compute", os.path.join(run, "predictions"), "--spill-dir", spill, "--bootstrap-samples",
                    str(args.bootstrap_samples), "--metrics-out", os.path.join(run, "metrics.json")])
        _log(f"write_report (paired bootstrap {args.bootstrap_samples}) in a child process ...")
        child = _child(["--report-child", work, "--spill-dir", spill, "--bootstrap-samples",
                        str(args.bootstrap_samples)])
        _log(f"write_report: {child['seconds']:.1f}s, peak RSS {child['peak_rss_mb']:.0f} MB")
        return {"bench": "report", "rows": args.rows, "users": max(1, args.rows // args.rows_per_user),
                "seconds": round(child["seconds"], 1), "peak_rss_mb": round(child["peak_rss_mb"], 1),
                "bootstrap_samples": args.bootstrap_samples, "paired": child["paired"], "plots": child["plots"],
                "cpu_count": os.cpu_count()}
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=None,
                   help="impressions (default: 10M in memory, 100M out of core)")
    p.add_argument("--rows-per-user", type=int, default=20, help="mean impressions per user (default 20)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of the exact GAUC, best kept (default 3)")
    p.add_argument("--baseline-users", type=int, default=2000,
                   help="users whose rows the pandas/sklearn baseline scores (default 2000)")
    p.add_argument("--out-of-core", action="store_true", help="write Parquet predictions, run compute_metrics")
    p.add_argument("--report", action="store_true",
                   help="two runs' predictions and metrics.json, then time write_report and its peak RSS")
    p.add_argument("--bootstrap-samples", type=int, default=200, help="out of core: bootstrap resamples")
    p.add_argument("--workdir", default=None, help="out of core: where predictions and spill files go "
                                                   "(default: a temp dir, removed at the end)")
    p.add_argument("--reuse", action="store_true", help="out of core: reuse predictions already in --workdir")
    p.add_argument("--keep", action="store_true", help="out of core: keep the temp dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compute", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spill-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--metrics-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--report-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.report_child is not None:
        print(json.dumps(_report_child(args)))
        return 0
    if args.compute is not None:
        print(json.dumps(_compute(args)))
        return 0
    if args.child:
        print(json.dumps(_in_memory(args)))
        return 0
    if args.report:
        args.rows = args.rows or 10_000_000
        result = _report(args)
    elif args.out_of_core:
        args.rows = args.rows or 100_000_000
        result = _out_of_core(args)
    else:
        args.rows = args.rows or 10_000_000
        result = _child(["--child", "--rows", str(args.rows), "--rows-per-user", str(args.rows_per_user),
                         "--repeat", str(args.repeat), "--baseline-users", str(args.baseline_users),
                         "--seed", str(args.seed)])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
