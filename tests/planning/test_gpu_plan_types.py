"""The GPU plan's sharding types, on paper: the industrial config planned for 16 nodes x 8 GPUs on the meta device
(as ``mkt plan`` does), in both stages.

TorchRec's planner gives ``item_id`` (the sequence table, an EmbeddingCollection) row_wise over every rank and the
big EmbeddingBagCollection tables ``user_id`` / ``creator_id`` table_row_wise over one node. row_wise and
table_row_wise EBC need CUDA (reduce-scatter), so nothing here can run them: these tests check what is ours, the
constraints that let the planner pick them, the frozen MEM's optimizer in stage 2, and the plan record a checkpoint
keeps (the row-split shards our resharding reads; tests/training/test_gpu_sharding_types.py loads checkpoints laid
out that way).
"""

from __future__ import annotations

import os

import pytest
import torch

from mkt_torchrec.config import load_config
from mkt_torchrec.planning.embedding_optimizer import FROZEN_MODULE, attach_embedding_optimizer
from mkt_torchrec.planning.plan import ShardingRules, _fast_constraints, plan_module, table_infos
from mkt_torchrec.planning.plan_file import load_plan, plan_to_dict, write_plan
from mkt_torchrec.models.build import build_train_module

from tests.conftest import REPO

INDUSTRIAL = os.path.join(REPO, "configs", "industrial.yaml")
META = torch.device("meta")
WORLD, LOCAL = 128, 8
ROW_SPLIT = {"user_id": "table_row_wise", "creator_id": "table_row_wise", "item_id": "row_wise"}


@pytest.fixture(scope="module")
def industrial():
    cfg = load_config(INDUSTRIAL)
    out = {}
    for stage in ("mem", "tem"):
        module = build_train_module(cfg, stage, META)
        attach_embedding_optimizer(module, cfg, stage)  # as `mkt plan` and the trainer do
        out[stage] = (module, plan_module(module, cfg, WORLD, LOCAL, "cuda"))
    return cfg, out


def _collections(stage):
    """The plan's (EBC, EC) module paths of every sparse arch of the stage: stage 2 has the MEM's and the TEM's."""
    arches = ["model.sparse_arch"] if stage == "mem" else ["model.tem.sparse_arch", "model.mem.sparse_arch"]
    return [(f"{a}.ebc", f"{a}.ec") for a in arches]


@pytest.mark.parametrize("stage", ["mem", "tem"])
def test_the_128_gpu_plan_splits_the_big_tables_by_rows_in_both_stages(industrial, stage):
    cfg, planned = industrial
    module, result = planned[stage]
    plan = result.plan.plan
    assert result.search == "restricted"  # everything fits in HBM: no UVM offload
    for ebc, ec in _collections(stage):
        assert plan[ec]["item_id"].sharding_type == "row_wise"
        assert sorted(plan[ec]["item_id"].ranks) == list(range(WORLD))
        for name in ("user_id", "creator_id"):
            ps = plan[ebc][name]
            assert ps.sharding_type == "table_row_wise", (ebc, name)
            assert len(ps.ranks) == LOCAL and len({r // LOCAL for r in ps.ranks}) == 1, (ebc, name, ps.ranks)
        for fqn in (ebc, ec):
            for name, ps in plan[fqn].items():
                assert ps.compute_kernel in ("fused", "dense"), (fqn, name)
                if name not in ROW_SPLIT:  # the small tables (at most 100k rows) are replicated
                    assert ps.sharding_type == "data_parallel", (fqn, name, ps.sharding_type)
    # the constraints our rules give these tables allow the chosen types (or leave the planner free)
    rules = ShardingRules.of(cfg)
    tables = table_infos(module, "cuda")
    constraints = _fast_constraints(tables, "cuda", rules)
    for t in tables:
        if t.name not in ROW_SPLIT:
            continue
        assert ROW_SPLIT[t.name] in t.sharding_types, (t.module, t.name)  # its sharder offers it on cuda
        allowed = rules.types(t)
        assert allowed is None or ROW_SPLIT[t.name] in allowed, (t.module, t.name, allowed)
        if t.unpooled:  # an EmbeddingCollection's table is never replicated (TorchRec 1.8's DP EC fails)
            assert allowed is not None and "data_parallel" not in allowed
        c = constraints.get(t.name)
        assert c is not None and c.compute_kernels == ["dense", "fused"]  # first search: HBM only
        assert c.sharding_types is None or ROW_SPLIT[t.name] in c.sharding_types


def test_stage_2s_frozen_mem_is_planned_without_optimizer_state(industrial):
    _, planned = industrial
    module, _ = planned["tem"]
    frozen = FROZEN_MODULE["tem"]
    by_module = {}
    for t in table_infos(module, "cuda"):
        by_module.setdefault(t.module.startswith(frozen + "."), []).append(t)
    assert len(by_module[True]) == len(by_module[False]) + 3  # the MEM has the source-only tables too
    for t in by_module[True]:  # the frozen MEM: a stateless fused SGD at lr 0, weights only
        assert t.optimizer == "SGD" and t.bytes == t.weight_bytes, (t.module, t.name)
    for t in by_module[False]:
        assert t.optimizer == "RowWiseAdagrad" and t.bytes > t.weight_bytes, (t.module, t.name)
    mem_tables = module.get_submodule(frozen).sparse_arch
    for coll in (mem_tables.ebc, mem_tables.ec):
        for p in coll.parameters():
            assert p._optimizer_classes == [torch.optim.SGD] and p._optimizer_kwargs == [{"lr": 0.0}]
            assert not p.requires_grad


@pytest.mark.parametrize("stage", ["mem", "tem"])
def test_the_recorded_row_split_plan_tiles_each_table_and_reloads(industrial, stage, tmp_path):
    """What a checkpoint records of the plan (``plan_to_dict``, the trainer's RUN/plan.json) for the row-split
    tables: full-width shards whose rows tile the table, one per rank, so the rowwise momentum is one value per
    row (``rows,``), as under table_wise; the file loads back to the same plan."""
    cfg, planned = industrial
    module, result = planned[stage]
    meta = {"world_size": WORLD, "local_world_size": LOCAL, "compute_device": "cuda", "stage": stage,
            "per_rank": result.per_rank}
    doc = plan_to_dict(result.plan, module, meta)
    for ebc, ec in _collections(stage):
        for fqn, name in ((ec, "item_id"), (ebc, "user_id"), (ebc, "creator_id")):
            entry = doc["modules"][fqn][name]
            assert entry["sharding_type"] == ROW_SPLIT[name]
            assert (entry["rows"], entry["dim"]) == (cfg.schema.tables[name].rows, cfg.schema.tables[name].dim)
            shards = sorted(entry["shards"])
            assert all(co == 0 and cols == entry["dim"] for _, co, _, cols, _ in shards), (fqn, name)
            ends = [ro + rows for ro, _, rows, _, _ in shards]
            assert [ro for ro, *_ in shards] == [0] + ends[:-1] and ends[-1] == entry["rows"], (fqn, name)
            assert sorted(s[4] for s in shards) == sorted(entry["ranks"])
    path = str(tmp_path / "plan.json")
    write_plan(result.plan, module, path, meta)
    again = load_plan(path, build_train_module(cfg, stage, META), WORLD, LOCAL, "cuda")
    assert again.plan == result.plan.plan
