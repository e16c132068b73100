"""Datasets on object storage, against a real S3 server on localhost (moto, :mod:`tests.s3`): written by
DatasetWriter, published without a rename, read by ParquetReader, and used by ``mkt inspect`` / ``rewrite`` /
``train`` with ``--data s3://...``."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mkt_torchrec import storage
from mkt_torchrec.cli import main
from mkt_torchrec.data.dataset import (
    DatasetWriter,
    FileInfo,
    Manifest,
    open_dataset,
    publish_manifest,
    stage_dataset,
)
from mkt_torchrec.data.reader import ParquetReader
from tests.conftest import QUICKSTART, REPO, SMALL, set_flags, small_config

pytest_plugins = ["tests.s3"]  # the fixtures s3_server, s3_bucket

OPTIONAL = ("true_prob", "activity")


def _tables(src: str, row_groups: int = 0) -> list[tuple[str, pa.Table]]:
    """(split, row group) of the dataset ``src`` in manifest order; only the first ``row_groups`` of each split
    if given."""
    with open(os.path.join(src, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    out = []
    for split, files in manifest["splits"].items():
        groups = [(f["path"], rg) for f in files for rg in range(len(f["row_groups"]))]
        for path, rg in groups[:row_groups or None]:
            out.append((split, pq.ParquetFile(os.path.join(src, path)).read_row_group(rg)))
    return out


def _write(out: str, tables, overwrite: bool = False, fail_after: int = -1):
    """Write ``tables`` with DatasetWriter (small files and row groups: several of each); raise after
    ``fail_after`` tables if it is not -1."""
    with DatasetWriter(out, small_config().schema, optional=OPTIONAL, rows_per_file=1500, row_group_rows=500,
                       overwrite=overwrite) as writer:
        for i, (split, table) in enumerate(tables):
            if i == fail_after:
                raise RuntimeError("injected failure")
            writer.write(split, table)
        writer.set_source({"kind": "test"})
        return writer.close()


def _arrays(reader) -> list[dict[str, np.ndarray]]:
    """Every batch of ``reader`` as plain arrays: the sparse ids and lengths of each key, and the dense parts."""
    out = []
    for b in reader:
        kjt = b.sparse_features
        out.append({"keys": np.array(kjt.keys()), "ids": kjt.values().numpy(), "lengths": kjt.lengths().numpy(),
                    "dense": b.dense_features.numpy(), "labels": b.labels.numpy(), "entity": b.entity.numpy(),
                    "user_id": b.user_id.numpy(), "true_prob": b.true_prob.numpy(), "activity": b.activity.numpy()})
    return out


def _without_paths(manifest) -> dict:
    doc = manifest.to_json()
    for files in doc["splits"].values():
        for f in files:
            f.pop("path")
    return doc


def test_a_dataset_written_to_s3_reads_row_for_row_as_the_same_dataset_written_locally(small_dataset, s3_bucket,
                                                                                       tmp_path):
    tables = _tables(small_dataset)
    local = _write(str(tmp_path / "local"), tables)
    uri = f"{s3_bucket}/datasets/small"
    remote = _write(uri, tables)
    assert _without_paths(remote) == _without_paths(local)
    paths = [f.path for files in remote.splits.values() for f in files]
    assert len(paths) > 2 and all(storage.is_attempt_file(p) for p in paths)  # named with the attempt's token
    assert set(storage.listdir(uri, recursive=True)) == {"manifest.json", *paths}
    cfg = small_config()
    assert _without_paths(open_dataset(uri, cfg.schema)) == _without_paths(local)  # every footer checked too
    for split in ("train", "valid", "test"):
        want = _arrays(ParquetReader(str(tmp_path / "local"), split, cfg.schema, cfg.data, training=False))
        got = _arrays(ParquetReader(uri, split, cfg.schema, cfg.data, training=False))
        assert len(got) == len(want) > 0
        for g, w in zip(got, want):
            assert g.keys() == w.keys() and all(np.array_equal(g[k], w[k]) for k in g), split
    # DataLoader workers open the objects in their own processes
    two = small_config("data.num_workers=2")
    rows = [(u, e) for b in _arrays(ParquetReader(uri, "train", two.schema, two.data)) for u, e in
            zip(b["user_id"], b["entity"])]
    assert sorted(rows) == sorted((u, e) for b in _arrays(ParquetReader(
        str(tmp_path / "local"), "train", cfg.schema, cfg.data, training=False)) for u, e in zip(b["user_id"], b["entity"]))


def test_overwrite_on_s3_replaces_only_a_dataset_and_leaves_one_complete_version(small_dataset, s3_bucket):
    cfg = small_config()
    tables = _tables(small_dataset, row_groups=4)
    uri = f"{s3_bucket}/ds"

    def files(manifest) -> set:
        return {f.path for fs in manifest.splits.values() for f in fs}

    first = _write(uri, tables)
    with pytest.raises(FileExistsError, match=r"ds: already exists \(pass --overwrite"):
        _write(uri, tables)
    second = _write(uri, tables, overwrite=True)
    assert not files(first) & files(second)
    assert set(storage.listdir(uri, recursive=True)) == {"manifest.json"} | files(second)  # the old files are gone

    with pytest.raises(RuntimeError, match="injected failure"):  # an aborted attempt: its files go, the old stay
        _write(uri, tables, overwrite=True, fail_after=len(tables) - 1)
    assert set(storage.listdir(uri, recursive=True)) == {"manifest.json"} | files(second)
    assert open_dataset(uri, cfg.schema).to_json() == second.to_json()
    assert sum(len(b) for b in ParquetReader(uri, "test", cfg.schema, cfg.data, training=False)) == \
        second.split_rows("test")

    killed = stage_dataset(uri, overwrite=True)  # an attempt killed before it could publish or abort
    with killed.open_output("train/part-00000.parquet") as f:
        pq.write_table(tables[0][1], f)
    assert open_dataset(uri, cfg.schema).to_json() == second.to_json()  # readers still see the old version whole
    third = _write(uri, tables, overwrite=True)
    assert set(storage.listdir(uri, recursive=True)) == {"manifest.json"} | files(third)  # the orphan went too

    foreign = f"{s3_bucket}/theirs"
    storage.write_bytes_atomic(f"{foreign}/notes.txt", b"not ours")
    with pytest.raises(FileExistsError, match=r"theirs: exists and is not a dataset \(it has no manifest.json\); "
                                              "refusing to replace it"):
        _write(foreign, tables, overwrite=True)
    assert storage.listdir(foreign, recursive=True) == ["notes.txt"]
    assert storage.read_bytes(f"{foreign}/notes.txt") == b"not ours"

    interrupted = f"{s3_bucket}/interrupted"
    stage_dataset(interrupted).open_output("train/part-00000.parquet").close()
    with pytest.raises(FileNotFoundError, match="interrupted write leaves its files but no manifest"):
        open_dataset(interrupted, cfg.schema)
    _write(interrupted, tables, overwrite=True)  # only an attempt's files: ours to replace
    open_dataset(interrupted, cfg.schema)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_directory_of_parquet_logs_is_not_a_dataset_and_the_error_names_mkt_build(tmp_path, where, request):
    logs = str(tmp_path / "logs") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/logs"
    storage.write_bytes_atomic(storage.join(logs, "day=1", "part-00000-0a1b2c3d-0000-1111-2222-333344445555-c000"
                                                   ".snappy.parquet"), b"x")
    storage.write_bytes_atomic(storage.join(logs, "_SUCCESS"), b"")
    with pytest.raises(FileNotFoundError, match=r"logs: not a dataset, manifest.json is missing and it holds Parquet "
                                                "files: .*`mkt build` turns them into one"):
        open_dataset(logs, small_config().schema)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_staged_dataset_takes_files_written_by_another_process(small_dataset, tmp_path, where, request):
    """The Spark engine's shape: executors (here a subprocess) write part files through the pickled staging
    object; the driver assembles and publishes the manifest."""
    out = str(tmp_path / "ds") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/ds"
    staged = stage_dataset(out)
    table = _tables(small_dataset, row_groups=1)[0][1]
    source = tmp_path / "rows.parquet"
    pq.write_table(table, source)
    job = tmp_path / "staged.pickle"
    job.write_bytes(pickle.dumps(staged))
    script = ("import pickle, sys; import pyarrow.parquet as pq; staged = pickle.load(open(sys.argv[1], 'rb'))\n"
              "with staged.open_output('train/part-00000.parquet') as f: pq.write_table(pq.read_table(sys.argv[2]), f)")
    env = {**os.environ, "PYTHONPATH": REPO}
    subprocess.run([sys.executable, "-c", script, str(job), str(source)], check=True, env=env, timeout=60)
    name = staged.name("train/part-00000.parquet")
    template = open_dataset(small_dataset, small_config().schema, check_files=False)
    entity = int(table.column("entity")[0].as_py())  # a row group of one entity
    manifest = Manifest(
        format_version=template.format_version, schema_digest=template.schema_digest, columns=template.columns,
        optional_columns=template.optional_columns,
        rows={"train": {"source": table.num_rows * (entity == 0), "target": table.num_rows * (entity == 1)}},
        splits={"train": [FileInfo(path=name, rows=table.num_rows, row_groups=[table.num_rows],
                                   row_group_entity=[entity])]})
    publish_manifest(staged, manifest)
    cfg = small_config("data.validation_fraction=0")
    assert sum(len(b) for b in ParquetReader(out, "train", cfg.schema, cfg.data, training=False)) == table.num_rows


def test_a_uri_with_credentials_is_refused_without_echoing_them(s3_bucket, capsys, tmp_path):
    secret = "wJalrXUtnFEMI-example-secret"
    for uri in (f"s3://AKIAEXAMPLE:{secret}@{s3_bucket[5:]}/ds", f"{s3_bucket}/ds?secret_key={secret}"):
        with pytest.raises(ValueError, match="the URI carries credentials") as e:
            open_dataset(uri, small_config().schema)
        assert secret not in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(ValueError, match="the URI carries credentials"):
            _write(uri, [])
        assert main(["inspect", "--config", QUICKSTART, *set_flags(*SMALL), "--data", uri]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and secret not in err and "AWS_SECRET_ACCESS_KEY" in err, err
    assert storage.display(f"s3://AKIAEXAMPLE:{secret}@bucket/ds") == "s3://AKIAEXAMPLE:***@bucket/ds"
    # `mkt run --data` takes no URI yet: refused without echoing the secret either
    assert main(["run", "--config", QUICKSTART, "--out", str(tmp_path / "out"), "--data",
                 f"s3://AKIAEXAMPLE:{secret}@bucket/ds"]) == 1
    err = capsys.readouterr().err
    assert "s3://AKIAEXAMPLE:***@bucket/ds" in err and secret not in err


def test_a_missing_bucket_or_an_unreachable_endpoint_is_one_line_naming_the_variables(s3_bucket, monkeypatch,
                                                                                      capsys):
    cfg = small_config()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a-secret-value")
    missing = "s3://no-such-bucket-here/ds"
    assert main(["inspect", "--config", QUICKSTART, *set_flags(*SMALL), "--data", missing]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mkt inspect: error: {missing}: bucket 'no-such-bucket-here' does not exist"), err
    assert len(err.splitlines()) == 1 and "AWS_ENDPOINT_URL" in err and "a-secret-value" not in err
    with pytest.raises(OSError, match="bucket 'no-such-bucket-here' does not exist"):
        _write(missing, [])

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    with pytest.raises(OSError) as e:
        open_dataset(f"{s3_bucket}/ds", cfg.schema)
    message = str(e.value)
    assert message.startswith(f"{s3_bucket}/ds/manifest.json: reading failed: ") and "Could not connect" in message
    assert "\n" not in message and "a-secret-value" not in message
    looked, found = message.split("looked for ")[1].split(" (found: ")
    assert {"AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "~/.aws/credentials"} <= set(looked.split(", "))
    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= set(found.split(", "))


def test_rewrite_inspect_and_train_take_an_s3_dataset_on_the_command_line(small_dataset, s3_bucket, tmp_path,
                                                                          capsys):
    uri = f"{s3_bucket}/ds"
    sets = set_flags(*SMALL)
    assert main(["rewrite", "--config", QUICKSTART, *sets, "--data", small_dataset, "--out", uri]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == uri
    manifest = json.loads(storage.read_bytes(f"{uri}/manifest.json"))
    assert manifest["source"]["rewritten_from"]["path"] == small_dataset
    assert main(["inspect", "--config", QUICKSTART, *sets, "--data", uri, "--split", "test"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["data"] == uri and summary["rows"] == manifest["rows"]["test"]

    run = str(tmp_path / "mem")
    assert main(["train", "--config", QUICKSTART, *set_flags(*SMALL, "train.max_steps=2"), "--stage", "mem",
                 "--data", uri, "--run-dir", run]) == 0, capsys.readouterr().err
    assert os.path.isdir(os.path.join(run, "checkpoints"))
    assert not os.path.exists(os.path.join(os.getcwd(), "s3:"))
