"""Seed-level intervals of a paired difference: the training seed as the unit of replication.

A model trained with seeds ``1..n`` and a baseline trained with the same seeds, both scored on the same test
rows, give ``n`` paired differences ``d_k = M(model, seed k) - M(baseline, seed k)`` of an exact metric (AUC,
GAUC, log loss from each run's metrics.json). Their mean estimates the improvement, and

    mean(d) ± t_{n-1, (1 + confidence) / 2} · sd(d) / sqrt(n)

(Student-t, ``sd`` the sample standard deviation) is its interval at ``confidence``: it covers the expected
difference over training seeds *on these test rows*. It includes what a user-level bootstrap leaves out, the
spread between seeds (initialisation, data order, dropout), which is often as large as the effects compared;
test-set effects shared by both runs (the same rows) cancel in ``d_k``. It assumes the ``d_k`` independent and
roughly normal; with few seeds it is wide (``t_{1, 0.975} = 12.71``), which is the honest answer for 2 seeds.

An interval needs ``n >= MIN_SEEDS`` (2) paired seeds; below that there is none and nothing is "significant"
(:func:`seed_interval`'s ``excludes_zero`` is False).

The t quantile is computed here (:func:`t_quantile`: bisection on the regularised incomplete beta function by
its continued fraction), not with scipy: scipy is no declared dependency of this package (it comes
only through scikit-learn), and the report should not import ``scipy.stats`` (slow) for one number.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Dict, Mapping, Sequence

__all__ = ["MIN_SEEDS", "SEED_METRICS", "LOWER_IS_BETTER", "t_quantile", "t_sf", "seed_interval",
           "seed_paired_difference"]

MIN_SEEDS = 2
SEED_METRICS = ("auc", "gauc", "logloss")
LOWER_IS_BETTER = frozenset({"logloss"})
_BETA_ITERATIONS = 2000
_BETA_EPS = 1e-15
_TINY = 1e-300
_NORMAL_DF = 1000  # beyond: the Cornish-Fisher expansion around the normal quantile (relative error < 1e-9)


def _beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), for ``x < (a + 1) / (a + b + 2)``."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _BETA_ITERATIONS + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _BETA_EPS:
            break
    return h


def _regularized_beta(x: float, a: float, b: float) -> float:
    """``I_x(a, b)``, the regularised incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """Upper tail ``P(T > t)`` of Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * _regularized_beta(df / (df + t * t), df / 2.0, 0.5)  # P(|T| > |t|) / 2
    return tail if t >= 0 else 1.0 - tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df > 0`` degrees of freedom (``t_quantile(0.975, 1) = 12.706``).

    Bisection of :func:`t_sf` (the upper tail, so quantiles near 1 keep their precision) to a relative 1e-14;
    closed forms for ``df`` 1 and 2; beyond ``df = 1000`` the Cornish-Fisher expansion around the normal quantile.
    Agrees with ``scipy.stats.t.ppf`` to a relative 1e-9 for ``p`` in [0.6, 1 - 1e-6] (tested).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2.0 * p - 1.0) / math.sqrt(2.0 * p * (1.0 - p))
    if df > _NORMAL_DF:
        z = statistics.NormalDist().inv_cdf(p)
        return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
                + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))
    tail = 1.0 - p
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-14 * hi:
        mid = 0.5 * (lo + hi)
        if t_sf(mid, df) > tail:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def seed_interval(diffs: Sequence[float], confidence: float) -> Dict[str, Any]:
    """Student-t interval of the mean of ``n`` per-seed paired differences (module docstring).

    Args:
        diffs: ``d_k = M(model, seed k) - M(baseline, seed k)``, one per paired seed.
        confidence: two-sided level in (0, 1).

    Returns:
        ``{"n", "diffs", "mean", "sd", "se", "df", "t", "ci", "excludes_zero"}``: ``mean`` None without
        differences; ``sd`` / ``se`` / ``t`` / ``ci`` None with fewer than :data:`MIN_SEEDS`; ``excludes_zero``
        True only when there is an interval and 0 is outside it.

    Example:
        >>> r = seed_interval([0.010, 0.012, 0.008], 0.95)
        >>> round(r["t"], 3), [round(x, 4) for x in r["ci"]], r["excludes_zero"]
        (4.303, [0.005, 0.015], True)
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = [float(x) for x in diffs]
    n = len(d)
    out: Dict[str, Any] = {"n": n, "diffs": d, "mean": statistics.fmean(d) if d else None, "sd": None,
                           "se": None, "df": max(n - 1, 0), "t": None, "ci": None, "excludes_zero": False}
    if n < MIN_SEEDS:
        return out
    sd = statistics.stdev(d)
    se = sd / math.sqrt(n)
    t = t_quantile(0.5 * (1.0 + confidence), n - 1)
    lo, hi = out["mean"] - t * se, out["mean"] + t * se
    out.update(sd=sd, se=se, t=t, ci=[lo, hi], excludes_zero=bool(lo > 0.0 or hi < 0.0))
    return out


def seed_paired_difference(model: Sequence[Mapping[str, Any]], base: Sequence[Mapping[str, Any]],
                           confidence: float, metrics: Sequence[str] = SEED_METRICS) -> Dict[str, Any]:
    """Seed-level interval of ``metric(model) - metric(baseline)`` for each metric, over paired seeds.

    The report builds its intervals with this function from each run's metrics.json entity block; any mapping
    with the metrics as keys works (a simulation's draws, a group's block).

    Args:
        model: the model's metrics, one mapping per paired seed (``{"auc": .., "gauc": .., "logloss": ..}``).
        base: the baseline's, for the same seeds in the same order.
        confidence: two-sided level in (0, 1).
        metrics: keys to compare; a pair where either value is missing (None) is left out of that metric.

    Returns:
        ``{"method": "student_t_over_seeds", "pairs", "confidence", metric: seed_interval(...) for each}``.
    """
    if len(model) != len(base):
        raise ValueError(f"seed_paired_difference: {len(model)} model runs for {len(base)} baseline runs")
    out: Dict[str, Any] = {"method": "student_t_over_seeds", "pairs": len(model), "confidence": float(confidence)}
    for name in metrics:
        diffs = [a[name] - b[name] for a, b in zip(model, base)
                 if a.get(name) is not None and b.get(name) is not None]
        out[name] = seed_interval(diffs, confidence)
    return out

