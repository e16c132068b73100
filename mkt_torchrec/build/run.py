"""``mkt build``: impression logs (local or object storage) -> a training dataset, with DuckDB or Spark.

:func:`build_dataset` checks the mapping against the schema, lists the input files, reads the mapped columns'
types from the first file of each input (footers and CSV headers only), makes the SQL (:mod:`.plan`) and runs
it with the engine. Both engines read the logs through :class:`~mkt_torchrec.build.inputs.LogInputs` and run
the same SQL text, so they write the same rows in the same order per split and entity (a test holds them to it).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional

import pyarrow as pa

from mkt_torchrec import storage
from mkt_torchrec.build.inputs import LogInputs, list_files
from mkt_torchrec.build.plan import BuildPlan
from mkt_torchrec.build.source import check_source
from mkt_torchrec.config import Config
from mkt_torchrec.data.dataset import Manifest

ENGINES = ("duckdb", "spark")


def prepare(cfg: Config) -> tuple[BuildPlan, LogInputs]:
    """The plan and the inputs of ``cfg.source`` (reads only file listings, footers and CSV headers).

    Raises:
        ConfigError / ValueError: naming the key, file or column at fault.
    """
    source = cfg.source
    check_source(source, cfg.schema)
    files = list_files(source)
    inputs = LogInputs(source, cfg.schema, files)
    types = inputs.column_types()
    inputs.prepare(types)
    time_type = pa.int64() if source.time.from_position else types[source.time.column]
    plan = BuildPlan(cfg.schema, source, inputs.kinds, time_type)
    plan.dataset_sql()  # cut-offs and the sequences' features are checked here, before anything runs
    return plan, inputs


def _unknown_entities(source: Any, found: list[tuple[Any, int]]) -> int:
    """Refuse rows whose entity value is unmapped (``unknown: error``), or count them as dropped."""
    total = sum(int(n) for _, n in found)
    if not total:
        return 0
    shown = ", ".join(f"{v!r} x{n}" for v, n in found)
    col = source.entity.column
    if source.entity.unknown == "error":
        raise ValueError(f"source.entity: {total} rows have a {col!r} value outside source.entity.values "
                         f"{sorted(source.entity.values)} (most frequent: {shown}); map them, or set "
                         "source.entity.unknown: drop")
    print(f"mkt build: dropped {total} rows whose {col!r} is outside source.entity.values (most frequent: {shown})")
    return total


def _duplicates(plan: BuildPlan, inputs: LogInputs, query: Callable[[str], list[tuple[Any, ...]]], tool: str) -> int:
    """Count the copies of exact duplicate impressions (none looked for with ``source.duplicates: keep``): refuse
    them (``refuse``), or print how many the build leaves out (``drop``), naming the first.

    Args:
        query: runs a SQL text (DuckDB's dialect) on the engine and returns its rows.
        tool: the command named in what is printed.
    """
    source = plan.source
    if source.duplicates == "keep":
        return 0
    count = plan.duplicates_count_sql()  # cheap; positional copies are counted with the window that names them
    if count is not None and not query(count)[0][0]:
        return 0
    found = query(plan.duplicates_sql())
    if not found:
        return 0
    total, file, row, twin_file, twin_row = (int(v) for v in found[0])

    def where(file: int, row: int) -> str:
        return f"{storage.display(inputs.files[file].uri)}: {inputs.row_name(file, row)}"

    first = (f"{where(file, row)} repeats "
             + (inputs.row_name(twin_file, twin_row) if twin_file == file else where(twin_file, twin_row)))
    rule = ("the line before it in its file" if source.time.from_position
            else "an earlier row of the same time")
    if source.duplicates == "refuse":
        rows = "1 row is an exact copy" if total == 1 else f"{total} rows are exact copies"
        raise ValueError(f"source.duplicates: refuse: {rows} of {rule} in every column read "
                         f"(first: {first}); fix the logs, or set source.duplicates: drop to leave the copies out")
    rows = "row" if total == 1 else "rows"
    print(f"{tool}: dropped {total} exact duplicate {rows} (each equal to {rule} in every column read; first: "
          f"{first}; source.duplicates: keep writes them, refuse stops)", file=sys.stderr)
    return total


def build_dataset(cfg: Config, out: str, engine: Optional[str] = None, overwrite: bool = False,
                  progress: Optional[Callable[[int], None]] = None,
                  describe: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None,
                  tool: str = "mkt build") -> Manifest:
    """Build the dataset of ``cfg.source`` into ``out`` (a directory or URI), published only when complete.

    Args:
        cfg: the config (``schema`` and ``source``).
        out: the dataset to create.
        engine: ``duckdb`` / ``spark``; None: ``cfg.source.engine``.
        overwrite: replace ``out`` if it holds a dataset (never what ``mkt build`` did not write).
        progress: called with the rows read, as they are read (DuckDB).
        describe: makes the manifest's ``source`` record (how the dataset was made) from the build's (kind,
            engine, inputs, files, split; with ``split.by: time`` also ``split_cuts``, the cut-offs as written;
            with ``time.from_position`` also ``input_rows``, each input's rows, and ``users``, the distinct users),
            before the build runs: a preset's own description of its inputs. The engine adds ``rows_read`` and
            ``rows_dropped`` to it (``rows_read`` counts history rows, read but not written, too), and
            ``rows_duplicate`` (the copies of exact duplicate impressions left out, ``source.duplicates``).
        tool: the command named in what the build prints.
    """
    engine = engine or cfg.source.engine
    if engine not in ENGINES:
        raise ValueError(f"--engine {engine!r}: expected one of {list(ENGINES)}")
    plan, inputs = prepare(cfg)
    source = cfg.source
    writer_args = dict(schema=cfg.schema, optional=tuple(plan.optional), rows_per_file=source.rows_per_file,
                       row_group_rows=source.row_group_rows, overwrite=overwrite, schema_digest=cfg.schema_digest())
    record: dict[str, Any] = {"kind": "build", "engine": engine,
                              "inputs": [storage.display(i.path) for i in source.inputs],
                              "files": len(inputs.files), "split": source.split.by}
    if source.split.by == "time":  # which times each split holds (rows outside [train_from, test_until) are history)
        record["split_cuts"] = source.split.cuts()
    if source.time.from_position:
        record.update(input_rows=inputs.input_rows, users=inputs.users)
    if describe is not None:
        record = describe(record)

    def check(found: list[tuple[Any, int]]) -> int:
        return _unknown_entities(source, found)

    def copies(query: Callable[[str], list[tuple[Any, ...]]]) -> int:
        return _duplicates(plan, inputs, query, tool)

    if engine == "duckdb":
        from mkt_torchrec.build import duckdb_engine

        return duckdb_engine.build(plan, inputs, out, writer_args, record, check, copies, progress)
    from mkt_torchrec.build import spark_engine

    master = source.spark_master or os.environ.get("SPARK_MASTER") or "local[*]"
    return spark_engine.build(plan, inputs, out, writer_args, record, check, copies, master)
