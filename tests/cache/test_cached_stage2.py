"""Stage 2 with the MEM's knowledge read from a cache version (``model.tem.knowledge: cache``): training, evaluation,
export and ``mkt score``, and the refusals of a version that does not fit the run."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mkt_torchrec.cache.knowledge import CachedKnowledge
from mkt_torchrec.cache.store import open_store
from mkt_torchrec.cli import main
from mkt_torchrec.data.reader import ParquetReader, batch_of_rows
from mkt_torchrec.models.serving import load_serving, padded_ids, serving_keys
from mkt_torchrec.rundir import RunDir
from mkt_torchrec.training import checkpoint
from mkt_torchrec.training.mem_transfer import load_unsharded, mem_record

from tests.cache.test_store import _free_port, redis_server  # noqa: F401 - the session's redis-server fixture
from tests.conftest import QUICKSTART, SMALL, set_flags
from tests.training.test_cluster import _mkt

STEPS = ["train.max_steps=4", "data.batch_size=128", "eval.bootstrap_samples=0"]


def _train(stage, data, run, *extra, sets=()):
    assert main(["train", "--config", QUICKSTART, *set_flags(*SMALL, *STEPS, *sets), "--stage", stage, "--data", data,
                 "--run-dir", run, *extra]) == 0


def _cached(db, version):
    return ["model.tem.knowledge=cache", f"cache.uri={db}", f"cache.version={version}"]


@pytest.fixture(scope="module")
def setup(small_dataset, tmp_path_factory, capsys_module=None):
    """A MEM run, its knowledge built into a snapshot and loaded into a SQLite store; a second MEM (another seed)
    and its own version, loaded into the same store."""
    root = tmp_path_factory.mktemp("cached")
    out = {"root": root, "data": small_dataset, "db": str(root / "knowledge.db")}
    for name, seed in (("mem", 0), ("mem2", 1)):
        run = str(root / name)
        _train("mem", small_dataset, run, sets=[f"train.seed={seed}"])
        snap = str(root / f"snap-{name}")
        assert main(["cache", "build", "--mem-run", run, "--data", small_dataset, "--out", snap]) == 0
        assert main(["cache", "load", "--from", snap, "--to", out["db"]]) == 0
        out[name] = run
        out[f"version-{name}"] = json.load(open(os.path.join(snap, "manifest.json")))["version"]
        out[f"digest-{name}"] = mem_record(checkpoint.final_checkpoint(run))["digest"]
    return out


def _test_rows(cfg, data, n=64):
    reader = ParquetReader(data, "test", cfg.schema, cfg.data, training=False, entity="target", batch_size=n)
    return next(iter(reader))


def test_cached_stage2_trains_evaluates_exports_and_scores_without_the_mem(setup, tmp_path, capsys):
    tem = str(tmp_path / "tem")
    version = setup["version-mem"]
    _train("tem", setup["data"], tem, "--mem-run", setup["mem"], sets=_cached(setup["db"], version))
    record = RunDir(tem).record()
    assert record["cache"]["version"] == version and record["cache"]["mem_digest"] == setup["digest-mem"]
    ckpt = checkpoint.final_checkpoint(tem)
    assert not [k for k in checkpoint.global_sizes(ckpt) if ".mem." in k]  # no MEM in stage 2's state
    assert [k for k in checkpoint.global_sizes(ckpt) if k.startswith("model.model.tem.gates.")]  # the gates train

    # the export takes the knowledge as inputs and holds no MEM table; it equals the training module's forward
    cfg = RunDir(tem).config()
    spec = json.load(open(os.path.join(tem, "serving", "serving.json")))
    hook = CachedKnowledge(cfg)
    assert spec["knowledge"]["cache_version"] == version
    assert spec["dense"]["shape"] == ["B", len(cfg.schema.dense) + hook.width]
    served = load_serving(os.path.join(tem, "serving", "model.pt2"))
    assert not [k for k in served.state_dict() if k.startswith("mem")]
    batch = hook(_test_rows(cfg, setup["data"]))
    module = load_unsharded(cfg, "tem", ckpt).model.eval()
    assert module.mem is None and module.cached is not None
    with torch.no_grad():
        want = torch.sigmoid(module(batch.sparse_features, batch.dense_features))
        got = served(padded_ids(batch.sparse_features, cfg.schema, serving_keys(cfg.schema)), batch.dense_features)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the knowledge is an input that matters: other vectors give other scores
    other = batch.dense_features.clone()
    other[:, len(cfg.schema.dense):] = 0
    with torch.no_grad():
        assert not torch.allclose(module(batch.sparse_features, other), module(batch.sparse_features,
                                                                                  batch.dense_features))

    # evaluation reads the same version, and records how much of it the test rows found
    assert main(["evaluate", "--config", QUICKSTART, "--run-dir", tem, "--data", setup["data"]]) == 0
    metrics = RunDir(tem).metrics()
    assert metrics["cache"]["version"] == version and 0 < metrics["cache"]["found_rank0"]["user"] <= 1

    # mkt score: the same probabilities as the served model on the same rows, whatever the batch size
    files = sorted(os.path.join(setup["data"], "test", f) for f in os.listdir(os.path.join(setup["data"], "test")))
    table = pq.read_table(files[0])
    table = table.filter(pa.compute.equal(table.column("entity"), 1)).drop_columns(["label", "entity"])
    requests = str(tmp_path / "requests.parquet")
    pq.write_table(table, requests)
    scores = {}
    for size in (7, 4096):
        out = str(tmp_path / f"scores-{size}.parquet")
        assert main(["score", "--run", tem, "--requests", requests, "--out", out, "--cache", setup["db"],
                     "--batch-size", str(size)]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["rows"] == table.num_rows and summary["lookup_ms"]["p99"] >= summary["lookup_ms"]["p50"] > 0
        scores[size] = pq.read_table(out).column("score").to_numpy()
    np.testing.assert_allclose(scores[7], scores[4096], rtol=1e-5, atol=1e-6)
    first = batch_of_rows(table.slice(0, 5).append_column("entity", pa.array([1] * 5)).append_column(
        "label", pa.array([0] * 5)), cfg.schema, "requests")
    first = hook(first)
    with torch.no_grad():
        direct = served(padded_ids(first.sparse_features, cfg.schema, serving_keys(cfg.schema)), first.dense_features)
    np.testing.assert_allclose(scores[7][:5], direct.numpy(), rtol=1e-5, atol=1e-6)

    # a version of another MEM: refused by mkt score unless asked for (a stale cache), then scored
    out = str(tmp_path / "stale.parquet")
    code = main(["score", "--run", tem, "--requests", requests, "--out", out, "--cache", setup["db"], "--version",
                 setup["version-mem2"]])
    err = capsys.readouterr().err
    assert code == 1 and setup["digest-mem2"] in err and setup["digest-mem"] in err, err
    assert main(["score", "--run", tem, "--requests", requests, "--out", out, "--cache", setup["db"], "--version",
                 setup["version-mem2"], "--any-mem"]) == 0
    assert not np.allclose(pq.read_table(out).column("score").to_numpy(), scores[7])


def test_a_version_that_does_not_fit_the_run_is_refused_in_one_line(setup, tmp_path, capsys):
    data, db = setup["data"], setup["db"]
    args = ["train", "--config", QUICKSTART, "--stage", "tem", "--data", data, "--run-dir", str(tmp_path / "tem")]

    # another MEM's version
    code = main([*args, *set_flags(*SMALL, *STEPS, *_cached(db, setup["version-mem"])), "--mem-run", setup["mem2"]])
    err = capsys.readouterr().err
    assert code == 1 and setup["digest-mem"] in err and setup["digest-mem2"] in err, err
    assert len(err.strip().splitlines()) == 1

    # a version of another schema (published with this MEM's digest)
    store = open_store(db)
    info = store.info(setup["version-mem"])
    with store.begin("other-schema", info.dims) as writer:
        writer.put("user", np.array([1]), np.zeros((1, info.dims["user"]), np.float32))
        writer.publish({**info.meta, "version": "other-schema", "schema_digest": "0123456789abcdef"})
    code = main([*args, *set_flags(*SMALL, *STEPS, *_cached(db, "other-schema")), "--mem-run", setup["mem"]])
    err = capsys.readouterr().err
    assert code == 1 and "0123456789abcdef" in err and "schema" in err, err

    # a version the store does not hold; no store or version at all; the MEM's logit (not cached)
    code = main([*args, *set_flags(*SMALL, *STEPS, *_cached(db, "nope")), "--mem-run", setup["mem"]])
    err = capsys.readouterr().err
    assert code == 1 and "nope" in err and setup["version-mem"] in err, err
    code = main([*args, *set_flags(*SMALL, *STEPS, "model.tem.knowledge=cache"), "--mem-run", setup["mem"]])
    assert code == 1 and "cache.uri" in capsys.readouterr().err
    code = main([*args, *set_flags(*SMALL, *STEPS, *_cached(db, setup["version-mem"]), "model.tem.mem_logit=true"),
                 "--mem-run", setup["mem"]])
    assert code == 1 and "mem_logit" in capsys.readouterr().err
    # a store that cannot be reached; a password in the URI (every run.json would keep it)
    unreachable = f"redis://127.0.0.1:{_free_port()}/0"
    code = main([*args, *set_flags(*SMALL, *STEPS, *_cached(unreachable, "v")), "--mem-run", setup["mem"]])
    err = capsys.readouterr().err
    assert code == 1 and unreachable in err and len(err.strip().splitlines()) == 1, err
    code = main([*args, *set_flags(*SMALL, *STEPS, *_cached("redis://u:hunter2@127.0.0.1:1/0", "v")), "--mem-run",
                 setup["mem"]])
    err = capsys.readouterr().err
    assert code == 2 and "REDISCLI_AUTH" in err and "hunter2" not in err, err
    assert not os.path.exists(str(tmp_path / "tem" / "checkpoints"))


def test_cached_stage2_at_two_ranks_on_redis_and_scored_with_a_stale_version(setup, redis_server, tmp_path):  # noqa: F811
    """Both ranks read the version from a real redis-server; evaluation with another MEM's version (what a stale
    cache costs) writes beside the run and records that version."""
    url = redis_server
    for name in ("mem", "mem2"):
        assert main(["cache", "load", "--from", str(setup["root"] / f"snap-{name}"), "--to", url]) == 0
    tem = str(tmp_path / "tem")
    code, err, _ = _mkt("train", "--config", QUICKSTART, *set_flags(*SMALL, *STEPS, *_cached(url, setup["version-mem"])),
                        "--stage", "tem", "--data", setup["data"], "--run-dir", tem, "--mem-run", setup["mem"],
                        "--nproc", "2")
    assert code == 0, err[-3000:]
    assert RunDir(tem).record()["world_size"] == 2 and RunDir(tem).exported()
    assert "password" not in open(os.path.join(tem, "run.json")).read()
    stale = str(tmp_path / "stale")
    assert main(["evaluate", "--config", QUICKSTART, "--run-dir", tem, "--data", setup["data"], "--cache-version",
                 setup["version-mem2"], "--into", stale]) == 0
    assert RunDir(stale).metrics()["cache"]["version"] == setup["version-mem2"]
    assert not RunDir(tem).evaluated()  # the run itself was left as it was
