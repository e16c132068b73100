"""`mkt build --engine spark` writes the same dataset as DuckDB, row for row (Spark in local mode; Java needed)."""

from __future__ import annotations

import shutil

import pytest

from mkt_torchrec.build.run import build_dataset

from tests.build.logs import write_logs
from tests.build.test_build import _config, dataset_rows

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs Java 17 (make install adds it)")


def test_spark_and_duckdb_write_the_same_rows(tmp_path, capsys):
    write_logs(str(tmp_path / "logs"), rows=1500, seed=3)
    cfg = _config(tmp_path, row_group_rows=97, entity={"column": "item_type", "unknown": "drop",
                                                        "values": {"product": "source", "post": "target"}})
    duck = build_dataset(cfg, str(tmp_path / "duck"), engine="duckdb")
    spark = build_dataset(cfg, str(tmp_path / "spark"), engine="spark")
    assert spark.rows == duck.rows and spark.clicks == duck.clicks
    for split, means in duck.mean_lengths.items():
        assert spark.mean_lengths[split] == pytest.approx(means)
    assert dataset_rows(str(tmp_path / "spark")) == dataset_rows(str(tmp_path / "duck"))
    assert max(n for f in spark.splits["train"] for n in f.row_groups) <= 97
    assert spark.source["engine"] == "spark" and spark.source["rows_read"] == 1500
