"""Plan files: a ``ShardingPlan`` written as JSON (``mkt plan``, every run's ``plan.json``) and read back for a
module, world size and device, resharding the ranks where the file was made for another local world size.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Mapping, Optional

from torch import nn
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    grid_shard,
    placement,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import (
    EnumerableShardingSpec,
    ModuleSharder,
    ParameterSharding,
    ShardingPlan,
    ShardMetadata,
)

from mkt_torchrec.manifest_schema import validate
from mkt_torchrec.planning.describe import estimate_usage, plan_device, shards_of
from mkt_torchrec.planning.plan import (
    FORMAT,
    resolve_compute_device,
    shardable_modules,
    sharders,
    table_shapes,
)
from mkt_torchrec.rundir import read_json


_INDEX = {"type": "integer", "minimum": 0}
# A plan file's structure (mkt_torchrec.manifest_schema): what load_plan indexes; other keys are kept as written.
PLAN_SCHEMA: Dict[str, Any] = {
    "type": "object",
    "required": ["format", "world_size", "compute_device", "modules"],
    "properties": {
        "format": {"type": "string"},
        "world_size": {"type": "integer", "minimum": 1},
        "local_world_size": {"type": ["integer", "null"], "minimum": 1},
        "compute_device": {"type": "string"},
        "modules": {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["sharding_type", "compute_kernel", "ranks", "rows", "dim", "shards"],
            "properties": {
                "sharding_type": {"type": "string"}, "compute_kernel": {"type": "string"},
                "ranks": {"type": "array", "items": _INDEX, "minItems": 1},
                "rows": {"type": "integer", "minimum": 1}, "dim": {"type": "integer", "minimum": 1},
                "shards": {"type": ["array", "null"], "items": {  # [row offset, column offset, rows, columns, rank]
                    "type": "array", "items": _INDEX, "minItems": 5, "maxItems": 5}},
            }}}},
    },
}


def plan_to_dict(plan: ShardingPlan, module: nn.Module, meta: Mapping[str, Any]) -> Dict[str, Any]:
    """The JSON document of a plan file (see the module docstring); ``meta`` needs ``world_size``."""
    if "world_size" not in meta:
        raise ValueError("write_plan: meta needs world_size")
    world_size = int(meta["world_size"])
    shapes = table_shapes(module)
    compute_device = meta.get("compute_device") or plan_device(plan) or "cpu"
    modules: Dict[str, Dict[str, Any]] = {}
    for fqn, mplan in plan.plan.items():
        entries: Dict[str, Any] = {}
        for name, ps in mplan.items():  # type: ignore[union-attr]
            shards = shards_of(ps)
            if (fqn, name) in shapes:
                rows, dim = shapes[(fqn, name)]
            elif shards:
                rows = max(s[0] + s[2] for s in shards)
                dim = max(s[1] + s[3] for s in shards)
            else:
                raise ValueError(f"write_plan: table {name} of {fqn} is not in the module")
            entries[name] = {"sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel,
                             "ranks": [int(r) for r in (ps.ranks or [])], "rows": rows, "dim": dim,
                             "shards": shards}
        modules[fqn] = entries
    doc: Dict[str, Any] = {
        "format": FORMAT, "world_size": world_size, "local_world_size": meta.get("local_world_size"),
        "compute_device": compute_device, "stage": meta.get("stage"), "modules": modules,
        "per_rank": meta.get("per_rank") or estimate_usage(plan, module, world_size, compute_device),
    }
    for k, v in meta.items():
        doc.setdefault(k, v)
    return doc


def write_plan(plan: ShardingPlan, module: nn.Module, path: str, meta: Mapping[str, Any]) -> Dict[str, Any]:
    """Write ``plan`` (of ``module``, unsharded or sharded) as a plan file, atomically (temp file + rename);
    returns the document written.

    ``meta`` needs ``world_size`` and should carry ``local_world_size``, ``compute_device`` (else read off the
    shard placements) and ``stage``; ``per_rank`` (else estimated from the shard sizes); any other keys are
    stored as they are.
    """
    doc = plan_to_dict(plan, module, meta)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return doc


def _exact_sharding(entry: Mapping[str, Any], device_type: str, local_size: int) -> ParameterSharding:
    """A ParameterSharding with exactly the file's shards."""
    spec = None
    if entry["shards"] is not None:
        spec = EnumerableShardingSpec([
            ShardMetadata(shard_offsets=[ro, co], shard_sizes=[r, c], placement=placement(device_type, rank, local_size))
            for ro, co, r, c, rank in entry["shards"]])
    return ParameterSharding(sharding_type=entry["sharding_type"], compute_kernel=entry["compute_kernel"],
                             ranks=list(entry["ranks"]), sharding_spec=spec)


def _stock_generator(entry: Mapping[str, Any], local_size: int) -> Callable[..., ParameterSharding]:
    st, kernel, ranks = entry["sharding_type"], entry["compute_kernel"], list(entry["ranks"])
    if st == "data_parallel":
        return data_parallel()
    if st == "table_wise":
        return table_wise(rank=ranks[0], compute_kernel=kernel)
    if st in ("column_wise", "table_column_wise"):
        return column_wise(ranks=ranks, compute_kernel=kernel)
    if st == "row_wise":
        return row_wise(compute_kernel=kernel)
    if st == "table_row_wise":
        return table_row_wise(host_index=ranks[0] // local_size)
    if st == "grid_shard":
        return grid_shard(host_indexes=list(dict.fromkeys(r // local_size for r in ranks)))
    raise ValueError(f"unknown sharding type {st!r}")


def _generator(entry: Mapping[str, Any]) -> Callable[..., ParameterSharding]:
    """A construct_module_sharding_plan generator: TorchRec's stock generator for the sharding type, checked
    against the file's shards; where the stock layout differs (e.g. uneven row-wise shards) the file's shards
    are used."""

    def generate(param: nn.Parameter, local_size: int, world_size: int, device_type: str,
                 sharder: ModuleSharder[nn.Module]) -> ParameterSharding:
        try:
            ps: Optional[ParameterSharding] = _stock_generator(entry, local_size)(
                param, local_size, world_size, device_type, sharder)
        except (ValueError, AssertionError, IndexError):
            ps = None
        if ps is None or list(ps.ranks or []) != list(entry["ranks"]) or shards_of(ps) != entry["shards"]:
            ps = _exact_sharding(entry, device_type, local_size)
        ps.sharding_type = entry["sharding_type"]  # table_column_wise is built with column_wise
        ps.compute_kernel = entry["compute_kernel"]
        return ps

    return generate


def load_plan(path: str, module: nn.Module, world_size: int, local_world_size: Optional[int],
              compute_device: str) -> ShardingPlan:
    """Rebuild the ShardingPlan of a plan file for ``module`` (unsharded, e.g. on the meta device).

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file and what does not match: format, a key of the wrong type or bounds
            (:data:`PLAN_SCHEMA`, naming the dotted key), world size, local world size, compute
            device, a sharded table of the module missing from the file or one in the file the module does not
            have, a table's rows / dim, or ranks out of range.
    """
    compute_device = resolve_compute_device(compute_device)
    doc = read_json(path, "a plan file")
    if doc.get("format") != FORMAT:
        got = doc.get("format")
        raise ValueError(f"plan file {path}: format {got!r}, expected {FORMAT!r}")
    validate(doc, PLAN_SCHEMA, f"plan file {path}")
    stage = doc.get("stage")
    remedy = f"(re-run mkt plan for this topology{' and stage' if stage else ''})"
    if doc.get("world_size") != world_size:
        raise ValueError(f"plan file {path} is for world_size {doc.get('world_size')}, but this job has world_size "
                         f"{world_size} {remedy}")
    if doc.get("compute_device") != compute_device:
        raise ValueError(f"plan file {path} is for compute device {doc.get('compute_device')!r}, but this job runs "
                         f"on {compute_device!r} {remedy}")
    file_local = doc.get("local_world_size")
    local = local_world_size or file_local or world_size
    if file_local is not None and file_local != local:
        raise ValueError(f"plan file {path} is for local_world_size {file_local}, but this job has {local} ranks "
                         f"per node {remedy}")
    file_modules: Dict[str, Dict[str, Any]] = doc.get("modules") or {}
    shs = sharders()
    found = {fqn: (sub, sharder) for fqn, sub, sharder in shardable_modules(module, shs)}
    for fqn, entries in file_modules.items():
        if fqn not in found:
            table = next(iter(entries), "?")
            raise ValueError(f"plan file {path}: table {table} of module {fqn} is in the plan (stage {stage}) but "
                             f"the module being trained has no module {fqn} {remedy}")
    plan: Dict[str, Any] = {}
    for fqn, (sub, sharder) in found.items():
        params = sharder.shardable_parameters(sub)
        entries = file_modules.get(fqn, {})
        for name, param in params.items():
            if name not in entries:
                raise ValueError(f"plan file {path}: sharded table {name} of module {fqn} is not in the plan "
                                 f"(stage {stage}) {remedy}")
            e = entries[name]
            if (e.get("rows"), e.get("dim")) != (int(param.shape[0]), int(param.shape[1])):
                raise ValueError(f"plan file {path}: table {name} of {fqn} is planned as {e.get('rows')} x "
                                 f"{e.get('dim')} but the module's is {param.shape[0]} x {param.shape[1]} {remedy}")
            bad = [r for r in e.get("ranks", []) if not 0 <= r < world_size]
            if bad or not e.get("ranks"):
                raise ValueError(f"plan file {path}: table {name} of {fqn} has ranks {e.get('ranks')} outside "
                                 f"[0, {world_size})")
        extra = sorted(set(entries) - set(params))
        if extra:
            raise ValueError(f"plan file {path}: table {extra[0]} of module {fqn} is in the plan but not in the "
                             f"module being trained {remedy}")
        plan[fqn] = construct_module_sharding_plan(
            sub, {name: _generator(entries[name]) for name in params}, sharder=sharder, local_size=local,
            world_size=world_size, device_type=compute_device)
    return ShardingPlan(plan)
