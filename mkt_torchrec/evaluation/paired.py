"""Paired comparisons of runs scored on the same rows: per-run bootstrap replicates and their pooled differences.

Two runs scored on the same test rows get the same user resamples (the counts are hashed from ``(seed,
resample, user id)``, :func:`~mkt_torchrec.evaluation.bootstrap.poisson_weights`), so the difference of their
replicates is a paired bootstrap of the difference of their metrics: :func:`pooled_paired_difference` over
pairs of runs (e.g. one pair per seed), :func:`paired_comparison` of two prediction directories.
:func:`check_same_rows` checks that two runs are on the same rows, streaming both.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from mkt_torchrec.evaluation.bootstrap import Replicates, percentile_ci, replicates
from mkt_torchrec.evaluation.predictions import ENTITIES, iter_entity_rows
from mkt_torchrec.evaluation.streaming import entity_statistics

__all__ = ["RunReplicates", "run_replicates", "pooled_paired_difference", "paired_comparison", "check_same_rows"]


@dataclass(frozen=True)
class RunReplicates:
    """One run's AUC and GAUC on one entity's rows, with their bootstrap replicates.

    Attributes:
        rows: the entity's rows.
        auc: point AUC (None: a single class).
        gauc: point GAUC (None: no user with both labels).
        users_evaluated: users with both labels (the users the GAUC rests on).
        replicates: :class:`~mkt_torchrec.evaluation.bootstrap.Replicates` of ``samples`` user resamples
            (:func:`~mkt_torchrec.evaluation.bootstrap.poisson_weights` of the eval seed).
    """

    rows: int
    auc: Optional[float]
    gauc: Optional[float]
    users_evaluated: int
    replicates: Replicates


def run_replicates(pred_dir: str, entity: str, eval_cfg: Any, spill_dir: Optional[str] = None,
                   limits: Any = None) -> RunReplicates:
    """:class:`RunReplicates` of one run's predictions: what a paired comparison needs of it, ``O(samples)``.

    Memory: the statistics are computed like
    :func:`~mkt_torchrec.evaluation.streaming.compute_metrics` does them (spilled by user to ``spill_dir``
    beyond ``limits.threshold_rows`` rows, one user partition and one score bucket in memory at a time), plus
    ``O(users)`` per-user arrays and, while the exact AUC bootstrap is used, the rows in score order (at most
    :data:`~mkt_torchrec.evaluation.bootstrap.EXACT_AUC_BUDGET` / ``samples`` rows).

    Args:
        pred_dir: the run's ``part-*.parquet`` predictions.
        entity: ``"source"`` or ``"target"``.
        eval_cfg: :class:`~mkt_torchrec.config.EvalConfig` (bootstrap samples and seed, partitions).
        spill_dir: where temporary spill files go (default: the system temp dir).
        limits: :class:`~mkt_torchrec.evaluation.streaming.SpillLimits` (default: its defaults).

    Raises:
        ValueError: unknown entity, or no rows of it.
    """
    if entity not in ENTITIES:
        raise ValueError(f"entity must be one of {ENTITIES}, got {entity!r}")
    kw = {} if limits is None else {"limits": limits}
    stats = entity_statistics(pred_dir, eval_cfg, spill_dir, entities=(entity,), **kw)
    if entity not in stats:
        raise ValueError(f"{pred_dir}: no {entity!r} rows")
    st = stats.pop(entity)
    reps = replicates(st.user_stats, int(eval_cfg.bootstrap_samples), int(eval_cfg.seed))
    return RunReplicates(st.rows, st.auc, st.gauc, st.users_evaluated, reps)


def pooled_paired_difference(pairs: Sequence[Tuple[RunReplicates, RunReplicates]],
                             confidence: float) -> Dict[str, Any]:
    """Paired bootstrap of ``metric(A) - metric(B)``, pooled over pairs of runs (e.g. one pair per seed).

    Pair ``i`` is ``(A_i, B_i)``: two runs scored on the same rows. Every run's replicates use the same user
    resamples (weights hashed from ``(seed, resample, user id)``), so for resample ``b`` the pooled
    difference is ``D_b = (1/k) sum_i (M(A_i, b) - M(B_i, b))`` over the ``k`` pairs; the estimate is
    ``D = (1/k) sum_i (M(A_i) - M(B_i))`` and the interval the percentile interval of the ``D_b``
    (:func:`~mkt_torchrec.evaluation.bootstrap.percentile_ci`; resamples where some pair's metric is
    undefined are dropped). The interval is the test-set (user) sampling uncertainty of the mean paired
    difference; it does not include the spread between seeds, so over several seeds it is far too narrow to
    judge a model difference by: the report shows the seed-level Student-t interval there
    (:mod:`~mkt_torchrec.evaluation.seed_intervals`) and this one only, labelled, with a single seed.

    Args:
        pairs: ``k >= 1`` pairs ``(A_i, B_i)`` of :class:`RunReplicates`, all with the same resamples.
        confidence: two-sided level in (0, 1).

    Returns:
        ``{"pairs": k, "rows", "users_evaluated", "auc_diff", "auc_diff_ci", "gauc_diff", "gauc_diff_ci",
        "samples", "confidence"}``: ``rows`` and ``users_evaluated`` the smallest over the runs, differences
        None where a metric is undefined, intervals None without (two defined) replicates.

    Example:
        >>> from mkt_torchrec.evaluation.bootstrap import user_stats_from_rows
        >>> a = user_stats_from_rows([1, 1, 2, 2], [1, 0, 1, 0], [.9, .2, .6, .4])
        >>> b = user_stats_from_rows([1, 1, 2, 2], [1, 0, 1, 0], [.1, .2, .6, .4])
        >>> ra = RunReplicates(4, 1.0, 1.0, 2, replicates(a, 20, 0))
        >>> rb = RunReplicates(4, 0.75, 0.5, 2, replicates(b, 20, 0))
        >>> pooled_paired_difference([(ra, rb)], 0.9)["gauc_diff"]
        0.5
    """
    if not pairs:
        raise ValueError("pooled_paired_difference needs at least one pair of runs")
    samples = {r.replicates.auc.shape[0] for pair in pairs for r in pair}
    if len(samples) != 1:
        raise ValueError(f"the runs' replicates differ in number of resamples: {sorted(samples)}")
    out: Dict[str, Any] = {"pairs": len(pairs), "rows": min(r.rows for pair in pairs for r in pair),
                           "users_evaluated": min(r.users_evaluated for pair in pairs for r in pair)}
    for name in ("auc", "gauc"):
        points = [(getattr(a, name), getattr(b, name)) for a, b in pairs]
        out[f"{name}_diff"] = (None if any(x is None or y is None for x, y in points)
                               else sum(x - y for x, y in points) / len(points))
        reps = np.mean([getattr(a.replicates, name) - getattr(b.replicates, name) for a, b in pairs], axis=0)
        out[f"{name}_diff_ci"] = percentile_ci(reps, confidence) if reps.shape[0] else None
    out["samples"] = samples.pop()
    out["confidence"] = float(confidence)
    return out


def paired_comparison(pred_dir_a: str, pred_dir_b: str, entity: str, eval_cfg: Any,
                      spill_dir: Optional[str] = None, limits: Any = None) -> Dict[str, Any]:
    """Compare two runs scored on the same rows: AUC/GAUC of both, ``b - a`` and a paired bootstrap CI.

    Both prediction directories must hold the same rows of ``entity`` in the same order once their part files
    are sorted by name (the same test split read by the same number of ranks): equal row counts and equal
    ``(user_id, label)`` sequences, checked by streaming both in lockstep. The differences are
    ``metric(b) - metric(a)`` and their interval uses the same resampled users for both runs, so it reflects
    the difference's own spread (much narrower than the two separate intervals when the runs are correlated):
    :func:`pooled_paired_difference` of the single pair.

    Memory: the row check streams; each run's statistics are :func:`run_replicates`'.

    Args:
        pred_dir_a: predictions of run A (``part-*.parquet``).
        pred_dir_b: predictions of run B.
        entity: ``"source"`` or ``"target"``.
        eval_cfg: :class:`~mkt_torchrec.config.EvalConfig` (bootstrap samples, confidence, seed, partitions).
        spill_dir: where temporary spill files go (default: the system temp dir).
        limits: :class:`~mkt_torchrec.evaluation.streaming.SpillLimits`, or None for the defaults.

    Returns:
        ``{"entity", "rows", "auc_a", "auc_b", "auc_diff", "auc_diff_ci", "gauc_a", "gauc_b", "gauc_diff",
        "gauc_diff_ci", "samples", "confidence"}``; metrics undefined on these rows are None, intervals are
        None with 0 samples.

    Raises:
        ValueError: unknown entity, no rows of the entity, or the two runs are not on the same rows (the
            message says where they differ).
    """
    if entity not in ENTITIES:
        raise ValueError(f"paired_comparison: entity must be one of {ENTITIES}, got {entity!r}")
    rows = check_same_rows(pred_dir_a, pred_dir_b, entity)
    if rows == 0:
        raise ValueError(f"paired_comparison: {pred_dir_a} and {pred_dir_b} have no {entity!r} rows")
    a, b = (run_replicates(d, entity, eval_cfg, spill_dir, limits) for d in (pred_dir_a, pred_dir_b))
    pooled = pooled_paired_difference([(b, a)], float(eval_cfg.confidence))
    out: Dict[str, Any] = {"entity": entity, "rows": rows}
    for name in ("auc", "gauc"):
        out[f"{name}_a"], out[f"{name}_b"] = getattr(a, name), getattr(b, name)
        out[f"{name}_diff"] = pooled[f"{name}_diff"]
        out[f"{name}_diff_ci"] = pooled[f"{name}_diff_ci"] if pooled["samples"] > 0 else None
    out["samples"] = pooled["samples"]
    out["confidence"] = float(eval_cfg.confidence)
    return out


def check_same_rows(pred_dir_a: str, pred_dir_b: str, entity: str, chunk: int = 1 << 20) -> int:
    """Stream both runs' ``(user_id, label)`` of ``entity`` in lockstep; return the row count or raise.

    Raises:
        ValueError: the runs are not on the same rows (the message says where they differ).
    """
    streams = [_fixed_chunks(iter_entity_rows(d, entity), chunk) for d in (pred_dir_a, pred_dir_b)]
    seen = 0
    for ca, cb in itertools.zip_longest(*streams):
        if ca is None or cb is None or ca[0].shape[0] != cb[0].shape[0]:
            rest = [sum(c[0].shape[0] for c in s) for s in streams]
            na = seen + (0 if ca is None else ca[0].shape[0]) + rest[0]
            nb = seen + (0 if cb is None else cb[0].shape[0]) + rest[1]
            raise ValueError(
                f"paired_comparison: the runs are not on the same rows: {pred_dir_a} has {na} {entity!r} rows, "
                f"{pred_dir_b} has {nb}; score both runs on the same test split with the same number of ranks"
            )
        bad = (ca[0] != cb[0]) | (ca[1] != cb[1])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"paired_comparison: the runs are not on the same rows: {entity!r} row {seen + i} (after sorting "
                f"part files) is (user {ca[0][i]}, label {ca[1][i]}) in {pred_dir_a} but (user {cb[0][i]}, "
                f"label {cb[1][i]}) in {pred_dir_b}; {int(bad.sum())} row(s) of this chunk differ"
            )
        seen += ca[0].shape[0]
    return seen


def _fixed_chunks(stream: Iterator[Tuple[np.ndarray, ...]], size: int) -> Iterator[Tuple[np.ndarray, ...]]:
    """Re-cut a stream of column tuples into chunks of exactly ``size`` rows (the last one may be shorter)."""
    buf: List[Tuple[np.ndarray, ...]] = []
    held = 0
    for cols in stream:
        buf.append(cols)
        held += cols[0].shape[0]
        while held >= size:
            joined = tuple(np.concatenate(c) for c in zip(*buf))
            yield tuple(c[:size] for c in joined)
            buf = [tuple(c[size:] for c in joined)]
            held -= size
    if held:
        yield tuple(np.concatenate(c) for c in zip(*buf))
