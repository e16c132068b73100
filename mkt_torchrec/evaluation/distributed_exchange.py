"""Exchange files between the ranks of :func:`~mkt_torchrec.evaluation.distributed_metrics.compute_metrics_distributed`.

Each rank writes, under ``<root>/rank-<r>/``, raw binary files: chunk after chunk, and inside a chunk column after
column with the rows grouped by destination (:class:`Writer`). The row counts per destination of each chunk travel
with the next all-gather; a rank then reads only its destinations' slices (seek + read) from every rank's files
(:class:`Reader`). A file is written under a ``.tmp`` name and renamed when complete; :class:`ExchangeDir` keeps
track of a rank's files and removes them at the end, also on errors.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Columns", "Writer", "Reader", "concat_pieces", "ExchangeDir"]

# (name, dtype) of each column of an exchange file, in file order.
Columns = Sequence[Tuple[str, Any]]


class Writer:
    """Rows appended in chunks, each grouped by destination; complete only once :meth:`close` renamed it."""

    def __init__(self, path: str, columns: Columns, n_dest: int) -> None:
        self.path, self.columns, self.n_dest = path, list(columns), n_dest
        self.chunks: List[np.ndarray] = []
        self._file = open(path + ".tmp", "wb")

    def append(self, dest: np.ndarray, arrays: Dict[str, np.ndarray]) -> None:
        """Append rows (``arrays``: one (n,) array per column) with their (n,) destinations as one chunk."""
        if dest.shape[0] == 0:
            return
        d = dest.astype(np.int16) if self.n_dest < 2**15 else dest  # int16: numpy's stable sort is a radix sort
        order = np.argsort(d, kind="stable")
        for name, dtype in self.columns:
            np.ascontiguousarray(arrays[name][order], dtype=dtype).tofile(self._file)
        self.chunks.append(np.bincount(dest, minlength=self.n_dest).astype(np.int64))

    def close(self) -> List[np.ndarray]:
        """Finish the file; returns the row counts per destination of each chunk (what readers need)."""
        self._file.close()
        os.replace(self.path + ".tmp", self.path)
        return self.chunks

    def abandon(self) -> None:
        """Close the unfinished file (cleanup)."""
        self._file.close()


class Reader:
    """One destination's rows of a file written by :class:`Writer` (given its chunks' counts)."""

    def __init__(self, path: str, columns: Columns, chunks: Sequence[np.ndarray]) -> None:
        self.path, self.columns = path, list(columns)
        self.sizes = [np.dtype(dt).itemsize for _, dt in self.columns]
        self.starts = [np.concatenate([[0], np.cumsum(c)]) for c in chunks]
        totals = [int(c.sum()) for c in chunks]
        self.offsets = np.concatenate([[0], np.cumsum(totals)]) * sum(self.sizes)
        self.totals = totals

    def rows(self, d: int) -> int:
        """Destination ``d``'s rows in the file."""
        return sum(int(s[d + 1] - s[d]) for s in self.starts)

    def pieces(self, d: int, max_rows: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
        """Destination ``d``'s rows, in pieces of at most ``max_rows`` (default: one piece per chunk)."""
        if self.rows(d) == 0:
            return
        with open(self.path, "rb") as f:
            for starts, total, base in zip(self.starts, self.totals, self.offsets):
                lo, hi = int(starts[d]), int(starts[d + 1])
                step = max_rows or max(1, hi - lo)
                for a in range(lo, hi, step):
                    b = min(hi, a + step)
                    out, col = {}, int(base)
                    for (name, dtype), size in zip(self.columns, self.sizes):
                        f.seek(col + a * size)
                        out[name] = np.fromfile(f, dtype=dtype, count=b - a)
                        if out[name].shape[0] != b - a:
                            raise OSError(f"{self.path}: truncated exchange file (column {name!r})")
                        col += total * size
                    yield out


def concat_pieces(pieces: Sequence[Dict[str, np.ndarray]], columns: Columns) -> Dict[str, np.ndarray]:
    """Pieces read by :meth:`Reader.pieces` as one piece (empty columns when there are none)."""
    if not pieces:
        return {name: np.zeros(0, dtype=dt) for name, dt in columns}
    return {name: np.concatenate([p[name] for p in pieces]) for name, _ in columns}


class ExchangeDir:
    """One rank's view of the exchange directory ``root``: its own ``rank-<r>`` subdirectory and writers.

    Args:
        root: the exchange directory every rank shares.
        rank: this rank.
        world: the number of ranks.
    """

    def __init__(self, root: str, rank: int, world: int) -> None:
        self.root, self.rank, self.world = root, rank, world
        self.mine = os.path.join(root, f"rank-{rank:05d}")
        self.writers: List[Writer] = []

    def create(self) -> None:
        """Make the shared directory and this rank's own."""
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(self.mine, exist_ok=True)

    def writer(self, name: str, columns: Columns, n_dest: int) -> Writer:
        """A new file ``name`` of this rank, for ``n_dest`` destinations."""
        w = Writer(os.path.join(self.mine, name), columns, n_dest)
        self.writers.append(w)
        return w

    def readers(self, name: str, columns: Columns, chunks: Sequence[Sequence[np.ndarray]]) -> List[Reader]:
        """A :class:`Reader` of file ``name`` of every rank, given each rank's chunk counts (rank order)."""
        return [Reader(os.path.join(self.root, f"rank-{s:05d}", name), columns, chunks[s]) for s in range(self.world)]

    def remove(self, *names: str) -> None:
        """Remove this rank's files ``names`` (errors ignored: :meth:`cleanup` retries)."""
        for name in names:  # outside a phase: must not raise on one rank only (cleanup() retries)
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.mine, name))

    def cleanup(self) -> None:
        """Remove this rank's files, then the exchange directory if no other rank's files are left."""
        for w in self.writers:
            with contextlib.suppress(OSError):
                w.abandon()
        shutil.rmtree(self.mine, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(self.root)  # succeeds for the last rank to finish
