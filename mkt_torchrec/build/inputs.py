"""Reading the logs for ``mkt build``: every per-row conversion of the mapping, shared by both engines.

:class:`LogInputs` lists the input files once (on the driver: sorted paths, hive partition values parsed from
``name=value`` directories, the partition range applied) and reads one file at a time as *prepared* Arrow
batches, on whichever process reads it: DuckDB's loader here, or a Spark executor through
:mod:`mkt_torchrec.build.spark_engine`'s data source. Both engines therefore see identical prepared rows, and the
SQL of :mod:`mkt_torchrec.build.plan` (hashing, sequences, splits, order) is the only other step.

A prepared batch has::

    __file   int32    the file's index among all inputs' files (sorted paths): the first tie-breaker
    __row    int64    the row's index in its file: the second
    __t      int64 / float64   the event time (microseconds since 1970 for timestamps, dates and ISO strings;
                               time.from_position: (row * scale of the input) * inputs + input, see _position)
    __label  int8     1 for a value of label.positive, 0 for label.negative
    __entity int8     0 source, 1 target; null for a value outside entity.values (__entity_raw holds it)
    f_NAME   int64    a feature's id: strings hashed (:func:`hash_strings`, ``by_entity`` prefixes included),
                      integers as they are (``by_entity``'s ``2 * x + e`` is SQL's), numbers bucketed
    d_NAME   float32  a dense feature
    __true_prob float32 (when mapped)

Values that cannot be read as mapped (a label outside positive / negative, a null or unparsable time, a
non-integer in an ``int`` column, a null user or ``required`` feature, a negative id for a ``modulo`` table, a
ragged CSV line) raise ``ValueError`` naming the file, the column and the row (a CSV's data row and line).
An input's columns are the mapping's, renamed by ``inputs[].columns``; an input of one entity does not read
the columns of the other entity's specific features (they are null on its rows).
Why numbers are converted here rather than in SQL: DuckDB and Spark round casts and logarithms differently;
numpy does it once for both.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mkt_torchrec import storage
from mkt_torchrec.build.hashing import ENTITY_PREFIXES, hash_id
from mkt_torchrec.build.source import SourceConfig, entity_code

LOG_BUCKET_OFFSET = 128  # log buckets lie in [1, 255] (0 is MISSING_BUCKET)
_CSV_BLOCK = 1 << 22  # bytes pyarrow parses at a time; a CSV line must fit in one


@dataclass(frozen=True)
class LogFile:
    """One file of the logs: its URI, its input and its hive partition values (as strings)."""

    uri: str
    input: int
    partitions: tuple[tuple[str, str], ...]


def _partition_values(root: str, path: str) -> tuple[tuple[str, str], ...]:
    rel = posixpath.relpath(path, root) if path != root else ""
    out = []
    for part in rel.split("/")[:-1]:
        name, sep, value = part.partition("=")
        if sep and name:
            out.append((name, urllib.parse.unquote(value)))
    return tuple(out)


def list_files(source: SourceConfig) -> list[LogFile]:
    """Every file of every input, sorted by path within an input, the partition range applied.

    Raises:
        ValueError: an input with no files, or a partition range that selects none (naming the input).
    """
    files: list[LogFile] = []
    for i, inp in enumerate(source.inputs):
        fs, path = storage.filesystem(inp.path)
        where = f"source.inputs[{i}] {storage.display(inp.path)}"
        parts = path.split("/")
        wild = next((k for k, part in enumerate(parts) if any(c in part for c in "*?[")), None)
        pattern = None
        if wild is not None:  # a glob: list below its fixed head, keep the paths it matches
            pattern, path = "/".join(parts), "/".join(parts[:wild]) or "/"
        try:
            info = fs.get_file_info(path)
        except OSError as e:
            raise ValueError(f"{where}: unreadable: {' '.join(str(e).split())}") from None
        if info.type == pafs.FileType.File and pattern is None:
            found = [path]
            root = posixpath.dirname(path)
        elif info.type == pafs.FileType.Directory:
            selector = pafs.FileSelector(path, recursive=True)
            found = sorted(f.path for f in fs.get_file_info(selector) if f.type == pafs.FileType.File
                           and not posixpath.basename(f.path).startswith(("_", "."))
                           and not f.path.endswith(".crc")  # Spark's _SUCCESS, .crc and hidden files
                           and (pattern is None or fnmatch.fnmatchcase(f.path, pattern)))
            root = path
        else:
            raise ValueError(f"{where}: no such file or directory")
        entries = [LogFile(_uri(inp.path, p), i, _partition_values(root, p)) for p in found]
        if not entries:
            raise ValueError(f"{where}: holds no files")
        rng = source.partitions
        if rng.column is not None:
            kept = []
            for e in entries:
                value = dict(e.partitions).get(rng.column)
                if value is None:
                    raise ValueError(f"{where}: {e.uri} is not under a {rng.column}=... directory "
                                     f"(source.partitions.column)")
                if (rng.first is None or value >= rng.first) and (rng.last is None or value <= rng.last):
                    kept.append(e)
            if not kept:
                raise ValueError(f"{where}: no partition {rng.column} in [{rng.first}, {rng.last}] "
                                 f"(of {len(entries)} files)")
            entries = kept
        files += entries
    return files


def _row_name(fmt: str, row: int) -> str:
    """0-based row ``row`` of a file of format ``fmt`` as a user finds it (a CSV's line 1 is its header)."""
    return f"data row {row + 1} (line {row + 2})" if fmt == "csv" else f"row {row + 1}"


class LogInputs:
    """The logs of a ``source:`` mapping, read file by file as prepared batches (picklable: Spark executors
    unpickle it and call :meth:`read`).

    Args:
        source: the mapping (``check_source`` already passed).
        schema: the feature schema.
        files: :func:`list_files`'s result.
    """

    def __init__(self, source: SourceConfig, schema: Any, files: list[LogFile]) -> None:
        self.source = source
        self.schema = schema
        self.files = files
        self.time_kind = "int"
        self.kinds: dict[str, str] = {}
        self.types: dict[str, pa.DataType] = {}
        self._hash_cache: dict[str, dict[str, int]] = {}  # column -> text -> id (bounded: see hash_strings)
        self.offsets: list[int] = []  # time.from_position: each file's first row within its input
        self.scale: list[int] = []  # time.from_position: each input's time per row
        self.input_rows: list[int] = []  # time.from_position: each input's rows
        self.users: Optional[int] = None  # time.from_position: distinct users of all inputs

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for Spark's executors without the hash caches (each process fills its own)."""
        return {**self.__dict__, "_hash_cache": {}}

    # ----------------------------------------------------------------------------------------------------
    # Types
    # ----------------------------------------------------------------------------------------------------
    def _file_schema(self, f: LogFile) -> pa.Schema:
        inp = self.source.inputs[f.input]
        if inp.format == "parquet":
            fs, path = storage.filesystem(f.uri)
            try:
                schema = pq.read_schema(fs.open_input_file(path))
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"{storage.display(f.uri)}: not a readable Parquet file: {e}") from None
        else:
            schema = pa.schema([pa.field(n, pa.string()) for n in self._csv_header(f)])
        for name, _ in f.partitions:
            if schema.get_field_index(name) < 0:
                schema = schema.append(pa.field(name, pa.string()))
        return schema

    def _csv_header(self, f: LogFile) -> list[str]:
        return read_csv_header(f.uri, self.source.inputs[f.input].csv_delimiter)

    def column_types(self) -> dict[str, pa.DataType]:
        """The type of every mapped column, from the first file of each input (its footer or CSV header).

        Raises:
            ValueError: a mapped column missing from an input (naming the column and the file).
        """
        types: dict[str, pa.DataType] = {}
        seen_inputs = set()
        for f in self.files:
            if f.input in seen_inputs:
                continue
            seen_inputs.add(f.input)
            schema = self._file_schema(f)
            inp = self.source.inputs[f.input]
            for col, where in self.used_columns(f.input):
                idx = schema.get_field_index(inp.column(col))
                if idx < 0:
                    named = f"{inp.column(col)!r} (for {col!r}, source.inputs[{f.input}].columns)" \
                        if inp.column(col) != col else repr(col)
                    raise ValueError(f"{storage.display(f.uri)}: column {named} ({where}) is missing; its "
                                     f"columns: {schema.names[:40]}")
                t = schema.field(idx).type
                if pa.types.is_dictionary(t):
                    t = t.value_type
                types.setdefault(col, t)
        return types

    def used_columns(self, input_index: int) -> list[tuple[str, str]]:
        """(the mapping's column, the dotted key that maps it) of every column the mapping reads from an input
        (``inputs[].columns`` renames them in the input)."""
        s = self.source
        out = [(s.time.column, "source.time.column")] if s.time.column else []
        out.append((s.label.column, "source.label.column"))
        if s.inputs[input_index].entity is None:
            out.append((s.entity.column, "source.entity.column"))  # type: ignore[arg-type]
        out += [(m.column, f"source.features.{n}") for n, m in s.features.items()
                if self.applies(self.schema.features[n], input_index)]
        out += [(m.column, f"source.dense.{n}") for n, m in s.dense.items()
                if self.applies(self.schema.dense[n], input_index)]
        if s.true_prob:
            out.append((s.true_prob, "source.true_prob"))
        for name, column, _ in self.list_columns():
            out.append((column, f"source.sequences.{name}"))
        return list(dict.fromkeys(out))

    def list_columns(self) -> list[tuple[str, str, str]]:
        """(sequence, logs column, the feature its steps are values of) of every sequence and side column read
        from a list column (``source.sequences.NAME.column``), in schema order: its prepared column is
        ``s_<dataset column>``."""
        out = []
        for name, seq in self.schema.sequences.items():
            m = self.source.sequences.get(name)
            if m is None or m.column is None:
                continue
            out.append((name, m.column, seq.shared_feature))
            for feature, side in seq.side_features.items():
                out.append((side, m.side_columns[side], feature))
        return out

    def applies(self, spec: Any, input_index: int) -> bool:
        """Whether a feature (its schema entry) can hold values on an input's rows: not when it is specific to
        one entity and every row of the input is of the other."""
        fixed = self.source.inputs[input_index].entity
        return fixed is None or spec.group != "specific" or spec.entity == fixed

    def feature_kind(self, name: str, types: dict[str, pa.DataType]) -> str:
        """How a feature reaches SQL: ``int`` (an int64 id, bucket or log bucket) or ``text`` (hashed in SQL).

        Raises:
            ValueError: a transform the column's type cannot take (naming the key and the type).
        """
        m = self.source.features[name]
        t = types[m.column]
        key = f"source.features.{name}"
        numeric = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
        if m.transform in ("bucket", "log_bucket"):
            if not (numeric or pa.types.is_string(t) or pa.types.is_large_string(t)):
                raise ValueError(f"{key}: {m.transform} needs a numeric column, {m.column!r} is {t}")
            return "int"
        if m.transform == "int":
            return "int"
        if m.transform == "hash":
            if pa.types.is_floating(t):
                raise ValueError(f"{key}: cannot hash the float column {m.column!r} (use int, bucket or log_bucket)")
            return "text"
        # auto
        if pa.types.is_integer(t):
            return "int"
        if pa.types.is_floating(t) or pa.types.is_decimal(t):
            raise ValueError(f"{key}: {m.column!r} is {t}: say transform: int (whole-number ids), bucket or "
                             "log_bucket")
        return "text"

    # ----------------------------------------------------------------------------------------------------
    # Reading
    # ----------------------------------------------------------------------------------------------------
    def prepare(self, types: dict[str, pa.DataType]) -> None:
        """Fix the prepared columns' types from the mapped columns' types (on the driver, before pickling)."""
        self.kinds = {n: self.feature_kind(n, types) for n in self.source.features}
        self.types = types
        if self.source.time.from_position:
            self.time_kind = "int"
            self._count_rows()
        else:
            t = types[self.source.time.column]
            self.time_kind = "float" if pa.types.is_floating(t) or pa.types.is_decimal(t) else "int"

    def prepared_schema(self) -> pa.Schema:
        fields = [pa.field("__file", pa.int32()), pa.field("__row", pa.int64()),
                  pa.field("__t", pa.int64()),
                  pa.field("__label", pa.int8()), pa.field("__entity", pa.int8())]
        if self.source.entity.column is not None:
            fields.append(pa.field("__entity_raw", pa.string()))
        fields += [pa.field(f"f_{n}", pa.int64()) for n in self.kinds]
        fields += [pa.field(f"d_{n}", pa.float32()) for n in self.source.dense]
        if self.source.true_prob:
            fields.append(pa.field("__true_prob", pa.float32()))
        fields += [pa.field(f"s_{column}", pa.list_(pa.int64())) for column, _, _ in self.list_columns()]
        return pa.schema(fields)

    def read(self, index: int) -> Iterator[pa.RecordBatch]:
        """The prepared batches of file ``index`` (of :attr:`files`), in file order, at most
        ``source.batch_rows`` rows each."""
        f = self.files[index]
        inp = self.source.inputs[f.input]
        columns = list(dict.fromkeys(c for c, _ in self.used_columns(f.input)))  # the mapping's names
        partition = dict(f.partitions)
        file_cols = list(dict.fromkeys(inp.column(c) for c in columns if inp.column(c) not in partition))
        row = 0
        for piece in self._pieces(f, file_cols):
            n = piece.num_rows
            cols = {c: (pa.array([partition[inp.column(c)]] * n, pa.string()) if inp.column(c) in partition
                        else piece.column(inp.column(c))) for c in columns}
            yield self._convert(f, index, row, cols, n)
            row += n

    def _pieces(self, f: LogFile, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """A file's non-empty batches of ``columns`` (its own names), cut to at most ``source.batch_rows``."""
        step = self.source.batch_rows
        for batch in self._batches(f, columns):
            for start in range(0, batch.num_rows, step):
                yield batch.slice(start, step)

    def _batches(self, f: LogFile, columns: list[str]) -> Iterator[pa.RecordBatch]:
        fs, path = storage.filesystem(f.uri)
        inp = self.source.inputs[f.input]
        if inp.format == "parquet":
            try:
                pfile = pq.ParquetFile(fs.open_input_file(path))
                missing = [c for c in columns if c not in pfile.schema_arrow.names]
                if missing:
                    raise ValueError(f"{storage.display(f.uri)}: column {missing[0]!r} is missing")
                yield from pfile.iter_batches(batch_size=self.source.batch_rows, columns=columns)
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"{storage.display(f.uri)}: unreadable Parquet file: {e}") from None
            return
        names = self._csv_header(f)
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{storage.display(f.uri)}: column {missing[0]!r} is missing from the CSV header")
        done = 0
        try:
            # single-threaded parsing: only then does pyarrow name the line of a parse error
            reader = pacsv.open_csv(
                fs.open_input_stream(path),
                read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=_CSV_BLOCK,
                                               use_threads=False),
                parse_options=pacsv.ParseOptions(delimiter=inp.csv_delimiter),
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in columns}, include_columns=columns,
                    null_values=inp.csv_null_values, strings_can_be_null=True, quoted_strings_can_be_null=True))
            for batch in reader:
                done += batch.num_rows
                yield batch
        except pa.ArrowInvalid as e:
            raise ValueError(_csv_error(storage.display(f.uri), str(e), done)) from None

    def row_name(self, index: int, row: int) -> str:
        """Row ``row`` (0-based, ``__row``) of file ``index`` as a user finds it: ``data row N (line M)`` in a CSV
        (line 1 is the header), ``row N`` elsewhere."""
        return _row_name(self.source.inputs[self.files[index].input].format, row)

    def _failer(self, f: LogFile, start: int) -> Callable[[str, int, str], None]:
        """``fail(column, i, what)``: raise a ValueError naming the file, the input's column and row ``start + i``
        (a CSV's data row and line)."""
        where = storage.display(f.uri)
        inp = self.source.inputs[f.input]

        def fail(column: str, i: int, what: str) -> None:
            raise ValueError(f"{where}: column {inp.column(column)!r}, {_row_name(inp.format, start + i)}: {what}")

        return fail

    def _convert(self, f: LogFile, index: int, start: int, cols: dict[str, pa.Array], n: int) -> pa.RecordBatch:
        s = self.source
        fail = self._failer(f, start)
        out: dict[str, pa.Array] = {
            "__file": pa.array(np.full(n, index, np.int32)),
            "__row": pa.array(np.arange(start, start + n, dtype=np.int64)),
            "__t": (self._position(f, index, start, n) if s.time.from_position
                    else self._time(cols[s.time.column], s.time.column, fail)),
            "__label": self._label(cols[s.label.column], fail),
        }
        fixed = s.inputs[f.input].entity
        if fixed is not None:
            out["__entity"] = pa.array(np.full(n, entity_code(fixed), np.int8))
            if s.entity.column is not None:
                out["__entity_raw"] = pa.nulls(n, pa.string())
        else:
            raw = pc.cast(cols[s.entity.column], pa.string())  # type: ignore[index]
            keys = pa.array(list(s.entity.values), pa.string())
            codes = pa.array([entity_code(v) for v in s.entity.values.values()], pa.int8())
            idx = pc.index_in(raw, value_set=keys)
            out["__entity"] = pc.take(codes, idx)
            out["__entity_raw"] = raw
        user = self.schema.user_id_feature
        for name in [user, *(k for k in self.kinds if k != user)]:  # the user first: its errors come first
            kind, m = self.kinds[name], s.features[name]
            if self.applies(self.schema.features[name], f.input):
                out[f"f_{name}"] = self._feature(cols[m.column], m, kind, m.column, fail, out["__entity"])
                self._check_feature(name, out[f"f_{name}"], m, fail)
            else:  # a feature of the other entity: null on this input's rows
                out[f"f_{name}"] = pa.nulls(n, pa.int64())
        for name, m in s.dense.items():
            if not self.applies(self.schema.dense[name], f.input):
                out[f"d_{name}"] = pa.nulls(n, pa.float32())
                continue
            x = self._numbers(cols[m.column], m.column, fail)
            if m.transform == "log1p":
                x = np.sign(x) * np.log1p(np.abs(x))
            out[f"d_{name}"] = pa.array(x.astype(np.float32), mask=np.isnan(x))
        if s.true_prob:
            p = self._numbers(cols[s.true_prob], s.true_prob, fail)
            bad = np.flatnonzero(np.isnan(p) | (p < 0) | (p > 1))
            if bad.size:
                i = int(bad[0])
                fail(s.true_prob, i, "missing value" if np.isnan(p[i]) else
                     f"value {p[i]:g} is not a probability in [0, 1]")
            out["__true_prob"] = pa.array(p.astype(np.float32))
        for column, logs_column, feature in self.list_columns():
            out[f"s_{column}"] = self._list_ids(cols[logs_column], column, feature, fail)
            seq = self.schema.sequence_of(column)
            if seq != column:  # a side column: one value per step of its sequence
                have = pc.list_value_length(out[f"s_{column}"]).to_numpy(zero_copy_only=False)
                want = pc.list_value_length(out[f"s_{seq}"]).to_numpy(zero_copy_only=False)
                bad = np.flatnonzero(have != want)
                if bad.size:
                    i = int(bad[0])
                    fail(logs_column, i, f"{have[i]} values for {column!r} but {want[i]} steps in its sequence "
                                         f"{seq!r} ({self.source.sequences[seq].column!r}): one per step")
        return pa.RecordBatch.from_pydict(out, schema=self.prepared_schema())

    def _list_ids(self, col: pa.Array, column: str, feature: str, fail: Callable[[str, int, str], None]
                  ) -> pa.Array:
        """A list column (or a delimited string column) of a sequence or side column: each step encoded as its
        feature is on the rows of the sequence's entity (a null list is empty; a null step is ``MISSING_RAW``
        through the encoding, or bucket 0)."""
        from mkt_torchrec.build.plan import missing_step

        seq_name = self.schema.sequence_of(column)
        entity = entity_code(self.schema.sequences[seq_name].entity)
        m = self.source.features[feature]
        delimiter = self.source.sequences[seq_name].delimiter
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            if delimiter is None:
                raise ValueError(f"source.sequences.{seq_name}: {column!r} comes from a string column: give its "
                                 "delimiter (or a list column)")
            col = pc.split_pattern(pc.if_else(pc.equal(col, ""), pa.scalar(None, col.type), col), delimiter)
        elif not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
            raise ValueError(f"source.sequences.{seq_name}: column for {column!r} is {col.type}, not a list or a "
                             "delimited string")
        col = pc.fill_null(col, pa.scalar([], col.type))
        offsets = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        values = pc.list_flatten(col)
        codes = pa.array(np.full(len(values), entity, np.int8))
        kind = self.kinds[feature] if pa.types.is_integer(values.type) or self.kinds[feature] == "int" else "text"
        if kind == "int" and not (pa.types.is_integer(values.type) or m.transform in ("bucket", "log_bucket")):
            values = pc.cast(values, pa.string())  # integer ids written as text ("12|7|3"): whole numbers checked
        starts = np.zeros(len(offsets) + 1, np.int64)
        np.cumsum(offsets, out=starts[1:])

        def step_fail(_: str, i: int, what: str) -> None:  # i: a step of the flattened lists -> its row
            row = int(np.searchsorted(starts, i, side="right")) - 1
            fail(self.source.sequences[seq_name].side_columns.get(column, self.source.sequences[seq_name].column),
                 row, f"step {i - int(starts[row]) + 1}: {what}")

        ids = self._feature(values, m, kind, column, step_fail, codes)
        if kind == "int" and m.by_entity and m.transform not in ("bucket", "log_bucket"):
            ids = pc.add(pc.multiply(ids, 2), entity)
        ids = pc.fill_null(ids, missing_step(m, kind, entity))
        return pa.ListArray.from_arrays(pa.array(starts.astype(np.int32)), ids)

    def _check_feature(self, name: str, values: pa.Array, m: Any, fail: Callable[[str, int, str], None]) -> None:
        """A null user id or ``required`` value, or a negative id for a ``modulo`` table, is an error."""
        if values.null_count and (m.required or name == self.schema.user_id_feature):
            i = int(np.flatnonzero(pc.is_null(values).to_numpy(zero_copy_only=False))[0])
            fail(m.column, i, "null user id" if name == self.schema.user_id_feature else
                 f"missing value (source.features.{name}.required)")
        table = self.schema.tables[self.schema.features[name].table or name]
        if table.id_mapping == "modulo" and pa.types.is_integer(values.type) and values.null_count < len(values):
            negative = pc.fill_null(pc.less(values, 0), False).to_numpy(zero_copy_only=False)
            if negative.any():
                i = int(np.flatnonzero(negative)[0])
                fail(m.column, i, f"negative value {values[i].as_py()}, but feature {name!r} uses a table with "
                                  "id_mapping 'modulo' (ids must be >= 0)")

    def _count_rows(self) -> None:
        """For ``time.from_position``, one pass over every file's user column (converted and checked as when
        the rows are read): each file's rows and first row within its input, each input's time scale, and the
        distinct users."""
        user = self.schema.user_id_feature
        m = self.source.features[user]
        distinct = _Distinct()
        counts = []
        for f in self.files:
            n = 0
            for piece in self._pieces(f, [self.source.inputs[f.input].column(m.column)]):
                fail = self._failer(f, n)
                values = self._feature(piece.column(0), m, self.kinds[user], m.column, fail)
                self._check_feature(user, values, m, fail)
                distinct.add(values)
                n += piece.num_rows
            counts.append(n)
        totals = [0] * len(self.source.inputs)
        self.offsets = []
        for f, n in zip(self.files, counts, strict=True):
            self.offsets.append(totals[f.input])
            totals[f.input] += n
        self.scale = []  # row i of input k is at i * scale[k] = (i / N_k) * prod(N)
        for k in range(len(totals)):
            scale = 1
            for j, n in enumerate(totals):
                scale *= max(n, 1) if j != k else 1
            self.scale.append(scale)
        if not sum(totals):
            raise ValueError(f"{', '.join(storage.display(i.path) for i in self.source.inputs)}: no data rows")
        if max(totals) * max(self.scale) * len(totals) >= 2 ** 62:
            raise ValueError(f"source.time.from_position: inputs of {totals} rows are too many to interleave "
                             "exactly; give the logs a time column")
        self.input_rows = totals
        self.users = distinct.count()

    def _position(self, f: LogFile, index: int, start: int, n: int) -> pa.Array:
        """Row ``i`` of input ``k`` (of ``K``) at ``(i * scale[k]) * K + k``: ordered as ``i / N_k``, and on a tie
        the earlier input first, strictly (so a row sees the tied row of an earlier input as earlier)."""
        first = self.offsets[index] + start
        k, inputs = f.input, len(self.source.inputs)
        return pa.array(np.arange(first, first + n, dtype=np.int64) * np.int64(self.scale[k]) * np.int64(inputs)
                        + np.int64(k))

    # ----------------------------------------------------------------------------------------------------
    # Conversions
    # ----------------------------------------------------------------------------------------------------
    def _time(self, col: pa.Array, name: str, fail) -> pa.Array:
        t = col.type
        if self.time_kind == "float":
            x = self._numbers(col, name, fail)
            bad = np.flatnonzero(np.isnan(x))
            if bad.size:
                fail(name, int(bad[0]), "null or unparsable time")
            return pa.array(float_order_key(x))
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            col = self._parse_times(col, name, fail)
            t = col.type
        if pa.types.is_timestamp(t):
            if t.tz is None and t.unit != "us":
                col = pc.cast(col, pa.timestamp("us"))
            elif t.tz is not None:
                col = pc.cast(col, pa.timestamp("us", tz="UTC"))
            us = pc.cast(pc.cast(col, pa.timestamp("us")), pa.int64())
        elif pa.types.is_date(t):
            us = pc.multiply(pc.cast(pc.cast(col, pa.date32()), pa.int64()), 86_400_000_000)
        elif pa.types.is_integer(t):
            us = pc.cast(col, pa.int64())
        else:
            raise ValueError(f"source.time.column {name!r}: type {t} is not a time (timestamp, date, number or "
                             "ISO-8601 string)")
        if us.null_count:
            fail(name, int(np.flatnonzero(pc.is_null(us).to_numpy(zero_copy_only=False))[0]), "null time")
        return us

    @staticmethod
    def _parse_times(col: pa.Array, name: str, fail) -> pa.Array:
        text = pc.utf8_trim_whitespace(col)
        text = pc.replace_substring_regex(text, pattern=r"Z$", replacement="+00:00")
        try:
            return pc.cast(text, pa.timestamp("us", tz="UTC")) if _any_offset(text) else \
                pc.cast(text, pa.timestamp("us"))
        except pa.ArrowInvalid:
            pass
        values = text.to_pylist()
        for i, v in enumerate(values):
            if v is None:
                fail(name, i, "null time")
            try:
                np.datetime64(v.replace(" ", "T").split("+")[0], "us")
            except ValueError:
                fail(name, i, f"unparsable time {v[:40]!r} (expected ISO-8601, e.g. 2026-11-01 08:30:00)")
        raise ValueError(f"source.time.column {name!r}: times mix formats; write them one way (ISO-8601)")

    def _label(self, col: pa.Array, fail) -> pa.Array:
        lab = self.source.label
        name = lab.column
        if col.null_count:
            fail(name, int(np.flatnonzero(pc.is_null(col).to_numpy(zero_copy_only=False))[0]), "null label")
        values = col
        text = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
        if text and all(isinstance(v, int) and not isinstance(v, bool) for v in lab.positive + lab.negative):
            try:  # integer labels in text (a CSV): compared as numbers, so 1.0 is 1
                values = pc.cast(pc.utf8_trim_whitespace(col), pa.float64())
                text = False
            except pa.ArrowInvalid:
                pass  # not all numbers: compared as text, and the first that is neither is named below
        if not text and values is not col:
            pos = pa.array([float(v) for v in lab.positive], pa.float64())
            neg = pa.array([float(v) for v in lab.negative], pa.float64())
        elif text:
            pos = pa.array([str(v).lower() if isinstance(v, bool) else str(v) for v in lab.positive])
            neg = pa.array([str(v).lower() if isinstance(v, bool) else str(v) for v in lab.negative])
        elif pa.types.is_boolean(col.type):
            pos = pa.array([bool(v) for v in lab.positive if isinstance(v, (bool, int))], pa.bool_())
            neg = pa.array([bool(v) for v in lab.negative if isinstance(v, (bool, int))], pa.bool_())
        else:
            values = pc.cast(col, pa.float64()) if not pa.types.is_integer(col.type) else pc.cast(col, pa.int64())
            pos = pa.array([v for v in lab.positive if isinstance(v, int)], values.type)
            neg = pa.array([v for v in lab.negative if isinstance(v, int)], values.type)
        is_pos = pc.is_in(values, value_set=pos).to_numpy(zero_copy_only=False)
        is_neg = pc.is_in(values, value_set=neg).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~(is_pos | is_neg))
        if bad.size:
            i = int(bad[0])
            fail(name, i, f"label {col[i].as_py()!r} is neither positive {lab.positive} nor negative "
                          f"{lab.negative} (source.label)")
        return pa.array(is_pos.astype(np.int8))

    @staticmethod
    def _numbers(col: pa.Array, name: str, fail) -> np.ndarray:
        """A numeric (or numeric-text) column as float64, null -> NaN; text that is not a number is an error."""
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            try:
                col = pc.cast(col, pa.float64())
            except pa.ArrowInvalid:
                for i, v in enumerate(col.to_pylist()):
                    try:
                        float(v) if v is not None else None
                    except ValueError:
                        fail(name, i, f"{v[:40]!r} is not a number")
                raise
        elif not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_decimal(col.type)
                  or pa.types.is_boolean(col.type)):
            raise ValueError(f"column {name!r}: type {col.type} is not numeric")
        return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)

    def _feature(self, col: pa.Array, m: Any, kind: str, name: str, fail, entity: Optional[pa.Array] = None
                 ) -> pa.Array:
        if kind == "text":
            text = pc.if_else(col, "true", "false") if pa.types.is_boolean(col.type) else pc.cast(col, pa.string())
            if m.by_entity:
                if entity is None:  # the counting pass reads users only, which are never by_entity
                    raise ValueError(f"{name}: by_entity needs each row's entity")
                text = pc.binary_join_element_wise(pc.take(_ENTITY_PREFIXES, entity), text, "")
            return hash_strings(text, self._hash_cache.setdefault(name, {}))
        if m.transform in ("bucket", "log_bucket"):
            x = self._numbers(col, name, fail)
            missing = np.isnan(x)
            if m.transform == "bucket":
                b = np.searchsorted(np.asarray(m.boundaries, np.float64), x, side="right") + 1
            else:
                with np.errstate(invalid="ignore", over="ignore"):
                    b = np.sign(x) * np.floor(m.per_octave * np.log2(1.0 + np.abs(x)))
                b = np.clip(np.nan_to_num(b), -LOG_BUCKET_OFFSET + 1, LOG_BUCKET_OFFSET - 1) + LOG_BUCKET_OFFSET
            return pa.array(b.astype(np.int64), mask=missing)
        if pa.types.is_integer(col.type):
            return pc.cast(col, pa.int64())
        x = self._numbers(col, name, fail)  # int from text or floats: whole numbers only, exact below 2**53
        missing = np.isnan(x)
        whole = missing | (x == np.floor(x))
        bad = np.flatnonzero(~whole)
        if bad.size:
            fail(name, int(bad[0]), f"value {x[bad[0]]:.17g} is not an integer id (transform: int)")
        big = np.flatnonzero(~missing & (np.abs(x) >= 2.0 ** 53))
        if big.size:
            fail(name, int(big[0]), f"id {x[big[0]]:.17g} is above 2**53 - 1: ids in text or floats (such as 1.0) "
                                    "are read as float64, where larger integers lose digits; renumber them")
        return pa.array(np.where(missing, 0, x).astype(np.int64), mask=missing)


class _Distinct:
    """The distinct values of a stream of arrays, merged as they grow (memory: about twice the distinct values)."""

    def __init__(self) -> None:
        self.parts: list[pa.Array] = []
        self.size = 0  # values in parts[0] after the last merge
        self.pending = 0

    def add(self, values: pa.Array) -> None:
        unique = pc.unique(values.drop_null())
        self.parts.append(unique)
        self.pending += len(unique)
        if self.pending > max(self.size, 1 << 20):
            self._merge()

    def _merge(self) -> None:
        if len(self.parts) > 1:
            self.parts = [pc.unique(pa.chunked_array(self.parts))]
        self.size = len(self.parts[0]) if self.parts else 0
        self.pending = 0

    def count(self) -> int:
        self._merge()
        return self.size


def _csv_error(where: str, message: str, done: int) -> str:
    """A pyarrow CSV error as one line naming the file and the data row (line) where pyarrow names it."""
    text = " ".join(message.split())
    if "straddl" in text:  # a field longer than a parse block: pyarrow's advice names a block size we set
        return (f"{where}: after data row {done}: a line longer than {_CSV_BLOCK >> 20} MiB; the file is probably "
                "damaged there (or not CSV)")
    text = text.replace("CSV parse error: ", "")
    row = re.search(r"Row #(\d+): ", text)
    if row:
        line = int(row.group(1))
        return f"{where}: data row {line - 1} (line {line}): {text.replace(row.group(0), '')}"
    return f"{where}: after data row {done}: CSV parse error: {text}"


_ENTITY_PREFIXES = pa.array(list(ENTITY_PREFIXES), pa.string())
HASH_CACHE_ENTRIES = 1 << 20  # distinct values remembered per column before the cache starts over


def hash_strings(values: pa.Array, cache: dict[str, int]) -> pa.Array:
    """:func:`~mkt_torchrec.build.hashing.hash_id` of every string (null stays null), as int64.

    Each batch's distinct values are hashed once (dictionary encoding), and ids are remembered in ``cache`` (at
    most :data:`HASH_CACHE_ENTRIES`, then it starts over, so memory stays bounded) since ids and users repeat
    across batches: MD5 then runs about once per distinct value rather than once per row.
    """
    encoded = values.dictionary_encode()
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    if len(cache) > HASH_CACHE_ENTRIES:
        cache.clear()
    words = encoded.dictionary.to_pylist()
    ids = np.empty(len(words), np.int64)
    for i, w in enumerate(words):
        got = cache.get(w)
        if got is None:
            got = cache[w] = hash_id(w)
        ids[i] = got
    return pc.take(pa.array(ids, pa.int64()), encoded.indices)


def read_csv_header(location: str, delimiter: str = ",") -> list[str]:
    """The column names of a CSV file's header line (a local path or a URI).

    Raises:
        ValueError: an empty file or a header that is not UTF-8, naming the file.
    """
    fs, path = storage.filesystem(location)
    with fs.open_input_stream(path) as stream:
        line = stream.read(1 << 20).split(b"\n", 1)[0]
    if not line.strip():
        raise ValueError(f"{storage.display(location)}: empty file (expected a CSV header line)")
    try:
        text = line.decode("utf-8").lstrip("\ufeff").rstrip("\r")
    except UnicodeDecodeError:
        raise ValueError(f"{storage.display(location)}: the header line is not UTF-8 text") from None
    return [c.strip().strip('"') for c in text.split(delimiter)]


def float_order_key(x: np.ndarray) -> np.ndarray:
    """int64 keys with the order and the ties of the floats ``x`` (no NaN): the IEEE bits, the negatives' flipped.

    Why: the SQL takes "strictly earlier" as a range frame ``1 PRECEDING`` on an integer time, exact for every
    time column once float times are keys like these (``-0.0`` counts as ``0.0``).
    """
    bits = (np.asarray(x, np.float64) + 0.0).view(np.int64)
    return np.where(bits < 0, bits ^ np.int64(0x7FFFFFFFFFFFFFFF), bits)


def _uri(input_uri: str, fs_path: str) -> str:
    """The URI of a file found under an input (its filesystem path with the input's scheme)."""
    scheme = urllib.parse.urlsplit(input_uri).scheme
    if len(scheme) > 1 and scheme != "file":
        return f"{scheme}://{fs_path}"
    return fs_path


def _any_offset(text: pa.Array) -> bool:
    return bool(pc.any(pc.match_substring_regex(text, r"[+-]\d\d:?\d\d$")).as_py() or False)
