"""Metrics of a predictions directory (``RUN/predictions/part-*.parquet``), per entity, in bounded memory.

:func:`compute_metrics` returns, for each entity present (``"source"`` and/or ``"target"``)::

    {"rows", "users", "positives",                   # ints
     "auc", "gauc", "mean_user_auc",                 # float, or None where undefined (a single class)
     "users_evaluated", "users_skipped_single_class",
     "auc_ci", "gauc_ci",                            # [lo, hi] user-level bootstrap, or None
     "logloss",                                      # mean binary cross-entropy of the scores
     "calibration": {"binning": "equal_width", "bins", "ece", "mean_score", "click_rate",
                     "per_bin": [{"lo", "hi", "rows", "mean_score", "click_rate"}, ...]},
     "groups": [{"name": "0-10", "lo": 0, "hi": 10, "rows", "users", "users_evaluated", "auc", "gauc"}, ...],
     "ceiling": {"auc", "gauc"} or None}             # true_prob as the score, when present

plus ``"bootstrap": {"samples", "confidence", "seed"}``. ``gauc`` is the paper's Eq. 14 (impression-weighted)
and ``mean_user_auc`` the unweighted mean of per-user AUCs (see :mod:`~mkt_torchrec.evaluation.metrics`).
Activity groups follow ``eval_cfg.activity_bounds`` (``[10, 30]``: ``[0, 10)`` "0-10", ``[10, 30)``
"10-30", ``[30, inf)`` ">30", whose ``"hi"`` is None); a row's group is its own ``activity`` value; all
groups are listed, empty ones with 0 rows and None metrics; ``groups`` is ``[]`` without an ``activity``
column; a group's ``users_evaluated`` counts its users with both a click and a non-click in the group (the users
its GAUC rests on). Intervals are described in :mod:`~mkt_torchrec.evaluation.analysis`.

Log loss and calibration, over all rows of the entity (``N`` rows, labels ``y``, scores ``s``):

* ``logloss = (1/N) sum -log(clip(q, 1e-7, 1 - 1e-7))`` with ``q = s`` for a click and ``q = 1 - s`` for a
  non-click, the probability given to the row's own label (:data:`LOGLOSS_CLIP`: a saturated score of 0.0
  or 1.0 on the wrong label costs ``-log(1e-7) = 16.1``, not infinity). This is the usual
  ``-[y log p + (1 - y) log(1 - p)]`` with ``p = clip(s, 1e-7, 1 - 1e-7)``, up to the rounding of ``1 - p``.
* ``calibration``: ``B = eval_cfg.calibration_bins`` **equal-width** bins over [0, 1] (bin ``b``:
  ``b/B <= s < (b+1)/B``, a score of 1.0 in the last bin). ``ece = sum_b |S_b - P_b| / N``, ``S_b`` the sum of the
  scores and ``P_b`` the clicks of bin ``b`` (= ``sum_b (n_b/N) |mean score_b - click rate_b|``);
  ``mean_score = sum s / N`` (the mean predicted CTR) against ``click_rate = sum y / N`` (the observed CTR);
  ``per_bin`` lists every bin (``mean_score`` / ``click_rate`` None when empty). Equal-width bins are
  fixed in advance, so the statistics are plain sums that merge over any split of the rows; equal-mass bins
  would need the global score order. With click-through rates of a few percent most rows fall in the first
  bins: raise ``calibration_bins`` for a finer view of the low scores.

Both are None when some score lies outside [0, 1] (not probabilities, e.g. raw logits). Both are exact: the
float terms (log-loss terms, scores) are summed exactly
(:func:`~mkt_torchrec.evaluation.analysis.exact_sum`) and each result rounded once, so they too are
bit-identical over any split of the rows (partitions, ranks).

How it stays exact in bounded memory
------------------------------------
1. **Spill by user.** The part files are streamed in record batches (a user's rows may be in several files)
   and every row goes to one of ``K`` hash partitions of its user (``partition_by_user``), written as
   temporary Parquet files; ``K = max(eval_cfg.partitions, ceil(rows / limits.partition_rows))``. Inputs of
   at most ``limits.threshold_rows`` rows are partitioned the same way in memory, so both paths give
   identical results.
2. **Partition by partition.** A partition holds every row of its users, so per-user statistics are exact:
   :class:`~mkt_torchrec.evaluation.metrics.GroupAUCStats` of the scores (merged with
   ``GroupAUCStats.merge``), and GAUC partial sums of each activity group and of ``true_prob``. Every sum of
   float terms (``n_u AUC_u`` for GAUC, ``AUC_u`` for the mean user AUC) is exact
   (:func:`~mkt_torchrec.evaluation.analysis.exact_sum`) and rounded once at the end, so the metrics do not
   depend on how the users are split into partitions (nor over ranks:
   :mod:`~mkt_torchrec.evaluation.distributed_metrics` gives bit-identical results). Each row is
   also appended, as one packed int64 ``(score, label, group)`` key and its user's index, to a *score
   bucket*: raw binary files holding one score range each.
3. **Global AUC** does not decompose by user, and exact per-score counts (``AUCStats``) can grow to the
   number of rows. The buckets are read in score order, one at a time (sorted in memory; an overfull one is
   split again by score; one holding a single score is streamed), carrying the number of positives and
   negatives seen so far, which gives the exact Mann-Whitney numerator in integers; the same pass gives the
   activity groups' AUCs and the bootstrap's per-user inputs. ``true_prob`` has its own buckets.
4. **Bootstrap** from per-user statistics (``O(users)`` memory; ``O(rows)`` more only while the exact AUC
   bootstrap is affordable, :func:`~mkt_torchrec.evaluation.analysis.exact_auc_feasible`); resamples are
   hashed from the user ids, so they too are the same however the users are split.

Memory is bounded by the spill limits (a few hundred MB at the defaults) plus ``O(users)`` arrays (about
100 bytes per user of the entity being finished): ``tools/bench_gauc.py --out-of-core --rows 100000000``
(5M users per entity, 200 resamples) peaks at about 1.1 GB RSS. Limits: one user's rows must fit in
memory; integer sums assume fewer than about 4e9 rows per entity; scores and ``true_prob`` must be float32
values (as ``mkt evaluate`` writes them). Temporary files go under ``spill_dir`` (default: the system temp
dir), need about 40 bytes per row, and are removed at the end, also on errors.

Example:
    >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq
    >>> from mkt_torchrec.config import EvalConfig
    >>> d = tempfile.mkdtemp()
    >>> pq.write_table(pa.table({"user_id": [1, 1, 2, 2], "entity": ["target"] * 4,
    ...     "label": pa.array([1, 0, 1, 0], pa.float32()), "score": pa.array([.9, .2, .3, .6], pa.float32())}),
    ...     f"{d}/part-00000.parquet")
    >>> m = compute_metrics(d, EvalConfig(bootstrap_samples=0))
    >>> m["target"]["auc"], m["target"]["gauc"], m["target"]["groups"]
    (0.75, 0.5, [])
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mkt_torchrec.config import EvalConfig
from mkt_torchrec.evaluation import analysis
from mkt_torchrec.evaluation.analysis import _mw_concat
from mkt_torchrec.evaluation.metrics import (
    GroupAUCStats,
    _sortable32,  # the float32 -> ordered-int key of metrics' fast path (-0.0 == +0.0)
    group_auc_stats,
    partition_by_user,
    per_user_auc,
)

__all__ = ["ENTITIES", "LOGLOSS_CLIP", "SpillLimits", "GroupStatistics", "EntityStatistics", "compute_metrics",
           "entity_statistics", "entity_report", "iter_entity_rows", "iter_entity_columns"]

ENTITIES = ("source", "target")
REQUIRED_COLUMNS = ("user_id", "entity", "label", "score")
# Scores are clipped to [LOGLOSS_CLIP, 1 - LOGLOSS_CLIP] for the log loss (no log 0).
LOGLOSS_CLIP = 1e-7

# Packed score key: sortable32(score) << 9 | label << 8 | activity group (< 256). Sorting the keys sorts rows
# by score; equal keys are interchangeable rows.
_LABEL_SHIFT = 8
_SCORE_SHIFT = 9
_MAX_GROUPS = 256


@dataclass(frozen=True)
class SpillLimits:
    """Sizes that bound memory (the defaults keep the peak at a few hundred MB).

    Args:
        threshold_rows: inputs with more rows than this are spilled to disk; smaller ones stay in memory.
        partition_rows: rows per user partition, at most about (more partitions than
            ``eval_cfg.partitions`` are used when needed).
        bucket_rows: rows per score bucket, about; a bucket over twice this is split again.
        batch_rows: rows per record batch read from the prediction files.
    """

    threshold_rows: int = 2_000_000
    partition_rows: int = 4_000_000
    bucket_rows: int = 1_000_000
    batch_rows: int = 1 << 18


@dataclass(frozen=True)
class GroupStatistics:
    """Metrics of the rows of one activity group (``lo <= activity < hi``; ``hi`` None: unbounded)."""

    name: str
    lo: int
    hi: Optional[int]
    rows: int
    users: int
    auc: Optional[float]
    gauc: Optional[float]
    users_evaluated: int = 0  # users with both labels in the group: the users its GAUC rests on


@dataclass(frozen=True)
class EntityStatistics:
    """Point metrics of one entity and the per-user statistics its bootstrap needs (None: undefined;
    ``user_stats`` is None where the bootstrap was computed elsewhere, e.g. across ranks)."""

    rows: int
    users: int
    positives: int
    auc: Optional[float]
    gauc: Optional[float]
    mean_user_auc: Optional[float]
    users_evaluated: int
    users_skipped_single_class: int
    groups: List[GroupStatistics]
    ceiling: Optional[Dict[str, Optional[float]]]
    user_stats: Optional[analysis.UserStats] = field(default=None, repr=False)
    logloss: Optional[float] = None
    calibration: Optional[Dict[str, Any]] = None


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def compute_metrics(pred_dir: str, eval_cfg: EvalConfig, spill_dir: Optional[str] = None, *,
                    limits: SpillLimits = SpillLimits()) -> Dict[str, Any]:
    """Per-entity AUC, GAUC, activity groups, ceiling and bootstrap intervals of a predictions directory.

    Args:
        pred_dir: directory of ``part-*.parquet`` files with ``user_id`` (int), ``entity`` ('source' /
            'target'), ``label`` (0/1), ``score`` (float32) and optionally ``activity`` (int >= 0) and
            ``true_prob`` (float32).
        eval_cfg: activity bounds, bootstrap samples / confidence / seed, partitions.
        spill_dir: parent directory of the temporary spill files (default: the system temp dir).
        limits: memory limits (:class:`SpillLimits`).

    Returns:
        The JSON-able dict described in the module docstring.

    Raises:
        FileNotFoundError: no part files.
        ValueError: naming the file and column: a missing column, NaN/missing values, labels not 0/1, an
            unknown entity, negative activity, non-float32 scores.
    """
    out: Dict[str, Any] = {}
    for name, st in _iter_entity_statistics(pred_dir, eval_cfg, spill_dir, None, limits):
        out[name] = _report(st, eval_cfg)
        del st  # before the next entity's statistics are built
    out["bootstrap"] = _bootstrap_entry(eval_cfg)
    return out


def _bootstrap_entry(eval_cfg: EvalConfig) -> Dict[str, Any]:
    """The ``"bootstrap"`` entry of :func:`compute_metrics`."""
    return {"samples": int(eval_cfg.bootstrap_samples), "confidence": float(eval_cfg.confidence),
            "seed": int(eval_cfg.seed)}


def entity_statistics(pred_dir: str, eval_cfg: EvalConfig, spill_dir: Optional[str] = None,
                      entities: Optional[Sequence[str]] = None, *,
                      limits: SpillLimits = SpillLimits()) -> Dict[str, EntityStatistics]:
    """Point metrics and bootstrap inputs per entity (the work behind :func:`compute_metrics`).

    Args:
        pred_dir: predictions directory.
        eval_cfg: evaluation config.
        spill_dir: parent directory of temporary files.
        entities: entities to evaluate (default: both); absent ones are left out of the result.
        limits: memory limits.

    Returns:
        ``{entity: EntityStatistics}`` for the requested entities that have rows.
    """
    return dict(_iter_entity_statistics(pred_dir, eval_cfg, spill_dir, entities, limits))


def _iter_entity_statistics(pred_dir: str, eval_cfg: EvalConfig, spill_dir: Optional[str],
                            entities: Optional[Sequence[str]], limits: SpillLimits
                            ) -> Iterator[Tuple[str, EntityStatistics]]:
    """Yield ``(entity, EntityStatistics)`` one entity at a time (a caller that drops each one before the
    next holds only one entity's per-user arrays)."""
    layout = _layout(pred_dir)
    wanted = ENTITIES if entities is None else tuple(entities)
    bounds = np.asarray(eval_cfg.activity_bounds, dtype=np.int64)
    n_groups = bounds.shape[0] + 1 if layout.activity else 0
    if n_groups > _MAX_GROUPS:
        raise ValueError(f"eval.activity_bounds: at most {_MAX_GROUPS - 1} bounds are supported")
    spill = layout.rows > limits.threshold_rows
    k = max(int(eval_cfg.partitions), -(-layout.rows // limits.partition_rows))
    if spill and spill_dir is not None:
        os.makedirs(spill_dir, exist_ok=True)
    tmp_ctx = tempfile.TemporaryDirectory(prefix="mkt-eval-", dir=spill_dir) if spill else contextlib.nullcontext()
    with tmp_ctx as tmp:
        counts, partitions = _partition_by_user(layout, k, bounds, limits, tmp)
        acc = {
            name: _EntityAccumulator(int(counts[code]), n_groups, layout.true_prob, eval_cfg, limits,
                                     None if tmp is None else os.path.join(tmp, name), layout.rows)
            for code, name in enumerate(ENTITIES) if name in wanted and counts[code] > 0
        }
        for rows in partitions:
            for code, name in enumerate(ENTITIES):
                if name in acc:
                    sel = np.flatnonzero(rows.entity == code)
                    if sel.shape[0]:
                        acc[name].add(rows.take(sel))
            del rows  # before the next partition is read
        for name in list(acc):
            yield name, acc.pop(name).finish(bounds)


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
    for rows in _batches(_layout(pred_dir), batch_rows, np.zeros(0, np.int64), columns=("user_id", "entity", "label")):
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
    layout = _layout(pred_dir)
    columns = list(REQUIRED_COLUMNS) + (["true_prob"] if layout.true_prob else [])
    for rows in _batches(layout, batch_rows, np.zeros(0, np.int64), columns=columns):
        sel = np.flatnonzero(rows.entity == code)
        if sel.shape[0]:
            out = {"user_id": rows.user_id[sel], "label": rows.label[sel], "score": rows.score[sel]}
            if rows.true_prob is not None:
                out["true_prob"] = rows.true_prob[sel]
            yield out


# --------------------------------------------------------------------------------------------------------
# Reading and validating the prediction files
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    files: Tuple[str, ...]
    rows: int
    activity: bool
    true_prob: bool
    row_groups: Tuple[Tuple[int, ...], ...]  # rows of each row group, per file


def _layout(pred_dir: str) -> _Layout:
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
            lacking = [f for f, has in zip(files, flags) if not has]
            raise ValueError(f"{lacking[0]}: no column {c!r} while other part files have it; "
                             "all part files of a run must have the same columns")
    return _Layout(files, rows, all(present["activity"]), all(present["true_prob"]), tuple(row_groups))


@dataclass
class _Rows:
    """Validated rows: (N,) arrays; ``entity`` indexes :data:`ENTITIES`, ``group`` the activity group."""

    user_id: np.ndarray  # int64
    entity: np.ndarray  # int8
    label: np.ndarray  # int8 0/1
    score: Optional[np.ndarray]  # float32
    group: Optional[np.ndarray] = None  # int8
    true_prob: Optional[np.ndarray] = None  # float32

    def __len__(self) -> int:
        return int(self.user_id.shape[0])

    def take(self, index: np.ndarray) -> "_Rows":
        return _Rows(*[None if a is None else a[index] for a in self._arrays()])

    def _arrays(self) -> List[Optional[np.ndarray]]:
        return [self.user_id, self.entity, self.label, self.score, self.group, self.true_prob]

    @staticmethod
    def concat(parts: Sequence["_Rows"]) -> "_Rows":
        cols = list(zip(*[p._arrays() for p in parts]))
        return _Rows(*[None if c[0] is None else np.concatenate(c) for c in cols])

    def to_table(self) -> pa.Table:
        names = ["user_id", "entity", "label", "score", "group", "true_prob"]
        return pa.table({n: a for n, a in zip(names, self._arrays()) if a is not None})

    @staticmethod
    def from_table(t: pa.Table) -> "_Rows":
        def col(n: str) -> Optional[np.ndarray]:
            return t.column(n).to_numpy() if n in t.column_names else None

        return _Rows(col("user_id"), col("entity"), col("label"), col("score"), col("group"), col("true_prob"))


def _batches(layout: _Layout, batch_rows: int, bounds: np.ndarray,
             columns: Optional[Sequence[str]] = None) -> Iterator[_Rows]:
    """Stream validated record batches of all part files, in file-name order."""
    if columns is None:
        columns = list(REQUIRED_COLUMNS) + [c for c, has in (("activity", layout.activity),
                                                             ("true_prob", layout.true_prob)) if has]
    for path in layout.files:
        offset = 0
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)  # stream column chunks: less memory
        for rb in pf.iter_batches(batch_size=batch_rows, columns=list(columns)):
            yield _validated(rb, path, offset, bounds)
            offset += rb.num_rows


def _validated(rb: pa.RecordBatch, path: str, offset: int, bounds: np.ndarray) -> _Rows:
    """Check one record batch and convert it to :class:`_Rows`; errors name the file, column and row."""

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
    out = _Rows(user_id, entity, y.astype(np.int8), None)
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


# --------------------------------------------------------------------------------------------------------
# Step 1: partition rows by user (on disk, or in memory for small inputs)
# --------------------------------------------------------------------------------------------------------


def _partition_by_user(layout: _Layout, k: int, bounds: np.ndarray, limits: SpillLimits,
                       tmp: Optional[str]) -> Tuple[np.ndarray, Iterator[_Rows]]:
    """-> ((2,) rows per entity, iterator over the ``k`` partitions' rows); spills to ``tmp`` if given."""
    counts = np.zeros(len(ENTITIES), dtype=np.int64)
    if tmp is None:
        batches = list(_batches(layout, limits.batch_rows, bounds))
        rows = _Rows.concat(batches)
        del batches
        counts += np.bincount(rows.entity, minlength=len(ENTITIES))
        return counts, (rows.take(sel) for sel in _split_by_partition(rows.user_id, k))
    paths = [os.path.join(tmp, f"users-{i:05d}.parquet") for i in range(k)]
    writers: Dict[int, pq.ParquetWriter] = {}
    try:
        for rows in _batches(layout, limits.batch_rows, bounds):
            counts += np.bincount(rows.entity, minlength=len(ENTITIES))
            for i, sel in enumerate(_split_by_partition(rows.user_id, k)):
                if sel.shape[0]:
                    t = rows.take(sel).to_table()
                    if i not in writers:
                        # Temporary data: no dictionaries or statistics (4x faster writes).
                        writers[i] = pq.ParquetWriter(paths[i], t.schema, compression="lz4", use_dictionary=False,
                                                      write_statistics=False)
                    writers[i].write_table(t)
    finally:
        for w in writers.values():
            w.close()

    def read_back() -> Iterator[_Rows]:
        for i, path in enumerate(paths):
            if i in writers:
                t = pq.read_table(path)
                os.remove(path)
                yield _Rows.from_table(t)

    return counts, read_back()


def _split_by_partition(user_id: np.ndarray, k: int) -> List[np.ndarray]:
    """(N,) user ids -> ``k`` row-index arrays, one per hash partition (rows keep their order)."""
    part = partition_by_user(user_id, k)
    part = part.astype(np.int16) if k < 2**15 else part  # int16: numpy's stable sort is a radix sort
    order = np.argsort(part, kind="stable")
    edges = np.searchsorted(part[order], np.arange(k + 1))
    return [order[a:b] for a, b in zip(edges[:-1], edges[1:])]


# --------------------------------------------------------------------------------------------------------
# Step 2: per-entity accumulation, partition by partition
# --------------------------------------------------------------------------------------------------------


class _GaucSum:
    """GAUC (Eq. 14) and mean user AUC accumulated over partitions of disjoint users, plus row/user/positive
    counts. The float terms are added exactly (Fractions), so the result does not depend on the partitions
    or their order; partial sums of disjoint users combine with :meth:`merge`."""

    def __init__(self) -> None:
        self.rows = self.users = self.positives = self.den = self.evaluated = 0
        self.num = Fraction(0)  # sum of n_u AUC_u
        self.auc_sum = Fraction(0)  # sum of AUC_u

    def add(self, st: GroupAUCStats) -> None:
        _, auc_u, n_u = per_user_auc(st)
        self.num += analysis.exact_sum(n_u.astype(np.float64) * auc_u)
        self.auc_sum += analysis.exact_sum(auc_u)
        self.den += int(n_u.sum())
        self.evaluated += int(auc_u.shape[0])
        self.rows += st.rows
        self.users += st.num_users
        self.positives += int(st.positives.sum())

    def merge(self, other: "_GaucSum") -> None:
        """Add the sums of another set of users (disjoint from this one's)."""
        for name in ("rows", "users", "positives", "den", "evaluated", "num", "auc_sum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def gauc(self) -> Optional[float]:
        return float(self.num / self.den) if self.den else None  # the exact ratio, rounded once

    @property
    def mean_user_auc(self) -> Optional[float]:
        return float(self.auc_sum / self.evaluated) if self.evaluated else None


class _ScoreSums:
    """Log-loss and calibration sums of rows (see the module docstring), exact, so any split of the rows merges
    (:meth:`merge`) into the same totals.

    Args:
        bins: equal-width calibration bins over [0, 1].
    """

    def __init__(self, bins: int) -> None:
        self.bins = int(bins)
        self.rows = 0
        self.logloss = Fraction(0)  # sum of the clipped cross-entropy terms
        self.bin_rows = [0] * self.bins
        self.bin_pos = [0] * self.bins
        self.bin_score = [Fraction(0)] * self.bins  # exact sums of the scores
        self.probabilities = True  # every score in [0, 1]; else log loss and calibration are undefined (None)

    def add(self, label: np.ndarray, score: np.ndarray) -> None:
        """(N,) 0/1 labels and (N,) float32 scores."""
        if label.shape[0] == 0:
            return
        self.rows += int(label.shape[0])
        if not self.probabilities or score.min() < 0 or score.max() > 1:
            self.probabilities = False  # e.g. raw logits: AUC / GAUC still apply, these do not
            return
        s = score.astype(np.float64)
        pos = label == 1
        own = np.where(pos, s, 1.0 - s)  # (N,) the probability given to the row's own label (1 - s is exact)
        terms = -np.log(np.clip(own, LOGLOSS_CLIP, 1.0 - LOGLOSS_CLIP))  # (N,) each > 0
        self.logloss += analysis.exact_sum(terms)
        b = np.minimum((s * self.bins).astype(np.int64), self.bins - 1)  # (N,) bin
        counts = np.bincount(b, minlength=self.bins)
        clicks = np.bincount(b[pos], minlength=self.bins)
        sums = analysis.exact_sums_by(s, b, self.bins)
        for k in np.flatnonzero(counts):
            self.bin_rows[k] += int(counts[k])
            self.bin_pos[k] += int(clicks[k])
            self.bin_score[k] += sums[k]

    def merge(self, other: "_ScoreSums") -> None:
        """Add the sums of other rows."""
        self.rows += other.rows
        self.probabilities = self.probabilities and other.probabilities
        self.logloss += other.logloss
        for k in range(self.bins):
            self.bin_rows[k] += other.bin_rows[k]
            self.bin_pos[k] += other.bin_pos[k]
            self.bin_score[k] += other.bin_score[k]

    def result(self) -> Tuple[Optional[float], Optional[Dict[str, Any]]]:
        """``(logloss, calibration)`` as metrics.json holds them; ``(None, None)`` without rows or when some
        score lies outside [0, 1] (not a probability)."""
        n = self.rows
        if n == 0 or not self.probabilities:
            return None, None
        per_bin = []
        for k in range(self.bins):
            m = self.bin_rows[k]
            per_bin.append({"lo": k / self.bins, "hi": (k + 1) / self.bins, "rows": m,
                            "mean_score": float(self.bin_score[k] / m) if m else None,
                            "click_rate": self.bin_pos[k] / m if m else None})
        ece = sum((abs(s - p) for s, p in zip(self.bin_score, self.bin_pos)), Fraction(0)) / n
        calibration = {"binning": "equal_width", "bins": self.bins, "ece": float(ece),
                       "mean_score": float(sum(self.bin_score, Fraction(0)) / n),
                       "click_rate": sum(self.bin_pos) / n, "per_bin": per_bin}
        return float(self.logloss / n), calibration


def _packed(score: np.ndarray, label: np.ndarray, group: Optional[np.ndarray]) -> np.ndarray:
    """(N,) float32 scores, 0/1 labels, activity groups -> (N,) int64 keys that sort like the scores."""
    pk = _sortable32(score) << _SCORE_SHIFT
    pk |= label.astype(np.int64) << _LABEL_SHIFT
    if group is not None:
        pk |= group.astype(np.int64)
    return pk


def _user_statistics(rows: _Rows, groups: Sequence[_GaucSum], ceiling: Optional[_GaucSum]) -> GroupAUCStats:
    """Per-user statistics of one entity's rows that hold every row of their users; adds the rows' GAUC sums to
    their activity groups' (``groups``: one per group, empty without groups) and to the ``true_prob``
    ceiling's (None: no ``true_prob``)."""
    st = group_auc_stats(rows.user_id, rows.label, rows.score)
    if ceiling is not None:
        ceiling.add(group_auc_stats(rows.user_id, rows.label, rows.true_prob))
    for g, acc in enumerate(groups):
        sel = np.flatnonzero(rows.group == g)
        if sel.shape[0]:
            acc.add(group_auc_stats(rows.user_id[sel], rows.label[sel], rows.score[sel]))
    return st


def _entity_statistics(rows: int, users: _GaucSum, auc_num2: int, bounds: np.ndarray, groups: Sequence[_GaucSum],
                       group_num2: Sequence[int], ceiling: Optional[Tuple[int, _GaucSum]], scores: _ScoreSums,
                       user_stats: Optional[analysis.UserStats] = None) -> EntityStatistics:
    """:class:`EntityStatistics` of one entity from its exact sums.

    Args:
        rows: the entity's rows.
        users: sums over all its users.
        auc_num2: twice the Mann-Whitney numerator of all its rows.
        bounds: activity bounds.
        groups: sums over each activity group's rows (empty without groups).
        group_num2: twice the Mann-Whitney numerator of each activity group's rows.
        ceiling: twice the numerator of all rows by ``true_prob`` and their sums, or None.
        scores: log-loss and calibration sums of all its rows.
        user_stats: the bootstrap's input, or None.
    """
    pos = users.positives
    group_stats = [GroupStatistics(name, lo, hi, s.rows, s.users, _auc(num2, s.positives, s.rows - s.positives),
                                   s.gauc, s.evaluated)
                   for (name, lo, hi), s, num2 in zip(_group_ranges(bounds), groups, group_num2)]
    logloss, calibration = scores.result()
    ceiling_metrics = None
    if ceiling is not None:
        ceiling_metrics = {"auc": _auc(ceiling[0], pos, rows - pos), "gauc": ceiling[1].gauc}
    return EntityStatistics(
        rows=rows, users=users.users, positives=pos, auc=_auc(auc_num2, pos, rows - pos), gauc=users.gauc,
        mean_user_auc=users.mean_user_auc, users_evaluated=users.evaluated,
        users_skipped_single_class=users.users - users.evaluated, groups=group_stats, ceiling=ceiling_metrics,
        user_stats=user_stats, logloss=logloss, calibration=calibration,
    )


class _EntityAccumulator:
    """Everything one entity needs, fed partition by partition (each holding all rows of its users)."""

    def __init__(self, rows: int, n_groups: int, true_prob: bool, eval_cfg: EvalConfig, limits: SpillLimits,
                 directory: Optional[str], total_rows: int) -> None:
        self.rows, self.n_groups = rows, n_groups
        self.samples = int(eval_cfg.bootstrap_samples)
        self.exact = analysis.exact_auc_feasible(rows, self.samples)
        index_dtype = np.int32 if total_rows < 2**31 else np.int64
        n_buckets = max(int(eval_cfg.partitions), -(-rows // limits.bucket_rows))

        def store(kind: str, slots: int) -> _ScoreStore:
            sub = None if directory is None else os.path.join(directory, kind)
            return _ScoreStore(sub, n_buckets, limits.bucket_rows, slots, index_dtype)

        self.scores = store("score", max(n_groups, 1))
        self.ceiling = store("ceiling", 1) if true_prob else None
        self.ceiling_sum = _GaucSum() if true_prob else None
        self.group_sums = [_GaucSum() for _ in range(n_groups)]
        self.score_sums = _ScoreSums(eval_cfg.calibration_bins)
        self.parts: List[GroupAUCStats] = []
        self.users_seen = 0

    def add(self, rows: _Rows) -> None:
        """Rows of this entity from one user partition."""
        st = _user_statistics(rows, self.group_sums, self.ceiling_sum)
        self.score_sums.add(rows.label, rows.score)
        self.parts.append(st)
        index = None
        if self.samples > 0:  # users in partition-major order; finish() maps them to merged (sorted-id) order
            index = (self.users_seen + np.searchsorted(st.user_ids, rows.user_id)).astype(self.scores.index_dtype)
        self.users_seen += st.num_users
        self.scores.add(_packed(rows.score, rows.label, rows.group), index)
        if self.ceiling is not None:
            self.ceiling.add(_packed(rows.true_prob, rows.label, None), None)

    def finish(self, bounds: np.ndarray) -> EntityStatistics:
        ids_partition_major = np.concatenate([p.user_ids for p in self.parts])
        merged = GroupAUCStats.merge(self.parts)
        self.parts = []
        users = merged.num_users
        rank = None
        if self.samples > 0:  # the same stable argsort as GroupAUCStats.merge: partition-major -> merged index
            rank = np.empty(users, dtype=np.int64)
            rank[np.argsort(ids_partition_major, kind="stable")] = np.arange(users)
        del ids_partition_major
        pos = int(merged.positives.sum())
        scan = _OrderedAUC(self.n_groups, pos, users, rank, placement=self.samples > 0 and not self.exact,
                           keep_rows=self.samples > 0 and self.exact)
        self.scores.feed(scan)
        total = _GaucSum()
        total.add(merged)
        ceiling = None
        if self.ceiling is not None:
            cscan = _OrderedAUC(0, pos, 0, None, placement=False, keep_rows=False)
            self.ceiling.feed(cscan)
            ceiling = (cscan.num2, self.ceiling_sum)
        user_stats = analysis.UserStats(merged.user_ids, merged.impressions, merged.positives, merged.numerator,
                                        scan.num2, placement=scan.placement, order=scan.order())
        return _entity_statistics(self.rows, total, scan.num2, bounds, self.group_sums, scan.group_num2, ceiling,
                                  self.score_sums, user_stats)


def _auc(num2: int, pos: int, neg: int) -> Optional[float]:
    """Twice the Mann-Whitney numerator -> AUC (one correctly rounded division), None for a single class."""
    return num2 / (2 * pos * neg) if pos > 0 and neg > 0 else None


def _group_ranges(bounds: np.ndarray) -> List[Tuple[str, int, Optional[int]]]:
    """``[10, 30]`` -> ``[("0-10", 0, 10), ("10-30", 10, 30), (">30", 30, None)]``."""
    edges = [0] + [int(b) for b in bounds]
    out: List[Tuple[str, int, Optional[int]]] = [(f"{a}-{b}", a, b) for a, b in zip(edges[:-1], edges[1:])]
    out.append((f">{edges[-1]}", edges[-1], None))
    return out


# --------------------------------------------------------------------------------------------------------
# Step 3: score buckets and the ordered AUC pass
# --------------------------------------------------------------------------------------------------------


def _label_group_counts(pk: np.ndarray, slots: int) -> np.ndarray:
    """(slots, 2) int64 row counts of packed keys by (activity group, label)."""
    code = (pk & (_MAX_GROUPS - 1)) * 2 + ((pk >> _LABEL_SHIFT) & 1)
    return np.bincount(code, minlength=2 * slots).reshape(slots, 2)


class _Bucket:
    """Rows of one score range: packed keys (+ user indices), in memory or appended to raw binary files."""

    def __init__(self, slots: int, path: Optional[str], index_dtype: Any) -> None:
        self.path, self.index_dtype = path, index_dtype
        self.n, self.lo, self.hi = 0, np.iinfo(np.int64).max, -1  # rows, min and max score key
        self.counts = np.zeros((slots, 2), dtype=np.int64)  # [group, label] row counts
        self.with_index = False
        self._mem: List[Tuple[np.ndarray, Optional[np.ndarray]]] = []

    def append(self, pk: np.ndarray, index: Optional[np.ndarray]) -> None:
        sk = pk >> _SCORE_SHIFT
        self.lo, self.hi = min(self.lo, int(sk.min())), max(self.hi, int(sk.max()))
        self.counts += _label_group_counts(pk, self.counts.shape[0])
        self.n += pk.shape[0]
        self.with_index = index is not None
        if self.path is None:
            self._mem.append((pk, index))
            return
        with open(self.path + ".key", "ab") as f:
            pk.tofile(f)
        if index is not None:
            with open(self.path + ".idx", "ab") as f:
                index.astype(self.index_dtype, copy=False).tofile(f)

    def chunks(self, rows: int) -> Iterator[Tuple[np.ndarray, Optional[np.ndarray]]]:
        """Stream ``(keys, indices)`` in chunks of ``rows`` (in memory: one chunk)."""
        if self.path is None:
            yield self.load()
            return
        with open(self.path + ".key", "rb") as fk, \
                (open(self.path + ".idx", "rb") if self.with_index else contextlib.nullcontext()) as fi:
            while True:
                pk = np.fromfile(fk, dtype=np.int64, count=rows)
                if pk.shape[0] == 0:
                    return
                yield pk, (np.fromfile(fi, dtype=self.index_dtype, count=pk.shape[0]) if fi else None)

    def load(self) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        if self.path is not None:
            pk = np.fromfile(self.path + ".key", dtype=np.int64)
            return pk, (np.fromfile(self.path + ".idx", dtype=self.index_dtype) if self.with_index else None)
        pk = np.concatenate([m[0] for m in self._mem])
        return pk, (np.concatenate([m[1] for m in self._mem]) if self.with_index else None)

    def remove(self) -> None:
        self._mem = []
        if self.path is not None:
            for ext in (".key", ".idx"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path + ext)


class _ScoreStore:
    """Rows of one entity cut into score ranges, so that they can be visited in score order piece by piece.

    In memory (``directory`` None) there is one bucket. On disk, the ranges come from quantiles of the first
    rows added (the first user partition: a random sample of users), each quantile value getting a range of its
    own; at read time a bucket over ``2 * bucket_rows`` is split again by score, and a bucket holding a single
    score is streamed instead of sorted.
    """

    def __init__(self, directory: Optional[str], n_buckets: int, bucket_rows: int, slots: int,
                 index_dtype: Any) -> None:
        self.directory, self.n_buckets, self.bucket_rows = directory, n_buckets, bucket_rows
        self.slots, self.index_dtype = slots, index_dtype
        self.buckets: List[_Bucket] = []
        self.cuts: Optional[np.ndarray] = None
        if directory is None:
            self.buckets = [_Bucket(slots, None, index_dtype)]
        else:
            os.makedirs(directory, exist_ok=True)

    def add(self, pk: np.ndarray, index: Optional[np.ndarray]) -> None:
        if pk.shape[0] == 0:
            return
        if self.directory is None:
            self.buckets[0].append(pk, index)
            return
        if self.cuts is None:
            self.cuts = _cut_points(pk >> _SCORE_SHIFT, self.n_buckets)
            self.buckets = [self._new(f"b{i:05d}") for i in range(self.cuts.shape[0] + 1)]
        _distribute(pk, index, self.cuts, self.buckets)

    def _new(self, name: str) -> _Bucket:
        return _Bucket(self.slots, os.path.join(self.directory, name), self.index_dtype)

    def feed(self, scan: "_OrderedAUC") -> None:
        """Give every row to ``scan`` in increasing score order, deleting buckets as they are consumed."""
        for b in self.buckets:
            self._feed(b, scan)
        self.buckets = []

    def _feed(self, b: _Bucket, scan: "_OrderedAUC") -> None:
        if b.n == 0:
            pass
        elif b.lo == b.hi:
            scan.tie_block(b, self.bucket_rows)
        elif self.directory is None or b.n <= 2 * self.bucket_rows:
            pk, index = b.load()
            if index is None:
                pk.sort()  # a value sort is several times faster than argsort + gather
                scan.sorted_block(pk, None)
            else:
                order = np.argsort(pk)
                scan.sorted_block(pk[order], index[order])
        else:
            subs = self._split(b)
            b.remove()
            for s in subs:
                self._feed(s, scan)
        b.remove()  # consumed

    def _split(self, b: _Bucket) -> List[_Bucket]:
        chunks = b.chunks(self.bucket_rows)
        first = next(chunks)
        cuts = _cut_points(first[0] >> _SCORE_SHIFT, max(2, -(-b.n // self.bucket_rows)))
        subs = [self._new(f"{os.path.basename(b.path)}.{i}") for i in range(cuts.shape[0] + 1)]
        for pk, index in itertools.chain([first], chunks):
            _distribute(pk, index, cuts, subs)
        return subs


def _cut_points(sk: np.ndarray, m: int) -> np.ndarray:
    """Score keys at the ``1/m .. (m-1)/m`` quantiles of (a sample of) ``sk``, each followed by its successor,
    so that every quantile value gets a range of its own (a heavy tie such as a saturated 1.0 becomes one
    single-score bucket). Splitting by these cuts always leaves each non-single-score range smaller."""
    if m < 2:
        return np.zeros(0, dtype=np.int64)
    return _sorted_cut_points(np.sort(sk[:: max(1, sk.shape[0] // 1_000_000)]), m)


def _sorted_cut_points(s: np.ndarray, m: int) -> np.ndarray:
    """:func:`_cut_points` of sorted score keys ``s``, all of them taken (no subsample)."""
    if m < 2 or s.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    q = s[(np.arange(1, m) * s.shape[0]) // m]
    return np.unique(np.concatenate([q, q + 1]))


def _distribute(pk: np.ndarray, index: Optional[np.ndarray], cuts: np.ndarray, buckets: List[_Bucket]) -> None:
    """Append each row to the bucket of its score range (``cuts[i-1] <= score key < cuts[i]``)."""
    b = np.searchsorted(cuts, pk >> _SCORE_SHIFT, side="right")
    b = b.astype(np.int16) if len(buckets) < 2**15 else b
    order = np.argsort(b, kind="stable")
    edges = np.searchsorted(b[order], np.arange(len(buckets) + 1))
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        if hi > lo:
            sel = order[lo:hi]
            buckets[i].append(pk[sel], None if index is None else index[sel])


def _runs(sk: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted (N,) score keys and 0/1 labels -> run starts, positives and negatives per run of equal scores."""
    n = sk.shape[0]
    flags = np.empty(n, dtype=np.bool_)
    flags[0] = True
    np.not_equal(sk[1:], sk[:-1], out=flags[1:])
    starts = np.flatnonzero(flags)
    run_pos = np.add.reduceat(y, starts)
    return starts, run_pos, np.diff(starts, append=n) - run_pos


class _OrderedAUC:
    """Exact AUC (and per-group AUCs, per-user bootstrap inputs) of rows fed in increasing score order.

    Every block holds whole runs of equal scores. The carried counts of positives and negatives seen so far
    make the Mann-Whitney numerator ``sum_pos (#neg below + 0.5 #neg tied)`` exact in integers (kept doubled).

    Args:
        n_groups: activity groups (0: none).
        pos_total: positives of the entity (for the placement of negatives: positives above them).
        num_users: U.
        rank: (U,) partition-major user index -> merged index (needed with ``placement`` / ``keep_rows``).
        placement: accumulate per-user placement sums (linearised AUC bootstrap).
        keep_rows: keep (user, label) of every row in score order (exact AUC bootstrap).
    """

    def __init__(self, n_groups: int, pos_total: int, num_users: int, rank: Optional[np.ndarray],
                 placement: bool, keep_rows: bool) -> None:
        self.num2 = self.pos_seen = self.neg_seen = 0
        self.group_num2 = [0] * n_groups
        self.group_pos = [0] * n_groups
        self.group_neg = [0] * n_groups
        self.pos_total, self.num_users, self.rank = pos_total, num_users, rank
        self.placement = np.zeros(num_users) if placement else None
        self._rows: Optional[List[Tuple[np.ndarray, np.ndarray]]] = [] if keep_rows else None
        self._starts: List[np.ndarray] = []
        self._offset = 0

    def sorted_block(self, pk: np.ndarray, index: Optional[np.ndarray]) -> None:
        """(n,) sorted packed keys and their users' partition-major indices."""
        sk = pk >> _SCORE_SHIFT
        y = (pk >> _LABEL_SHIFT) & 1
        starts, run_pos, run_neg = _runs(sk, y)
        neg_below = self.neg_seen + np.cumsum(run_neg) - run_neg  # negatives with a strictly lower score
        self.num2 += int(run_pos @ (2 * neg_below + run_neg))
        if self.placement is not None or self._rows is not None:
            user = self.rank[index]
            if self.placement is not None:
                pos_above = self.pos_total - self.pos_seen - np.cumsum(run_pos)  # strictly higher score
                run = np.repeat(np.arange(starts.shape[0]), run_pos + run_neg)  # (n,) run of each row
                value = np.where(y == 1, (neg_below + 0.5 * run_neg)[run], (pos_above + 0.5 * run_pos)[run])
                self.placement += np.bincount(user, weights=value, minlength=self.num_users)
            if self._rows is not None:
                self._rows.append((user, y == 1))
                self._starts.append(starts + self._offset)
        group = pk & (_MAX_GROUPS - 1)
        for g in range(len(self.group_num2)):
            sel = np.flatnonzero(group == g)
            if sel.shape[0]:
                _, gp, gn = _runs(sk[sel], y[sel])
                below = self.group_neg[g] + np.cumsum(gn) - gn
                self.group_num2[g] += int(gp @ (2 * below + gn))
                self.group_pos[g] += int(gp.sum())
                self.group_neg[g] += int(gn.sum())
        self.pos_seen += int(run_pos.sum())
        self.neg_seen += int(run_neg.sum())
        self._offset += pk.shape[0]

    def tie_block(self, b: _Bucket, chunk_rows: int) -> None:
        """A bucket whose rows all have one score: counts suffice for the numerators; users are streamed."""
        pos, neg = int(b.counts[:, 1].sum()), int(b.counts[:, 0].sum())
        if self.placement is not None or self._rows is not None:
            value_pos = self.neg_seen + 0.5 * neg
            value_neg = (self.pos_total - self.pos_seen - pos) + 0.5 * pos
            for pk, index in b.chunks(chunk_rows):
                y = ((pk >> _LABEL_SHIFT) & 1) == 1
                user = self.rank[index]
                if self.placement is not None:
                    self.placement += np.bincount(user, weights=np.where(y, value_pos, value_neg),
                                                  minlength=self.num_users)
                if self._rows is not None:
                    self._rows.append((user, y))
            self._starts.append(np.array([self._offset]))
        self.tie_counts(b.counts)
        self._offset += b.n

    def tie_counts(self, counts: np.ndarray) -> None:
        """Rows that all have one score, given only their ``(group, label)`` counts ((slots, 2) int)."""
        pos, neg = int(counts[:, 1].sum()), int(counts[:, 0].sum())
        self.num2, self.pos_seen, self.neg_seen = _mw_concat((self.num2, self.pos_seen, self.neg_seen),
                                                             (pos * neg, pos, neg))
        for g in range(len(self.group_num2)):
            gp, gn = int(counts[g, 1]), int(counts[g, 0])
            self.group_num2[g], self.group_pos[g], self.group_neg[g] = _mw_concat(
                (self.group_num2[g], self.group_pos[g], self.group_neg[g]), (gp * gn, gp, gn))

    def order(self) -> Optional[analysis.ScoreOrder]:
        """The kept rows in score order (``keep_rows``), else None."""
        if self._rows is None:
            return None
        if not self._rows:
            z = np.zeros(0, dtype=np.int64)
            return analysis.ScoreOrder(z, np.zeros(0, dtype=bool), z)
        return analysis.ScoreOrder(np.concatenate([r[0] for r in self._rows]),
                                   np.concatenate([r[1] for r in self._rows]), np.concatenate(self._starts))


# --------------------------------------------------------------------------------------------------------
# Step 4: the report
# --------------------------------------------------------------------------------------------------------


def _report(st: EntityStatistics, eval_cfg: EvalConfig) -> Dict[str, Any]:
    cis = analysis.bootstrap_cis(st.user_stats, int(eval_cfg.bootstrap_samples), float(eval_cfg.confidence),
                                 int(eval_cfg.seed))
    return entity_report(st, cis)


def entity_report(st: EntityStatistics, cis: Dict[str, Any]) -> Dict[str, Any]:
    """One entity's JSON-able entry of :func:`compute_metrics` from its statistics and bootstrap intervals.

    Args:
        st: the entity's point metrics.
        cis: ``{"auc_ci", "gauc_ci"}`` (:func:`~mkt_torchrec.evaluation.analysis.bootstrap_cis`).
    """
    return {
        "rows": st.rows, "users": st.users, "positives": st.positives,
        "auc": st.auc, "gauc": st.gauc, "mean_user_auc": st.mean_user_auc,
        "users_evaluated": st.users_evaluated, "users_skipped_single_class": st.users_skipped_single_class,
        "auc_ci": cis["auc_ci"], "gauc_ci": cis["gauc_ci"],
        "logloss": st.logloss, "calibration": st.calibration,
        "groups": [{"name": g.name, "lo": g.lo, "hi": g.hi, "rows": g.rows, "users": g.users,
                    "users_evaluated": g.users_evaluated, "auc": g.auc, "gauc": g.gauc} for g in st.groups],
        "ceiling": st.ceiling,
    }
