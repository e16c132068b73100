"""Rows of one entity in score order: packed score keys, score buckets (in memory or on disk) and the exact
Mann-Whitney pass over them (:class:`OrderedAUC`).

Global AUC does not decompose by user, and exact per-score counts can grow to the number of rows. Rows are
therefore packed into int64 keys that sort like their scores (:func:`packed_keys`), cut into score ranges
(:class:`ScoreStore`: one bucket in memory, or raw binary files on disk), and the buckets are fed to
:class:`OrderedAUC` in increasing score order, one at a time, carrying the positives and negatives seen so far.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np

from mkt_torchrec.evaluation.bootstrap import ScoreOrder
from mkt_torchrec.evaluation.exact import mw_concat
from mkt_torchrec.evaluation.metrics import sortable32

__all__ = ["LABEL_SHIFT", "SCORE_SHIFT", "MAX_GROUPS", "packed_keys", "label_group_counts", "ScoreStore",
           "sorted_cut_points", "score_runs", "OrderedAUC"]

# Packed score key: sortable32(score) << 9 | label << 8 | activity group (< 256). Sorting the keys sorts rows
# by score; equal keys are interchangeable rows.
LABEL_SHIFT = 8
SCORE_SHIFT = 9
MAX_GROUPS = 256


def packed_keys(score: np.ndarray, label: np.ndarray, group: Optional[np.ndarray]) -> np.ndarray:
    """(N,) float32 scores, 0/1 labels, activity groups -> (N,) int64 keys that sort like the scores."""
    pk = sortable32(score) << SCORE_SHIFT
    pk |= label.astype(np.int64) << LABEL_SHIFT
    if group is not None:
        pk |= group.astype(np.int64)
    return pk


def label_group_counts(pk: np.ndarray, slots: int) -> np.ndarray:
    """(slots, 2) int64 row counts of packed keys by (activity group, label)."""
    code = (pk & (MAX_GROUPS - 1)) * 2 + ((pk >> LABEL_SHIFT) & 1)
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
        sk = pk >> SCORE_SHIFT
        self.lo, self.hi = min(self.lo, int(sk.min())), max(self.hi, int(sk.max()))
        self.counts += label_group_counts(pk, self.counts.shape[0])
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


class ScoreStore:
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
        """Rows as packed keys and (optionally) their users' indices, in any order."""
        if pk.shape[0] == 0:
            return
        if self.directory is None:
            self.buckets[0].append(pk, index)
            return
        if self.cuts is None:
            self.cuts = _cut_points(pk >> SCORE_SHIFT, self.n_buckets)
            self.buckets = [self._new(f"b{i:05d}") for i in range(self.cuts.shape[0] + 1)]
        _distribute(pk, index, self.cuts, self.buckets)

    def _new(self, name: str) -> _Bucket:
        return _Bucket(self.slots, os.path.join(self.directory, name), self.index_dtype)

    def feed(self, scan: "OrderedAUC") -> None:
        """Give every row to ``scan`` in increasing score order, deleting buckets as they are consumed."""
        for b in self.buckets:
            self._feed(b, scan)
        self.buckets = []

    def _feed(self, b: _Bucket, scan: "OrderedAUC") -> None:
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
        cuts = _cut_points(first[0] >> SCORE_SHIFT, max(2, -(-b.n // self.bucket_rows)))
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
    return sorted_cut_points(np.sort(sk[:: max(1, sk.shape[0] // 1_000_000)]), m)


def sorted_cut_points(s: np.ndarray, m: int) -> np.ndarray:
    """:func:`_cut_points` of sorted score keys ``s``, all of them taken (no subsample)."""
    if m < 2 or s.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    q = s[(np.arange(1, m) * s.shape[0]) // m]
    return np.unique(np.concatenate([q, q + 1]))


def _distribute(pk: np.ndarray, index: Optional[np.ndarray], cuts: np.ndarray, buckets: List[_Bucket]) -> None:
    """Append each row to the bucket of its score range (``cuts[i-1] <= score key < cuts[i]``)."""
    b = np.searchsorted(cuts, pk >> SCORE_SHIFT, side="right")
    b = b.astype(np.int16) if len(buckets) < 2**15 else b
    order = np.argsort(b, kind="stable")
    edges = np.searchsorted(b[order], np.arange(len(buckets) + 1))
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        if hi > lo:
            sel = order[lo:hi]
            buckets[i].append(pk[sel], None if index is None else index[sel])


def score_runs(sk: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted (N,) score keys and 0/1 labels -> run starts, positives and negatives per run of equal scores."""
    n = sk.shape[0]
    flags = np.empty(n, dtype=np.bool_)
    flags[0] = True
    np.not_equal(sk[1:], sk[:-1], out=flags[1:])
    starts = np.flatnonzero(flags)
    run_pos = np.add.reduceat(y, starts)
    return starts, run_pos, np.diff(starts, append=n) - run_pos


class OrderedAUC:
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
        sk = pk >> SCORE_SHIFT
        y = (pk >> LABEL_SHIFT) & 1
        starts, run_pos, run_neg = score_runs(sk, y)
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
        group = pk & (MAX_GROUPS - 1)
        for g in range(len(self.group_num2)):
            sel = np.flatnonzero(group == g)
            if sel.shape[0]:
                _, gp, gn = score_runs(sk[sel], y[sel])
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
                y = ((pk >> LABEL_SHIFT) & 1) == 1
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
        self.num2, self.pos_seen, self.neg_seen = mw_concat((self.num2, self.pos_seen, self.neg_seen),
                                                             (pos * neg, pos, neg))
        for g in range(len(self.group_num2)):
            gp, gn = int(counts[g, 1]), int(counts[g, 0])
            self.group_num2[g], self.group_pos[g], self.group_neg[g] = mw_concat(
                (self.group_num2[g], self.group_pos[g], self.group_neg[g]), (gp * gn, gp, gn))

    def order(self) -> Optional[ScoreOrder]:
        """The kept rows in score order (``keep_rows``), else None."""
        if self._rows is None:
            return None
        if not self._rows:
            z = np.zeros(0, dtype=np.int64)
            return ScoreOrder(z, np.zeros(0, dtype=bool), z)
        return ScoreOrder(np.concatenate([r[0] for r in self._rows]),
                                   np.concatenate([r[1] for r in self._rows]), np.concatenate(self._starts))
