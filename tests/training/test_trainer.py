"""The distributed trainer with real processes: 2 ranks, gloo, CPU (torch elastic launch)."""

import importlib.metadata
import json
import os
from dataclasses import replace

import pytest
import torch

from mkt_torchrec.cli import main
from mkt_torchrec.faults import FAIL_AT_STEP_ENV
from mkt_torchrec.training import checkpoint
from mkt_torchrec.provenance import source_digest
from mkt_torchrec.training.mem_transfer import load_unsharded

from tests.conftest import QUICKSTART, SMALL, set_flags, small_config

TRAIN = ["train.log_every=5", "train.checkpoint_every=10", "data.batch_size=256"]


def _sets(*extra):
    return set_flags(*SMALL, *TRAIN, *extra)


def _train(stage, data, run, nproc=2, *extra_args, sets=()):
    args = ["train", "--config", QUICKSTART, *_sets(*sets), "--stage", stage, "--data", data, "--run-dir", run,
            "--nproc", str(nproc), *extra_args]
    assert main(args) == 0


def _scalars(run, tag):
    """(step, value) of a TensorBoard scalar of RUN/tensorboard, as TensorBoard reads it (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run, "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _final_state(run, stage, *sets):
    cfg = small_config(*TRAIN, *sets)
    return load_unsharded(cfg, stage, checkpoint.latest_checkpoint(run)).state_dict()


@pytest.fixture(scope="module")
def mem_run(small_dataset, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("runs") / "mem")
    _train("mem", small_dataset, run)
    return run


def test_stage1_then_stage2_then_evaluate(small_dataset, mem_run, tmp_path):
    records = [json.loads(line) for line in open(os.path.join(mem_run, "metrics.jsonl"))]
    assert records and {"step", "loss", "bce", "pdl", "rows_per_s", "dense_lr", "embedding_lr"} <= set(records[0])
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [s for s, _ in _scalars(mem_run, "train/loss")] == [s for s, _ in losses]  # and in TensorBoard
    assert [v for _, v in _scalars(mem_run, "train/loss")] == pytest.approx([v for _, v in losses], rel=1e-6)
    assert json.load(open(os.path.join(mem_run, "plan.json")))["world_size"] == 2
    made = json.load(open(os.path.join(mem_run, "run.json")))  # what made the run: code, libraries, machine
    assert made["code"]["source"] == source_digest() and made["code"]["version"]
    assert {"python", "torch", "torchrec", "fbgemm_gpu", "cpu"} <= set(made["environment"])
    assert made["environment"]["torchrec"] == importlib.metadata.version("torchrec")

    tem_run = str(tmp_path / "tem")
    _train("tem", small_dataset, tem_run, 2, "--mem-run", mem_run)
    # the frozen MEM inside stage 2 is bit-identical to the stage-1 result
    mem_state = _final_state(mem_run, "mem")
    tem_state = _final_state(tem_run, "tem")
    mem_keys = [k for k in tem_state if k.startswith("model.mem.")]
    assert mem_keys
    for k in mem_keys:
        assert torch.equal(tem_state[k], mem_state["model." + k[len("model.mem."):]]), k
    assert os.path.isfile(os.path.join(tem_run, "serving", "model.pt2"))

    for run, entities in ((mem_run, {"source", "target"}), (tem_run, {"target"})):
        assert main(["evaluate", "--config", QUICKSTART, "--set", "data.batch_size=128", "--run-dir", run, "--data", small_dataset,
                     "--nproc", "2"]) == 0
        metrics = json.load(open(os.path.join(run, "metrics.json")))
        assert entities <= set(metrics) and not ({"source", "target"} - entities) & set(metrics)
        assert ("hfa_scores" in metrics) == (run == mem_run)  # the MEM's only (see test_evaluate_reports_...)
        manifest = json.load(open(os.path.join(small_dataset, "manifest.json")))
        for e in entities:
            assert metrics[e]["rows"] == manifest["rows"]["test"][e]  # every test row scored exactly once
            assert 0.0 <= metrics[e]["auc"] <= 1.0 and 0.0 <= metrics[e]["gauc"] <= 1.0
        parts = sorted(os.listdir(os.path.join(run, "predictions")))
        assert parts == ["part-00000.parquet", "part-00001.parquet"]


def _hfa_means_unsharded(cfg, ckpt, data):
    """Reference: the unsharded MEM over every test row; each entity's mean score of each of its specific features
    over its own rows, and (to show the check can tell) over all rows."""
    from mkt_torchrec.data.reader import ParquetReader
    from mkt_torchrec.models.mkt import ENTITY_CODE

    mem = load_unsharded(cfg, "mem", ckpt).model.eval()
    own = {e: [0.0, 0] for e in ENTITY_CODE}
    every = {e: [0.0, 0] for e in ENTITY_CODE}
    with torch.no_grad():
        for b in ParquetReader(data, "test", cfg.schema, cfg.data, training=False):
            scores = mem(b.sparse_features, b.dense_features, b.entity).hfa_scores
            for e, code in ENTITY_CODE.items():
                mine = scores[e][b.entity == code].double()
                own[e] = [own[e][0] + mine.sum(0), own[e][1] + len(mine)]
                every[e] = [every[e][0] + scores[e].double().sum(0), every[e][1] + len(b)]
    return ({e: s / n for e, (s, n) in own.items()}, {e: s / n for e, (s, n) in every.items()})


def test_evaluate_reports_the_mems_mean_hfa_score_of_each_specific_feature(small_dataset, mem_run):
    """metrics.json's hfa_scores (2 ranks, sharded, summed on the device and all-reduced) equal each entity's mean
    HFA score over its own test rows computed with the unsharded MEM; keyed by the schema's specific features."""
    assert main(["evaluate", "--config", QUICKSTART, "--set", "data.batch_size=200", "--run-dir", mem_run,
                 "--data", small_dataset, "--nproc", "2"]) == 0
    reported = json.load(open(os.path.join(mem_run, "metrics.json")))["hfa_scores"]
    cfg = small_config(*TRAIN)
    own, every = _hfa_means_unsharded(cfg, checkpoint.final_checkpoint(mem_run), small_dataset)
    assert set(reported) == {"source", "target"}
    for e, means in own.items():
        names = cfg.schema.features_of("specific", e) + cfg.schema.dense_of("specific", e)
        assert list(reported[e]) == names and len(names) == len(means)
        got = torch.tensor([reported[e][n] for n in names], dtype=torch.float64)
        assert ((got > 0) & (got < 2)).all(), reported
        torch.testing.assert_close(got, means, rtol=0, atol=1e-5, msg=e)
        assert (means - every[e]).abs().max() > 1e-3, "own rows and all rows agree: the check could not fail"


def test_stage2_at_another_world_size(small_dataset, mem_run, tmp_path):
    tem_run = str(tmp_path / "tem1")
    _train("tem", small_dataset, tem_run, 1, "--mem-run", mem_run, sets=("train.max_steps=3",))
    assert json.load(open(os.path.join(tem_run, "plan.json")))["world_size"] == 1
    mem_state = _final_state(mem_run, "mem")
    tem_state = _final_state(tem_run, "tem", "train.max_steps=3")
    for k in (k for k in tem_state if k.startswith("model.mem.")):
        assert torch.equal(tem_state[k], mem_state["model." + k[len("model.mem."):]]), k


def test_init_from_mem_starts_the_tems_tables_and_sequence_encoder_from_the_mems(small_dataset, mem_run, tmp_path):
    tem_run = str(tmp_path / "tem-init")
    # train.finetune_dense_lr, not dense_lr, is stage 2's dense rate: at dense_lr=1000 the zero-initialised last layer
    # (mem_logit) would leave 0 in one step
    sets = ("train.max_steps=2", "train.embedding_lr=1e-12", "train.dense_lr=1000", "train.finetune_dense_lr=1e-12",
            "model.tem.init_from_mem=true", "model.tem.mem_logit=true")
    _train("tem", small_dataset, tem_run, 2, "--mem-run", mem_run, sets=sets)
    mem_state = _final_state(mem_run, "mem")
    tem_state = _final_state(tem_run, "tem", *sets)
    last = max((k for k in tem_state if k.startswith("model.tem.top.") and k.endswith(".weight")),
               key=lambda k: int(k.split(".")[3]))
    assert float(tem_state[last].abs().max()) < 1e-6, last
    records = [json.loads(line) for line in open(os.path.join(tem_run, "metrics.jsonl"))]
    assert records and all(r["dense_lr"] == 1e-12 for r in records)
    copied = [k for k in tem_state if k.startswith(("model.tem.sparse_arch.", "model.tem.group_arch.attention."))]
    assert any(".ec." in k for k in copied) and any(".ebc." in k for k in copied) and any("attention" in k for k in copied)
    for k in copied:  # two steps at a learning rate of 1e-12 leave them where the MEM's were
        torch.testing.assert_close(tem_state[k], mem_state["model." + k[len("model.tem."):]], rtol=0, atol=1e-6, msg=k)


def test_killed_run_resumes_to_the_same_parameters(small_dataset, tmp_path, monkeypatch):
    sets = ("train.max_steps=26", "train.epochs=3")  # about 12 steps per epoch
    straight = str(tmp_path / "straight")
    _train("mem", small_dataset, straight, 2, sets=sets)

    killed = str(tmp_path / "killed")
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "15")
    with pytest.raises(Exception):
        _train("mem", small_dataset, killed, 2, sets=sets)
    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    assert checkpoint.latest_checkpoint(killed).endswith("step-00000010")
    _train("mem", small_dataset, killed, 2, "--resume", sets=sets)

    a, b = _final_state(straight, "mem", *sets), _final_state(killed, "mem", *sets)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    extra = checkpoint.read_extra(checkpoint.latest_checkpoint(killed))
    assert extra["step"] == 26 and extra["epoch"] >= 1  # the run crossed an epoch boundary
    assert extra["plan"]["world_size"] == 2 and extra["plan"]["modules"]  # the plan it was saved under
    assert len(extra["readers"]) == 2 and {"epoch", "positions"} <= set(extra["readers"][1])
    # TensorBoard shows one curve: the resumed run's events replace those after the checkpoint, as in metrics.jsonl
    assert _scalars(killed, "train/loss") == _scalars(straight, "train/loss")


def test_existing_run_dir_needs_resume(small_dataset, mem_run, capsys):
    code = main(["train", "--config", QUICKSTART, *_sets(), "--stage", "mem", "--data", small_dataset,
                 "--run-dir", mem_run])
    assert code == 1 and "--resume" in capsys.readouterr().err


def test_plan_file_from_mkt_plan_is_used_by_the_trainer(small_dataset, tmp_path):
    plan = str(tmp_path / "plan.json")
    assert main(["plan", "--config", QUICKSTART, *_sets(), "--world-size", "2", "--local-world-size", "2",
                 "--compute-device", "cpu", "--stage", "mem", "--out", plan]) == 0
    run = str(tmp_path / "planned")
    _train("mem", small_dataset, run, 2, sets=("train.max_steps=2", f"train.planner.plan_file={plan}"))
    given = json.load(open(plan))["modules"]
    used = json.load(open(os.path.join(run, "plan.json")))["modules"]
    assert used and used == given
    with pytest.raises(Exception):  # a plan for another world size is refused, naming it
        _train("mem", small_dataset, str(tmp_path / "refused"), 1,
               sets=("train.max_steps=2", f"train.planner.plan_file={plan}"))
    assert not os.path.exists(tmp_path / "refused")  # before the run directory is made


def test_stage2_refuses_a_mem_of_another_structure(small_dataset, mem_run, tmp_path, capsys):
    code = main(["train", "--config", QUICKSTART, *_sets("model.ablation=no_hfa"), "--stage", "tem",
                 "--data", small_dataset, "--run-dir", str(tmp_path / "tem"), "--mem-run", mem_run])
    assert code == 1 and "['no_hfa']" in capsys.readouterr().err


def test_a_diverging_run_stops_naming_the_steps_and_saves_nothing(small_dataset, tmp_path, capsys):
    run = str(tmp_path / "diverged")
    code = main(["train", "--config", QUICKSTART, *_sets("train.dense_lr=1e30", "train.embedding_lr=1e30",
                                                         "train.log_every=2", "train.max_steps=8"),
                 "--stage", "mem", "--data", small_dataset, "--run-dir", run])
    err = capsys.readouterr().err
    assert code == 1 and "the loss became nan between steps" in err, err
    assert checkpoint.latest_checkpoint(run) is None


def test_stage2_without_target_rows_is_an_error(small_dataset, tmp_path, capsys):
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from mkt_torchrec.data.dataset import DatasetWriter

    data = str(tmp_path / "data")  # the small dataset with its train split's target rows left out (written whole)
    with DatasetWriter(data, small_config().schema) as writer:
        for split in ("train", "test"):
            table = ds.dataset(os.path.join(small_dataset, split), format="parquet").to_table()
            writer.write(split, table.filter(pc.equal(table["entity"], 0)) if split == "train" else table)
    code = main(["train", "--config", QUICKSTART, *_sets("model.ablation=no_mem_pretrain"), "--stage", "tem",
                 "--data", data, "--run-dir", str(tmp_path / "tem")])
    assert code == 1 and "no target-entity rows" in capsys.readouterr().err


def test_broken_run_records_are_one_line_errors_naming_the_file(small_dataset, mem_run, tmp_path, capsys):
    import shutil

    run = str(tmp_path / "copy")
    shutil.copytree(mem_run, run)
    extra = os.path.join(checkpoint.latest_checkpoint(run), "extra.json")
    open(extra, "w").write("{not json")
    args = ["train", "--config", QUICKSTART, *_sets(), "--stage", "mem", "--data", small_dataset, "--run-dir", run,
            "--resume"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert extra in err and "unreadable" in err and len(err.splitlines()) == 1, err
    open(os.path.join(run, "run.json"), "w").write("")
    assert main(["evaluate", "--config", QUICKSTART, "--run-dir", run, "--data", small_dataset]) == 1
    err = capsys.readouterr().err.strip()
    assert os.path.join(run, "run.json") in err and len(err.splitlines()) == 1, err
    a_file = str(tmp_path / "a_file")
    open(a_file, "w").write("x")
    assert main(["train", "--config", QUICKSTART, *_sets(), "--stage", "mem", "--data", small_dataset,
                 "--run-dir", a_file]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_run_json_records_the_attempt_that_trained(small_dataset, mem_run, tmp_path, capsys):
    """A start that failed before its first checkpoint (a --data typo) is recorded anew by the next start; a
    resume with another model is refused."""
    run = str(tmp_path / "run")
    bad = ["train", "--config", QUICKSTART, *_sets(), "--stage", "mem", "--run-dir", run]
    assert main([*bad, "--data", str(tmp_path / "typo")]) == 1
    assert not os.path.exists(run)  # checked before the run directory is made
    assert main([*bad[:3], *_sets("train.max_steps=2"), *bad[3:], "--data", small_dataset]) == 0
    recorded = json.load(open(os.path.join(run, "run.json")))
    assert recorded["data"] == os.path.abspath(small_dataset) and recorded["config"]["train"]["max_steps"] == 2
    capsys.readouterr()
    assert main([*bad[:3], *_sets("model.ablation=no_hfa"), *bad[3:], "--data", small_dataset, "--resume"]) == 1
    assert "other model settings" in capsys.readouterr().err


def test_a_run_directory_serves_one_job_at_a_time(small_dataset, tmp_path, capsys):
    """Two mkt train into one run directory used to both succeed and overwrite each other."""
    import socket
    import subprocess

    from mkt_torchrec.training import runlock

    run = str(tmp_path / "run")
    os.makedirs(run)
    sleeper = subprocess.Popen(["sleep", "60"])  # a live process on this host holds the lock
    try:
        json.dump({"job": "other", "host": socket.gethostname(), "pid": sleeper.pid, "what": "mkt train",
                   "since": "now"}, open(os.path.join(run, runlock.LOCK), "w"))
        args = ["train", "--config", QUICKSTART, *_sets("train.max_steps=2"), "--stage", "mem", "--data",
                small_dataset, "--run-dir", run]
        assert main(args) == 1
        assert f"pid {sleeper.pid}" in capsys.readouterr().err and not os.path.exists(os.path.join(run, "run.json"))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert main(args) == 0  # the holder is gone: its lock is taken over
    assert not os.path.exists(os.path.join(run, runlock.LOCK))  # and released at the end


@pytest.mark.parametrize("model, stage, fine_tuning", [
    ("mkt", "tem", True), ("mkt", "mem", False), ("no_mem_pretrain", "tem", False), ("finetune", "tem", True),
    ("minet", "tem", True), ("finetune", "mem", False), ("din", "tem", False), ("mlp", "tem", False),
    ("mmoe", "mem", False)])
def test_finetune_dense_lr_applies_to_stages_that_start_from_stage_1_only(model, stage, fine_tuning):
    """Models trained from scratch on target rows (single-domain ones, the TEM alone) keep train.dense_lr."""
    from mkt_torchrec.models.build import dense_lr

    name = ("model.ablation=no_mem_pretrain",) if model == "no_mem_pretrain" else (f"model.name={model}",)
    cfg = small_config(*name, "train.dense_lr=0.002", "train.finetune_dense_lr=0.0005")
    assert dense_lr(cfg, stage) == (0.0005 if fine_tuning else 0.002)
    assert dense_lr(small_config(*name, "train.dense_lr=0.002", "train.finetune_dense_lr=null"), stage) == 0.002


def test_the_feed_pins_batches_off_the_main_thread_and_hands_them_over_unchanged(small_dataset):
    """On a GPU the feed pins each batch; a thread of its own does it, ahead of the pipeline. The batches, their
    order, loss weights and reader positions are those of the feed without the thread."""
    import threading

    from mkt_torchrec.data.reader import ParquetReader
    from mkt_torchrec.training.distributed import DistInfo
    from mkt_torchrec.training.feed import Feed

    cfg = small_config("data.batch_size=256")
    info = DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo")
    threads = []

    def pin(batch):  # stands in for Batch.pin_memory (which needs CUDA)
        threads.append(threading.current_thread())
        return batch

    def fed(pin_fn):
        reader = ParquetReader(small_dataset, "train", cfg.schema, cfg.data, rank=0, world_size=1)
        feed = Feed(reader, info, epochs=1, steps=None, pin=pin_fn)
        out = []
        for batch in feed:
            f = feed.handed.popleft()
            out.append((batch.sparse_features.values(), batch.weights, f.rows, f.reader_state, f.epoch_end))
        return out

    plain, pinned = fed(None), fed(pin)
    assert len(plain) == len(pinned) > 3
    assert threads and all(t is not threading.main_thread() for t in threads) and len(threads) == len(plain)
    for a, b in zip(plain, pinned):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]


def test_the_feed_thread_raises_the_readers_error_in_the_trainer(small_dataset):
    from mkt_torchrec.data.reader import ParquetReader
    from mkt_torchrec.training.distributed import DistInfo
    from mkt_torchrec.training.feed import Feed

    cfg = small_config("data.batch_size=256")
    reader = ParquetReader(small_dataset, "train", cfg.schema, cfg.data, rank=0, world_size=1)
    calls = []

    def pin(batch):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("part-00001.parquet: column 'age' row 7: broken")
        return batch

    feed = Feed(reader, DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo"), epochs=1, steps=None, pin=pin)
    with pytest.raises(ValueError, match="column 'age' row 7"):
        for _ in feed:
            pass


def test_train_tf32_sets_the_cuda_matmul_flags_and_the_dense_optimizer_is_fused():
    from mkt_torchrec.training.assembly import configure_dense_math, dense_optimizer

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        configure_dense_math(small_config("train.tf32=false"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        configure_dense_math(small_config())  # the default
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    for name in ("adam", "adagrad", "sgd"):
        opt = dense_optimizer(small_config(f"train.dense_optimizer={name}"), [torch.nn.Parameter(torch.ones(3))], 0.1)
        assert opt.defaults["fused"] is True


def test_train_compile_compiles_the_dense_leaf_modules_and_trains_the_same_values(small_dataset):
    """``train.compile`` wraps HFA, the CKE, extractors, towers and attention in ``torch.compile``; a forward and
    backward through the compiled modules gives the eager loss and gradients (to float tolerance). Dynamo's
    graphs and AOT autograd, without inductor's C++ code generation (over a minute here for these modules)."""
    from mkt_torchrec.data.reader import ParquetReader
    from mkt_torchrec.models.build import build_train_module, compile_dense

    cfg = small_config("data.batch_size=64")
    torch.manual_seed(0)
    eager = build_train_module(cfg, "mem")
    compiled = build_train_module(cfg, "mem")
    compiled.load_state_dict(eager.state_dict())
    names = compile_dense(compiled, backend="aot_eager")
    assert {"model.hfa.source", "model.cke", "model.extractors.target", "model.towers.source"} <= set(names)
    batch = next(iter(ParquetReader(small_dataset, "train", cfg.schema, cfg.data, rank=0, world_size=1)))
    batch = replace(batch, weights=torch.full((len(batch),), 1.0 / len(batch)))
    losses = []
    for model in (eager, compiled):
        loss, _ = model(batch)
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), n
