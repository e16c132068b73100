"""``mkt plan``: shard a stage's embedding tables for a topology and write a plan file the trainer accepts.

    mkt plan --config configs/industrial.yaml --world-size 128 --local-world-size 8 --hbm-gb 80 --out plan.json

The stage module is built on the meta device (nothing is allocated), so a GPU topology is planned on a
CPU-only machine. Prints the plan per table and per rank, writes ``--out`` (atomically) and prints a one-line
JSON summary last. Exit codes: 0 planned, 1 the model does not fit (nothing written), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from typing import Any, Dict, List, Sequence

from mkt_torchrec.config import COMPUTE_DEVICES, Config


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mkt plan``'s own flags (``--config`` / ``--set`` come from ``mkt_torchrec.cli``)."""
    p.add_argument("--world-size", type=int, required=True, help="total ranks (GPUs or CPU processes)")
    p.add_argument("--local-world-size", type=int, default=None,
                   help="ranks per node (default: train.planner.local_world_size, or all ranks on one node)")
    p.add_argument("--hbm-gb", type=float, default=None, help="GPU memory per rank, GiB (default: train.planner.hbm_gb)")
    p.add_argument("--ddr-gb", type=float, default=None,
                   help="host memory per rank, GiB (default: train.planner.ddr_gb)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size per rank (default: data.batch_size)")
    p.add_argument("--stage", choices=("mem", "tem"), default="mem", help="which stage's module to plan (default: mem)")
    p.add_argument("--compute-device", choices=COMPUTE_DEVICES, default=None,
                   help="device the ranks train on (default: train.planner.compute_device; auto: cuda if this machine has "
                        "a GPU, else cpu)")
    p.add_argument("--out", required=True, help="plan file to write (JSON)")


def _table(rows: Sequence[Dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain fixed-width table: columns are (key, header)."""
    cells = [[h for _, h in columns]] + [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i and _numeric(c) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _group_ranks(ranks: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Consecutive ranks with the same figures become one row ('8-15')."""
    out: List[Dict[str, Any]] = []
    for r in ranks:
        figures = {k: v for k, v in r.items() if k != "rank"}
        if out and out[-1]["_figures"] == figures and out[-1]["_last"] == r["rank"] - 1:
            out[-1]["_last"] = r["rank"]
        else:
            out.append({"_figures": figures, "_first": r["rank"], "_last": r["rank"], **figures})
    for row in out:
        row["ranks"] = str(row["_first"]) if row["_first"] == row["_last"] else f"{row['_first']}-{row['_last']}"
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _numeric(c: str) -> bool:
    return c.replace(",", "").replace(".", "").replace("-", "").isdigit()


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Plan, print, write; returns the exit code."""
    # torch / torchrec are imported here, not at module level, so building `mkt`'s parser stays cheap
    import torch

    from mkt_torchrec.planning.plan import (PlanDoesNotFit, attach_embedding_optimizer, check_topology,
                                            describe_plan, plan_module, resolve_compute_device, topology,
                                            write_plan)
    from mkt_torchrec.training.build import build_train_module

    if os.path.isdir(args.out):
        raise ValueError(f"{args.out}: is a directory; --out takes the plan file's path (e.g. {args.out}/plan.json)")
    pc = cfg.train.planner
    device = args.compute_device or resolve_compute_device(pc.compute_device)
    if args.compute_device is None:
        source = "from the config" if pc.compute_device != "auto" else "what this machine has"
        print(f"mkt plan: planning for compute device {device!r} ({source}; --compute-device cuda plans for GPUs "
              "on any machine)", file=sys.stderr)
    world = args.world_size
    local = args.local_world_size if args.local_world_size is not None else (pc.local_world_size or world)
    hbm = pc.hbm_gb if args.hbm_gb is None else args.hbm_gb
    ddr = pc.ddr_gb if args.ddr_gb is None else args.ddr_gb
    batch = cfg.data.batch_size if args.batch_size is None else args.batch_size
    try:
        check_topology(world, local, device, hbm, ddr)
        if batch < 1:
            raise ValueError(f"--batch-size must be positive, got {batch}")
    except ValueError as e:
        print(f"mkt plan: error: {e}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    module = build_train_module(cfg, args.stage, torch.device("meta"))
    attach_embedding_optimizer(module, cfg, args.stage)  # as the trainer does: the planner counts its state
    try:
        result = plan_module(module, cfg, world, local, device, hbm_gb=hbm, ddr_gb=ddr, batch_size=batch)
    except PlanDoesNotFit as e:
        print(f"mkt plan: {e}", file=sys.stderr)
        print(f"mkt plan: no plan written ({args.out})", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start

    topo = topology(world, local, device, hbm, ddr)
    tables, ranks = describe_plan(result.plan, module, topo, result.per_rank)
    print(f"stage {args.stage}: {len(tables)} tables on {world} ranks ({world // local} nodes x {local}), "
          f"{device}, {hbm:g} GiB HBM / {ddr:g} GiB DDR per rank, batch {batch} per rank")
    print(_table(tables, [("module", "module"), ("table", "table"), ("rows", "rows"), ("dim", "dim"),
                          ("gb", "GiB"), ("sharding_type", "sharding"), ("compute_kernel", "kernel"),
                          ("shards", "shards"), ("ranks", "ranks")]))
    print()
    print("per rank (the planner's estimate: tables incl. optimizer state and I/O buffers; "
          "reserved: margin, dense parameters, input batches):")
    print(_table(_group_ranks(ranks), [("ranks", "ranks"), ("hbm_gb", "HBM GiB"), ("hbm_reserved_gb", "reserved"),
                                       ("hbm_cap_gb", "HBM cap"), ("ddr_gb", "DDR GiB"),
                                       ("ddr_reserved_gb", "reserved"), ("ddr_cap_gb", "DDR cap")]))

    meta = {"world_size": world, "local_world_size": local, "compute_device": device, "stage": args.stage,
            "per_rank": ranks, "batch_size": batch, "hbm_gb": hbm, "ddr_gb": ddr, "config": args.config,
            "schema_digest": cfg.schema_digest(), "embedding_optimizer": cfg.train.embedding_optimizer,
            "search": result.search}
    write_plan(result.plan, module, args.out, meta)
    tier = "hbm_gb" if device == "cuda" else "ddr_gb"
    busiest = max(ranks, key=lambda r: r[tier])
    types: Counter[str] = Counter(t["sharding_type"] for t in tables)
    summary = {
        "plan": args.out, "stage": args.stage, "world_size": world, "local_world_size": local,
        "compute_device": device, "tables": len(tables), "sharding_types": dict(sorted(types.items())),
        "max_rank": busiest["rank"], f"max_rank_{tier}": busiest[tier], f"{tier[:3]}_cap_gb": busiest[f"{tier[:3]}_cap_gb"],
        "search": result.search, "plan_seconds": round(result.seconds, 3), "seconds": round(seconds, 3),
    }
    print(json.dumps(summary))
    return 0


def main(argv: List[str] | None = None) -> int:
    """``python -m mkt_torchrec.planning.cli --config C ...`` (the same as ``mkt plan``)."""
    from mkt_torchrec.config import ConfigError, load_config

    p = argparse.ArgumentParser(prog="mkt plan", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"mkt plan: config error: {e}", file=sys.stderr)
        return 2
    try:
        return run(args, cfg)
    except ValueError as e:
        print(f"mkt plan: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
