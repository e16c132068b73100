"""Seed-level intervals (evaluation/seed_intervals.py) as the report builds them, on simulated seeds.

Training is replaced by draws: each run's exact metrics are ``mu + test-set effect + seed effect + test-user
effect``. The test-set effect is shared by every run scored on the same rows (it cancels in a paired
difference); the seed effect is each training run's own (initialisation, data order); the test-user effect is
what another sample of test users would change. Two models from the same distribution are a planted null: a
``confidence`` interval should exclude 0 in at most ``1 - confidence`` of the repetitions. The seed-level
Student-t interval does; the pooled user-level bootstrap interval (which sees only the test users) flags most
of them once the seed effect is larger than the test-user one, which is why the report no longer marks
differences with it. A planted effect of a few seed standard deviations is found.

The simulated runs go through the report's own path: :func:`~mkt_torchrec.evaluation.report_runs.usable_pairs`
and :func:`~mkt_torchrec.evaluation.report_runs.seed_difference` on runs whose metrics.json is the draw.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import scipy.stats

from mkt_torchrec.evaluation.bootstrap import Replicates
from mkt_torchrec.evaluation.paired import RunReplicates, pooled_paired_difference
from mkt_torchrec.evaluation.report_flags import base_rate_logloss, flag_cell, model_flags, run_flags
from mkt_torchrec.evaluation.report_runs import Model, Run, seed_difference, usable_pairs
from mkt_torchrec.evaluation.report_tables import overall_table, summarise
from mkt_torchrec.evaluation.seed_intervals import seed_interval, seed_paired_difference, t_quantile, t_sf

CONFIDENCE = 0.95
LEVEL = 1 - CONFIDENCE
REPS = 400
CFG = types.SimpleNamespace(confidence=CONFIDENCE, min_gauc_users=0, bootstrap_samples=200, seed=0)
MU = {"auc": 0.74, "gauc": 0.66, "logloss": 0.45}
SEED_SD = {"auc": 0.006, "gauc": 0.011, "logloss": 0.004}  # seed-to-seed std, as measured on the other machine
TEST_SET_SD = {"auc": 0.01, "gauc": 0.015, "logloss": 0.01}  # shared by every run on the same test rows
USER_SD = 0.002  # a run's own test-user sampling noise (the paired bootstrap's spread)
ROWS = {"rows": 50_000, "users": 2_000, "positives": 9_000}


def _upper(level: float, reps: int) -> float:
    """The largest false-positive rate consistent with ``level``: level + 3 binomial standard errors."""
    return level + 3 * math.sqrt(level * (1 - level) / reps)


def _draw(rng: np.random.Generator, seeds: int, seed_sd: dict, shift: dict | None = None) -> tuple:
    """One repetition: per-seed metrics of a model and the baseline on one test set, and each run's test-user
    deviation of the AUC/GAUC (for the user-level replicates)."""
    shift = shift or {}
    common = {k: rng.normal(0, TEST_SET_SD[k]) for k in MU}
    runs = {}
    for who in ("model", "base"):
        user = {k: rng.normal(0, USER_SD, seeds) for k in ("auc", "gauc")}
        metrics = []
        for s in range(seeds):
            m = {k: MU[k] + common[k] + (shift.get(k, 0.0) if who == "model" else 0.0) + rng.normal(0, seed_sd[k])
                 for k in MU}
            for k in user:
                m[k] += user[k][s]
            metrics.append(m)
        runs[who] = metrics
    return runs["model"], runs["base"]


def _model(name: str, metrics: list) -> Model:
    """A model whose runs' metrics.json target block is the draw (one run per seed, train.seed 0..n-1)."""
    runs = [Run(name, f"/runs/{name}/seed{s}", "tem", "none", {}, {"target": {**ROWS, **m}}, [], seed=s)
            for s, m in enumerate(metrics)]
    return Model(name, "other", runs)


def _report_seed_level(model_metrics: list, base_metrics: list) -> dict:
    """The seed-level result exactly as write_report builds it (no predictions: rows compared by metrics.json)."""
    model, base = _model("M", model_metrics), _model("B", base_metrics)
    return seed_difference(usable_pairs(model, base, "target", {}), "target", CFG)


def _user_level(rng: np.random.Generator, model_metrics: list, base_metrics: list, samples: int = 200) -> dict:
    """The pooled user-level paired bootstrap over the same seed pairs: each run's replicates scatter around its
    metric by the resample effect shared by all runs (same users resampled) plus its own, of USER_SD."""
    shared = {k: rng.normal(0, 0.01, samples) for k in ("auc", "gauc")}

    def reps(m: dict) -> RunReplicates:
        r = {k: m[k] + shared[k] + rng.normal(0, USER_SD, samples) for k in shared}
        return RunReplicates(ROWS["rows"], m["auc"], m["gauc"], ROWS["users"], Replicates(r["auc"], r["gauc"]))

    return pooled_paired_difference([(reps(a), reps(b)) for a, b in zip(model_metrics, base_metrics)], CONFIDENCE)


def _excludes_zero(ci) -> bool:
    return ci is not None and (ci[0] > 0 or ci[1] < 0)


# --------------------------------------------------------------------------------------------------------
# The t quantile and the interval
# --------------------------------------------------------------------------------------------------------


def test_t_quantile_matches_scipy_and_the_textbook_table():
    for df, want in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (29, 2.045)):
        assert t_quantile(0.975, df) == pytest.approx(want, abs=5e-4)
    for df in (1, 2, 3, 5, 10, 30, 100, 999, 1001, 5000, 1e6, 0.5, 2.5):
        for p in (0.6, 0.9, 0.95, 0.975, 0.995, 0.9995, 1 - 1e-6, 0.025, 0.4):
            assert t_quantile(p, df) == pytest.approx(scipy.stats.t.ppf(p, df), rel=1e-9, abs=1e-12), (df, p)
        for t in (0.0, 0.5, 2.0, 10.0, -3.0):
            assert t_sf(t, df) == pytest.approx(scipy.stats.t.sf(t, df), rel=1e-9, abs=1e-15), (df, t)
    assert t_quantile(0.5, 7) == 0.0
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        t_quantile(0.9, 0)


def test_seed_interval_is_mean_plus_minus_t_standard_errors():
    d = [0.004, -0.002, 0.010, 0.001]
    r = seed_interval(d, 0.9)
    half = scipy.stats.t.ppf(0.95, 3) * np.std(d, ddof=1) / 2
    assert r["ci"] == pytest.approx([np.mean(d) - half, np.mean(d) + half], abs=1e-15)
    assert r["n"] == 4 and r["df"] == 3 and not r["excludes_zero"]
    one = seed_interval([0.05], 0.95)  # one seed: no interval, never significant
    assert one["ci"] is None and one["mean"] == 0.05 and one["excludes_zero"] is False
    assert seed_interval([], 0.95)["mean"] is None
    same = seed_interval([0.01, 0.01], 0.95)  # no spread at all: a degenerate interval
    assert same["ci"] == [0.01, 0.01] and same["excludes_zero"]
    # Pairs where a metric is undefined are left out of that metric only.
    r = seed_paired_difference([{"auc": 0.7, "gauc": None}, {"auc": 0.72, "gauc": 0.6}],
                               [{"auc": 0.69, "gauc": 0.5}, {"auc": 0.70, "gauc": 0.58}], 0.95, ("auc", "gauc"))
    assert r["auc"]["n"] == 2 and r["gauc"]["n"] == 1 and r["gauc"]["ci"] is None
    with pytest.raises(ValueError, match="2 model runs for 1"):
        seed_paired_difference([{}, {}], [{}], 0.95)


# --------------------------------------------------------------------------------------------------------
# Planted null, planted effect
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_planted_null_seed_level_false_positive_rate_is_at_most_the_level(seeds):
    """Two models that differ only in their seeds: the seed-level interval excludes 0 in at most 5% (+ 3
    binomial standard errors) of 400 repetitions, for each of AUC, GAUC and log loss."""
    rng = np.random.default_rng(20240229 + seeds)
    hits = {k: 0 for k in MU}
    for _ in range(REPS):
        r = _report_seed_level(*_draw(rng, seeds, SEED_SD))
        assert r["pairs"] == seeds and r["paired_by"] == "seed" and r["left_out"] == []
        for k in MU:
            hits[k] += r[k]["excludes_zero"]
    rates = {k: v / REPS for k, v in hits.items()}
    assert all(rate <= _upper(LEVEL, REPS) for rate in rates.values()), rates


def test_planted_null_user_level_interval_flags_seed_noise():
    """The same kind of nulls (3 seeds), with the pooled user-level bootstrap interval over the same seed
    pairs: when the seed-to-seed spread is several times the test-user noise, that interval excludes 0 in most
    repetitions, while the seed-level interval of the very same draws stays at the level. Without seed noise
    the user-level interval is calibrated: it measures test-user sampling, and only that."""
    rng = np.random.default_rng(7)
    seed_hits = user_hits = 0
    for _ in range(REPS):
        model, base = _draw(rng, 3, SEED_SD)
        seed_hits += _report_seed_level(model, base)["gauc"]["excludes_zero"]
        user_hits += _excludes_zero(_user_level(rng, model, base)["gauc_diff_ci"])
    seed_rate, user_rate = seed_hits / REPS, user_hits / REPS
    assert seed_rate <= _upper(LEVEL, REPS), seed_rate
    assert user_rate >= 0.5, user_rate  # ~0.75 expected: |N(0, 2 (0.011² + 0.002²)/3)| > 1.96 · 0.002 · sqrt(2/3)
    assert user_rate > 5 * seed_rate
    # No seed noise: the user-level interval holds its level (it is right about what it measures).
    quiet_hits = 0
    for _ in range(REPS):
        model, base = _draw(rng, 3, {k: 0.0 for k in MU})
        quiet_hits += _excludes_zero(_user_level(rng, model, base)["gauc_diff_ci"])
    assert quiet_hits / REPS <= _upper(LEVEL, REPS), quiet_hits / REPS


def test_planted_effect_is_found_and_one_seed_is_never_significant():
    """A GAUC gain of 4 seed standard deviations and a log-loss gain of 4 (lower is better), 5 seeds: found in
    at least 90% of the repetitions, with the right sign; AUC, not shifted, stays at the level. With one seed
    nothing is ever marked, however large the effect."""
    rng = np.random.default_rng(11)
    shift = {"gauc": 4 * SEED_SD["gauc"], "logloss": -4 * SEED_SD["logloss"]}
    hits = {k: 0 for k in MU}
    for _ in range(REPS // 2):
        r = _report_seed_level(*_draw(rng, 5, SEED_SD, shift))
        for k in MU:
            hits[k] += r[k]["excludes_zero"]
            if k in shift and r[k]["excludes_zero"]:
                assert np.sign(r[k]["mean"]) == np.sign(shift[k])
    n = REPS // 2
    assert hits["gauc"] / n >= 0.9 and hits["logloss"] / n >= 0.9, hits
    assert hits["auc"] / n <= _upper(LEVEL, n), hits
    for _ in range(20):
        r = _report_seed_level(*_draw(rng, 1, SEED_SD, {"gauc": 0.2}))
        assert r["pairs"] == 1 and not any(r[k]["excludes_zero"] for k in MU)


def test_summary_and_table_mark_only_seed_level_intervals():
    """Through summarise and the overall table: a large planted effect over 3 seeds is starred and coloured; the
    same effect with one seed shows the user-level interval, labelled, without a star or colour."""
    rng = np.random.default_rng(3)
    model_m, base_m = _draw(rng, 3, SEED_SD, {"gauc": 0.1, "auc": 0.1, "logloss": -0.05})
    for seeds in (3, 1):
        model, base = _model("MKT", model_m[:seeds]), _model("MLP", base_m[:seeds])
        pairing = usable_pairs(model, base, "target", {})
        user = {"MKT": _user_level(rng, model_m[:seeds], base_m[:seeds])}
        s = summarise([base, model], base, "target", user, {"MKT": seed_difference(pairing, "target", CFG)}, CFG)
        t = overall_table(s)
        row = t.rows[1]
        for label in ("AUC", "GAUC", "LogLoss"):
            j = t.columns.index(f"Δ {label} 95% CI")
            if seeds == 3:
                assert row[j].endswith(" *") and t.cell_classes[(1, j)] == "pos", (label, row[j])
            else:
                assert "*" not in row[j] and t.cell_classes[(1, j)] == ""
                assert row[j] == ("n/a (1 seed)" if label == "LogLoss" else row[j])
                assert label == "LogLoss" or row[j].endswith("(test-user sampling only, 1 seed)")
        assert s["models"][1]["interval"] == ("seed_level" if seeds == 3 else "user_level")


# --------------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------------


def test_flags_below_chance_and_worse_than_base_rate():
    p = 0.18
    base = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert base_rate_logloss(p) == pytest.approx(base, abs=1e-15)
    assert base_rate_logloss(0.0) == pytest.approx(1e-7, rel=1e-3) and base_rate_logloss(None) is None
    good = {"auc": 0.7, "logloss": base - 0.01, "calibration": {"click_rate": p}}
    assert run_flags(good) == [] and run_flags(None) == []
    bad = {"auc": 0.45, "logloss": base + 0.01, "calibration": {"click_rate": p}}
    assert [f["code"] for f in run_flags(bad)] == ["auc_below_chance", "logloss_above_base_rate"]
    # No calibration block (older metrics.json): the click rate from positives / rows.
    old = {"auc": 0.6, "logloss": base + 0.01, "rows": 1000, "positives": 180}
    assert [f["code"] for f in run_flags(old)] == ["logloss_above_base_rate"]
    assert run_flags({"auc": 0.6, "logloss": 0.9}) == []  # no click rate: no log-loss flag
    flags = model_flags([(0, "r0", good), (1, "r1", bad), (2, "r2", {**good, "auc": 0.49})])
    by = {f["code"]: f for f in flags}
    assert by["auc_below_chance"]["seeds"] == [1, 2] and not by["auc_below_chance"]["all_runs"]
    assert by["logloss_above_base_rate"]["seeds"] == [1]
    assert flag_cell(flags, 3) == "⚠ below chance (AUC < 0.5) (seeds 1, 2); ⚠ worse than base rate (log loss) (seed 1)"
    one = model_flags([(None, "r", bad)])
    assert flag_cell(one, 1) == "⚠ below chance (AUC < 0.5); ⚠ worse than base rate (log loss)"
