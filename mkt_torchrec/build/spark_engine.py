"""``mkt build --engine spark``: the same transformation on a Spark cluster, for logs of billions of rows.

**Reading and writing through the package's storage layer.** The logs are read by a Python data source
(``pyspark.sql.datasource``): one input partition per log file, read on the executors by
:meth:`LogInputs.read <mkt_torchrec.build.inputs.LogInputs.read>`, the very code the DuckDB engine runs, so both
engines see identical prepared rows, whatever the store (``s3://``, ``gs://``, ``hdfs://``, ``abfs://``, local)
and with no Hadoop connector jar to install: each executor reads the store's settings from its own environment.
The SQL is :mod:`mkt_torchrec.build.plan`'s text transpiled to Spark SQL by sqlglot.

**Writing.** The result is sorted by ``(split, entity, time, file, row)`` (a range partitioning: each task
holds one contiguous run of that order) and written by a Python data-source writer: each task writes one
Parquet file per (split, entity) run it holds, in row groups of ``source.row_group_rows``, through
:func:`~mkt_torchrec.data.dataset.stage_dataset` (a temporary directory, or uniquely named objects), and sends
the driver the file's name with its clicks and value counts. The driver reads each file's footer for its row
groups, assembles the manifest and publishes it last (:func:`~mkt_torchrec.data.dataset.publish_manifest`); no
row is collected on the driver. Within a split the files are listed by task (partition) order, so each entity's
rows keep the global order, which is exactly the DuckDB engine's per-entity order: the two datasets are equal row
for row (``tests/build/test_spark.py``).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mkt_torchrec import storage
from mkt_torchrec.build.hashing import render
from mkt_torchrec.build.inputs import LogInputs
from mkt_torchrec.build.plan import BuildPlan, split_names
from mkt_torchrec.data.dataset import (FORMAT_VERSION, FileInfo, Manifest, add_value_counts, parquet_writer,
                                       publish_manifest, stage_dataset)
from mkt_torchrec.data.schema import arrow_schema

ERROR_MARK = "mkt-build-error: "  # marks our one-line error inside Spark's wrapped exceptions


def session(master: str, conf: dict[str, str]) -> Any:
    """A SparkSession on ``master`` with ``conf`` (UTC session time zone: times are microseconds since 1970).

    Raises:
        ValueError: pyspark is not installed, or no Java runs it (one line saying what to install).
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ValueError("--engine spark needs pyspark 4 (pip install 'mkt_torchrec[spark]', or `make install`)"
                         ) from None
    if not os.environ.get("JAVA_HOME") and shutil.which("java") is None:
        raise ValueError("--engine spark needs Java 17 or 21 on PATH or in JAVA_HOME (Debian: apt-get install "
                         "openjdk-17-jre-headless; `make install` does it where it can)")

    builder = SparkSession.builder.master(master).appName("mkt build")
    local = master.startswith("local")
    settings = {"spark.sql.session.timeZone": "UTC", "spark.ui.enabled": "false",
                "spark.sql.shuffle.partitions": "8" if local else "200", **conf}
    if local and "PYSPARK_PYTHON" not in os.environ:  # local Python workers run this interpreter (its packages)
        os.environ["PYSPARK_PYTHON"] = sys.executable
    for key, value in settings.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def _data_source(inputs: LogInputs) -> type:
    """A Python data source class over ``inputs`` (a class made here is pickled by value to the executors)."""
    from pyspark.sql.datasource import DataSource, DataSourceReader, InputPartition
    from pyspark.sql.pandas.types import from_arrow_schema

    class LogReader(DataSourceReader):
        def partitions(self):
            return [InputPartition(i) for i in range(len(inputs.files))]

        def read(self, partition) -> Iterator[pa.RecordBatch]:
            try:
                yield from inputs.read(partition.value)
            except ValueError as e:
                raise ValueError(ERROR_MARK + str(e)) from None

    class LogSource(DataSource):
        @classmethod
        def name(cls) -> str:
            return "mkt_logs"

        def schema(self):
            return from_arrow_schema(inputs.prepared_schema())

        def reader(self, schema):
            return LogReader()

    return LogSource


def _dataset_sink(staged: Any, schema: pa.Schema, max_len: dict[str, Any], row_group_rows: int,
                  manifest_args: dict[str, Any]) -> type:
    """A Python data-source writer that writes each task's (split, entity) runs as Parquet files of ``staged``
    and, on commit, publishes the manifest assembled from their footers (``manifest_args``: its other fields)."""
    from pyspark import TaskContext
    from pyspark.sql.datasource import DataSource, DataSourceArrowWriter, WriterCommitMessage

    names = split_names()

    class Written(WriterCommitMessage):
        def __init__(self, files: list[dict[str, Any]]) -> None:
            self.files = files

    class Writer(DataSourceArrowWriter):
        def write(self, iterator: Iterator[pa.RecordBatch]) -> Written:
            part = TaskContext.get().partitionId()
            files: list[dict[str, Any]] = []
            current = None  # (split, entity, rel, ParquetWriter, stream, counters, pending)
            for batch in iterator:
                table = pa.Table.from_batches([batch])
                keys = np.stack([table.column("__split").to_numpy(), table.column("entity").to_numpy()], axis=1)
                start = 0
                while start < table.num_rows:
                    change = np.flatnonzero((keys[start:] != keys[start]).any(axis=1))
                    stop = start + (int(change[0]) if change.size else table.num_rows - start)
                    split, entity = names[int(keys[start, 0])], int(keys[start, 1])
                    if current is None or current["key"] != (split, entity):
                        if current is not None:
                            files.append(_close(current, row_group_rows))
                        rel = f"{split}/part-{part:05d}-{entity}.parquet"
                        stream = staged.open_output(rel)
                        current = {"key": (split, entity), "rel": staged.name(rel), "part": part,
                                   "location": staged.location(rel), "stream": stream,
                                   "writer": parquet_writer(stream, schema),
                                   "pending": [], "rows": 0, "clicks": 0, "values": dict.fromkeys(max_len, 0)}
                    rows = table.slice(start, stop - start).select(schema.names).cast(schema)
                    _count(current, rows, max_len)
                    current["pending"].append(rows)
                    _flush(current, row_group_rows, final=False)
                    start = stop
            if current is not None:
                files.append(_close(current, row_group_rows))
            return Written(files)

        def commit(self, messages: list[Written]) -> None:
            written = [f for m in messages if m is not None for f in m.files]
            publish_manifest(staged, _manifest(written, max_len, manifest_args))

        def abort(self, messages: list[Written]) -> None:
            staged.abort()

    class Sink(DataSource):
        @classmethod
        def name(cls) -> str:
            return "mkt_dataset"

        def writer(self, schema, overwrite):
            return Writer()

    return Sink


def _count(current: dict[str, Any], rows: pa.Table, max_len: dict[str, Any]) -> None:
    current["rows"] += rows.num_rows
    current["clicks"] += int(pc.sum(rows.column("label")).as_py() or 0)
    add_value_counts(current["values"], rows, max_len)


def _flush(current: dict[str, Any], row_group_rows: int, final: bool) -> None:
    pending = pa.concat_tables(current["pending"]) if current["pending"] else None
    current["pending"] = []
    if pending is None:
        return
    start = 0
    while pending.num_rows - start >= row_group_rows or (final and start < pending.num_rows):
        take = min(row_group_rows, pending.num_rows - start)
        current["writer"].write_table(pending.slice(start, take), row_group_size=take)
        start += take
    if start < pending.num_rows:
        current["pending"] = [pending.slice(start)]


def _close(current: dict[str, Any], row_group_rows: int) -> dict[str, Any]:
    _flush(current, row_group_rows, final=True)
    current["writer"].close()
    current["stream"].close()
    split, entity = current["key"]
    return {"split": split, "entity": entity, "path": current["rel"], "location": current["location"],
            "part": current["part"], "rows": current["rows"], "clicks": current["clicks"], "values": current["values"]}


def _manifest(written: list[dict[str, Any]], max_len: dict[str, Any], args: dict[str, Any]) -> Manifest:
    """The manifest of the files the tasks wrote: row groups from each file's footer, counts from the tasks."""
    order = {name: code for code, name in split_names().items()}
    written = sorted(written, key=lambda f: (order[f["split"]], f["part"], f["entity"]))
    splits: dict[str, list[FileInfo]] = {}
    rows: dict[str, dict[str, int]] = {}
    clicks: dict[str, dict[str, int]] = {}
    values: dict[str, dict[str, int]] = {}
    for f in written:
        fs, path = storage.filesystem(f["location"])
        with fs.open_input_file(path) as stream:
            meta = pq.read_metadata(stream)
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        if sum(groups) != f["rows"]:
            raise ValueError(f"{storage.display(f['location'])}: footer holds {sum(groups)} rows, the task wrote "
                             f"{f['rows']}")
        splits.setdefault(f["split"], []).append(FileInfo(f["path"], f["rows"], groups, [f["entity"]] * len(groups)))
        name = "source" if f["entity"] == 0 else "target"
        rows.setdefault(f["split"], {"source": 0, "target": 0})[name] += f["rows"]
        clicks.setdefault(f["split"], {"source": 0, "target": 0})[name] += f["clicks"]
        sums = values.setdefault(f["split"], dict.fromkeys(max_len, 0))
        for key, n in f["values"].items():
            sums[key] += n
    mean_lengths = {s: {k: v / sum(rows[s].values()) for k, v in sums.items()} for s, sums in values.items()}
    return Manifest(format_version=FORMAT_VERSION, schema_digest=args["schema_digest"], columns=args["columns"],
                    optional_columns=args["optional"], splits=splits, rows=rows, source=args["source"],
                    mean_lengths=mean_lengths, clicks=clicks)


def _one_line(e: Exception) -> str:
    """Our own error out of Spark's wrapped exception (one line), or Spark's first line."""
    text = str(e)
    found = re.search(re.escape(ERROR_MARK) + r"(.*)", text)
    return found.group(1).strip() if found else " ".join(text.split())[:500]


def build(plan: BuildPlan, inputs: LogInputs, out: str, writer_args: dict[str, Any], source_record: dict[str, Any],
          check: Callable[[list[tuple[Any, int]]], int], copies: Callable[[Callable[[str], list]], int],
          master: str) -> Manifest:
    """Run the build on Spark at ``master`` and publish the dataset at ``out`` (see the module docstring)."""
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    from mkt_torchrec.data.dataset import open_dataset

    schema = writer_args["schema"]
    out_schema = arrow_schema(schema, writer_args["optional"])
    max_len = {k: schema.max_len_of(k) for k in schema.sparse_keys}
    spark = session(master, plan.source.spark_conf)
    staged = stage_dataset(out, overwrite=writer_args["overwrite"])
    try:
        spark.dataSource.register(_data_source(inputs))
        spark.read.format("mkt_logs").load().createOrReplaceTempView("ev")
        rows = int(spark.sql("SELECT COUNT(*) AS n FROM ev").collect()[0]["n"])
        dropped = 0
        if plan.source.entity.column:
            found = [(r["value"], r["n"]) for r in spark.sql(render(plan.unknown_entities_sql(), "spark")).collect()]
            dropped = check(found)
        duplicate = copies(lambda sql: [tuple(r) for r in spark.sql(render(sql, "spark")).collect()])
        manifest_args = {"schema_digest": writer_args["schema_digest"], "columns": out_schema.names,
                         "optional": list(writer_args["optional"]),
                         "source": {**source_record, "rows_read": rows, "rows_dropped": dropped,
                                    "rows_duplicate": duplicate, "master": master}}
        spark.dataSource.register(_dataset_sink(staged, out_schema, max_len, writer_args["row_group_rows"],
                                                manifest_args))
        result = spark.sql(render(plan.dataset_sql(order="entity", drop_copies=duplicate > 0), "spark"))
        result.write.format("mkt_dataset").mode("append").save()
    except (PySparkException, Py4JJavaError) as e:
        staged.abort()
        raise ValueError(_one_line(e)) from None
    except BaseException:
        staged.abort()
        raise
    return open_dataset(out, schema, check_files=False)
