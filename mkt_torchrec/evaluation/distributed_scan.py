"""The work of one rank in :func:`~mkt_torchrec.evaluation.distributed_metrics.compute_metrics_distributed`,
between the exchange of the rows and the final reduction.

Phase 3 (:class:`RankScan`): per entity, the exact sums of the rank's user buckets (GAUC, mean user AUC, activity
groups, ``true_prob``, log loss and calibration) and the Mann-Whitney :class:`Piece` of its score ranges, which
:func:`ordered_total` joins over the ranks in score order; in the exact AUC bootstrap mode also the weighted
pieces of its ranges, in the linearised mode each row's placement value, written to a ``placement`` file by
the user's rank. Phase 4 (:func:`bootstrap_sums`): the exact per-resample sums of the rank's users.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mkt_torchrec.evaluation.bootstrap import BootstrapSums, WeightedAUCScan, user_bootstrap_sums
from mkt_torchrec.evaluation.distributed_exchange import ExchangeDir, Reader, Writer, concat_pieces
from mkt_torchrec.evaluation.distributed_plan import Partition, Plan, RankState, single_key
from mkt_torchrec.evaluation.entity_sums import GaucSum, ScoreSums, user_statistics
from mkt_torchrec.evaluation.exact import mw_concat
from mkt_torchrec.evaluation.metrics import partition_by_user
from mkt_torchrec.evaluation.predictions import Rows
from mkt_torchrec.evaluation.score_buckets import LABEL_SHIFT, SCORE_SHIFT, OrderedAUC, label_group_counts, score_runs

__all__ = ["Piece", "ordered_total", "RankScan", "bootstrap_sums"]

# What the gathered files of phase 2 are: {file name: chunk counts per destination} of each rank, rank order.
Routed = List[Dict[str, List[np.ndarray]]]


@dataclass
class _UserSide:
    """One entity's sums over this rank's users, and their per-user arrays for the bootstrap."""

    main: GaucSum = field(default_factory=GaucSum)
    groups: List[GaucSum] = field(default_factory=list)
    ceiling: Optional[GaucSum] = None
    scores: Optional[ScoreSums] = None  # log loss and calibration
    arrays: List[Tuple[np.ndarray, ...]] = field(default_factory=list)  # (ids, impressions, positives, numerator)


@dataclass(frozen=True)
class Piece:
    """Mann-Whitney statistics of consecutive score ranges: (twice the numerator counted from the ranges'
    start, positives, negatives), overall and per activity group."""

    num2: int
    pos: int
    neg: int
    group_num2: Tuple[int, ...] = ()
    group_pos: Tuple[int, ...] = ()
    group_neg: Tuple[int, ...] = ()

    @staticmethod
    def of(scan: OrderedAUC) -> "Piece":
        """The statistics an :class:`~mkt_torchrec.evaluation.score_buckets.OrderedAUC` has seen."""
        return Piece(scan.num2, scan.pos_seen, scan.neg_seen, tuple(scan.group_num2), tuple(scan.group_pos),
                     tuple(scan.group_neg))


def ordered_total(pieces: Sequence[Piece]) -> Piece:
    """Pieces of consecutive ranges, lowest first -> one piece (exact integers)."""
    total = (0, 0, 0)
    groups = [(0, 0, 0)] * (len(pieces[0].group_num2) if pieces else 0)
    for p in pieces:
        total = mw_concat(total, (p.num2, p.pos, p.neg))
        groups = [mw_concat(g, up) for g, up in zip(groups, zip(p.group_num2, p.group_pos, p.group_neg))]
    return Piece(*total, *(tuple(g[i] for g in groups) for i in range(3)))


class RankScan:
    """Phase 3 on one rank: per-user sums of its user buckets, Mann-Whitney pieces of its score ranges.

    Args:
        plan: the rank's :class:`~mkt_torchrec.evaluation.distributed_plan.Plan`.
        part: the :class:`~mkt_torchrec.evaluation.distributed_plan.Partition` (the same on every rank).
        files: the rank's exchange directory (the routed files of every rank; the placement file it writes).
        state: where the per-user arrays of the rank's users are kept for phase 4.
    """

    def __init__(self, plan: Plan, part: Partition, files: ExchangeDir, state: RankState) -> None:
        self.plan, self.part, self.files, self.state = plan, part, files, state

    def _readers(self, routed: Routed, name: str, columns: Any) -> List[Reader]:
        """Readers of file ``name`` of every rank."""
        return self.files.readers(name, columns, [r[name] for r in routed])

    def run(self, routed: Routed) -> Dict[str, Any]:
        """This rank's share of phase 3: ``{"place": placement file chunks or None, "entities": {entity code:
        {"user": (GaucSum, group GaucSums, ceiling GaucSum, ScoreSums), "score": Piece, "ceiling": Piece or None,
        "weighted": AUCPieces or None}}}`` (what every rank gathers)."""
        present = list(self.part.entity_rows)
        users = {e: _UserSide(groups=[GaucSum() for _ in range(self.plan.n_groups)],
                              ceiling=GaucSum() if self.plan.true_prob else None,
                              scores=ScoreSums(self.plan.eval_cfg.calibration_bins)) for e in present}
        readers = self._readers(routed, "users", self.plan.user_cols)
        for b in range(self.plan.rank, self.part.n_user_buckets, self.plan.world):
            rows = concat_pieces([p for rd in readers for p in rd.pieces(b)], self.plan.user_cols)
            for e in present:
                self._user_bucket(users[e], rows, e)

        place = None
        if any(self.part.linear.values()):
            place = self.files.writer("placement", self.plan.place_cols, self.plan.world)
        scans = {e: OrderedAUC(self.plan.n_groups, 0, 0, None, placement=False, keep_rows=False) for e in present}
        wscans = {e: WeightedAUCScan(self.plan.samples, self.plan.seed) for e in present
                  if self.plan.samples > 0 and self.part.exact[e]}
        readers = self._readers(routed, "scores", self.plan.score_cols)
        for i in np.flatnonzero(self.part.owners == self.plan.rank):
            if single_key(self.part.cuts, int(i)):
                self._score_tie(readers, int(i), present, scans, wscans, place)
            else:
                rows = concat_pieces([p for rd in readers for p in rd.pieces(int(i))], self.plan.score_cols)
                for e in present:
                    self._score_block(rows, e, scans[e], wscans.get(e), place)
        ceil_scans: Dict[int, OrderedAUC] = {}
        if self.plan.true_prob:
            ceil_scans = {e: OrderedAUC(0, 0, 0, None, placement=False, keep_rows=False) for e in present}
            readers = self._readers(routed, "ceiling", self.plan.ceil_cols)
            for i in np.flatnonzero(self.part.tp_owners == self.plan.rank):
                self._ceiling_range(readers, int(i), single_key(self.part.tp_cuts, int(i)), present, ceil_scans)
        out: Dict[str, Any] = {"place": place.close() if place is not None else None, "entities": {}}
        for e in present:
            u = users[e]
            self.state.user_arrays[e] = u.arrays  # kept here for the bootstrap; only its sums travel
            out["entities"][e] = {
                "user": (u.main, u.groups, u.ceiling, u.scores),
                "score": Piece.of(scans[e]),
                "ceiling": Piece.of(ceil_scans[e]) if self.plan.true_prob else None,
                "weighted": wscans[e].pieces() if e in wscans else None,
            }
        return out

    def _user_bucket(self, side: _UserSide, rows: Dict[str, np.ndarray], e: int) -> None:
        """One user bucket's rows of entity ``e``: what ``compute_metrics`` accumulates per partition."""
        sel = np.flatnonzero(rows["entity"] == e)
        if sel.shape[0] == 0:
            return
        r = Rows(rows["user_id"], rows["entity"], rows["label"], rows["score"], rows.get("group"),
                 rows.get("true_prob")).take(sel)
        st = user_statistics(r, side.groups, side.ceiling)
        side.scores.add(r.label, r.score)
        side.main.add(st)
        if self.plan.samples > 0:
            side.arrays.append((st.user_ids, st.impressions, st.positives, st.numerator))

    def _score_block(self, rows: Dict[str, np.ndarray], e: int, scan: OrderedAUC,
                     wscan: Optional[WeightedAUCScan], place: Optional[Writer]) -> None:
        """Rows of entity ``e`` in one score range holding several scores, above all fed before."""
        sel = np.flatnonzero(rows["entity"] == e)
        if sel.shape[0] == 0:
            return
        pk = rows["key"][sel]
        uid = None
        if self.plan.samples > 0:
            order = np.argsort(pk)
            pk, uid = pk[order], rows["user_id"][sel][order]
        else:
            pk = np.sort(pk)  # a value sort is several times faster than argsort + gather
        y = (pk >> LABEL_SHIFT) & 1
        if wscan is not None or self.part.linear[e]:
            starts, run_pos, run_neg = score_runs(pk >> SCORE_SHIFT, y)
            if wscan is not None:
                wscan.block(uid, y == 1, starts)
            if self.part.linear[e]:
                # Twice each row's placement value, counting only this rank's rows below / above; the user's
                # rank adds the other ranks' (negatives below this rank's ranges, positives above).
                run = np.repeat(np.arange(starts.shape[0]), run_pos + run_neg)
                neg_below = scan.neg_seen + np.cumsum(run_neg) - run_neg
                pos_through = scan.pos_seen + np.cumsum(run_pos)
                value = np.where(y == 1, (2 * neg_below + run_neg)[run], (run_pos - 2 * pos_through)[run])
                self._place(place, uid, value, y, e)
        scan.sorted_block(pk, None)

    def _score_tie(self, readers: List[Reader], i: int, present: List[int], scans: Dict[int, OrderedAUC],
                   wscans: Dict[int, WeightedAUCScan], place: Optional[Writer]) -> None:
        """A score range holding one score: streamed from every rank's file, only counted (and streamed once
        more for the linearised bootstrap's placement values, which need the range's counts)."""
        counts = {e: np.zeros((self.plan.slots, 2), dtype=np.int64) for e in present}
        weighted = {e: np.zeros((2, self.plan.samples), dtype=np.int64) for e in wscans}
        for rd in readers:
            for p in rd.pieces(i, self.plan.limits.batch_rows):
                for e in present:
                    sel = p["entity"] == e
                    pk = p["key"][sel]
                    counts[e] += label_group_counts(pk, self.plan.slots)
                    if e in weighted:
                        weighted[e] += WeightedAUCScan.tie_counts(
                            self.plan.samples, self.plan.seed, p["user_id"][sel], ((pk >> LABEL_SHIFT) & 1) == 1)
        values: Dict[int, Tuple[int, int]] = {}  # (positive, negative) row value of each linearised entity
        for e in present:
            if self.part.linear[e]:
                pos, neg = int(counts[e][:, 1].sum()), int(counts[e][:, 0].sum())
                values[e] = (2 * scans[e].neg_seen + neg, pos - 2 * (scans[e].pos_seen + pos))
        if values:  # second pass, for all entities at once: every positive / negative row gets one value
            for rd in readers:
                for p in rd.pieces(i, self.plan.limits.batch_rows):
                    for e, (v_pos, v_neg) in values.items():
                        sel = np.flatnonzero(p["entity"] == e)
                        y = (p["key"][sel] >> LABEL_SHIFT) & 1
                        self._place(place, p["user_id"][sel], np.where(y == 1, v_pos, v_neg), y, e)
        for e in present:
            scans[e].tie_counts(counts[e])
            if e in wscans:
                wscans[e].tie(weighted[e])

    def _place(self, place: Optional[Writer], uid: np.ndarray, value: np.ndarray, y: np.ndarray, e: int) -> None:
        """Append placement values of rows of entity ``e`` to the file, for their users' ranks."""
        owner = partition_by_user(uid, self.part.n_user_buckets) % self.plan.world
        place.append(owner, {"user_id": uid, "value": value, "label": y,
                             "entity": np.full(uid.shape[0], e, dtype=np.int8)})

    def _ceiling_range(self, readers: List[Reader], i: int, single: bool, present: List[int],
                       scans: Dict[int, OrderedAUC]) -> None:
        """One ``true_prob`` range (``single``: holding one score, only counted)."""
        if single:
            counts = {e: np.zeros((1, 2), dtype=np.int64) for e in present}
            for rd in readers:
                for p in rd.pieces(i, self.plan.limits.batch_rows):
                    for e in present:
                        counts[e] += label_group_counts(p["key"][p["entity"] == e], 1)  # group bits are 0
            for e in present:
                scans[e].tie_counts(counts[e])
            return
        rows = concat_pieces([p for rd in readers for p in rd.pieces(i)], self.plan.ceil_cols)
        for e in present:
            pk = np.sort(rows["key"][rows["entity"] == e])
            if pk.shape[0]:
                scans[e].sorted_block(pk, None)


def bootstrap_sums(plan: Plan, part: Partition, files: ExchangeDir, state: RankState,
                   scanned: List[Dict[str, Any]]) -> Dict[int, BootstrapSums]:
    """Phase 4 on one rank: ``{entity code: BootstrapSums}`` of its users (``scanned``: every rank's phase 3)."""
    arrays = state.user_arrays
    place_readers = None
    if any(part.linear.values()):
        place_readers = files.readers("placement", plan.place_cols, [s["place"] for s in scanned])
    out = {}
    for e in part.entity_rows:
        parts = arrays.get(e, [])
        if not parts:
            out[e] = BootstrapSums.zeros(plan.samples, part.linear[e])
            continue
        ids, n, p, num = (np.concatenate(c) for c in zip(*parts))
        order = np.argsort(ids)
        ids, n, p, num = ids[order], n[order], p[order], num[order]
        placement2 = _placement(plan, e, ids, scanned, place_readers) if part.linear[e] else None
        out[e] = user_bootstrap_sums(ids, n, p, num, plan.samples, plan.seed, placement2)
    return out


def _placement(plan: Plan, e: int, ids: np.ndarray, scanned: List[Dict[str, Any]],
               readers: List[Reader]) -> np.ndarray:
    """Twice the placement sums of this rank's users of entity ``e`` (exact integers in float64)."""
    pieces = [s["entities"][e]["score"] for s in scanned]
    positives = sum(p.pos for p in pieces)
    l2 = np.zeros(ids.shape[0])
    neg_before = pos_before = 0
    for s, rd in enumerate(readers):
        for p in rd.pieces(plan.rank):
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
