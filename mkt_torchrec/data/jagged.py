"""Vectorised helpers for jagged (offsets + values) numpy arrays."""

from __future__ import annotations

import numpy as np


def gather_jagged(starts: np.ndarray, lens: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Concatenate ``values[starts[i] : starts[i] + lens[i]]`` over i, without a Python loop."""
    keep = lens > 0
    s, n = starts[keep].astype(np.int64), lens[keep].astype(np.int64)
    total = int(n.sum())
    if total == 0:
        return values[:0]
    # Index of every output element as a cumulative sum of steps: +1 within a row, and at each row's first
    # element a jump from the previous row's last index to this row's start (one pass, no arange/repeat).
    idx = np.ones(total, dtype=np.int64)
    idx[0] = s[0]
    firsts = np.cumsum(n[:-1])
    idx[firsts] = s[1:] - (s[:-1] + n[:-1] - 1)
    np.cumsum(idx, out=idx)
    return values[idx]


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """(N,) lengths -> (N+1,) int64 offsets."""
    off = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=off[1:])
    return off
