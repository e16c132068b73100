"""mkt_torchrec.storage without a server: locations, secrets, and datasets on file:// and fsspec's memory://
(S3 itself: tests/data/test_object_store.py)."""

from __future__ import annotations

import os
import uuid

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from mkt_torchrec import storage
from mkt_torchrec.data.dataset import DatasetWriter, open_dataset
from mkt_torchrec.data.reader import ParquetReader
from tests.conftest import small_config


def test_locations_join_display_and_record_without_secrets(tmp_path):
    assert storage.is_uri("s3://b/ds") and storage.is_uri("file:///tmp/x") and not storage.is_uri("data/s3:x")
    assert storage.join("s3://b/ds/", "train", "part.parquet") == "s3://b/ds/train/part.parquet"
    assert storage.join("s3://b/ds?region=eu-west-1", "manifest.json") == "s3://b/ds/manifest.json?region=eu-west-1"
    assert storage.join("data/ds", "manifest.json") == os.path.join("data/ds", "manifest.json")
    assert storage.absolute("s3://b/ds") == "s3://b/ds" and storage.absolute("ds") == os.path.abspath("ds")
    assert storage.display("s3://b/ds") == "s3://b/ds"
    assert storage.display("hdfs://user:hunter2@nn:8020/ds") == "hdfs://user:***@nn:8020/ds"
    assert storage.display("abfs://c@acct.dfs.core.windows.net/ds?sig=abc&x=1") == \
        "abfs://c@acct.dfs.core.windows.net/ds?sig=***&x=1"
    fs, path = storage.filesystem("relative/ds")
    assert isinstance(fs, pafs.LocalFileSystem) and path == os.path.abspath("relative/ds")


@pytest.mark.parametrize("uri", ["s3://AKIA:hunter2@bucket/ds", "gs://token@bucket/ds", "hdfs://u:hunter2@nn/ds",
                                 "s3://bucket/ds?secret_key=hunter2", "abfs://c@a.dfs.core.windows.net/ds?sig=hunter2"])
def test_a_uri_carrying_credentials_is_refused_in_one_line(uri):
    with pytest.raises(ValueError, match="the URI carries credentials") as e:
        storage.filesystem(uri)
    assert "hunter2" not in str(e.value) and "\n" not in str(e.value)


def test_an_unknown_scheme_is_one_line():
    with pytest.raises(ValueError, match=r"nosuch://x/ds: no filesystem for scheme 'nosuch'"):
        storage.filesystem("nosuch://x/ds")


def _small_tables(src: str, n: int = 2):
    manifest = open_dataset(src, small_config().schema, check_files=False)
    return [(split, pq.ParquetFile(os.path.join(src, f.path)).read_row_group(0))
            for split, files in manifest.splits.items() for f in files[:n]]


def _write(out: str, tables, overwrite: bool = False):
    with DatasetWriter(out, small_config().schema, optional=("true_prob", "activity"), rows_per_file=400,
                       row_group_rows=200, overwrite=overwrite) as w:
        for split, table in tables:
            w.write(split, table)
        return w.close()


def _rows(data: str) -> list:
    cfg = small_config("data.validation_fraction=0")
    return [(u, e, lab) for split in ("train", "test")
            for b in ParquetReader(data, split, cfg.schema, cfg.data, training=False)
            for u, e, lab in zip(b.user_id.tolist(), b.entity.tolist(), b.labels.tolist())]


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_a_dataset_round_trips_through_a_uri(small_dataset, tmp_path, scheme):
    """file:// is the local filesystem (renamed into place, file names as a local write gives them); memory:// is
    an fsspec filesystem behind pyarrow's PyFileSystem (published like an object store)."""
    tables = _small_tables(small_dataset)
    local = _write(str(tmp_path / "local"), tables)
    uri = f"file://{tmp_path}/ds" if scheme == "file" else f"memory://mkt-test-{uuid.uuid4().hex[:8]}/ds"
    written = _write(uri, tables)
    assert written.rows == local.rows and _rows(uri) == _rows(str(tmp_path / "local"))
    paths = [f.path for fs in written.splits.values() for f in fs]
    if scheme == "file":
        assert paths == [f.path for fs in local.splits.values() for f in fs]
        assert sorted(os.listdir(tmp_path)) == ["ds", "local"]  # no .tmp-* left behind
    else:
        assert all(storage.is_attempt_file(p) for p in paths)
        again = _write(uri, tables, overwrite=True)  # the old version's files go once the new manifest is in
        assert set(storage.listdir(uri, recursive=True)) == {"manifest.json", *(f.path for fs in again.splits.values()
                                                                                for f in fs)}
        storage.remove_tree(uri)
        assert not storage.exists(uri)


def test_write_bytes_atomic_replaces_a_local_file_whole(tmp_path):
    target = str(tmp_path / "sub" / "manifest.json")
    storage.write_bytes_atomic(target, b"one")
    storage.write_bytes_atomic(target, b"two")
    assert storage.read_bytes(target) == b"two" and os.listdir(tmp_path / "sub") == ["manifest.json"]
