"""Sharding plans: TorchRec's planner for a topology (plan files: ``plan_file``; what a plan costs: ``describe``; the
embedding optimizer fused before planning: ``embedding_optimizer``).

The stage module (``build_train_module``) is built on the meta device, so a 128-GPU topology is planned on a
CPU-only machine in seconds. :func:`make_plan` is what the trainer calls (collectively when given a process
group: rank 0 plans, every rank gets the same plan); ``mkt plan`` (``mkt_torchrec.planning.cli``) calls
:func:`plan_module` for the per-rank storage as well and writes the plan with ``plan_file.write_plan``;
``plan_file.load_plan`` turns the file back into a ``ShardingPlan`` for the trainer.

Search. The planner enumerates every (sharding type, compute kernel) option of every table and estimates the
cost of every shard of each option; with 128 ranks that is slow (about 30 s for the industrial stage-2 model,
two copies of every table). The first search therefore (1) replicates tiny tables (at most
``REPLICATE_MAX_BYTES`` of weights: data_parallel, which is what the planner picks for them anyway) and
(2) on CUDA keeps every other table in HBM (kernels ``fused`` / ``dense``). Only when that finds no plan does a
second, unrestricted search run, which may offload tables to host memory through UVM (``fused_uvm``,
``fused_uvm_caching``). On CPU the first search already has every option but (1). TorchRec's grid search over
all option combinations runs only while it has at most ``GRID_SEARCH_BUDGET / world_size`` proposals (each
costs a partition over every rank); the greedy and uniform proposers always run. Planned this way the industrial
config on 128 GPUs gives the same plan as TorchRec's default search (2 s instead of 11 s for stage 1), and the
quickstart on 2 CPU ranks a plan the planner's own cost model rates better (grid search becomes affordable).

Storage. The planner counts the optimizer state of a table from ``param._optimizer_classes`` (set by
``apply_optimizer_in_backward``); :func:`attach_embedding_optimizer` does that the way the trainer does, so
``mkt plan`` and the trainer plan the same module. A module without it is planned as weights only.

Hardware. HBM / DDR per rank are GB (10^9 bytes, as vendors sell GPU memory); the planner's storage reservation
keeps ``RESERVE_PERCENTAGE`` of HBM free (CUDA context, allocator, communication buffers), so the capacity is the
datasheet's. The bandwidths are TorchRec's defaults unless a cluster is given (``train.planner.cluster``,
``mkt plan --cluster``): a preset such as ``h100-ib`` or a custom spec (:mod:`mkt_torchrec.planning.cluster`);
:func:`resolve_hardware` is the one place the trainer and ``mkt plan`` read them from.

Workload. TorchRec's cost model (shard perf, I/O buffers, the input-batch reservation) scales with each feature's
pooling factor, the mean ids looked up per row, and with the batch size. Every table gets a constraint with one
pooling factor per feature it serves (in its ``feature_names`` order) and the per-rank batch size per feature:
``train.planner.pooling_factors``, else the training data's measured mean (``pooling=`` of :func:`make_plan`,
``mkt plan --data``), else 1 per single-valued feature and max_len per sequence (:func:`resolve_pooling`).
Without them a 50-long behaviour sequence would be planned like one id.

Estimates. The planner attaches a perf estimate (ms: forward / backward compute and comms, prefetch) and a
storage estimate to every shard of the options it chooses; :func:`step_estimate` sums them per rank and gives the
slowest rank, TorchRec's critical path and the imbalance over ranks. They cover the embeddings only (not the dense
part of a step) and stage 2's frozen MEM tables are costed with a backward they do not run.

Plan file (JSON, ``format: mkt-plan-v1``)::

    {"format": "mkt-plan-v1", "world_size": 128, "local_world_size": 8, "compute_device": "cuda",
     "stage": "mem",
     "modules": {"model.sparse_arch.ec": {"item_id": {"sharding_type": "row_wise", "compute_kernel": "fused",
                                                      "ranks": [0, 1, ...], "rows": 300000000, "dim": 8,
                                                      "shards": [[row_offset, col_offset, rows, cols, rank], ...]}}},
     "per_rank": [{"rank": 0, "hbm_gb": 3.1, "hbm_cap_gb": 80.0, "ddr_gb": 0.0, "ddr_cap_gb": 128.0,
                   "est_ms": 2.27, "fwd_compute_ms": ..., "fwd_comms_ms": ..., "bwd_compute_ms": ...,
                   "bwd_comms_ms": ..., "prefetch_ms": ...}, ...],
     "estimate": {"max_rank_ms": 2.27, "max_rank": 0, "mean_rank_ms": 2.2, "critical_path_ms": 2.27, ...,
                  "imbalance": {"perf": 1.01, "hbm": 1.2, "ddr": null}},
     "pooling_factors": {"item_id": 1.0, "hist_source_items": 50.0, ...}, "pooling_sources": {...}, ...}

``shards`` is null for data_parallel tables. Sizes are GB (10^9 bytes, as GPU memory is sold). ``mkt plan`` writes ``estimate`` and
the pooling keys; :func:`load_plan` reads none of them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.collective_utils import invoke_on_rank_and_broadcast_result
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner import stats as planner_stats
from torchrec.distributed.planner.proposers import (
    GreedyProposer,
    GridSearchProposer,
    UniformProposer,
)
from torchrec.distributed.planner.storage_reservations import (
    HeuristicalStorageReservation,
)
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    Perf,
    PlannerError,
    ShardingOption,
    Stats,
    Topology,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import (
    ModuleSharder,
    ShardingPlan,
)

from mkt_torchrec.config import COMPUTE_DEVICES, Config, ConfigError
from mkt_torchrec.planning.cluster import Cluster, parse_cluster
from mkt_torchrec.planning.embedding_optimizer import optimizer_multiplier

FORMAT = "mkt-plan-v1"


GB = 1e9  # sizes in, and out, are GB as vendors publish them (an "80 GB" GPU: hbm_gb=80)


DEFAULT_HBM_GB = 80.0  # HBM per rank without train.planner.hbm_gb, --hbm-gb or a cluster


REPLICATE_MAX_BYTES = 1 << 20  # tables with at most this many bytes of fp32 weights are replicated (first search)


RESERVE_PERCENTAGE = 0.15  # the planner's safety margin per rank (HeuristicalStorageReservation)


GRID_SEARCH_BUDGET = 20000  # grid search runs when it has at most BUDGET / world_size proposals


_HBM_KERNELS = ["dense", "fused"]


_ROW_SPLIT_TYPES = ("row_wise", "table_row_wise", "grid_shard")


class PlanDoesNotFit(ValueError):
    """The planner found no plan; the message says by how much the model does not fit and names the largest
    tables. ``reason`` is the verdict alone (e.g. ``short by 3.20 GB (0.40 GB per rank); ...``)."""

    reason: str = ""


# --------------------------------------------------------------------------------------------------------
# Sharders, topology, tables
# --------------------------------------------------------------------------------------------------------


def sharders() -> List[ModuleSharder[nn.Module]]:
    """The sharders of the stage modules; pass the same list to ``DistributedModelParallel``."""
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]  # type: ignore[list-item]


def resolve_compute_device(choice: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cpu`` / ``cuda`` unchanged."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice not in COMPUTE_DEVICES:
        raise ValueError(f"compute device {choice!r}: expected one of {['auto', *COMPUTE_DEVICES]}")
    return choice


def check_topology(world_size: int, local_world_size: int, compute_device: str, hbm_gb: float,
                   ddr_gb: float) -> None:
    """Raise ValueError with a readable message for an impossible topology."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(local_world_size, int) or local_world_size < 1:
        raise ValueError(f"local_world_size must be a positive int, got {local_world_size!r}")
    if local_world_size > world_size:
        raise ValueError(f"local_world_size {local_world_size} is larger than world_size {world_size}")
    if world_size % local_world_size:
        raise ValueError(f"world_size {world_size} is not a multiple of local_world_size {local_world_size}: "
                         f"every node must run the same number of ranks")
    if compute_device not in COMPUTE_DEVICES:
        raise ValueError(f"compute device {compute_device!r}: expected one of {list(COMPUTE_DEVICES)}")
    if compute_device == "cuda" and not hbm_gb > 0:
        raise ValueError(f"hbm_gb must be positive for a cuda topology, got {hbm_gb}")
    if not ddr_gb > 0:
        raise ValueError(f"ddr_gb must be positive, got {ddr_gb}")


def topology(world_size: int, local_world_size: int, compute_device: str, hbm_gb: float,
             ddr_gb: float, cluster: Optional[Cluster] = None) -> Topology:
    """TorchRec's Topology: ``world_size`` ranks, ``local_world_size`` per node, per-rank HBM / DDR in GB (10^9
    bytes). ``cluster`` sets the bandwidths on cuda (bytes per ms, TorchRec's unit); without it, or on cpu,
    TorchRec's defaults. No headroom is taken off ``hbm_gb`` here: the planner's storage reservation keeps
    ``RESERVE_PERCENTAGE`` of it free (CUDA context, allocator, NCCL buffers), then the dense part and the batch."""
    check_topology(world_size, local_world_size, compute_device, hbm_gb, ddr_gb)
    hardware, kernel = None, KernelConfig(compute_device=compute_device)
    if cluster is not None and compute_device == "cuda":
        hardware = HardwareConfig(**cluster.topology_bandwidths())
        kernel = KernelConfig(compute_device=compute_device, use_hardware_based_bandwidth=True)
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world_size, local_world_size=local_world_size,
                                     hbm_cap_bytes=int(hbm_gb * GB), ddr_cap_bytes=int(ddr_gb * GB)),
        hardware_config=hardware, kernel_config=kernel,
    )


@dataclass(frozen=True)
class Hardware:
    """What one rank has: a cluster (None: TorchRec's default bandwidths) and HBM / DDR in GB."""

    cluster: Optional[Cluster]
    hbm_gb: float
    ddr_gb: float

    def describe(self) -> str:
        what = self.cluster.describe() if self.cluster is not None else "TorchRec's default bandwidths (no cluster)"
        return f"{self.hbm_gb:g} GB HBM / {self.ddr_gb:g} GB DDR per rank; {what}"


def resolve_hardware(cfg: Config, cluster: Optional[str] = None, hbm_gb: Optional[float] = None,
                     ddr_gb: Optional[float] = None) -> Hardware:
    """The hardware to plan for: ``cluster`` (a spec, see :mod:`mkt_torchrec.planning.cluster`), else
    ``train.planner.cluster``; HBM from ``hbm_gb``, else ``train.planner.hbm_gb``, else the cluster's, else
    ``DEFAULT_HBM_GB``; DDR from ``ddr_gb``, else ``train.planner.ddr_gb``.

    Raises:
        ValueError: a bad ``cluster`` spec (one line naming the bad part).
        ConfigError: a bad ``train.planner.cluster``.
    """
    pc = cfg.train.planner
    if cluster is not None:
        try:
            resolved: Optional[Cluster] = parse_cluster(cluster)
        except ValueError as e:
            raise ValueError(f"cluster {cluster!r}: {e}") from None
    elif pc.cluster is not None:
        try:
            resolved = parse_cluster(pc.cluster)
        except ValueError as e:
            raise ConfigError(f"train.planner.cluster: {e}") from None
    else:
        resolved = None
    hbm = next(v for v in (hbm_gb, pc.hbm_gb, resolved.hbm_gb if resolved else None, DEFAULT_HBM_GB)
               if v is not None)
    return Hardware(resolved, float(hbm), float(pc.ddr_gb if ddr_gb is None else ddr_gb))


@dataclass
class TableInfo:
    """One shardable table of the module being planned."""

    module: str  # FQN of its EmbeddingBagCollection / EmbeddingCollection
    name: str
    rows: int
    dim: int
    optimizer: Optional[str]  # class name of the fused optimizer, None for a frozen table
    bytes: int  # fp32 weights + optimizer state
    sharding_types: List[str] = field(default_factory=list)  # what its sharder offers on the compute device
    unpooled: bool = False  # in an EmbeddingCollection (sequences)

    @property
    def weight_bytes(self) -> int:
        return self.rows * self.dim * 4


def shardable_modules(module: nn.Module, sharder_list: Sequence[ModuleSharder[nn.Module]]
                       ) -> Iterator[Tuple[str, nn.Module, ModuleSharder[nn.Module]]]:
    """(fqn, submodule, sharder) of every submodule a sharder shards (as DistributedModelParallel finds them)."""
    by_type = {s.module_type: s for s in sharder_list}

    def walk(prefix: str, m: nn.Module) -> Iterator[Tuple[str, nn.Module, ModuleSharder[nn.Module]]]:
        s = by_type.get(type(m))
        if s is not None:
            yield prefix, m, s
            return
        for name, child in m.named_children():
            yield from walk(f"{prefix}.{name}" if prefix else name, child)

    yield from walk("", module)


def table_infos(module: nn.Module, compute_device: str,
                sharder_list: Optional[Sequence[ModuleSharder[nn.Module]]] = None) -> List[TableInfo]:
    """Every shardable table of an unsharded module, with its size (weights + optimizer state)."""
    out = []
    for fqn, sub, sharder in shardable_modules(module, sharder_list or sharders()):
        types = list(sharder.sharding_types(compute_device))
        for name, param in sharder.shardable_parameters(sub).items():
            rows, dim = int(param.shape[0]), int(param.shape[1])
            classes = getattr(param, "_optimizer_classes", None)
            mult = optimizer_multiplier(param)
            out.append(TableInfo(fqn, name, rows, dim, classes[0].__name__ if classes else None,
                                 int(math.ceil(rows * dim * 4 * (1 + mult))), types,
                                 isinstance(sharder, EmbeddingCollectionSharder)))
    return out


def table_shapes(module: nn.Module) -> Dict[Tuple[str, str], Tuple[int, int]]:
    """(module fqn, table) -> (rows, dim) for unsharded and sharded (DMP) embedding collections."""
    shapes: Dict[Tuple[str, str], Tuple[int, int]] = {}

    def walk(prefix: str, m: nn.Module) -> None:
        configs = None
        if isinstance(m, EmbeddingBagCollection):
            configs = m.embedding_bag_configs()
        elif isinstance(m, EmbeddingCollection):
            configs = m.embedding_configs()
        elif type(m).__name__.startswith("Sharded"):
            configs = getattr(m, "_embedding_bag_configs", None) or getattr(m, "_embedding_configs", None)
        if configs:
            for c in configs:
                shapes[(prefix, c.name)] = (int(c.num_embeddings), int(c.embedding_dim))
            return
        for name, child in m.named_children():
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", module)
    return shapes


def _dense_bytes_estimate(module: nn.Module, sharder_list: Sequence[ModuleSharder[nn.Module]]) -> int:
    """TorchRec's heuristic for the non-embedding part: 6 x its parameter bytes (weights, optimizer, DDP)."""
    sparse = {id(p) for _, sub, _ in shardable_modules(module, sharder_list) for p in sub.parameters()}
    dense = sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in sparse)
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return 6 * dense + buffers


# --------------------------------------------------------------------------------------------------------
# Workload: ids looked up per sample
# --------------------------------------------------------------------------------------------------------

MIN_POOLING = 0.01  # a measured mean below this (a feature that is almost always null) is planned as this


@dataclass(frozen=True)
class Pooling:
    """Mean ids looked up per row (TorchRec's pooling factor) of every sparse key, and where each came from:
    ``config`` (``train.planner.pooling_factors``), ``manifest`` (the dataset's measured mean of the train
    split) or ``default`` (1 for a single-valued feature, max_len for a sequence: an upper bound, so a plan
    without measurements over- rather than under-estimates the sequences' cost)."""

    factors: Dict[str, float]
    sources: Dict[str, str]


def manifest_pooling(manifest: Any) -> Dict[str, float]:
    """The measured mean lengths of a dataset manifest's train split (sparse key -> mean ids per row); empty
    for a manifest written before datasets recorded them."""
    by_split = getattr(manifest, "mean_lengths", None) or {}
    return dict(by_split.get("train") or {})


def resolve_pooling(cfg: Config, measured: Optional[Mapping[str, float]] = None) -> Pooling:
    """Every sparse key's pooling factor: ``train.planner.pooling_factors``, else ``measured`` (e.g.
    :func:`manifest_pooling`), else the default (see :class:`Pooling`). Measured values are clipped to
    [``MIN_POOLING``, the key's bound]: 1 for a single-valued feature, max_len for a sequence (the reader keeps
    the latest max_len elements); unknown keys and non-finite values in ``measured`` are ignored.

    Raises:
        ConfigError: a configured key that is not a sparse key of the schema, or a value above its bound.
    """
    schema = cfg.schema
    bounds = {f: 1.0 for f in schema.features}
    bounds.update({key: float(schema.max_len_of(key)) for key in list(schema.sequences) + schema.side_keys})
    configured = cfg.train.planner.pooling_factors
    for key, value in configured.items():
        where = f"train.planner.pooling_factors.{key}"
        if key not in bounds:
            raise ConfigError(f"{where}: not a feature or sequence of the schema; expected one of {sorted(bounds)}")
        if value > bounds[key]:
            what = (f"sequence with max_len {bounds[key]:g}" if key in schema.sequences
                    else f"side column with max_len {bounds[key]:g}" if key in schema.side_keys
                    else "single-valued feature")
            raise ConfigError(f"{where}: {value:g} ids per row, but {key} is a {what}: at most {bounds[key]:g}")
    factors: Dict[str, float] = {}
    sources: Dict[str, str] = {}
    for key in schema.sparse_keys:
        value = (measured or {}).get(key)
        if key in configured:
            factors[key], sources[key] = float(configured[key]), "config"
        elif isinstance(value, (int, float)) and math.isfinite(value):
            factors[key], sources[key] = min(max(float(value), MIN_POOLING), bounds[key]), "manifest"
        else:
            factors[key], sources[key] = bounds[key], "default"
    return Pooling(factors, sources)


def _table_features(module: nn.Module, sharder_list: Sequence[ModuleSharder[nn.Module]]) -> Dict[str, List[str]]:
    """Table name -> the features it serves, in its config's ``feature_names`` order (the order TorchRec reads a
    constraint's ``pooling_factors`` in). A name shared by two collections (stage 2's MEM and TEM) gets the union
    of their features, since the planner's constraints are per table name."""
    out: Dict[str, List[str]] = {}
    for _, sub, _ in shardable_modules(module, sharder_list):
        configs = sub.embedding_bag_configs() if isinstance(sub, EmbeddingBagCollection) else sub.embedding_configs()
        for c in configs:
            names = out.setdefault(c.name, [])
            names.extend(f for f in c.feature_names if f not in names)
    return out


def _with_workload(constraints: Dict[str, ParameterConstraints], table_features: Mapping[str, Sequence[str]],
                   pooling: Mapping[str, float], batch_size: int) -> Dict[str, ParameterConstraints]:
    """``constraints`` plus, for every table, one pooling factor and the per-rank batch size per feature."""
    for table, features in table_features.items():
        c = constraints.setdefault(table, ParameterConstraints())
        c.pooling_factors = [float(pooling.get(f, 1.0)) for f in features]
        c.batch_sizes = [int(batch_size)] * len(features)
    return constraints


# --------------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------------


class _Capture(Stats):
    """Keeps what the planner reports at the end: the chosen options (with per-shard storage) and the
    topology left after its storage reservation."""

    def __init__(self) -> None:
        self.best_plan: Optional[List[ShardingOption]] = None
        self.reserved: Optional[Topology] = None
        self.num_proposals = 0

    def log(self, sharding_plan, topology, batch_size, storage_reservation, num_proposals, num_plans,  # type: ignore[override]
            run_time, best_plan, constraints=None, sharders=None, enumerator=None, debug=False,
            debug_stats=None) -> None:
        self.best_plan = best_plan
        self.reserved = getattr(storage_reservation, "last_reserved_topology", None)
        self.num_proposals = num_proposals


@dataclass
class PlanResult:
    """What :func:`plan_module` found.

    ``per_rank`` rows hold the planner's storage estimate (see the module docstring) and its step-time estimate
    in ms: ``fwd_compute_ms``, ``fwd_comms_ms``, ``bwd_compute_ms``, ``bwd_comms_ms``, ``prefetch_ms`` and their
    sum ``est_ms`` (the embedding part of a step on that rank; the dense part is not modelled). ``estimate``
    sums them up (see :func:`step_estimate`).
    """

    plan: ShardingPlan
    per_rank: List[Dict[str, Any]]
    search: str  # "restricted" (first search) or "full"
    seconds: float
    estimate: Dict[str, Any] = field(default_factory=dict)
    pooling: Optional[Pooling] = None
    hardware: Optional[Hardware] = None


@dataclass(frozen=True)
class ShardingRules:
    """What every plan must respect, whatever the search.

    Args:
        sharding_type: shard every table this way where its sharder offers it ("" = the planner chooses).
        data_parallel: whether tables may be replicated; not under a lazy (sparse) Adam, which a replicated
            table's dense optimizer cannot reproduce, nor with fp16 tables (``train.embedding_precision``): a
            replicated table trains with a regular optimizer on its fp16 dense gradient, whose squares underflow
            to 0 (adagrad's step becomes 0/0), while fbgemm's fused kernels accumulate in fp32.
    """

    sharding_type: str = ""
    data_parallel: bool = True

    @classmethod
    def of(cls, cfg: Config) -> "ShardingRules":
        return cls(cfg.train.planner.sharding_type,
                   cfg.train.embedding_optimizer != "adam" and cfg.train.embedding_precision == "fp32")

    def types(self, t: TableInfo) -> Optional[List[str]]:
        """Allowed sharding types of a table, or None for no restriction.

        An EmbeddingCollection's table is never replicated: TorchRec 1.8's data_parallel EmbeddingCollection
        fails on our sequence KJTs (``split_with_sizes expects split_sizes to sum exactly to ...``), and the
        sequence tables are the item tables, far too large to replicate anyway.
        """
        replicable = not t.unpooled and (self.data_parallel or t.optimizer is None)
        offered = [s for s in t.sharding_types if replicable or s != "data_parallel"]
        if self.sharding_type in offered:
            return [self.sharding_type]
        return offered if len(offered) < len(t.sharding_types) else None


def _rule_constraints(tables: Sequence[TableInfo], rules: ShardingRules) -> Dict[str, ParameterConstraints]:
    out = {}
    for t in tables:
        types = rules.types(t)
        if types is not None:
            prev = out.get(t.name)
            merged = types if prev is None else [s for s in prev.sharding_types if s in types]
            out[t.name] = ParameterConstraints(sharding_types=merged)
    return out


def _fast_constraints(tables: Sequence[TableInfo], compute_device: str,
                      rules: ShardingRules = ShardingRules()) -> Dict[str, ParameterConstraints]:
    """First-search constraints, per table name (a name shared by the MEM and the TEM gets one)."""
    by_name: Dict[str, List[TableInfo]] = {}
    for t in tables:
        by_name.setdefault(t.name, []).append(t)
    out = _rule_constraints(tables, rules)
    for name, ts in by_name.items():
        if name in out:
            if compute_device == "cuda":
                out[name].compute_kernels = list(_HBM_KERNELS)
            continue
        if all(t.weight_bytes <= REPLICATE_MAX_BYTES and "data_parallel" in t.sharding_types for t in ts):
            out[name] = ParameterConstraints(sharding_types=["data_parallel"], compute_kernels=["dense"])
        elif compute_device == "cuda":
            out[name] = ParameterConstraints(compute_kernels=list(_HBM_KERNELS))
    return out


def _run_planner(module: nn.Module, sharder_list: Sequence[ModuleSharder[nn.Module]], topo: Topology,
                 batch_size: int, constraints: Optional[Dict[str, ParameterConstraints]], capture: _Capture,
                 dense_bytes: int) -> ShardingPlan:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "HeuristicalStorageReservation is known to cause issues"
        reservation = HeuristicalStorageReservation(percentage=RESERVE_PERCENTAGE,
                                                    dense_tensor_estimate=max(dense_bytes, 1))
    # TorchRec's default proposers; the grid search's budget shrinks with the world size, since partitioning
    # one proposal costs about world_size (30 ms at 128 ranks: a 1296-proposal grid would take 40 s)
    proposers = [GridSearchProposer(max_proposals=max(16, GRID_SEARCH_BUDGET // topo.world_size)),
                 GreedyProposer(), GreedyProposer(use_depth=False), UniformProposer()]
    planner = EmbeddingShardingPlanner(topology=topo, batch_size=batch_size, storage_reservation=reservation,
                                       proposer=proposers, stats=capture, constraints=constraints or None,
                                       debug=False)
    with _quiet_dp_warnings():
        return planner.plan(module, list(sharder_list))


class _DropDPSpecWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Sharding spec not found for")


@contextlib.contextmanager
def _quiet_dp_warnings() -> Iterator[None]:
    """TorchRec's plan validation warns (root logger) once per data_parallel table, which has no sharding spec
    by design; drop those lines."""
    root = logging.getLogger()
    f = _DropDPSpecWarning()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def _per_rank_usage(best_plan: Sequence[ShardingOption], topo: Topology, reserved: Optional[Topology]
                    ) -> List[Dict[str, Any]]:
    hbm = [0] * topo.world_size
    ddr = [0] * topo.world_size
    for option in best_plan:
        for shard in option.shards:
            if shard.rank is not None and shard.storage is not None and 0 <= shard.rank < topo.world_size:
                hbm[shard.rank] += shard.storage.hbm
                ddr[shard.rank] += shard.storage.ddr
    rows = []
    for r, dev in enumerate(topo.devices):
        row = {"rank": r, "hbm_gb": to_gb(hbm[r]), "hbm_cap_gb": to_gb(dev.storage.hbm),
               "ddr_gb": to_gb(ddr[r]), "ddr_cap_gb": to_gb(dev.storage.ddr)}
        if reserved is not None:
            left = reserved.devices[r].storage
            row["hbm_reserved_gb"] = to_gb(dev.storage.hbm - left.hbm)
            row["ddr_reserved_gb"] = to_gb(dev.storage.ddr - left.ddr)
        rows.append(row)
    return rows


def to_gb(n: float) -> float:
    return round(n / GB, 4)


_PERF_FIELDS = (("fwd_compute_ms", "fwd_compute"), ("fwd_comms_ms", "fwd_comms"), ("bwd_compute_ms", "bwd_compute"),
                ("bwd_comms_ms", "bwd_comms"), ("prefetch_ms", "prefetch_compute"))


def _max_over_mean(values: Sequence[float]) -> Optional[float]:
    """max / mean of the per-rank figures (1: perfectly balanced); None when they are all 0."""
    mean = sum(values) / len(values) if values else 0.0
    return round(max(values) / mean, 4) if mean > 0 else None


def step_estimate(best_plan: Sequence[ShardingOption], world_size: int
                  ) -> Tuple[List[Dict[str, float]], Dict[str, Any]]:
    """TorchRec's cost model of a plan, from the perf (ms) and storage the planner attached to every shard of its
    chosen sharding options.

    Returns per-rank rows (``rank``, the ``*_ms`` fields of :class:`PlanResult`, ``est_ms`` their sum) and a
    summary: ``max_rank_ms`` / ``max_rank`` (the slowest rank's total, what bounds a step when ranks wait for
    each other once per step), ``mean_rank_ms``, ``critical_path_ms`` (TorchRec's critical path, as its
    ``EmbeddingStats`` prints it: ranks synchronise after every forward / backward compute and after each module
    x sharding-type all-to-all, so it is at least ``max_rank_ms`` less prefetch), and ``imbalance``: max / mean
    over ranks of the step time (``perf``) and of the table storage (``hbm``, ``ddr``; None where unused).
    """
    perf = [Perf(fwd_compute=0.0, fwd_comms=0.0, bwd_compute=0.0, bwd_comms=0.0) for _ in range(world_size)]
    hbm = [0.0] * world_size
    ddr = [0.0] * world_size
    for option in best_plan:
        for shard in option.shards:
            if shard.rank is None or not 0 <= shard.rank < world_size:
                continue
            if shard.perf is not None:
                perf[shard.rank] += shard.perf
            if shard.storage is not None:
                hbm[shard.rank] += shard.storage.hbm
                ddr[shard.rank] += shard.storage.ddr
    rows = [{"rank": r, **{k: round(getattr(p, attr), 4) for k, attr in _PERF_FIELDS}, "est_ms": round(p.total, 4)}
            for r, p in enumerate(perf)]
    totals = [p.total for p in perf]
    slowest = max(range(world_size), key=lambda r: totals[r])
    summary: Dict[str, Any] = {
        "max_rank_ms": round(totals[slowest], 4), "max_rank": slowest,
        "mean_rank_ms": round(sum(totals) / world_size, 4),
        "critical_path_ms": None, "critical_path_compute_ms": None, "critical_path_comms_ms": None,
        "imbalance": {"perf": _max_over_mean(totals), "hbm": _max_over_mean(hbm), "ddr": _max_over_mean(ddr)},
    }
    critical_path = getattr(planner_stats, "_calculate_critical_path", None)  # private in TorchRec 1.8
    if critical_path is not None and best_plan:
        cp = critical_path(list(best_plan))
        summary.update(critical_path_ms=round(cp.total(), 4), critical_path_compute_ms=round(cp.comp_estimate, 4),
                       critical_path_comms_ms=round(cp.comms_estimate, 4))
    return rows, summary


def _does_not_fit(tables: Sequence[TableInfo], topo: Topology, reserved: Optional[Topology],
                  error: Exception, rules: ShardingRules = ShardingRules()) -> PlanDoesNotFit:
    world = topo.world_size
    cuda = topo.compute_device == "cuda"
    need = sum(t.bytes for t in tables)

    def available(tier: str) -> float:
        if reserved is not None:
            return float(sum(max(getattr(d.storage, tier), 0) for d in reserved.devices))
        margin = RESERVE_PERCENTAGE if tier == "hbm" else 0.0  # the planner's margin applies to HBM only
        return sum(getattr(d.storage, tier) for d in topo.devices) * (1 - margin)

    hbm_cap, ddr_cap = topo.devices[0].storage.hbm, topo.devices[0].storage.ddr
    hbm_a, ddr_a = (available("hbm"), available("ddr")) if cuda else (0.0, available("ddr"))
    total = hbm_a + ddr_a
    optimizers = sorted({t.optimizer for t in tables if t.optimizer})
    what = (f"its {len(tables)} embedding tables need {need / GB:.2f} GB (fp32 weights"
            f"{' + ' + '/'.join(optimizers) + ' state' if optimizers else ', no optimizer state'})")
    if cuda:
        where = (f"{world} x {hbm_cap / GB:g} GB HBM leave {hbm_a / GB:.2f} GB for them after the planner's "
                 f"reservations (a {RESERVE_PERCENTAGE:.0%} margin, dense parameters, input batches) and "
                 f"{world} x {ddr_cap / GB:g} GB host DDR {ddr_a / GB:.2f} GB more through UVM")
    else:
        where = (f"{world} x {ddr_cap / GB:g} GB of memory leave {ddr_a / GB:.2f} GB for them after the "
                 f"planner's reservations (dense parameters, input batches)")
    largest = sorted(tables, key=lambda t: -t.bytes)
    if need > total:
        verdict = (f"short by {(need - total) / GB:.2f} GB ({(need - total) / world / GB:.2f} GB per rank); "
                   f"add ranks or memory, or shrink the largest tables")
    elif cuda and need > hbm_a:
        verdict = (f"HBM is short by {(need - hbm_a) / GB:.2f} GB and the planner found no way to offload the "
                   f"rest to DDR (UVM caching keeps part of each offloaded table in HBM)")
    else:
        per_rank = (hbm_a + ddr_a) / world
        unsplittable = [t for t in largest if not any(s in (rules.types(t) or t.sharding_types)
                                                      for s in _ROW_SPLIT_TYPES)]
        big = unsplittable[0] if unsplittable else None
        forced = rules.sharding_type and rules.sharding_type in (big.sharding_types if big else [])
        how = f"under sharding {rules.sharding_type}" if forced else f"on {topo.compute_device}"
        if big is not None and big.bytes > per_rank:
            verdict = (f"in total they fit ({need / GB:.2f} of {total / GB:.2f} GB), but {big.name} cannot be "
                       f"split by rows {how} and needs {big.bytes / GB:.2f} GB on one rank, "
                       f"which has {per_rank / GB:.2f} GB: short by {(big.bytes - per_rank) / GB:.2f} GB")
        else:
            verdict = (f"in total they fit ({need / GB:.2f} of {total / GB:.2f} GB), but the planner found no "
                       f"placement that fits every rank")
    shown = [t for t in largest[:3] if t.bytes >= 0.01 * need] or largest[:1]
    named = "; ".join(f"{t.name} ({t.module}) {t.rows:,} x {t.dim} = {t.bytes / GB:.2f} GB" for t in shown)
    first = str(error).strip().splitlines()[0].strip() if str(error).strip() else type(error).__name__
    failure = PlanDoesNotFit(f"the model does not fit: {what}, but {where}: {verdict}. Largest tables: {named}. "
                             f"(TorchRec planner: {first})")
    failure.reason = verdict
    return failure


def _plan_local(module: nn.Module, sharder_list: Sequence[ModuleSharder[nn.Module]], topo: Topology,
                batch_size: int, rules: ShardingRules = ShardingRules(),
                pooling: Optional[Mapping[str, float]] = None) -> PlanResult:
    """Plan on this process; ``pooling`` is a resolved sparse key -> pooling factor map (missing keys: 1)."""
    start = time.perf_counter()
    tables = table_infos(module, topo.compute_device, sharder_list)
    features = _table_features(module, sharder_list)
    dense_bytes = _dense_bytes_estimate(module, sharder_list)
    capture = _Capture()
    search = "restricted"
    try:
        constraints = _with_workload(_fast_constraints(tables, topo.compute_device, rules), features,
                                     pooling or {}, batch_size)
        plan = _run_planner(module, sharder_list, topo, batch_size, constraints, capture, dense_bytes)
    except PlannerError as first_error:
        if topo.compute_device != "cuda":
            raise _does_not_fit(tables, topo, capture.reserved, first_error, rules) from None
        capture = _Capture()
        search = "full"
        try:
            constraints = _with_workload(_rule_constraints(tables, rules), features, pooling or {}, batch_size)
            plan = _run_planner(module, sharder_list, topo, batch_size, constraints, capture, dense_bytes)
        except PlannerError as error:
            raise _does_not_fit(tables, topo, capture.reserved, error, rules) from None
    best_plan = capture.best_plan or []
    per_rank = _per_rank_usage(best_plan, topo, capture.reserved)
    perf_rows, estimate = step_estimate(best_plan, topo.world_size)
    for row, perf_row in zip(per_rank, perf_rows):
        row.update({k: v for k, v in perf_row.items() if k != "rank"})
    return PlanResult(plan=plan, per_rank=per_rank, search=search, seconds=time.perf_counter() - start,
                      estimate=estimate)


@dataclass
class _Failure:
    kind: str
    message: str
    reason: str = ""


def _plan_or_failure(module: nn.Module, sharder_list: Sequence[ModuleSharder[nn.Module]], topo: Topology,
                     batch_size: int, rules: ShardingRules, pooling: Mapping[str, float]) -> Any:
    try:
        return _plan_local(module, sharder_list, topo, batch_size, rules, pooling)
    except Exception as e:  # sent to every rank, which raises it: no rank waits forever for rank 0
        return _Failure(type(e).__name__, str(e), getattr(e, "reason", ""))


def plan_module(module: nn.Module, cfg: Config, world_size: int, local_world_size: Optional[int],
                compute_device: str, pg: Optional[dist.ProcessGroup] = None, *, hbm_gb: Optional[float] = None,
                ddr_gb: Optional[float] = None, batch_size: Optional[int] = None,
                sharder_list: Optional[Sequence[ModuleSharder[nn.Module]]] = None,
                pooling: Optional[Mapping[str, float]] = None, sharding_type: Optional[str] = None,
                cluster: Optional[str] = None) -> PlanResult:
    """Plan ``module`` for ``world_size`` ranks (``local_world_size`` per node; 0/None: one node).

    The hardware (HBM / DDR per rank in GB, bandwidths) is :func:`resolve_hardware` of ``cluster`` (a spec, else
    ``train.planner.cluster``), ``hbm_gb`` and ``ddr_gb``; the per-rank batch defaults to ``cfg.data.batch_size``.
    ``pooling`` is the measured mean ids per row of sparse keys (e.g. :func:`manifest_pooling` of the training
    data); ``train.planner.pooling_factors`` overrides it and defaults fill the rest (:func:`resolve_pooling`).
    The planner gets one pooling factor per feature of every table and the per-rank batch as its batch sizes.
    ``sharding_type`` overrides ``train.planner.sharding_type`` ("" lets the planner choose).
    With ``pg`` rank 0 plans and broadcasts the result (TorchRec's ``collective_plan`` pattern); a failure on
    rank 0 is raised on every rank.

    Raises:
        PlanDoesNotFit: no plan fits (the message says by how much and names the largest tables).
        ConfigError: a ``train.planner.pooling_factors`` key the schema does not have, or a value above its bound;
            a bad ``train.planner.cluster``.
        ValueError: an impossible topology, a bad ``cluster``.
    """
    compute_device = resolve_compute_device(compute_device)
    local = local_world_size or world_size
    hardware = resolve_hardware(cfg, cluster, hbm_gb, ddr_gb)
    topo = topology(world_size, local, compute_device, hardware.hbm_gb, hardware.ddr_gb, hardware.cluster)
    batch = batch_size or cfg.data.batch_size
    shs = list(sharder_list) if sharder_list is not None else sharders()
    rules = ShardingRules.of(cfg)
    if sharding_type is not None:
        rules = replace(rules, sharding_type=sharding_type)
    resolved = resolve_pooling(cfg, pooling)
    if pg is None:
        result = _plan_local(module, shs, topo, batch, rules, resolved.factors)
    else:
        if pg.size() != world_size:
            raise ValueError(f"the process group has {pg.size()} ranks but the plan is for world_size {world_size}")
        result = invoke_on_rank_and_broadcast_result(pg, 0, _plan_or_failure, module, shs, topo, batch, rules,
                                                     resolved.factors)
        if isinstance(result, _Failure):
            if result.kind == "PlanDoesNotFit":
                failure = PlanDoesNotFit(result.message)
                failure.reason = result.reason
                raise failure
            if result.kind == "ValueError":
                raise ValueError(result.message)
            raise RuntimeError(f"planning failed on rank 0: {result.kind}: {result.message}")
    result.pooling = resolved
    result.hardware = hardware
    return result


def make_plan(module: nn.Module, cfg: Config, world_size: int, local_world_size: Optional[int],
              compute_device: str, pg: Optional[dist.ProcessGroup] = None, *,
              pooling: Optional[Mapping[str, float]] = None) -> ShardingPlan:
    """The sharding plan of ``module`` (see :func:`plan_module`; ``pooling``: the training data's measured mean
    ids per row, e.g. ``manifest_pooling(manifest)``); collective when ``pg`` is given. The hardware is
    ``train.planner``'s (``cluster``, ``hbm_gb``, ``ddr_gb``), as ``mkt plan`` reads it."""
    return plan_module(module, cfg, world_size, local_world_size, compute_device, pg, pooling=pooling).plan


SHARDING_ABBREVIATIONS = {"data_parallel": "DP", "table_wise": "TW", "column_wise": "CW", "table_column_wise": "TCW",
                          "row_wise": "RW", "table_row_wise": "TRW", "grid_shard": "GS"}


@dataclass(frozen=True)
class Candidate:
    """One topology / strategy to plan in :func:`compare_plans`: ``world_size`` ranks, every table sharded
    ``sharding_type`` where its collection and the device allow it ("": the planner chooses), on ``cluster`` (a
    spec; None: ``train.planner.cluster``)."""

    world_size: int
    sharding_type: str = ""
    cluster: Optional[str] = None


def compare_plans(module: nn.Module, cfg: Config, candidates: Sequence[Candidate], local_world_size: Optional[int],
                  compute_device: str, *, hbm_gb: Optional[float] = None, ddr_gb: Optional[float] = None,
                  batch_size: Optional[int] = None, pooling: Optional[Mapping[str, float]] = None
                  ) -> List[Dict[str, Any]]:
    """Plan ``module`` once per candidate (arguments as for :func:`plan_module`) and return one row each.

    A row has ``world_size``, ``local_world_size`` (``local_world_size``, at most the candidate's world; None: one
    node), ``sharding`` (requested; ``auto``: the planner chooses), ``cluster`` (its name, None without one) and
    ``hbm_cap_gb`` (HBM per rank, GB; None on cpu), and either ``fits: True`` with ``chosen``
    (sharding types used, e.g. ``RW 3, DP 10``), ``max_rank_ms``, ``critical_path_ms``, ``imbalance`` (the
    step-time imbalance, max / mean over ranks), ``max_hbm_gb`` / ``max_ddr_gb`` (the fullest rank's tables),
    ``search`` and ``seconds``; or ``fits: False`` with ``reason`` (why it does not fit, or what is wrong with the
    topology) and ``message`` (the whole error).

    Raises:
        ConfigError: as :func:`resolve_pooling` (the same for every candidate), a bad ``train.planner.cluster``.
        ValueError: a candidate's bad ``cluster`` spec.
    """
    compute_device = resolve_compute_device(compute_device)
    resolve_pooling(cfg, pooling)  # a ConfigError here, not one per row
    rows = []
    for c in candidates:
        local = min(local_world_size or c.world_size, c.world_size)
        hardware = resolve_hardware(cfg, c.cluster, hbm_gb, ddr_gb)
        row: Dict[str, Any] = {"world_size": c.world_size, "local_world_size": local,
                               "sharding": c.sharding_type or "auto",
                               "cluster": hardware.cluster.name if hardware.cluster else None,
                               "hbm_cap_gb": hardware.hbm_gb if compute_device == "cuda" else None}
        start = time.perf_counter()
        try:
            result = plan_module(module, cfg, c.world_size, local, compute_device, hbm_gb=hbm_gb, ddr_gb=ddr_gb,
                                 batch_size=batch_size, pooling=pooling, sharding_type=c.sharding_type,
                                 cluster=c.cluster)
        except PlanDoesNotFit as e:
            row.update(fits=False, reason=e.reason or str(e), message=str(e))
        except ConfigError:
            raise
        except ValueError as e:  # an impossible topology
            row.update(fits=False, reason=str(e), message=str(e))
        else:
            used: Dict[str, int] = {}
            for mplan in result.plan.plan.values():
                for ps in mplan.values():  # type: ignore[union-attr]
                    used[ps.sharding_type] = used.get(ps.sharding_type, 0) + 1
            est = result.estimate
            row.update(
                fits=True,
                chosen=", ".join(f"{SHARDING_ABBREVIATIONS.get(t, t)} {n}" for t, n in sorted(used.items(),
                                                                                              key=lambda i: -i[1])),
                max_rank_ms=est.get("max_rank_ms"), critical_path_ms=est.get("critical_path_ms"),
                imbalance=est.get("imbalance", {}).get("perf"),
                max_hbm_gb=max(r["hbm_gb"] for r in result.per_rank),
                max_ddr_gb=max(r["ddr_gb"] for r in result.per_rank), search=result.search)
        row["seconds"] = round(time.perf_counter() - start, 3)
        rows.append(row)
    return rows
