"""The cluster path, emulated on CPU with real processes (gloo): what must hold on 16 nodes x 8 GPUs.

How each test stands in for the cluster condition:
* CUDA / NCCL collectives: ``MKT_EMULATE_ACCELERATOR=1`` gives every rank a device object other than ``cpu`` and
  fails any collective on a tensor that would be on the host of a GPU machine (``training/device_check.py``).
* CUDA placements in sharded state: under the same variable every ShardedTensor of the model and its fused
  optimizer is placed at ``rank:R/cuda:L`` (what TorchRec gives it on a GPU), and a local shard our code copied
  to the host no longer matches its placement, as torch checks on a GPU. The save / resume / reshard / stage-2 /
  evaluate / export tests below run under it.
* A failing rank: ``MKT_FAULT=POINT:RANK`` raises in one rank only; the others block in their next collective, as
  on the cluster. The world must end in seconds, not at the process-group timeout.
* Restarts at another world size: the same run directory resumed with 1 and 3 processes, and with other
  sharding plans (``train.planner.sharding_type``).
"""

import json
import os
from collections import Counter
import subprocess
import sys
import time

import pytest
import torch

from mkt_torchrec.cli import main
from mkt_torchrec.training import checkpoint
from mkt_torchrec.training.distributed import launch

from tests.conftest import QUICKSTART, REPO, SMALL, set_flags, small_config

TRAIN = ["train.log_every=5", "data.batch_size=96", "train.checkpoint_every_minutes=0"]


def _sets(*extra):
    return set_flags(*SMALL, *TRAIN, *extra)


def _mkt(*args, env=None, timeout=240):
    """Run the ``mkt`` command in a fresh process (as a user would); returns (code, stderr, seconds)."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mkt_torchrec.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "MKT_PROGRESS": "0", **(env or {})})
    return proc.returncode, proc.stderr, time.monotonic() - start


def _train(stage, data, run, nproc, *extra, sets=(), env=None):
    code, err, _ = _mkt("train", "--config", QUICKSTART, *_sets(*sets), "--stage", stage, "--data", data,
                        "--run-dir", run, "--nproc", str(nproc), *extra, env=env)
    assert code == 0, err[-3000:]
    return err


EVAL = ["--set", "data.batch_size=96"]  # evaluate takes the model from the run, and refuses other --set keys


def _records(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def _full(ckpt, keys=None):
    """Every tensor of a checkpoint, unsharded, read without a process group."""
    md = checkpoint.SafeFileSystemReader(ckpt).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
             if hasattr(m, "size") and (keys is None or k in keys)}
    checkpoint.load(ckpt, state, no_dist=True)
    return state


def _in_one_world(*calls):
    """Per rank: several rank functions ``(fn, *args)`` in turn in one launch (one process start-up, the
    slowest part of a short launch); returns their results. Each call assembles its own model (``assemble``
    seeds everything), and a call's checkpoint is complete on every rank before the next call starts."""
    import torch.distributed as dist

    results = []
    for fn, *args in calls:
        results.append(fn(*args))
        dist.barrier()
    return results


# ------------------------------------------------------------------------------------------------------------
# 1. collectives on the group's device
# ------------------------------------------------------------------------------------------------------------


def _host_tensor_collective() -> str:
    import torch.distributed as dist

    from mkt_torchrec.training.device_check import HostTensorInCollective
    from mkt_torchrec.training.distributed import all_sum, init_distributed

    info = init_distributed()
    assert all_sum([1.0, 2.0], info.device) == [2.0, 4.0]  # made on the rank's device: fine
    stats = torch.tensor([0.5, 1.0])  # the old trainer's log-step all-reduce: a host tensor
    try:
        dist.all_reduce(stats * 2)
    except HostTensorInCollective as e:
        return str(e)
    return "not caught"


def test_emulated_accelerator_catches_a_collective_on_a_host_tensor(monkeypatch):
    monkeypatch.setenv("MKT_EMULATE_ACCELERATOR", "1")
    message = launch(2, _host_tensor_collective)
    assert "dist.all_reduce" in message and "test_cluster.py" in message and "host (CPU) tensor" in message


def test_train_benchmark_passes_the_accelerator_emulation():
    """tools/bench_train.py all-reduced a host tensor (``torch.tensor([rows])``) like the old trainer.

    Its report must also hold what the benchmark promises: a paired ratio inside its range, both arms training
    the same model (equal warm-up losses, up to summation order), and each arm's per-phase breakdown, exclusive
    phases that fit in the step.
    """
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench_train.py"), "--rows", "8000",
                           "--users", "800", "--batch-size", "128", "--warmup", "2", "--windows", "2",
                           "--window-steps", "2", "--profile-steps", "2"], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MKT_EMULATE_ACCELERATOR": "1", "MKT_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rows_per_s"] > 0 and result["baseline_rows_per_s"] > 0
    assert 0 < result["ratio_min"] <= result["ratio"] <= result["ratio_max"]
    assert len(result["windows_rows_per_s"]) == len(result["windows_baseline_rows_per_s"]) == 2
    assert result["warmup_loss_max_abs_diff"] < 0.01  # the same model, data and update rules in both arms
    phases = ("data", "sparse_forward", "dense_forward", "backward", "optimizer", "communication")
    for arm in ("torchrec", "plain"):
        ms = result["breakdown"][arm]
        assert all(ms[p] >= 0 for p in phases), ms
        assert all(ms[p] > 0 for p in ("sparse_forward", "dense_forward", "backward", "communication")), ms
        assert sum(ms[p] for p in phases) <= ms["step"] + 0.05, ms  # exclusive: they fit in the step


def test_train_and_evaluate_pass_the_accelerator_emulation(small_dataset, tmp_path):
    env = {"MKT_EMULATE_ACCELERATOR": "1"}
    run = str(tmp_path / "mem")
    _train("mem", small_dataset, run, 2, sets=("train.max_steps=12", "train.checkpoint_every=5"), env=env)
    code, err, _ = _mkt("evaluate", "--config", QUICKSTART, *EVAL, "--run-dir", run, "--data", small_dataset,
                        "--nproc", "2", env=env)
    assert code == 0, err[-3000:]
    assert json.load(open(os.path.join(run, "metrics.json")))["target"]["rows"] > 0


# ------------------------------------------------------------------------------------------------------------
# 2. one rank's error ends every rank, once, fast
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mem_run(small_dataset, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("cluster") / "mem")
    _train("mem", small_dataset, run, 2, sets=("train.checkpoint_every=10",))
    return run


@pytest.mark.parametrize("command", ["evaluate", "train", "run"])
def test_a_failing_rank_ends_the_world_with_one_message(small_dataset, mem_run, tmp_path, command):
    point = {"run": "train"}.get(command, command)
    if command == "evaluate":
        args = ["evaluate", "--config", QUICKSTART, *EVAL, "--run-dir", mem_run, "--data", small_dataset]
    elif command == "train":
        args = ["train", "--config", QUICKSTART, *_sets(), "--stage", "mem", "--data", small_dataset,
                "--run-dir", str(tmp_path / "run")]
    else:
        args = ["run", "--config", QUICKSTART, *_sets(), "--runs", "mkt", "--out", str(tmp_path / "out")]
    code, err, seconds = _mkt(*args, "--nproc", "2", env={"MKT_FAULT": f"{point}:1"}, timeout=120)
    assert code == 1
    assert err.count(f"injected fault at {point}") == 1 and "rank 1:" in err, err
    assert "Traceback" not in err
    assert seconds < 60  # not the process-group timeout (30 min)


def test_evaluate_on_a_test_split_of_fewer_row_groups_than_ranks(tmp_path):
    """Used to hang: a rank without a row group raised, and the others waited in a collective forever. Row groups
    hold one entity each, so the small test split has two: evaluated by three ranks."""
    from mkt_torchrec.data.synth import generate

    data = str(tmp_path / "data")
    generate(small_config("synth.row_group_rows=100000", "synth.rows_per_file=100000"), data)
    manifest = json.load(open(os.path.join(data, "manifest.json")))
    assert [len(f["row_groups"]) for f in manifest["splits"]["test"]] == [2]
    run = str(tmp_path / "mem")
    _train("mem", data, run, 2, sets=("train.max_steps=4",))
    code, err, _ = _mkt("evaluate", "--config", QUICKSTART, *EVAL, "--run-dir", run, "--data", data,
                        "--nproc", "3", timeout=120)
    assert code == 0, err[-3000:]
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics["source"]["rows"] + metrics["target"]["rows"] == sum(manifest["rows"]["test"].values())


# ------------------------------------------------------------------------------------------------------------
# 4. the same optimizer for every table, and the same training at any world size / plan
# ------------------------------------------------------------------------------------------------------------


def _steps_with_fixed_batches(sets, steps, global_batch, pipelined=False):
    """Assemble the MEM, train ``steps`` steps on the same global batches (rank r takes its slice), save a
    checkpoint; return its path and the replicated tables. ``pipelined``: through the trainer's TorchRec train
    pipeline instead of a plain forward / backward / step loop."""
    import torch.distributed as dist

    from mkt_torchrec.data.reader import ParquetReader
    from mkt_torchrec.training.distributed import init_distributed
    from mkt_torchrec.training.assembly import assemble, state_of
    from mkt_torchrec.training.feed import _weighted, make_pipeline

    torch.set_num_threads(1)
    info = init_distributed()
    cfg = small_config(*sets)
    asm = assemble(cfg, "mem", info)
    data = os.environ["MKT_TEST_DATA"]
    per_rank = global_batch // info.world_size
    # one shuffled stream (both entities: row groups are entity-pure) in batches of per_rank rows: global step k is
    # rows [k * global_batch, (k + 1) * global_batch) of it at every world size, and rank r takes its r-th slice
    reader = ParquetReader(data, "train", cfg.schema, cfg.data, batch_size=per_rank)
    mine = [_weighted(batch, float(global_batch), info.world_size, real=True)
            for j, batch in zip(range(steps * info.world_size), reader) if j % info.world_size == info.rank]
    if pipelined:
        pipeline = make_pipeline(asm.model, asm.optimizer, info.device)
        batches = iter(mine)
        for _ in mine:
            pipeline.progress(batches)
        assert len(pipeline._pipelined_modules) == 2  # the EBC and the EC: their input dist runs a batch ahead
    else:
        for batch in mine:
            loss, _ = asm.model(batch.to(info.device))
            asm.optimizer.zero_grad()
            loss.backward()
            asm.optimizer.step()
    name = f"w{info.world_size}-{cfg.train.planner.sharding_type}{'-pipelined' if pipelined else ''}"
    ckpt = os.path.join(os.environ["MKT_TEST_OUT"], name)
    checkpoint.save(ckpt, 1, state_of(asm, cfg), {}, info.is_main, 1)
    dist.barrier()
    return {"ckpt": checkpoint.checkpoint_dir(ckpt, 1), "optimizers": asm.replicated}


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "sgd"])
def test_every_table_trains_the_same_at_any_world_size_and_plan(small_dataset, tmp_path, monkeypatch, optimizer):
    """Under the emulated accelerator (data_parallel tables once computed with a copy of their weights that neither
    the initialisation nor checkpoints reached, because DMP's ``.to(device)`` copied them to the emulated device)."""
    monkeypatch.setenv("MKT_EMULATE_ACCELERATOR", "1")
    monkeypatch.setenv("MKT_TEST_DATA", small_dataset)
    monkeypatch.setenv("MKT_TEST_OUT", str(tmp_path))
    base = ("model.ablation=no_pdl", f"train.embedding_optimizer={optimizer}", "train.embedding_lr=0.1")
    two_ranks = launch(2, _in_one_world,
                       (_steps_with_fixed_batches, (*base, "train.planner.sharding_type=data_parallel"), 4, 128),
                       (_steps_with_fixed_batches, (*base, "train.planner.sharding_type=table_wise"), 4, 128))
    runs = {
        "1 rank, planner's plan": launch(1, _steps_with_fixed_batches, base, 4, 128),
        "2 ranks, data_parallel": two_ranks[0],
        "2 ranks, table_wise": two_ranks[1],
    }
    assert runs["2 ranks, data_parallel"]["optimizers"]  # the forced plan really replicates tables
    assert not runs["2 ranks, table_wise"]["optimizers"]
    states = {name: _full(r["ckpt"]) for name, r in runs.items()}
    ref = states["2 ranks, table_wise"]
    tables = [k for k in ref if k.startswith("model.") and ("embedding_bags" in k or "embeddings" in k)]
    assert len(tables) == 9
    for name, state in states.items():
        for k in ref:
            if k.startswith("model."):
                torch.testing.assert_close(state[k], ref[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
        if optimizer == "rowwise_adagrad":  # the same optimizer state, under the fused optimizer's names
            moments = [k for k in ref if k.endswith(".momentum1")]
            assert len(moments) == 9
            for k in moments:
                torch.testing.assert_close(state[k], ref[k], rtol=1e-4, atol=1e-7, msg=f"{name}: {k}")


def test_the_train_pipeline_trains_like_the_plain_loop(small_dataset, tmp_path, monkeypatch):
    """TorchRec's TrainPipelineSparseDist (the model traced, both collections pipelined) ends with the same
    parameters and optimizer state as forward / backward / step on the same batches, on 2 ranks."""
    monkeypatch.setenv("MKT_TEST_DATA", small_dataset)
    monkeypatch.setenv("MKT_TEST_OUT", str(tmp_path))
    sets = ("train.planner.sharding_type=table_wise", "train.embedding_lr=0.1")
    plain, piped = (_full(r["ckpt"]) for r in launch(2, _in_one_world, (_steps_with_fixed_batches, sets, 5, 128),
                                                     (_steps_with_fixed_batches, sets, 5, 128, True)))
    assert plain.keys() == piped.keys() and any(k.endswith(".momentum1") for k in plain)
    first = _full(launch(1, _steps_with_fixed_batches, sets, 1, 128)["ckpt"])  # the test can tell models apart
    assert not torch.equal(first["model.model.towers.target.1.weight"], plain["model.model.towers.target.1.weight"])
    for k in plain:
        torch.testing.assert_close(piped[k], plain[k], rtol=1e-6, atol=1e-7, msg=k)


def test_every_mkt_ablation_trains_through_the_pipeline(small_dataset, tmp_path, monkeypatch):
    """The pipeline FX-traces the stage module: each ablation's MEM must trace (no_hfa's PadAlign did not), with
    the HFA score penalty too (a branch on the scores' shape did not)."""
    monkeypatch.setenv("MKT_TEST_DATA", small_dataset)
    monkeypatch.setenv("MKT_TEST_OUT", str(tmp_path))
    ablations = ("no_hfa", "no_pdl")
    sets = [(f"model.ablation={a}", "model.hfa.score_penalty=0.1") for a in ablations]
    results = launch(1, _in_one_world, *[(_steps_with_fixed_batches, s, 2, 64, True) for s in sets])
    assert len(results) == len(ablations) and all(r["ckpt"] for r in results)


def _syncs_of_training(steps: int) -> list:
    """Host syncs our code made (on device tensors) during ``train`` of ``steps`` steps, log steps excluded."""
    from mkt_torchrec.training import device_check
    from mkt_torchrec.training.recipe import train

    torch.set_num_threads(1)
    cfg = small_config(*TRAIN, f"train.max_steps={steps}", "train.log_every=1000", "data.num_workers=0")
    device_check.SYNCS.clear()
    train(cfg, "mem", os.environ["MKT_TEST_DATA"], os.path.join(os.environ["MKT_TEST_OUT"], f"run{steps}"))
    return list(device_check.SYNCS)


def test_a_training_step_makes_no_host_sync(small_dataset, tmp_path, monkeypatch):
    """Under the accelerator emulation every ``.item()``, ``.tolist()``, ``bool()``, ``.nonzero()``, ``.cpu()`` our
    code calls on a device tensor is recorded (training/device_check.py): 9 steps make exactly the syncs of 3 (the
    last log step's read-back and the final checkpoint's), so a step makes none."""
    monkeypatch.setenv("MKT_EMULATE_ACCELERATOR", "1")
    monkeypatch.setenv("MKT_TEST_DATA", small_dataset)
    monkeypatch.setenv("MKT_TEST_OUT", str(tmp_path))
    short, long = launch(2, _syncs_of_training, 3), launch(2, _syncs_of_training, 9)
    assert short, "the emulation records nothing: the test could not fail"
    extra = Counter(long) - Counter(short)
    assert not extra and long == short, f"host syncs made by the 6 more steps, by origin: {dict(extra)}"


def test_early_stopping_validates_each_epoch_and_serves_the_best(small_dataset, tmp_path):
    """train.patience: each epoch ends with a validation pass (2 ranks, through the training pipeline); training
    stops after `patience` epochs without a better validation GAUC; `best` points at the best epoch's checkpoint,
    which pruning keeps and evaluate uses; a resumed finished run trains no further."""
    run = str(tmp_path / "mem")
    sets = ("train.patience=1", "train.max_epochs=4", "train.keep_checkpoints=1", "eval.bootstrap_samples=0")
    _train("mem", small_dataset, run, 2, sets=sets)
    valid = [r for r in _records(run) if "validation" in r]
    assert [r["validation"] for r in valid] == list(range(len(valid))) and 2 <= len(valid) <= 4
    gaucs = [r["gauc"] for r in valid]  # train.stop_on: gauc, among the eligible epochs, by default
    for i, r in enumerate(valid):  # the best so far, and the stop exactly when patience ran out
        lowest = min(v["logloss"] for v in valid[:i + 1])
        assert r["eligible"] == (r["auc"] >= 0.5 and r["logloss"] <= r["base_logloss"]
                                 and r["logloss"] <= 1.01 * lowest)  # train.logloss_slack
        eligible = [j for j in range(i + 1) if valid[j]["eligible"]]
        assert r["best_epoch"] == max(eligible, key=lambda j: (gaucs[j], -j))
        assert r["early_stop"] == (i - r["best_epoch"] >= 1)
        assert r["base_logloss"] > 0 and 0 < r["click_rate"] < 1
    assert valid[-1]["early_stop"] or len(valid) == 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run, "tensorboard"))  # the validation curve, in TensorBoard too
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("validation/gauc")] == \
        [(r["step"], pytest.approx(r["gauc"], rel=1e-6)) for r in valid]
    # HFA's mean score of each target-specific feature on the validation rows: in each record and in TensorBoard
    from mkt_torchrec.models.losses import hfa_feature_names
    from mkt_torchrec.rundir import RunDir

    features = hfa_feature_names(RunDir(run).config().schema)["target"]
    assert features and all(set(r["hfa_scores"]) == {"target"} for r in valid)
    for name in features:
        assert [(e.step, e.value) for e in events.Scalars(f"validation/hfa/target/{name}")] == \
            [(r["step"], pytest.approx(r["hfa_scores"]["target"][name], rel=1e-6)) for r in valid]
    best_epoch = valid[-1]["best_epoch"]
    best = checkpoint.latest_checkpoint(run, checkpoint.BEST)
    assert best is not None and checkpoint.read_extra(best)["epoch"] == best_epoch
    assert checkpoint.final_checkpoint(run) == best
    code, err, _ = _mkt("evaluate", "--config", QUICKSTART, *EVAL, "--run-dir", run, "--data", small_dataset,
                        "--nproc", "2")
    assert code == 0, err[-3000:]
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics["checkpoint_epoch"] == best_epoch and metrics["validation"]["gauc"] == max(gaucs[j] for j in range(len(valid)) if valid[j]["eligible"])
    steps = checkpoint.read_extra(checkpoint.latest_checkpoint(run))["step"]
    _train("mem", small_dataset, run, 2, "--resume", sets=sets)
    assert checkpoint.read_extra(checkpoint.latest_checkpoint(run))["step"] == steps


# ------------------------------------------------------------------------------------------------------------
# 5. the frozen MEM: no optimizer, no gradient, and stage 2 resumes bit-equal
# ------------------------------------------------------------------------------------------------------------


def _stage2_parts(mem_run) -> dict:
    from mkt_torchrec.data.reader import ParquetReader
    from mkt_torchrec.training.distributed import init_distributed
    from mkt_torchrec.training.assembly import assemble

    torch.set_num_threads(1)
    info = init_distributed()
    cfg = small_config(*TRAIN)
    asm = assemble(cfg, "tem", info)
    batch = next(iter(ParquetReader(os.environ["MKT_TEST_DATA"], "train", cfg.schema, cfg.data, rank=info.rank,
                                    world_size=info.world_size, entity="target")))
    loss, _ = asm.model(batch.to(info.device))
    asm.optimizer.zero_grad()
    loss.backward()
    asm.optimizer.step()
    asm.optimizer.init_state()
    opt_keys = list(asm.optimizer.state_dict()["state"])
    grads = [n for n, p in asm.model.named_parameters() if ".mem." in f".{n}" and p.grad is not None]
    ddp = asm.model._dmp_wrapped_module
    synced = [n for n in getattr(ddp, "parameters_to_ignore", [])]
    return {"opt_keys": opt_keys, "mem_grads": grads, "ignored": synced}


def test_frozen_mem_has_no_optimizer_state_gradient_or_ddp_sync(small_dataset, monkeypatch):
    monkeypatch.setenv("MKT_TEST_DATA", small_dataset)
    parts = launch(2, _stage2_parts, None)
    assert parts["opt_keys"] and not [k for k in parts["opt_keys"] if "model.mem." in k]
    assert not parts["mem_grads"]
    assert any(n.startswith("model.mem.") for n in parts["ignored"])


# ------------------------------------------------------------------------------------------------------------
# 6 / 8. restarts at another world size and plan; no row dropped
# ------------------------------------------------------------------------------------------------------------


def test_restart_at_1_then_3_ranks_and_other_plans_trains_every_row_once(small_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MKT_EMULATE_ACCELERATOR", "1")  # sharded state placed on (emulated) GPUs, as on the cluster
    run = str(tmp_path / "elastic")
    sets = ("train.epochs=2", "train.checkpoint_every=4", "data.batch_size=64")
    code, _, _ = _mkt("train", "--config", QUICKSTART, *_sets(*sets, "train.planner.sharding_type=table_wise"),
                      "--stage", "mem", "--data", small_dataset, "--run-dir", run, "--nproc", "2",
                      env={"MKT_FAIL_AT_STEP": "6"})
    assert code == 1
    first = checkpoint.latest_checkpoint(run)
    code, _, _ = _mkt("train", "--config", QUICKSTART, *_sets(*sets, "train.planner.sharding_type=data_parallel"),
                      "--stage", "mem", "--data", small_dataset, "--run-dir", run, "--nproc", "1", "--resume",
                      env={"MKT_FAIL_AT_STEP": "30"})
    second = checkpoint.latest_checkpoint(run)
    assert code == 1 and second != first and checkpoint.read_extra(second)["world_size"] == 1
    err = _train("mem", small_dataset, run, 3, "--resume", sets=(*sets, "train.planner.sharding_type=column_wise"))
    assert "mkt.train resumed" in err and "saved by 1 ranks, now 3" in err  # rank 0's log lines reach the user
    assert "is_fx_tracing" not in err and "find_unused_parameters" not in err  # no library chatter
    from mkt_torchrec.data.dataset import open_dataset

    cfg = small_config()
    train_rows = open_dataset(small_dataset, cfg.schema).split_rows(
        "train", validation_fraction=cfg.data.validation_fraction)  # the validation rows are not trained on
    assert train_rows < sum(json.load(open(os.path.join(small_dataset, "manifest.json")))["rows"]["train"].values())
    ends = [r for r in _records(run) if "epoch_end" in r]
    assert [r["epoch_end"] for r in ends] == [0, 1]
    assert all(r["rows_trained"] == train_rows for r in ends)  # every row once per epoch, across 3 world sizes
    assert checkpoint.read_extra(checkpoint.latest_checkpoint(run))["world_size"] == 3


def _carry(ckpt_in, sharding_type, out) -> str:
    from mkt_torchrec.training.distributed import init_distributed
    from mkt_torchrec.training.assembly import assemble, state_of
    from mkt_torchrec.training.resume import load_train_state

    torch.set_num_threads(1)
    info = init_distributed()
    cfg = small_config(*TRAIN, f"train.planner.sharding_type={sharding_type}", "schema.tables.age.dim=256")
    asm = assemble(cfg, "mem", info)
    load_train_state(asm, cfg, ckpt_in, checkpoint.read_extra(ckpt_in)["plan"])
    extra = {"step": 1, "epoch": 0, "readers": [], "plan": _plan_record(asm, info.world_size)}
    checkpoint.save(out, 1, state_of(asm, cfg), extra, info.is_main, 1)
    return checkpoint.checkpoint_dir(out, 1)


def _plan_record(asm, world_size) -> dict:
    """What the trainer records as a checkpoint's plan (RUN/plan.json)."""
    from mkt_torchrec.planning.plan_file import plan_to_dict

    return plan_to_dict(asm.plan, asm.model.module, {"world_size": world_size})


def _per_row(momentum, rows):
    """A rowwise momentum as (column shards, rows)."""
    return momentum.view(-1, rows)


def test_model_and_optimizer_state_carry_across_plans(small_dataset, tmp_path, monkeypatch):
    """table_wise (2 ranks) -> column_wise (2 ranks: the 256-wide table splits into 2 column shards, whose
    row-wise momentum is rows x 2) -> data_parallel -> table_wise on 3 ranks; and column_wise back. Every world
    runs under the emulated accelerator: the sharded state is placed at ``rank:R/cuda:L`` as TorchRec places it on
    a GPU, through DCP save, load and resharding."""
    monkeypatch.setenv("MKT_EMULATE_ACCELERATOR", "1")
    run = str(tmp_path / "tw")
    _train("mem", small_dataset, run, 2, sets=("train.max_steps=6", "schema.tables.age.dim=256",
                                                "train.planner.sharding_type=table_wise"))
    src = checkpoint.latest_checkpoint(run)
    ref = _full(src)
    key = "optim.model.sparse_arch.ebc.embedding_bags.age.weight.age.momentum1"
    rows = ref["model.model.sparse_arch.ebc.embedding_bags.age.weight"].shape[0]
    assert ref[key].shape == (rows,) and ref[key].abs().sum() > 0
    cw_ckpt = checkpoint.checkpoint_dir(str(tmp_path / "cw"), 1)
    targets = (("data_parallel", "cw", 2), ("table_wise", "cw", 3), ("table_wise", "tw", 3))
    carries = {(kind, source, nproc): (_carry, cw_ckpt if source == "cw" else src, kind,
                                       str(tmp_path / f"{kind}-{source}-{nproc}"))
               for kind, source, nproc in targets}
    # one launch per world size: column_wise, then data_parallel from it, on 2 ranks; both table_wise on 3
    two = launch(2, _in_one_world, (_carry, src, "column_wise", str(tmp_path / "cw")),
                 carries["data_parallel", "cw", 2])
    three = launch(3, _in_one_world, carries["table_wise", "cw", 3], carries["table_wise", "tw", 3])
    assert two[0] == cw_ckpt
    cw = _full(two[0])
    assert cw[key].shape == (2 * rows,)  # really split in two column shards
    done = dict(zip(carries, (two[1], *three)))
    for (kind, source, nproc), ckpt in done.items():
        got = _full(ckpt)
        for k in ref:
            if k.startswith("model.") or k.endswith("momentum1"):
                assert torch.equal(got[k], ref[k]), f"{kind} from {source}: {k}"
    for block in _per_row(cw[key], rows):
        assert torch.equal(block, ref[key])


# ------------------------------------------------------------------------------------------------------------
# 7. checkpoints by time, written in the background
# ------------------------------------------------------------------------------------------------------------


def test_time_based_checkpoints_by_default_interval(small_dataset, tmp_path):
    from mkt_torchrec.config import TrainConfig

    assert TrainConfig().checkpoint_every_minutes > 0 and TrainConfig().checkpoint_every == 0
    run = str(tmp_path / "timed")
    _train("mem", small_dataset, run, 2, sets=("train.checkpoint_every_minutes=0.0005", "train.keep_checkpoints=50"))
    steps = sorted(n for n in os.listdir(os.path.join(run, "checkpoints")) if n.startswith("step-"))
    assert len(steps) >= 3  # several saved during training, not only the final one


# ------------------------------------------------------------------------------------------------------------
# 9. options that cannot apply are errors
# ------------------------------------------------------------------------------------------------------------


def test_evaluate_refuses_options_it_would_ignore(small_dataset, mem_run, capsys):
    code = main(["evaluate", "--config", QUICKSTART, "--set", "model.ablation=no_hfa", "--run-dir", mem_run,
                 "--data", small_dataset])
    assert code == 1 and "model.ablation" in capsys.readouterr().err
    code = main(["evaluate", "--config", QUICKSTART, "--set", "train.planner.plan_file=x.json", "--run-dir", mem_run,
                 "--data", small_dataset])
    assert code == 1 and "plan_file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# the main job survives a rank killed in stage 1 and in stage 2
# ------------------------------------------------------------------------------------------------------------


def test_mkt_run_resumes_a_rank_killed_in_each_stage_bit_equal(tmp_path, monkeypatch):
    """Under the emulated accelerator (collectives on the device; sharded state placed at ``rank:R/cuda:L``):
    asynchronous checkpoints in both stages, the frozen MEM's load, resume, evaluate and export."""
    monkeypatch.setenv("MKT_EMULATE_ACCELERATOR", "1")
    sets = _sets("train.checkpoint_every=3", "train.epochs=2", "eval.bootstrap_samples=0", "train.log_every=2")
    run = ["run", "--config", QUICKSTART, *sets, "--runs", "mkt", "--nproc", "2"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    code, err, _ = _mkt(*run, "--out", straight)
    assert code == 0, err[-3000:]
    for fault in ("mem:10", "tem:5"):
        code, err, _ = _mkt(*run, "--out", killed, env={"MKT_FAIL_AT_STEP": fault})
        assert code == 1 and "without a message" in err, err[-3000:]
    code, err, _ = _mkt(*run, "--out", killed)
    assert code == 0, err[-3000:]
    for stage in ("mem", "tem"):
        a = _full(checkpoint.latest_checkpoint(os.path.join(straight, "runs", "mkt", "seed0", stage)))
        b = _full(checkpoint.latest_checkpoint(os.path.join(killed, "runs", "mkt", "seed0", stage)))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stage}: {k}"
        steps = [r["step"] for r in _records(os.path.join(killed, "runs", "mkt", "seed0", stage)) if "loss" in r]
        assert steps == sorted(set(steps)), stage  # the resumed log has no step twice
    assert not [k for k in a if k.startswith("optim.") and ".mem." in k]  # stage 2: the frozen MEM has no state
    for name in ("metrics.json", os.path.join("serving", "model.pt2")):
        assert os.path.isfile(os.path.join(killed, "runs", "mkt", "seed0", "tem", name))
    # a rerun on finished output skips everything; no_tem_finetune's run is MKT's MEM (a rerun refused it once)
    code, err, _ = _mkt(*run[:-4], "--runs", "mkt", "no_tem_finetune", *run[-2:], "--out", killed)
    assert code == 0, err[-3000:]
    code, err, _ = _mkt(*run[:-4], *set_flags("data.batch_size=64"), *run[-4:], "--out", killed)
    assert code == 1 and "was made with other settings for ['data.batch_size']" in err, err[-3000:]


def test_evaluate_again_at_another_world_size_replaces_the_predictions(small_dataset, mem_run, tmp_path):
    """Evaluating with 2 ranks and then 1 used to report the rows of both (old part files were kept)."""
    manifest = json.load(open(os.path.join(small_dataset, "manifest.json")))
    for nproc in (2, 1):
        code, err, _ = _mkt("evaluate", "--config", QUICKSTART, *EVAL, "--run-dir", mem_run, "--data",
                            small_dataset, "--nproc", str(nproc))
        assert code == 0, err[-3000:]
        metrics = json.load(open(os.path.join(mem_run, "metrics.json")))
        assert metrics["world_size"] == nproc
        assert metrics["source"]["rows"] + metrics["target"]["rows"] == sum(manifest["rows"]["test"].values())
        assert len(os.listdir(os.path.join(mem_run, "predictions"))) == nproc


def test_evaluate_without_test_rows_is_a_one_line_error(small_dataset, mem_run, tmp_path, capsys):
    import shutil

    data = str(tmp_path / "data")
    shutil.copytree(small_dataset, data)
    manifest = json.load(open(os.path.join(data, "manifest.json")))
    manifest["splits"]["test"], manifest["rows"]["test"] = [], {"source": 0, "target": 0}
    json.dump(manifest, open(os.path.join(data, "manifest.json"), "w"))
    assert main(["evaluate", "--config", QUICKSTART, *EVAL, "--run-dir", mem_run, "--data", data]) == 1
    err = capsys.readouterr().err.strip()
    assert "the test split has no rows to evaluate" in err and len(err.splitlines()) == 1, err
