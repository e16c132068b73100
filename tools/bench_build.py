"""Benchmark: ``mkt build`` (DuckDB) against the hand-written two-pass Tenrec converter it replaced, on the same
inputs, in one run: rows/s and peak RSS at each size.

For each ``--rows`` size it writes (or reuses, under ``--work``) the synthetic marketplace twice with ``mkt synth``:
as Tenrec's two CSVs (``--layout tenrec``) and as Spark-style Parquet logs (``--layout logs``: day partitions, the
logs' own column names, string ids, no sequences). Then, each in a fresh child process (so a peak RSS is the
conversion's own, read from /proc/self/status VmHWM):

* ``baseline``: the two-pass converter as it was at ``--baseline-commit`` (its source taken from git, the last
  commit that had it), on the Tenrec CSVs;
* ``tenrec``: today's ``mkt tenrec`` (a preset of ``mkt build``) on the same CSVs;
* ``logs``: ``mkt build`` with ``configs/logs.yaml`` on the Spark-style logs;
* ``logs_keep`` / ``tenrec_keep``: the same with ``source.duplicates: keep`` (no search for exact duplicate
  impressions), so ``dedup_cost`` / ``dedup_cost_tenrec`` (rows/s without the search over rows/s with it) is what
  finding the copies costs (by time in the logs, by position in Tenrec's CSVs).

DuckDB runs under ``--memory-limit`` (spilling beyond it), so its peak memory should not grow with the input.
Prints one line per conversion, then one JSON object on the last line:

    {"sizes": [{"rows": ..., "baseline": {"rows_per_s": ..., "peak_rss_mb": ...}, "tenrec": {...}, "logs": {...},
     "logs_keep": {...}, "tenrec_keep": {...}, "speedup_tenrec": ..., "dedup_cost": ...,
     "dedup_cost_tenrec": ...}, ...], ...}

Usage:
    python tools/bench_build.py                               # 1M rows (a few minutes on 2 cores)
    python tools/bench_build.py --rows 1000000 10000000       # the README's figures (about an hour)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE_COMMIT = "c5d627f"  # the last commit with the two-pass converter (mkt_torchrec/data/tenrec.py)
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
LOGS = os.path.join(REPO, "configs", "logs.yaml")
TENREC = os.path.join(REPO, "configs", "tenrec.yaml")

_CHILD = r"""
import json, sys, time, importlib.util
sys.path.insert(0, {repo!r})
from mkt_torchrec.config import load_config
kind, args = {kind!r}, {args!r}
cfg = load_config(args["config"], args["sets"])
start = time.perf_counter()
if kind == "baseline":
    spec = importlib.util.spec_from_file_location("baseline_tenrec", args["module"])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    manifest = mod.convert(args["video"], args["article"], cfg, args["out"], overwrite=True)
elif kind in ("tenrec", "tenrec_keep"):
    from mkt_torchrec.data.tenrec import convert
    manifest = convert(args["video"], args["article"], cfg, args["out"], overwrite=True)
else:
    from mkt_torchrec.build.run import build_dataset
    manifest = build_dataset(cfg, args["out"], overwrite=True)
seconds = time.perf_counter() - start
rows = sum(sum(v.values()) for v in manifest.rows.values())
hwm = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({{"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
                  "peak_rss_mb": round(hwm)}}))
"""


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _inputs(work: str, rows: int) -> dict[str, str]:
    """Write (or reuse) the Tenrec CSVs and the Spark-style logs of ``rows`` impressions."""
    base = os.path.join(work, f"rows-{rows}")
    source_rows = int(round(rows / 1.33))
    sets = ["--set", f"synth.source_rows={source_rows}", "--set", f"synth.users={max(1000, rows // 20)}"]
    tenrec, logs = os.path.join(base, "tenrec"), os.path.join(base, "logs")
    mkt = os.path.join(os.path.dirname(sys.executable), "mkt")
    if not os.path.isdir(tenrec):
        print(f"writing {rows} rows as Tenrec CSVs ...", flush=True)
        _run([mkt, "synth", "--config", QUICKSTART, *sets, "--layout", "tenrec", "--out", tenrec])
    if not os.path.isdir(logs):
        print(f"writing {rows} rows as Spark-style logs ...", flush=True)
        _run([mkt, "synth", "--config", LOGS, *sets, "--layout", "logs", "--out", logs])
    return {"base": base, "tenrec": tenrec, "logs": logs}


def _child(kind: str, args: dict) -> dict:
    code = _CHILD.format(repo=REPO, kind=kind, args=args)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{kind} failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
    last = [line for line in out.stdout.splitlines() if line.startswith("{")][-1]
    return json.loads(last)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000], help="input sizes (impressions)")
    p.add_argument("--work", default=os.path.join(REPO, "out", "bench_build"), help="inputs and outputs go here")
    p.add_argument("--memory-limit", default="1GB", help="DuckDB's memory limit (source.memory_limit)")
    p.add_argument("--baseline-commit", default=BASELINE_COMMIT, help="git commit of the two-pass converter")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    module = os.path.join(args.work, "baseline_tenrec.py")
    with open(module, "w", encoding="utf-8") as f:
        f.write(subprocess.run(["git", "-C", REPO, "show", f"{args.baseline_commit}:mkt_torchrec/data/tenrec.py"],
                               check=True, capture_output=True, text=True).stdout)
    from mkt_torchrec.data.synth_tenrec import QUICKSTART_SCHEMA_SETTINGS

    tenrec_sets = list(QUICKSTART_SCHEMA_SETTINGS) + [f"source.memory_limit={args.memory_limit}"]
    sizes = []
    for rows in args.rows:
        paths = _inputs(args.work, rows)
        video = os.path.join(paths["tenrec"], "QK-video.csv")
        article = os.path.join(paths["tenrec"], "QK-article.csv")
        result: dict = {"rows": rows}
        for kind, config, extra in (("baseline", TENREC, {"module": module, "video": video, "article": article}),
                                    ("tenrec", TENREC, {"video": video, "article": article}),
                                    ("tenrec_keep", TENREC, {"video": video, "article": article}),
                                    ("logs", LOGS, {}), ("logs_keep", LOGS, {})):
            sets = tenrec_sets if config == TENREC else [f"source.memory_limit={args.memory_limit}",
                                                         f"source.inputs=[{{path: {paths['logs']}}}]"]
            if kind in ("logs_keep", "tenrec_keep"):
                sets = [*sets, "source.duplicates=keep"]
            if kind == "baseline":
                sets = list(QUICKSTART_SCHEMA_SETTINGS)
            out = os.path.join(paths["base"], f"out-{kind}")
            started = time.time()
            result[kind] = _child(kind, {"config": config, "sets": sets, "out": out, **extra})
            print(f"{rows} rows  {kind:8s} {json.dumps(result[kind])}  ({time.time() - started:.0f} s with start-up)",
                  flush=True)
        result["speedup_tenrec"] = round(result["tenrec"]["rows_per_s"] / result["baseline"]["rows_per_s"], 2)
        result["dedup_cost"] = round(result["logs_keep"]["rows_per_s"] / result["logs"]["rows_per_s"], 2)
        result["dedup_cost_tenrec"] = round(result["tenrec_keep"]["rows_per_s"] / result["tenrec"]["rows_per_s"], 2)
        sizes.append(result)
    print(json.dumps({"sizes": sizes, "memory_limit": args.memory_limit, "baseline_commit": args.baseline_commit,
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
