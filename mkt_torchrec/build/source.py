"""The ``source:`` section of a config: where a marketplace's impression logs are and how their columns become
the schema's features (``mkt build``; the transformation itself is :mod:`mkt_torchrec.build.plan`).

A whole mapping, for Spark-style logs (day partitions, the logs' own column names, string ids)::

    source:
      inputs:
        - {path: s3://logs/impressions, format: parquet}      # dt=2026-11-01/part-*.parquet: dt reads as a column
      partitions: {column: dt, first: "2026-11-01", last: "2026-11-07"}
      time: {column: event_time}
      label: {column: clicked, positive: [1], negative: [0]}
      entity: {column: item_type, values: {product: source, post: target}}
      features:
        user_id: {column: uid}                 # strings are hashed (see mkt_torchrec.build.hashing)
        item_id: {column: item, by_entity: true}
        price_bucket: {column: price, transform: bucket, boundaries: [5, 10, 20, 50, 100]}
      dense:
        log_price: {column: price, transform: log1p}
      split: {by: time, valid_from: "2026-11-06", test_from: "2026-11-07"}

Every key is read by the typed builder (:mod:`mkt_torchrec.typed`), so ``mkt config`` lists each with its
meaning and a wrong key or type fails at load time naming the dotted key. Checks that need the schema (every
feature mapped, entities of the inputs) are made by :func:`check_source` when a build starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from mkt_torchrec.typed import ConfigError, check

ENTITY_NAMES = ("source", "target")


@dataclass
class InputConfig:
    """One input of the logs: a file, a directory (read recursively) or a glob, local or on object storage.

    Args:
        path: a local path or a URI (``s3://``, ``gs://``, ``hdfs://``, ``abfs://``, ``file://``). A directory's
            ``name=value`` subdirectories (hive partitions, e.g. ``dt=2026-11-01``) read as columns.
        format: ``parquet`` or ``csv`` (a header line, comma-separated unless ``csv_delimiter`` says otherwise).
        entity: ``source`` / ``target`` when every row of this input is of one entity (e.g. one file per entity);
            null: ``source.entity.column`` says per row.
        csv_delimiter: the CSV field separator.
        csv_null_values: CSV strings read as null.
        columns: where this input names a column its own way: the mapping's column -> this input's column (e.g.
            one file per entity, each with its own category column: ``{category: video_category}``).
    """

    path: str = ""
    format: Literal["parquet", "csv"] = "parquet"
    entity: Optional[Literal["source", "target"]] = None
    csv_delimiter: str = ","
    csv_null_values: list[str] = field(default_factory=lambda: ["", "\\N", "NULL", "null"])
    columns: dict[str, str] = field(default_factory=dict)

    def _validate(self, key: str) -> None:
        check(self.path != "", f"{key}.path", "expected a local path or a URI")
        check(len(self.csv_delimiter) == 1, f"{key}.csv_delimiter", "expected one character")

    def column(self, name: str) -> str:
        """This input's column for the mapping's column ``name``."""
        return self.columns.get(name, name)


@dataclass
class PartitionRange:
    """Read only the hive partitions of a range (both ends included; compared as strings, so ISO dates work).

    Args:
        column: the partition column (e.g. ``dt``); null: no range, every partition.
        first: the first partition value read.
        last: the last partition value read.
    """

    column: Optional[str] = None
    first: Optional[str] = None
    last: Optional[str] = None

    def _validate(self, key: str) -> None:
        if self.column is None:
            check(self.first is None and self.last is None, key, "first / last need a column")


@dataclass
class TimeConfig:
    """When each impression happened: orders the rows, builds causal sequences and makes time splits.

    Args:
        column: a timestamp, date, integer or float column, or a string column of ISO-8601 times
            (``2026-11-01 08:30:00``, ``2026-11-01T08:30:00Z``, ``2026-11-01``). Timestamps and dates count in
            microseconds since 1970-01-01 UTC; numbers are used as they are.
        from_position: logs without a time column whose rows are in time order and cover one period (Tenrec's
            files): row ``i`` of an input of ``N`` rows happens at ``i / N``, so the inputs interleave by that
            fraction, an earlier input first on ties: compared exactly, as integers, and strictly, so a row sees
            the earlier input's row of the same fraction in its sequences. ``column`` must be empty. A first pass
            reads each input's user column (row counts, and the distinct users the manifest records); inputs
            without a data row are an error.
    """

    column: str = ""
    from_position: bool = False

    def _validate(self, key: str) -> None:
        check(not (self.from_position and self.column), key, "give a column or from_position, not both")


@dataclass
class LabelConfig:
    """The click label.

    Args:
        column: the logs' label column (integer, boolean or string). Text (a CSV column) is compared as a number
            when ``positive`` and ``negative`` are integers and it reads as one (``1.0`` is 1).
        positive: the values that mean a click.
        negative: the values that mean no click. Any other value (or a null) is an error naming the value, how
            many rows hold it and one of them.
    """

    column: str = ""
    positive: list[Any] = field(default_factory=lambda: [1])
    negative: list[Any] = field(default_factory=lambda: [0])

    def _validate(self, key: str) -> None:
        check(len(self.positive) > 0, f"{key}.positive", "expected at least one value")
        for name in ("positive", "negative"):
            for v in getattr(self, name):
                check(isinstance(v, (int, str, bool)) and v is not None, f"{key}.{name}",
                      f"expected ints, booleans or strings, got {v!r}")
        both = {repr(v) for v in self.positive} & {repr(v) for v in self.negative}
        check(not both, key, f"values both positive and negative: {sorted(both)}")


@dataclass
class EntityConfig:
    """Which entity (source or target, the schema's ``entities``) each row is.

    Args:
        column: the logs' entity column (e.g. ``item_type``); not needed when every input names its ``entity``.
        values: the column's values -> ``source`` / ``target``.
        unknown: a value outside ``values`` (or a null): ``error`` (refuse, naming the value and its count) or
            ``drop`` (leave those rows out and print how many).
    """

    column: Optional[str] = None
    values: dict[str, Literal["source", "target"]] = field(default_factory=dict)
    unknown: Literal["error", "drop"] = "error"

    def _validate(self, key: str) -> None:
        if self.column is not None:
            check(len(self.values) > 0, f"{key}.values", "expected the column's values -> source / target")


@dataclass
class ColumnMap:
    """How one column of the logs becomes one feature (or dense feature) of the schema.

    Args:
        column: the logs' column.
        transform: ``auto`` (integers as they are, strings hashed), ``hash`` (the documented 60-bit hash of the
            value's text, :mod:`mkt_torchrec.build.hashing`), ``int`` (an integer id as it is), ``bucket`` (a
            number -> 1 + how many ``boundaries`` are <= it; null -> null), ``log_bucket`` (signed log bucket
            ``sign(x) * floor(per_octave * log2(1 + |x|)) + 128`` clipped to [1, 255]). Dense features:
            ``auto`` (the value as float32) or ``log1p`` (``sign(x) * ln(1 + |x|)``).
        by_entity: keep the entities' values apart in a shared table: the hash of ``ENTITY|value``
            (``source|...`` / ``target|...``), or ``2 * x + e`` for integers (e = 0 source, 1 target).
        boundaries: ``bucket``'s increasing boundaries.
        per_octave: ``log_bucket``'s buckets per doubling.
        required: a null (or a missing CSV value) is an error naming the file, the column and the row, instead of
            an absent feature. The user id is always required.

    A feature of one entity (``group: specific``) is null on the other entity's rows, and an input whose rows
    are all of the other entity (``inputs[].entity``) need not have its column. A feature whose table has
    ``id_mapping: modulo`` must be >= 0: a negative integer is an error naming the row.
    """

    column: str = ""
    transform: Literal["auto", "hash", "int", "bucket", "log_bucket", "log1p"] = "auto"
    by_entity: bool = False
    boundaries: list[float] = field(default_factory=list)
    per_octave: int = 8
    required: bool = False

    def _validate(self, key: str) -> None:
        check(self.column != "", f"{key}.column", "expected a column of the logs")
        if self.transform == "bucket":
            check(len(self.boundaries) > 0, f"{key}.boundaries", "bucket needs increasing boundaries")
            check(all(a < b for a, b in zip(self.boundaries, self.boundaries[1:], strict=False)), f"{key}.boundaries",
                  "expected strictly increasing numbers")
        check(self.per_octave >= 1, f"{key}.per_octave", "expected a positive int")


@dataclass
class SequenceMap:
    """Where a behaviour sequence of the schema comes from.

    Args:
        column: null (the default): built from the events: the ``max_len`` most recent positive rows of the
            sequence's entity by the same user strictly before the row's time, oldest first, each step the
            liked row's ``shared_feature`` (and its side features), encoded as that row's own feature; a positive
            row whose ``shared_feature`` is null is no step. Otherwise
            the logs' list column (list of strings or integers, oldest first) or delimited string column.
        delimiter: for a string ``column``: the separator of its values.
        side_columns: for a ``column`` sequence: side column of the schema -> the logs' list column, one value
            per step.
    """

    column: Optional[str] = None
    delimiter: Optional[str] = None
    side_columns: dict[str, str] = field(default_factory=dict)


SPLIT_CUTS = ("train_from", "valid_from", "test_from", "test_until")  # by: time's cut-offs, in their order


@dataclass
class SplitConfig:
    """How rows are split into train / valid / test.

    ``by: time``'s cut-offs must be in their order (``test_from < test_until``, so a test split can hold rows):
    checked when the config is read where the values read alike as numbers or as ISO times, and again as the
    time column reads them when the build starts (:func:`check_split_order`).

    Args:
        by: ``time``: by cut-offs on the event time, ``train_from`` <= ``valid_from`` <= ``test_from`` <
            ``test_until`` (each optional but ``test_from``): t < ``train_from`` is history, ``train_from`` <= t <
            ``valid_from`` is train, ``valid_from`` <= t < ``test_from`` valid, ``test_from`` <= t <
            ``test_until`` test, t >= ``test_until`` not written (train on days 1..N-1, test on day N; or one
            day's dataset: train on day k, test on day k+1); ``user_fraction``: each user's last
            ``test_fraction`` of rows in time order is test (valid is then cut by ``data.validation_fraction``);
            ``fraction``: each entity's last ``test_fraction`` of rows in time order is test. A row is test when
            its rank (0, 1, ... in time order) is >= ``floor((1 - test_fraction) * n)``, the fraction taken as the
            decimal written (``1e-9`` absorbs the float's rounding).
        train_from: ``by: time``: the first train time; the rows before it are *history*: read, and used for the
            rows' behaviour sequences and ``activity`` counts (as in a build without ``train_from``), but never
            written. Null: every row before ``valid_from`` / ``test_from`` is train. With ``test_from`` = the next
            day and ``test_until`` = the day after, a build is one day's dataset of daily incremental training
            (``mkt daily``; README "Your own data").
        valid_from: ``by: time``: the first valid time (as ``source.time`` reads times: an ISO date / timestamp,
            or a number); null: no valid split written (``data.validation_fraction`` cuts one when training).
        test_from: ``by: time``: the first test time.
        test_until: ``by: time``: the end of test (excluded): rows at or after it are not written, nor do they
            change any written row (a sequence only looks back). Null: every row from ``test_from`` on is test.
        test_fraction: ``by: user_fraction`` / ``fraction``: the share of rows in test (0: no test rows).
    """

    by: Literal["time", "user_fraction", "fraction"] = "user_fraction"
    train_from: Optional[str] = None
    valid_from: Optional[str] = None
    test_from: Optional[str] = None
    test_until: Optional[str] = None
    test_fraction: float = 0.2

    def _validate(self, key: str) -> None:
        if self.by == "time":
            check(self.test_from is not None, f"{key}.test_from", "by: time needs test_from")
            cuts = self.cuts()
            values = _comparable(list(cuts.values()))
            if values is not None:
                check_split_order(dict(zip(cuts, values, strict=True)), cuts, key)
        else:
            check(all(getattr(self, n) is None for n in SPLIT_CUTS), key,
                  f"{' / '.join(SPLIT_CUTS)} are for by: time (by is {self.by!r})")
            check(0 <= self.test_fraction < 1, f"{key}.test_fraction", "expected a number in [0, 1)")

    def cuts(self) -> dict[str, str]:
        """The cut-offs given (``by: time``), in their order: name -> the value as written."""
        return {n: str(getattr(self, n)) for n in SPLIT_CUTS if getattr(self, n) is not None}


def check_split_order(values: dict[str, Any], written: dict[str, str], key: str = "source.split") -> None:
    """Check ``train_from <= valid_from <= test_from < test_until`` over the cut-offs given.

    Args:
        values: cut-off name -> a comparable value (a number, or the time as the time column counts it).
        written: cut-off name -> the value as written (for the message).
        key: the split's dotted key.

    Raises:
        ConfigError: naming both keys, e.g. ``source.split.train_from: '2026-11-06' is after test_from
            '2026-11-05' (expected train_from <= valid_from <= test_from < test_until)``.
    """
    given = [n for n in SPLIT_CUTS if values.get(n) is not None]
    for a, b in zip(given, given[1:], strict=False):
        if b == "test_until":
            ok, says = values[a] < values[b], "is not after"
        else:
            ok, says = values[a] <= values[b], "is after"
        first, second = (b, a) if b == "test_until" else (a, b)
        check(ok, f"{key}.{first}", f"{written[first]!r} {says} {second} {written[second]!r} (expected "
              f"{' <= '.join(SPLIT_CUTS[:3])} < {SPLIT_CUTS[3]})")


def _comparable(texts: list[str]) -> Optional[list[Any]]:
    """The cut-offs as numbers when all read as numbers, else as ISO times when all read as times, else None
    (left to the build, which reads them as the time column does)."""
    try:
        return [float(t) for t in texts]
    except ValueError:
        pass
    import numpy as np  # (here: the config module, and so `mkt --help`, does not import numpy)

    try:
        return [np.datetime64(t.strip().replace(" ", "T").removesuffix("Z"), "us") for t in texts]
    except ValueError:
        return None


@dataclass
class SourceConfig:
    """Impression logs and how they map onto the schema (``mkt build``).

    Args:
        inputs: the logs: one or more inputs (files, directories, globs; local or object storage).
        partitions: a range of hive partitions to read.
        time: the event-time column.
        label: the click label.
        entity: which entity each row is.
        features: each feature of ``schema.features`` -> the column that feeds it (every feature is mapped).
        dense: each dense feature of ``schema.dense`` -> its column.
        sequences: each sequence of ``schema.sequences`` -> a list column; a sequence not named here is built
            from the events.
        true_prob: optional: a column of each row's true click probability (simulated logs).
        duplicates: exact duplicate impressions: a row equal in every column the build reads to an earlier row
            of the same time (anywhere in the logs), or, in ``time.from_position`` logs, which have no time, to the
            line right before it in its file (a writer's retry, a line written twice; equal rows apart from each
            other there may be a user seeing an item again, and are kept). ``drop`` keeps the first and leaves the
            copies out (the build prints how many and records ``rows_duplicate`` in the manifest's ``source``),
            ``refuse`` stops the build naming the first copy and its twin (file and row) before anything is
            written (logs that must be clean: a copy is an upstream bug), ``keep`` writes them all: a kept liked
            copy puts its own item in its twin's behaviour sequence, a label leak. Rows of one user at one time
            never see each other either way (a step is strictly before the row's time).
        engine: ``duckdb`` (one machine) or ``spark`` (a cluster; ``mkt build --engine`` overrides).
        memory_limit: DuckDB's memory limit (e.g. ``4GB``); what does not fit spills to ``temp_dir``.
        temp_dir: DuckDB's spill directory; null: a temporary directory removed afterwards.
        threads: DuckDB's threads; 0: every core.
        spark_master: Spark's master URL; null: ``$SPARK_MASTER``, else ``local[*]``.
        spark_conf: extra Spark settings (``spark.executor.memory: 8g``, ...).
        rows_per_file: rows per Parquet file written.
        row_group_rows: rows per Parquet row group written (the reader's unit of work).
        batch_rows: at most this many rows are read, converted and loaded at a time (and reported to progress).
    """

    inputs: list[InputConfig] = field(default_factory=list)
    partitions: PartitionRange = field(default_factory=PartitionRange)
    time: TimeConfig = field(default_factory=TimeConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    entity: EntityConfig = field(default_factory=EntityConfig)
    features: dict[str, ColumnMap] = field(default_factory=dict)
    dense: dict[str, ColumnMap] = field(default_factory=dict)
    sequences: dict[str, SequenceMap] = field(default_factory=dict)
    split: SplitConfig = field(default_factory=SplitConfig)
    true_prob: Optional[str] = None
    duplicates: Literal["drop", "refuse", "keep"] = "drop"
    engine: Literal["duckdb", "spark"] = "duckdb"
    memory_limit: str = "4GB"
    temp_dir: Optional[str] = None
    threads: int = 0
    spark_master: Optional[str] = None
    spark_conf: dict[str, str] = field(default_factory=dict)
    rows_per_file: int = 2_000_000
    row_group_rows: int = 100_000
    batch_rows: int = 1 << 16

    def _validate(self, key: str) -> None:
        if not self.inputs:  # a config without logs: checked when `mkt build` needs them (check_source)
            return
        check(self.rows_per_file >= 1 and self.row_group_rows >= 1, key, "rows_per_file / row_group_rows >= 1")
        check(0 <= self.threads <= 1024, f"{key}.threads", "expected an int in [0, 1024] (0: every core)")
        check(self.batch_rows >= 1, f"{key}.batch_rows", "expected a positive int")


def check_source(source: SourceConfig, schema: Any, key: str = "source") -> None:
    """Check the mapping against the schema (every feature and dense feature mapped, sequences known, each row's
    entity decidable).

    Raises:
        ConfigError: naming the dotted key.
    """
    check(len(source.inputs) > 0, f"{key}.inputs", "no inputs: say where the logs are (configs/logs.yaml is an "
          "example; `mkt config` lists every source.* key)")
    check(source.time.column != "" or source.time.from_position, f"{key}.time.column",
          "expected the logs' event-time column (or time.from_position for rows in time order)")
    check(source.label.column != "", f"{key}.label.column", "expected the logs' label column")
    for name in schema.features:
        check(name in source.features, f"{key}.features.{name}", "schema feature not mapped to a column")
    for name in source.features:
        check(name in schema.features, f"{key}.features.{name}", f"not a feature of the schema "
              f"({sorted(schema.features)})")
    for name in schema.dense:
        check(name in source.dense, f"{key}.dense.{name}", "schema dense feature not mapped to a column")
    for name, m in source.dense.items():
        check(name in schema.dense, f"{key}.dense.{name}", f"not a dense feature of the schema ({sorted(schema.dense)})")
        check(m.transform in ("auto", "log1p"), f"{key}.dense.{name}.transform",
              f"a dense feature takes auto or log1p, got {m.transform!r}")
    for name, m in source.features.items():
        check(m.transform != "log1p", f"{key}.features.{name}.transform", "log1p is for dense features")
    for name, s in source.sequences.items():
        check(name in schema.sequences, f"{key}.sequences.{name}", f"not a sequence of the schema "
              f"({sorted(schema.sequences)})")
        if s.column is None:
            check(not s.side_columns and s.delimiter is None, f"{key}.sequences.{name}",
                  "side_columns / delimiter need a column (without one the sequence is built from the events)")
        else:
            want = set(schema.sequences[name].side_features.values())
            check(set(s.side_columns) == want, f"{key}.sequences.{name}.side_columns",
                  f"a sequence from a column needs a list column for each of its side columns {sorted(want)}")
    fixed = [i.entity for i in source.inputs]
    if any(e is None for e in fixed):
        check(source.entity.column is not None, f"{key}.entity.column",
              "say which column holds the entity (or give every input an entity)")
    if source.split.by == "time":
        check(source.split.test_from is not None, f"{key}.split.test_from", "by: time needs test_from")


def entity_code(name: str) -> int:
    if name not in ENTITY_NAMES:
        raise ConfigError(f"entity {name!r}: expected one of {list(ENTITY_NAMES)}")
    return ENTITY_NAMES.index(name)
