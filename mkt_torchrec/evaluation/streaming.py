"""Metrics of a predictions directory (``RUN/predictions/part-*.parquet``), per entity, in bounded memory, in one
process: the user partitions and score buckets of :func:`compute_metrics`, spilled to disk beyond a threshold.

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
its GAUC rests on). Intervals are described in :mod:`~mkt_torchrec.evaluation.bootstrap`; log loss and
calibration in :mod:`~mkt_torchrec.evaluation.entity_sums`. Every metric is exact: float terms are summed exactly
(:func:`~mkt_torchrec.evaluation.exact.exact_sum`) and each result rounded once, so it is bit-identical over any
split of the rows (partitions, ranks).

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
   (:func:`~mkt_torchrec.evaluation.exact.exact_sum`) and rounded once at the end, so the metrics do not
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
   bootstrap is affordable, :func:`~mkt_torchrec.evaluation.bootstrap.exact_auc_feasible`); resamples are
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
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow.parquet as pq

from mkt_torchrec.config import EvalConfig
from mkt_torchrec.evaluation import bootstrap
from mkt_torchrec.evaluation.entity_sums import (
    EntityStatistics,
    GaucSum,
    ScoreSums,
    bootstrap_entry,
    build_entity_statistics,
    entity_report,
    user_statistics,
)
from mkt_torchrec.evaluation.metrics import GroupAUCStats, partition_by_user
from mkt_torchrec.evaluation.predictions import ENTITIES, Layout, Rows, iter_batches, read_layout
from mkt_torchrec.evaluation.score_buckets import MAX_GROUPS, OrderedAUC, ScoreStore, packed_keys

__all__ = ["SpillLimits", "compute_metrics", "entity_statistics"]


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
    out["bootstrap"] = bootstrap_entry(eval_cfg)
    return out


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
    layout = read_layout(pred_dir)
    wanted = ENTITIES if entities is None else tuple(entities)
    bounds = np.asarray(eval_cfg.activity_bounds, dtype=np.int64)
    n_groups = bounds.shape[0] + 1 if layout.activity else 0
    if n_groups > MAX_GROUPS:
        raise ValueError(f"eval.activity_bounds: at most {MAX_GROUPS - 1} bounds are supported")
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


# --------------------------------------------------------------------------------------------------------
# Step 1: partition rows by user (on disk, or in memory for small inputs)
# --------------------------------------------------------------------------------------------------------


def _partition_by_user(layout: Layout, k: int, bounds: np.ndarray, limits: SpillLimits,
                       tmp: Optional[str]) -> Tuple[np.ndarray, Iterator[Rows]]:
    """-> ((2,) rows per entity, iterator over the ``k`` partitions' rows); spills to ``tmp`` if given."""
    counts = np.zeros(len(ENTITIES), dtype=np.int64)
    if tmp is None:
        batches = list(iter_batches(layout, limits.batch_rows, bounds))
        rows = Rows.concat(batches)
        del batches
        counts += np.bincount(rows.entity, minlength=len(ENTITIES))
        return counts, (rows.take(sel) for sel in _split_by_partition(rows.user_id, k))
    paths = [os.path.join(tmp, f"users-{i:05d}.parquet") for i in range(k)]
    writers: Dict[int, pq.ParquetWriter] = {}
    try:
        for rows in iter_batches(layout, limits.batch_rows, bounds):
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

    def read_back() -> Iterator[Rows]:
        for i, path in enumerate(paths):
            if i in writers:
                t = pq.read_table(path)
                os.remove(path)
                yield Rows.from_table(t)

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


class _EntityAccumulator:
    """Everything one entity needs, fed partition by partition (each holding all rows of its users)."""

    def __init__(self, rows: int, n_groups: int, true_prob: bool, eval_cfg: EvalConfig, limits: SpillLimits,
                 directory: Optional[str], total_rows: int) -> None:
        self.rows, self.n_groups = rows, n_groups
        self.samples = int(eval_cfg.bootstrap_samples)
        self.exact = bootstrap.exact_auc_feasible(rows, self.samples)
        index_dtype = np.int32 if total_rows < 2**31 else np.int64
        n_buckets = max(int(eval_cfg.partitions), -(-rows // limits.bucket_rows))

        def store(kind: str, slots: int) -> ScoreStore:
            sub = None if directory is None else os.path.join(directory, kind)
            return ScoreStore(sub, n_buckets, limits.bucket_rows, slots, index_dtype)

        self.scores = store("score", max(n_groups, 1))
        self.ceiling = store("ceiling", 1) if true_prob else None
        self.ceiling_sum = GaucSum() if true_prob else None
        self.group_sums = [GaucSum() for _ in range(n_groups)]
        self.score_sums = ScoreSums(eval_cfg.calibration_bins)
        self.parts: List[GroupAUCStats] = []
        self.users_seen = 0

    def add(self, rows: Rows) -> None:
        """Rows of this entity from one user partition."""
        st = user_statistics(rows, self.group_sums, self.ceiling_sum)
        self.score_sums.add(rows.label, rows.score)
        self.parts.append(st)
        index = None
        if self.samples > 0:  # users in partition-major order; finish() maps them to merged (sorted-id) order
            index = (self.users_seen + np.searchsorted(st.user_ids, rows.user_id)).astype(self.scores.index_dtype)
        self.users_seen += st.num_users
        self.scores.add(packed_keys(rows.score, rows.label, rows.group), index)
        if self.ceiling is not None:
            self.ceiling.add(packed_keys(rows.true_prob, rows.label, None), None)

    def finish(self, bounds: np.ndarray) -> EntityStatistics:
        """The entity's statistics once every partition was added (its score buckets are consumed)."""
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
        scan = OrderedAUC(self.n_groups, pos, users, rank, placement=self.samples > 0 and not self.exact,
                          keep_rows=self.samples > 0 and self.exact)
        self.scores.feed(scan)
        total = GaucSum()
        total.add(merged)
        ceiling = None
        if self.ceiling is not None:
            cscan = OrderedAUC(0, pos, 0, None, placement=False, keep_rows=False)
            self.ceiling.feed(cscan)
            ceiling = (cscan.num2, self.ceiling_sum)
        user_stats = bootstrap.UserStats(merged.user_ids, merged.impressions, merged.positives, merged.numerator,
                                         scan.num2, placement=scan.placement, order=scan.order())
        return build_entity_statistics(self.rows, total, scan.num2, bounds, self.group_sums, scan.group_num2,
                                       ceiling, self.score_sums, user_stats)


def _report(st: EntityStatistics, eval_cfg: EvalConfig) -> Dict[str, Any]:
    """One entity's entry of :func:`compute_metrics`: its statistics and bootstrap intervals."""
    cis = bootstrap.bootstrap_cis(st.user_stats, int(eval_cfg.bootstrap_samples), float(eval_cfg.confidence),
                                  int(eval_cfg.seed))
    return entity_report(st, cis)
