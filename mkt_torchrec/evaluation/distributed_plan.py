"""How :func:`~mkt_torchrec.evaluation.distributed_metrics.compute_metrics_distributed` splits the work over ranks.

:class:`Plan` is what a rank knows before reading a row: its place in the group, the input's layout, the
settings and the columns of the exchange files; it says which row groups the rank reads (:meth:`Plan.units`).
:class:`Partition` is how the rows are split once every rank's counts and score samples are gathered: user
buckets, score ranges and their owners, and the bootstrap mode per entity; it is the same on every rank.
:class:`RankState` is what a rank holds between the phases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from mkt_torchrec.config import EvalConfig
from mkt_torchrec.evaluation.bootstrap import exact_auc_feasible
from mkt_torchrec.evaluation.distributed_exchange import Columns
from mkt_torchrec.evaluation.predictions import Layout, Rows
from mkt_torchrec.evaluation.score_buckets import sorted_cut_points
from mkt_torchrec.evaluation.streaming import SpillLimits

__all__ = ["SAMPLE_KEYS", "Plan", "Partition", "RankState", "single_key"]

# Score keys sampled for the cut points, over all ranks.
SAMPLE_KEYS = 1 << 20

# Columns of the linearised bootstrap's placement file (twice each row's placement value, by the user's rank).
_PLACE_COLUMNS: Columns = (("user_id", np.int64), ("value", np.int64), ("label", np.int8), ("entity", np.int8))


@dataclass(frozen=True, eq=False)
class Plan:
    """One rank's settings: its place, the input layout, the evaluation settings and the exchange columns.

    Attributes:
        rank: this rank.
        world: the number of ranks ``W``.
        layout: the part files (read by rank 0, broadcast).
        eval_cfg: evaluation settings.
        bounds: activity bounds.
        limits: memory limits.
        samples: bootstrap resamples.
        seed: bootstrap seed.
        n_groups: activity groups (0: no ``activity`` column).
        user_cols: columns of the ``users`` file (every column, by user bucket).
        score_cols: columns of the ``scores`` file (packed keys, entity, user id with a bootstrap).
        ceil_cols: columns of the ``ceiling`` file (packed ``true_prob`` keys, entity).
        place_cols: columns of the ``placement`` file.
    """

    rank: int
    world: int
    layout: Layout
    eval_cfg: EvalConfig
    bounds: np.ndarray
    limits: SpillLimits
    samples: int
    seed: int
    n_groups: int
    user_cols: Columns
    score_cols: Columns
    ceil_cols: Columns
    place_cols: Columns = _PLACE_COLUMNS

    @staticmethod
    def create(rank: int, world: int, layout: Layout, eval_cfg: EvalConfig, bounds: np.ndarray,
               limits: SpillLimits) -> "Plan":
        """The plan of rank ``rank`` of ``world``."""
        samples = int(eval_cfg.bootstrap_samples)
        n_groups = bounds.shape[0] + 1 if layout.activity else 0
        user_cols: List[Tuple[str, type]] = [("user_id", np.int64), ("entity", np.int8), ("label", np.int8),
                                             ("score", np.float32)]
        if n_groups:
            user_cols.append(("group", np.int8))
        if layout.true_prob:
            user_cols.append(("true_prob", np.float32))
        score_cols = [("key", np.int64), ("entity", np.int8)]
        if samples > 0:
            score_cols.append(("user_id", np.int64))
        return Plan(rank, world, layout, eval_cfg, bounds, limits, samples, int(eval_cfg.seed), n_groups,
                    user_cols, score_cols, [("key", np.int64), ("entity", np.int8)])

    @property
    def slots(self) -> int:
        """Activity-group slots of the packed keys (1 without groups)."""
        return max(self.n_groups, 1)

    @property
    def true_prob(self) -> bool:
        """Whether the predictions have ``true_prob`` (the ceiling)."""
        return self.layout.true_prob

    def units(self) -> List[Tuple[str, int, int]]:
        """``(file, row group, row offset in the file)`` of the row groups this rank reads: a row group goes
        to the rank whose ``1/W`` of all rows holds its first row."""
        layout, rank, world = self.layout, self.rank, self.world
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

    def empty_rows(self) -> Rows:
        """No rows, with this input's columns."""
        z8 = np.zeros(0, np.int8)
        return Rows(np.zeros(0, np.int64), z8, z8.copy(), np.zeros(0, np.float32),
                    z8.copy() if self.n_groups else None, np.zeros(0, np.float32) if self.true_prob else None)


@dataclass(frozen=True, eq=False)
class Partition:
    """How the rows are split over the ranks: the same on every rank (computed from the same gathered data).

    Attributes:
        entity_rows: ``{entity code: rows}`` of the entities present.
        exact: ``{entity code: whether its AUC bootstrap is exact}``.
        linear: ``{entity code: whether its AUC bootstrap is linearised}`` (with a bootstrap, not exact).
        n_user_buckets: user hash buckets (bucket ``b`` belongs to rank ``b mod W``).
        cuts: score-key cut points of the score ranges.
        owners: the rank of each of the ``len(cuts) + 1`` score ranges.
        tp_cuts: cut points of the ``true_prob`` ranges (None without ``true_prob``).
        tp_owners: the rank of each ``true_prob`` range (None without ``true_prob``).
    """

    entity_rows: Dict[int, int]
    exact: Dict[int, bool]
    linear: Dict[int, bool]
    n_user_buckets: int
    cuts: np.ndarray
    owners: np.ndarray
    tp_cuts: Optional[np.ndarray] = None
    tp_owners: Optional[np.ndarray] = None

    @staticmethod
    def create(plan: Plan, counts: np.ndarray, samples: Sequence[np.ndarray],
               tp_samples: Sequence[np.ndarray]) -> "Partition":
        """Cut points, range owners and bucket counts from every rank's rows per entity (summed) and score-key
        samples (rank order)."""
        w = plan.world
        rows = int(counts.sum())
        n_user_buckets = w * max(1, -(-rows // (w * plan.limits.partition_rows)))
        ranges = w * max(1, -(-rows // (w * plan.limits.bucket_rows)))
        cuts, owners = _ranges(np.concatenate(samples), ranges, w)
        tp_cuts = tp_owners = None
        if plan.true_prob:
            tp_cuts, tp_owners = _ranges(np.concatenate(tp_samples), ranges, w)
        present = [e for e in range(counts.shape[0]) if counts[e] > 0]
        exact = {e: exact_auc_feasible(int(counts[e]), plan.samples) for e in present}
        return Partition(entity_rows={e: int(counts[e]) for e in present}, exact=exact,
                         linear={e: plan.samples > 0 and not exact[e] for e in present},
                         n_user_buckets=n_user_buckets, cuts=cuts, owners=owners, tp_cuts=tp_cuts,
                         tp_owners=tp_owners)


@dataclass
class RankState:
    """What one rank holds between the phases.

    Attributes:
        rows: its share of the input, until routed.
        user_arrays: per entity code, ``(ids, impressions, positives, numerator)`` of each user bucket of this
            rank (for the bootstrap; only their sums travel).
    """

    rows: Optional[Rows] = None
    user_arrays: Dict[int, List[Tuple[np.ndarray, ...]]] = field(default_factory=dict)


def _ranges(sample: np.ndarray, m: int, world: int) -> Tuple[np.ndarray, np.ndarray]:
    """Score-key cut points (``compute_metrics``' rule: quantiles, each followed by its successor) and the
    rank of each of the ``len(cuts) + 1`` ranges: consecutive, by the sample's cumulative count."""
    s = np.sort(sample)
    cuts = sorted_cut_points(s, m)  # of the whole sample (under 2**21 keys): no second sort of a subsample
    if s.shape[0] == 0:
        return cuts, np.zeros(cuts.shape[0] + 1, dtype=np.int64)
    below = np.concatenate([[0], np.searchsorted(s, cuts, side="left")])  # sampled keys below each range
    return cuts, np.minimum(world - 1, below * world // s.shape[0]).astype(np.int64)


def single_key(cuts: np.ndarray, i: int) -> bool:
    """Whether range ``i`` (``cuts[i-1] <= key < cuts[i]``) holds a single score key."""
    return 0 < i < cuts.shape[0] and int(cuts[i]) - int(cuts[i - 1]) == 1
