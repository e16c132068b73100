"""``mkt plan``: shard a stage's embedding tables for a topology and write a plan file the trainer accepts.

    mkt plan --config configs/industrial.yaml --world-size 128 --local-world-size 8 --hbm-gb 80 --out plan.json
    mkt plan --config configs/industrial.yaml --compute-device cuda --local-world-size 8 \
        --compare world_size=8,16,32 sharding=auto,table_wise
    mkt plan --config configs/industrial.yaml --local-world-size 8 --compare cluster=a100-ib,h100-ib,h200-ib \
        world_size=128

The stage module is built on the meta device (nothing is allocated), so a GPU topology is planned on a
CPU-only machine. Prints the plan per table and per rank (storage and TorchRec's estimated embedding step time),
writes ``--out`` (atomically) and prints a one-line JSON summary last. ``--compare`` plans every combination of
the given world sizes, clusters and sharding strategies instead and prints one row each (nothing is written).
Memory sizes are GB (10^9 bytes); ``--cluster`` (or ``train.planner.cluster``) sets the HBM size and the
bandwidths the planner costs with (:mod:`mkt_torchrec.planning.cluster`).
The planner's cost model scales with the ids looked up per row: ``--data DIR`` takes them from the dataset's
manifest, ``train.planner.pooling_factors`` overrides them (see :func:`mkt_torchrec.planning.plan.resolve_pooling`).
World sizes are at most :data:`MAX_WORLD_SIZE` ranks.
Exit codes: 0 planned (or compared), 1 the model does not fit (nothing written), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from mkt_torchrec.config import COMPUTE_DEVICES, Config, ConfigError

if TYPE_CHECKING:
    from mkt_torchrec.planning.plan import Hardware, Pooling

SHARDING_CHOICES = ("auto", "data_parallel", "table_wise", "column_wise", "table_column_wise", "row_wise",
                    "table_row_wise", "grid_shard")
COMPARE_AXES = ("world_size", "cluster", "sharding")
# TorchRec's planner costs every table's shards on every rank, so its time grows with the ranks: the quickstart
# planned 1,024 ranks in 21 s and 4,096 in 55 s on a 2-core machine, and 100,000 ran for minutes printing nothing.
# 4,096 is 32 times the largest topology this project plans for (configs/industrial.yaml: 16 nodes x 8 GPUs).
MAX_WORLD_SIZE = 4096
CLUSTER_HELP = (
    "the GPU nodes to plan for (default: train.planner.cluster; without one TorchRec's default bandwidths). "
    "Presets, datasheet figures per GPU (HBM, HBM bandwidth, NVLink and PCIe per direction, one InfiniBand NIC): "
    "a100-ib (A100 SXM 80GB: 80 GB, 2.039 TB/s, 300 GB/s, HDR 200 Gb/s = 25 GB/s, PCIe 32 GB/s), "
    "h100-ib (H100 SXM: 80 GB, 3.35 TB/s, 450 GB/s, NDR 400 Gb/s = 50 GB/s, PCIe 64 GB/s), "
    "h200-ib (H200 SXM: 141 GB, 4.8 TB/s, 450 GB/s, 50 GB/s, PCIe 64 GB/s). "
    "Override figures of a preset: h100-ib:inter=25GB/s; or give them all: "
    "custom:hbm=80GB,hbm_bw=3.35TB/s,intra=450GB/s,inter=50GB/s[,pcie=64GB/s]. Sizes in GB (10^9 bytes), TB or "
    "GiB; bandwidths in GB/s, TB/s, GiB/s or Gb/s (bits), per GPU and direction. --hbm-gb overrides the "
    "cluster's HBM. Without --compute-device a cluster plans for cuda")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mkt plan``'s own flags (``--config`` / ``--set`` come from ``mkt_torchrec.cli``)."""
    p.add_argument("--world-size", type=int, default=None,
                   help="total ranks (GPUs or CPU processes); required unless --compare gives world_size=...")
    p.add_argument("--local-world-size", type=int, default=None,
                   help="ranks per node (default: train.planner.local_world_size, or all ranks on one node)")
    p.add_argument("--cluster", default=None, metavar="PRESET|PRESET:key=value,...|custom:...", help=CLUSTER_HELP)
    p.add_argument("--hbm-gb", type=float, default=None,
                   help="GPU memory per rank, GB = 10^9 bytes as on the datasheet, e.g. 80 for an 80 GB H100; the "
                        "planner keeps 15%% of it free for the CUDA context and allocator (default: "
                        "train.planner.hbm_gb, else the cluster's, else 80)")
    p.add_argument("--ddr-gb", type=float, default=None,
                   help="host memory per rank the job may use, GB = 10^9 bytes (default: train.planner.ddr_gb)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size per rank (default: data.batch_size)")
    p.add_argument("--stage", choices=("mem", "tem"), default="mem", help="which stage's module to plan (default: mem)")
    p.add_argument("--compute-device", choices=COMPUTE_DEVICES, default=None,
                   help="device the ranks train on (default: train.planner.compute_device; auto: cuda if this machine has "
                        "a GPU, else cpu)")
    p.add_argument("--data", default=None,
                   help="dataset directory (from mkt synth / mkt tenrec) whose manifest's measured mean ids per row "
                        "(train split) become the planner's pooling factors; train.planner.pooling_factors "
                        "overrides them. Without it a sequence is planned at its max_len (an upper bound)")
    p.add_argument("--compare", nargs="+", action="extend", default=None, metavar="AXIS=V1,V2",
                   help="plan every combination of the given values side by side and print one row each (step "
                        "time, imbalance, fullest rank's HBM / DDR, fits or why not) instead of writing a plan. "
                        "Axes: world_size=N,... (replaces --world-size), cluster=C,... (replaces --cluster; "
                        "presets or specs as for --cluster) and sharding=S,... (auto: the planner "
                        f"chooses; or one of {', '.join(SHARDING_CHOICES[1:])}: every table that way where its "
                        "collection and device allow it; default: train.planner.sharding_type). Examples: "
                        "--compare world_size=8,16,32 sharding=auto,table_wise,column_wise (6 rows); "
                        "--compare cluster=a100-ib,h100-ib,h200-ib world_size=128 (3 rows)")
    p.add_argument("--out", default=None, help="plan file to write (JSON); required unless --compare")


def _table(rows: Sequence[Dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain fixed-width table: columns are (key, header)."""
    cells = [[h for _, h in columns]] + [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i and _numeric(c) else c.ljust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
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


def _cluster_values(text: str) -> List[str]:
    """``a100-ib,custom:hbm=80GB,hbm_bw=3TB/s,...,h100-ib`` -> one spec each: a part with ``=`` but no ``:``
    continues the spec before it."""
    specs: List[str] = []
    for part in (p.strip() for p in text.split(",")):
        if part and "=" in part and ":" not in part and specs:
            specs[-1] += "," + part
        elif part:
            specs.append(part)
    return specs


def parse_compare(items: Sequence[str]) -> Dict[str, List[Any]]:
    """``["world_size=8,16", "sharding=auto,row_wise"]`` -> ``{"world_size": [8, 16], "sharding": ["auto",
    "row_wise"]}`` (an axis given twice gets both lists, duplicates dropped). ``cluster=`` takes presets and
    specs (``cluster=a100-ib,h100-ib:inter=25GB/s``), checked here.

    Raises:
        ValueError: an unknown axis, a missing value, a world size that is not a positive int, an unknown sharding,
            a bad cluster spec.
    """
    from mkt_torchrec.planning.cluster import parse_cluster

    axes: Dict[str, List[Any]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in COMPARE_AXES:
            raise ValueError(f"--compare {item!r}: expected AXIS=V1,V2,... with AXIS one of {list(COMPARE_AXES)}, "
                             f"e.g. --compare world_size=8,16,32 sharding=auto,table_wise")
        values = _cluster_values(text) if name == "cluster" else [v.strip() for v in text.split(",") if v.strip()]
        if not values:
            raise ValueError(f"--compare {item!r}: no values after {name}=")
        if name == "world_size":
            bad = [v for v in values
                   if not (v.isascii() and v.isdigit() and len(v) < 9 and 1 <= int(v) <= MAX_WORLD_SIZE)]
            if bad:
                raise ValueError(f"--compare {item[:80]!r}: world sizes must be positive ints, at most "
                                 f"{MAX_WORLD_SIZE} (mkt plan's limit), got {bad[0][:20]!r}")
            values = [int(v) for v in values]
        elif name == "cluster":
            for v in values:
                try:
                    parse_cluster(v)
                except ValueError as e:
                    raise ValueError(f"--compare {item!r}: cluster {v!r}: {e}") from None
        else:
            bad = [v for v in values if v not in SHARDING_CHOICES]
            if bad:
                raise ValueError(f"--compare {item!r}: unknown sharding {bad[0]!r}; expected one of "
                                 f"{list(SHARDING_CHOICES)}")
        axes.setdefault(name, [])
        axes[name].extend(v for v in values if v not in axes[name])
    return axes


def _pooling_from_data(data_dir: Optional[str], cfg: Config) -> Dict[str, float]:
    """The measured mean ids per row of ``data_dir``'s train split ({} without --data)."""
    if data_dir is None:
        return {}
    from mkt_torchrec.data.dataset import open_dataset
    from mkt_torchrec.planning.plan import manifest_pooling

    measured = manifest_pooling(open_dataset(data_dir, cfg.schema, check_files=False))
    if not measured:
        print(f"mkt plan: {data_dir}: the manifest records no mean lengths of the train split (a dataset written "
              "before they were measured): planning with the defaults", file=sys.stderr)
    return measured


def _describe_pooling(pooling: Pooling) -> str:
    """'ids per row (pooling factors): config: a 3; manifest: b 1, c 24.5; default (...): d 50'."""
    by_source: Dict[str, List[str]] = {}
    for key, value in pooling.factors.items():
        by_source.setdefault(pooling.sources[key], []).append(f"{key} {value:.3g}")
    labels = {"config": "train.planner.pooling_factors", "manifest": "measured (--data)",
              "default": "default (1 per feature, max_len per sequence: an upper bound)"}
    parts = [f"{labels[src]}: {', '.join(by_source[src])}" for src in ("config", "manifest", "default")
             if src in by_source]
    return "ids per row (the planner's pooling factors): " + "; ".join(parts)


def _describe_estimate(est: Dict[str, Any]) -> str:
    imb = est.get("imbalance", {})
    lines = [f"estimated embedding step time (TorchRec's cost model; the dense part is not modelled): slowest rank "
             f"{_fmt(est.get('max_rank_ms'))} ms (rank {est.get('max_rank')}), mean {_fmt(est.get('mean_rank_ms'))} ms"]
    if est.get("critical_path_ms") is not None:
        lines.append(f"critical path (ranks synchronise after each compute phase and all-to-all): "
                     f"{_fmt(est['critical_path_ms'])} ms = compute {_fmt(est['critical_path_compute_ms'])} + comms "
                     f"{_fmt(est['critical_path_comms_ms'])}")
    lines.append(f"imbalance (max / mean over ranks): step time {_fmt(imb.get('perf'))}, HBM {_fmt(imb.get('hbm'))}, "
                 f"DDR {_fmt(imb.get('ddr'))}")
    return "\n".join(lines)


def _resolve_topology(args: argparse.Namespace, cfg: Config, clusters: Sequence[Optional[str]] = ()
                      ) -> Tuple[str, Hardware, int]:
    """(compute device, hardware, per-rank batch) from the flags and ``train.planner``; ``clusters``: the
    ``--compare cluster=`` values. A cluster without ``--compute-device`` or ``train.planner.compute_device``
    plans for cuda."""
    from mkt_torchrec.planning.plan import resolve_compute_device, resolve_hardware

    pc = cfg.train.planner
    if args.compute_device is not None:
        device = args.compute_device
    elif pc.compute_device == "auto" and (args.cluster or pc.cluster or any(clusters)):
        device = "cuda"
        print("mkt plan: planning for compute device 'cuda' (a cluster is given)", file=sys.stderr)
    else:
        device = resolve_compute_device(pc.compute_device)
        source = "from the config" if pc.compute_device != "auto" else "what this machine has"
        print(f"mkt plan: planning for compute device {device!r} ({source}; --compute-device cuda plans for GPUs "
              "on any machine)", file=sys.stderr)
    hardware = resolve_hardware(cfg, args.cluster, args.hbm_gb, args.ddr_gb)
    batch = cfg.data.batch_size if args.batch_size is None else args.batch_size
    return device, hardware, batch


def _describe_hardware(device: str, hardware: Hardware) -> str:
    if device != "cuda":
        ignored = f" ({hardware.cluster.name} applies to cuda only)" if hardware.cluster else ""
        return f"{hardware.ddr_gb:g} GB memory per rank{ignored}"
    return hardware.describe()


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Plan, print, write (or compare and print); returns the exit code."""
    try:
        axes = parse_compare(args.compare) if args.compare else None
        if axes is None and args.out is None:
            raise ValueError("--out is required (the plan file to write), unless --compare")
        if axes is not None and args.out is not None:
            raise ValueError("--compare writes no plan file: drop --out, and plan the chosen candidate without "
                             "--compare to write it")
        if args.world_size is None and not (axes and "world_size" in axes):
            raise ValueError("--world-size is required (or --compare world_size=N,...)")
        if args.world_size is not None and args.world_size > MAX_WORLD_SIZE:
            raise ValueError(f"--world-size {args.world_size}: at most {MAX_WORLD_SIZE} ranks (mkt plan's limit: "
                             "planning time grows with the ranks)")
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    except ValueError as e:
        print(f"mkt plan: error: {e}", file=sys.stderr)
        return 2
    from mkt_torchrec.planning.cluster import parse_cluster
    from mkt_torchrec.planning.plan import resolve_hardware, resolve_pooling

    try:
        if args.cluster is not None:
            parse_cluster(args.cluster)
    except ValueError as e:
        print(f"mkt plan: error: --cluster {args.cluster!r}: {e}", file=sys.stderr)
        return 2
    try:
        resolve_hardware(cfg)  # train.planner.cluster
    except ConfigError as e:
        print(f"mkt plan: config error: {e}", file=sys.stderr)
        return 2
    try:
        measured = _pooling_from_data(args.data, cfg)
    except (OSError, ValueError) as e:
        print(f"mkt plan: error: --data {args.data}: {e}", file=sys.stderr)
        return 2
    try:
        pooling = resolve_pooling(cfg, measured)
    except ConfigError as e:
        print(f"mkt plan: config error: {e}", file=sys.stderr)
        return 2
    if axes is not None:
        return _run_compare(args, cfg, axes, measured, pooling)
    return _run_one(args, cfg, measured, pooling)


def _stage_module(cfg: Config, stage: str) -> Any:
    # torch / torchrec are imported here, not at module level, so building `mkt`'s parser stays cheap
    import torch

    from mkt_torchrec.planning.embedding_optimizer import attach_embedding_optimizer
    from mkt_torchrec.models.build import build_train_module

    module = build_train_module(cfg, stage, torch.device("meta"))
    attach_embedding_optimizer(module, cfg, stage)  # as the trainer does: the planner counts its state
    return module


def _run_one(args: argparse.Namespace, cfg: Config, measured: Dict[str, float], pooling: Pooling) -> int:
    from mkt_torchrec.planning.describe import describe_plan
    from mkt_torchrec.planning.plan import PlanDoesNotFit, check_topology, plan_module, topology
    from mkt_torchrec.planning.plan_file import write_plan

    if os.path.isdir(args.out):
        raise ValueError(f"{args.out}: is a directory; --out takes the plan file's path (e.g. {args.out}/plan.json)")
    device, hardware, batch = _resolve_topology(args, cfg)
    hbm, ddr = hardware.hbm_gb, hardware.ddr_gb
    world = args.world_size
    pc_local = cfg.train.planner.local_world_size
    local = args.local_world_size if args.local_world_size is not None else (pc_local or world)
    try:
        check_topology(world, local, device, hbm, ddr)
    except ValueError as e:
        print(f"mkt plan: error: {e}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    module = _stage_module(cfg, args.stage)
    try:
        result = plan_module(module, cfg, world, local, device, hbm_gb=hbm, ddr_gb=ddr, batch_size=batch,
                             pooling=measured, cluster=args.cluster)
    except PlanDoesNotFit as e:
        print(f"mkt plan: {e}", file=sys.stderr)
        print(f"mkt plan: no plan written ({args.out})", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start

    topo = topology(world, local, device, hbm, ddr, hardware.cluster)
    tables, ranks = describe_plan(result.plan, module, topo, result.per_rank)
    print(f"stage {args.stage}: {len(tables)} tables on {world} ranks ({world // local} nodes x {local}), "
          f"{device}, {_describe_hardware(device, hardware)}; batch {batch} per rank")
    print(_describe_pooling(pooling))
    print(_table(tables, [("module", "module"), ("table", "table"), ("rows", "rows"), ("dim", "dim"),
                          ("gb", "GB"), ("sharding_type", "sharding"), ("compute_kernel", "kernel"),
                          ("shards", "shards"), ("ranks", "ranks")]))
    print()
    print("per rank (the planner's estimate: tables incl. optimizer state and I/O buffers; "
          "reserved: margin, dense parameters, input batches; step time of the embeddings in ms):")
    print(_table(_group_ranks(ranks), [("ranks", "ranks"), ("hbm_gb", "HBM GB"), ("hbm_reserved_gb", "reserved"),
                                       ("hbm_cap_gb", "HBM cap"), ("ddr_gb", "DDR GB"),
                                       ("ddr_reserved_gb", "reserved"), ("ddr_cap_gb", "DDR cap"),
                                       ("est_ms", "step ms"), ("fwd_compute_ms", "fwd comp"),
                                       ("fwd_comms_ms", "fwd comms"), ("bwd_compute_ms", "bwd comp"),
                                       ("bwd_comms_ms", "bwd comms"), ("prefetch_ms", "prefetch")]))
    print()
    print(_describe_estimate(result.estimate))

    meta = {"world_size": world, "local_world_size": local, "compute_device": device, "stage": args.stage,
            "per_rank": ranks, "batch_size": batch, "hbm_gb": hbm, "ddr_gb": ddr,
            "cluster": hardware.cluster.name if hardware.cluster else None, "config": args.config,
            "schema_digest": cfg.schema_digest(), "embedding_optimizer": cfg.train.embedding_optimizer,
            "search": result.search, "estimate": result.estimate,
            "pooling_factors": pooling.factors, "pooling_sources": pooling.sources}
    write_plan(result.plan, module, args.out, meta)
    tier = "hbm_gb" if device == "cuda" else "ddr_gb"
    busiest = max(ranks, key=lambda r: r[tier])
    types: Counter[str] = Counter(t["sharding_type"] for t in tables)
    est = result.estimate
    summary = {
        "plan": args.out, "stage": args.stage, "world_size": world, "local_world_size": local,
        "compute_device": device, "cluster": hardware.cluster.name if hardware.cluster else None,
        "tables": len(tables), "sharding_types": dict(sorted(types.items())),
        "max_rank": busiest["rank"], f"max_rank_{tier}": busiest[tier], f"{tier[:3]}_cap_gb": busiest[f"{tier[:3]}_cap_gb"],
        "max_rank_ms": est.get("max_rank_ms"), "critical_path_ms": est.get("critical_path_ms"),
        "imbalance": est.get("imbalance"),
        "search": result.search, "plan_seconds": round(result.seconds, 3), "seconds": round(seconds, 3),
    }
    print(json.dumps(summary))
    return 0


def _run_compare(args: argparse.Namespace, cfg: Config, axes: Dict[str, List[Any]], measured: Dict[str, float],
                 pooling: Pooling) -> int:
    from mkt_torchrec.planning.plan import Candidate, compare_plans, resolve_hardware

    clusters: List[Optional[str]] = axes.get("cluster") or [args.cluster]
    device, hardware, batch = _resolve_topology(args, cfg, clusters)
    worlds = axes.get("world_size") or [args.world_size]
    shardings = axes.get("sharding") or [cfg.train.planner.sharding_type or "auto"]
    local = args.local_world_size if args.local_world_size is not None else (cfg.train.planner.local_world_size or None)
    candidates = [Candidate(w, "" if s == "auto" else s, c) for w in worlds for c in clusters for s in shardings]

    start = time.perf_counter()
    module = _stage_module(cfg, args.stage)
    rows = compare_plans(module, cfg, candidates, local, device, hbm_gb=args.hbm_gb, ddr_gb=args.ddr_gb,
                         batch_size=batch, pooling=measured)
    seconds = time.perf_counter() - start

    print(f"stage {args.stage}: {len(rows)} candidates, {device}, {hardware.ddr_gb:g} GB DDR per rank, "
          f"batch {batch} per rank")
    if device == "cuda":
        for c in clusters:
            print(resolve_hardware(cfg, c, args.hbm_gb, args.ddr_gb).describe())
    print(_describe_pooling(pooling))
    shown = []
    for r in rows:
        nodes = f"{r['world_size'] // r['local_world_size']} x {r['local_world_size']}" if r["world_size"] % \
            r["local_world_size"] == 0 else "-"
        shown.append({**r, "nodes": nodes, "fits": "yes" if r["fits"] else "no", "reason": r.get("reason", "")})
    print(_table(shown, [("world_size", "world"), ("nodes", "nodes x ranks"), ("cluster", "cluster"),
                         ("sharding", "sharding"), ("chosen", "chosen"), ("fits", "fits"),
                         ("critical_path_ms", "step ms"), ("max_rank_ms", "slowest rank ms"),
                         ("imbalance", "imbalance"), ("hbm_cap_gb", "HBM cap GB"), ("max_hbm_gb", "max HBM GB"),
                         ("max_ddr_gb", "max DDR GB"), ("reason", "why not")]))
    print("step ms: TorchRec's critical-path estimate of the embeddings' forward + backward per step (ranks "
          "synchronise after each phase); slowest rank ms: the slowest rank's own total; imbalance: max / mean of "
          "the ranks' step times; max HBM / DDR: the fullest rank's tables incl. optimizer state and I/O buffers")
    print(json.dumps({"stage": args.stage, "compute_device": device, "hbm_gb": args.hbm_gb,
                      "ddr_gb": hardware.ddr_gb, "batch_size": batch, "compare": rows,
                      "seconds": round(seconds, 3)}))
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
