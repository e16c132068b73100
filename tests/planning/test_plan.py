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
from mkt_torchrec.planning.describe import describe_plan
from mkt_torchrec.planning.embedding_optimizer import attach_embedding_optimizer
from mkt_torchrec.planning.plan import FORMAT, PlanDoesNotFit, make_plan, plan_module, sharders, table_infos, topology
from mkt_torchrec.planning.plan_file import load_plan, write_plan
from mkt_torchrec.models.build import build_train_module

from tests.conftest import QUICKSTART, REPO

# the sequence lengths these tests were written for (the quickstart demo keeps 30 / 20 steps)
AT_50 = ["schema.sequences.hist_source_items.max_len=50", "schema.sequences.hist_target_items.max_len=50"]

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
    return load_config(QUICKSTART, AT_50)


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
    assert "does not fit" in err and "short by" in err and "item_id" in err and " GB" in err
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


# --------------------------------------------------------------------------------------------------------
# Workload (pooling factors, batch sizes) and the planner's step-time estimates
# --------------------------------------------------------------------------------------------------------


def _recorded_constraints(monkeypatch):
    """Every constraints dict the planner is built with, in order."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner

    import mkt_torchrec.planning.plan as plan_mod

    seen = []

    class Recording(EmbeddingShardingPlanner):
        def __init__(self, *args, constraints=None, **kwargs):
            seen.append(constraints)
            super().__init__(*args, constraints=constraints, **kwargs)

    monkeypatch.setattr(plan_mod, "EmbeddingShardingPlanner", Recording)
    return seen


def test_every_table_gets_one_pooling_factor_per_feature_and_the_batch_size(quick_cfg, monkeypatch):
    seen = _recorded_constraints(monkeypatch)
    cfg = load_config(QUICKSTART, ["train.planner.pooling_factors={hist_source_items: 7.5, gender: 0.5}",
                                   "data.batch_size=300", *AT_50])
    module = _module(cfg, "mem")
    plan_module(module, cfg, 2, 2, "cpu")
    constraints = seen[-1]
    ec = module.get_submodule("model.sparse_arch.ec")
    (item,) = [c for c in ec.embedding_configs() if c.name == "item_id"]
    # the item table serves the candidate and both sequences, in its feature_names order
    assert item.feature_names == ["item_id", "hist_source_items", "hist_target_items"]
    assert constraints["item_id"].pooling_factors == [1.0, 7.5, 50.0]  # default, config, default (max_len)
    assert constraints["item_id"].batch_sizes == [300, 300, 300]
    assert constraints["gender"].pooling_factors == [0.5] and constraints["gender"].batch_sizes == [300]
    tables = {t.name for t in table_infos(module, "cpu")}
    assert set(constraints) == tables
    # the category table serves the candidate and the sequences' side columns (one category per step)
    (category,) = [c for c in ec.embedding_configs() if c.name == "category"]
    assert category.feature_names == ["category", "hist_source_categories", "hist_target_categories"]
    assert constraints["category"].pooling_factors == [1.0, 50.0, 50.0]  # default, default (max_len), default
    for name in tables - {"item_id", "gender", "category"}:
        assert constraints[name].pooling_factors == [1.0] and constraints[name].batch_sizes == [300], name
    # the sharding rules are still there: a tiny table is replicated, the item table is not
    assert constraints["gender"].sharding_types == ["data_parallel"]
    assert "data_parallel" not in constraints["item_id"].sharding_types


def test_a_longer_sequence_raises_the_estimated_step_time_of_the_same_plan(quick_cfg):
    one = load_config(QUICKSTART, ["train.planner.pooling_factors={hist_source_items: 1, hist_target_items: 1, "
                                   "hist_source_categories: 1, hist_target_categories: 1}"])  # with the side columns
    module = _module(quick_cfg, "mem")
    short = plan_module(module, one, 2, 2, "cpu")
    long = plan_module(module, quick_cfg, 2, 2, "cpu")  # defaults: max_len 50
    assert short.plan.plan == long.plan.plan  # the same placement, costed with another workload
    assert long.pooling.factors["hist_source_items"] == 50.0 and long.pooling.sources["hist_source_items"] == "default"
    assert short.pooling.sources["hist_source_items"] == "config"
    for key in ("max_rank_ms", "critical_path_ms"):
        assert long.estimate[key] > 2 * short.estimate[key], key
    # on a GPU topology as well (the README's use): the industrial model on 2 nodes
    cfg = load_config(INDUSTRIAL)
    big = _module(cfg, "mem")
    ones = load_config(INDUSTRIAL, ["train.planner.pooling_factors={hist_source_items: 1, hist_target_items: 1}"])
    assert (plan_module(big, cfg, 16, 8, "cuda").estimate["critical_path_ms"]
            > 2 * plan_module(big, ones, 16, 8, "cuda").estimate["critical_path_ms"])


@pytest.mark.parametrize("value", ["0", "-1", ".inf", ".nan", "x"])
def test_pooling_factors_config_values_must_be_positive_numbers(value):
    from mkt_torchrec.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.planner\.pooling_factors\.hist_source_items: expected a number"):
        load_config(QUICKSTART, [f"train.planner.pooling_factors={{hist_source_items: {value}}}"])


def test_pooling_factors_keys_and_bounds_are_checked_against_the_schema(capsys):
    from mkt_torchrec.config import ConfigError, describe_keys
    from mkt_torchrec.planning.plan import resolve_pooling

    assert load_config(QUICKSTART).train.planner.pooling_factors == {}
    meaning = {k: m for k, _, m in describe_keys()}["train.planner.pooling_factors"]
    assert "mean ids looked up per row" in meaning and "max_len" in meaning  # what `mkt config` lists
    cases = {"ghost: 2": r"pooling_factors\.ghost: not a feature or sequence of the schema; expected one of \[",
             "hist_source_items: 51": r"hist_source_items: 51 ids per row, but hist_source_items is a sequence "
                                      r"with max_len 50: at most 50",
             "gender: 2": r"gender: 2 ids per row, but gender is a single-valued feature: at most 1"}
    for text, message in cases.items():
        cfg = load_config(QUICKSTART, [f"train.planner.pooling_factors={{{text}}}", *AT_50])
        with pytest.raises(ConfigError, match=message):
            resolve_pooling(cfg)
        with pytest.raises(ConfigError, match=message):  # before any planning
            make_plan(_module(cfg, "mem"), cfg, 2, 2, "cpu")
    code = main(["plan", "--config", QUICKSTART, *_sets("train.planner.pooling_factors={ghost: 2}"),
                 "--world-size", "2", "--compute-device", "cpu", "--out", "unused.json"])
    assert code == 2 and "config error: train.planner.pooling_factors.ghost" in capsys.readouterr().err
    assert not os.path.exists("unused.json")


def test_pooling_comes_from_the_config_then_the_manifest_then_the_defaults():
    from types import SimpleNamespace

    from mkt_torchrec.planning.plan import MIN_POOLING, manifest_pooling, resolve_pooling

    manifest = SimpleNamespace(mean_lengths={"train": {"hist_source_items": 12.5, "hist_target_items": 80.0,
                                                       "gender": 0.0, "age": float("nan"), "gone": 3.0},
                                             "test": {"hist_source_items": 1.0}})
    measured = manifest_pooling(manifest)
    assert measured["hist_source_items"] == 12.5  # the train split, not the test split
    assert manifest_pooling(SimpleNamespace()) == {}  # a manifest written before mean lengths were recorded
    assert manifest_pooling(SimpleNamespace(mean_lengths={})) == {}
    cfg = load_config(QUICKSTART, ["train.planner.pooling_factors={hist_source_items: 3}", *AT_50])
    pooling = resolve_pooling(cfg, measured)
    assert set(pooling.factors) == set(cfg.schema.sparse_keys)  # "gone" is not a key of this schema
    assert (pooling.factors["hist_source_items"], pooling.sources["hist_source_items"]) == (3.0, "config")
    assert (pooling.factors["hist_target_items"], pooling.sources["hist_target_items"]) == (50.0, "manifest")  # clipped
    assert (pooling.factors["gender"], pooling.sources["gender"]) == (MIN_POOLING, "manifest")
    assert (pooling.factors["age"], pooling.sources["age"]) == (1.0, "default")  # NaN: not a measurement
    assert (pooling.factors["item_id"], pooling.sources["item_id"]) == (1.0, "default")


def test_cli_data_takes_the_pooling_factors_from_the_manifest(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    import mkt_torchrec.data.dataset as dataset

    opened = []

    def fake_open(data_dir, schema, check_files=True):
        opened.append((data_dir, check_files))
        lengths = {"train": {"hist_source_items": 20.0, "hist_target_items": 4.0}}
        return SimpleNamespace(mean_lengths=lengths) if data_dir.endswith("new") else SimpleNamespace()

    monkeypatch.setattr(dataset, "open_dataset", fake_open)
    out = tmp_path / "plan.json"
    args = ["plan", "--config", QUICKSTART, "--world-size", "2", "--compute-device", "cpu", "--out", str(out)]
    assert main([*args, "--data", str(tmp_path / "new")]) == 0
    printed = capsys.readouterr().out
    assert opened == [(str(tmp_path / "new"), False)]
    assert "measured (--data): hist_source_items 20, hist_target_items 4" in printed
    doc = json.load(open(out))
    assert doc["pooling_factors"]["hist_source_items"] == 20.0 and doc["pooling_factors"]["item_id"] == 1.0
    assert doc["pooling_sources"]["hist_target_items"] == "manifest" and doc["pooling_sources"]["item_id"] == "default"
    measured_ms = doc["estimate"]["critical_path_ms"]
    assert main([*args, "--data", str(tmp_path / "old")]) == 0  # no mean lengths: the defaults, and a note
    captured = capsys.readouterr()
    assert "records no mean lengths" in captured.err
    doc = json.load(open(out))
    assert doc["pooling_sources"]["hist_source_items"] == "default"
    assert doc["estimate"]["critical_path_ms"] > measured_ms  # 50 + 50 ids per row instead of 20 + 4
    monkeypatch.undo()  # the real reader, on a directory without a manifest
    assert main([*args, "--data", str(tmp_path / "missing")]) == 2
    assert f"error: --data {tmp_path / 'missing'}" in capsys.readouterr().err


def test_step_estimate_sums_the_shards_perf_per_rank_like_a_hand_count():
    from types import SimpleNamespace

    from torchrec.distributed.planner.types import Perf, Storage

    from mkt_torchrec.planning.plan import step_estimate

    def shard(rank, fc, fm, bc, bm, hbm):
        return SimpleNamespace(rank=rank, perf=Perf(fwd_compute=fc, fwd_comms=fm, bwd_compute=bc, bwd_comms=bm),
                               storage=Storage(hbm=hbm, ddr=0))

    ebc, ec = ("ebc", None), ("ec", None)
    best = [SimpleNamespace(module=ebc, sharding_type="table_wise", shards=[shard(0, 1.0, 0.5, 2.0, 0.5, 100)]),
            SimpleNamespace(module=ec, sharding_type="row_wise",
                            shards=[shard(0, 0.2, 0.3, 0.4, 0.3, 50), shard(1, 0.25, 0.1, 0.5, 0.6, 150)])]
    rows, est = step_estimate(best, 2)
    assert [r["est_ms"] for r in rows] == [pytest.approx(5.2), pytest.approx(1.45)]  # 4.0 + 1.2, 1.45
    assert rows[0]["fwd_compute_ms"] == pytest.approx(1.2) and rows[1]["bwd_comms_ms"] == pytest.approx(0.6)
    assert est["max_rank"] == 0 and est["max_rank_ms"] == pytest.approx(5.2)
    assert est["imbalance"]["perf"] == pytest.approx(5.2 / ((5.2 + 1.45) / 2), abs=1e-4)
    assert est["imbalance"]["hbm"] == pytest.approx(150 / 150) and est["imbalance"]["ddr"] is None
    # TorchRec's critical path: the slowest rank of each compute phase, plus the slowest rank of each module x
    # sharding type all-to-all (rank 0's ebc comms, then rank 1's slower ec comms in both directions)
    compute = max(1.2, 0.25) + max(2.4, 0.5)
    comms = 0.5 + 0.5 + max(0.3, 0.1) + max(0.3, 0.6)
    assert est["critical_path_ms"] == pytest.approx(compute + comms, abs=1e-4)
    assert est["critical_path_ms"] >= est["max_rank_ms"]


def test_cli_prints_and_writes_the_step_time_estimates(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", QUICKSTART, "--world-size", "2", "--compute-device", "cpu",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(printed[-1])
    doc = json.load(open(out))
    est = doc["estimate"]
    totals = [r["est_ms"] for r in doc["per_rank"]]
    for r in doc["per_rank"]:
        parts = ("fwd_compute_ms", "fwd_comms_ms", "bwd_compute_ms", "bwd_comms_ms", "prefetch_ms")
        assert r["est_ms"] == pytest.approx(sum(r[k] for k in parts), abs=1e-3) and r["est_ms"] > 0
    assert est["max_rank_ms"] == max(totals) and est["max_rank"] == totals.index(max(totals))
    assert est["mean_rank_ms"] == pytest.approx(sum(totals) / 2, abs=1e-4)
    assert est["imbalance"]["perf"] >= 1 and est["imbalance"]["perf"] == pytest.approx(
        max(totals) / (sum(totals) / 2), abs=1e-3)
    assert est["imbalance"]["hbm"] is None and est["imbalance"]["ddr"] >= 1  # a CPU plan keeps its tables in DDR
    assert est["critical_path_ms"] >= est["max_rank_ms"] - max(r["prefetch_ms"] for r in doc["per_rank"])
    assert summary["max_rank_ms"] == est["max_rank_ms"] and summary["critical_path_ms"] == est["critical_path_ms"]
    assert summary["imbalance"] == est["imbalance"]
    assert any(line.startswith("critical path") and f"{est['critical_path_ms']:.3f} ms" in line for line in printed)
    assert any("step ms" in line for line in printed)


# --------------------------------------------------------------------------------------------------------
# mkt plan --compare
# --------------------------------------------------------------------------------------------------------


def _compare(capsys, *args):
    code = main(["plan", *args])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, lines, json.loads(lines[-1]) if code == 0 else None, captured.err


def test_compare_prints_one_row_per_candidate(capsys):
    code, lines, summary, _ = _compare(capsys, "--config", QUICKSTART, "--compute-device", "cpu",
                                       "--compare", "world_size=1,2", "sharding=auto,table_wise")
    assert code == 0
    rows = summary["compare"]
    assert [(r["world_size"], r["sharding"]) for r in rows] == [(1, "auto"), (1, "table_wise"), (2, "auto"),
                                                                (2, "table_wise")]
    assert all(r["fits"] for r in rows)
    header = next(i for i, line in enumerate(lines) if line.startswith("world "))
    for col in ("sharding", "fits", "step ms", "imbalance", "max HBM GB", "max DDR GB"):
        assert col in lines[header], col
    table = lines[header + 1:header + 1 + len(rows)]
    assert [line.split()[:3] for line in table] == [["1", "1", "x"], ["1", "1", "x"], ["2", "1", "x"], ["2", "1", "x"]]
    assert all(" yes " in line for line in table)
    for r in rows:
        assert r["critical_path_ms"] > 0 and r["imbalance"] >= 1 and r["max_ddr_gb"] > 0
    assert "TW" in rows[1]["chosen"] and "RW" not in rows[1]["chosen"]  # forced table-wise where offered
    # the same plan as planning that candidate alone
    cfg = load_config(QUICKSTART)
    alone = plan_module(_module(cfg, "mem"), cfg, 2, 2, "cpu")
    assert rows[2]["critical_path_ms"] == alone.estimate["critical_path_ms"]


def test_compare_shows_a_candidate_that_does_not_fit_as_a_row(capsys):
    big = "schema.tables.item_id.rows=200000000"  # 6 GiB of weights: too much for one rank of 4 GiB
    code, lines, summary, err = _compare(capsys, "--config", QUICKSTART, *_sets(big), "--compute-device", "cpu",
                                         "--ddr-gb", "4", "--local-world-size", "4",
                                         "--compare", "world_size=1,4,6", "--compare", "sharding=auto,table_wise")
    assert code == 0 and "Traceback" not in err
    rows = {(r["world_size"], r["sharding"]): r for r in summary["compare"]}
    assert len(rows) == 6
    assert rows[(4, "auto")]["fits"] is True and rows[(4, "auto")]["max_ddr_gb"] < 4
    assert rows[(1, "auto")]["fits"] is False and "short by" in rows[(1, "auto")]["reason"]
    assert "item_id cannot be split by rows under sharding table_wise" in rows[(4, "table_wise")]["reason"]
    assert "not a multiple of local_world_size 4" in rows[(6, "auto")]["reason"]
    no = [line for line in lines if " no " in line]
    assert len(no) == 5 and any("short by" in line for line in no)


def test_compare_on_the_industrial_model_for_gpus(capsys):
    code, lines, summary, _ = _compare(capsys, "--config", INDUSTRIAL, "--compute-device", "cuda",
                                       "--local-world-size", "8", "--compare", "world_size=8,16")
    assert code == 0
    rows = summary["compare"]
    assert [r["world_size"] for r in rows] == [8, 16] and all(r["fits"] for r in rows)
    assert all(0 < r["max_hbm_gb"] < 80 for r in rows)
    assert rows[1]["max_hbm_gb"] < rows[0]["max_hbm_gb"]  # twice the GPUs: less on each
    assert summary["compute_device"] == "cuda" and summary["seconds"] < 60


@pytest.mark.parametrize("args, message", [
    (["--compare", "gpus=8"], "expected AXIS=V1,V2"),
    (["--compare", "world_size=0,8"], "positive ints"),
    (["--compare", "world_size="], "no values"),
    (["--compare", "sharding=diagonal", "--world-size", "2"], "unknown sharding 'diagonal'"),
    (["--compare", "sharding=auto"], "--world-size is required"),
    (["--compare", "world_size=2", "--out", "plan.json"], "--compare writes no plan file"),
    (["--world-size", "2"], "--out is required"),
])
def test_compare_and_out_argument_errors_exit_2(capsys, args, message):
    code = main(["plan", "--config", QUICKSTART, "--compute-device", "cpu", *args])
    assert code == 2 and message in capsys.readouterr().err


def test_a_real_datasets_measured_lengths_lower_the_sequence_cost(small_dataset, capsys, tmp_path):
    from mkt_torchrec.data.dataset import Manifest, open_dataset
    from mkt_torchrec.planning.plan import manifest_pooling

    if "mean_lengths" not in Manifest.__dataclass_fields__:
        pytest.skip("this dataset writer records no mean lengths")
    cfg = load_config(QUICKSTART)
    measured = manifest_pooling(open_dataset(small_dataset, cfg.schema, check_files=False))
    assert 0 < measured["hist_source_items"] < 50 and 0 < measured["price_bucket"] < 1
    module = _module(cfg, "mem")
    real = plan_module(module, cfg, 2, 2, "cpu", pooling=measured)
    assert real.pooling.sources["hist_source_items"] == "manifest"
    assert real.estimate["critical_path_ms"] < plan_module(module, cfg, 2, 2, "cpu").estimate["critical_path_ms"]
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", QUICKSTART, "--world-size", "2", "--compute-device", "cpu",
                 "--data", small_dataset, "--out", str(out)]) == 0
    assert json.load(open(out))["pooling_factors"]["hist_source_items"] == pytest.approx(measured["hist_source_items"])
