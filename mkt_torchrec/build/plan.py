"""The transformation of ``mkt build`` as one SQL text, the single definition both engines run.

The text is written in DuckDB's dialect over the prepared rows of :mod:`mkt_torchrec.build.inputs` (a table or
view ``ev``) and handed to Spark through sqlglot (:func:`mkt_torchrec.build.hashing.render`), so there is no
second copy to drift. It does four things:

1. **Encode** (``enc``): keep the entities' integer ids apart where ``by_entity`` says (``2 * x + e``; text ids
   arrive hashed, ``ENTITY|value`` included), null an entity-specific feature on the other entity's rows, and
   drop rows whose entity is outside ``source.entity.values`` (the build counts them first), and (``source.
   duplicates: drop``; ``refuse`` stops the build before, naming the first) every copy of an exact duplicate
   impression (a row equal in every column the build reads, :meth:`BuildPlan._read_columns`, to an earlier row of
   the same time, or, in logs without a time, to the line before it in its file), so a liked copy never puts its
   own item in its twin's sequence.
2. **Sequences built from the events.** For a sequence of entity ``E`` (shared feature ``F``), the user's
   positive rows of ``E`` with a value of ``F`` (a row without one is no step) are numbered ``k = 1, 2, ...`` in
   time order and each carries the list of its own and
   the ``max_len - 1`` earlier ones' ``F`` (a bounded window, so cost is rows x max_len). Each row counts the
   user's positive rows of ``E`` strictly before its time (a range frame ending ``1 PRECEDING`` on the integer
   time, so ties never count each other) and takes the list
   of the last of them by an equi-join on ``(user, k)``. So a row never sees itself, nor any row of the same
   time, and a step's side features are the liked row's own encoded values (a missing one: ``MISSING_RAW``
   through the feature's encoding, or bucket 0). ``activity`` counts both entities' earlier positive rows.
3. **Split**: by time cut-offs, by each user's last fraction of rows, or by each entity's (``source.split``;
   ``by: time`` rows before ``train_from`` or from ``test_until`` on get ``__split`` = -1 and are left out of
   the result, after the sequences and counts have read them;
   a fraction's cut ``floor((1 - f) * n + 1e-9)``: the fraction as the decimal written, in IEEE doubles that
   both engines compute alike).
4. **Order**: rows in ``(split, time, file, row)`` order, a total order that does not depend on the engine.

Why SQL and not a hand-written converter: the windows, the join and the sort are what an engine spills and
distributes well; the hand-written converter (``mkt tenrec``) had to keep per-user state in memory.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pyarrow as pa

from mkt_torchrec.build.source import SourceConfig, check_split_order, entity_code

MISSING_RAW = 2 ** 61 - 1  # a missing side value (mkt_torchrec.data.tenrec's convention): above every real id
MISSING_BUCKET = 0
SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}
NOT_WRITTEN = -1  # __split of a row read but not written: history before train_from, or at / after test_until


def missing_step(mapping: Any, kind: str, entity: int) -> int:
    """The value of a sequence step whose feature is null: bucket 0 for a bucketed feature, else ``MISSING_RAW``
    through the feature's encoding (``2 * x + e`` for an integer ``by_entity`` feature of entity ``e``)."""
    if mapping.transform in ("bucket", "log_bucket"):
        return MISSING_BUCKET
    return 2 * MISSING_RAW + entity if kind == "int" and mapping.by_entity else MISSING_RAW


def q(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def time_cut(value: str, time_type: pa.DataType, key: str) -> int:
    """A split cut-off as the prepared ``__t`` counts time (microseconds for times, the integer, or a float's key).

    Raises:
        ValueError: naming ``key`` when the value cannot be read as the time column's kind.
    """
    if pa.types.is_integer(time_type) or pa.types.is_floating(time_type) or pa.types.is_decimal(time_type):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{key}: {value!r} is not a number (the time column is {time_type})") from None
        if pa.types.is_floating(time_type) or pa.types.is_decimal(time_type):
            from mkt_torchrec.build.inputs import float_order_key

            return int(float_order_key(np.array([number]))[0])
        return int(number)
    text = str(value).strip().replace(" ", "T").removesuffix("Z")
    try:
        us = np.datetime64(text, "us").astype(np.int64)
    except ValueError:
        raise ValueError(f"{key}: {value!r} is not an ISO-8601 date or time (e.g. 2026-11-07)") from None
    return int(us)


class BuildPlan:
    """The SQL of one build.

    Args:
        schema: the feature schema.
        source: the mapping.
        kinds: feature -> ``int`` / ``text`` (:meth:`LogInputs.feature_kind`).
        time_type: the time column's Arrow type (cut-offs are read as it is).
    """

    def __init__(self, schema: Any, source: SourceConfig, kinds: dict[str, str], time_type: pa.DataType) -> None:
        self.schema = schema
        self.source = source
        self.kinds = kinds
        self.time_type = time_type
        self.user = schema.user_id_feature
        self.optional = (["true_prob"] if source.true_prob else []) + ["activity"]  # the synthetic datasets' order

    # ----------------------------------------------------------------------------------------------------
    def _encoded(self, name: str) -> str:
        m = self.source.features[name]
        col = q(f"f_{name}")
        if self.kinds[name] == "text":
            expr = col  # hashed by the input layer (by_entity included)
        elif m.by_entity and m.transform not in ("bucket", "log_bucket"):
            expr = f"(2 * {col} + __entity)"
        else:
            expr = col
        f = self.schema.features[name]
        if f.group == "specific":
            expr = f"CASE WHEN __entity = {entity_code(f.entity)} THEN {expr} END"
        return f"CAST({expr} AS BIGINT) AS {q(name)}"

    def _missing(self, name: str, entity: int) -> int:
        """The encoded value a step takes when the liked row's ``name`` is null."""
        return missing_step(self.source.features[name], self.kinds[name], entity)

    def encode_sql(self, drop_copies: bool = True) -> str:
        cols = ["__file", "__row", "__t", "CAST(__label AS TINYINT) AS label", "CAST(__entity AS TINYINT) AS entity"]
        for name in self.schema.sequences:
            if name not in self.event_sequences():
                cols += [q(f"s_{c}") for c in [name, *self.schema.sequences[name].side_features.values()]]
        cols += [self._encoded(n) for n in self.schema.features]
        cols += [f"CAST({q('d_' + n)} AS FLOAT) AS {q(n)}" for n in self.schema.dense]
        if self.source.true_prob:
            cols.append("CAST(__true_prob AS FLOAT) AS true_prob")
        if not drop_copies or self.source.duplicates != "drop":  # refuse: the build has refused any copy already
            return f"SELECT {', '.join(cols)} FROM ev WHERE __entity IS NOT NULL"
        return f"SELECT {', '.join(cols)} FROM ({self._copies()}) AS ev WHERE __entity IS NOT NULL AND __copy = 1"

    def _copies(self, twin: bool = False) -> str:
        """``ev`` with ``__copy``: 1 for a row, more for a copy of an exact duplicate impression (and with ``twin``
        its twin's ``__twin_file`` and ``__twin_row``)."""
        read = self._read_columns()
        if self.source.time.from_position:  # no time: a copy is the line right after its twin, in the same file
            w = "OVER (PARTITION BY __file ORDER BY __row)"
            same = " AND ".join(f"{c} IS NOT DISTINCT FROM LAG({c}) {w}" for c in read)
            extra = f", LAG(__file) {w} AS __twin_file, LAG(__row) {w} AS __twin_row" if twin else ""
            return (f"SELECT *, CASE WHEN LAG(__row) {w} IS NOT NULL AND {same} THEN 2 ELSE 1 END AS __copy{extra} "
                    "FROM ev")
        # the same time and values, anywhere: the first in (time, file, row) order stays
        w = f"OVER (PARTITION BY {', '.join(read)} ORDER BY __t, __file, __row)"
        extra = f", FIRST_VALUE(__file) {w} AS __twin_file, FIRST_VALUE(__row) {w} AS __twin_row" if twin else ""
        return f"SELECT *, ROW_NUMBER() {w} AS __copy{extra} FROM ev"

    def duplicates_count_sql(self) -> Optional[str]:
        """The number ``n`` of copies of exact duplicate impressions, by a hash aggregate (rows less distinct rows:
        cheaper than :meth:`duplicates_sql`'s window, which names them, so clean logs pay only this); None in
        ``time.from_position`` logs, whose copies are found by position (run :meth:`duplicates_sql`)."""
        if self.source.time.from_position:
            return None
        known = "FROM ev WHERE __entity IS NOT NULL"
        return (f"SELECT (SELECT COUNT(*) {known}) - (SELECT COUNT(*) FROM (SELECT DISTINCT "
                f"{', '.join(self._read_columns())} {known}) AS d) AS n")

    def duplicates_sql(self) -> str:
        """The copies of exact duplicate impressions among the rows of known entities: their number ``n`` and the
        first in (file, row) order with its twin (``file``, ``row_index``, ``twin_file``, ``twin_row``); no row
        when there is none."""
        return ("SELECT COUNT(*) OVER () AS n, __file AS file, __row AS row_index, __twin_file AS twin_file, "
                f"__twin_row AS twin_row FROM ({self._copies(twin=True)}) AS ev WHERE __entity IS NOT NULL AND "
                "__copy > 1 ORDER BY __file, __row LIMIT 1")

    def _read_columns(self) -> list[str]:
        """The prepared columns of what the build reads of a row, which ``source.duplicates`` compares: the time
        (unless ``time.from_position``, where it is the row's position), label, entity, each feature, dense
        feature, list column and ``true_prob``."""
        cols = [] if self.source.time.from_position else ["__t"]
        cols += ["__label", "__entity", *(q(f"f_{n}") for n in self.schema.features)]
        cols += [q(f"d_{n}") for n in self.schema.dense]
        for name in self.schema.sequences:
            if name not in self.event_sequences():
                cols += [q(f"s_{c}") for c in [name, *self.schema.sequences[name].side_features.values()]]
        return cols + (["__true_prob"] if self.source.true_prob else [])

    def unknown_entities_sql(self) -> str:
        """The values outside ``source.entity.values`` with their counts, most frequent first (at most 5)."""
        return ("SELECT __entity_raw AS value, COUNT(*) AS n FROM ev WHERE __entity IS NULL GROUP BY __entity_raw "
                "ORDER BY n DESC, value LIMIT 5")

    def _split_expr(self) -> str:
        """``__split`` of a row: :data:`SPLIT_CODES`, or :data:`NOT_WRITTEN` for a row outside ``by: time``'s
        ``[train_from, test_until)`` (history, or after the test)."""
        s = self.source.split
        u = q(self.user)
        if s.by == "time":
            written = s.cuts()
            cuts = {name: time_cut(value, self.time_type, f"source.split.{name}") for name, value in written.items()}
            check_split_order(cuts, written)
            whens = []
            if "test_until" in cuts:
                whens.append(f"WHEN __t >= {cuts['test_until']!r} THEN {NOT_WRITTEN}")
            whens.append(f"WHEN __t >= {cuts['test_from']!r} THEN {SPLIT_CODES['test']}")
            if "valid_from" in cuts:
                whens.append(f"WHEN __t >= {cuts['valid_from']!r} THEN {SPLIT_CODES['valid']}")
            if "train_from" in cuts:
                whens.append(f"WHEN __t < {cuts['train_from']!r} THEN {NOT_WRITTEN}")
            return f"CASE {' '.join(whens)} ELSE {SPLIT_CODES['train']} END"
        part = u if s.by == "user_fraction" else "entity"
        keep = float(1.0 - s.test_fraction)
        return (f"CASE WHEN COUNT(*) OVER {_earlier(part)} >= FLOOR(CAST({keep!r} AS DOUBLE) * COUNT(*) OVER "
                f"{_all(part)} + CAST(1e-9 AS DOUBLE)) THEN 2 ELSE 0 END")

    def _step(self, sequence: str) -> str:
        """Whether a row is a step of an event sequence: a positive row of its entity with a shared value."""
        seq = self.schema.sequences[sequence]
        return f"entity = {entity_code(seq.entity)} AND label = 1 AND {q(seq.shared_feature)} IS NOT NULL"

    def event_sequences(self) -> list[str]:
        """The schema's sequences built from the events (those without a list column)."""
        return [n for n in self.schema.sequences if self.source.sequences.get(n) is None
                or self.source.sequences[n].column is None]

    def dataset_sql(self, order: str = "split", drop_copies: bool = True) -> str:
        """The whole transformation: one row per impression written, with ``__split`` (0 train, 1 valid, 2 test).
        Rows outside ``by: time``'s ``[train_from, test_until)`` are read (their clicks make the sequences and
        ``activity`` of the rows written) but left out here, after the windows, so neither engine writes them.

        Args:
            order: ``split`` (``__split, time, file, row``: the DuckDB writer's stream) or ``entity``
                (``__split, entity, time, file, row``: Spark's range-partitioned files, one entity each).
            drop_copies: leave out the copies of exact duplicate impressions (``source.duplicates: drop``); false
                when the build found none (:meth:`duplicates_count_sql`), which spares a window over all rows.
        """
        u = q(self.user)
        seqs = self.event_sequences()
        ctes = [f"enc AS ({self.encode_sql(drop_copies)})"]
        flags = []
        for i, name in enumerate(seqs):
            flags.append(f"CASE WHEN {self._step(name)} THEN 1 ELSE 0 END AS __p{i}")
        flags.append("CAST(label AS INTEGER) AS __pa")
        ctes.append(f"flagged AS (SELECT enc.*, {', '.join(flags)} FROM enc)")
        counts = [f"COALESCE(SUM({key}) OVER {_earlier(u)}, 0) AS {key}_n"
                  for key in [f"__p{i}" for i in range(len(seqs))] + ["__pa"]]
        ctes.append(f"counted AS (SELECT flagged.*, {', '.join(counts)}, {self._split_expr()} AS __split "
                    "FROM flagged)")
        joins, outs = [], []
        for i, name in enumerate(seqs):
            seq = self.schema.sequences[name]
            e = entity_code(seq.entity)
            steps = [(seq.shared_feature, name)] + list(seq.side_features.items())
            values = ", ".join(f"COALESCE({q(feat)}, {self._missing(feat, e)}) AS __v{j}"
                               for j, (feat, _) in enumerate(steps))
            ctes.append(f"pos{i} AS (SELECT {u} AS __u, {values}, ROW_NUMBER() OVER (PARTITION BY {u} ORDER BY "
                        f"__t, __file, __row) AS __k FROM enc WHERE {self._step(name)})")
            window = (f"OVER (PARTITION BY __u ORDER BY __k ROWS BETWEEN {seq.max_len - 1} PRECEDING AND "
                      "CURRENT ROW)")
            lists = ", ".join(f"LIST(__v{j}) {window} AS __l{j}" for j in range(len(steps)))
            ctes.append(f"hist{i} AS (SELECT __u, __k, {lists} FROM pos{i})")
            joins.append(f"LEFT JOIN hist{i} AS h{i} ON h{i}.__u = c.{u} AND h{i}.__k = c.__p{i}_n")
            for j, (_, column) in enumerate(steps):
                outs.append((column, f"COALESCE(h{i}.__l{j}, CAST([] AS BIGINT[])) AS {q(column)}"))
        for name in self.schema.sequences:  # sequences (and their side columns) read from list columns
            if name not in seqs:
                for column in [name, *self.schema.sequences[name].side_features.values()]:
                    outs.append((column, f"COALESCE(c.{q('s_' + column)}, CAST([] AS BIGINT[])) AS {q(column)}"))
        outs_by_name = dict(outs)
        cols = ["c.__split AS __split", "c.entity AS entity", "c.label AS label"]
        cols += [f"c.{q(n)} AS {q(n)}" for n in self.schema.features]
        for name in self.schema.sequences:
            cols.append(outs_by_name[name])
        for column in self.schema.side_keys:
            cols.append(outs_by_name[column])
        cols += [f"c.{q(n)} AS {q(n)}" for n in self.schema.dense]
        cols.append("CAST(c.__pa_n AS INTEGER) AS activity")
        if self.source.true_prob:
            cols.append("c.true_prob AS true_prob")
        keys = "__split, entity, " if order == "entity" else "__split, "
        cols += ["c.__t AS __t", "c.__file AS __file", "c.__row AS __row"]
        return (f"WITH {', '.join(ctes)} SELECT {', '.join(cols)} FROM counted AS c {' '.join(joins)} "
                f"WHERE c.__split <> {NOT_WRITTEN} ORDER BY {keys}__t, __file, __row")


def _earlier(part: str) -> str:
    """The window of a row's strictly earlier rows of its partition: a range frame ending ``1 PRECEDING`` on the
    integer time, so rows of one time never count each other. Every count shares it (and :func:`_all`'s
    partition and order), so an engine sorts the rows once for all of them."""
    return f"(PARTITION BY {part} ORDER BY __t RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)"


def _all(part: str) -> str:
    """Every row of the partition, with :func:`_earlier`'s partition and order (one sort serves both)."""
    return f"(PARTITION BY {part} ORDER BY __t RANGE BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)"


def split_names() -> dict[int, str]:
    return {v: k for k, v in SPLIT_CODES.items()}

