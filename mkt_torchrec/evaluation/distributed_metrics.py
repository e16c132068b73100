"""Metrics of a predictions directory computed by every rank of a process group together, exactly.

:func:`compute_metrics_distributed` returns the dict of
:func:`~mkt_torchrec.evaluation.streaming.compute_metrics` - bit for bit, bootstrap intervals included,
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
   (:func:`~mkt_torchrec.evaluation.bootstrap.poisson_weights`), so every rank draws its own users' counts:
   it computes the exact per-resample GAUC sums of its users and, in the exact AUC mode, the weighted
   Mann-Whitney pieces of its score ranges. In the linearised mode the score side also writes each row's
   placement value (relative to its rank's ranges) to a ``placement`` file grouped by the user's rank, which
   adds the offsets known from step 3 and sums per user. One all-gather of ``O(samples)`` sums.
5. Every rank combines the gathered pieces (``O(W (samples + groups))`` ints and fractions) into the same
   dict: the result is returned on **every** rank.

The plan and the partition of step 1 are in :mod:`~mkt_torchrec.evaluation.distributed_plan`, the exchange files
in :mod:`~mkt_torchrec.evaluation.distributed_exchange`, steps 3 and 4 in
:mod:`~mkt_torchrec.evaluation.distributed_scan`; this module runs the steps and combines their results.

Exactness: every quantity is an integer or an exact rational (float terms are added exactly,
:func:`~mkt_torchrec.evaluation.exact.exact_sum`) rounded once at the end, and ``compute_metrics`` uses
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

import os
import uuid
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from mkt_torchrec.collective import Collective
from mkt_torchrec.config import EvalConfig
from mkt_torchrec.evaluation.bootstrap import AUCPieces, BootstrapSums, percentile_ci, replicates_from_sums
from mkt_torchrec.evaluation.distributed_exchange import ExchangeDir
from mkt_torchrec.evaluation.distributed_plan import SAMPLE_KEYS, Partition, Plan, RankState
from mkt_torchrec.evaluation.distributed_scan import RankScan, bootstrap_sums, ordered_total
from mkt_torchrec.evaluation.entity_sums import (
    GaucSum,
    ScoreSums,
    bootstrap_entry,
    build_entity_statistics,
    entity_report,
)
from mkt_torchrec.evaluation.metrics import partition_by_user, sortable32
from mkt_torchrec.evaluation.predictions import ENTITIES, REQUIRED_COLUMNS, Rows, read_layout, validate_batch
from mkt_torchrec.evaluation.score_buckets import MAX_GROUPS, SCORE_SHIFT, packed_keys
from mkt_torchrec.evaluation.streaming import SpillLimits

__all__ = ["compute_metrics_distributed"]

# Chunk counts per destination of each exchange file of a rank ({file name: chunks}), as phase 2 returns them.
Routed = Dict[str, List[np.ndarray]]


def compute_metrics_distributed(pred_dir: str, eval_cfg: EvalConfig, device: torch.device, *,
                                spill_dir: Optional[str] = None,
                                limits: SpillLimits = SpillLimits()) -> Dict[str, Any]:
    """:func:`~mkt_torchrec.evaluation.streaming.compute_metrics`, computed by all ranks together.

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
            (:class:`~mkt_torchrec.evaluation.streaming.SpillLimits`; ``threshold_rows`` is unused).

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
                           "call streaming.compute_metrics in a single process instead")
    bounds = np.asarray(eval_cfg.activity_bounds, dtype=np.int64)
    comm = Collective(device)
    layout, token = comm.on_root(lambda: (read_layout(pred_dir), uuid.uuid4().hex[:12]))
    if layout.activity and bounds.shape[0] + 1 > MAX_GROUPS:  # the same on every rank
        raise ValueError(f"eval.activity_bounds: at most {MAX_GROUPS - 1} bounds are supported")
    parent = spill_dir if spill_dir is not None else os.path.dirname(os.path.abspath(pred_dir))
    plan = Plan.create(comm.rank, comm.world, layout, eval_cfg, bounds, limits)
    files = ExchangeDir(os.path.join(parent, f".mkt-eval-{token}"), comm.rank, comm.world)
    try:
        return _run(comm, plan, files)
    finally:
        files.cleanup()


def _run(comm: Collective, plan: Plan, files: ExchangeDir) -> Dict[str, Any]:
    """The phases, each ending in an all-gather (:meth:`~mkt_torchrec.collective.Collective.phase`)."""
    state = RankState()
    loaded = comm.phase(lambda: _load(plan, files, state))
    counts = np.sum([c for c, _, _ in loaded], axis=0)
    out: Dict[str, Any] = {}
    present = [e for e in range(len(ENTITIES)) if counts[e] > 0]
    if present:
        part = Partition.create(plan, counts, [s for _, s, _ in loaded], [t for _, _, t in loaded])
        del loaded
        routed = comm.phase(lambda: _route(plan, part, files, state))
        scanned = comm.phase(lambda: RankScan(plan, part, files, state).run(routed))
        files.remove("users", "scores", "ceiling")  # every rank has read them
        sums = None
        if plan.samples > 0:
            sums = comm.phase(lambda: bootstrap_sums(plan, part, files, state, scanned))
        for e in present:
            out[ENTITIES[e]] = _combine(plan, part, e, scanned, sums)
    out["bootstrap"] = bootstrap_entry(plan.eval_cfg)
    return out


# --------------------------------------------------------------------------------------------------------
# Phase 1: load this rank's rows, sample their scores
# --------------------------------------------------------------------------------------------------------


def _load(plan: Plan, files: ExchangeDir, state: RankState) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read and validate this rank's row groups into ``state.rows``; -> (rows per entity, score-key sample,
    ``true_prob``-key sample)."""
    files.create()
    layout = plan.layout
    columns = list(REQUIRED_COLUMNS) + [c for c, has in (("activity", layout.activity),
                                                         ("true_prob", layout.true_prob)) if has]
    parts: List[Rows] = []
    opened: Dict[str, pq.ParquetFile] = {}
    for path, group, offset in plan.units():
        if path not in opened:
            opened[path] = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        for rb in opened[path].iter_batches(batch_size=plan.limits.batch_rows, row_groups=[group],
                                            columns=columns):
            parts.append(validate_batch(rb, path, offset, plan.bounds))
            offset += rb.num_rows
    rows = state.rows = Rows.concat(parts) if parts else plan.empty_rows()
    del parts
    counts = np.bincount(rows.entity, minlength=len(ENTITIES)).astype(np.int64)
    per_rank = -(-SAMPLE_KEYS // plan.world)
    step = max(1, len(rows) // per_rank)
    sample = sortable32(rows.score[::step])
    tp_sample = sortable32(rows.true_prob[::step]) if plan.true_prob else np.zeros(0, np.int64)
    return counts, sample, tp_sample


# --------------------------------------------------------------------------------------------------------
# Phase 2: route rows to their user bucket and score range
# --------------------------------------------------------------------------------------------------------


def _route(plan: Plan, part: Partition, files: ExchangeDir, state: RankState) -> Routed:
    """Write this rank's rows to the exchange files, grouped by user bucket and score range."""
    r = state.rows
    out = {}
    users = files.writer("users", plan.user_cols, part.n_user_buckets)
    users.append(partition_by_user(r.user_id, part.n_user_buckets),
                 {"user_id": r.user_id, "entity": r.entity, "label": r.label, "score": r.score,
                  "group": r.group, "true_prob": r.true_prob})
    out["users"] = users.close()
    scores = files.writer("scores", plan.score_cols, part.cuts.shape[0] + 1)
    key = packed_keys(r.score, r.label, r.group)
    scores.append(np.searchsorted(part.cuts, key >> SCORE_SHIFT, side="right"),
                  {"key": key, "entity": r.entity, "user_id": r.user_id})
    out["scores"] = scores.close()
    if plan.true_prob:
        ceil = files.writer("ceiling", plan.ceil_cols, part.tp_cuts.shape[0] + 1)
        key = packed_keys(r.true_prob, r.label, None)
        ceil.append(np.searchsorted(part.tp_cuts, key >> SCORE_SHIFT, side="right"),
                    {"key": key, "entity": r.entity})
        out["ceiling"] = ceil.close()
    state.rows = plan.empty_rows()  # routed: free the memory
    return out


# --------------------------------------------------------------------------------------------------------
# Final: the same combination on every rank
# --------------------------------------------------------------------------------------------------------


def _combine(plan: Plan, part: Partition, e: int, scanned: List[Dict[str, Any]],
             sums: Optional[List[Dict[int, BootstrapSums]]]) -> Dict[str, Any]:
    """Entity ``e``'s entry of the result from every rank's phase-3 pieces and phase-4 sums."""
    parts = [s["entities"][e] for s in scanned]
    main, ceil_sum = GaucSum(), GaucSum()
    groups = [GaucSum() for _ in range(plan.n_groups)]
    scores = ScoreSums(plan.eval_cfg.calibration_bins)
    for p in parts:
        m, gs, c, sc = p["user"]
        main.merge(m)
        scores.merge(sc)
        for acc, g in zip(groups, gs):
            acc.merge(g)
        if c is not None:
            ceil_sum.merge(c)
    score = ordered_total([p["score"] for p in parts])
    rows, pos = part.entity_rows[e], score.pos
    ceiling = (ordered_total([p["ceiling"] for p in parts]).num2, ceil_sum) if plan.true_prob else None
    st = build_entity_statistics(rows, main, score.num2, plan.bounds, groups, score.group_num2, ceiling, scores)
    cis: Dict[str, Any] = {"auc_ci": None, "gauc_ci": None}
    if sums is not None:
        total = sums[0][e]
        for s in sums[1:]:
            total = total + s[e]
        pieces = None
        if part.exact[e]:
            pieces = AUCPieces.zeros(plan.samples)
            for p in parts:
                pieces = pieces.then(p["weighted"])
        reps = replicates_from_sums(total, pieces, score.num2, pos, rows - pos)
        confidence = float(plan.eval_cfg.confidence)
        cis = {"auc_ci": percentile_ci(reps.auc, confidence), "gauc_ci": percentile_ci(reps.gauc, confidence)}
    return entity_report(st, cis)
