"""``mkt build``'s embedded engine: DuckDB on one machine, larger-than-memory input spilled to disk.

The prepared batches of every log file (:mod:`mkt_torchrec.build.inputs`) are appended to a table ``ev`` of an
on-disk DuckDB database in a scratch directory (``source.temp_dir``, else a temporary directory removed
afterwards), so the logs are never held in memory whole: DuckDB keeps at most ``source.memory_limit`` and
spills the rest of its windows, join and sort there. The transformation (:mod:`mkt_torchrec.build.plan`) then
streams out in record batches, in ``(split, time, file, row)`` order, into a
:class:`~mkt_torchrec.data.dataset.DatasetWriter`, which publishes the dataset only once it is complete.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Optional

import pyarrow as pa

from mkt_torchrec import storage
from mkt_torchrec.build.hashing import render
from mkt_torchrec.build.inputs import LogInputs
from mkt_torchrec.build.plan import BuildPlan, split_names
from mkt_torchrec.data.dataset import DatasetWriter, Manifest

OUT_BATCH_ROWS = 1 << 16
logger = logging.getLogger("mkt.build")


def _connect(source: Any, scratch: str):
    import duckdb

    con = duckdb.connect(os.path.join(scratch, "build.duckdb"))
    try:
        con.execute(f"SET memory_limit = '{source.memory_limit}'")
    except duckdb.Error as e:
        raise ValueError(f"source.memory_limit: {source.memory_limit!r} is not a size DuckDB reads (e.g. 4GB): "
                         f"{' '.join(str(e).split())[:200]}") from None
    con.execute(f"SET temp_directory = '{os.path.join(scratch, 'spill')}'")
    con.execute("SET enable_progress_bar = false")  # its bar would go to stdout, which belongs to the command
    con.execute(f"SET threads = {source.threads or os.cpu_count() or 1}")
    return con


def load(con: Any, inputs: LogInputs, progress: Optional[Callable[[int], None]]) -> int:
    """Load every file's prepared batches into the table ``ev`` in one statement (DuckDB appends a stream far
    faster than many small inserts); returns the rows loaded.

    Raises:
        ValueError: the input layer's own one-line error (not DuckDB's wrapping of it, with its traceback).
    """
    failed: list[BaseException] = []
    rows = 0

    def batches():
        nonlocal rows
        try:
            for index in range(len(inputs.files)):
                for batch in inputs.read(index):
                    rows += batch.num_rows
                    if progress is not None:
                        progress(batch.num_rows)
                    yield batch
        except BaseException as e:
            failed.append(e)
            raise

    stream = pa.RecordBatchReader.from_batches(inputs.prepared_schema(), batches())
    con.register("__logs", stream)
    try:
        con.execute("CREATE TABLE ev AS SELECT * FROM __logs")
    except Exception:
        if failed:
            raise failed[0] from None
        raise
    finally:
        con.unregister("__logs")
    return rows


class _BackgroundWriter:
    """Writes tables through a :class:`DatasetWriter` on one thread while DuckDB produces the next batch on others
    (Parquet encoding releases the GIL). Order is kept: one queue, one consumer. An error in the writer is raised
    by the next :meth:`put` or by :meth:`finish`."""

    def __init__(self, writer: DatasetWriter) -> None:
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=4)  # bounded: memory stays a few batches
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="mkt-build-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.writer.write(*item)
                except BaseException as e:  # noqa: BLE001 - handed to the producer thread
                    self.error = e

    def put(self, split: str, table: pa.Table) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((split, table))

    def finish(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def build(plan: BuildPlan, inputs: LogInputs, out: str, writer_args: dict[str, Any], source_record: dict[str, Any],
          check: Callable[[list[tuple[Any, int]]], int], copies: Callable[[Callable[[str], list]], int],
          progress: Optional[Callable[[int], None]] = None) -> Manifest:
    """Run the build with DuckDB and write the dataset to ``out`` (see the module docstring).

    Args:
        plan: the SQL.
        inputs: the logs.
        out: the dataset directory or URI.
        writer_args: :class:`DatasetWriter`'s keyword arguments (schema, optional, sizes, overwrite, digest).
        source_record: the manifest's ``source`` record.
        check: given the unknown entity values with counts, raises or returns the rows dropped.
        copies: given a function running SQL, raises or returns the copies of duplicate impressions left out.
        progress: called with rows as they are read.
    """
    scratch_root = plan.source.temp_dir
    if scratch_root:
        os.makedirs(scratch_root, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="mkt-build-", dir=scratch_root)
    con = None
    try:
        writer = DatasetWriter(out, **writer_args)  # an output it may not replace is refused before any work
        try:
            con = _connect(plan.source, scratch)
            started = time.perf_counter()
            rows = load(con, inputs, progress)
            logger.info("build: %d rows of %d files loaded in %.1f s; building sequences and splits (DuckDB, "
                        "memory_limit %s)", rows, len(inputs.files), time.perf_counter() - started,
                        plan.source.memory_limit)
            dropped = check(con.execute(plan.unknown_entities_sql()).fetchall()) if plan.source.entity.column else 0
            duplicate = copies(lambda sql: con.execute(render(sql, "duckdb")).fetchall())
            names = split_names()
            sql = plan.dataset_sql(order="split", drop_copies=duplicate > 0)
            stream = con.sql(render(sql, "duckdb")).to_arrow_reader(OUT_BATCH_ROWS)
            columns = None
            background = _BackgroundWriter(writer)
            try:
                for batch in stream:
                    table = pa.Table.from_batches([batch])
                    if columns is None:
                        columns = [c for c in table.column_names if not c.startswith("__")]
                    codes = table.column("__split").to_numpy()
                    start = 0
                    while start < len(codes):  # rows arrive in split order: cut the batch where the split changes
                        stop = start + int((codes[start:] != codes[start]).argmax() or len(codes) - start)
                        background.put(names[int(codes[start])], table.slice(start, stop - start).select(columns))
                        start = stop
            finally:
                background.finish()
            writer.set_source({**source_record, "rows_read": rows, "rows_dropped": dropped,
                              "rows_duplicate": duplicate})
            manifest = writer.close()
            logger.info("build: %s written in %.1f s", storage.display(writer.out_dir), time.perf_counter() - started)
            return manifest
        except BaseException:
            writer.abort()
            raise
    finally:
        if con is not None:
            con.close()
        shutil.rmtree(scratch, ignore_errors=True)
