"""What a plan costs: estimated storage per rank and a readable summary of every table's sharding.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import nn
from torchrec.distributed.planner.types import (
    Topology,
)
from torchrec.distributed.types import (
    ParameterSharding,
    ShardingPlan,
)

from mkt_torchrec.planning.embedding_optimizer import optimizer_multiplier
from mkt_torchrec.planning.plan import shardable_modules, sharders, table_shapes, to_gb


def shards_of(ps: ParameterSharding) -> Optional[List[List[int]]]:
    if ps.sharding_spec is None:
        return None
    shards = getattr(ps.sharding_spec, "shards", None)
    if shards is None:
        raise ValueError(f"unsupported sharding spec {type(ps.sharding_spec).__name__}")
    out = []
    for md, rank in zip(shards, ps.ranks or []):
        out.append([int(md.shard_offsets[0]), int(md.shard_offsets[1]), int(md.shard_sizes[0]),
                    int(md.shard_sizes[1]), int(rank)])
    return out


def plan_device(plan: ShardingPlan) -> Optional[str]:
    for mplan in plan.plan.values():
        for ps in mplan.values():  # type: ignore[union-attr]
            if ps.sharding_spec is not None:
                for md in getattr(ps.sharding_spec, "shards", []):
                    return md.placement.device().type
    return None


def _ranges(ranks: Sequence[int]) -> str:
    """[0, 1, 2, 3, 8] -> '0-3,8'."""
    rs = sorted(set(ranks))
    parts: List[str] = []
    i = 0
    while i < len(rs):
        j = i
        while j + 1 < len(rs) and rs[j + 1] == rs[j] + 1:
            j += 1
        parts.append(str(rs[i]) if i == j else f"{rs[i]}-{rs[j]}")
        i = j + 1
    return ",".join(parts)


def estimate_usage(plan: ShardingPlan, module: nn.Module, world_size: int, compute_device: Optional[str] = None,
                   topo: Optional[Topology] = None) -> List[Dict[str, Any]]:
    """Per-rank table memory computed from the plan's shard sizes: fp32 weights plus the optimizer state the
    module's parameters carry (known for an unsharded module). On CUDA: HBM for fused / dense kernels, DDR for
    UVM kernels (a caching kernel also keeps about 20% in HBM); on CPU: DDR."""
    device = topo.compute_device if topo is not None else (compute_device or plan_device(plan) or "cpu")
    mults: Dict[Tuple[str, str], float] = {}
    for fqn, sub, sharder in shardable_modules(module, sharders()):
        for name, param in sharder.shardable_parameters(sub).items():
            mults[(fqn, name)] = optimizer_multiplier(param)
    shapes = table_shapes(module)
    hbm = [0.0] * world_size
    ddr = [0.0] * world_size
    for fqn, mplan in plan.plan.items():
        for name, ps in mplan.items():  # type: ignore[union-attr]
            mult = 1 + mults.get((fqn, name), 0.0)
            shards = shards_of(ps)
            if shards is None:  # data_parallel: the whole table on every rank
                rows, dim = shapes.get((fqn, name), (0, 0))
                shards = [[0, 0, rows, dim, r] for r in (ps.ranks or [])]
            for _, _, rows, cols, rank in shards:
                if not 0 <= rank < world_size:
                    continue
                b = rows * cols * 4 * mult
                if device != "cuda":
                    ddr[rank] += b
                elif ps.compute_kernel.startswith("fused_uvm"):
                    ddr[rank] += b
                    if ps.compute_kernel == "fused_uvm_caching":
                        hbm[rank] += 0.2 * b
                else:
                    hbm[rank] += b
    out = []
    for r in range(world_size):
        row: Dict[str, Any] = {"rank": r, "hbm_gb": to_gb(hbm[r]), "hbm_cap_gb": None,
                               "ddr_gb": to_gb(ddr[r]), "ddr_cap_gb": None}
        if topo is not None:
            row["hbm_cap_gb"] = to_gb(topo.devices[r].storage.hbm)
            row["ddr_cap_gb"] = to_gb(topo.devices[r].storage.ddr)
        out.append(row)
    return out


def describe_plan(plan: ShardingPlan, module: nn.Module, topology: Topology,
                  per_rank: Optional[List[Dict[str, Any]]] = None
                  ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Rows for printing: one per table (module, table, rows, dim, sharding type, kernel, ranks, size) and one
    per rank (HBM / DDR used vs capacity). ``per_rank`` is the planner's estimate (:class:`PlanResult`);
    without it the usage is :func:`estimate_usage`."""
    shapes = table_shapes(module)
    mults: Dict[Tuple[str, str], float] = {}
    for fqn, sub, sharder in shardable_modules(module, sharders()):
        for name, param in sharder.shardable_parameters(sub).items():
            mults[(fqn, name)] = optimizer_multiplier(param)
    tables = []
    for fqn, mplan in plan.plan.items():
        for name, ps in mplan.items():  # type: ignore[union-attr]
            rows, dim = shapes.get((fqn, name), (0, 0))
            tables.append({
                "module": fqn, "table": name, "rows": rows, "dim": dim, "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel, "ranks": _ranges(ps.ranks or []),
                "shards": len(ps.ranks or []), "gb": to_gb(rows * dim * 4 * (1 + mults.get((fqn, name), 0.0))),
            })
    tables.sort(key=lambda t: (-t["gb"], t["module"], t["table"]))
    ranks = per_rank if per_rank is not None else estimate_usage(plan, module, topology.world_size, topo=topology)
    return tables, list(ranks)
