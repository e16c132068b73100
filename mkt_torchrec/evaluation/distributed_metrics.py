"""Metrics of a predictions directory computed by every rank of a process group together, exactly.

:func:`compute_metrics_distributed` returns the dict of
:func:`~mkt_torchrec.evaluation.report_metrics.compute_metrics` - bit for bit, bootstrap intervals included,
whatever the number of ranks - with each of the ``W`` ranks doing about ``1/W`` of the work and no rank
holding anything that grows with the rows or users of other ranks. It is called by every rank of the default
process group once all ranks' ``part-*.parquet`` files are written and closed.

Algorithm
---------
0. **Plan.** Rank 0 reads the part files' footers (checking the columns as ``compute_metrics`` does) and
   broadcasts the row groups; rank ``r`` reads and validates a contiguous ``1/W`` of the rows, by row groups
   (``mkt evaluate`` writes one file per rank: its own file). Errors name the file, column and row.
1. **Cut.** Every rank all-gathers an evenly strided sample of its score keys (``2**20`` keys in all) and so
   computes the same cut points: about ``W k`` score ranges (``k = ceil(rows / (W limits.bucket_rows))``,
   each quantile value a range of its own, like ``compute_metrics``' score buckets), given to ranks in
   consecutive runs by the sample's cumulative count - rank ``r``'s ranges all lie below rank ``r + 1``'s.
   ``true_prob`` gets ranges of its own. Users go to ``W k'`` hash buckets
   (:func:`~mkt_torchrec.evaluation.metrics.partition_by_user`, ``k' = ceil(rows / (W
   limits.partition_rows))``), bucket ``b`` to rank ``b mod W``.
2. **Exchange through files.** Each rank writes, under ``<spill_dir>/.mkt-eval-<token>/rank-<r>/``, raw
   binary files, column after column with rows grouped by destination: ``users`` (every column, by user
   bucket), ``scores`` (packed ``(score, label, group)`` keys, entity, user id, by score range) and
   ``ceiling`` (packed ``true_prob`` keys, by range). The row counts per destination travel with the next
   all-gather, which is also the barrier; rank ``r`` then reads only its destinations' slices (seek + read)
   from every rank's files.
3. **Per-user side** (bucket by bucket): per entity, the exact per-user statistics
   (:class:`~mkt_torchrec.evaluation.metrics.GroupAUCStats`) of the rank's users, reduced to exact GAUC and
   mean-user-AUC sums (Fractions) and counts, the same per activity group and for ``true_prob``, and the exact
   log-loss and calibration-bin sums of the bucket's rows.
   **Score side** (the rank's ranges in increasing score order): per entity, sorted keys give the
   Mann-Whitney numerator counting negatives from the start of the rank's first range, plus positive and
   negative counts, overall and per activity group (a range holding one score is streamed and only
   counted). Then one all-gather: with ``n_s`` the negatives of ranks before ``s``, the global numerator is
   ``sum_s (num2_s + 2 pos_s n_s)``, in integers.
4. **Bootstrap.** Resample counts are hashed from ``(seed, resample, user id)``
   (:func:`~mkt_torchrec.evaluation.analysis.poisson_weights`), so every rank draws its own users' counts:
   it computes the exact per-resample GAUC sums of its users and, in the exact AUC mode, the weighted
   Mann-Whitney pieces of its score ranges. In the linearised mode the score side also writes each row's
   placement value (relative to its rank's ranges) to a ``placement`` file grouped by the user's rank, which
   adds the offsets known from step 3 and sums per user. One all-gather of ``O(samples)`` sums.
5. Every rank combines the gathered pieces (``O(W (samples + groups))`` ints and fractions) into the same
   dict: the result is returned on **every** rank.

Exactness: every quantity is an integer or an exact rational (float terms are added exactly,
:func:`~mkt_torchrec.evaluation.analysis.exact_sum`) rounded once at the end, and ``compute_metrics`` uses
the same sums; so the split of rows over ranks, buckets or ranges cannot change a bit.

Memory per rank: its share of the input (about 20 bytes per row, ``rows / W``; twice that while routing
it), then one user bucket (about ``limits.partition_rows`` rows) or one score range (about
``limits.bucket_rows`` rows) at a time, plus ``O(users / W)`` per-user arrays for the bootstrap. A single
score holding many rows (a saturated 1.0) is one range, streamed in ``limits.batch_rows`` pieces. Rank 0
holds nothing more than the others but the footer list (``O(row groups)``). Every rank receives the
score-key sample (8 MB, twice with ``true_prob``), the row counts per (rank, destination) and
``O(W (samples + groups))`` sums.
Temporary files take at most about 45 bytes per row (copies by user bucket, score and ``true_prob`` range),
plus 18 with the linearised bootstrap, spread over the ranks' directories.

Errors: every phase ends in an all-gather that carries any exception, and then every rank raises (the
failing rank its own exception, the others one of the same kind naming it), so no rank is left waiting in a
collective. Temporary files are written under a ``.tmp`` name and renamed when complete, and every rank
removes its own at the end, also on errors.

Example (every rank; ``info`` from :func:`~mkt_torchrec.training.distributed.init_distributed`)::

    metrics = compute_metrics_distributed(os.path.join(run_dir, "predictions"), cfg.eval, info.device)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from mkt_torchrec.collective import Collective
from mkt_torchrec.config import EvalConfig
from mkt_torchrec.evaluation import analysis
from mkt_torchrec.evaluation.analysis import _mw_concat
from mkt_torchrec.evaluation.metrics import _sortable32, partition_by_user
from mkt_torchrec.evaluation.report_metrics import (
    _LABEL_SHIFT,
    _MAX_GROUPS,
    _SCORE_SHIFT,
    ENTITIES,
    REQUIRED_COLUMNS,
    SpillLimits,
    _bootstrap_entry,
    _entity_statistics,
    _GaucSum,
    _label_group_counts,
    _Layout,
    _layout,
    _OrderedAUC,
    _packed,
    _Rows,
    _runs,
    _ScoreSums,
    _sorted_cut_points,
    _user_statistics,
    _validated,
    entity_report,
)

__all__ = ["compute_metrics_distributed"]

T = TypeVar("T")

# Score keys sampled for the cut points, over all ranks.
_SAMPLE_KEYS = 1 << 20


def compute_metrics_distributed(pred_dir: str, eval_cfg: EvalConfig, device: torch.device, *,
                                spill_dir: Optional[str] = None,
                                limits: SpillLimits = SpillLimits()) -> Dict[str, Any]:
    """:func:`~mkt_torchrec.evaluation.report_metrics.compute_metrics`, computed by all ranks together.

    Call it on every rank of the default process group (``torch.distributed`` initialised) after every rank
    has written and closed its part files, with the same arguments on every rank.

    Args:
        pred_dir: directory of ``part-*.parquet`` predictions (the columns of ``compute_metrics``), on a
            filesystem every rank reads.
        eval_cfg: activity bounds, bootstrap samples / confidence / seed.
        device: the device the process group's collectives use (``cpu`` under gloo,
            ``cuda:LOCAL_RANK`` under NCCL); object collectives run with it as the current CUDA device.
        spill_dir: a directory every rank can read and write (shared filesystem) for the temporary exchange
            files; default: the run directory, the parent of ``pred_dir``. The files go to a fresh
            ``.mkt-eval-<token>`` directory inside it, removed at the end.
        limits: ``partition_rows`` (rows per user bucket), ``bucket_rows`` (rows per score range) and
            ``batch_rows`` (rows per record batch read) bound each rank's memory
            (:class:`~mkt_torchrec.evaluation.report_metrics.SpillLimits`; ``threshold_rows`` is unused).

    Returns:
        The dict of ``compute_metrics(pred_dir, eval_cfg)``, bit-identical, on every rank.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        FileNotFoundError: no part files (on every rank).
        ValueError: on every rank, naming the file and column (and the rank that found it): a missing
            column, NaN/missing values, labels not 0/1, an unknown entity, negative activity, non-float32
            scores; or too many activity bounds.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("compute_metrics_distributed: torch.distributed is not initialised; "
                           "call report_metrics.compute_metrics in a single process instead")
    bounds = np.asarray(eval_cfg.activity_bounds, dtype=np.int64)
    comm = Collective(device)
    layout, token = comm.on_root(lambda: (_layout(pred_dir), uuid.uuid4().hex[:12]))
    if layout.activity and bounds.shape[0] + 1 > _MAX_GROUPS:  # the same on every rank
        raise ValueError(f"eval.activity_bounds: at most {_MAX_GROUPS - 1} bounds are supported")
    parent = spill_dir if spill_dir is not None else os.path.dirname(os.path.abspath(pred_dir))
    job = _Job(comm, layout, eval_cfg, bounds, limits, os.path.join(parent, f".mkt-eval-{token}"))
    try:
        return job.run()
    finally:
        job.cleanup()


# --------------------------------------------------------------------------------------------------------
# Plan: which rows each rank reads
# --------------------------------------------------------------------------------------------------------


def _my_units(layout: _Layout, rank: int, world: int) -> List[Tuple[str, int, int]]:
    """``(file, row group, row offset in the file)`` of the row groups rank ``rank`` reads: a row group goes
    to the rank whose ``1/W`` of all rows holds its first row."""
    total = layout.rows
    units: List[Tuple[str, int, int]] = []
    start = 0
    for path, sizes in zip(layout.files, layout.row_groups):
        offset = 0
        for i, n in enumerate(sizes):
            if n and min(world - 1, start * world // max(total, 1)) == rank:
                units.append((path, i, offset))
            offset += n
            start += n
    return units


# --------------------------------------------------------------------------------------------------------
# Exchange files: raw binary, chunk after chunk; inside a chunk, column after column, rows by destination
# --------------------------------------------------------------------------------------------------------

_Columns = Sequence[Tuple[str, Any]]


class _Writer:
    """Rows appended in chunks, each grouped by destination; complete only once :meth:`close` renamed it."""

    def __init__(self, path: str, columns: _Columns, n_dest: int) -> None:
        self.path, self.columns, self.n_dest = path, list(columns), n_dest
        self.chunks: List[np.ndarray] = []
        self._file = open(path + ".tmp", "wb")

    def append(self, dest: np.ndarray, arrays: Dict[str, np.ndarray]) -> None:
        if dest.shape[0] == 0:
            return
        d = dest.astype(np.int16) if self.n_dest < 2**15 else dest  # int16: numpy's stable sort is a radix sort
        order = np.argsort(d, kind="stable")
        for name, dtype in self.columns:
            np.ascontiguousarray(arrays[name][order], dtype=dtype).tofile(self._file)
        self.chunks.append(np.bincount(dest, minlength=self.n_dest).astype(np.int64))

    def close(self) -> List[np.ndarray]:
        """Finish the file; returns the row counts per destination of each chunk (what readers need)."""
        self._file.close()
        os.replace(self.path + ".tmp", self.path)
        return self.chunks

    def abandon(self) -> None:
        self._file.close()


class _Reader:
    """One destination's rows of a file written by :class:`_Writer` (given its chunks' counts)."""

    def __init__(self, path: str, columns: _Columns, chunks: Sequence[np.ndarray]) -> None:
        self.path, self.columns = path, list(columns)
        self.sizes = [np.dtype(dt).itemsize for _, dt in self.columns]
        self.starts = [np.concatenate([[0], np.cumsum(c)]) for c in chunks]
        totals = [int(c.sum()) for c in chunks]
        self.offsets = np.concatenate([[0], np.cumsum(totals)]) * sum(self.sizes)
        self.totals = totals

    def rows(self, d: int) -> int:
        return sum(int(s[d + 1] - s[d]) for s in self.starts)

    def pieces(self, d: int, max_rows: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
        """Destination ``d``'s rows, in pieces of at most ``max_rows`` (default: one piece per chunk)."""
        if self.rows(d) == 0:
            return
        with open(self.path, "rb") as f:
            for starts, total, base in zip(self.starts, self.totals, self.offsets):
                lo, hi = int(starts[d]), int(starts[d + 1])
                step = max_rows or max(1, hi - lo)
                for a in range(lo, hi, step):
                    b = min(hi, a + step)
                    out, col = {}, int(base)
                    for (name, dtype), size in zip(self.columns, self.sizes):
                        f.seek(col + a * size)
                        out[name] = np.fromfile(f, dtype=dtype, count=b - a)
                        if out[name].shape[0] != b - a:
                            raise OSError(f"{self.path}: truncated exchange file (column {name!r})")
                        col += total * size
                    yield out


def _concat(pieces: Sequence[Dict[str, np.ndarray]], columns: _Columns) -> Dict[str, np.ndarray]:
    if not pieces:
        return {name: np.zeros(0, dtype=dt) for name, dt in columns}
    return {name: np.concatenate([p[name] for p in pieces]) for name, _ in columns}


# --------------------------------------------------------------------------------------------------------
# The work of one rank
# --------------------------------------------------------------------------------------------------------


@dataclass
class _UserSide:
    """One entity's sums over this rank's users, and their per-user arrays for the bootstrap."""

    main: _GaucSum = field(default_factory=_GaucSum)
    groups: List[_GaucSum] = field(default_factory=list)
    ceiling: Optional[_GaucSum] = None
    scores: Optional[_ScoreSums] = None  # log loss and calibration
    arrays: List[Tuple[np.ndarray, ...]] = field(default_factory=list)  # (ids, impressions, positives, numerator)


@dataclass(frozen=True)
class _Piece:
    """Mann-Whitney statistics of consecutive score ranges: (twice the numerator counted from the ranges'
    start, positives, negatives), overall and per activity group."""

    num2: int
    pos: int
    neg: int
    group_num2: Tuple[int, ...] = ()
    group_pos: Tuple[int, ...] = ()
    group_neg: Tuple[int, ...] = ()

    @staticmethod
    def of(scan: _OrderedAUC) -> "_Piece":
        return _Piece(scan.num2, scan.pos_seen, scan.neg_seen, tuple(scan.group_num2), tuple(scan.group_pos),
                      tuple(scan.group_neg))


def _ordered_total(pieces: Sequence[_Piece]) -> _Piece:
    """Pieces of consecutive ranges, lowest first -> one piece (exact integers)."""
    total = (0, 0, 0)
    groups = [(0, 0, 0)] * (len(pieces[0].group_num2) if pieces else 0)
    for p in pieces:
        total = _mw_concat(total, (p.num2, p.pos, p.neg))
        groups = [_mw_concat(g, up) for g, up in zip(groups, zip(p.group_num2, p.group_pos, p.group_neg))]
    return _Piece(*total, *(tuple(g[i] for g in groups) for i in range(3)))


class _Job:
    """State of :func:`compute_metrics_distributed` on one rank."""

    def __init__(self, comm: Collective, layout: _Layout, eval_cfg: EvalConfig, bounds: np.ndarray,
                 limits: SpillLimits, root: str) -> None:
        self.comm, self.layout, self.bounds, self.limits, self.root = comm, layout, bounds, limits, root
        self.rank, self.world = comm.rank, comm.world
        self.samples, self.seed = int(eval_cfg.bootstrap_samples), int(eval_cfg.seed)
        self.eval_cfg = eval_cfg
        self.mine = os.path.join(root, f"rank-{self.rank:05d}")
        self.n_groups = bounds.shape[0] + 1 if layout.activity else 0
        self.slots = max(self.n_groups, 1)
        self.true_prob = layout.true_prob
        self.writers: List[_Writer] = []
        self.user_arrays: Dict[int, List[Tuple[np.ndarray, ...]]] = {}  # per entity: this rank's users
        self.user_cols: _Columns = [("user_id", np.int64), ("entity", np.int8), ("label", np.int8),
                                    ("score", np.float32)]
        if self.n_groups:
            self.user_cols.append(("group", np.int8))
        if self.true_prob:
            self.user_cols.append(("true_prob", np.float32))
        self.score_cols: _Columns = [("key", np.int64), ("entity", np.int8)]
        if self.samples > 0:
            self.score_cols.append(("user_id", np.int64))
        self.ceil_cols: _Columns = [("key", np.int64), ("entity", np.int8)]
        self.place_cols: _Columns = [("user_id", np.int64), ("value", np.int64), ("label", np.int8),
                                     ("entity", np.int8)]

    # ---- driver ------------------------------------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        loaded = self.comm.phase(self._load)
        counts = np.sum([c for c, _, _ in loaded], axis=0)
        out: Dict[str, Any] = {}
        present = [e for e in range(len(ENTITIES)) if counts[e] > 0]
        if present:
            self._setup(int(counts.sum()), [s for _, s, _ in loaded], [t for _, _, t in loaded])
            del loaded
            self.entity_rows = {e: int(counts[e]) for e in present}
            self.exact = {e: analysis.exact_auc_feasible(int(counts[e]), self.samples) for e in present}
            self.linear = {e: self.samples > 0 and not self.exact[e] for e in present}
            routed = self.comm.phase(self._route)
            scanned = self.comm.phase(lambda: self._scan(routed))
            self._remove_own("users", "scores", "ceiling")  # every rank has read them
            sums = None
            if self.samples > 0:
                sums = self.comm.phase(lambda: self._bootstrap_sums(scanned))
            for e in present:
                out[ENTITIES[e]] = self._entity(e, scanned, sums)
        out["bootstrap"] = _bootstrap_entry(self.eval_cfg)
        return out

    def cleanup(self) -> None:
        """Remove this rank's files, then the exchange directory if no other rank's files are left."""
        for w in self.writers:
            with contextlib.suppress(OSError):
                w.abandon()
        shutil.rmtree(self.mine, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(self.root)  # succeeds for the last rank to finish

    def _remove_own(self, *names: str) -> None:
        for name in names:  # outside a phase: must not raise on one rank only (cleanup() retries)
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.mine, name))

    # ---- phase 1: load this rank's rows, sample their scores -----------------------------------------------

    def _load(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(self.mine, exist_ok=True)
        layout = self.layout
        columns = list(REQUIRED_COLUMNS) + [c for c, has in (("activity", layout.activity),
                                                             ("true_prob", layout.true_prob)) if has]
        parts: List[_Rows] = []
        files: Dict[str, pq.ParquetFile] = {}
        for path, group, offset in _my_units(layout, self.rank, self.world):
            if path not in files:
                files[path] = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
            for rb in files[path].iter_batches(batch_size=self.limits.batch_rows, row_groups=[group],
                                               columns=columns):
                parts.append(_validated(rb, path, offset, self.bounds))
                offset += rb.num_rows
        self.rows = _Rows.concat(parts) if parts else self._empty_rows()
        del parts
        counts = np.bincount(self.rows.entity, minlength=len(ENTITIES)).astype(np.int64)
        per_rank = -(-_SAMPLE_KEYS // self.world)
        step = max(1, len(self.rows) // per_rank)
        sample = _sortable32(self.rows.score[::step])
        tp_sample = _sortable32(self.rows.true_prob[::step]) if self.true_prob else np.zeros(0, np.int64)
        return counts, sample, tp_sample

    def _empty_rows(self) -> _Rows:
        z8 = np.zeros(0, np.int8)
        return _Rows(np.zeros(0, np.int64), z8, z8.copy(), np.zeros(0, np.float32),
                     z8.copy() if self.n_groups else None, np.zeros(0, np.float32) if self.true_prob else None)

    def _setup(self, rows: int, samples: List[np.ndarray], tp_samples: List[np.ndarray]) -> None:
        """Cut points, range owners and bucket counts: the same on every rank (same gathered samples)."""
        w = self.world
        self.n_user_buckets = w * max(1, -(-rows // (w * self.limits.partition_rows)))
        ranges = w * max(1, -(-rows // (w * self.limits.bucket_rows)))
        self.cuts, self.owners = _ranges(np.concatenate(samples), ranges, w)
        if self.true_prob:
            self.tp_cuts, self.tp_owners = _ranges(np.concatenate(tp_samples), ranges, w)

    # ---- phase 2: route rows to their user bucket and score range -------------------------------------------

    def _route(self) -> Dict[str, List[np.ndarray]]:
        r = self.rows
        out = {}
        users = self._writer("users", self.user_cols, self.n_user_buckets)
        users.append(partition_by_user(r.user_id, self.n_user_buckets),
                     {"user_id": r.user_id, "entity": r.entity, "label": r.label, "score": r.score,
                      "group": r.group, "true_prob": r.true_prob})
        out["users"] = users.close()
        scores = self._writer("scores", self.score_cols, self.cuts.shape[0] + 1)
        key = _packed(r.score, r.label, r.group)
        scores.append(np.searchsorted(self.cuts, key >> _SCORE_SHIFT, side="right"),
                      {"key": key, "entity": r.entity, "user_id": r.user_id})
        out["scores"] = scores.close()
        if self.true_prob:
            ceil = self._writer("ceiling", self.ceil_cols, self.tp_cuts.shape[0] + 1)
            key = _packed(r.true_prob, r.label, None)
            ceil.append(np.searchsorted(self.tp_cuts, key >> _SCORE_SHIFT, side="right"),
                        {"key": key, "entity": r.entity})
            out["ceiling"] = ceil.close()
        self.rows = self._empty_rows()  # routed: free the memory
        return out

    def _writer(self, name: str, columns: _Columns, n_dest: int) -> _Writer:
        w = _Writer(os.path.join(self.mine, name), columns, n_dest)
        self.writers.append(w)
        return w

    def _readers(self, routed: List[Dict[str, List[np.ndarray]]], name: str, columns: _Columns) -> List[_Reader]:
        return [_Reader(os.path.join(self.root, f"rank-{s:05d}", name), columns, routed[s][name])
                for s in range(self.world)]

    # ---- phase 3: per-user sums of this rank's users, Mann-Whitney pieces of its score ranges ---------------

    def _scan(self, routed: List[Dict[str, List[np.ndarray]]]) -> Dict[str, Any]:
        present = list(self.entity_rows)
        users = {e: _UserSide(groups=[_GaucSum() for _ in range(self.n_groups)],
                              ceiling=_GaucSum() if self.true_prob else None,
                              scores=_ScoreSums(self.eval_cfg.calibration_bins)) for e in present}
        readers = self._readers(routed, "users", self.user_cols)
        for b in range(self.rank, self.n_user_buckets, self.world):
            rows = _concat([p for rd in readers for p in rd.pieces(b)], self.user_cols)
            for e in present:
                self._user_bucket(users[e], rows, e)

        place = None
        if any(self.linear.values()):
            place = self._writer("placement", self.place_cols, self.world)
        scans = {e: _OrderedAUC(self.n_groups, 0, 0, None, placement=False, keep_rows=False) for e in present}
        wscans = {e: analysis.WeightedAUCScan(self.samples, self.seed) for e in present
                  if self.samples > 0 and self.exact[e]}
        readers = self._readers(routed, "scores", self.score_cols)
        for i in np.flatnonzero(self.owners == self.rank):
            if _single_key(self.cuts, int(i)):
                self._score_tie(readers, int(i), present, scans, wscans, place)
            else:
                rows = _concat([p for rd in readers for p in rd.pieces(int(i))], self.score_cols)
                for e in present:
                    self._score_block(rows, e, scans[e], wscans.get(e), place)
        ceil_scans: Dict[int, _OrderedAUC] = {}
        if self.true_prob:
            ceil_scans = {e: _OrderedAUC(0, 0, 0, None, placement=False, keep_rows=False) for e in present}
            readers = self._readers(routed, "ceiling", self.ceil_cols)
            for i in np.flatnonzero(self.tp_owners == self.rank):
                self._ceiling_range(readers, int(i), _single_key(self.tp_cuts, int(i)), present, ceil_scans)
        out: Dict[str, Any] = {"place": place.close() if place is not None else None, "entities": {}}
        for e in present:
            u = users[e]
            self.user_arrays[e] = u.arrays  # kept here for the bootstrap; only its sums travel
            out["entities"][e] = {
                "user": (u.main, u.groups, u.ceiling, u.scores),
                "score": _Piece.of(scans[e]),
                "ceiling": _Piece.of(ceil_scans[e]) if self.true_prob else None,
                "weighted": wscans[e].pieces() if e in wscans else None,
            }
        return out

    def _user_bucket(self, side: _UserSide, rows: Dict[str, np.ndarray], e: int) -> None:
        """One user bucket's rows of entity ``e``: what ``compute_metrics`` accumulates per partition."""
        sel = np.flatnonzero(rows["entity"] == e)
        if sel.shape[0] == 0:
            return
        r = _Rows(rows["user_id"], rows["entity"], rows["label"], rows["score"], rows.get("group"),
                  rows.get("true_prob")).take(sel)
        st = _user_statistics(r, side.groups, side.ceiling)
        side.scores.add(r.label, r.score)
        side.main.add(st)
        if self.samples > 0:
            side.arrays.append((st.user_ids, st.impressions, st.positives, st.numerator))

    def _score_block(self, rows: Dict[str, np.ndarray], e: int, scan: _OrderedAUC,
                     wscan: Optional[analysis.WeightedAUCScan], place: Optional[_Writer]) -> None:
        """Rows of entity ``e`` in one score range holding several scores, above all fed before."""
        sel = np.flatnonzero(rows["entity"] == e)
        if sel.shape[0] == 0:
            return
        pk = rows["key"][sel]
        uid = None
        if self.samples > 0:
            order = np.argsort(pk)
            pk, uid = pk[order], rows["user_id"][sel][order]
        else:
            pk = np.sort(pk)  # a value sort is several times faster than argsort + gather
        y = (pk >> _LABEL_SHIFT) & 1
        if wscan is not None or self.linear[e]:
            starts, run_pos, run_neg = _runs(pk >> _SCORE_SHIFT, y)
            if wscan is not None:
                wscan.block(uid, y == 1, starts)
            if self.linear[e]:
                # Twice each row's placement value, counting only this rank's rows below / above; the user's
                # rank adds the other ranks' (negatives below this rank's ranges, positives above).
                run = np.repeat(np.arange(starts.shape[0]), run_pos + run_neg)
                neg_below = scan.neg_seen + np.cumsum(run_neg) - run_neg
                pos_through = scan.pos_seen + np.cumsum(run_pos)
                value = np.where(y == 1, (2 * neg_below + run_neg)[run], (run_pos - 2 * pos_through)[run])
                self._place(place, uid, value, y, e)
        scan.sorted_block(pk, None)

    def _score_tie(self, readers: List[_Reader], i: int, present: List[int], scans: Dict[int, _OrderedAUC],
                   wscans: Dict[int, analysis.WeightedAUCScan], place: Optional[_Writer]) -> None:
        """A score range holding one score: streamed from every rank's file, only counted (and streamed once
        more for the linearised bootstrap's placement values, which need the range's counts)."""
        counts = {e: np.zeros((self.slots, 2), dtype=np.int64) for e in present}
        weighted = {e: np.zeros((2, self.samples), dtype=np.int64) for e in wscans}
        for rd in readers:
            for p in rd.pieces(i, self.limits.batch_rows):
                for e in present:
                    sel = p["entity"] == e
                    pk = p["key"][sel]
                    counts[e] += _label_group_counts(pk, self.slots)
                    if e in weighted:
                        weighted[e] += analysis.WeightedAUCScan.tie_counts(
                            self.samples, self.seed, p["user_id"][sel], ((pk >> _LABEL_SHIFT) & 1) == 1)
        values: Dict[int, Tuple[int, int]] = {}  # (positive, negative) row value of each linearised entity
        for e in present:
            if self.linear[e]:
                pos, neg = int(counts[e][:, 1].sum()), int(counts[e][:, 0].sum())
                values[e] = (2 * scans[e].neg_seen + neg, pos - 2 * (scans[e].pos_seen + pos))
        if values:  # second pass, for all entities at once: every positive / negative row gets one value
            for rd in readers:
                for p in rd.pieces(i, self.limits.batch_rows):
                    for e, (v_pos, v_neg) in values.items():
                        sel = np.flatnonzero(p["entity"] == e)
                        y = (p["key"][sel] >> _LABEL_SHIFT) & 1
                        self._place(place, p["user_id"][sel], np.where(y == 1, v_pos, v_neg), y, e)
        for e in present:
            scans[e].tie_counts(counts[e])
            if e in wscans:
                wscans[e].tie(weighted[e])

    def _place(self, place: Optional[_Writer], uid: np.ndarray, value: np.ndarray, y: np.ndarray, e: int) -> None:
        owner = partition_by_user(uid, self.n_user_buckets) % self.world
        place.append(owner, {"user_id": uid, "value": value, "label": y,
                             "entity": np.full(uid.shape[0], e, dtype=np.int8)})

    def _ceiling_range(self, readers: List[_Reader], i: int, single: bool, present: List[int],
                       scans: Dict[int, _OrderedAUC]) -> None:
        if single:
            counts = {e: np.zeros((1, 2), dtype=np.int64) for e in present}
            for rd in readers:
                for p in rd.pieces(i, self.limits.batch_rows):
                    for e in present:
                        counts[e] += _label_group_counts(p["key"][p["entity"] == e], 1)  # group bits are 0
            for e in present:
                scans[e].tie_counts(counts[e])
            return
        rows = _concat([p for rd in readers for p in rd.pieces(i)], self.ceil_cols)
        for e in present:
            pk = np.sort(rows["key"][rows["entity"] == e])
            if pk.shape[0]:
                scans[e].sorted_block(pk, None)

    # ---- phase 4: bootstrap sums of this rank's users --------------------------------------------------

    def _bootstrap_sums(self, scanned: List[Dict[str, Any]]) -> Dict[int, analysis.BootstrapSums]:
        arrays = self.user_arrays
        place_readers = None
        if any(self.linear.values()):
            place_readers = [_Reader(os.path.join(self.root, f"rank-{s:05d}", "placement"), self.place_cols,
                                     scanned[s]["place"]) for s in range(self.world)]
        out = {}
        for e in self.entity_rows:
            parts = arrays.get(e, [])
            if not parts:
                out[e] = analysis.BootstrapSums.zeros(self.samples, self.linear[e])
                continue
            ids, n, p, num = (np.concatenate(c) for c in zip(*parts))
            order = np.argsort(ids)
            ids, n, p, num = ids[order], n[order], p[order], num[order]
            placement2 = self._placement(e, ids, scanned, place_readers) if self.linear[e] else None
            out[e] = analysis.user_bootstrap_sums(ids, n, p, num, self.samples, self.seed, placement2)
        return out

    def _placement(self, e: int, ids: np.ndarray, scanned: List[Dict[str, Any]],
                   readers: List[_Reader]) -> np.ndarray:
        """Twice the placement sums of this rank's users of entity ``e`` (exact integers in float64)."""
        pieces = [s["entities"][e]["score"] for s in scanned]
        positives = sum(p.pos for p in pieces)
        l2 = np.zeros(ids.shape[0])
        neg_before = pos_before = 0
        for s, rd in enumerate(readers):
            for p in rd.pieces(self.rank):
                sel = np.flatnonzero(p["entity"] == e)
                if sel.shape[0] == 0:
                    continue
                uid, y = p["user_id"][sel], p["label"][sel]
                value = p["value"][sel] + np.where(y == 1, 2 * neg_before, 2 * (positives - pos_before))
                index = np.searchsorted(ids, uid)
                if (index >= ids.shape[0]).any() or (ids[np.minimum(index, ids.shape[0] - 1)] != uid).any():
                    raise RuntimeError("placement rows of users this rank does not own (routing mismatch)")
                l2 += np.bincount(index, weights=value.astype(np.float64), minlength=ids.shape[0])
            neg_before += pieces[s].neg
            pos_before += pieces[s].pos
        return l2

    # ---- final: the same combination on every rank -------------------------------------------------------

    def _entity(self, e: int, scanned: List[Dict[str, Any]],
                sums: Optional[List[Dict[int, analysis.BootstrapSums]]]) -> Dict[str, Any]:
        parts = [s["entities"][e] for s in scanned]
        main, ceil_sum = _GaucSum(), _GaucSum()
        groups = [_GaucSum() for _ in range(self.n_groups)]
        scores = _ScoreSums(self.eval_cfg.calibration_bins)
        for p in parts:
            m, gs, c, sc = p["user"]
            main.merge(m)
            scores.merge(sc)
            for acc, g in zip(groups, gs):
                acc.merge(g)
            if c is not None:
                ceil_sum.merge(c)
        score = _ordered_total([p["score"] for p in parts])
        rows, pos = self.entity_rows[e], score.pos
        ceiling = (_ordered_total([p["ceiling"] for p in parts]).num2, ceil_sum) if self.true_prob else None
        st = _entity_statistics(rows, main, score.num2, self.bounds, groups, score.group_num2, ceiling, scores)
        cis: Dict[str, Any] = {"auc_ci": None, "gauc_ci": None}
        if sums is not None:
            total = sums[0][e]
            for s in sums[1:]:
                total = total + s[e]
            pieces = None
            if self.exact[e]:
                pieces = analysis.AUCPieces.zeros(self.samples)
                for p in parts:
                    pieces = pieces.then(p["weighted"])
            reps = analysis.replicates_from_sums(total, pieces, score.num2, pos, rows - pos)
            confidence = float(self.eval_cfg.confidence)
            cis = {"auc_ci": analysis.percentile_ci(reps.auc, confidence),
                   "gauc_ci": analysis.percentile_ci(reps.gauc, confidence)}
        return entity_report(st, cis)


def _ranges(sample: np.ndarray, m: int, world: int) -> Tuple[np.ndarray, np.ndarray]:
    """Score-key cut points (``compute_metrics``' rule: quantiles, each followed by its successor) and the
    rank of each of the ``len(cuts) + 1`` ranges: consecutive, by the sample's cumulative count."""
    s = np.sort(sample)
    cuts = _sorted_cut_points(s, m)  # of the whole sample (under 2**21 keys): no second sort of a subsample
    if s.shape[0] == 0:
        return cuts, np.zeros(cuts.shape[0] + 1, dtype=np.int64)
    below = np.concatenate([[0], np.searchsorted(s, cuts, side="left")])  # sampled keys below each range
    return cuts, np.minimum(world - 1, below * world // s.shape[0]).astype(np.int64)


def _single_key(cuts: np.ndarray, i: int) -> bool:
    """Whether range ``i`` (``cuts[i-1] <= key < cuts[i]``) holds a single score key."""
    return 0 < i < cuts.shape[0] and int(cuts[i]) - int(cuts[i - 1]) == 1
