"""Tests for mkt_torchrec.evaluation.metrics: exact AUC, GAUC (Eq. 14) and its mergeable statistics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mkt_torchrec.evaluation import metrics
from mkt_torchrec.evaluation.metrics import (
    AUCStats,
    GroupAUCStats,
    UndefinedMetricError,
    auc,
    auc_stats,
    group_auc,
    group_auc_stats,
    partition_by_user,
    per_user_auc,
)

# --------------------------------------------------------------------------------------------------------
# Fixtures / brute-force references
# --------------------------------------------------------------------------------------------------------


def _grouped_data(seed: int, n_users: int = 400, decimals: int = 1):
    """Random rows of many users: unsorted, non-contiguous large int64 ids, ties, 1-row users,
    all-positive and all-negative users. Returns (user_ids, labels, scores, kinds) with kinds[id] a tag."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(-(2**62), 2**62, 2**40 + 7, dtype=np.int64), size=n_users, replace=False)
    ids[:3] = [np.iinfo(np.int64).max, np.iinfo(np.int64).min, 0]
    sizes = rng.integers(1, 16, size=n_users)
    sizes[:20] = 1  # single-impression users (always single-class)
    users = np.repeat(ids, sizes)
    p_click = np.repeat(rng.uniform(0.05, 0.95, size=n_users), sizes)
    labels = (rng.random(users.shape[0]) < p_click).astype(np.int64)
    kinds = {int(u): "mixed" for u in ids}
    # Force some all-positive / all-negative users with several impressions.
    for j in range(20, 35):
        labels[users == ids[j]] = 1
        kinds[int(ids[j])] = "all_pos"
    for j in range(35, 50):
        labels[users == ids[j]] = 0
        kinds[int(ids[j])] = "all_neg"
    # Scores correlated with labels, rounded so that ties within a user are common.
    scores = np.round(0.3 * labels + rng.random(users.shape[0]), decimals)
    perm = rng.permutation(users.shape[0])  # rows of a user are scattered
    return users[perm], labels[perm], scores[perm], kinds


def _brute_force(users, labels, scores):
    """Per-user Python loop over all (positive, negative) pairs. Returns (per_user dict, gauc, mean_auc,
    skipped)."""
    per_user = {}
    for u in np.unique(users):
        m = users == u
        y, s = labels[m], scores[m]
        pos, neg = s[y == 1], s[y == 0]
        num = 0.0
        for a, b in itertools.product(pos.tolist(), neg.tolist()):
            num += 1.0 if a > b else 0.5 if a == b else 0.0
        per_user[int(u)] = (int(m.sum()), int((y == 1).sum()), num)
    evaluated = [(n, num / (p * (n - p))) for n, p, num in per_user.values() if 0 < p < n]
    w = np.array([n for n, _ in evaluated], dtype=np.float64)
    a = np.array([x for _, x in evaluated])
    skipped = len(per_user) - len(evaluated)
    return per_user, float((w * a).sum() / w.sum()), float(a.mean()), skipped


# --------------------------------------------------------------------------------------------------------
# Global AUC
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_continuous(seed):
    rng = np.random.default_rng(seed)
    n = 2000
    y = rng.integers(0, 2, n)
    s = rng.normal(size=n) + 0.7 * y
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auc(y, s.astype(np.float32)) == pytest.approx(roc_auc_score(y, s.astype(np.float32)), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_with_many_ties(seed):
    rng = np.random.default_rng(100 + seed)
    n = 3000
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n) + 0.2 * y, 1)  # ~13 distinct values
    assert np.unique(s).shape[0] < 20
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # float32 / integer scores (packed-key path), bool / float labels.
    s32 = s.astype(np.float32)
    assert auc(y, s32) == pytest.approx(roc_auc_score(y, s32), abs=1e-12)
    si = (s * 10).astype(np.int64)
    assert auc(y.astype(bool), si) == pytest.approx(roc_auc_score(y, si), abs=1e-12)
    assert auc(y.astype(np.float32), s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_ties_get_half_credit():
    assert auc([0, 1], [0.3, 0.3]) == 0.5
    assert auc([0, 0, 1, 1], [0.5] * 4) == 0.5
    # 1 pos at 0.5 vs negs at 0.5 (tie) and 0.1 (win): (0.5 + 1) / 2
    assert auc([1, 0, 0], [0.5, 0.5, 0.1]) == 0.75


def test_scores_distinct_in_input_dtype_are_not_tied():
    # Distinct int64 / float64 scores that round to one float32 must stay distinct (no packed-key path).
    big = np.array([2**40 + 1, 2**40, 2**40 + 1, 2**40], dtype=np.int64)
    assert auc([1, 0, 1, 0], big) == 1.0
    assert auc([1, 0], np.array([1.0 + 1e-12, 1.0])) == 1.0
    assert group_auc([5, 5, 6, 6], [1, 0, 0, 1], big).gauc == 0.5  # user 5: 1.0, user 6: 0.0


@pytest.mark.parametrize("seed", range(4))
def test_weighted_auc_matches_sklearn(seed):
    rng = np.random.default_rng(200 + seed)
    n = 2000
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n) + 0.3 * y, 1)
    w = rng.exponential(size=n)
    w[rng.random(n) < 0.1] = 0.0
    assert auc(y, s, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-12)
    # Unit weights equal the unweighted AUC.
    assert auc(y, s, np.ones(n)) == pytest.approx(auc(y, s), abs=1e-15)


def test_auc_stats_merge_is_exact():
    rng = np.random.default_rng(7)
    n = 5000
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n) + 0.2 * y, 2)
    full = auc_stats(y, s)
    cuts = np.sort(rng.choice(n, size=6, replace=False))
    parts = [auc_stats(yy, ss) for yy, ss in zip(np.split(y, cuts), np.split(s, cuts))]
    merged = AUCStats.merge(parts + [auc_stats([], [])])
    np.testing.assert_array_equal(merged.scores, full.scores)
    np.testing.assert_array_equal(merged.pos, full.pos)
    np.testing.assert_array_equal(merged.neg, full.neg)
    assert merged.result() == full.result() == auc(y, s)
    assert full.result() == pytest.approx(roc_auc_score(y, s), abs=1e-12)


# --------------------------------------------------------------------------------------------------------
# GAUC
# --------------------------------------------------------------------------------------------------------


# float64 with 1 decimal (0.1, 0.3, ...) is not float32-exact -> lexsort path; the others -> packed-key path.
SCORE_DTYPES = ["float64", "float32", "float64_of_float32", "int"]


def _cast_scores(scores: np.ndarray, kind: str) -> np.ndarray:
    if kind == "float64":
        return scores
    if kind == "float32":
        return scores.astype(np.float32)
    if kind == "float64_of_float32":
        return scores.astype(np.float32).astype(np.float64)
    return np.round(scores * 10).astype(np.int64) - 5  # negative ints too


@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("seed", range(2))
def test_gauc_matches_brute_force(seed, dtype):
    users, labels, scores, kinds = _grouped_data(seed)
    scores = _cast_scores(scores, dtype)
    fast = metrics._as_float32_exact(scores) is not None
    assert fast == (dtype != "float64")  # both code paths are exercised
    per_user, gauc_ref, mean_ref, skipped_ref = _brute_force(users, labels, scores)

    st = group_auc_stats(users, labels, scores)
    assert st.user_ids.dtype == np.int64
    assert np.all(np.diff(st.user_ids) > 0)
    assert set(st.user_ids.tolist()) == set(per_user)
    for uid, n_u, p_u, num in zip(st.user_ids.tolist(), st.impressions, st.positives, st.numerator):
        assert (n_u, p_u, num) == per_user[uid], uid  # exact, including half-integers from ties

    r = st.result()
    assert r.gauc == pytest.approx(gauc_ref, abs=1e-12)
    assert r.mean_user_auc == pytest.approx(mean_ref, abs=1e-12)
    assert r.gauc != pytest.approx(r.mean_user_auc, abs=1e-6)  # the two definitions really differ here
    assert r.users == len(per_user) == len(kinds)
    assert r.users_skipped_single_class == skipped_ref
    assert r.users_evaluated + r.users_skipped_single_class == r.users
    forced = sum(k != "mixed" for k in kinds.values())
    assert r.users_skipped_single_class >= forced + 20  # forced single-class users and 1-row users
    assert r.rows == users.shape[0]
    assert r.impressions_evaluated == sum(n for n, p, _ in per_user.values() if 0 < p < n)
    assert group_auc(users, labels, scores) == r
    assert r.to_dict()["gauc"] == r.gauc


def test_gauc_matches_sklearn_per_user():
    users, labels, scores, _ = _grouped_data(11, n_users=150, decimals=2)
    ids, auc_u, n_u = per_user_auc(group_auc_stats(users, labels, scores))
    ref = []
    for u in ids:
        m = users == u
        ref.append(roc_auc_score(labels[m], scores[m]))
        assert n_u[len(ref) - 1] == m.sum()
    np.testing.assert_allclose(auc_u, ref, rtol=0, atol=1e-12)
    r = group_auc(users, labels, scores)
    assert r.gauc == pytest.approx(np.average(ref, weights=n_u), abs=1e-12)


def test_per_user_auc_include_skipped():
    st = group_auc_stats([3, 3, 9, 5, 5], [1, 0, 1, 0, 0], [0.2, 0.1, 0.4, 0.3, 0.3])
    ids, a, n = per_user_auc(st, include_skipped=True)
    assert ids.tolist() == [3, 5, 9]
    assert a[0] == 1.0 and np.isnan(a[1]) and np.isnan(a[2])
    assert n.tolist() == [2, 2, 1]
    ids, a, n = per_user_auc(st)
    assert ids.tolist() == [3] and a.tolist() == [1.0] and n.tolist() == [2]


def test_gauc_identical_scores_and_row_order_invariance():
    users, labels, scores, _ = _grouped_data(5, n_users=200)
    # All-equal scores: every evaluated user has AUC exactly 0.5.
    r = group_auc(users, labels, np.zeros(users.shape[0], np.float32))
    assert r.gauc == 0.5 and r.mean_user_auc == 0.5
    # Permuting rows does not change any statistic.
    a = group_auc_stats(users, labels, scores)
    perm = np.random.default_rng(0).permutation(users.shape[0])
    b = group_auc_stats(users[perm], labels[perm], scores[perm])
    for f in ("user_ids", "impressions", "positives", "numerator"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_uint64_and_int32_user_ids():
    y, s = np.array([1, 0, 0, 1]), np.array([0.9, 0.1, 0.5, 0.2])
    r64 = group_auc(np.array([2**63 - 1, 2**63 - 1, 4, 4], dtype=np.uint64), y, s)
    r32 = group_auc(np.array([7, 7, 4, 4], dtype=np.int32), y, s)
    assert r64 == r32
    assert r64.gauc == 0.5  # user A: 1.0, user B: 0.0
    with pytest.raises(ValueError, match="2\\*\\*63"):
        group_auc_stats(np.array([2**63, 1], dtype=np.uint64), [1, 0], [0.1, 0.2])


def _tricky_float32(rng, n):
    """float32 scores with negatives, -0.0/+0.0, subnormals, huge values and many ties."""
    pool = np.array(
        [-3.4e38, -1e10, -2.5, -1.0, -1e-40, -0.0, 0.0, 1e-45, 1e-40, 1e-7, 0.1, 0.5, 1.0, 2.5, 1e10, 3.4e38],
        dtype=np.float32,
    )
    return np.concatenate([pool, rng.choice(pool, n - pool.shape[0])])


def test_sortable32_roundtrip_and_order():
    rng = np.random.default_rng(4)
    s = np.concatenate([_tricky_float32(rng, 100), rng.normal(scale=1e3, size=1000).astype(np.float32)])
    k = metrics.sortable32(s)
    assert k.min() >= 0 and k.max() < 2**32
    np.testing.assert_array_equal(metrics._unsortable32(k), s + np.float32(0.0))
    o = np.argsort(k, kind="stable")
    assert np.all(np.diff(s[o]) >= 0)  # same order as the floats
    # Equal floats <=> equal keys (in particular -0.0 and +0.0).
    np.testing.assert_array_equal(k[:, None] == k[None, :], s[:, None] == s[None, :])


def test_fast_and_general_paths_agree(monkeypatch):
    rng = np.random.default_rng(9)
    n = 4000
    s = _tricky_float32(rng, n)
    y = rng.integers(0, 2, n)
    users = rng.integers(-50, 50, n) * (2**55)
    fast_auc = auc_stats(y, s)
    fast_g = group_auc_stats(users, y, s)
    assert fast_auc.scores.dtype == np.float32
    monkeypatch.setattr(metrics, "_as_float32_exact", lambda _s: None)
    slow_auc = auc_stats(y, s)
    slow_g = group_auc_stats(users, y, s)
    np.testing.assert_array_equal(fast_auc.scores, slow_auc.scores)
    np.testing.assert_array_equal(fast_auc.pos, slow_auc.pos)
    np.testing.assert_array_equal(fast_auc.neg, slow_auc.neg)
    for f in ("user_ids", "impressions", "positives", "numerator"):
        np.testing.assert_array_equal(getattr(fast_g, f), getattr(slow_g, f))
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s.astype(np.float64)), abs=1e-12)  # f64: no overflow in sklearn


# --------------------------------------------------------------------------------------------------------
# Partition invariance and merge
# --------------------------------------------------------------------------------------------------------


def _split_by(part, k, users, labels, scores):
    return [
        group_auc_stats(users[part == i], labels[part == i], scores[part == i], allow_empty=True) for i in range(k)
    ]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("k", [1, 2, 3, 7, 64])
def test_partition_invariance(k, dtype):
    users, labels, scores, _ = _grouped_data(21, n_users=500)
    scores = _cast_scores(scores, dtype)
    one_shot = group_auc_stats(users, labels, scores)
    ref = one_shot.result()
    py_hash = np.array([hash(int(u)) % k for u in users])
    for part in (partition_by_user(users, k), py_hash):
        merged = GroupAUCStats.merge(_split_by(part, k, users, labels, scores)[::-1])  # order of parts irrelevant
        for f in ("user_ids", "impressions", "positives", "numerator"):
            np.testing.assert_array_equal(getattr(merged, f), getattr(one_shot, f))
        r = merged.result()
        assert abs(r.gauc - ref.gauc) <= 1e-12
        assert abs(r.mean_user_auc - ref.mean_user_auc) <= 1e-12
        assert (r.users, r.users_evaluated, r.users_skipped_single_class, r.impressions_evaluated, r.rows) == (
            ref.users,
            ref.users_evaluated,
            ref.users_skipped_single_class,
            ref.impressions_evaluated,
            ref.rows,
        )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_internal_chunking_gives_identical_stats(monkeypatch, dtype):
    users, labels, scores, _ = _grouped_data(8, n_users=600)
    scores = _cast_scores(scores, dtype)
    one = group_auc_stats(users, labels, scores)
    monkeypatch.setattr(metrics, "_CHUNK_ROWS", 97)  # ~50 chunks
    chunked = group_auc_stats(users, labels, scores)
    for f in ("user_ids", "impressions", "positives", "numerator"):
        np.testing.assert_array_equal(getattr(chunked, f), getattr(one, f))
    assert chunked.result() == one.result()


def test_partition_by_user_is_deterministic_and_spread():
    ids = np.arange(10_000, dtype=np.int64) * 1_000_003
    p = partition_by_user(ids, 8)
    np.testing.assert_array_equal(p, partition_by_user(ids.copy(), 8))
    counts = np.bincount(p, minlength=8)
    assert counts.min() > 1000  # roughly uniform (expected 1250 each)
    with pytest.raises(ValueError, match="num_partitions"):
        partition_by_user(ids, 0)


def test_merge_overlapping_user_raises():
    users, labels, scores, _ = _grouped_data(3, n_users=100)
    half = users.shape[0] // 2  # split by row, not by user: users straddle the cut
    a = group_auc_stats(users[:half], labels[:half], scores[:half])
    b = group_auc_stats(users[half:], labels[half:], scores[half:])
    with pytest.raises(ValueError, match="more than one partial"):
        GroupAUCStats.merge([a, b])
    with pytest.raises(ValueError, match="more than one partial"):
        GroupAUCStats.merge([a, a])


def test_merge_of_nothing_and_empty_partitions():
    assert GroupAUCStats.merge([]).num_users == 0
    e = group_auc_stats([], [], [], allow_empty=True)
    assert e.num_users == 0 and e.rows == 0
    st = group_auc_stats([1, 1], [1, 0], [0.4, 0.2])
    merged = GroupAUCStats.merge([e, st, e])
    assert merged.result() == st.result()
    with pytest.raises(UndefinedMetricError):
        e.result()


# --------------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_raise(bad):
    y = np.array([0, 1, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    s[3] = bad
    s32 = s.astype(np.float32)
    for fn in (lambda: auc(y, s), lambda: auc(y, s32), lambda: auc_stats(y, s)):
        with pytest.raises(ValueError, match=r"1 non-finite value\(s\).*first at index 3"):
            fn()
    with pytest.raises(ValueError, match="non-finite"):
        group_auc_stats([1, 1, 2, 2, 2], y, s)
    s[0] = np.nan
    with pytest.raises(ValueError, match=r"2 non-finite value\(s\).*first at index 0"):
        auc(y, s)


def test_empty_input_raises():
    with pytest.raises(ValueError, match="empty"):
        auc([], [])
    with pytest.raises(ValueError, match="empty"):
        group_auc_stats(np.array([], np.int64), np.array([]), np.array([]))
    with pytest.raises(ValueError, match="empty"):
        group_auc([], [], [])


def test_single_class_raises():
    with pytest.raises(UndefinedMetricError, match="single class"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="single class"):
        auc([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="single class"):
        auc([0, 1, 1], [0.1, 0.2, 0.3], weights=[0.0, 1.0, 2.0])  # the only negative has weight 0
    # Every user single-class: GAUC undefined.
    with pytest.raises(UndefinedMetricError, match="none of the 2 user"):
        group_auc([1, 1, 2], [1, 1, 0], [0.1, 0.2, 0.3])


def test_bad_labels_lengths_and_types_raise():
    with pytest.raises(ValueError, match=r"labels must be 0 or 1.*first at index 1"):
        auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        auc([0, np.nan, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        group_auc_stats([1, 1, 1], [0, -1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="length mismatch"):
        auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="length mismatch"):
        auc([0, 1], [0.1, 0.2], weights=[1.0])
    with pytest.raises(ValueError, match="length mismatch"):
        group_auc_stats([1, 2], [0, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="1-D"):
        auc([[0, 1]], [[0.1, 0.2]])
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        auc([0, 1], [0.1, 0.2], weights=[1.0, -1.0])
    with pytest.raises(TypeError, match="integer"):
        group_auc_stats([1.5, 2.5], [0, 1], [0.1, 0.2])
    with pytest.raises(TypeError, match="scores"):
        auc([0, 1], ["a", "b"])
