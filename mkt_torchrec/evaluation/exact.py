"""Exact arithmetic the metrics share: exact sums of float64 values and Mann-Whitney statistics of score ranges.

Sums of float terms (``n_u AUC_u`` for GAUC, log-loss terms, scores) are computed exactly, as
:class:`~fractions.Fraction`, by splitting every value into integer *limbs* of 24 bits on a common scale
(:func:`exact_sum`, :func:`exact_sums_by`, :func:`exact_weighted_sums`). Sums of parts therefore add up
exactly, whatever the order of the values or how they are split (partitions, ranks), and each result is
rounded once at the end. :func:`mw_concat` joins the Mann-Whitney statistics of consecutive score ranges in
integers.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Callable, List, Sequence, Tuple

import numpy as np

__all__ = ["exact_sum", "exact_sums_by", "exact_weighted_sums", "mw_concat"]

# Weighted exact sums: at most 2**16 entries per block, so that a block's sums of (limb < 2**24) x
# (weight <= 7) stay below 2**43, exact in float64 whatever order the matrix product adds them in; and about
# 2**22 (entry, weight row) products per block (32 MB as float64).
_SUM_BLOCK_USERS = 1 << 16
_SUM_BLOCK_COUNTS = 1 << 22
_LIMB_BITS = 24


def _limb_layout(v: np.ndarray) -> Tuple[int, int]:
    """Non-negative finite float64 values -> ``(e, L)``: every value is ``sum_j limb_j 2**(e + 24 j)`` with
    integer limbs ``0 <= limb_j < 2**24``, ``j < L`` (``L == 0`` when all values are 0)."""
    nz = v[v > 0]
    if nz.shape[0] == 0:
        return 0, 0
    m, ex = np.frexp(nz)  # nz = m 2**ex, 0.5 <= m < 1
    mant = np.ldexp(m, 53).astype(np.int64)  # nz = mant 2**(ex - 53) (subnormals: a multiple of 2**-1074)
    _, low = np.frexp((mant & -mant).astype(np.float64))  # lowest set bit of mant: 2**(low - 1)
    lo = max(int((ex - 54 + low).min()), -1074)
    return lo, -(-(int(ex.max()) - lo) // _LIMB_BITS)


def _limbs(v: np.ndarray, e: int, n_limbs: int) -> np.ndarray:
    """(n,) values -> (L, n) float64 integer limbs (exact: scaling by powers of two, floor, subtraction of the
    leading bits)."""
    out = np.empty((n_limbs, v.shape[0]))
    r = v.astype(np.float64, copy=True)
    for j in range(n_limbs - 1, -1, -1):
        shift = e + _LIMB_BITS * j
        np.floor(np.ldexp(r, -shift), out=out[j])
        r -= np.ldexp(out[j], shift)
    return out


def _dyadic(total: int, e: int) -> Fraction:
    return Fraction(total << e) if e >= 0 else Fraction(total, 1 << -e)


def _check_summable(v: np.ndarray, what: str) -> None:
    if v.shape[0] and not (np.isfinite(v).all() and (v >= 0).all()):
        raise ValueError(f"{what}: values must be finite and >= 0")


def exact_sum(values: Any) -> Fraction:
    """The exact sum of non-negative finite float64 values, as a :class:`~fractions.Fraction`.

    The result does not depend on the order of the values nor on how they are split (sums of parts add up
    exactly), unlike a floating-point sum. Round it once with ``float()`` (correctly rounded).

    Raises:
        ValueError: a negative or non-finite value.

    Example:
        >>> float(exact_sum([0.1] * 10)), sum([0.1] * 10)
        (1.0, 0.9999999999999999)
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    _check_summable(v, "exact_sum")
    e, n_limbs = _limb_layout(v)
    if n_limbs == 0:
        return Fraction(0)
    total = 0
    for s in range(0, v.shape[0], 1 << 20):  # int64 limb sums of 2**20 values stay below 2**44
        sums = _limbs(v[s:s + (1 << 20)], e, n_limbs).astype(np.int64).sum(axis=1)
        total += sum(int(x) << (_LIMB_BITS * j) for j, x in enumerate(sums))
    return _dyadic(total, e)


def exact_sums_by(values: Any, index: Any, n: int) -> List[Fraction]:
    """Exact sums of non-negative finite float64 values by group: ``out[g] = sum(values[index == g])``.

    Like :func:`exact_sum` (one limb layout for all groups, integer limb sums per group), so sums of parts
    add up exactly.

    Args:
        values: (N,) non-negative finite values.
        index: (N,) int group of each value, in ``[0, n)``.
        n: number of groups.

    Returns:
        ``n`` Fractions.

    Example:
        >>> [float(x) for x in exact_sums_by([0.1, 0.2, 0.3], [1, 0, 1], 3)]
        [0.2, 0.4, 0.0]
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    g = np.asarray(index, dtype=np.int64).ravel()
    if v.shape != g.shape:
        raise ValueError(f"exact_sums_by: {v.shape[0]} values but {g.shape[0]} group indices")
    _check_summable(v, "exact_sums_by")
    if g.shape[0] and (g.min() < 0 or g.max() >= n):
        raise ValueError(f"exact_sums_by: group indices must be in [0, {n})")
    e, n_limbs = _limb_layout(v)
    totals = [0] * n
    for s in range(0, v.shape[0], 1 << 20):  # float64 bincounts of 2**20 limbs < 2**24 stay below 2**44: exact
        limbs = _limbs(v[s:s + (1 << 20)], e, n_limbs)
        for j in range(n_limbs):
            sums = np.bincount(g[s:s + (1 << 20)], weights=limbs[j], minlength=n).astype(np.int64)
            for k in np.flatnonzero(sums):
                totals[k] += int(sums[k]) << (_LIMB_BITS * j)
    return [_dyadic(t, e) for t in totals]


def exact_weighted_sums(columns: Sequence[np.ndarray], weights: Callable[[int, int], np.ndarray], rows: int,
                        samples: int) -> List[List[Fraction]]:
    """Exact ``sum_i w_bi v_i`` for each column ``v`` (non-negative finite float64, (rows,)) and weight row ``b``.

    Entries are taken in blocks: the block's limbs times its (samples, block) weights in one float64 matrix
    product (exact: every partial sum is an integer below 2**43), added up in int64.

    Args:
        columns: (rows,) non-negative finite float64 values each.
        weights: ``weights(start, stop)`` -> (samples, stop - start) integer weights in ``[0, 7]`` of entries
            ``start .. stop - 1`` (e.g. bootstrap counts).
        rows: number of entries.
        samples: number of weight rows.

    Returns:
        One list of ``samples`` Fractions per column.
    """
    for c in columns:
        _check_summable(c, "bootstrap sums")
    layouts = [_limb_layout(c) for c in columns]
    acc = [np.zeros((n_limbs, samples), dtype=np.int64) for _, n_limbs in layouts]
    block = max(1, min(_SUM_BLOCK_USERS, _SUM_BLOCK_COUNTS // max(samples, 1)))
    for s in range(0, rows, block):
        w = weights(s, min(rows, s + block)).T.astype(np.float64)  # (block, B)
        for c, (e, n_limbs), a in zip(columns, layouts, acc):
            if n_limbs:
                a += (_limbs(c[s:s + block], e, n_limbs) @ w).astype(np.int64)
    return [[_dyadic(sum(int(a[j, b]) << (_LIMB_BITS * j) for j in range(a.shape[0])), e) for b in range(samples)]
            for a, (e, _) in zip(acc, layouts)]


def mw_concat(lower: Tuple[int, int, int], upper: Tuple[int, int, int]) -> Tuple[int, int, int]:
    """Mann-Whitney statistics ``(twice the numerator, positives, negatives)`` of rows ``lower`` followed by
    rows ``upper`` of strictly higher scores (each upper positive is above every lower negative); exact ints.
    Rows sharing one score are ``(pos * neg, pos, neg)`` (tied pairs count one half)."""
    return lower[0] + upper[0] + 2 * upper[1] * lower[2], lower[1] + upper[1], lower[2] + upper[2]
