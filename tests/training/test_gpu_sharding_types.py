"""The sharding types of the GPU plan, as far as gloo runs them (2 processes, emulated accelerator).

The 128-GPU plan of configs/industrial.yaml (tests/planning/test_gpu_plan_types.py) shards the sequence table
``item_id`` (an EmbeddingCollection) row_wise and the big EmbeddingBagCollection tables table_row_wise, in both
stages. On CPU:

* row_wise EmbeddingCollection tables run: they train here as under table_wise, and their checkpoint, fused
  optimizer state included, carries to column_wise and back (the rowwise momentum changes shape), and a stage-2
  model loads its frozen MEM from it under another plan, then trains a step without touching it.
* row_wise / table_row_wise EmbeddingBagCollection tables need CUDA. A checkpoint laid out as a 128-rank plan
  writes one (every table split into the plan's row shards, weights and momentum, and that plan recorded) is built
  from a table_wise checkpoint's tensors and loaded into CPU plans (column_wise, data_parallel, row_wise EC) and into
  stage 2's frozen MEM: every value must come back.

Plans are plan files (``train.planner.plan_file``'s format), so each table gets exactly the type under test.
"""

from __future__ import annotations

import json
import os

import torch
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingPlan

from mkt_torchrec.planning.embedding_optimizer import attach_embedding_optimizer
from mkt_torchrec.planning.plan import shardable_modules, sharders
from mkt_torchrec.planning.plan_file import plan_to_dict, write_plan
from mkt_torchrec.training import checkpoint
from mkt_torchrec.models.build import build_train_module
from mkt_torchrec.training.distributed import launch

from tests.conftest import small_config
from tests.training.test_cluster import _full, _in_one_world

META = torch.device("meta")
EMB = {"ebc": "embedding_bags", "ec": "embeddings"}
MEM_ARCH = {"mem": "model.sparse_arch", "tem": "model.mem.sparse_arch"}  # the MEM's tables in each stage's plan


def _key(arch, coll, table):
    """Checkpoint keys of a table's weights and rowwise momentum (``train_state``'s names)."""
    param = f"{arch}.{coll}.{EMB[coll]}.{table}.weight"
    return f"model.{param}", f"optim.{param}.{table}.momentum1"


def _plan(cfg, stage, choice, world=2, local=2, device="cpu", default=None):
    """A plan of the stage module: ``choice`` maps (collection path, table) to a TorchRec generator; other tables
    get ``default`` (else table_wise on rank 0).

    Only the tables a test names are replicated: under the emulated accelerator a data_parallel EBC table's
    kernel computes with a copy of its weights (DMP's ``module.to(torch.device("cpu", 0))`` copies on a CPU),
    not the ones its state dict, optimizer and checkpoints hold, so it cannot be compared in training there."""
    module = build_train_module(cfg, stage, META)
    attach_embedding_optimizer(module, cfg, stage)
    default = default or table_wise(rank=0)
    plan = {}
    for fqn, sub, sharder in shardable_modules(module, sharders()):
        plan[fqn] = construct_module_sharding_plan(
            sub, {name: choice.get((fqn, name), default) for name in sharder.shardable_parameters(sub)},
            sharder=sharder, local_size=local, world_size=world, device_type=device)
    meta = {"world_size": world, "local_world_size": local, "compute_device": device, "stage": stage}
    return ShardingPlan(plan), module, meta


def _plan_file(cfg, stage, choice, path):
    plan, module, meta = _plan(cfg, stage, choice)
    write_plan(plan, module, path, meta)
    return path


# ------------------------------------------------------------------------------------------------------------
# rank functions
# ------------------------------------------------------------------------------------------------------------


def _assemble(stage, plan_file):
    from mkt_torchrec.training.distributed import init_distributed
    from mkt_torchrec.training.assembly import assemble

    torch.set_num_threads(1)
    info = init_distributed()
    cfg = small_config("train.embedding_lr=0.1")
    return info, cfg, assemble(cfg, stage, info, plan_file=plan_file)


def _save_run(run, state, plan, info, cfg, stage="mem"):
    """A run directory with one checkpoint (step 1) recording ``plan``, as the trainer writes it."""
    extra = {"step": 1, "epoch": 0, "readers": [], "plan": plan}
    ckpt = checkpoint.save(run, 1, state, extra, info.is_main, 1)
    if info.is_main:
        with open(os.path.join(run, "run.json"), "w", encoding="utf-8") as f:
            json.dump({"stage": stage, "config": cfg.to_dict()}, f)
    return ckpt


def _plan_record(asm, info):
    return plan_to_dict(asm.plan, asm.model.module, {"world_size": info.world_size, **asm.plan_meta})


def _train(plan_file, run, steps=3, per_rank=64):
    """Assemble the MEM under ``plan_file``, train ``steps`` steps on fixed batches, save it as a run."""
    from mkt_torchrec.data.reader import ParquetReader
    from mkt_torchrec.training.assembly import state_of
    from mkt_torchrec.training.feed import _weighted

    info, cfg, asm = _assemble("mem", plan_file)
    reader = ParquetReader(os.environ["MKT_TEST_DATA"], "train", cfg.schema, cfg.data, batch_size=per_rank)
    world = info.world_size
    for j, batch in zip(range(steps * world), reader):
        if j % world == info.rank:
            loss, _ = asm.model(_weighted(batch, float(per_rank * world), world, real=True).to(info.device))
            asm.optimizer.zero_grad()
            loss.backward()
            asm.optimizer.step()
    return _save_run(run, state_of(asm, cfg), _plan_record(asm, info), info, cfg)


def _reload(plan_file, loads):
    """Assemble the MEM under ``plan_file``; for each (checkpoint, run): load it (``load_train_state``, with the
    plan it records) and save it again as ``run``."""
    from mkt_torchrec.training.assembly import state_of
    from mkt_torchrec.training.resume import load_train_state

    info, cfg, asm = _assemble("mem", plan_file)
    out = []
    for ckpt, run in loads:
        load_train_state(asm, cfg, ckpt, checkpoint.read_extra(ckpt)["plan"])
        out.append(_save_run(run, state_of(asm, cfg), _plan_record(asm, info), info, cfg))
    return out


def _as_128_ranks(src, plan_doc, run):
    """Rewrite checkpoint ``src`` as a run of the 128-rank plan ``plan_doc`` writes it: every sharded table's
    weights (rows x dim) and rowwise momentum (rows,) split into the plan's shards (emulated rank R's shards held by
    rank R % 2), the plan recorded."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    from mkt_torchrec.training.distributed import init_distributed

    info = init_distributed()
    full = _full(src)
    state = dict(full)
    split = 0
    for fqn, entries in plan_doc["modules"].items():
        arch, coll = fqn.rsplit(".", 1)
        for table, entry in entries.items():
            if entry["shards"] is None:
                continue
            for key, two_d in zip(_key(arch, coll, table), (True, False)):
                if key not in full:
                    continue
                tensor, metas, local = full[key], [], []
                for ro, co, rows, cols, rank in entry["shards"]:
                    offsets, sizes = ([ro, co], [rows, cols]) if two_d else ([ro], [rows])
                    md = ShardMetadata(offsets, sizes, f"rank:{rank % info.world_size}/cpu")
                    metas.append(md)
                    if rank % info.world_size == info.rank:
                        piece = tensor[ro:ro + rows, co:co + cols] if two_d else tensor[ro:ro + rows]
                        local.append(Shard(piece.clone(), md))
                props = TensorProperties(dtype=tensor.dtype, requires_grad=False)
                state[key] = ShardedTensor._init_from_local_shards_and_global_metadata(
                    local, ShardedTensorMetadata(metas, tensor.size(), props))
                split += 1
    cfg = small_config()
    return {"ckpt": _save_run(run, state, plan_doc, info, cfg), "split": split}


def _stage2(plan_file, mem_runs, out):
    """Assemble stage 2 under ``plan_file``; for each MEM run: load the frozen MEM from it, train one step, save the
    frozen MEM's tensors."""
    from mkt_torchrec.data.reader import ParquetReader
    from mkt_torchrec.training.assembly import train_state
    from mkt_torchrec.training.mem_transfer import load_mem_into_stage2

    info, cfg, asm = _assemble("tem", plan_file)
    batch = next(iter(ParquetReader(os.environ["MKT_TEST_DATA"], "train", cfg.schema, cfg.data, rank=info.rank,
                                    world_size=info.world_size, entity="target", batch_size=64)))
    saved = []
    for i, mem_run in enumerate(mem_runs):
        record = load_mem_into_stage2(asm.model, mem_run)
        loss, _ = asm.model(batch.to(info.device))
        asm.optimizer.zero_grad()
        loss.backward()
        asm.optimizer.step()
        mem = {k: v for k, v in train_state(asm.model, None).items() if k.startswith("model.model.mem.")}
        saved.append({"ckpt": _save_run(os.path.join(out, str(i)), mem, {}, info, cfg, "tem"),
                      "from": record["path"]})
    return saved


# ------------------------------------------------------------------------------------------------------------


def _assert_same(got, ref, keys, what, exact=True):
    """Weights and rowwise momentum of ``got`` equal ``ref``'s; a momentum of column shards (rows x shards) is
    compared per shard."""
    for k in keys:
        a, b = got[k], ref[k]
        if a.dim() == 1 and a.numel() != b.numel():
            a, b = a.view(-1, b.numel()), b.expand(a.numel() // b.numel(), -1)
        if exact:
            assert torch.equal(a, b), f"{what}: {k}"
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"{what}: {k}")


def test_row_wise_tables_train_checkpoint_and_reshard(small_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MKT_EMULATE_ACCELERATOR", "1")  # sharded state at rank:R/cuda:L, as on a GPU
    monkeypatch.setenv("MKT_TEST_DATA", small_dataset)
    cfg = small_config()
    ebc, ec, mem_ebc, mem_ec = ("model.sparse_arch.ebc", "model.sparse_arch.ec", "model.mem.sparse_arch.ebc",
                                "model.mem.sparse_arch.ec")
    files = {name: _plan_file(cfg, stage, choice, str(tmp_path / f"{name}.json")) for name, stage, choice in (
        ("rw", "mem", {(ec, "item_id"): row_wise(), (ec, "category"): row_wise(),
                       (ebc, "user_id"): table_wise(rank=1)}),
        ("tw", "mem", {(ec, "item_id"): table_wise(rank=1), (ec, "category"): table_wise(rank=0)}),
        ("rw-dp", "mem", {(ec, "item_id"): row_wise(), (ec, "category"): row_wise(),
                          (ebc, "user_id"): data_parallel()}),
        ("cw", "mem", {(ec, "item_id"): column_wise(ranks=[0, 1]), (ec, "category"): column_wise(ranks=[1, 0]),
                       (ebc, "user_id"): column_wise(ranks=[1, 0])}),
        ("tem", "tem", {(mem_ec, "item_id"): column_wise(ranks=[0, 1]),
                        (mem_ebc, "user_id"): column_wise(ranks=[0, 1]),
                        ("model.tem.sparse_arch.ec", "item_id"): row_wise(),
                        ("model.tem.sparse_arch.ec", "category"): row_wise()}),
    )}
    # the GPU plan's types on the small model: user_id table_row_wise on node 1, item_id / category row_wise over
    # 128 ranks (item_id: 127 shards of 391 rows and one of 343; category: one row per rank), the small tables
    # replicated, as in the industrial plan
    plan128, module, meta = _plan(cfg, "mem", {(ebc, "user_id"): table_row_wise(host_index=1),
                                               (ec, "item_id"): row_wise(), (ec, "category"): row_wise()},
                                  world=128, local=8, device="cuda", default=data_parallel())
    doc128 = plan_to_dict(plan128, module, meta)
    assert doc128["modules"][ebc]["user_id"]["ranks"] == list(range(8, 16))
    run = {name: str(tmp_path / name) for name in ("rw", "tw", "e128", "rw-cw", "cw-rw", "e128-cw", "e128-dp")}
    ckpt = {name: checkpoint.checkpoint_dir(path, 1) for name, path in run.items()}
    results = launch(2, _in_one_world,
                     (_train, files["rw"], run["rw"]), (_train, files["tw"], run["tw"]),
                     (_as_128_ranks, ckpt["tw"], doc128, run["e128"]),
                     (_reload, files["cw"], [(ckpt["rw"], run["rw-cw"]), (ckpt["e128"], run["e128-cw"])]),
                     (_reload, files["rw-dp"], [(ckpt["rw-cw"], run["cw-rw"]), (ckpt["e128"], run["e128-dp"])]),
                     (_stage2, files["tem"], [run["rw"], run["e128"]], str(tmp_path / "stage2")))
    assert results[2]["split"] == 6  # user_id, item_id and category: weights and momentum
    chunks = {k: [(list(c.offsets), list(c.sizes)) for c in m.chunks] for k, m in
              checkpoint.SafeFileSystemReader(ckpt["e128"]).read_metadata().state_dict_metadata.items()}
    item_w, item_m = _key("model.sparse_arch", "ec", "item_id")
    user_w, user_m = _key("model.sparse_arch", "ebc", "user_id")
    assert len(chunks[item_w]) == len(chunks[item_m]) == 128 and len(chunks[user_w]) == len(chunks[user_m]) == 8
    assert sorted(chunks[user_m])[0] == ([0], [5000]) and sorted(chunks[item_m])[-1] == ([49657], [343])
    full = {name: _full(c) for name, c in ckpt.items()}
    rows = {t: cfg.schema.tables[t].rows for t in ("user_id", "item_id", "category")}
    keys = {k for t, coll in (("user_id", "ebc"), ("item_id", "ec"), ("category", "ec"))
            for k in _key("model.sparse_arch", coll, t)}
    tables = sorted(k for k in full["tw"] if k.startswith("model.model.sparse_arch."))
    moments = sorted(k for k in full["tw"] if k.endswith(".momentum1"))
    assert len(tables) == 9 and len(moments) == 9 and keys <= set(full["tw"])
    for name in ("rw", "tw"):
        assert all(full[name][k].abs().sum() > 0 for k in keys), name  # they trained
    recorded = checkpoint.read_extra(ckpt["rw"])["plan"]["modules"][ec]
    assert recorded["item_id"]["sharding_type"] == recorded["category"]["sharding_type"] == "row_wise"

    # row_wise EC tables train as table_wise ones
    _assert_same(full["rw"], full["tw"], list(full["tw"]), "row_wise vs table_wise training", exact=False)
    # row_wise -> column_wise -> row_wise: every weight and momentum value; the momentum really went rows x 2
    for t, coll in (("item_id", "ec"), ("category", "ec")):
        assert full["rw-cw"][_key("model.sparse_arch", coll, t)[1]].shape == (2 * rows[t],), t
    assert full["rw-cw"][_key("model.sparse_arch", "ebc", "user_id")[1]].shape == (2 * rows["user_id"],)
    _assert_same(full["rw-cw"], full["rw"], list(full["rw"]), "row_wise -> column_wise")
    _assert_same(full["cw-rw"], full["rw"], list(full["rw"]), "column_wise -> row_wise")
    # a checkpoint of the 128-GPU plan (table_row_wise EBC, row_wise EC) into column_wise and into
    # data_parallel (user_id) + row_wise EC: every value of the table_wise run it was made from
    for name in ("e128-cw", "e128-dp"):
        _assert_same(full[name], full["tw"], list(full["tw"]), f"128-rank plan -> {name}")

    # stage 2: the frozen MEM loaded under column_wise from a row_wise EC run and from the 128-GPU layout,
    # unchanged by a training step
    for source, got in zip(("rw", "tw"), results[5]):
        assert got["from"] == os.path.abspath(ckpt["rw" if source == "rw" else "e128"])
        mem = _full(got["ckpt"])  # every tensor of the MEM, under stage 2's names
        assert set(tables) <= {k.replace("model.model.mem.", "model.model.", 1) for k in mem}
        ref = {k: full[source][k.replace("model.model.mem.", "model.model.", 1)] for k in mem}
        _assert_same(mem, ref, list(ref), f"stage 2's frozen MEM from {source}")
