"""The ``mkt`` command line.

Every subcommand takes ``--config FILE`` and repeatable ``--set dotted.key=value`` overrides; ``main`` takes
``argv`` so tests call it in-process. Subcommands are registered in ``_COMMANDS``; each has a parser
builder and a handler ``(args, cfg) -> int``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Callable, Optional, Sequence

from mkt_torchrec import registry
from mkt_torchrec.storage import display as storage_display, join as storage_join
from mkt_torchrec.config import Config, ConfigError, load_config

Handler = Callable[[argparse.Namespace, Config], int]


def _progress(total: Optional[int], desc: str, unit: str = "rows"):
    from tqdm import tqdm

    from mkt_torchrec import logs

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True,
                disable=not logs.progress_enabled())


# --------------------------------------------------------------------------------------------------------
# mkt synth
# --------------------------------------------------------------------------------------------------------


def _add_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory to create: the dataset (--layout parquet), or the two "
                   "Tenrec CSVs (--layout tenrec)")
    p.add_argument("--seed", type=int, default=None, help="overrides synth.seed")
    p.add_argument("--layout", choices=["parquet", "tenrec", "logs"], default="parquet",
                   help="parquet (default): a dataset to train on. tenrec: the same data as Tenrec's QK-video.csv "
                   "(products) and QK-article.csv (posts), plus a true_prob column, to check `mkt tenrec` and "
                   "configs/tenrec.yaml on data with known structure and ceiling; prints the commands to run next. "
                   "logs: the same data as a marketplace's raw impression logs (Spark-style Parquet, dt= day "
                   "partitions, their own column names, string ids, no sequences) for `mkt build` with "
                   "configs/logs.yaml")
    p.add_argument("--days", type=int, default=None, metavar="N",
                   help="write N day datasets for daily incremental training instead of one (--layout parquet only): "
                   "--out/day-001 ... day-N, each training on its day and testing on the next, and --out/days.json "
                   "listing them; synth.source_rows is the total over the N+1 days generated "
                   "(mkt_torchrec.data.synth_days)")
    p.add_argument("--drift", type=float, default=None, metavar="RADIANS",
                   help="with --days: how far every user's interest vector turns each day, in radians (default "
                   f"{DEFAULT_DRIFT}; 0: every day has the same distribution)")
    p.add_argument("--cumulative", action="store_true", help="with --days: also write --out/upto-001 ... upto-N, "
                   "training on all days so far and testing on the next (to retrain from scratch)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (once the new one is complete)")


DEFAULT_DRIFT = 0.05  # mkt synth --days: radians per day


def _run_synth(args: argparse.Namespace, cfg: Config) -> int:
    from mkt_torchrec.data.synth import generate

    if args.seed is not None:
        cfg.synth.seed = args.seed
    total = int(cfg.synth.source_rows * (1 + cfg.synth.target_ratio))
    if args.days is None and (args.drift is not None or args.cumulative):
        raise ValueError(f"{'--drift' if args.drift is not None else '--cumulative'} needs --days N")
    if args.days is not None:
        from mkt_torchrec.data.synth_days import write_days

        if args.layout != "parquet":
            raise ValueError(f"--days writes day datasets (--layout parquet), not --layout {args.layout}")
        if args.days < 1:
            raise ValueError(f"--days: expected a number of days >= 1, got {args.days}")
        drift = DEFAULT_DRIFT if args.drift is None else args.drift
        with _progress(total, "synth") as bar:
            summary = write_days(cfg, args.out, args.days, drift, cumulative=args.cumulative,
                                 overwrite=args.overwrite, progress=bar.update)
        print(json.dumps({"out": args.out, **{k: v for k, v in summary.items() if k != "out_dir"}}))
        return 0
    if args.layout == "tenrec":
        return _synth_tenrec(args, cfg, total)
    if args.layout == "logs":
        from mkt_torchrec.data.synth_logs import write_logs

        with _progress(total, "synth") as bar:
            print(json.dumps(write_logs(cfg, args.out, overwrite=args.overwrite, progress=bar.update)))
        return 0
    with _progress(total, "synth") as bar:
        manifest = generate(cfg, args.out, overwrite=args.overwrite, progress=bar.update)
    print(json.dumps({"out": args.out, "rows": manifest.rows}))
    return 0


def _synth_tenrec(args: argparse.Namespace, cfg: Config, total: int) -> int:
    import shlex

    from mkt_torchrec.data import synth_tenrec

    with _progress(total, "synth") as bar:
        summary = synth_tenrec.write_tenrec_csvs(cfg, args.out, overwrite=args.overwrite, progress=bar.update)
    print(json.dumps(summary))
    data = os.path.normpath(args.out) + "-dataset"
    schema_sets = [w for s in synth_tenrec.QUICKSTART_SCHEMA_SETTINGS for w in ("--set", s)]
    train_sets = [w for s in synth_tenrec.QUICKSTART_TRAIN_SETTINGS for w in ("--set", s)]
    video, article = (os.path.join(args.out, name) for name in (synth_tenrec.VIDEO_FILE, synth_tenrec.ARTICLE_FILE))
    convert = ["mkt", "tenrec", "--video", video, "--article", article, "--config",
               "configs/tenrec.yaml", *schema_sets, "--out", data]
    run = ["mkt", "run", "--config", "configs/tenrec.yaml", *schema_sets, *train_sets, "--data", data, "--out",
           os.path.normpath(args.out) + "-runs"]
    print("next, convert (the schema --set flags size configs/tenrec.yaml's tables for this data; training needs "
          "them too):\n  " + shlex.join(convert) + "\nthen train and evaluate MKT and its ablations (the other --set "
          "flags train as the quickstart does; --runs mkt for MKT alone):\n  " + shlex.join(run))
    return 0


# --------------------------------------------------------------------------------------------------------
# mkt tenrec
# --------------------------------------------------------------------------------------------------------


def _add_tenrec(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video", required=True, help="path to QK-video.csv (source entity)")
    p.add_argument("--article", required=True, help="path to QK-article.csv (target entity)")
    p.add_argument("--out", required=True, help="dataset directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (once the new one is complete)")


def _run_tenrec(args: argparse.Namespace, cfg: Config) -> int:
    from mkt_torchrec.data.tenrec import convert

    with _progress(None, "tenrec") as bar:
        manifest = convert(args.video, args.article, cfg, args.out, overwrite=args.overwrite, progress=bar.update)
    print(json.dumps({"out": args.out, "rows": manifest.rows}))
    return 0


# --------------------------------------------------------------------------------------------------------
# mkt build: impression logs -> a dataset (README "Your own data")
# --------------------------------------------------------------------------------------------------------


def _add_build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="dataset to create: a directory or a URI (s3://bucket/ds, ...)")
    p.add_argument("--engine", choices=["duckdb", "spark"], default=None,
                   help="duckdb: one machine, spills to disk (default: source.engine); spark: a cluster (master "
                   "from source.spark_master, else $SPARK_MASTER, else local[*])")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds a dataset (never what mkt build did not write)")


def _run_build(args: argparse.Namespace, cfg: Config) -> int:
    from mkt_torchrec.build.run import build_dataset

    with _progress(None, "build: rows read") as bar:
        manifest = build_dataset(cfg, args.out, engine=args.engine, overwrite=args.overwrite, progress=bar.update)
    print(json.dumps({"out": storage_display(args.out), "rows": manifest.rows}))
    return 0


# --------------------------------------------------------------------------------------------------------
# mkt rewrite: an older dataset into this release's layout
# --------------------------------------------------------------------------------------------------------


def _add_rewrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset to read (left untouched): a directory or a URI (s3://...)")
    p.add_argument("--out", required=True, help="dataset to create: a directory or a URI (s3://bucket/ds, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (once the new one is complete)")


def _run_rewrite(args: argparse.Namespace, cfg: Config) -> int:
    from mkt_torchrec.data.dataset import rewrite_dataset

    manifest = rewrite_dataset(args.data, args.out, cfg.schema, overwrite=args.overwrite)
    print(json.dumps({"out": args.out, "rows": manifest.rows, "format_version": manifest.format_version}))
    return 0


# --------------------------------------------------------------------------------------------------------
# mkt inspect: read a dataset back through the reader
# --------------------------------------------------------------------------------------------------------


def _add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset: a directory or a URI (s3://bucket/ds, gs://..., ...)")
    p.add_argument("--split", default="train", help="split to read (default: train)")


def _run_inspect(args: argparse.Namespace, cfg: Config) -> int:
    summary = read_back(cfg, args.data, args.split)
    print(json.dumps(summary, indent=2))
    return 0


def read_back(cfg: Config, data_dir: str, split: str) -> dict:
    """Read a whole split through :class:`ParquetReader`; return counts and throughput."""
    import torch

    from mkt_torchrec.data.reader import ParquetReader

    reader = ParquetReader(data_dir, split, cfg.schema, cfg.data, training=False)
    rows = {"source": 0, "target": 0}
    positives = {"source": 0, "target": 0}
    seq_values = 0
    start = time.perf_counter()
    with _progress(reader.num_rows(), f"read {split}") as bar:
        for batch in reader:
            for code, name in ((0, "source"), (1, "target")):
                mask = batch.entity == code
                rows[name] += int(mask.sum())
                positives[name] += int(batch.labels[mask].sum())
            lengths = batch.sparse_features.length_per_key()
            seq_values += sum(n for k, n in zip(batch.sparse_features.keys(), lengths) if k in cfg.schema.sequences)
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    total = sum(rows.values())
    if total != reader.num_rows():
        raise RuntimeError(f"{data_dir}: read {total} rows of split {split!r} but the manifest says {reader.num_rows()}")
    return {
        "data": data_dir, "split": split, "rows": rows,
        "positive_rate": {k: positives[k] / rows[k] if rows[k] else None for k in rows},
        "mean_sequence_values_per_row": seq_values / max(total, 1),
        "seconds": round(seconds, 3), "rows_per_s": round(total / max(seconds, 1e-9)),
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------------------
# mkt run: the main job
# --------------------------------------------------------------------------------------------------------


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory: data/ (unless --data), runs/, report/, "
                   "summary.json; a path or a URI (s3://bucket/exp: needs --data; see README 'Object storage')")
    p.add_argument("--data", default=None, help="an existing dataset (e.g. from mkt tenrec) instead of synthesising "
                   "one from the config's synth section")
    p.add_argument("--nproc", type=int, default=2, help="local ranks for training and evaluation (default 2)")
    p.add_argument("--runs", nargs="+", default=None, metavar="NAME",
                   help=f"which models (default: MKT and its ablations: {' '.join(registry.mkt_names())}); the "
                   f"baselines: {' '.join(registry.baseline_names())}; 'all' for every one")
    p.add_argument("--seeds", type=int, default=1, help="runs per model, with seeds train.seed + k (default 1)")
    p.add_argument("--baseline", default=None, help="the report's reference model (default: no_mem_pretrain if "
                   "run, else the first)")
    p.add_argument("--overwrite", action="store_true", help="delete --out first (default: resume / skip done runs)")


def _run_run(args: argparse.Namespace, cfg: Config) -> int:
    from mkt_torchrec.pipeline import run_all

    names = list(registry.names()) if args.runs == ["all"] else (args.runs or list(registry.mkt_names()))
    summary = run_all(cfg, args.out, nproc=args.nproc, names=names,
                      overwrite=args.overwrite, data_dir=args.data, seeds=args.seeds, baseline=args.baseline)
    print(json.dumps(summary["target"], indent=2))
    print(f"report: {storage_display(storage_join(summary['report'], 'report.html'))} (and report.md); "
          f"took {summary['seconds']:.0f}s")
    return 0


# --------------------------------------------------------------------------------------------------------
# mkt daily: incremental training day by day (mkt_torchrec.daily)
# --------------------------------------------------------------------------------------------------------


def _add_daily(p: argparse.ArgumentParser) -> None:
    p.add_argument("--days", required=True, nargs="+", metavar="DATASET",
                   help="the day datasets in date order (each trains on its train split and is tested on its test "
                   "split, the next day), or a directory with days.json listing them (mkt synth --days)")
    p.add_argument("--out", required=True, help="output directory: seedK/day-DDD/{mem,tem}, seedK/frozen/, "
                   "daily.md / daily.png (the per-day table and curves), summary.json; rerun it with more days to "
                   "continue")
    p.add_argument("--mem-every", type=int, default=1, metavar="K",
                   help="refresh the MEM every K days (days 1, 1+K, ...); stage 2 trains daily and moves to each new "
                   "MEM when it appears (default 1)")
    p.add_argument("--nproc", type=int, default=2, help="local ranks (default 2)")
    p.add_argument("--seeds", type=int, default=1, help="day sequences, with seeds train.seed + k (default 1)")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier mkt daily output at --out first "
                   "(default: skip the days done, resume an interrupted one)")
    p.add_argument("--stale-lags", type=int, nargs="+", default=[], metavar="L",
                   help="with --set model.tem.knowledge=cache (each day's stage 2 reads that day's knowledge version): "
                   "also score each day's stage 2 with the version of L days before (what a stale cache costs)")


def _run_daily(args: argparse.Namespace, cfg: Config) -> int:
    from mkt_torchrec.daily import run_daily

    summary = run_daily(cfg, args.days, args.out, nproc=args.nproc, seeds=args.seeds, mem_every=args.mem_every,
                        overwrite=args.overwrite, stale_lags=args.stale_lags)
    print(json.dumps([{"day": r["day"], "mem_day": r["mem_day"],
                       **{f"{name}_{k}": r[name].get(k) for name in ("incremental", "frozen") for k in ("gauc", "auc")}}
                      for r in summary["table"]], indent=1))
    print(f"table: {os.path.join(args.out, 'daily.md')} (curves: daily.png); took {summary['seconds']:.0f}s")
    return 0


def _add_score(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a stage-2 run with a serving export (RUN/serving)")
    p.add_argument("--requests", required=True, help="a Parquet file of requests in the dataset's columns (raw ids; "
                   "entity and label may be absent)")
    p.add_argument("--out", required=True, help="the Parquet file to write: row, user_id, score")
    p.add_argument("--cache", default=None, metavar="URI", help="the store holding the knowledge (a cached stage 2: "
                   "model.tem.knowledge=cache): a path, sqlite:///PATH or redis://HOST:PORT/DB")
    p.add_argument("--version", default=None, help="the cache version (default: the one the run trained with)")
    p.add_argument("--batch-size", type=int, default=4096, help="requests per batch (default 4096)")
    p.add_argument("--any-mem", action="store_true", help="accept a version built from another MEM checkpoint than "
                   "the run trained with (a stale or newer cache; the schema must still match)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads for the model (default: torch's)")


def _run_score(args: argparse.Namespace, cfg: Config) -> int:
    from mkt_torchrec.cache.score import score_requests

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    with _progress(None, "score") as bar:
        summary = score_requests(args.run, args.requests, args.out, cache_uri=args.cache, version=args.version,
                                 batch_size=args.batch_size, any_mem=args.any_mem, progress=bar.update,
                                 threads=args.threads)
    print(json.dumps(summary))
    return 0


# --------------------------------------------------------------------------------------------------------
# mkt train / evaluate / plan
# --------------------------------------------------------------------------------------------------------


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", required=True, choices=["mem", "tem"],
                   help="mem: pre-train the multi-entity model on mixed rows; tem: fine-tune the target model")
    p.add_argument("--data", required=True, help="dataset (from mkt synth / tenrec / build): a directory or a URI "
                   "(s3://bucket/ds; credentials from the environment, e.g. AWS_*)")
    p.add_argument("--run-dir", required=True, help="run directory: checkpoints, plan, metrics log, serving export; "
                   "a path or an s3:// URI (one node's ranks; see README 'Object storage')")
    p.add_argument("--mem-run", default=None, help="stage tem: the stage-1 run directory whose MEM to plug in")
    p.add_argument("--nproc", type=int, default=0,
                   help="launch N local processes (torch elastic); 0 (default): join the world the environment "
                        "describes (torchrun / TorchX), or run as a world of one")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")


def _in_world(nproc: int, fn: Callable, *args) -> object:
    """Run fn(*args) in nproc local processes, or here as one rank of the world the environment describes; a
    failing rank ends the whole world at once (see ``mkt_torchrec.training.distributed``)."""
    from mkt_torchrec.training.distributed import launch, run_rank

    if nproc < 0:
        raise ValueError(f"--nproc must be >= 0, got {nproc}")
    if nproc > 0:
        return launch(nproc, fn, *args)
    return run_rank(fn, *args)


def _train_entry(cfg: Config, stage: str, data: str, run_dir: str, resume: bool, mem_run: Optional[str]) -> dict:
    from mkt_torchrec.training.recipe import train

    return train(cfg, stage, data, run_dir, resume=resume, mem_run=mem_run)


def _run_train(args: argparse.Namespace, cfg: Config) -> int:
    summary = _in_world(args.nproc, _train_entry, cfg, args.stage, args.data, args.run_dir, args.resume,
                        args.mem_run)
    spec = registry.of_config(cfg.model.name, cfg.model.ablation)
    if spec.serves(args.stage) and int(os.environ.get("RANK", "0")) == 0:
        # a separate single-process step, once every rank has left the process group
        from mkt_torchrec.training.export import export_run

        summary = dict(summary or {}, serving=export_run(args.run_dir, args.data))
    if summary:
        print(json.dumps(summary))
    return 0


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="a finished stage-2 run (or a no_tem_finetune MEM run)")
    p.add_argument("--data", default=None,
                   help="dataset whose test rows serve as the tracing example (default: synthetic ids)")
    p.add_argument("--out", default=None, help="output directory (default: RUN/serving)")


def _run_export(args: argparse.Namespace, cfg: Config) -> int:
    from mkt_torchrec.training.export import export_run

    print(json.dumps({"serving": export_run(args.run_dir, args.data, args.out)}))
    return 0


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="a run directory of mkt train")
    p.add_argument("--data", required=True, help="dataset (a directory or a URI); its test split is scored")
    p.add_argument("--nproc", type=int, default=0, help="launch N local processes (see mkt train --help)")
    p.add_argument("--cache-version", default=None, help="a stage 2 trained with model.tem.knowledge=cache: score "
                   "with this version of the cache instead of its own (e.g. a stale one)")
    p.add_argument("--into", default=None, help="write predictions/ and metrics.json into this directory instead of "
                   "the run's (the run is left as it is)")


def _evaluate_entry(cfg: Config, run_dir: str, data: str, into: Optional[str] = None,
                    cache_version: Optional[str] = None) -> dict:
    from mkt_torchrec.training.scoring import evaluate

    return evaluate(cfg, run_dir, data, into=into, cache_version=cache_version)


def _run_evaluate(args: argparse.Namespace, cfg: Config) -> int:
    from mkt_torchrec.config import EVALUATE_KEYS

    ignored = [o.split("=", 1)[0] for o in args.overrides
               if not any(o.split("=", 1)[0] == k or o.startswith(k + ".") for k in EVALUATE_KEYS)]
    if ignored:
        raise ValueError(f"--set {', '.join(ignored)} does not apply to evaluate: the model, schema and plan come "
                         f"from {os.path.join(args.run_dir, 'run.json')}; evaluate takes only "
                         f"{', '.join(k + ('.*' if '.' not in k else '') for k in EVALUATE_KEYS)}")
    metrics = _in_world(args.nproc, _evaluate_entry, cfg, args.run_dir, args.data, args.into, args.cache_version)
    if metrics:
        print(json.dumps(metrics))
    return 0


def _add_plan(p: argparse.ArgumentParser) -> None:
    from mkt_torchrec.planning.cli import add_arguments

    add_arguments(p)


def _run_plan(args: argparse.Namespace, cfg: Config) -> int:
    from mkt_torchrec.planning.cli import run

    return run(args, cfg)


def _add_report(p: argparse.ArgumentParser) -> None:
    from mkt_torchrec.evaluation.report_cli import add_arguments

    add_arguments(p)


def _run_report(args: argparse.Namespace, cfg: Config) -> int:
    from mkt_torchrec.evaluation.report_cli import run

    return run(args, cfg)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--show", action="store_true", help="print every setting with its value and meaning (the default)")


def _run_config(args: argparse.Namespace, cfg: Optional[Config]) -> int:
    from mkt_torchrec.config import describe_keys

    rows = describe_keys(cfg)
    width = max(len(f"{k} = {v!r}") for k, v, _ in rows)
    source = args.config or "the defaults"
    schema = "" if cfg is not None else " (schema.* describes a dataset: give --config to list it)"
    print(f"# settings of {source}{schema}; override with --set KEY=VALUE")
    for key, value, meaning in rows:
        print(f"{f'{key} = {value!r}':<{width}}  # {meaning}")
    return 0


def _add_cache(p: argparse.ArgumentParser) -> None:
    from mkt_torchrec.cache.cli import add_arguments

    add_arguments(p)


def _run_cache(args: argparse.Namespace, cfg: Optional[Config]) -> int:
    from mkt_torchrec.cache.cli import run

    return run(args, cfg)


_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {
    "synth": ("write a synthetic dataset with planted cross-entity structure (--layout tenrec: as Tenrec's CSVs)",
              _add_synth, _run_synth),
    "build": ("turn impression logs (source: in the config; local or object storage) into a dataset", _add_build,
              _run_build),
    "tenrec": ("convert Tenrec's QK-video / QK-article CSVs into a dataset", _add_tenrec, _run_tenrec),
    "rewrite": ("rewrite a dataset of an older release into this one's layout (entity-pure row groups)",
                _add_rewrite, _run_rewrite),
    "inspect": ("read a dataset split back through the reader and summarise it", _add_inspect, _run_inspect),
    "train": ("train a stage (mem: pre-train, tem: fine-tune) with DistributedModelParallel", _add_train, _run_train),
    "evaluate": ("score a run on the test split: predictions + metrics.json (AUC, GAUC)", _add_evaluate,
                 _run_evaluate),
    "export": ("export a finished run's serving model (TEM + the MEM's target path) to RUN/serving",
               _add_export, _run_export),
    "plan": ("plan embedding shards for a topology and write a plan file the trainer accepts", _add_plan, _run_plan),
    "config": ("list every config key with its value (from --config, else the default) and meaning", _add_config,
               _run_config),
    "report": ("compare evaluated runs side by side: report.html, report.md, plots", _add_report, _run_report),
    "run": ("the main job: synthesise data and run the pipeline end to end", _add_run, _run_run),
    "daily": ("incremental training day by day: both stages continue from the previous day's on each day's rows, "
              "each day's model tested on the next day", _add_daily, _run_daily),
    "cache": ("the knowledge cache (KEEP): build a MEM's knowledge into a snapshot, load it into a store as a "
              "version, list versions", _add_cache, _run_cache),
    "score": ("score a Parquet file of requests with a run's serving export, its knowledge read from a cache "
              "version (a reference for a serving system)", _add_score, _run_score),
}


# Options that may be a URI (s3://bucket/ds, ...: mkt_torchrec.storage), by command: datasets and reports. Run
# directories (checkpoints, the lock) are local or shared POSIX paths.
_URI_OPTIONS = {"data": ("train", "evaluate", "inspect", "rewrite", "export", "plan", "run", "cache"),
                "out": ("rewrite", "build", "report", "run", "cache"), "run_dir": ("train", "evaluate", "export"),
                "mem_run": ("train", "cache"), "runs": ("report",), "models": ("report",), "days": ("daily",),
                "snapshot": ("cache",), "store": ("cache",)}


def _local_paths_only(args: argparse.Namespace) -> None:
    """A URL (``s3://bucket/...``) given where a local path is expected would become ``CWD/s3:/bucket/...``; say so
    before anything is created. Dataset options (``_URI_OPTIONS``) take URIs as they are.

    Raises:
        ValueError: an option holds a URL.
    """
    for name, value in sorted(vars(args).items()):
        if args.command in _URI_OPTIONS.get(name, ()):
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", v):
                # shown as storage.display shows it: a password in the URL is not echoed
                from mkt_torchrec.storage import display

                raise ValueError(f"--{name.replace('_', '-')} {display(v)}: this option takes a local or shared POSIX "
                                 "path (a mounted volume), not a URL; datasets (--data, mkt build --out), run "
                                 "directories (--run-dir, mkt run --out) and reports (mkt report --out) may be on "
                                 "object storage")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mkt",
        description="MKT: multi-entity knowledge transfer CTR prediction on TorchRec.",
        epilog="Every subcommand but export takes --config FILE (optional for config and report) and repeatable "
           "--set dotted.key=value overrides; export uses the run's own.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add, _) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in ("export", "score"):  # the model and its settings come from the run's own run.json
            p.set_defaults(config=None, overrides=[])
        else:  # config lists settings; report reads the runs (a config only sets its eval.* options)
            optional = name in ("config", "report", "cache")
            p.add_argument("--config", required=not optional,
                           help="YAML config file (see configs/)" + (" (optional)" if optional else ""))
            p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config value, e.g. --set data.batch_size=256 (repeatable)")
        add(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mkt_torchrec import logs

    logs.configure()
    try:
        registry.runs()  # imports the models of MKT_MODELS: a bad one is a one-line error, before anything else
    except ValueError as e:
        print(f"mkt: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        if not args.config and args.overrides:
            raise ConfigError("--set needs --config (the file whose values it overrides)")
        cfg = load_config(args.config, args.overrides) if args.config else None
    except ConfigError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"mkt {args.command}: config error: {e}", file=sys.stderr)
        return 2
    _, _, handler = _COMMANDS[args.command]
    from mkt_torchrec.training.distributed import RankFailed

    try:
        _local_paths_only(args)
        return handler(args, cfg)
    except (ValueError, OSError, RankFailed) as e:  # OSError: a read-only or full disk names its path
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank sees the same option error: say it once
            print(f"mkt {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
