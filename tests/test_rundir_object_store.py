"""Run directories on object storage (mkt_torchrec.rundir, training.runlock) against a real S3 server (moto, on
localhost): the lock is a conditional write, records are read from the store, the local copy is pushed and pulled
with markers last and stale files dropped, and a store without an exclusive create is refused."""

from __future__ import annotations

import json
import os

import pytest

from mkt_torchrec import storage
from mkt_torchrec.rundir import RunDir
from mkt_torchrec.training import runlock

pytest_plugins = ["tests.s3"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MKT_RUN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_lock_on_s3_is_exclusive_and_released(s3_bucket, cache):
    run = RunDir(f"{s3_bucket}/runs/a")
    lock = run.lock("mkt train --stage mem")
    assert lock == f"{s3_bucket}/runs/a/.lock" and os.path.isdir(run.path)
    assert json.loads(storage.read_bytes(lock))["pid"] == os.getpid()
    with pytest.raises(ValueError, match=r"runs/a: in use by mkt train --stage mem \(pid \d+ on "):
        RunDir(f"{s3_bucket}/runs/a").lock("mkt evaluate")  # a live holder: this process
    runlock.release(lock)
    assert not storage.exists(lock)
    runlock.release(RunDir(f"{s3_bucket}/runs/a").lock("mkt evaluate"))


def test_a_dead_jobs_lock_on_s3_is_taken_over(s3_bucket, cache, monkeypatch):
    import socket

    lock = f"{s3_bucket}/runs/b/.lock"
    dead = {"job": None, "host": socket.gethostname(), "pid": 2 ** 22 + 12345, "what": "mkt train", "since": "x"}
    storage.write_bytes_atomic(lock, json.dumps(dead).encode())
    monkeypatch.setattr(runlock, "_alive", lambda pid: pid == os.getpid())
    assert RunDir(f"{s3_bucket}/runs/b").lock("mkt train") == lock
    assert json.loads(storage.read_bytes(lock))["pid"] == os.getpid()


def test_only_one_of_two_racing_creates_wins(s3_bucket):
    where = f"{s3_bucket}/x/.lock"
    assert storage.create_exclusive(where, b"first") is True
    assert storage.create_exclusive(where, b"second") is False
    assert storage.read_bytes(where) == b"first"


def test_a_store_without_an_exclusive_create_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^gs://bucket/runs/\.lock: a run directory needs an exclusive create .* use "
                                         r"s3:// or a shared filesystem path$"):
        storage.create_exclusive("gs://bucket/runs/.lock", b"x")


def test_records_are_written_through_and_read_from_the_store(s3_bucket, cache):
    run = RunDir(f"{s3_bucket}/runs/c")
    assert run.remote and not run.exists() and run.path.startswith(str(cache))
    run.write_record({"stage": "mem", "config": {}})
    assert RunDir(f"{s3_bucket}/runs/c").record()["stage"] == "mem"  # another process's view: the store's
    assert os.path.isfile(run.file("run.json"))
    run.mark_done()
    assert RunDir(f"{s3_bucket}/runs/c").done()
    assert run.checkpoints == f"{s3_bucket}/runs/c/checkpoints"


def test_push_mirrors_a_directory_with_its_marker_last_and_pull_restores_it(s3_bucket, cache, tmp_path):
    run = RunDir(f"{s3_bucket}/runs/d")
    os.makedirs(run.predictions)
    for rank in range(3):
        with open(os.path.join(run.predictions, f"part-{rank:05d}.parquet"), "wb") as f:
            f.write(b"rank %d" % rank)
    run.write_metrics({"target": {"auc": 0.5}})  # pushes the predictions, then metrics.json
    assert storage.listdir(f"{s3_bucket}/runs/d/predictions") == [f"part-{r:05d}.parquet" for r in range(3)]
    assert RunDir(run.location).evaluated()
    os.remove(os.path.join(run.predictions, "part-00002.parquet"))  # evaluated again at a world of 2
    run.write_metrics({"target": {"auc": 0.6}})
    assert storage.listdir(f"{s3_bucket}/runs/d/predictions") == ["part-00000.parquet", "part-00001.parquet"]
    assert RunDir(run.location).metrics() == {"target": {"auc": 0.6}}
    with open(run.file("metrics.jsonl"), "w") as f:
        f.write('{"step": 1}\n{"step": 2}\n')
    run.push("metrics.jsonl")
    assert RunDir(run.location).history() == [{"step": 1}, {"step": 2}]
    storage.remove_files(run.location, ["metrics.jsonl"])  # (behind its back: shows what a push sends)
    run.push("metrics.jsonl")
    assert RunDir(run.location).history() == []  # unchanged since this object uploaded it: not sent again
    with open(run.file("metrics.jsonl"), "a") as f:
        f.write('{"step": 3}\n')
    run.push("metrics.jsonl")
    assert [r["step"] for r in RunDir(run.location).history()] == [1, 2, 3]
    other = tmp_path / "elsewhere"  # another machine: an empty local copy
    os.environ["MKT_RUN_CACHE"] = str(other)
    copy = RunDir(run.location)
    copy.pull("predictions", "metrics.jsonl", "tensorboard")
    assert sorted(os.listdir(copy.predictions)) == ["part-00000.parquet", "part-00001.parquet"]
    assert open(copy.file("metrics.jsonl")).read().count("step") == 3
    assert not os.path.exists(copy.tensorboard)  # nothing on the store: nothing here


def test_a_remote_run_directory_serves_one_node(s3_bucket, cache, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(ValueError, match=r"serves the ranks of one node \(16 ranks on 2 nodes here"):
        RunDir(f"{s3_bucket}/runs/e").check_one_node()
    RunDir("/shared/runs/e").check_one_node()  # a shared filesystem path: any number of nodes
