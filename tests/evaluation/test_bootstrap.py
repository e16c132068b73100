"""Tests for mkt_torchrec.evaluation.bootstrap and .paired: user-level bootstrap replicates against resampled
rows scored by brute force, the linearised AUC against the exact one, intervals, and paired comparisons of two runs."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from mkt_torchrec.config import EvalConfig
from mkt_torchrec.evaluation import bootstrap, exact
from mkt_torchrec.evaluation.bootstrap import (
    percentile_ci,
    poisson_weights,
    replicates,
    user_stats_from_rows,
)
from mkt_torchrec.evaluation.paired import paired_comparison
from mkt_torchrec.evaluation.streaming import compute_metrics
from tests.evaluation.test_streaming import make_predictions, pair_auc, write_parts


def rows(n_users: int, seed: int, noise: float = 1.0):
    """(user_ids, labels, scores) of ``n_users`` users with 1-30 rows each and tied scores."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 30, size=n_users)
    users = np.repeat(rng.choice(10**9, size=n_users, replace=False), sizes)
    logit = np.repeat(rng.normal(-1, 1, n_users), sizes) + rng.normal(0, 1, users.shape[0])
    prob = 1 / (1 + np.exp(-logit))
    labels = (rng.random(users.shape[0]) < prob).astype(np.int64)
    scores = np.round(logit + rng.normal(0, noise, users.shape[0]), 1).astype(np.float32)
    return users, labels, scores


def test_exact_replicates_match_resampled_rows():
    users, labels, scores = rows(60, seed=1)
    st = user_stats_from_rows(users, labels, scores)
    reps = replicates(st, samples=4, seed=11)
    for b, c in enumerate(poisson_weights(st.user_ids, 4, seed=11)):
        # rows of a user drawn twice appear twice, and its AUC_u is unchanged
        take = np.concatenate([np.flatnonzero(users == u) for u, k in zip(st.user_ids, c) for _ in range(k)])
        want_auc = roc_auc_score(labels[take], scores[take])
        num = den = 0.0
        for u, k in zip(st.user_ids, c):
            m = users == u
            y, s = labels[m], scores[m]
            if k and 0 < y.sum() < y.shape[0]:
                num += k * y.shape[0] * pair_auc(s[y == 1], s[y == 0])
                den += k * y.shape[0]
        assert reps.auc[b] == pytest.approx(want_auc, abs=1e-12)
        assert reps.gauc[b] == pytest.approx(num / den, abs=1e-12)


def test_linearised_auc_is_close_to_exact():
    users, labels, scores = rows(1500, seed=2)
    exact = replicates(user_stats_from_rows(users, labels, scores, exact_auc=True), 200, seed=3)
    linear = replicates(user_stats_from_rows(users, labels, scores, exact_auc=False), 200, seed=3)
    np.testing.assert_allclose(exact.gauc, linear.gauc, rtol=1e-13)  # GAUC is always exact
    spread = np.std(exact.auc)
    assert spread > 0
    err = np.abs(linear.auc - exact.auc)
    assert np.mean(err) < 0.05 * spread and np.max(err) < 0.4 * spread
    lo, hi = percentile_ci(exact.auc, 0.95)
    assert percentile_ci(linear.auc, 0.95) == pytest.approx([lo, hi], abs=0.05 * (hi - lo))


def test_percentile_ci():
    assert percentile_ci(np.array([np.nan, 1.0]), 0.9) is None
    assert percentile_ci(np.arange(101.0), 0.9) == pytest.approx([5.0, 95.0])
    assert percentile_ci(np.array([np.nan, 0.0, 10.0]), 0.5) == [2.5, 7.5]


def test_interval_contains_estimate_and_narrows_with_more_users(tmp_path):
    widths = {}
    for n_users in (150, 2400):
        d = write_parts(make_predictions(n_users, seed=8, activity=False, true_prob=False), tmp_path / str(n_users))
        m = compute_metrics(d, EvalConfig(bootstrap_samples=100))["target"]
        for name in ("auc", "gauc"):
            lo, hi = m[f"{name}_ci"]
            assert lo <= m[name] <= hi
            widths[name, n_users] = hi - lo
    for name in ("auc", "gauc"):
        assert widths[name, 2400] < 0.5 * widths[name, 150]  # ~ 1/sqrt(users): 1/4 expected


# --------------------------------------------------------------------------------------------------------
# Paired comparison
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs scored on the same rows: A with noisy scores, B close to the true probability."""
    base = make_predictions(400, seed=9)
    rng = np.random.default_rng(10)
    tp = base["true_prob"].to_numpy()
    a = base.assign(score=np.clip(tp + rng.normal(0, 0.4, len(base)), 0, 1).astype(np.float32))
    b = base.assign(score=np.clip(tp + rng.normal(0, 0.05, len(base)), 0, 1).astype(np.float32))
    root = tmp_path_factory.mktemp("runs")
    return write_parts(a, root / "a"), write_parts(b, root / "b"), base


@pytest.mark.parametrize("linear", [False, True])
def test_paired_identical_runs(runs, monkeypatch, linear):
    if linear:
        monkeypatch.setattr(bootstrap, "EXACT_AUC_BUDGET", 0)
    a, _, _ = runs
    r = paired_comparison(a, a, "target", EvalConfig(bootstrap_samples=50))
    assert r["auc_a"] == r["auc_b"] and r["gauc_a"] == r["gauc_b"]
    assert r["auc_diff"] == 0.0 and r["gauc_diff"] == 0.0
    assert r["auc_diff_ci"] == [0.0, 0.0] and r["gauc_diff_ci"] == [0.0, 0.0]
    assert r["samples"] == 50 and r["confidence"] == 0.95 and r["entity"] == "target"


def test_paired_better_run(runs, tmp_path):
    a, b, base = runs
    cfg = EvalConfig(bootstrap_samples=100, partitions=3)
    r = paired_comparison(a, b, "target", cfg)
    m_a, m_b = compute_metrics(a, cfg)["target"], compute_metrics(b, cfg)["target"]
    assert r["rows"] == m_a["rows"] == int((base["entity"] == "target").sum())
    assert (r["auc_a"], r["auc_b"], r["gauc_a"], r["gauc_b"]) == (m_a["auc"], m_b["auc"], m_a["gauc"], m_b["gauc"])
    assert r["auc_diff"] == m_b["auc"] - m_a["auc"] > 0
    for name in ("auc", "gauc"):
        lo, hi = r[f"{name}_diff_ci"]
        assert 0 < lo <= r[f"{name}_diff"] <= hi
        # The paired interval is narrower than the two runs' own intervals added up.
        assert hi - lo < (m_a[f"{name}_ci"][1] - m_a[f"{name}_ci"][0]) + (m_b[f"{name}_ci"][1] - m_b[f"{name}_ci"][0])
    # Out of core: the same answer.
    assert paired_comparison(a, b, "target", cfg, spill_dir=str(tmp_path)) == r
    # Reversed runs: negated differences.
    rev = paired_comparison(b, a, "target", cfg)
    assert rev["auc_diff"] == -r["auc_diff"] and rev["auc_diff_ci"][1] < 0


def test_paired_mismatched_rows(runs, tmp_path):
    a, _, base = runs
    flipped = base.copy()
    i = int(np.flatnonzero(base["entity"].to_numpy() == "target")[5])
    flipped.loc[i, "label"] = 1.0 - flipped.loc[i, "label"]
    with pytest.raises(ValueError, match=r"not on the same rows: 'target' row 5 .*label"):
        paired_comparison(a, write_parts(flipped, tmp_path / "flipped"), "target", EvalConfig())
    shorter = base.drop(index=i)
    with pytest.raises(ValueError, match=r"not on the same rows: .* has \d+ 'target' rows, .* has \d+"):
        paired_comparison(a, write_parts(shorter, tmp_path / "shorter"), "target", EvalConfig())
    # The same rows over a different number of rank files are still the same rows.
    r = paired_comparison(a, write_parts(pq.read_table(a).to_pandas(), tmp_path / "three", parts=3), "target",
                          EvalConfig(bootstrap_samples=5))
    assert r["auc_diff"] == 0.0
    with pytest.raises(ValueError, match="entity must be one of"):
        paired_comparison(a, a, "post", EvalConfig())
    src_only = base[base["entity"] == "source"]
    d = write_parts(src_only, tmp_path / "src")
    with pytest.raises(ValueError, match="no 'target' rows"):
        paired_comparison(d, d, "target", EvalConfig())


def test_exact_sums_by_group_add_up_exactly():
    rng = np.random.default_rng(3)
    v = np.concatenate([rng.random(5000) * 10.0 ** rng.integers(-30, 3, 5000), [0.0, 5e-324, 1e300]])
    g = rng.integers(0, 7, v.shape[0])
    sums = exact.exact_sums_by(v, g, 7)
    for k in range(7):
        assert sums[k] == exact.exact_sum(v[g == k])  # exact: equal Fractions, not just close
    halves = [exact.exact_sums_by(v[s], g[s], 7) for s in (slice(0, 2000), slice(2000, None))]
    assert [a + b for a, b in zip(*halves)] == sums
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        exact.exact_sums_by(v, g + 1, 7)
    with pytest.raises(ValueError, match=">= 0"):
        exact.exact_sums_by([-1.0], [0], 1)
