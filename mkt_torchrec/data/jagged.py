"""Vectorised helpers for jagged (offsets + values) numpy arrays."""

from __future__ import annotations

import numpy as np


def gather_jagged(starts: np.ndarray, lens: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Concatenate ``values[starts[i] : starts[i] + lens[i]]`` over i, without a Python loop."""
    total = int(lens.sum())
    if total == 0:
        return values[:0]
    out_start = np.cumsum(lens)
    out_start -= lens
    idx = np.repeat(starts - out_start, lens)  # (total,) per element: start of its row minus its output start
    idx += np.arange(total, dtype=np.int64)
    return values[idx]


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """(N,) lengths -> (N+1,) int64 offsets."""
    off = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=off[1:])
    return off
