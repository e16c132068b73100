"""``mkt cache build | load | versions``: the knowledge cache from the command line (KEEP's offline knowledge
extraction and its versioned key-value service; :mod:`mkt_torchrec.cache`).

Thin handlers: each calls one library function that the tests call too (:func:`mkt_torchrec.cache.build.prepare`
and :func:`~mkt_torchrec.cache.build.build_snapshot`, :func:`mkt_torchrec.cache.snapshot.load_snapshot`,
:func:`~mkt_torchrec.cache.snapshot.describe_versions`).
"""

from __future__ import annotations

import argparse
import json
import shlex
from typing import Any, Optional

from mkt_torchrec.config import Config

_DESCRIPTION = ("The knowledge cache (KEEP, sections 5.2-5.3): 'build' computes a MEM checkpoint's knowledge of "
                "every user, item and (user, category) of a dataset into a snapshot (files); 'load' publishes a "
                "snapshot as one version of a key-value store (SQLite file or Redis), keeping the newest "
                "cache.keep_versions; 'versions' lists a store's versions.")


def _config_options(p: argparse.ArgumentParser, what: str) -> None:
    # the same destinations as the top-level options; SUPPRESS keeps what was given before the subcommand
    p.add_argument("--config", default=argparse.SUPPRESS, help=f"YAML config file (optional): {what}")
    p.add_argument("--set", dest="overrides", action="append", default=argparse.SUPPRESS, metavar="KEY=VALUE",
                   help="override a value of --config, e.g. --set cache.batch_size=1024 (repeatable)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``cache`` command's subcommands (``p`` has ``--config`` / ``--set`` already, optional)."""
    p.description = _DESCRIPTION
    sub = p.add_subparsers(dest="cache_command", required=True, metavar="SUBCOMMAND")

    b = sub.add_parser("build", help="compute a MEM checkpoint's knowledge into a snapshot (all ranks at once)",
                       description="Compute the knowledge of the MEM run's final checkpoint (its target path: the "
                       "vectors stage 2 gates in) for every user, item and (user, category) of the target rows of "
                       "the dataset's cache.splits, and write it as a snapshot: SNAPSHOT/manifest.json (written "
                       "last) and SNAPSHOT/<kind>/part-*.parquet. A build that fails leaves no snapshot. Prints the "
                       "version and the command that loads it.")
    b.add_argument("--mem-run", required=True, help="a finished stage-1 (mem) run directory of mkt train")
    b.add_argument("--data", required=True, help="the dataset to read (a directory or a URI, s3://...): its "
                   "target rows of cache.splits (default: train) define the users, items and categories cached")
    b.add_argument("--out", required=True, help="the snapshot to create: a directory or a URI (s3://bucket/cache)")
    b.add_argument("--version", default=None, help="the cache version's name (letters, digits, '.', '_', '-'); "
                   "default mem-<MEM step>-<8 hex>, the same for the same MEM checkpoint, schema, data and splits")
    b.add_argument("--nproc", type=int, default=0, help="launch N local processes that share the work; 0 "
                   "(default): join the world the environment describes (torchrun / TorchX), or run as one")
    b.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds a snapshot (never what mkt cache build did not write)")
    _config_options(b, "its cache.* (category_feature, splits, batch_size), data.num_workers and train.threads "
                    "apply; the model, schema and data settings are always the MEM run's")

    ld = sub.add_parser("load", help="publish a snapshot as one version of a store, keeping the newest ones",
                        description="Check a snapshot's manifest, stream its vectors into the store and publish "
                        "them as one version (readers see all of it or none), then drop the oldest versions beyond "
                        "cache.keep_versions (default 5). Loading a version the store has already is a no-op.")
    ld.add_argument("--from", dest="snapshot", required=True, help="a snapshot of mkt cache build (its directory "
                    "or URI)")
    ld.add_argument("--to", dest="store", default=None, help="the store: a path or sqlite:///PATH (a SQLite file, "
                    "created if missing) or redis://HOST:PORT/DB (password from REDISCLI_AUTH); default cache.uri")
    ld.add_argument("--keep-versions", type=int, default=None,
                    help="versions the store keeps after this load (default cache.keep_versions, 5)")
    _config_options(ld, "its cache.uri and cache.keep_versions apply")

    v = sub.add_parser("versions", help="list a store's versions, oldest first, with their MEM digest and rows",
                       description="List the versions a store has published, oldest first (the newest last), with "
                       "the MEM checkpoint digest each was built from and its entries per kind.")
    v.add_argument("--store", default=None, help="the store (as mkt cache load --to); default cache.uri")
    v.add_argument("--json", action="store_true", help="print JSON instead of one line per version")
    _config_options(v, "its cache.uri applies")


def _store_uri(given: Optional[str], cfg: Optional[Config], option: str) -> str:
    uri = given or (cfg.cache.uri if cfg is not None else None)
    if not uri:
        raise ValueError(f"name the store with {option} (or cache.uri in --config): a path or sqlite:///PATH, or "
                         "redis://HOST:PORT/DB")
    return uri


def run(args: argparse.Namespace, cfg: Optional[Config]) -> int:
    """Dispatch ``mkt cache SUBCOMMAND``."""
    return {"build": _build, "load": _load, "versions": _versions}[args.cache_command](args, cfg)


def _build(args: argparse.Namespace, cfg: Optional[Config]) -> int:
    import os

    from mkt_torchrec.cache.build import build_snapshot, prepare
    from mkt_torchrec.storage import display

    plan = prepare(args.mem_run, args.data, args.out, job=cfg, version=args.version, overwrite=args.overwrite)
    summary: Any = build_snapshot(plan, nproc=args.nproc)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 reports
        return 0
    print(json.dumps(summary))
    to = plan.cfg.cache.uri or "knowledge.db"
    print(f"built cache version {plan.version} in {display(plan.out)}; load it with:\n  "
          + shlex.join(["mkt", "cache", "load", "--from", display(plan.out), "--to", display(to)]))
    return 0


def _load(args: argparse.Namespace, cfg: Optional[Config]) -> int:
    from mkt_torchrec.cache.snapshot import load_snapshot

    uri = _store_uri(args.store, cfg, "--to")
    keep = args.keep_versions if args.keep_versions is not None else (cfg.cache.keep_versions if cfg else 5)
    if keep < 1:
        raise ValueError(f"--keep-versions must be at least 1, got {keep}")
    result = load_snapshot(args.snapshot, uri, keep=keep)
    if result.loaded:
        entries = ", ".join(f"{kind} {n}" for kind, n in result.rows.items())
        print(f"published cache version {result.version} in {result.store} (entries: {entries})")
    else:
        print(f"cache version {result.version} is already published in {result.store}: nothing loaded")
    if result.dropped:
        print(f"dropped the oldest versions beyond {keep}: {', '.join(result.dropped)}")
    return 0


def _versions(args: argparse.Namespace, cfg: Optional[Config]) -> int:
    from mkt_torchrec.cache.snapshot import describe_versions, version_summary
    from mkt_torchrec.storage import display

    uri = _store_uri(args.store, cfg, "--store")
    entries = describe_versions(uri)
    print(json.dumps(entries, indent=2) if args.json else version_summary(entries, display(uri)))
    return 0
