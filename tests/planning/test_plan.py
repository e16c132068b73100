"""Sharding plans: planner on CPU / GPU topologies, plan files round trip, validation, ``mkt plan``, and the
collective plan on a real 2-rank gloo group."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mkt_torchrec.cli import main
from mkt_torchrec.config import load_config
from mkt_torchrec.planning.plan import (
    FORMAT,
    PlanDoesNotFit,
    attach_embedding_optimizer,
    describe_plan,
    load_plan,
    make_plan,
    plan_module,
    sharders,
    table_infos,
    topology,
    write_plan,
)
from mkt_torchrec.training.build import build_train_module

from tests.conftest import QUICKSTART, REPO

INDUSTRIAL = os.path.join(REPO, "configs", "industrial.yaml")
META = torch.device("meta")
CPU_TYPES = {  # FACTS.md: what each sharder offers on CPU
    "EmbeddingBagCollection": {"data_parallel", "table_wise", "column_wise", "table_column_wise"},
    "EmbeddingCollection": {"data_parallel", "table_wise", "column_wise", "row_wise"},
}


def _module(cfg, stage):
    m = build_train_module(cfg, stage, META)
    attach_embedding_optimizer(m, cfg, stage)
    return m


def _shards(ps):
    if ps.sharding_spec is None:
        return None
    return [(list(s.shard_offsets), list(s.shard_sizes), str(s.placement)) for s in ps.sharding_spec.shards]


def _assert_same_plan(a, b):
    assert set(a.plan) == set(b.plan)
    for fqn in a.plan:
        assert set(a.plan[fqn]) == set(b.plan[fqn]), fqn
        for table, pa in a.plan[fqn].items():
            pb = b.plan[fqn][table]
            assert pa.sharding_type == pb.sharding_type, (fqn, table)
            assert pa.compute_kernel == pb.compute_kernel, (fqn, table)
            assert list(pa.ranks) == list(pb.ranks), (fqn, table)
            assert _shards(pa) == _shards(pb), (fqn, table)
    assert a.plan == b.plan  # every other ParameterSharding field as well


@pytest.fixture(scope="module")
def quick_cfg():
    return load_config(QUICKSTART)


@pytest.fixture(scope="module")
def industrial_128():
    cfg = load_config(INDUSTRIAL)
    module = _module(cfg, "mem")
    start = time.perf_counter()
    result = plan_module(module, cfg, 128, 8, "cuda", hbm_gb=80.0)
    return cfg, module, result, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------------


def test_quickstart_on_two_cpu_ranks_shards_every_table_with_a_cpu_type(quick_cfg):
    assert [type(s).__name__ for s in sharders()] == ["EmbeddingBagCollectionSharder", "EmbeddingCollectionSharder"]
    for stage in ("mem", "tem"):
        module = _module(quick_cfg, stage)
        plan = make_plan(module, quick_cfg, 2, 2, "cpu")
        tables = table_infos(module, "cpu")
        assert {(t.module, t.name) for t in tables} == {(f, n) for f, mp_ in plan.plan.items() for n in mp_}
        kinds = {fqn: type(module.get_submodule(fqn)).__name__ for fqn in plan.plan}
        for fqn, mplan in plan.plan.items():
            for table, ps in mplan.items():
                assert ps.sharding_type in CPU_TYPES[kinds[fqn]], (stage, fqn, table, ps.sharding_type)
                assert ps.compute_kernel in ("dense", "fused")
                assert ps.ranks and all(0 <= r < 2 for r in ps.ranks)
                if ps.sharding_spec is not None:
                    assert all(str(s.placement).endswith("/cpu") for s in ps.sharding_spec.shards)
        # the big tables are sharded, the tiny ones replicated
        assert plan.plan[next(f for f in plan.plan if f.endswith("ec"))]["item_id"].sharding_type != "data_parallel"
        assert plan.plan[next(f for f in plan.plan if f.endswith("ebc"))]["gender"].sharding_type == "data_parallel"


@pytest.mark.parametrize("stage", ["mem", "tem"])
def test_write_then_load_gives_the_same_plan(quick_cfg, stage, tmp_path):
    module = _module(quick_cfg, stage)
    result = plan_module(module, quick_cfg, 2, 2, "cpu")
    path = str(tmp_path / "plan.json")
    write_plan(result.plan, module, path, {"world_size": 2, "local_world_size": 2, "compute_device": "cpu",
                                           "stage": stage, "per_rank": result.per_rank})
    assert not [p for p in os.listdir(tmp_path) if p != "plan.json"]  # no temp file left
    doc = json.load(open(path))
    assert doc["format"] == FORMAT and doc["stage"] == stage and doc["world_size"] == 2
    assert doc["compute_device"] == "cpu" and len(doc["per_rank"]) == 2
    assert doc["modules"][next(f for f in doc["modules"] if f.endswith("ec"))]["item_id"]["rows"] == 50000
    fresh = build_train_module(quick_cfg, stage, META)  # a new module, as the trainer builds it
    _assert_same_plan(result.plan, load_plan(path, fresh, 2, 2, "cpu"))


def test_industrial_plan_for_128_gpus_round_trips(industrial_128, tmp_path):
    cfg, module, result, _ = industrial_128
    path = str(tmp_path / "plan.json")
    write_plan(result.plan, module, path, {"world_size": 128, "local_world_size": 8, "compute_device": "cuda",
                                           "stage": "mem", "per_rank": result.per_rank})
    _assert_same_plan(result.plan, load_plan(path, build_train_module(cfg, "mem", META), 128, 8, "cuda"))
    with pytest.raises(ValueError, match=r"local_world_size 8"):
        load_plan(path, build_train_module(cfg, "mem", META), 128, 4, "cuda")


def test_industrial_plans_for_16_nodes_of_8_gpus_in_seconds(industrial_128):
    cfg, module, result, seconds = industrial_128
    assert seconds < 20, seconds
    plan = result.plan.plan
    ebc, ec = plan["model.sparse_arch.ebc"], plan["model.sparse_arch.ec"]
    row_split = {"row_wise", "table_row_wise", "grid_shard"}
    # item_id (300M rows, ~10 GiB with state) is split by rows over many GPUs
    assert ec["item_id"].sharding_type in row_split and len(set(ec["item_id"].ranks)) >= 8
    for big in ("user_id", "creator_id"):
        assert ebc[big].sharding_type in row_split and len(set(ebc[big].ranks)) >= 2, big
    for name, t in cfg.schema.tables.items():
        ps = ebc.get(name) or ec.get(name)
        assert ps.compute_kernel in ("fused", "dense"), name  # all of it fits in HBM: no UVM
        if t.rows <= 100_000:
            assert ps.sharding_type in ("data_parallel", "table_wise"), name
    for r in result.per_rank:
        assert 0 < r["hbm_gb"] + r.get("hbm_reserved_gb", 0) < r["hbm_cap_gb"] == 80.0
    assert max(r["hbm_gb"] for r in result.per_rank) > 0.3  # the big tables' shards are counted
    tables, ranks = describe_plan(result.plan, module, topology(128, 8, "cuda", 80, 128), result.per_rank)
    assert tables[0]["table"] == "item_id"  # largest first
    assert len(ranks) == 128 and len(tables) == len(cfg.schema.tables)


def _quick_plan_file(cfg, stage, tmp_path, name="plan.json"):
    module = _module(cfg, stage)
    plan = make_plan(module, cfg, 2, 2, "cpu")
    path = str(tmp_path / name)
    write_plan(plan, module, path, {"world_size": 2, "local_world_size": 2, "compute_device": "cpu", "stage": stage})
    return path


def test_load_plan_rejects_a_plan_for_another_job(quick_cfg, tmp_path):
    path = _quick_plan_file(quick_cfg, "mem", tmp_path)
    mem = build_train_module(quick_cfg, "mem", META)
    with pytest.raises(ValueError, match=r"plan\.json is for world_size 2, but this job has world_size 4"):
        load_plan(path, mem, 4, 4, "cpu")
    with pytest.raises(ValueError, match=r"plan\.json is for compute device 'cpu'.*'cuda'"):
        load_plan(path, mem, 2, 2, "cuda")
    # a plan of the other stage: the module's tables are not in it
    with pytest.raises(ValueError, match=r"plan\.json: table item_id of module model\.sparse_arch\.ec is in the plan "
                                         r"\(stage mem\) but the module being trained has no module"):
        load_plan(path, build_train_module(quick_cfg, "tem", META), 2, 2, "cpu")
    # the config changed after planning
    other = load_config(QUICKSTART, ["schema.tables.item_id.rows=60000"])
    with pytest.raises(ValueError, match=r"plan\.json: table item_id of model\.sparse_arch\.ec is planned as "
                                         r"50000 x 8 but the module's is 60000 x 8"):
        load_plan(path, build_train_module(other, "mem", META), 2, 2, "cpu")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_plan(str(tmp_path / "missing.json"), mem, 2, 2, "cpu")


def test_load_plan_rejects_a_missing_or_extra_table(quick_cfg, tmp_path):
    path = _quick_plan_file(quick_cfg, "mem", tmp_path)
    mem = build_train_module(quick_cfg, "mem", META)
    doc = json.load(open(path))
    del doc["modules"]["model.sparse_arch.ebc"]["user_id"]
    json.dump(doc, open(path, "w"))
    with pytest.raises(ValueError, match=r"plan\.json: sharded table user_id of module model\.sparse_arch\.ebc "
                                         r"is not in the plan"):
        load_plan(path, mem, 2, 2, "cpu")
    doc["modules"]["model.sparse_arch.ebc"]["user_id"] = dict(doc["modules"]["model.sparse_arch.ebc"]["age"])
    doc["modules"]["model.sparse_arch.ebc"]["user_id"].update(rows=40000)
    doc["modules"]["model.sparse_arch.ebc"]["ghost"] = doc["modules"]["model.sparse_arch.ebc"]["age"]
    json.dump(doc, open(path, "w"))
    with pytest.raises(ValueError, match=r"plan\.json: table ghost of module model\.sparse_arch\.ebc is in the plan "
                                         r"but not in the module"):
        load_plan(path, mem, 2, 2, "cpu")


def test_a_model_that_cannot_fit_fails_naming_its_largest_tables(quick_cfg):
    huge = load_config(QUICKSTART, ["schema.tables.item_id.rows=20000000000"])  # 670 GiB on 2 x 128 GiB
    with pytest.raises(PlanDoesNotFit) as err:
        make_plan(build_train_module(huge, "mem", META), huge, 2, 2, "cpu")
    msg = str(err.value)
    assert "does not fit" in msg and "short by" in msg and "item_id" in msg
    assert "Largest tables: item_id (model.sparse_arch.ec) 20,000,000,000 x 8" in msg


def _sets(*items):
    return [a for s in items for a in ("--set", s)]


def test_cli_plans_writes_the_file_and_prints_a_json_summary(tmp_path, capsys):
    out = tmp_path / "sub" / "plan.json"
    code = main(["plan", "--config", QUICKSTART, "--world-size", "2", "--local-world-size", "2",
                 "--compute-device", "cpu", "--ddr-gb", "8", "--stage", "tem", "--out", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    summary = json.loads(printed[-1])
    assert summary["plan"] == str(out) and summary["stage"] == "tem" and summary["world_size"] == 2
    assert summary["compute_device"] == "cpu" and summary["tables"] == sum(summary["sharding_types"].values())
    assert any("item_id" in line and "model.tem.sparse_arch.ec" in line for line in printed)
    doc = json.load(open(out))
    assert doc["format"] == FORMAT and doc["stage"] == "tem" and doc["local_world_size"] == 2
    assert set(doc["modules"]) == {"model.tem.sparse_arch.ebc", "model.tem.sparse_arch.ec",
                                   "model.mem.sparse_arch.ebc", "model.mem.sparse_arch.ec"}
    assert doc["per_rank"][0]["ddr_cap_gb"] == 8.0 and doc["per_rank"][0]["ddr_gb"] > 0
    # the file is what the trainer loads
    cfg = load_config(QUICKSTART)
    loaded = load_plan(str(out), build_train_module(cfg, "tem", META), 2, 2, "cpu")
    assert set(loaded.plan) == set(doc["modules"])


def test_cli_reports_a_model_that_does_not_fit_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(["plan", "--config", INDUSTRIAL, "--world-size", "2", "--hbm-gb", "1", "--ddr-gb", "4",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert "does not fit" in err and "short by" in err and "item_id" in err and "GiB" in err
    code = main(["plan", "--config", QUICKSTART, "--world-size", "12", "--local-world-size", "8", "--out", str(out)])
    assert code == 2 and "not a multiple of local_world_size 8" in capsys.readouterr().err and not out.exists()
    code = main(["plan", "--config", QUICKSTART, *_sets("schema.tables.item_id.rows=20000000000"),
                 "--world-size", "2", "--compute-device", "cpu", "--out", str(out)])
    assert code == 1 and "item_id" in capsys.readouterr().err and not out.exists()


# --------------------------------------------------------------------------------------------------------
# make_plan(pg=...) on a real 2-rank gloo group
# --------------------------------------------------------------------------------------------------------


def _collective_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = load_config(QUICKSTART)
        module = _module(cfg, "mem")
        plan = make_plan(module, cfg, world, world, "cpu", pg=dist.group.WORLD)
        gathered = [None] * world
        dist.all_gather_object(gathered, plan)
        write_plan(plan, module, os.path.join(out_dir, f"plan{rank}.json"),
                   {"world_size": world, "local_world_size": world, "compute_device": "cpu", "stage": "mem"})
        huge = load_config(QUICKSTART, ["schema.tables.item_id.rows=20000000000"])
        try:  # rank 0's failure reaches every rank (no rank waits for a plan that never comes)
            make_plan(build_train_module(huge, "mem", META), huge, world, world, "cpu", pg=dist.group.WORLD)
            error = None
        except PlanDoesNotFit as e:
            error = str(e)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"same_as_all": all(p.plan == plan.plan for p in gathered), "error": error}, f)
    finally:
        dist.destroy_process_group()


def test_collective_plan_gives_every_rank_the_same_plan(tmp_path, quick_cfg):
    out = str(tmp_path)
    # fork: the children start with torchrec already imported (spawn re-imports it: ~10 s per child on 2 cores)
    ctx = mp.start_processes(_collective_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=False,
                             start_method="fork")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the collective plan did not finish in 120 s")
    results = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]
    assert all(r["same_as_all"] for r in results)
    docs = [json.load(open(os.path.join(out, f"plan{r}.json"))) for r in range(2)]
    assert docs[0]["modules"] == docs[1]["modules"]
    local = make_plan(_module(quick_cfg, "mem"), quick_cfg, 2, 2, "cpu")  # the same as planning alone
    _assert_same_plan(local, load_plan(os.path.join(out, "plan1.json"), build_train_module(quick_cfg, "mem", META),
                                       2, 2, "cpu"))
    for r in results:
        assert r["error"] and "does not fit" in r["error"] and "item_id" in r["error"]


def test_plan_defaults_to_this_machines_device_and_says_so(tmp_path, capsys):
    """It used to plan for cuda on a CPU-only machine, and the trainer here then refused the plan file."""
    import torch

    out = tmp_path / "plan.json"
    assert main(["plan", "--config", QUICKSTART, "--world-size", "2", "--out", str(out)]) == 0
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert json.load(open(out))["compute_device"] == expected
    assert f"compute device '{expected}'" in capsys.readouterr().err


def test_plan_out_that_is_a_directory_is_a_one_line_error(tmp_path, capsys):
    assert main(["plan", "--config", QUICKSTART, "--world-size", "2", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "is a directory; --out takes the plan file's path" in err[-1] and len(err) == 1
