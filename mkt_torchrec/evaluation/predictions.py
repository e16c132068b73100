"""Prediction files: their columns, how they are read and validated, and streams of one entity's rows.

A run's predictions are ``part-*.parquet`` files (``RUN/predictions``, one per rank as ``mkt evaluate`` writes
them), read in file-name order, with the columns

* ``user_id``: integer, no missing values;
* ``entity``: ``"source"`` or ``"target"`` (:data:`ENTITIES`; a dictionary column is fine);
* ``label``: 0/1 click;
* ``score``: float32 values (a wider float column must hold float32 values);
* optionally ``activity`` (integer >= 0, the user's past behaviours, for the activity groups) and
  ``true_prob`` (float32, the true click probability of synthetic data), in every part file or in none.

:func:`read_layout` checks the columns from the files' footers; :func:`check_parts` that the part files are those
``mkt evaluate`` wrote (one per rank of the world size ``metrics.json`` records, with the rows it counted); :func:`iter_batches` streams validated
:class:`Rows` (:func:`validate_batch`: errors name the file, column and row); :func:`iter_entity_rows` and
:func:`iter_entity_columns` stream one entity's rows.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = ["ENTITIES", "REQUIRED_COLUMNS", "Layout", "Rows", "read_layout", "check_parts", "iter_batches",
           "validate_batch", "iter_entity_rows", "iter_entity_columns"]

ENTITIES = ("source", "target")
REQUIRED_COLUMNS = ("user_id", "entity", "label", "score")


@dataclass(frozen=True)
class Layout:
    """The part files of a predictions directory (sorted by name), their rows and optional columns."""

    files: Tuple[str, ...]
    rows: int
    activity: bool
    true_prob: bool
    row_groups: Tuple[Tuple[int, ...], ...]  # rows of each row group, per file


def read_layout(pred_dir: str) -> Layout:
    """:class:`Layout` of ``pred_dir`` from the part files' footers, checking the required columns.

    Raises:
        FileNotFoundError: no ``part-*.parquet`` files.
        ValueError: a missing required column, or an optional column in some part files only.
    """
    files = tuple(sorted(glob.glob(os.path.join(pred_dir, "part-*.parquet"))))
    if not files:
        raise FileNotFoundError(f"{pred_dir}: no predictions (part-*.parquet)")
    present: Dict[str, List[bool]] = {"activity": [], "true_prob": []}
    rows = 0
    row_groups: List[Tuple[int, ...]] = []
    for path in files:
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; predictions need {list(REQUIRED_COLUMNS)}")
        for c in present:
            present[c].append(c in names)
        meta = pf.metadata
        rows += meta.num_rows
        row_groups.append(tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)))
    for c, flags in present.items():
        if any(flags) and not all(flags):
            lacking = [f for f, has in zip(files, flags, strict=True) if not has]
            raise ValueError(f"{lacking[0]}: no column {c!r} while other part files have it; "
                             "all part files of a run must have the same columns")
    return Layout(files, rows, all(present["activity"]), all(present["true_prob"]), tuple(row_groups))


def part_name(rank: int) -> str:
    """The predictions file rank ``rank`` writes (``mkt evaluate``, ``training.scoring.score_split``)."""
    return f"part-{rank:05d}.parquet"


def check_parts(pred_dir: str, metrics: Dict[str, object]) -> None:
    """The part files of ``pred_dir`` are the ones ``mkt evaluate`` wrote with ``metrics`` (its metrics.json): one per
    rank of its ``world_size`` (``part-00000.parquet`` ...), holding the rows its entity blocks count. A run whose
    part files were deleted or added since would otherwise be compared on other rows than it was scored on. Reads
    footers only; metrics.json without ``world_size`` (older releases) is checked by rows alone.

    Raises:
        FileNotFoundError: a part file of the recorded world size is missing (naming it).
        ValueError: part files beyond the world size, or other row counts than metrics.json's (naming both).
    """
    again = "run mkt evaluate on the run again"
    present = sorted(os.path.basename(f) for f in glob.glob(os.path.join(pred_dir, "part-*.parquet")))
    world = metrics.get("world_size")
    if isinstance(world, int) and world > 0:
        expected = [part_name(r) for r in range(world)]
        missing = [n for n in expected if n not in present]
        if missing:
            raise FileNotFoundError(f"{os.path.join(pred_dir, missing[0])}: missing ({len(missing)} of the {world} part "
                                    f"files metrics.json's world_size={world} says mkt evaluate wrote are gone: "
                                    f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}); {again}")
        extra = [n for n in present if n not in expected]
        if extra:
            raise ValueError(f"{os.path.join(pred_dir, extra[0])}: not written by the mkt evaluate of metrics.json "
                             f"(world_size={world}: {expected[0]} .. {expected[-1]}); remove it, or {again}")
    counted = [m.get("rows") for e, m in metrics.items() if e in ENTITIES and isinstance(m, dict)]
    if counted and all(isinstance(n, int) for n in counted):
        held = read_layout(pred_dir).rows
        if held != sum(counted):  # type: ignore[arg-type]
            raise ValueError(f"{pred_dir}: the part files hold {held} rows but metrics.json counts "
                             f"{sum(counted)} (the predictions changed since mkt evaluate); {again}")  # type: ignore[arg-type]


@dataclass
class Rows:
    """Validated rows: (N,) arrays; ``entity`` indexes :data:`ENTITIES`, ``group`` the activity group."""

    user_id: np.ndarray  # int64
    entity: np.ndarray  # int8
    label: np.ndarray  # int8 0/1
    score: Optional[np.ndarray]  # float32
    group: Optional[np.ndarray] = None  # int8
    true_prob: Optional[np.ndarray] = None  # float32

    def __len__(self) -> int:
        return int(self.user_id.shape[0])

    def take(self, index: np.ndarray) -> "Rows":
        """The rows at ``index``."""
        return Rows(*[None if a is None else a[index] for a in self._arrays()])

    def _arrays(self) -> List[Optional[np.ndarray]]:
        return [self.user_id, self.entity, self.label, self.score, self.group, self.true_prob]

    @staticmethod
    def concat(parts: Sequence["Rows"]) -> "Rows":
        """The rows of ``parts``, one after the other."""
        cols = list(zip(*[p._arrays() for p in parts], strict=True))
        return Rows(*[None if c[0] is None else np.concatenate(c) for c in cols])

    def to_table(self) -> pa.Table:
        """The present columns as a pyarrow table (spill files)."""
        names = ["user_id", "entity", "label", "score", "group", "true_prob"]
        return pa.table({n: a for n, a in zip(names, self._arrays(), strict=True) if a is not None})

    @staticmethod
    def from_table(t: pa.Table) -> "Rows":
        """Inverse of :meth:`to_table`."""

        def col(n: str) -> Optional[np.ndarray]:
            return t.column(n).to_numpy() if n in t.column_names else None

        return Rows(col("user_id"), col("entity"), col("label"), col("score"), col("group"), col("true_prob"))


def iter_batches(layout: Layout, batch_rows: int, bounds: np.ndarray,
                 columns: Optional[Sequence[str]] = None) -> Iterator[Rows]:
    """Stream validated record batches of all part files, in file-name order (``bounds``: the activity bounds
    that map ``activity`` to :attr:`Rows.group`; ``columns``: default all the layout has)."""
    if columns is None:
        columns = list(REQUIRED_COLUMNS) + [c for c, has in (("activity", layout.activity),
                                                             ("true_prob", layout.true_prob)) if has]
    for path in layout.files:
        offset = 0
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)  # stream column chunks: less memory
        for rb in pf.iter_batches(batch_size=batch_rows, columns=list(columns)):
            yield validate_batch(rb, path, offset, bounds)
            offset += rb.num_rows


def validate_batch(rb: pa.RecordBatch, path: str, offset: int, bounds: np.ndarray) -> Rows:
    """Check one record batch and convert it to :class:`Rows`; errors name the file, column and row."""

    def fail(name: str, bad: np.ndarray, what: str, fix: str) -> None:
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{path}: column {name!r} has {int(bad.sum())} {what} (first at row {offset + first}); "
                         f"{fix}")

    def column(name: str) -> pa.Array:
        return rb.column(rb.schema.get_field_index(name))

    def integers(name: str) -> np.ndarray:
        a = column(name)
        if not pa.types.is_integer(a.type):
            raise ValueError(f"{path}: column {name!r} must be an integer column, got {a.type}")
        if a.null_count:
            fail(name, np.asarray(a.is_null()), "missing value(s)", "every row needs one")
        return a.to_numpy().astype(np.int64, copy=False)

    def float32s(name: str) -> np.ndarray:
        a = column(name)
        if not (pa.types.is_floating(a.type) or pa.types.is_integer(a.type)):
            raise ValueError(f"{path}: column {name!r} must be numeric, got {a.type}")
        v = a.to_numpy(zero_copy_only=False)  # nulls -> NaN
        bad = ~np.isfinite(v)
        if a.null_count:
            bad |= np.asarray(a.is_null())
        if bad.any():
            fail(name, bad, "NaN/missing/infinite value(s)", "check the model output for divergence")
        v32 = v.astype(np.float32)
        if v.dtype != np.float32 and not np.array_equal(v32, v):
            raise ValueError(f"{path}: column {name!r} holds {v.dtype} values that are not float32 values; "
                             "write scores as float32 (as mkt evaluate does)")
        return v32

    user_id = integers("user_id")
    ent = column("entity")
    if pa.types.is_dictionary(ent.type):
        ent = ent.dictionary_decode()
    is_target = pc.fill_null(pc.equal(ent, "target"), False).to_numpy(zero_copy_only=False)
    is_source = pc.fill_null(pc.equal(ent, "source"), False).to_numpy(zero_copy_only=False)
    bad = ~(is_target | is_source)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        fail("entity", bad, f"value(s) not in {ENTITIES} (e.g. {ent[first].as_py()!r})", "fix the writer")
    entity = is_target.astype(np.int8)
    lab = column("label")
    y = lab.to_numpy(zero_copy_only=False)
    bad = ~((y == 0) | (y == 1))
    if lab.null_count:
        bad |= np.asarray(lab.is_null())
    if bad.any():
        fail("label", bad, "value(s) that are not 0/1 (or missing)", "labels must be binary clicks")
    out = Rows(user_id, entity, y.astype(np.int8), None)
    names = set(rb.schema.names)
    if "score" in names:
        out.score = float32s("score")
    if "activity" in names:
        act = integers("activity")
        if (act < 0).any():
            fail("activity", act < 0, "negative value(s)", "activity counts past behaviours")
        out.group = np.searchsorted(bounds, act, side="right").astype(np.int8)
    if "true_prob" in names:
        out.true_prob = float32s("true_prob")
    return out


def iter_entity_rows(pred_dir: str, entity: str, batch_rows: int = 1 << 20) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Stream ``(user_id int64, label int8)`` of one entity's rows, part files in name order.

    Example:
        >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq
        >>> d = tempfile.mkdtemp()
        >>> pq.write_table(pa.table({"user_id": [3, 4], "entity": ["source", "target"],
        ...     "label": pa.array([1, 0], pa.float32()), "score": pa.array([.5, .5], pa.float32())}),
        ...     f"{d}/part-00000.parquet")
        >>> [(u.tolist(), y.tolist()) for u, y in iter_entity_rows(d, "target")]
        [([4], [0])]
    """
    code = ENTITIES.index(entity)
    for rows in iter_batches(read_layout(pred_dir), batch_rows, np.zeros(0, np.int64),
                             columns=("user_id", "entity", "label")):
        m = rows.entity == code
        if m.any():
            yield rows.user_id[m], rows.label[m]


def iter_entity_columns(pred_dir: str, entity: str, batch_rows: int = 1 << 18) -> Iterator[Dict[str, np.ndarray]]:
    """Stream one entity's validated rows, part files in name order, at most ``batch_rows`` rows read at a time.

    Yields:
        ``{"user_id": int64, "label": int8, "score": float32}`` plus ``"true_prob"`` (float32) when the files
        have it; batches without rows of ``entity`` are skipped.

    Example:
        >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq
        >>> d = tempfile.mkdtemp()
        >>> pq.write_table(pa.table({"user_id": [3, 4], "entity": ["source", "target"],
        ...     "label": pa.array([1, 0], pa.float32()), "score": pa.array([.5, .25], pa.float32())}),
        ...     f"{d}/part-00000.parquet")
        >>> [b["score"].tolist() for b in iter_entity_columns(d, "target")]
        [[0.25]]
    """
    code = ENTITIES.index(entity)
    layout = read_layout(pred_dir)
    columns = list(REQUIRED_COLUMNS) + (["true_prob"] if layout.true_prob else [])
    for rows in iter_batches(layout, batch_rows, np.zeros(0, np.int64), columns=columns):
        sel = np.flatnonzero(rows.entity == code)
        if sel.shape[0]:
            out = {"user_id": rows.user_id[sel], "label": rows.label[sel], "score": rows.score[sel]}
            if rows.true_prob is not None:
                out["true_prob"] = rows.true_prob[sel]
            yield out
