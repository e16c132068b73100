"""Tests for mkt_torchrec.evaluation.streaming: compute_metrics against a pandas + scikit-learn brute force,
the out-of-core path against the in-memory one, and input validation."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from mkt_torchrec.config import EvalConfig
from mkt_torchrec.evaluation import bootstrap, metrics, score_buckets
from mkt_torchrec.evaluation.predictions import iter_entity_rows
from mkt_torchrec.evaluation.streaming import SpillLimits, compute_metrics

# Everything spills into eval_cfg.partitions user partitions; score buckets and batches are tiny.
TINY = SpillLimits(threshold_rows=0, partition_rows=10**6, bucket_rows=150, batch_rows=500)


def make_predictions(n_users: int = 300, seed: int = 0, activity: bool = True, true_prob: bool = True) -> pd.DataFrame:
    """Rows of many users with both entities, ties (two-decimal scores and a saturated 1.0), single-class users,
    activity varying inside a user (so a user's rows can fall in two groups), in random order."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(2**40, size=n_users, replace=False).astype(np.int64) - 2**39
    sizes = rng.integers(1, 30, size=n_users)
    user = np.repeat(ids, sizes)
    n = user.shape[0]
    bias = np.repeat(rng.normal(-1.0, 1.0, size=n_users), sizes)
    prob = 1.0 / (1.0 + np.exp(-(bias + rng.normal(0, 1, n))))
    label = (rng.random(n) < prob).astype(np.float32)
    score = np.round(np.clip(prob + rng.normal(0, 0.15, n), 0, 1), 2).astype(np.float32)
    score[rng.random(n) < 0.15] = 1.0  # a heavy tie
    df = pd.DataFrame({
        "user_id": user,
        "entity": np.where(rng.random(n) < 0.4, "source", "target"),
        "label": label,
        "score": score,
    })
    if activity:
        df["activity"] = np.repeat(rng.integers(0, 50, size=n_users), sizes) + rng.integers(0, 3, n)
    if true_prob:
        df["true_prob"] = np.round(prob, 3).astype(np.float32)
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def write_parts(df: pd.DataFrame, directory, parts: int = 2) -> str:
    """Split rows (not users) over ``parts`` rank files, like ``mkt evaluate`` does."""
    os.makedirs(directory, exist_ok=True)
    for r, idx in enumerate(np.array_split(np.arange(len(df)), parts)):
        pq.write_table(pa.Table.from_pandas(df.iloc[idx], preserve_index=False),
                       os.path.join(directory, f"part-{r:05d}.parquet"), row_group_size=700)
    return str(directory)


def pair_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC over every (positive, negative) pair, ties one half."""
    diff = pos[:, None] - neg[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def calibration_by_loop(labels: np.ndarray, scores: np.ndarray, bins: int = 20) -> dict:
    """Equal-width calibration bins and ECE, row by row in Python floats (math.fsum)."""
    rows, clicks, sums = [0] * bins, [0] * bins, [[] for _ in range(bins)]
    for y, s in zip(labels.tolist(), scores.astype(np.float64).tolist()):
        b = min(int(s * bins), bins - 1)
        rows[b] += 1
        clicks[b] += int(y)
        sums[b].append(s)
    n = len(labels)
    return {"binning": "equal_width", "bins": bins,
            "ece": math.fsum(abs(math.fsum(sums[b]) - clicks[b]) for b in range(bins)) / n,
            "mean_score": math.fsum(math.fsum(x) for x in sums) / n, "click_rate": sum(clicks) / n,
            "per_bin": [{"lo": b / bins, "hi": (b + 1) / bins, "rows": rows[b],
                         "mean_score": math.fsum(sums[b]) / rows[b] if rows[b] else None,
                         "click_rate": clicks[b] / rows[b] if rows[b] else None} for b in range(bins)]}


def logloss_by_loop(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean -log of the probability given to each row's own label, clipped to [1e-7, 1 - 1e-7]."""
    terms = [-math.log(min(max(s if y == 1 else 1.0 - s, 1e-7), 1 - 1e-7))
             for y, s in zip(labels.tolist(), scores.astype(np.float64).tolist())]
    return math.fsum(terms) / len(terms)


def brute_force(df: pd.DataFrame, bounds=(10, 30)) -> dict:
    """The obvious way: pandas groupby with every pair per user, sklearn for the global AUC, Python loops for the
    log loss and calibration."""

    def gauc(d: pd.DataFrame, col: str = "score"):
        aucs, weights = [], []
        for _, g in d.groupby("user_id"):
            y, s = g["label"].to_numpy() == 1, g[col].to_numpy()
            if 0 < y.sum() < len(y):
                aucs.append(pair_auc(s[y], s[~y]))
                weights.append(len(g))
        if not aucs:
            return None, None, 0
        return float(np.average(aucs, weights=weights)), float(np.mean(aucs)), len(aucs)

    def auc(d: pd.DataFrame, col: str = "score"):
        return float(roc_auc_score(d["label"], d[col])) if d["label"].nunique() == 2 else None

    out = {}
    for ent, d in df.groupby("entity"):
        g, mean_auc, evaluated = gauc(d)
        res = {"rows": len(d), "users": d["user_id"].nunique(), "positives": int(d["label"].sum()),
               "auc": auc(d), "gauc": g, "mean_user_auc": mean_auc, "users_evaluated": evaluated,
               "users_skipped_single_class": d["user_id"].nunique() - evaluated,
               "logloss": logloss_by_loop(d["label"].to_numpy(), d["score"].to_numpy()),
               "calibration": calibration_by_loop(d["label"].to_numpy(), d["score"].to_numpy())}
        groups = []
        if "activity" in d:
            edges = [0, *bounds, np.inf]
            for lo, hi in zip(edges[:-1], edges[1:]):
                s = d[(d["activity"] >= lo) & (d["activity"] < hi)]
                groups.append({"rows": len(s), "users": s["user_id"].nunique(), "users_evaluated": gauc(s)[2],
                               "auc": auc(s) if len(s) else None, "gauc": gauc(s)[0] if len(s) else None})
        res["groups"] = groups
        res["ceiling"] = {"auc": auc(d, "true_prob"), "gauc": gauc(d, "true_prob")[0]} if "true_prob" in d else None
        out[ent] = res
    return out


def assert_close(got, want, path="") -> None:
    if isinstance(want, dict):
        for k, v in want.items():
            assert_close(got[k], v, f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{path}[{i}]")
    elif want is None or isinstance(want, str):
        assert got == want, path
    else:
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12), path


@pytest.fixture(scope="module")
def predictions():
    return make_predictions()


@pytest.fixture(scope="module")
def pred_dir(tmp_path_factory, predictions):
    return write_parts(predictions, tmp_path_factory.mktemp("run") / "predictions")


def test_matches_brute_force(pred_dir, predictions):
    m = compute_metrics(pred_dir, EvalConfig(bootstrap_samples=20))
    want = brute_force(predictions)
    assert set(m) == {"source", "target", "bootstrap"}
    assert m["bootstrap"] == {"samples": 20, "confidence": 0.95, "seed": 0}
    for ent in ("source", "target"):
        assert_close(m[ent], want[ent], ent)
        assert [g["name"] for g in m[ent]["groups"]] == ["0-10", "10-30", ">30"]
        assert [(g["lo"], g["hi"]) for g in m[ent]["groups"]] == [(0, 10), (10, 30), (30, None)]
        assert sum(g["rows"] for g in m[ent]["groups"]) == m[ent]["rows"]
        lo, hi = m[ent]["gauc_ci"]
        assert lo <= m[ent]["gauc"] <= hi
    # A user's rows fall in two groups (activity varies per row), so group users overlap.
    assert sum(g["users"] for g in m["target"]["groups"]) > m["target"]["users"]


@pytest.mark.parametrize("exact", [True, False])
def test_out_of_core_is_identical_to_in_memory(predictions, tmp_path, monkeypatch, exact):
    if not exact:  # the linearised AUC bootstrap and its placement sums take the same two paths
        monkeypatch.setattr(bootstrap, "EXACT_AUC_BUDGET", 0)
    cfg = EvalConfig(bootstrap_samples=30, partitions=4)
    # Score ranges are cut at quantiles of the first user partition; make its users score lower than the
    # rest, so that the last range overflows and is split again.
    first = metrics.partition_by_user(predictions["user_id"].to_numpy(), 4) == 0
    drifted = predictions.assign(score=np.where(first, np.round(predictions["score"] * 0.3, 2),
                                                predictions["score"]).astype(np.float32))
    pred_dir = write_parts(drifted, tmp_path / "predictions")
    calls = {"split": 0, "tie": 0}
    split, tie = score_buckets.ScoreStore._split, score_buckets.OrderedAUC.tie_block

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(score_buckets.ScoreStore, "_split", count("split", split))
    monkeypatch.setattr(score_buckets.OrderedAUC, "tie_block", count("tie", tie))
    spill = tmp_path / "spill"
    spill.mkdir()
    in_memory = compute_metrics(pred_dir, cfg)
    assert calls == {"split": 0, "tie": 0}
    out_of_core = compute_metrics(pred_dir, cfg, spill_dir=str(spill), limits=TINY)
    assert calls["split"] > 0 and calls["tie"] > 0  # overfull buckets were split, tie buckets streamed
    assert out_of_core == in_memory  # exact statistics: bit-identical, intervals included
    assert list(spill.iterdir()) == []  # temporary files removed
    assert_close(in_memory["target"], brute_force(drifted)["target"])


def test_partitions_do_not_change_results(pred_dir):
    a = compute_metrics(pred_dir, EvalConfig(bootstrap_samples=10, partitions=1))
    b = compute_metrics(pred_dir, EvalConfig(bootstrap_samples=10, partitions=7), limits=TINY)
    assert_close(b, a)


def test_without_optional_columns(tmp_path):
    df = make_predictions(120, seed=3, activity=False, true_prob=False)
    df = df[df["entity"] == "target"]
    d = write_parts(df, tmp_path / "p")
    m = compute_metrics(d, EvalConfig(bootstrap_samples=0))
    assert set(m) == {"target", "bootstrap"}
    t = m["target"]
    assert t["groups"] == [] and t["ceiling"] is None and t["auc_ci"] is None and t["gauc_ci"] is None
    assert_close(t, brute_force(df)["target"])
    assert compute_metrics(d, EvalConfig(bootstrap_samples=0), limits=TINY) == m


def test_single_class_gives_none(tmp_path):
    df = make_predictions(40, seed=4)
    df["label"] = np.float32(0.0)
    m = compute_metrics(write_parts(df, tmp_path / "p"), EvalConfig(bootstrap_samples=5))
    for ent in ("source", "target"):
        e = m[ent]
        assert e["auc"] is None and e["gauc"] is None and e["mean_user_auc"] is None
        assert e["users_evaluated"] == 0 and e["users_skipped_single_class"] == e["users"]
        assert e["auc_ci"] is None and e["gauc_ci"] is None
        assert e["ceiling"] == {"auc": None, "gauc": None}


@pytest.mark.parametrize("column", ["score", "true_prob"])
@pytest.mark.parametrize("bad", [np.nan, None])
def test_nan_or_missing_names_file_and_column(tmp_path, column, bad):
    df = make_predictions(50, seed=5)
    d = write_parts(df, tmp_path / "p")
    t = pq.read_table(os.path.join(d, "part-00001.parquet")).to_pandas()
    t[column] = t[column].astype(object)
    t.loc[7, column] = bad
    pq.write_table(pa.Table.from_pandas(t, preserve_index=False,
                                        schema=pa.Table.from_pandas(df, preserve_index=False).schema),
                   os.path.join(d, "part-00001.parquet"))
    for limits in (SpillLimits(), TINY):
        with pytest.raises(ValueError, match=rf"part-00001\.parquet: column '{column}' has 1 NaN/missing.*row 7"):
            compute_metrics(d, EvalConfig(bootstrap_samples=0), limits=limits)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        compute_metrics(str(tmp_path), EvalConfig())
    df = make_predictions(30, seed=6)
    bad = df.copy()
    bad.loc[3, "label"] = 2.0
    with pytest.raises(ValueError, match=r"part-00000\.parquet: column 'label'.*not 0/1"):
        compute_metrics(write_parts(bad, tmp_path / "a"), EvalConfig())
    bad = df.copy()
    bad.loc[2, "entity"] = "other"
    with pytest.raises(ValueError, match=r"column 'entity'.*'other'"):
        compute_metrics(write_parts(bad, tmp_path / "b"), EvalConfig())
    d = write_parts(df, tmp_path / "c")
    pq.write_table(pa.Table.from_pandas(df.drop(columns=["activity"]), preserve_index=False),
                   os.path.join(d, "part-00001.parquet"))
    with pytest.raises(ValueError, match=r"part-00001\.parquet: no column 'activity'"):
        compute_metrics(d, EvalConfig())
    pq.write_table(pa.Table.from_pandas(df.drop(columns=["score"]), preserve_index=False),
                   os.path.join(d, "part-00001.parquet"))
    with pytest.raises(ValueError, match=r"part-00001\.parquet: missing column\(s\) \['score'\]"):
        compute_metrics(d, EvalConfig())


def test_float64_scores(tmp_path):
    df = make_predictions(30, seed=7)
    exact = df.assign(score=df["score"].astype(np.float64))  # float32 values stored as float64: fine
    m = compute_metrics(write_parts(exact, tmp_path / "a"), EvalConfig(bootstrap_samples=0))
    assert_close(m["target"], brute_force(df)["target"])
    inexact = df.assign(score=df["score"].astype(np.float64) + 1e-12)
    with pytest.raises(ValueError, match="not float32 values"):
        compute_metrics(write_parts(inexact, tmp_path / "b"), EvalConfig(bootstrap_samples=0))


def test_iter_entity_rows(pred_dir, predictions):
    u, y = zip(*iter_entity_rows(pred_dir, "source", batch_rows=333))
    src = predictions[predictions["entity"] == "source"]
    np.testing.assert_array_equal(np.concatenate(u), src["user_id"].to_numpy())
    np.testing.assert_array_equal(np.concatenate(y), src["label"].to_numpy())


def test_logloss_and_calibration_by_hand(tmp_path):
    """Four rows worked out on paper: two saturated scores (clipped to 1e-7), 4 equal-width bins."""
    df = pd.DataFrame({"user_id": [1, 1, 2, 2], "entity": ["target"] * 4, "label": np.float32([0, 0, 1, 1]),
                       "score": np.float32([0.0, 1.0, 0.5, 0.125])})
    m = compute_metrics(write_parts(df, tmp_path / "p", parts=1), EvalConfig(bootstrap_samples=0, calibration_bins=4))
    t = m["target"]
    s = [0.0, 1.0, 0.5, 0.125]
    # label 0, score 0 -> -log(1 - 1e-7); label 0, score 1 -> -log(1e-7); label 1 -> -log(score)
    want = (-math.log1p(-1e-7) - math.log(1e-7) - math.log(0.5) - math.log(0.125)) / 4
    assert t["logloss"] == pytest.approx(want, rel=1e-15)
    c = t["calibration"]
    # bins [0, .25): scores 0, 0.125, clicks 1 | [.5, .75): 0.5, 1 click | [.75, 1]: 1.0, 0 clicks
    assert [b["rows"] for b in c["per_bin"]] == [2, 0, 1, 1]
    assert c["per_bin"][0] == {"lo": 0.0, "hi": 0.25, "rows": 2, "mean_score": 0.0625, "click_rate": 0.5}
    assert c["per_bin"][1]["mean_score"] is None and c["per_bin"][1]["click_rate"] is None
    assert c["ece"] == (abs(0.125 - 1) + abs(0.5 - 1) + abs(1.0 - 0)) / 4
    assert c["mean_score"] == sum(s) / 4 and c["click_rate"] == 0.5
    assert (c["binning"], c["bins"]) == ("equal_width", 4)


def test_logloss_and_calibration_need_probabilities(tmp_path):
    """Scores outside [0, 1] (raw logits) still get AUC / GAUC, but no log loss or calibration."""
    df = make_predictions(40, seed=8)
    df["score"] = (df["score"] * 8 - 4).astype(np.float32)
    m = compute_metrics(write_parts(df, tmp_path / "p"), EvalConfig(bootstrap_samples=0))
    assert m["target"]["auc"] is not None
    assert m["target"]["logloss"] is None and m["target"]["calibration"] is None


def test_logloss_matches_sklearn(pred_dir, predictions):
    m = compute_metrics(pred_dir, EvalConfig(bootstrap_samples=0))
    for ent, d in predictions.groupby("entity"):
        # scikit-learn clips nothing here (its eps is float64's); the scores are pre-clipped as documented. Its
        # 1 - clip(1.0) differs from 1e-7 by a rounding error, hence the tolerance.
        want = log_loss(d["label"], np.clip(d["score"].astype(np.float64), 1e-7, 1 - 1e-7), labels=[0, 1])
        assert m[ent]["logloss"] == pytest.approx(want, rel=1e-9)
