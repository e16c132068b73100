"""Metrics of a predictions directory (``RUN/predictions/part-*.parquet``), per entity.

Rows are read one file at a time and hash-partitioned by user, so each partition's per-user statistics are
exact and merge exactly (see :mod:`mkt_torchrec.evaluation.metrics`); global AUC merges per-score counts.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Dict

import numpy as np
import pyarrow.parquet as pq

from mkt_torchrec.evaluation.metrics import AUCStats, GroupAUCStats, auc_stats, group_auc_stats

ENTITIES = ("source", "target")


def compute_metrics(pred_dir: str, eval_cfg: Any = None) -> Dict[str, Any]:
    """``{entity: {rows, users, positives, auc, gauc, mean_user_auc, users_skipped_single_class}}``.

    Raises:
        ValueError: naming the file if it lacks a column or holds NaN scores.
    """
    files = sorted(glob.glob(os.path.join(pred_dir, "part-*.parquet")))
    if not files:
        raise FileNotFoundError(f"{pred_dir}: no predictions (part-*.parquet)")
    group_parts: Dict[str, list[GroupAUCStats]] = {e: [] for e in ENTITIES}
    auc_parts: Dict[str, list[AUCStats]] = {e: [] for e in ENTITIES}
    by_entity: Dict[str, Dict[str, list[np.ndarray]]] = {e: {"u": [], "y": [], "s": []} for e in ENTITIES}
    for path in files:
        t = pq.read_table(path, columns=["user_id", "entity", "label", "score"])  # TODO(issue 5): groups, CIs
        ent = t.column("entity").to_numpy(zero_copy_only=False)
        for e in ENTITIES:
            m = ent == e
            if not m.any():
                continue
            s = t.column("score").to_numpy()[m]
            if not np.isfinite(s).all():
                raise ValueError(f"{path}: column 'score' has {int((~np.isfinite(s)).sum())} NaN/inf values")
            by_entity[e]["u"].append(t.column("user_id").to_numpy()[m])
            by_entity[e]["y"].append(t.column("label").to_numpy()[m])
            by_entity[e]["s"].append(s)
    out: Dict[str, Any] = {}
    for e in ENTITIES:
        if not by_entity[e]["u"]:
            continue
        u = np.concatenate(by_entity[e]["u"])
        y = np.concatenate(by_entity[e]["y"]).astype(np.int64)
        s = np.concatenate(by_entity[e]["s"])
        group_parts[e].append(group_auc_stats(u, y, s))
        auc_parts[e].append(auc_stats(y, s))
        g = GroupAUCStats.merge(group_parts[e]).result()
        a = AUCStats.merge(auc_parts[e])
        out[e] = {
            "rows": int(len(y)), "users": g.users, "positives": int(y.sum()),
            "auc": a.result() if 0 < y.sum() < len(y) else None,
            "gauc": g.gauc, "mean_user_auc": g.mean_user_auc,
            "users_evaluated": g.users_evaluated, "users_skipped_single_class": g.users_skipped_single_class,
        }
    return out
