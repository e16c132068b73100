"""Exact, mergeable sums of one entity's rows, and the statistics and metrics.json entry built from them.

:class:`GaucSum` (GAUC, mean user AUC and counts over disjoint sets of users) and :class:`ScoreSums` (log loss
and calibration) add up exactly over any split of the rows: user partitions in one process
(:mod:`~mkt_torchrec.evaluation.streaming`) or ranks (:mod:`~mkt_torchrec.evaluation.distributed_metrics`).
:func:`build_entity_statistics` turns the totals into :class:`EntityStatistics` and :func:`entity_report` into
one entity's entry of ``metrics.json``, so both paths give bit-identical results.

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
(:func:`~mkt_torchrec.evaluation.exact.exact_sum`) and each result rounded once, so they too are
bit-identical over any split of the rows (partitions, ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mkt_torchrec.config import EvalConfig
from mkt_torchrec.evaluation.bootstrap import UserStats
from mkt_torchrec.evaluation.exact import exact_sum, exact_sums_by
from mkt_torchrec.evaluation.metrics import GroupAUCStats, group_auc_stats, per_user_auc
from mkt_torchrec.evaluation.predictions import Rows

__all__ = ["LOGLOSS_CLIP", "GroupStatistics", "EntityStatistics", "GaucSum", "ScoreSums", "user_statistics",
           "build_entity_statistics", "entity_report", "bootstrap_entry"]

# Scores are clipped to [LOGLOSS_CLIP, 1 - LOGLOSS_CLIP] for the log loss (no log 0).
LOGLOSS_CLIP = 1e-7


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
    user_stats: Optional[UserStats] = field(default=None, repr=False)
    logloss: Optional[float] = None
    calibration: Optional[Dict[str, Any]] = None


class GaucSum:
    """GAUC (Eq. 14) and mean user AUC accumulated over partitions of disjoint users, plus row/user/positive
    counts. The float terms are added exactly (Fractions), so the result does not depend on the partitions
    or their order; partial sums of disjoint users combine with :meth:`merge`."""

    def __init__(self) -> None:
        self.rows = self.users = self.positives = self.den = self.evaluated = 0
        self.num = Fraction(0)  # sum of n_u AUC_u
        self.auc_sum = Fraction(0)  # sum of AUC_u

    def add(self, st: GroupAUCStats) -> None:
        """Add the per-user statistics of users not added before."""
        _, auc_u, n_u = per_user_auc(st)
        self.num += exact_sum(n_u.astype(np.float64) * auc_u)
        self.auc_sum += exact_sum(auc_u)
        self.den += int(n_u.sum())
        self.evaluated += int(auc_u.shape[0])
        self.rows += st.rows
        self.users += st.num_users
        self.positives += int(st.positives.sum())

    def merge(self, other: "GaucSum") -> None:
        """Add the sums of another set of users (disjoint from this one's)."""
        for name in ("rows", "users", "positives", "den", "evaluated", "num", "auc_sum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def gauc(self) -> Optional[float]:
        """GAUC (Eq. 14) of the users added, None without a user with both labels."""
        return float(self.num / self.den) if self.den else None  # the exact ratio, rounded once

    @property
    def mean_user_auc(self) -> Optional[float]:
        """Unweighted mean of the users' AUCs, None without a user with both labels."""
        return float(self.auc_sum / self.evaluated) if self.evaluated else None


class ScoreSums:
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
        self.logloss += exact_sum(terms)
        b = np.minimum((s * self.bins).astype(np.int64), self.bins - 1)  # (N,) bin
        counts = np.bincount(b, minlength=self.bins)
        clicks = np.bincount(b[pos], minlength=self.bins)
        sums = exact_sums_by(s, b, self.bins)
        for k in np.flatnonzero(counts):
            self.bin_rows[k] += int(counts[k])
            self.bin_pos[k] += int(clicks[k])
            self.bin_score[k] += sums[k]

    def merge(self, other: "ScoreSums") -> None:
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


def user_statistics(rows: Rows, groups: Sequence[GaucSum], ceiling: Optional[GaucSum]) -> GroupAUCStats:
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


def build_entity_statistics(rows: int, users: GaucSum, auc_num2: int, bounds: np.ndarray,
                            groups: Sequence[GaucSum], group_num2: Sequence[int],
                            ceiling: Optional[Tuple[int, GaucSum]], scores: ScoreSums,
                            user_stats: Optional[UserStats] = None) -> EntityStatistics:
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


def _auc(num2: int, pos: int, neg: int) -> Optional[float]:
    """Twice the Mann-Whitney numerator -> AUC (one correctly rounded division), None for a single class."""
    return num2 / (2 * pos * neg) if pos > 0 and neg > 0 else None


def _group_ranges(bounds: np.ndarray) -> List[Tuple[str, int, Optional[int]]]:
    """``[10, 30]`` -> ``[("0-10", 0, 10), ("10-30", 10, 30), (">30", 30, None)]``."""
    edges = [0] + [int(b) for b in bounds]
    out: List[Tuple[str, int, Optional[int]]] = [(f"{a}-{b}", a, b) for a, b in zip(edges[:-1], edges[1:])]
    out.append((f">{edges[-1]}", edges[-1], None))
    return out


def entity_report(st: EntityStatistics, cis: Dict[str, Any]) -> Dict[str, Any]:
    """One entity's JSON-able entry of :func:`~mkt_torchrec.evaluation.streaming.compute_metrics` from its
    statistics and bootstrap intervals.

    Args:
        st: the entity's point metrics.
        cis: ``{"auc_ci", "gauc_ci"}`` (:func:`~mkt_torchrec.evaluation.bootstrap.bootstrap_cis`).
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


def bootstrap_entry(eval_cfg: EvalConfig) -> Dict[str, Any]:
    """The ``"bootstrap"`` entry of metrics.json (:func:`~mkt_torchrec.evaluation.streaming.compute_metrics`)."""
    return {"samples": int(eval_cfg.bootstrap_samples), "confidence": float(eval_cfg.confidence),
            "seed": int(eval_cfg.seed)}
