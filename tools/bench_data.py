"""Benchmark: the reader's Parquet -> Batch throughput and peak memory, one process.

Generates (or reuses) a synthetic dataset of ``--rows`` impressions with both behaviour sequences (up to
``max_len`` 50), then reads its train split (``--epochs`` times, default once) in a fresh child process, so the peak
RSS reported is the reader's own and not the generator's. ``--entity target`` reads as stage 2 does: only the target
entity's row groups. Prints progress lines, then one JSON object on the last line:

    {"entity": "all", "rows": ..., "rows_per_s": ..., "peak_rss_mb": ..., ...}

``rows`` are the rows the reader yielded (with ``--entity target``: the target rows, the ones stage 2 trains on)
and ``rows_per_s`` is those per second of reading (after a one-row warm-up; of the fastest of ``--epochs``
epochs, which steadies it on a busy machine).

Usage:
    python tools/bench_data.py                      # 1M rows, under a minute on 2 cores
    python tools/bench_data.py --entity target      # stage 2's reader: target rows only
    python tools/bench_data.py --data DIR --entity target --epochs 5   # steadier figures on a busy machine
    python tools/bench_data.py --rows 10000000      # the memory check: 10M rows
    python tools/bench_data.py --data DIR           # an existing dataset
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _bench import peak_rss_mb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _config(args: argparse.Namespace):
    from mkt_torchrec.config import load_config

    users = max(100, args.rows // 20)
    window = [f"data.shuffle_window_rows={args.shuffle_window_rows}"] if args.shuffle_window_rows else []
    return load_config(args.config, [
        f"synth.users={users}", f"synth.source_rows={int(args.rows / 1.33)}",
        "synth.rows_per_file=1000000", "synth.row_group_rows=100000",
        f"data.batch_size={args.batch_size}", f"data.num_workers={args.num_workers}",
        "schema.tables.user_id.rows=%d" % max(1000, users * 2), *window,
    ])


def _read(args: argparse.Namespace) -> None:
    """Child process: read the train split once and print a JSON line."""
    import torch

    from mkt_torchrec.data.reader import ParquetReader

    torch.set_num_threads(1)
    cfg = _config(args)
    reader = ParquetReader(args.data, "train", cfg.schema, cfg.data, training=True,
                           entity=None if args.entity == "all" else args.entity)
    reader.first_batch()  # warm-up: the first decode's imports and allocations are no part of the throughput
    epochs = []
    for _ in range(args.epochs):
        rows = values = batches = 0
        start = time.perf_counter()
        for batch in reader:
            rows += len(batch)
            values += int(batch.sparse_features.values().numel())
            batches += 1
        epochs.append(time.perf_counter() - start)
    peak_mb = peak_rss_mb()
    print(json.dumps({"rows": rows, "rows_in_split": reader.manifest.split_rows("train"), "batches": batches,
                      "seconds": min(epochs), "epoch_seconds": epochs, "sparse_values": values,
                      "peak_rss_mb": peak_mb, "shuffle_window_rows": cfg.data.shuffle_window_rows}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="impressions to generate (default 1M)")
    p.add_argument("--data", default=None, help="read this dataset instead of generating one")
    p.add_argument("--config", default=os.path.join(REPO, "configs", "quickstart.yaml"))
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (0: in-process)")
    p.add_argument("--entity", choices=("all", "target"), default="all",
                   help="read every row, or only the target entity's row groups as stage 2 does (default all)")
    p.add_argument("--epochs", type=int, default=1,
                   help="read the split this many times; rows_per_s is the fastest epoch's (default 1)")
    p.add_argument("--shuffle-window-rows", type=int, default=None,
                   help="data.shuffle_window_rows (default: the config's); memory grows with it")
    p.add_argument("--keep", action="store_true", help="keep the generated dataset")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _read(args)
        return 0

    tmp = None
    if args.data is None:
        from mkt_torchrec.data.synth import generate

        tmp = tempfile.mkdtemp(prefix="mkt-bench-data-")
        args.data = os.path.join(tmp, "ds")
        t0 = time.perf_counter()
        print(f"generating ~{args.rows:,} rows into {args.data} ...", file=sys.stderr, flush=True)
        generate(_config(args), args.data)
        print(f"generated in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--data", args.data, "--rows", str(args.rows),
           "--config", args.config, "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers),
           "--entity", args.entity, "--epochs", str(args.epochs)]
    if args.shuffle_window_rows:
        cmd += ["--shuffle-window-rows", str(args.shuffle_window_rows)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    if tmp is not None and not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "bench": "data_reader",
        "entity": args.entity,
        "rows": child["rows"],
        "rows_in_split": child["rows_in_split"],
        "rows_per_s": round(child["rows"] / child["seconds"]),
        "peak_rss_mb": round(child["peak_rss_mb"], 1),
        "seconds": round(child["seconds"], 2),
        "epochs": args.epochs,
        "sparse_values_per_row": round(child["sparse_values"] / max(child["rows"], 1), 1),
        "batch_size": args.batch_size,
        "shuffle_window_rows": child["shuffle_window_rows"],
        "num_workers": args.num_workers,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
