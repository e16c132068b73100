"""User-level bootstrap confidence intervals for AUC and GAUC: resample counts, exact per-resample sums, replicates.

The resampling unit is the **user**: impressions of one user are correlated, so resampling rows would make
the intervals too narrow. In resample ``b`` user ``u`` is drawn ``c_bu`` times and every row of ``u`` counts
``c_bu`` times. The counts are Poisson(1) draws (the *Poisson bootstrap*; drawing ``U`` users with
replacement gives Binomial(U, 1/U) counts, which tend to Poisson(1)), read from a 16-bit inverse-CDF table,
and each one is a **deterministic function of (seed, b, user id)** (:func:`poisson_weights`): a hash, not a
random stream. A user's counts therefore do not depend on which other users there are, on their order, or
on the process that handles the user, so the replicates can be computed over any split of the users (hash
partitions, ranks) and added up; two runs scored on the same users get the same resamples (a paired
bootstrap) for free. Intervals are percentile intervals of the replicates at the configured confidence
(two-sided).

Everything is computed from per-user statistics, never from a copy of the resampled rows, and in exact
arithmetic, so the replicates are bit-identical however the work is split:

* **GAUC** (exact). A user's ``AUC_u`` does not change when its rows are repeated, so
  ``GAUC(c) = sum_u c_u n_u AUC_u / sum_u c_u n_u`` over users with both labels. The terms ``n_u AUC_u``
  are the float64 values the point GAUC adds up; their weighted sums are exact (integer limbs,
  :func:`~mkt_torchrec.evaluation.exact.exact_sum`), and the ratio is rounded once. ``O(U)`` time per
  resample, ``O(U)`` memory.
* **AUC**, exact mode (:class:`ScoreOrder` given). The resampled AUC is the weighted AUC with row weight
  ``c_u``: per run of equal scores, the weighted positives and negatives are integers, so the Mann-Whitney
  numerator (ties one half) is an exact integer and the AUC one correctly rounded division
  (:class:`WeightedAUCScan`). ``O(N)`` per resample and ``O(N)`` memory for the rows in score order, so it is
  used when ``rows * samples <=`` :data:`EXACT_AUC_BUDGET` (:func:`exact_auc_feasible`).
* **AUC**, linearised mode (larger inputs): the first-order (delta-method) expansion of the resampled AUC
  in the user counts, ``AUC(c) ~= AUC + sum_u (c_u - 1) psi_u`` with the users' influence values
  ``psi_u = (L_u - AUC (p_u N + m_u P)) / (P N)``. ``P``, ``N``: positives and negatives; ``p_u``, ``m_u``:
  the user's; ``L_u``: the user's *placement sum*, for each of its positive rows the number of negatives (of
  all users) scored below it plus, for each of its negative rows, the number of positives scored above it,
  ties one half. This is the projection behind DeLong's variance estimate. Since ``sum_u L_u`` is twice the
  Mann-Whitney numerator, ``sum_u psi_u = 0`` and the expansion is the exact rational
  ``(A D + D sum_u c_u 2 L_u - 2 A (N sum_u c_u p_u + P sum_u c_u m_u)) / D**2`` with ``D = 2 P N`` and
  ``A`` twice the numerator, evaluated in integers and rounded once. The neglected terms are ``O(1/U)``
  while the bootstrap spread is ``O(1/sqrt(U))``: measured against the exact replicates, the error is a few
  percent of the replicates' standard deviation on average (about 4% with 300 users, 1.5% with 5,000), so
  the interval's ends move by a few percent of its width at most. ``O(U)`` per resample and memory.

The per-resample sums over a set of users (:class:`BootstrapSums`) and over rows in score order
(:class:`AUCPieces`) are exact and add up over disjoint sets of users / consecutive score ranges;
:func:`replicates_from_sums` turns the totals into replicates. :func:`replicates` does all three on one
:class:`UserStats`.

Resamples where a metric is undefined (no user with both labels for GAUC, a single class for AUC) are
dropped before taking percentiles; with fewer than two defined replicates the interval is ``None``.

Paired comparisons of two runs, built on these replicates, are in :mod:`~mkt_torchrec.evaluation.paired`.

Example:
    >>> st = user_stats_from_rows([1, 1, 2, 2, 3, 3], [1, 0, 1, 0, 0, 1], [.9, .2, .6, .4, .3, .8])
    >>> bootstrap_cis(st, samples=50, confidence=0.9, seed=0)["gauc_ci"]
    [1.0, 1.0]
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mkt_torchrec.evaluation.exact import exact_weighted_sums, mw_concat
from mkt_torchrec.evaluation.metrics import GroupAUCStats, group_auc_stats, per_user_auc

__all__ = [
    "EXACT_AUC_BUDGET",
    "ScoreOrder",
    "UserStats",
    "Replicates",
    "BootstrapSums",
    "AUCPieces",
    "WeightedAUCScan",
    "exact_auc_feasible",
    "gauc_terms",
    "mix64",
    "poisson_weights",
    "user_bootstrap_sums",
    "replicates_from_sums",
    "replicates",
    "percentile_ci",
    "bootstrap_cis",
    "paired_replicates",
    "user_stats_from_rows",
]

# Rows x resamples up to which the AUC bootstrap is exact: at most about 8 s on one slow core (500K rows with
# distinct scores at 200 resamples); beyond it the linearised AUC is used. (It also keeps the exact weighted
# Mann-Whitney sums inside int64: at most 7 * rows weighted rows, 2 * 7**2 * rows**2 < 2**63.)
EXACT_AUC_BUDGET = 100_000_000
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_USER_SALT = 0xD1B54A32D192ED03


def _poisson_table() -> np.ndarray:
    """(65536,) uint8: the Poisson(1) inverse CDF at 16-bit uniforms, ``count(u) = #{k : u >= 65536 P(X <= k)}``.

    Computed in exact rational arithmetic (``1/e`` to 40 terms), so it is the same on every platform. Each
    count's probability is within ``2**-16`` of Poisson(1)'s; counts stop at 7 (``P(X >= 7)`` is ``8e-5``)."""
    e_inv = sum(Fraction((-1) ** n, math.factorial(n)) for n in range(40))
    table = np.zeros(1 << 16, dtype=np.uint8)
    cdf = Fraction(0)
    for k in itertools.count():
        cdf += e_inv / math.factorial(k)
        cut = math.ceil(cdf * (1 << 16))
        if cut >= 1 << 16:
            return table
        table[cut:] += 1


_POISSON_TABLE = _poisson_table()


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, in place on a uint64 array (returned)."""
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _mix64_int(x: int) -> int:
    """:func:`mix64` of one Python int."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def poisson_weights(user_ids: Any, samples: int, seed: int, first: int = 0) -> np.ndarray:
    """Bootstrap draw counts of users: Poisson(1), a deterministic function of ``(seed, resample, user id)``.

    Resample ``b`` of user ``u`` takes 16 bits of ``splitmix64(splitmix64(u + salt) ^ key(seed, b // 4))``
    as a uniform and maps it through the Poisson(1) inverse CDF (a table: probabilities within ``2**-16`` of
    Poisson(1)'s, counts 0 to 7). The count of a user does not depend on the other ids passed, nor on
    ``samples`` (the first ``b`` rows of a larger draw are the same).

    Args:
        user_ids: (n,) integer user ids (any order, repeats allowed: one column per entry).
        samples: number of resamples B >= 0.
        seed: bootstrap seed (any int).
        first: index of the first resample (to draw resamples ``first .. first + B - 1`` only).

    Returns:
        (B, n) uint8 counts in ``[0, 7]``; row ``b`` is resample ``first + b``.

    Example:
        >>> w = poisson_weights([7, 8, 7], 3, seed=0)
        >>> w.shape, bool((w[:, 0] == w[:, 2]).all())
        ((3, 3), True)
    """
    ids = np.asarray(user_ids)
    if ids.ndim != 1 or (ids.shape[0] and ids.dtype.kind not in "iu"):
        raise ValueError(f"poisson_weights: user_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    hu = ids.astype(np.int64, copy=False).view(np.uint64) + np.uint64(_USER_SALT)
    mix64(hu)
    out = np.empty((samples, ids.shape[0]), dtype=np.uint8)
    h = np.empty_like(hu)
    base = _mix64_int(int(seed))
    for j in range(first // 4, -(-(first + samples) // 4)):
        np.bitwise_xor(hu, np.uint64(_mix64_int(base + (j + 1) * _GOLDEN)), out=h)
        mix64(h)
        for q in range(4):  # the four 16-bit quarters, lowest first: resamples 4j .. 4j + 3
            if first <= 4 * j + q < first + samples:
                np.take(_POISSON_TABLE, (h >> np.uint64(16 * q)).astype(np.uint16), out=out[4 * j + q - first])
    return out


def exact_auc_feasible(rows: int, samples: int) -> bool:
    """Whether the exact AUC bootstrap is used for ``rows`` rows and ``samples`` resamples."""
    return rows * samples <= EXACT_AUC_BUDGET


@dataclass(frozen=True)
class ScoreOrder:
    """Rows of one entity in increasing score order: what the exact AUC of a user resample needs.

    Attributes:
        user_index: (N,) int index of each row's user in :attr:`UserStats.user_ids`.
        label: (N,) bool labels.
        run_starts: (K,) int64 first row of each run of equal scores (``run_starts[0] == 0``).
    """

    user_index: np.ndarray
    label: np.ndarray
    run_starts: np.ndarray


@dataclass(frozen=True)
class UserStats:
    """Per-user statistics of one entity, the input of the bootstrap.

    Attributes:
        user_ids: (U,) int64 user ids, increasing.
        impressions: (U,) int64 ``n_u``.
        positives: (U,) int64 ``p_u``.
        numerator: (U,) float64 per-user Mann-Whitney numerator (``AUC_u = numerator / (p_u (n_u - p_u))``).
        auc_num2: twice the Mann-Whitney numerator of the global AUC over all rows (an exact int).
        placement: (U,) float64 placement sums ``L_u`` (linearised AUC; they add up to ``auc_num2``) or None.
        order: :class:`ScoreOrder` (exact AUC) or None. One of ``placement`` / ``order`` is needed for AUC
            intervals; with neither, AUC replicates are NaN.
    """

    user_ids: np.ndarray
    impressions: np.ndarray
    positives: np.ndarray
    numerator: np.ndarray
    auc_num2: int
    placement: Optional[np.ndarray] = None
    order: Optional[ScoreOrder] = None

    @property
    def num_users(self) -> int:
        """U, the number of users."""
        return int(self.user_ids.shape[0])


@dataclass(frozen=True)
class Replicates:
    """Bootstrap replicates, one per resample; NaN where the metric is undefined for that resample.

    Attributes:
        auc: (B,) float64 AUC of each resample.
        gauc: (B,) float64 GAUC of each resample.
    """

    auc: np.ndarray
    gauc: np.ndarray


def gauc_terms(stats: GroupAUCStats) -> Tuple[np.ndarray, np.ndarray]:
    """Per-user GAUC terms: ``(n_u AUC_u, n_u)`` as float64, both 0 for users with a single class.

    ``AUC_u`` is :func:`~mkt_torchrec.evaluation.metrics.per_user_auc`'s, times ``n_u`` as the point GAUC
    takes it, so sums of these terms give the point GAUC and its replicates alike.
    """
    _, auc_u, n_u = per_user_auc(stats, include_skipped=True)  # NaN for single-class users
    ok = ~np.isnan(auc_u)
    n = np.where(ok, n_u, 0).astype(np.float64)
    return np.where(ok, auc_u, 0.0) * n, n


def _ints(values: Sequence[Fraction]) -> List[int]:
    return [int(v) for v in values]  # sums of integers: exact


@dataclass(frozen=True)
class BootstrapSums:
    """Exact per-resample sums over a set of users; sums over disjoint sets of users add up (``a + b``).

    Attributes:
        gauc_num: (B,) ``sum_u c_bu n_u AUC_u`` over users with both labels (Fractions).
        gauc_den: (B,) ``sum_u c_bu n_u`` over the same users (ints).
        placement: (B,) ``sum_u c_bu 2 L_u`` (ints; linearised AUC), or None.
        positives: (B,) ``sum_u c_bu p_u`` (ints), or None with ``placement``.
        negatives: (B,) ``sum_u c_bu (n_u - p_u)`` (ints), or None with ``placement``.
    """

    gauc_num: List[Fraction]
    gauc_den: List[int]
    placement: Optional[List[int]] = None
    positives: Optional[List[int]] = None
    negatives: Optional[List[int]] = None

    def __add__(self, other: "BootstrapSums") -> "BootstrapSums":
        def add(a: Optional[List[Any]], b: Optional[List[Any]]) -> Optional[List[Any]]:
            return None if a is None or b is None else [x + y for x, y in zip(a, b)]

        return BootstrapSums(add(self.gauc_num, other.gauc_num), add(self.gauc_den, other.gauc_den),
                             add(self.placement, other.placement), add(self.positives, other.positives),
                             add(self.negatives, other.negatives))

    @staticmethod
    def zeros(samples: int, placement: bool) -> "BootstrapSums":
        """The sums over no user."""
        z = [0] * samples
        return BootstrapSums([Fraction(0)] * samples, list(z), *((list(z), list(z), list(z)) if placement
                                                                   else (None, None, None)))


def user_bootstrap_sums(user_ids: np.ndarray, impressions: np.ndarray, positives: np.ndarray,
                        numerator: np.ndarray, samples: int, seed: int,
                        placement2: Optional[np.ndarray] = None) -> BootstrapSums:
    """:class:`BootstrapSums` of a set of users (each user once, any order).

    Args:
        user_ids: (U,) int64 ids.
        impressions: (U,) ``n_u``.
        positives: (U,) ``p_u``.
        numerator: (U,) float64 per-user Mann-Whitney numerators.
        samples: resamples B.
        seed: bootstrap seed (:func:`poisson_weights`).
        placement2: (U,) twice the placement sums ``L_u`` (integer-valued, below 2**53), for the linearised
            AUC; None: no AUC sums.
    """
    ids = np.asarray(user_ids, dtype=np.int64)
    x, n = gauc_terms(GroupAUCStats(ids, impressions, positives, numerator))
    cols = [x, n]
    if placement2 is not None:
        cols += [np.asarray(placement2, dtype=np.float64), positives.astype(np.float64),
                 (impressions - positives).astype(np.float64)]
    sums = exact_weighted_sums(cols, lambda a, b: poisson_weights(ids[a:b], samples, seed), ids.shape[0],
                               samples)
    if placement2 is None:
        return BootstrapSums(sums[0], _ints(sums[1]))
    return BootstrapSums(sums[0], _ints(sums[1]), *[_ints(s) for s in sums[2:]])


@dataclass(frozen=True)
class AUCPieces:
    """Per-resample weighted Mann-Whitney statistics of rows of one score range (exact AUC bootstrap).

    Attributes:
        num2: (B,) twice the weighted numerator inside the range (negatives below counted from the range's
            start).
        pos: (B,) weighted positives of the range.
        neg: (B,) weighted negatives of the range.
    """

    num2: List[int]
    pos: List[int]
    neg: List[int]

    def then(self, upper: "AUCPieces") -> "AUCPieces":
        """The pieces of this range followed by a range of strictly higher scores."""
        both = [mw_concat(lo, up) for lo, up in zip(zip(self.num2, self.pos, self.neg),
                                                     zip(upper.num2, upper.pos, upper.neg))]
        return AUCPieces([t[0] for t in both], [t[1] for t in both], [t[2] for t in both])

    @staticmethod
    def zeros(samples: int) -> "AUCPieces":
        """The pieces of an empty range."""
        return AUCPieces([0] * samples, [0] * samples, [0] * samples)


class WeightedAUCScan:
    """Per-resample weighted Mann-Whitney pieces of rows fed in increasing score order (exact AUC bootstrap).

    Each row weighs its user's :func:`poisson_weights` count, so the rows can be fed by any process that has
    them in score order, without knowing the other rows of their users. Integer arithmetic throughout.

    Args:
        samples: resamples B.
        seed: bootstrap seed.
    """

    def __init__(self, samples: int, seed: int) -> None:
        self.samples, self.seed = samples, seed
        self.num2 = [0] * samples
        self.pos = np.zeros(samples, dtype=np.int64)
        self.neg = np.zeros(samples, dtype=np.int64)

    def block(self, user_ids: np.ndarray, labels: np.ndarray, run_starts: np.ndarray,
              user_index: Optional[np.ndarray] = None) -> None:
        """Rows in score order holding whole runs of equal scores, higher than all rows fed before.

        Args:
            user_ids: (n,) int64 user of each row; with ``user_index``, the (U,) distinct users instead.
            labels: (n,) bool.
            run_starts: (K,) first row of each run of equal scores (``run_starts[0] == 0``).
            user_index: (n,) index of each row's user in ``user_ids`` (distinct ids), or None.
        """
        n = labels.shape[0]
        if n == 0:
            return
        flags = np.zeros(n, dtype=np.int64)
        flags[run_starts] = 1
        run = np.cumsum(flags) - 1
        k = int(run_starts.shape[0])
        pos_run, neg_run = run[labels], run[~labels]
        if user_index is None:
            users, row_user = np.unique(user_ids, return_inverse=True)  # draw each user's counts once
        else:
            users, row_user = user_ids, user_index
        pos_user, neg_user = row_user[labels], row_user[~labels]
        for first in range(0, self.samples, 16):  # (16, n) counts at a time
            w = poisson_weights(users, min(16, self.samples - first), self.seed, first)
            w_pos, w_neg = w[:, pos_user], w[:, neg_user]
            for i, b in enumerate(range(first, first + w.shape[0])):
                pos = np.bincount(pos_run, weights=w_pos[i], minlength=k).astype(np.int64)  # exact: < 2**53
                neg = np.bincount(neg_run, weights=w_neg[i], minlength=k).astype(np.int64)
                below = self.neg[b] + np.cumsum(neg) - neg  # weighted negatives with a strictly lower score
                self.num2[b] += int(pos @ (2 * below + neg))
                self.pos[b] += int(pos.sum())
                self.neg[b] += int(neg.sum())

    @staticmethod
    def tie_counts(samples: int, seed: int, user_ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(2, B) weighted (negatives, positives) of rows sharing one score (add chunks up, then :meth:`tie`)."""
        out = np.zeros((2, samples), dtype=np.int64)
        for first in range(0, samples, 16):  # (16, n) counts at a time
            w = poisson_weights(user_ids, min(16, samples - first), seed, first)
            out[0, first:first + w.shape[0]] = w[:, ~labels].sum(axis=1, dtype=np.int64)
            out[1, first:first + w.shape[0]] = w[:, labels].sum(axis=1, dtype=np.int64)
        return out

    def tie(self, counts: np.ndarray) -> None:
        """Rows that all share one score, higher than all rows fed before, given their :meth:`tie_counts`."""
        for b in range(self.samples):
            neg, pos = int(counts[0, b]), int(counts[1, b])
            self.num2[b], self.pos[b], self.neg[b] = mw_concat((self.num2[b], int(self.pos[b]), int(self.neg[b])),
                                                                (pos * neg, pos, neg))

    def pieces(self) -> AUCPieces:
        """The rows fed so far as one :class:`AUCPieces`."""
        return AUCPieces(list(self.num2), [int(x) for x in self.pos], [int(x) for x in self.neg])


def replicates_from_sums(sums: BootstrapSums, pieces: Optional[AUCPieces], auc_num2: int, positives: int,
                         negatives: int) -> Replicates:
    """Replicates from the totals over all users (and all score ranges, in score order).

    Args:
        sums: :class:`BootstrapSums` over all users of the entity.
        pieces: :class:`AUCPieces` of all rows (exact AUC), or None: linearised AUC from ``sums.placement``,
            or NaN AUC replicates without it.
        auc_num2: twice the Mann-Whitney numerator of the point AUC.
        positives: P, positive rows.
        negatives: N, negative rows.

    Returns:
        :class:`Replicates`; each value is an exact rational rounded once (NaN where undefined).
    """
    samples = len(sums.gauc_num)
    gauc = np.array([float(x / d) if d > 0 else np.nan for x, d in zip(sums.gauc_num, sums.gauc_den)])
    auc = np.full(samples, np.nan)
    if pieces is not None:
        for b, (num2, p, n) in enumerate(zip(pieces.num2, pieces.pos, pieces.neg)):
            if p > 0 and n > 0:
                auc[b] = num2 / (2 * p * n)  # Python ints: correctly rounded
    elif sums.placement is not None and positives > 0 and negatives > 0:
        d = 2 * positives * negatives
        for b, (l2, pc, nc) in enumerate(zip(sums.placement, sums.positives, sums.negatives)):
            if pc > 0 and nc > 0:
                auc[b] = (auc_num2 * d + l2 * d - 2 * auc_num2 * (negatives * pc + positives * nc)) / (d * d)
    return Replicates(auc=auc, gauc=gauc)


def replicates(stats: UserStats, samples: int, seed: int) -> Replicates:
    """AUC and GAUC of ``samples`` user resamples (the same resampled users for both metrics).

    Args:
        stats: per-user statistics of one entity.
        samples: number of resamples B.
        seed: resampling seed (:func:`poisson_weights`).

    Returns:
        :class:`Replicates` with (B,) arrays.
    """
    if samples <= 0 or stats.num_users == 0:
        return Replicates(auc=np.full(max(samples, 0), np.nan), gauc=np.full(max(samples, 0), np.nan))
    linear = stats.order is None and stats.placement is not None
    sums = user_bootstrap_sums(stats.user_ids, stats.impressions, stats.positives, stats.numerator, samples, seed,
                               2.0 * stats.placement if linear else None)
    pieces = None
    if stats.order is not None:
        o = stats.order
        scan = WeightedAUCScan(samples, seed)
        scan.block(stats.user_ids, o.label, o.run_starts, user_index=o.user_index)
        pieces = scan.pieces()
    pos = int(stats.positives.sum())
    return replicates_from_sums(sums, pieces, stats.auc_num2, pos, int(stats.impressions.sum()) - pos)


def percentile_ci(values: np.ndarray, confidence: float) -> Optional[List[float]]:
    """Two-sided percentile interval ``[q(a/2), q(1-a/2)]``, ``a = 1 - confidence``, of the finite values.

    Returns:
        ``[lo, hi]`` as Python floats, or None with fewer than two finite values.
    """
    v = values[np.isfinite(values)]
    if v.shape[0] < 2:
        return None
    alpha = 1.0 - confidence
    lo, hi = np.quantile(v, [alpha / 2.0, 1.0 - alpha / 2.0])
    return [float(lo), float(hi)]


def bootstrap_cis(stats: UserStats, samples: int, confidence: float, seed: int) -> Dict[str, Any]:
    """``{"auc_ci": [lo, hi] | None, "gauc_ci": [lo, hi] | None}`` from a user-level bootstrap.

    Args:
        stats: per-user statistics of one entity.
        samples: resamples (0: no intervals).
        confidence: two-sided level in (0, 1).
        seed: resampling seed.
    """
    if samples <= 0:
        return {"auc_ci": None, "gauc_ci": None}
    reps = replicates(stats, samples, seed)
    return {"auc_ci": percentile_ci(reps.auc, confidence), "gauc_ci": percentile_ci(reps.gauc, confidence)}


def paired_replicates(a: UserStats, b: UserStats, samples: int, seed: int) -> Tuple[Replicates, Replicates]:
    """Replicates of two runs on the same users under the *same* resamples (a paired bootstrap).

    The resamples are functions of the user ids (:func:`poisson_weights`), so each run's :func:`replicates`
    already use the same ones.

    Raises:
        ValueError: the two statistics are not over the same users.
    """
    if not np.array_equal(a.user_ids, b.user_ids):
        raise ValueError("paired bootstrap: the two runs are not over the same users")
    return replicates(a, samples, seed), replicates(b, samples, seed)


def user_stats_from_rows(user_ids: Any, labels: Any, scores: Any, exact_auc: bool = True) -> UserStats:
    """:class:`UserStats` of in-memory rows (for tests and small analyses).

    Args:
        user_ids: (N,) integer user ids.
        labels: (N,) 0/1 labels.
        scores: (N,) finite scores.
        exact_auc: keep the rows in score order (exact AUC bootstrap); otherwise compute placement sums
            (linearised AUC bootstrap).

    Example:
        >>> user_stats_from_rows([1, 2], [1, 0], [0.8, 0.1]).auc_num2
        2
    """
    u = np.asarray(user_ids, dtype=np.int64)
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores)
    gs = group_auc_stats(u, y, s)
    uidx = np.searchsorted(gs.user_ids, u)
    order = np.lexsort((y, s))  # by score, negatives first inside a tie
    s_o, y_o, u_o = s[order], y[order], uidx[order]
    flags = np.ones(s_o.shape[0], dtype=bool)
    flags[1:] = s_o[1:] != s_o[:-1]
    starts = np.flatnonzero(flags)
    run = np.cumsum(flags) - 1
    run_pos = np.add.reduceat(y_o.astype(np.int64), starts)
    run_neg = np.diff(starts, append=s_o.shape[0]) - run_pos
    neg_below = np.cumsum(run_neg) - run_neg
    pos_above = run_pos.sum() - np.cumsum(run_pos)
    num2 = int(np.sum(run_pos * (2 * neg_below + run_neg)))
    if exact_auc:
        return UserStats(gs.user_ids, gs.impressions, gs.positives, gs.numerator, num2,
                         order=ScoreOrder(u_o, y_o, starts))
    value = np.where(y_o, neg_below[run] + 0.5 * run_neg[run], pos_above[run] + 0.5 * run_pos[run])
    placement = np.bincount(u_o, weights=value, minlength=gs.num_users)
    return UserStats(gs.user_ids, gs.impressions, gs.positives, gs.numerator, num2, placement=placement)
