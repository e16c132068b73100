"""Exact ROC AUC and impression-weighted Group AUC (GAUC), vectorised with numpy.

Two metrics are reported by the MKT paper (section 4.1.4):

* **AUC**: the ordinary ROC AUC over all rows. :func:`auc` computes it exactly with the rank-sum
  (Mann-Whitney) formula; tied scores get half credit, which is what ``sklearn.metrics.roc_auc_score``
  does (its trapezoids between distinct thresholds give the same area).
* **GAUC** (paper Eq. 14): ``GAUC = sum_u n_u * AUC_u / sum_u n_u`` where ``n_u`` is the number of
  impressions of user ``u`` and ``AUC_u`` is the AUC over that user's rows only. Users whose impressions are
  all clicks or all non-clicks have no defined ``AUC_u``; they are left out of both sums and counted in
  :attr:`GroupAUCResult.users_skipped_single_class`.

Not every library means Eq. 14 by "GAUC". :attr:`GroupAUCResult.mean_user_auc` is the *unweighted* mean of
``AUC_u`` over evaluated users; ``torchrec.metrics.gauc`` reports that kind of unweighted mean, over
contiguous sessions, with no half credit for ties, and it also skips sessions whose predictions are all
identical. This module's ``gauc`` is Eq. 14 (impression-weighted); a user whose scores are all identical
is kept here with ``AUC_u = 0.5``.

Sufficient statistics, for distributed or out-of-core evaluation
----------------------------------------------------------------
:func:`group_auc_stats` reduces rows to per-user integers: impressions ``n_u``, positives ``p_u`` and the
Mann-Whitney numerator ``(#pairs with positive score > negative score) + 0.5 * (#tied pairs)``, so
``AUC_u = numerator_u / (p_u * (n_u - p_u))``. ``AUC_u`` needs **all rows of a user in the same call**.
Callers therefore hash-partition rows by user (:func:`partition_by_user`): each partition (a rank's shard,
or a chunk of a file written partition by partition) is evaluated on its own, and the partials are
concatenated with :meth:`GroupAUCStats.merge`, which gives exactly the one-shot statistics (merge sorts by
user id, so even the float sums in :meth:`GroupAUCStats.result` are bit-identical). A user id found in two
partials means the partitioning was wrong, and merge raises.

Global AUC is not decomposable by user. :func:`auc_stats` reduces rows to (distinct score, #positives,
#negatives), and :meth:`AUCStats.merge` combines partials exactly; this is a compressed way of gathering
all scores in one place (its size is the number of distinct scores, up to the number of rows), which is
fine at the scale of this project's evaluation sets.

Example:
    >>> import numpy as np
    >>> users = np.array([7, 7, 7, 3, 3, 9])
    >>> labels = np.array([1, 0, 0, 1, 0, 1])
    >>> scores = np.array([0.9, 0.2, 0.9, 0.1, 0.4, 0.5])
    >>> auc(labels, scores)
    0.5
    >>> r = group_auc_stats(users, labels, scores).result()
    >>> r.gauc, r.mean_user_auc, r.users_evaluated, r.users_skipped_single_class
    (0.45, 0.375, 2, 1)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np

__all__ = [
    "UndefinedMetricError",
    "auc",
    "AUCStats",
    "auc_stats",
    "GroupAUCStats",
    "GroupAUCResult",
    "group_auc_stats",
    "group_auc",
    "per_user_auc",
    "partition_by_user",
    "sortable32",
]


class UndefinedMetricError(ValueError):
    """The metric is undefined for this input (e.g. only one label class). Subclass of ``ValueError``."""


# --------------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------------


def _as_1d(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {a.shape}")
    return a


def _check_same_length(**arrays: np.ndarray) -> int:
    lengths = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{k}={v}" for k, v in lengths.items())
        raise ValueError(f"length mismatch: {desc}; all inputs must have one entry per row")
    return next(iter(lengths.values()))


def _labels(labels: Any) -> np.ndarray:
    """Validate 0/1 labels (bool, int or float dtype) -> (N,) bool."""
    y = _as_1d(labels, "labels")
    if y.dtype == np.bool_:
        return y
    if y.dtype.kind not in "iuf":
        raise TypeError(f"labels must be bool or numeric 0/1, got dtype {y.dtype}")
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"labels must be 0 or 1: {int(bad.sum())} of {y.shape[0]} values are not "
            f"(first at index {first}: {y[first]!r}); binarise the labels before evaluating"
        )
    return y == 1


def _scores(scores: Any) -> np.ndarray:
    """Validate finite numeric scores -> (N,) array (floating/integer dtype kept, bool -> int8)."""
    s = _as_1d(scores, "scores")
    if s.dtype == np.bool_:
        return s.astype(np.int8)
    if s.dtype.kind in "iu":
        return s
    if s.dtype.kind != "f":
        raise TypeError(f"scores must be a real numeric array, got dtype {s.dtype}")
    finite = np.isfinite(s)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        first = int(bad[0])
        raise ValueError(
            f"scores contain {bad.shape[0]} non-finite value(s) (NaN/inf) out of {s.shape[0]}; "
            f"first at index {first} (value {s[first]!r}); check the model output for divergence"
        )
    return s


def _weights(weights: Any) -> np.ndarray:
    w = _as_1d(weights, "weights")
    if w.dtype.kind not in "biuf":
        raise TypeError(f"weights must be numeric, got dtype {w.dtype}")
    w = w.astype(np.float64, copy=False)
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"weights must be finite and >= 0: {int(bad.sum())} value(s) are not "
            f"(first at index {first}: {w[first]!r})"
        )
    return w


def _user_ids(user_ids: Any) -> np.ndarray:
    """Validate integer user ids -> (N,) int64."""
    u = _as_1d(user_ids, "user_ids")
    if u.shape[0] == 0:
        return np.zeros(0, np.int64)  # e.g. ``[]``, which numpy types as float64
    if u.dtype.kind == "i":
        return u.astype(np.int64, copy=False)
    if u.dtype.kind == "u":
        if u.shape[0] and u.dtype.itemsize == 8 and int(u.max()) > np.iinfo(np.int64).max:
            raise ValueError("user_ids of dtype uint64 must be < 2**63 (they are stored as int64)")
        return u.astype(np.int64, copy=False)
    raise TypeError(f"user_ids must be an integer array, got dtype {u.dtype}; map ids to integers first")


def _segment_starts(changed: np.ndarray) -> np.ndarray:
    """(N-1,) bool "row i+1 differs from row i" -> (S,) int64 start index of every segment."""
    flags = np.empty(changed.shape[0] + 1, dtype=np.bool_)
    flags[0] = True
    flags[1:] = changed
    return np.flatnonzero(flags)


def _segment_lengths(starts: np.ndarray, n: int) -> np.ndarray:
    return np.diff(starts, append=n).astype(np.int64, copy=False)


# Fast path. Sorting an int64 array by value (``np.sort``) is several times faster than ``argsort`` /
# ``lexsort`` and needs no gathers afterwards, so when the scores are exactly representable as float32 we
# pack (score, label) - and for GAUC a dense user rank - into one int64 key and sort the keys themselves:
#   AUC:  key = sortable32(score) << 1 | label                   (33 bits)
#   GAUC: key = user_rank << 33 | sortable32(score) << 1 | label  (user_rank < 2**30)
# Equal keys are identical (user, score, label) triples, so the unstable sort loses nothing.

_SIGN32 = np.int64(2**31)
_MAX_PACKED_USERS = 2**30
# group_auc_stats splits larger inputs into hash partitions by user of about this many rows and merges
# them: sorting cache-sized chunks is ~2x faster than one sort of 10M rows, and the result is identical.
_CHUNK_ROWS = 1 << 20


def _as_float32_exact(s: np.ndarray) -> Optional[np.ndarray]:
    """(N,) validated scores -> (N,) float32 with the same values (hence the same order and ties), or None."""
    if s.dtype == np.float32:
        return s
    if s.dtype.kind == "f" and s.dtype.itemsize < 4:
        return s.astype(np.float32)
    if s.dtype.kind in "iu":
        if s.shape[0] == 0 or (int(s.min()) >= -(2**24) and int(s.max()) <= 2**24):
            return s.astype(np.float32)
        return None
    if s.dtype == np.float64:
        with np.errstate(over="ignore"):
            s32 = s.astype(np.float32)
        return s32 if np.array_equal(s32, s) else None
    return None


def sortable32(s32: np.ndarray) -> np.ndarray:
    """(N,) finite float32 -> (N,) int64 in [0, 2**32) with the same order; -0.0 and +0.0 map to one key."""
    b = (s32 + np.float32(0.0)).view(np.int32).astype(np.int64)  # -0.0 + 0.0 == +0.0
    np.bitwise_xor(b, 0x7FFFFFFF, out=b, where=b < 0)  # negative floats: reverse the magnitude order
    return b + _SIGN32


def _unsortable32(k: np.ndarray) -> np.ndarray:
    """Inverse of :func:`sortable32` -> float32."""
    b = k - _SIGN32
    np.bitwise_xor(b, 0x7FFFFFFF, out=b, where=b < 0)
    return b.astype(np.int32).view(np.float32)


# --------------------------------------------------------------------------------------------------------
# Global AUC
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AUCStats:
    """Mergeable exact statistics for the global AUC: label counts per distinct score.

    Attributes:
        scores: (K,) distinct scores, strictly increasing (dtype of the input scores).
        pos: (K,) positives with that score: int64 counts, or float64 weight sums if built with weights.
        neg: (K,) negatives with that score, same dtype as ``pos``.

    Unweighted statistics add up exactly under :meth:`merge` (integer counts); weighted ones up to float
    rounding of the weight sums.
    """

    scores: np.ndarray
    pos: np.ndarray
    neg: np.ndarray

    @staticmethod
    def merge(parts: Sequence["AUCStats"]) -> "AUCStats":
        """Combine partial statistics of disjoint row sets (any partitioning) into one.

        Args:
            parts: non-empty sequence of :class:`AUCStats`.

        Returns:
            AUCStats equal to :func:`auc_stats` on the concatenated rows.

        Example:
            >>> a = auc_stats([1, 0], [0.8, 0.3]); b = auc_stats([0, 1], [0.8, 0.1])
            >>> AUCStats.merge([a, b]).result() == auc([1, 0, 0, 1], [0.8, 0.3, 0.8, 0.1])
            True
        """
        if len(parts) == 0:
            raise ValueError("AUCStats.merge needs at least one partial")
        s = np.concatenate([p.scores for p in parts])
        pos = np.concatenate([p.pos for p in parts])
        neg = np.concatenate([p.neg for p in parts])
        if s.shape[0] == 0:
            return AUCStats(s, pos, neg)
        order = np.argsort(s, kind="stable")
        s, pos, neg = s[order], pos[order], neg[order]
        starts = _segment_starts(s[1:] != s[:-1])
        return AUCStats(s[starts], np.add.reduceat(pos, starts), np.add.reduceat(neg, starts))

    def result(self) -> float:
        """The AUC (ties get half credit).

        Returns:
            float in [0, 1].

        Raises:
            UndefinedMetricError: no positives or no negatives (AUC undefined).
        """
        pos, neg = self.pos, self.neg
        total_pos, total_neg = pos.sum(), neg.sum()
        if not (total_pos > 0 and total_neg > 0):
            raise UndefinedMetricError(
                f"AUC is undefined for a single class: {total_pos} positive and {total_neg} negative "
                "(weight); the evaluation set needs both clicks and non-clicks"
            )
        neg_below = np.cumsum(neg) - neg  # negatives with a strictly lower score
        if pos.dtype.kind in "iu":
            # Twice the Mann-Whitney numerator, in exact integers; Python ints divide correctly rounded.
            num2 = int(np.sum(pos * (2 * neg_below + neg)))
            return num2 / (2 * int(total_pos) * int(total_neg))
        num = float(np.sum(pos * (neg_below + 0.5 * neg)))
        return num / (float(total_pos) * float(total_neg))


def auc_stats(labels: Any, scores: Any, weights: Optional[Any] = None) -> AUCStats:
    """Reduce rows to :class:`AUCStats` (label counts per distinct score).

    Args:
        labels: (N,) 0/1 labels (bool, int or float dtype).
        scores: (N,) finite real scores (any float/int dtype; higher = more likely positive).
        weights: optional (N,) non-negative finite sample weights.

    Returns:
        AUCStats with K <= N distinct scores. Empty input gives empty statistics.

    Raises:
        ValueError: NaN/inf scores, labels not in {0, 1}, negative weights or mismatched lengths.
        TypeError: non-numeric inputs.

    Example:
        >>> auc_stats([1, 0, 1], [0.5, 0.5, 0.9]).pos
        array([1, 1])
    """
    y = _labels(labels)
    s = _scores(scores)
    if weights is None:
        _check_same_length(labels=y, scores=s)
    else:
        w = _weights(weights)
        _check_same_length(labels=y, scores=s, weights=w)
    n = s.shape[0]
    if n == 0:
        dt = np.int64 if weights is None else np.float64
        return AUCStats(s, np.zeros(0, dt), np.zeros(0, dt))
    s32 = _as_float32_exact(s) if weights is None else None
    if s32 is not None:  # fast path: sort packed (score, label) keys
        key = sortable32(s32) << 1
        key |= y
        key.sort()
        score_key = key >> 1
        starts = _segment_starts(score_key[1:] != score_key[:-1])
        pos = np.add.reduceat(key & 1, starts)
        neg = _segment_lengths(starts, n) - pos
        return AUCStats(_unsortable32(score_key[starts]).astype(s.dtype), pos, neg)
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    starts = _segment_starts(s[1:] != s[:-1])
    if weights is None:
        pos = np.add.reduceat(y, starts, dtype=np.int64)
        neg = _segment_lengths(starts, n) - pos
    else:
        w = w[order]
        pos = np.add.reduceat(np.where(y, w, 0.0), starts)
        neg = np.add.reduceat(np.where(y, 0.0, w), starts)
    return AUCStats(s[starts], pos, neg)


def auc(labels: Any, scores: Any, weights: Optional[Any] = None) -> float:
    """Exact ROC AUC with half credit for ties (rank-sum / Mann-Whitney with average ranks).

    Equals ``sklearn.metrics.roc_auc_score(labels, scores, sample_weight=weights)``. Unweighted AUC is
    computed in exact integer arithmetic (then one correctly rounded division); unweighted float32-valued
    scores are sorted as packed int64 (score, label) keys, which is several times faster than an argsort.

    For distributed evaluation, build :func:`auc_stats` per rank and gather/merge them
    (:meth:`AUCStats.merge`), or gather the scores and labels and call this function.

    Args:
        labels: (N,) 0/1 labels (bool, int or float dtype).
        scores: (N,) finite real scores (float32/float64/int; higher = more likely positive).
        weights: optional (N,) non-negative finite sample weights.

    Returns:
        float in [0, 1].

    Raises:
        ValueError: empty input, NaN/inf scores (count and first index in the message), labels not in
            {0, 1}, mismatched lengths, negative weights.
        UndefinedMetricError: (a ``ValueError``) only one class present.
        TypeError: non-numeric inputs.

    Example:
        >>> auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        0.75
        >>> auc([0, 1], [0.3, 0.3])   # a tie counts one half
        0.5
    """
    st = auc_stats(labels, scores, weights)
    if st.scores.shape[0] == 0:
        raise ValueError("auc: empty input (0 rows)")
    return st.result()


# --------------------------------------------------------------------------------------------------------
# Group AUC
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupAUCResult:
    """Result of :meth:`GroupAUCStats.result`.

    Attributes:
        gauc: impression-weighted GAUC of the paper's Eq. 14, ``sum n_u AUC_u / sum n_u`` over evaluated users.
        mean_user_auc: unweighted mean of ``AUC_u`` over evaluated users (what some libraries, e.g.
            ``torchrec.metrics.gauc``, report as "GAUC"). Not the paper's metric.
        users: number of distinct users.
        users_evaluated: users with at least one positive and one negative impression.
        users_skipped_single_class: users whose impressions are all positive or all negative (includes users
            with a single impression); ``users == users_evaluated + users_skipped_single_class``.
        impressions_evaluated: ``sum n_u`` over evaluated users (the denominator of Eq. 14).
        rows: all rows, including those of skipped users.
    """

    gauc: float
    mean_user_auc: float
    users: int
    users_evaluated: int
    users_skipped_single_class: int
    impressions_evaluated: int
    rows: int

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of the fields (for JSON/logging)."""
        return asdict(self)


@dataclass(frozen=True)
class GroupAUCStats:
    """Per-user sufficient statistics of GAUC.

    Attributes:
        user_ids: (U,) int64 user ids, strictly increasing.
        impressions: (U,) int64 ``n_u``, rows of the user.
        positives: (U,) int64 ``p_u``, rows with label 1.
        numerator: (U,) float64 Mann-Whitney numerator, ``#(pos, neg) pairs with pos score > neg score +
            0.5 * #tied pairs``; a half-integer, exact while ``p_u * (n_u - p_u) < 2**52``.
            ``AUC_u = numerator / (p_u * (n_u - p_u))``.

    Build it with :func:`group_auc_stats` (all rows of a user in one call), combine hash-partitioned partials
    with :meth:`merge`, and finish with :meth:`result`.
    """

    user_ids: np.ndarray
    impressions: np.ndarray
    positives: np.ndarray
    numerator: np.ndarray

    def __post_init__(self) -> None:
        shapes = {a.shape for a in (self.user_ids, self.impressions, self.positives, self.numerator)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"GroupAUCStats arrays must be 1-D of one length, got shapes {sorted(shapes)}")

    @property
    def num_users(self) -> int:
        """U, the number of distinct users."""
        return int(self.user_ids.shape[0])

    @property
    def rows(self) -> int:
        """Total rows (``sum n_u``)."""
        return int(self.impressions.sum())

    @property
    def negatives(self) -> np.ndarray:
        """(U,) int64 ``n_u - p_u``."""
        return self.impressions - self.positives

    @staticmethod
    def empty() -> "GroupAUCStats":
        """Statistics of zero rows (for an empty partition)."""
        z = np.zeros(0, np.int64)
        return GroupAUCStats(z, z.copy(), z.copy(), np.zeros(0, np.float64))

    @staticmethod
    def merge(parts: Sequence["GroupAUCStats"]) -> "GroupAUCStats":
        """Concatenate partials computed on disjoint sets of users (e.g. hash partitions by user).

        The result is sorted by user id, so it is identical, array for array, to :func:`group_auc_stats` on
        all rows at once.

        Args:
            parts: sequence of :class:`GroupAUCStats`; an empty sequence gives empty statistics.

        Returns:
            The merged :class:`GroupAUCStats`.

        Raises:
            ValueError: a user id occurs in more than one partial. Rows of a user were split across
                partitions, so that user's AUC cannot be recovered; partition rows by user
                (:func:`partition_by_user`) instead of by row.

        Example:
            >>> u, y, s = np.array([1, 2, 1, 2]), np.array([1, 0, 0, 1]), np.array([.9, .2, .1, .8])
            >>> part = partition_by_user(u, 2)
            >>> merged = GroupAUCStats.merge([group_auc_stats(u[part == k], y[part == k], s[part == k],
            ...                                               allow_empty=True) for k in range(2)])
            >>> merged.result().gauc
            1.0
        """
        if len(parts) == 0:
            return GroupAUCStats.empty()
        uid = np.concatenate([p.user_ids for p in parts])
        order = np.argsort(uid, kind="stable")
        uid = uid[order]
        dup = uid[1:] == uid[:-1]
        if dup.any():
            ids = np.unique(uid[1:][dup])
            raise ValueError(
                f"GroupAUCStats.merge: {ids.shape[0]} user id(s) occur in more than one partial "
                f"(e.g. {ids[:5].tolist()}); all rows of a user must be evaluated in the same partition - "
                "partition rows by user (partition_by_user), not by row"
            )
        return GroupAUCStats(
            uid,
            np.concatenate([p.impressions for p in parts])[order],
            np.concatenate([p.positives for p in parts])[order],
            np.concatenate([p.numerator for p in parts])[order],
        )

    def result(self) -> GroupAUCResult:
        """GAUC (Eq. 14), the unweighted mean user AUC and user/row counts.

        Returns:
            :class:`GroupAUCResult`.

        Raises:
            UndefinedMetricError: (a ``ValueError``) no user has both a positive and a negative impression.
        """
        ids, auc_u, n_u = per_user_auc(self)
        users = self.num_users
        if ids.shape[0] == 0:
            raise UndefinedMetricError(
                f"GAUC is undefined: none of the {users} user(s) ({self.rows} rows) has both a positive and "
                "a negative impression"
            )
        w = n_u.astype(np.float64)
        return GroupAUCResult(
            gauc=float(np.sum(w * auc_u) / np.sum(w)),
            mean_user_auc=float(np.mean(auc_u)),
            users=users,
            users_evaluated=int(ids.shape[0]),
            users_skipped_single_class=users - int(ids.shape[0]),
            impressions_evaluated=int(n_u.sum()),
            rows=self.rows,
        )


def group_auc_stats(user_ids: Any, labels: Any, scores: Any, *, allow_empty: bool = False) -> GroupAUCStats:
    """Per-user GAUC statistics: sort rows by (user, score), then segment reductions (no Python loops).

    Scores that are float32 values (float32/float16 input, float64 holding float32 values, ints up to
    2**24) take a fast path: one argsort by user, then a value sort of packed (user rank, score, label)
    int64 keys. Other scores use ``np.lexsort((scores, user_ids))``. Both give identical statistics.
    Inputs over ``_CHUNK_ROWS`` rows are themselves hash-partitioned by user into chunks of about that
    size, which are reduced one by one and merged (faster, same result).

    All rows of a user must be in this call for the user's AUC to be exact. To evaluate out of core or
    across ranks, hash-partition rows by user (:func:`partition_by_user`), call this once per partition
    and combine with :meth:`GroupAUCStats.merge`. Rows need not be grouped or sorted; ids may be any
    int64 values (large, negative, non-contiguous).

    Ties: within a user, rows with equal scores (``-0.0 == 0.0``) form a run; each (positive, negative)
    pair inside a run counts 0.5. Integer arithmetic throughout, so the statistics do not depend on row
    order.

    Args:
        user_ids: (N,) integer user ids (converted to int64).
        labels: (N,) 0/1 labels (bool, int or float dtype).
        scores: (N,) finite real scores (float32/float64/int).
        allow_empty: if True, N == 0 gives :meth:`GroupAUCStats.empty` (an empty partition) instead of
            raising.

    Returns:
        :class:`GroupAUCStats` with one entry per distinct user, sorted by user id.

    Raises:
        ValueError: empty input (unless ``allow_empty``), NaN/inf scores, labels not in {0, 1}, mismatched
            lengths.
        TypeError: non-integer user ids or non-numeric labels/scores.

    Example:
        >>> st = group_auc_stats([5, 5, 2, 2, 2], [1, 0, 1, 0, 0], [0.7, 0.7, 0.9, 0.1, 0.2])
        >>> st.user_ids, st.numerator
        (array([2, 5]), array([2. , 0.5]))
    """
    u = _user_ids(user_ids)
    y = _labels(labels)
    s = _scores(scores)
    n = _check_same_length(user_ids=u, labels=y, scores=s)
    if n == 0:
        if allow_empty:
            return GroupAUCStats.empty()
        raise ValueError("group_auc_stats: empty input (0 rows); pass allow_empty=True for an empty partition")
    if n <= _CHUNK_ROWS:
        return _group_stats_nonempty(u, y, s)
    k = min(-(-n // _CHUNK_ROWS), 2**15 - 1)
    part = partition_by_user(u, k).astype(np.int16)
    order = np.argsort(part, kind="stable")  # radix sort of int16
    bounds = np.searchsorted(part[order], np.arange(k + 1))
    del part
    u, y, s = u[order], y[order], s[order]
    del order
    return GroupAUCStats.merge(
        [_group_stats_nonempty(u[a:b], y[a:b], s[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    )


def _group_stats_nonempty(u: np.ndarray, y: np.ndarray, s: np.ndarray) -> GroupAUCStats:
    """:func:`group_auc_stats` of validated rows: (N,) int64 ids, (N,) bool labels, (N,) scores; N > 0."""
    n = u.shape[0]
    s32 = _as_float32_exact(s) if n <= _MAX_PACKED_USERS else None
    if s32 is not None:
        # Fast path: group rows by user (one argsort), then sort packed (user rank, score, label) keys.
        order = np.argsort(u)
        u = u[order]
        user_changed = u[1:] != u[:-1]
        key = np.zeros(n, dtype=np.int64)
        np.cumsum(user_changed, out=key[1:])  # dense user rank, in user order
        key <<= 33
        key |= sortable32(s32[order]) << 1
        key |= y[order]
        del order
        key.sort()  # rows stay in their user's block; within it they are now sorted by score
        run_key = key >> 1
        run_changed = run_key[1:] != run_key[:-1]
        del run_key
        y = key & 1
        del key
    else:
        # General path (e.g. float64 scores that are not float32 values): lexsort by user, then score.
        order = np.lexsort((s, u))
        u, s, y = u[order], s[order], y[order]
        del order
        user_changed = u[1:] != u[:-1]
        run_changed = user_changed | (s[1:] != s[:-1])
    return _stats_of_sorted(u, y, user_changed, run_changed)


def _stats_of_sorted(
    u: np.ndarray, y: np.ndarray, user_changed: np.ndarray, run_changed: np.ndarray
) -> GroupAUCStats:
    """Per-user statistics of rows sorted by (user, score).

    Args:
        u: (N,) int64 user ids, grouped (only ``u[user start]`` is read).
        y: (N,) bool/int 0/1 labels in (user, score) order.
        user_changed: (N-1,) bool, row i+1 starts a new user.
        run_changed: (N-1,) bool, row i+1 starts a new (user, score) run; implied by ``user_changed``.
    """
    n = y.shape[0]
    run_starts = _segment_starts(run_changed)  # runs of equal (user, score)
    run_pos = np.add.reduceat(y, run_starts, dtype=np.int64)
    run_neg = _segment_lengths(run_starts, n) - run_pos

    # Runs that open a new user (every user start is a run start).
    opens_user = np.ones(run_starts.shape[0], dtype=np.bool_)
    opens_user[1:] = user_changed[run_starts[1:] - 1]
    user_first_run = np.flatnonzero(opens_user)
    run_user = np.cumsum(opens_user) - 1  # (R,) index of the user of each run

    # Negatives of the same user with a strictly lower score than the run.
    neg_excl = np.cumsum(run_neg) - run_neg
    neg_below = neg_excl - neg_excl[user_first_run][run_user]
    num2 = np.add.reduceat(run_pos * (2 * neg_below + run_neg), user_first_run)  # 2 x numerator, exact

    user_starts = run_starts[user_first_run]
    return GroupAUCStats(
        user_ids=u[user_starts],
        impressions=_segment_lengths(user_starts, n),
        positives=np.add.reduceat(run_pos, user_first_run),
        numerator=num2.astype(np.float64) * 0.5,
    )


def group_auc(user_ids: Any, labels: Any, scores: Any) -> GroupAUCResult:
    """One-shot GAUC: ``group_auc_stats(user_ids, labels, scores).result()``.

    Args:
        user_ids: (N,) integer user ids.
        labels: (N,) 0/1 labels.
        scores: (N,) finite real scores.

    Returns:
        :class:`GroupAUCResult`.

    Example:
        >>> group_auc([1, 1, 2, 2], [1, 0, 0, 1], [0.9, 0.1, 0.3, 0.3]).gauc
        0.75
    """
    return group_auc_stats(user_ids, labels, scores).result()


def per_user_auc(stats: GroupAUCStats, include_skipped: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-user AUCs, e.g. for bootstrap confidence intervals or breakdowns by user group.

    Args:
        stats: :class:`GroupAUCStats`.
        include_skipped: if True, return every user, with ``auc_u = NaN`` for single-class users; otherwise
            only the evaluated users (both labels present).

    Returns:
        ``(user_ids, auc_u, n_u)``: (M,) int64 user ids (increasing), (M,) float64 ``AUC_u``, (M,) int64
        impressions ``n_u``. ``np.average(auc_u, weights=n_u)`` over evaluated users is the GAUC.

    Example:
        >>> st = group_auc_stats([4, 4, 8], [1, 0, 1], [0.2, 0.6, 0.5])
        >>> per_user_auc(st)
        (array([4]), array([0.]), array([2]))
    """
    den = stats.positives * (stats.impressions - stats.positives)
    valid = den > 0
    if include_skipped:
        auc_u = np.full(stats.num_users, np.nan)
        auc_u[valid] = stats.numerator[valid] / den[valid].astype(np.float64)
        return stats.user_ids, auc_u, stats.impressions
    return (
        stats.user_ids[valid],
        stats.numerator[valid] / den[valid].astype(np.float64),
        stats.impressions[valid],
    )


def partition_by_user(user_ids: Any, num_partitions: int) -> np.ndarray:
    """Deterministic hash partition of rows by user (splitmix64 finaliser of the id, mod k).

    The same id always maps to the same partition, on every machine and run (unlike Python's salted
    ``hash`` of strings), so rows of a user end up together however the data is chunked.

    Args:
        user_ids: (N,) integer user ids.
        num_partitions: k >= 1.

    Returns:
        (N,) int64 partition index in ``[0, k)``.

    Example:
        >>> part = partition_by_user(np.array([10, 10, 2**40, 10]), 4)
        >>> bool(part[0] == part[1] == part[3]), bool(((0 <= part) & (part < 4)).all())
        (True, True)
    """
    if int(num_partitions) < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    x = _user_ids(user_ids).view(np.uint64).copy()
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x % np.uint64(num_partitions)).astype(np.int64)
