"""Careless and hostile inputs to the run directory, the export, checkpoints and the lock (issue 27, third pass).

Each case ends in one line naming what is wrong (file, key, path) or in correct behaviour, never in a deleted
directory, another run's weights, a traceback or a lock that blocks for 15 minutes:

* ``mkt export --out`` replaces only an earlier export (a directory with serving.json), never other files;
* checkpoint pointers (``latest``, ``best``) resolve inside the run's own ``checkpoints/`` only;
* a validation split too small for GAUC stops the run (before training when the manifest shows it, else at the first
  validation), and a NaN criterion is never the best epoch;
* a full disk during a checkpoint (DCP's own writer failing part-way) is one line, the partial step removed and the
  previous checkpoint still the latest;
* a lock that could not be written whole is not a lock.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import math
import os
import resource
import shutil
import signal
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint.filesystem as dcp_filesystem

from mkt_torchrec import storage
from mkt_torchrec.cli import main
from mkt_torchrec.training import checkpoint, export, runlock
from mkt_torchrec.training.distributed import _free_port
from mkt_torchrec.training.export import export_run
from mkt_torchrec.training.recipe import is_eligible

from tests.conftest import QUICKSTART, SMALL, set_flags, small_config

pytest_plugins = ["tests.s3"]


def _train(data: str, run: str, *sets: str) -> int:
    return main(["train", "--config", QUICKSTART, "--stage", "mem", "--data", data, "--run-dir", run,
                 *set_flags(*SMALL, *sets)])


def _error_line(capsys) -> str:
    """The command's one error line (stderr also carries the log); no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def served(small_dataset, tmp_path_factory) -> str:
    """A finished run mkt export serves: a MEM trained under no_tem_finetune (3 steps, one checkpoint)."""
    run = str(tmp_path_factory.mktemp("hostile") / "mem")
    assert _train(small_dataset, run, "train.max_steps=3", "model.ablation=no_tem_finetune") == 0
    return run


# ---------------------------------------------------------------------------------------------------- case 1
def test_export_replaces_an_earlier_export_and_nothing_else(served, tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("precious")
    assert main(["export", "--run-dir", served, "--out", str(victim)]) == 1
    line = _error_line(capsys)
    assert f"{victim}: exists and is not a serving export of mkt export (it has no serving.json)" in line
    assert os.listdir(victim) == ["thesis.txt"] and (victim / "thesis.txt").read_text() == "precious"

    plain = tmp_path / "plain"
    plain.write_text("notes")
    assert main(["export", "--run-dir", served, "--out", str(plain)]) == 1
    assert f"{plain}: exists and is not a serving export" in _error_line(capsys)
    assert plain.read_text() == "notes"
    assert sorted(os.listdir(tmp_path)) == ["plain", "victim"]  # nothing moved aside, no partial export left

    out = tmp_path / "serving"
    out.mkdir()  # an empty directory may be filled
    assert main(["export", "--run-dir", served, "--out", str(out)]) == 0
    assert main(["export", "--run-dir", served, "--out", str(out)]) == 0  # an earlier export is replaced
    assert sorted(os.listdir(out)) == ["model.pt2", "serving.json"]


def test_what_appears_at_the_output_during_an_export_is_not_replaced(served, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = export.export_serving

    def racing(*args, **kwargs):  # another process creates the output while this one exports
        real(*args, **kwargs)
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")

    monkeypatch.setattr(export, "export_serving", racing)
    with pytest.raises(FileExistsError, match=f"{out}: exists and is not a serving export"):
        export_run(served, out_dir=str(out))
    assert os.listdir(out) == ["theirs.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_a_file_in_the_way_of_an_output_directory_is_named(served, tmp_path, capsys):
    (tmp_path / "notes").write_text("a file")
    assert main(["export", "--run-dir", served, "--out", str(tmp_path / "notes" / "serving")]) == 1
    line = _error_line(capsys)
    assert f"{tmp_path / 'notes'}: is a file where a directory is needed" in line and "Errno" not in line
    assert (tmp_path / "notes").read_text() == "a file"


def test_an_output_created_by_another_job_during_the_rename_is_named(tmp_path, monkeypatch):
    """replace_dir moves the previous output aside, then renames the new one in; another job creating the output in
    between used to surface as a raw ``[Errno 39] Directory not empty`` (and a second one from moving back)."""
    from mkt_torchrec import fsutil

    final, tmp = tmp_path / "out", tmp_path / ".out.partial"
    final.mkdir()
    (final / "serving.json").write_text("previous")
    tmp.mkdir()
    (tmp / "serving.json").write_text("new")
    real = os.rename

    def rename(src, dst):
        real(src, dst)
        if os.fspath(src) == str(final):  # the previous output is aside: the other job writes its own now
            final.mkdir()
            (final / "theirs.txt").write_text("theirs")

    monkeypatch.setattr(fsutil.os, "rename", rename)
    with pytest.raises(FileExistsError, match=f"{final}: was created by another process while this one wrote its "
                                              r"output \(the previous one is at .*\.old-"):
        fsutil.replace_dir(str(tmp), str(final))
    assert os.listdir(final) == ["theirs.txt"] and (tmp / "serving.json").read_text() == "new"


# ---------------------------------------------------------------------------------------------------- case 5
def test_checkpoint_pointers_resolve_inside_the_run_only(served, small_dataset, tmp_path, capsys):
    victim, other = str(tmp_path / "victim"), str(tmp_path / "other")
    shutil.copytree(served, victim)
    shutil.copytree(served, other)
    name = os.path.basename(checkpoint.latest_checkpoint(served))
    latest = os.path.join(victim, "checkpoints", "latest")
    escapes = [f"../../other/checkpoints/{name}", os.path.join(other, "checkpoints", name),
               f"{name}/../../../other/checkpoints/{name}"]
    for pointer in escapes:
        with open(latest, "w") as f:
            f.write(pointer)
        with pytest.raises(ValueError, match="not a checkpoint of this run"):
            checkpoint.latest_checkpoint(victim)
    with open(os.path.join(victim, "checkpoints", "best"), "w") as f:  # the pointer evaluate and export prefer
        f.write(os.path.join(other, "checkpoints", name))
    with pytest.raises(ValueError, match=r"checkpoints/best names .* not a checkpoint of this run"):
        checkpoint.final_checkpoint(victim)
    assert main(["evaluate", "--config", QUICKSTART, "--run-dir", victim, "--data", small_dataset,
                 *set_flags("data.batch_size=128")]) == 1
    assert "checkpoints/best names" in _error_line(capsys)
    assert not os.path.exists(os.path.join(victim, "metrics.json"))
    assert not os.path.exists(os.path.join(victim, ".lock"))
    # a step directory that is a link to another run's checkpoint
    os.remove(os.path.join(victim, "checkpoints", "best"))
    os.symlink(os.path.join(other, "checkpoints", name), os.path.join(victim, "checkpoints", "step-99999999"))
    with open(latest, "w") as f:
        f.write("step-99999999")
    with pytest.raises(ValueError, match="a link to .*outside this run's checkpoints"):
        checkpoint.latest_checkpoint(victim)


def test_a_pointer_on_object_storage_resolves_inside_the_run_only(s3_bucket):
    run, other = f"{s3_bucket}/runs/x", f"{s3_bucket}/runs/other"
    storage.write_bytes_atomic(f"{other}/checkpoints/step-00000001/extra.json", b'{"step": 1}')
    for pointer in ("../other/checkpoints/step-00000001", f"{other}/checkpoints/step-00000001"):
        storage.write_bytes_atomic(f"{run}/checkpoints/latest", pointer.encode())
        with pytest.raises(ValueError, match="not a checkpoint of this run"):
            checkpoint.latest_checkpoint(run)


# ---------------------------------------------------------------------------------------------------- case 4
def test_a_nan_criterion_is_never_the_best_epoch():
    nan = math.nan
    assert not is_eligible({"gauc": nan, "auc": 0.6, "logloss": 0.40, "base_logloss": 0.5}, "gauc", 0.40)
    assert not is_eligible({"gauc": 0.6, "auc": 0.6, "logloss": nan, "base_logloss": 0.5}, "logloss")
    assert is_eligible({"gauc": 0.6, "auc": 0.6, "logloss": 0.40, "base_logloss": 0.5}, "gauc", 0.40)


def test_a_validation_split_too_small_for_gauc_is_refused_before_training(small_dataset, tmp_path, capsys):
    run = str(tmp_path / "tiny")
    assert _train(small_dataset, run, "data.validation_fraction=0.0001", "train.patience=1") == 1
    line = _error_line(capsys)
    assert ("the validation split (data.validation_fraction=0.0001) has 1 target row: train.stop_on=gauc needs at "
            "least one user with both a click and a non-click") in line
    assert checkpoint.latest_checkpoint(run) is None


def _valid_split(data: str, fraction: float) -> tuple:
    """(rows, users with both classes, users with a click) of the target validation rows."""
    from mkt_torchrec.data.reader import ParquetReader

    cfg = small_config(f"data.validation_fraction={fraction}")
    labels, rows = collections.defaultdict(set), 0
    for batch in ParquetReader(data, "valid", cfg.schema, replace(cfg.data, num_workers=0), training=False,
                               entity="target"):
        for user, label in zip(batch.user_id.tolist(), batch.labels.tolist(), strict=True):
            labels[user].add(label > 0.5)
            rows += 1
    return rows, sum(len(v) == 2 for v in labels.values()), sum(True in v for v in labels.values())


def test_a_nan_validation_criterion_stops_the_run_naming_the_fraction(small_dataset, tmp_path, capsys):
    """7 target validation rows of 7 users, 4 of them clicks (so neither the row count nor the manifest's clicks
    can tell before training), no user with both a click and a non-click: GAUC is NaN."""
    rows, mixed, clicked = _valid_split(small_dataset, 0.005)
    assert rows >= 2 and 0 < clicked < rows and mixed == 0  # the case this test is about
    run = str(tmp_path / "nan")
    assert _train(small_dataset, run, "data.validation_fraction=0.005", "train.patience=1", "train.epochs=2") == 1
    line = _error_line(capsys)
    assert "validation after epoch 0: gauc is NaN on the target validation rows of data.validation_fraction=0.005" in line
    assert "no user there has both a click and a non-click; raise data.validation_fraction" in line
    assert checkpoint.latest_checkpoint(run, checkpoint.BEST) is None  # no epoch was chosen
    assert not os.path.exists(os.path.join(run, "serving")) and not os.path.exists(os.path.join(run, ".lock"))


# ---------------------------------------------------------------------------------------------------- case 13
@contextlib.contextmanager
def _disk_full_in(monkeypatch, step_dir: str, after_bytes: int = 600):
    """DCP's filesystem writer runs out of space part-way through the data files of ``step_dir``: its stream's
    ``write`` raises ENOSPC once ``after_bytes`` were written (what a full disk does to ``write(2)``)."""
    real = dcp_filesystem.FileSystem.create_stream

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, b):
            if self.written + len(b) > after_bytes:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(b)
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as f:
            yield Full(f) if step_dir in str(path) and str(path).endswith(".distcp") else f

    monkeypatch.setattr(dcp_filesystem.FileSystem, "create_stream", create_stream)
    yield


def test_disk_full_during_an_async_checkpoint_is_one_line(small_dataset, tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "full")
    with _disk_full_in(monkeypatch, "step-00000004"):
        assert _train(small_dataset, run, "train.max_steps=4", "train.checkpoint_every=2") == 1
    line = _error_line(capsys)
    assert (f"{run}/checkpoints/step-00000004: writing the checkpoint failed: the disk is full (OSError: [Errno 28] "
            "No space left on device); the partial checkpoint was removed; step-00000002 is still the latest "
            "checkpoint: free space, then resume with mkt train --resume") in line
    assert "CheckpointException" not in line
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", "step-00000002"]
    assert checkpoint.latest_checkpoint(run) == os.path.join(run, "checkpoints", "step-00000002")
    assert not os.path.exists(os.path.join(run, ".lock"))


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_disk_full_during_a_blocking_checkpoint_is_one_line(tmp_path, monkeypatch, world_of_one):
    run = str(tmp_path / "run")
    state = {"model.w": torch.arange(600.0)}
    extra = {"step": 1, "epoch": 0, "readers": []}
    checkpoint.save(run, 1, state, extra, is_main=True, keep=2)
    with _disk_full_in(monkeypatch, "step-00000002"):
        with pytest.raises(OSError, match=r"step-00000002: writing the checkpoint failed: the disk is full \(OSError: "
                                          r"\[Errno 28\] No space left on device\); the partial checkpoint was "
                                          r"removed; step-00000001 is still the latest checkpoint"):
            checkpoint.save(run, 2, state, {**extra, "step": 2}, is_main=True, keep=2)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", "step-00000001"]


# ---------------------------------------------------------------------------------------------------- case 14
@contextlib.contextmanager
def _file_size_limit(size: int):
    """Files of this process cannot grow past ``size`` bytes (``RLIMIT_FSIZE``; a write past it fails, as on a full
    disk, with EFBIG instead of ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_lock_that_cannot_be_written_whole_is_not_left_behind(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with _file_size_limit(8), pytest.raises(OSError) as failed:
        runlock.acquire(str(run), "mkt evaluate")
    assert str(failed.value).startswith(f"{run}/.lock: could not write the run directory's lock")
    assert os.listdir(run) == []  # no empty lock, no temporary file
    runlock.release(runlock.acquire(str(run), "mkt evaluate"))  # space is back: the next job runs at once


@pytest.mark.parametrize("content", [b"", b"\n", b"{}", b'{"pid": 1', b"[]"])
def test_an_empty_or_unparsable_lock_is_taken_over_at_once_with_a_note(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_bytes(content)  # left by a release that wrote the lock in place on a full disk
    notes = []

    class Keep(logging.Handler):
        def emit(self, record):
            notes.append(record.getMessage())

    logger = logging.getLogger("mkt.lock")
    keep = Keep()
    logger.addHandler(keep)
    try:
        path = runlock.acquire(str(run), "mkt train")
    finally:
        logger.removeHandler(keep)
    assert len(notes) == 1 and notes[0].startswith(f"{run}/.lock: ") and "taking it over" in notes[0]
    assert (run / ".lock").read_bytes() != content
    runlock.release(path)
