"""`mkt build --engine spark` writes the same dataset as DuckDB, row for row (Spark in local mode; Java needed)."""

from __future__ import annotations

import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mkt_torchrec.build.run import build_dataset

from tests.build.logs import write_logs
from tests.build.test_build import _config, dataset_rows

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs Java 17 (make install adds it)")


def test_spark_and_duckdb_write_the_same_rows(tmp_path, capsys):
    write_logs(str(tmp_path / "logs"), rows=1500, seed=3)
    day = sorted(os.listdir(tmp_path / "logs"))[1]  # a writer's retry: 5 rows again in another file of their day
    first = pq.read_table(tmp_path / "logs" / day / "part-00000-5a1b.c000.snappy.parquet").slice(3, 5)
    retry = first.set_column(first.schema.get_field_index("spark_noise"), "spark_noise",  # a column nobody maps
                             pa.array([0.5] * 5))
    pq.write_table(retry, tmp_path / "logs" / day / "part-00002-5a1b.c000.snappy.parquet")
    cfg = _config(tmp_path, row_group_rows=97, entity={"column": "item_type", "unknown": "drop",
                                                        "values": {"product": "source", "post": "target"}})
    duck = build_dataset(cfg, str(tmp_path / "duck"), engine="duckdb")
    spark = build_dataset(cfg, str(tmp_path / "spark"), engine="spark")
    assert spark.rows == duck.rows and spark.clicks == duck.clicks
    for split, means in duck.mean_lengths.items():
        assert spark.mean_lengths[split] == pytest.approx(means)
    assert dataset_rows(str(tmp_path / "spark")) == dataset_rows(str(tmp_path / "duck"))
    assert max(n for f in spark.splits["train"] for n in f.row_groups) <= 97
    assert spark.source["engine"] == "spark" and spark.source["rows_read"] == duck.source["rows_read"] == 1505
    assert spark.source["rows_duplicate"] == duck.source["rows_duplicate"] == 5


def test_bad_logs_on_spark_are_the_same_one_line_error_and_publish_nothing(tmp_path):
    from tests.build.test_build import _one_file_logs

    _one_file_logs(tmp_path, clicked=pa.array([1, 0, 7, 0], pa.int32()))
    cfg = _config(tmp_path)
    with pytest.raises(ValueError, match=r"part-0.parquet: column 'clicked', row 3: label 7 is neither positive") as e:
        build_dataset(cfg, str(tmp_path / "ds"), engine="spark")
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("ds")]


def test_without_java_the_spark_engine_says_what_to_install(tmp_path, monkeypatch):
    write_logs(str(tmp_path / "logs"), rows=50)
    cfg = _config(tmp_path)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"--engine spark needs Java 17 or 21"):
        build_dataset(cfg, str(tmp_path / "ds"), engine="spark")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("ds")]
