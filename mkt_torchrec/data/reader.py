"""Streaming Parquet -> :class:`Batch` reader with exact, balanced and resumable sharding.

An epoch's *row sequence* is the split's row groups in the epoch's order (shuffled with ``seed + epoch`` when
training), numbered ``0 .. N-1``. A reader of one entity (``entity="target"``, stage 2) takes only that entity's
row groups (a format-2 dataset's row groups are entity-pure, :mod:`mkt_torchrec.data.dataset`), so it never reads
or decodes a row of the other entity and ``N`` is the entity's row count. The splits ``train`` and ``valid`` are
cut from the train files by ``data.validation_fraction`` (:meth:`~mkt_torchrec.data.dataset.Manifest.split_units`):
their units are whole row groups except, for each entity, the one the cut falls in, of which each split reads its
part; everything below holds for them unchanged. The rows are dealt to
``world_size * max(1, num_workers)`` *slots* in contiguous shares of equal size (to one row: a row group is split
between two slots where a share ends inside it), so every rank reads the same number of rows, a split with fewer
row groups than ranks still feeds every rank, and across all ranks and workers every row is read exactly once per
epoch. A slot reads its share in *windows* of at most ``shuffle_window_rows`` rows: each window is read (only the
needed columns), permuted with a seed of (seed, epoch, window start, window end), its ids mapped to table rows and
its sequences truncated to ``max_len``. Batches are cut from the stream of windows (a batch may span two windows);
only a slot's last batch may be short.

A window is ``[a, b, k0, k1]``: positions ``k0 .. k1-1`` of rows ``a .. b-1`` taken in the window's order. Every
row of the sequence is yielded, so all of this is known from the manifest without reading data. A slot's position
is ``(window, offset)``. :meth:`ParquetReader.state_dict` holds every slot's windows and position plus which worker
yields next, so a resumed run yields exactly the batches an uninterrupted one would have. A run restarted at
another world size or worker count loads the states of *all* saved ranks: the windows no old slot has finished are
cut and dealt to the new slots in equal shares (``_resplit``), so the epoch continues with no row read twice or
skipped.

**Step schedule.** With ``num_workers`` W > 0 a rank's batches come from its W slots through a DataLoader, which
asks its workers in turn, starting at the saved rotation and skipping a worker once it is exhausted; with W = 0
the one slot yields them in order. So the length of every batch every rank will yield is a function of the
layout (every rank's windows, positions and rotation) alone: :meth:`ParquetReader.step_rows` gives, for each
remaining step of the epoch, the rows all ranks train together, without I/O or communication.

Memory is bounded by one window (its Arrow rows and their decoded arrays, plus one cached row group) per slot:
about 1.5 KB per row of ``shuffle_window_rows`` at peak with sequences of length 50. Training warns once (logger
``mkt.data``) when a row group is larger than the window, since rows then mix only within a row group.

Example:
    >>> reader = ParquetReader("data/ds", "train", cfg.schema, cfg.data)   # doctest: +SKIP
    >>> for batch in reader: ...
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mkt_torchrec import storage
from mkt_torchrec.config import DataConfig, SchemaConfig
from mkt_torchrec.data.batch import Batch
from mkt_torchrec.data.dataset import (TRAIN_SPLIT, VALID_SPLIT, Manifest, RowRange, check_entity_readable,
                                       check_split_readable, open_dataset, physical_split)
from mkt_torchrec.data.jagged import gather_jagged, offsets_of
from mkt_torchrec.data.relations import RelationTable, related_items
from mkt_torchrec.data.schema import map_ids

STATE_VERSION = 2
ENTITY_NAMES = {None: None, 0: "source", 1: "target"}

logger = logging.getLogger("mkt.data")
_warned_windows: set[tuple[str, int]] = set()  # (dataset, window rows) already warned about


# --------------------------------------------------------------------------------------------------------
# Columnar window: a few row groups, decoded to numpy, ids mapped, rows permuted
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Window:
    """Decoded rows of one window. Jagged keys are stored as (lengths, offsets, values)."""

    n: int
    lengths: list[np.ndarray]  # per sparse key: (N,) int64
    offsets: list[np.ndarray]  # per sparse key: (N+1,) int64
    values: list[np.ndarray]  # per sparse key: flat int64 table rows
    dense: np.ndarray  # (N, F_dense) float32
    labels: np.ndarray  # (N,) float32
    entity: np.ndarray  # (N,) int64
    user_id: np.ndarray  # (N,) int64
    true_prob: Optional[np.ndarray]
    activity: Optional[np.ndarray]




class _Decoder:
    """Turns an Arrow table of dataset rows into a permuted :class:`_Window`; with ``related``, the last sparse key
    is its key, derived from each row's item (``mkt_torchrec.data.relations``)."""

    def __init__(self, schema: SchemaConfig, optional_columns: list[str],
                 related: Optional[RelationTable] = None) -> None:
        self.schema = schema
        self.related = related
        self.keys = schema.sparse_keys + ([related.key] if related is not None else [])
        self.tables = [schema.table_of(k) for k in schema.sparse_keys]
        self.max_len = [schema.max_len_of(k) for k in schema.sparse_keys]
        self.aligned = {c: schema.sequence_of(c) for c in schema.side_keys}  # side column -> its sequence
        self.optional = [c for c in ("true_prob", "activity") if c in optional_columns]
        self.columns = ["entity", "label"] + schema.sparse_keys + list(schema.dense) + self.optional

    def decode(self, t: pa.Table, order: np.ndarray, locate: Callable[[int], tuple[str, int]]) -> _Window:
        """Decode rows ``order`` (indices into ``t``, in that order) of ``t``; ``locate(i)`` names the file, row
        group and row of row ``i`` of ``t`` for error messages."""
        n = len(order)
        where = locate(0)[0] if t.num_rows else "(empty window)"
        lengths, offsets, values = [], [], []
        steps: dict[str, np.ndarray] = {}  # sequence -> (rows of t,) its untruncated lengths
        for key, table_name, max_len in zip(self.schema.sparse_keys, self.tables, self.max_len, strict=True):
            col = t.column(key)
            arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
            if max_len is None:  # single-valued, nullable
                if arr.null_count == len(arr):  # the other entity's feature in an entity-pure row group
                    lens = np.zeros(n, dtype=np.int64)
                    vals = np.zeros(0, dtype=np.int64)
                elif arr.null_count:
                    valid = arr.is_valid().to_numpy(zero_copy_only=False)
                    raw = arr.fill_null(0).to_numpy()
                    lens = valid.astype(np.int64)[order]
                    vals = raw[order][valid[order]]
                else:
                    lens = np.ones(n, dtype=np.int64)
                    vals = arr.to_numpy()[order]
            else:  # list<int64>: keep the last max_len elements
                if arr.null_count:
                    place, row = locate(int(np.flatnonzero(~arr.is_valid().to_numpy(zero_copy_only=False))[0]))
                    raise ValueError(f"{place}: column {key!r} row {row}: null sequence (use an empty list)")
                off = arr.offsets.to_numpy()
                mine = arr.values.slice(int(off[0]), int(off[-1] - off[0]))  # .values ignores a slice
                if mine.null_count:  # offsets index the values: find the row holding the first null
                    first = int(off[0]) + int(np.flatnonzero(~mine.is_valid().to_numpy(zero_copy_only=False))[0])
                    place, row = locate(int(np.searchsorted(off, first, side="right")) - 1)
                    raise ValueError(f"{place}: column {key!r} row {row}: a null inside the sequence (drop it, or "
                                     "map it to an id)")
                if key in self.aligned:  # a side column: one value per step of its sequence
                    self._check_aligned(key, np.diff(off), steps[self.aligned[key]], locate)
                else:
                    steps[key] = np.diff(off)
                flat = arr.values.to_numpy()
                end = off[1:]
                start = np.maximum(off[:-1], end - max_len)
                lens = (end - start)[order]
                vals = gather_jagged(start[order], lens, flat)
            tbl = self.schema.tables[table_name]
            try:
                vals = map_ids(vals, table_name, tbl)
            except ValueError as e:
                raise ValueError(f"{where}: column {key!r}: {e}") from None
            lengths.append(lens)
            offsets.append(offsets_of(lens))
            values.append(vals)
        if self.related is not None:  # the related source items of each target row's item
            item = t.column(self.related.item_feature).combine_chunks()
            target = (t.column("entity").combine_chunks().fill_null(0).to_numpy(zero_copy_only=False) == 1) \
                & item.is_valid().to_numpy(zero_copy_only=False)
            lens, vals = self.related.lookup(item.fill_null(0).to_numpy()[order], target[order])
            lengths.append(lens)
            offsets.append(offsets_of(lens))
            values.append(vals)
        dense_cols = [t.column(c).combine_chunks().fill_null(0).to_numpy().astype(np.float32)
                      for c in self.schema.dense]
        dense = np.stack(dense_cols, axis=1)[order] if dense_cols else np.zeros((n, 0), np.float32)
        if dense.size and not np.isfinite(dense).all():
            i, j = np.argwhere(~np.isfinite(dense))[0]
            self._bad(locate, order[i], list(self.schema.dense)[j], f"{dense[i, j]} is not a finite number")

        def col(name: str, dtype: Any) -> np.ndarray:
            a = t.column(name)
            if a.null_count:
                raise ValueError(f"{where}: column {name!r} has {a.null_count} null values")
            return a.to_numpy().astype(dtype)[order]

        labels, entity = col("label", np.float32), col("entity", np.int64)
        for name, codes in (("label", labels), ("entity", entity)):
            bad = np.flatnonzero((codes != 0) & (codes != 1))
            if bad.size:
                meaning = "a label must be 0 or 1" if name == "label" else "entity must be 0 (source) or 1 (target)"
                self._bad(locate, order[bad[0]], name, f"{codes[bad[0]]:g}: {meaning}")
        user_col = self.schema.user_id_feature
        return _Window(
            n=n, lengths=lengths, offsets=offsets, values=values, dense=dense,
            labels=labels, entity=entity, user_id=col(user_col, np.int64),
            true_prob=col("true_prob", np.float32) if "true_prob" in self.optional else None,
            activity=col("activity", np.int64) if "activity" in self.optional else None,
        )

    def _check_aligned(self, key: str, side: np.ndarray, seq: np.ndarray,
                       locate: Callable[[int], tuple[str, int]]) -> None:
        bad = np.flatnonzero(side != seq)
        if bad.size:
            i = int(bad[0])
            self._bad(locate, i, key, f"{side[i]} values but its sequence {self.aligned[key]!r} has {seq[i]} steps "
                                      "(a side column holds one value per step)")

    @staticmethod
    def _bad(locate: Callable[[int], tuple[str, int]], row: int, column: str, what: str) -> None:
        place, in_group = locate(int(row))
        raise ValueError(f"{place}: column {column!r} row {in_group}: {what}")


def _make_batch(parts: list[tuple[_Window, int, int]], keys: list[str]) -> Batch:
    """Build one Batch from row ranges ``[a, b)`` of one or more windows."""
    key_lengths: list[np.ndarray] = []
    key_values: list[np.ndarray] = []
    for k in range(len(keys)):
        for w, a, b in parts:
            key_lengths.append(w.lengths[k][a:b])
            key_values.append(w.values[k][w.offsets[k][a]: w.offsets[k][b]])

    def cat(get) -> np.ndarray:
        arrs = [get(w)[a:b] for w, a, b in parts]
        return arrs[0] if len(arrs) == 1 else np.concatenate(arrs)

    # Per-key totals and offsets computed here, on the host, from the numpy lengths: TorchRec's input
    # distribution (``permute`` / ``split`` of the KJT) would otherwise compute them from the device tensor, a
    # device-to-host ``.tolist()`` per call (TorchRec's Criteo loader precomputes them the same way).
    length_per_key = [int(sum(int(w.offsets[k][b] - w.offsets[k][a]) for w, a, b in parts)) for k in range(len(keys))]
    offset_per_key = np.concatenate([[0], np.cumsum(length_per_key, dtype=np.int64)]).tolist()
    kjt = KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.concatenate(key_values)),
        lengths=torch.from_numpy(np.concatenate(key_lengths)),
        stride=sum(b - a for _, a, b in parts),
        length_per_key=length_per_key,
        offset_per_key=offset_per_key,
    )
    has_tp = parts[0][0].true_prob is not None
    has_act = parts[0][0].activity is not None
    return Batch(
        sparse_features=kjt,
        dense_features=torch.from_numpy(np.ascontiguousarray(cat(lambda w: w.dense))),
        labels=torch.from_numpy(np.ascontiguousarray(cat(lambda w: w.labels))),
        entity=torch.from_numpy(np.ascontiguousarray(cat(lambda w: w.entity))),
        user_id=torch.from_numpy(np.ascontiguousarray(cat(lambda w: w.user_id))),
        true_prob=torch.from_numpy(np.ascontiguousarray(cat(lambda w: w.true_prob))) if has_tp else None,
        activity=torch.from_numpy(np.ascontiguousarray(cat(lambda w: w.activity))) if has_act else None,
    )


def batch_of_rows(t: pa.Table, schema: SchemaConfig, where: str) -> Batch:
    """Rows in the dataset's columns (raw ids; ``entity`` and ``label`` as in a dataset file) -> a Batch, decoded
    as the reader decodes a row group: what ``mkt score`` turns a Parquet file of requests into. Errors name
    ``where`` and the row."""
    decoder = _Decoder(schema, [])
    window = decoder.decode(t, np.arange(t.num_rows), lambda i: (where, int(i)))
    return _make_batch([(window, 0, t.num_rows)], decoder.keys)


# --------------------------------------------------------------------------------------------------------
# One slot's stream
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    data_dir: str
    manifest: Manifest
    split: str
    schema: SchemaConfig
    batch_size: int
    shuffle: bool
    window_rows: int
    seed: int
    drop_last: bool
    entity: Optional[int]  # read only the row groups of this entity code (None: all)
    validation_fraction: float  # what cuts the train files into train and valid (0 for other splits)
    related: Optional[RelationTable] = None  # data.related_items: one more key, from the train split's relations


# A window is [a, b, k0, k1]: the rows at positions k0..k1-1 of the epoch's rows a..b-1 taken in the window's
# order (a seeded permutation of b - a when shuffling, else file order). Every row is yielded, so every quantity
# here is known from the manifest without reading data.
Window = list  # [a, b, k0, k1]


def _units(plan: _Plan, epoch: int) -> list[RowRange]:
    """The row ranges of the split (of ``plan.entity`` only, if set), in this epoch's order."""
    units = plan.manifest.split_units(plan.split, plan.entity, plan.validation_fraction)
    if plan.shuffle:
        rng = np.random.default_rng([plan.seed, epoch, 0x5EED])
        units = [units[i] for i in rng.permutation(len(units))]
    return units


def _fresh_windows(total: int, num_slots: int, slot: int, window_rows: int) -> list[Window]:
    """A new epoch: slot ``slot`` of ``num_slots`` gets an equal share (to one row) of the epoch's ``total`` rows,
    cut into windows of at most ``window_rows`` rows."""
    lo, hi = total * slot // num_slots, total * (slot + 1) // num_slots
    return [[a, min(hi, a + window_rows), 0, min(hi, a + window_rows) - a] for a in range(lo, hi, window_rows)]


def _resplit(remaining: list[list[Window]], num_slots: int) -> list[list[Window]]:
    """Deal the remaining rows of every old slot (in slot order) to ``num_slots`` new slots, equally to one row."""
    flat = [w for windows in remaining for w in windows if w[3] > w[2]]
    total = sum(w[3] - w[2] for w in flat)
    out: list[list[Window]] = [[] for _ in range(num_slots)]
    bounds = [total * s // num_slots for s in range(num_slots + 1)]
    slot, seen = 0, 0
    for a, b, k0, k1 in flat:
        while k0 < k1:
            while seen >= bounds[slot + 1]:
                slot += 1
            take = min(k1 - k0, bounds[slot + 1] - seen)
            out[slot].append([a, b, k0, k0 + take])
            k0 += take
            seen += take
    return out


def _remaining(windows: list[Window], pos: dict[str, int]) -> list[Window]:
    """The windows a slot has still to read from ``pos`` (``window`` index, ``offset`` rows into it)."""
    wi, off = pos["window"], pos["offset"]
    if wi >= len(windows):
        return []
    a, b, k0, k1 = windows[wi]
    return [[a, b, k0 + off, k1]] + [list(w) for w in windows[wi + 1:]]


class _RowSource:
    """Reads rows ``[a, b)`` of an epoch's row sequence (its units, row ranges of row groups, in the epoch's
    order)."""

    def __init__(self, plan: _Plan, epoch: int, columns: list[str]) -> None:
        self.plan = plan
        self.files = plan.manifest.splits.get(physical_split(plan.split, plan.manifest), [])
        self.units = _units(plan, epoch)
        sizes = [u.stop - u.start for u in self.units]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.columns = columns
        self._open: dict[int, pq.ParquetFile] = {}
        # the last row group read, by (file, row group): consecutive windows share one
        self._cached: Optional[tuple[tuple[int, int], pa.Table]] = None

    def _unit(self, u: int) -> pa.Table:
        """The rows of unit ``u`` (a slice of its row group)."""
        fi, rg, start, stop = self.units[u]
        if self._cached is None or self._cached[0] != (fi, rg):
            path = storage.join(self.plan.data_dir, self.files[fi].path)
            try:
                if fi not in self._open:  # a local file or an object (mkt_torchrec.storage); footer read once
                    fs, fs_path = storage.filesystem(path)
                    self._open[fi] = pq.ParquetFile(fs_path, filesystem=fs)
                table = self._open[fi].read_row_group(rg, columns=self.columns)
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"{path}: row group {rg}: unreadable: {e}") from None
            if table.num_rows != self.files[fi].row_groups[rg]:
                raise ValueError(f"{path}: row group {rg} has {table.num_rows} rows but the manifest says "
                                 f"{self.files[fi].row_groups[rg]}")
            self._cached = ((fi, rg), table)
        return self._cached[1].slice(start, stop - start)

    def read(self, a: int, b: int) -> tuple[pa.Table, Callable[[int], tuple[str, int]]]:
        """Rows a..b-1, and a function from a row of them to (file and row group, row in the row group)."""
        first = int(np.searchsorted(self.starts, a, side="right")) - 1
        parts = []
        u = first
        while u < len(self.units) and self.starts[u] < b:
            lo, hi = max(a, int(self.starts[u])), min(b, int(self.starts[u + 1]))
            parts.append(self._unit(u).slice(lo - int(self.starts[u]), hi - lo))
            u += 1
        # files of one dataset may differ in nullability only (e.g. rewritten by another tool)
        table = parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")

        def locate(i: int) -> tuple[str, int]:
            u = int(np.searchsorted(self.starts, a + i, side="right")) - 1
            fi, rg, start, _ = self.units[u]
            path = storage.join(self.plan.data_dir, self.files[fi].path)
            return f"{path}: row group {rg}", int(start + a + i - self.starts[u])

        return table, locate


def _slot_stream(plan: _Plan, epoch: int, windows: list[Window], pos: dict[str, int],
                 decoder: _Decoder) -> Iterator[tuple[Batch, dict[str, int]]]:
    """Yield (batch, position after it) for one slot's ``windows``, from ``pos`` to their end."""
    source = _RowSource(plan, epoch, decoder.columns)
    parts: list[tuple[_Window, int, int]] = []
    have = 0
    wi, offset = pos["window"], pos["offset"]
    while wi < len(windows):
        a, b, k0, k1 = windows[wi]
        start = k0 + offset
        if start >= k1:
            wi, offset = wi + 1, 0
            continue
        table, locate = source.read(a, b)
        if plan.shuffle:
            order = np.random.default_rng([plan.seed, epoch, a, b]).permutation(b - a)[start:k1]
        else:
            order = np.arange(start, k1, dtype=np.int64)
        window = decoder.decode(table, order, locate)
        if plan.entity is not None and window.n and (window.entity != plan.entity).any():
            i = int(np.flatnonzero(window.entity != plan.entity)[0])
            place, row = locate(int(order[i]))
            raise ValueError(f"{place}: row {row} is of entity {window.entity[i]} but the manifest says the row "
                             f"group holds entity {plan.entity} only (the files do not match the manifest)")
        i = 0
        while i < window.n:
            take = min(plan.batch_size - have, window.n - i)
            parts.append((window, i, i + take))
            have += take
            i += take
            if have == plan.batch_size:
                end = start - k0 + i  # position (in the window's rows k0..k1-1) after the batch's last row
                next_pos = {"window": wi, "offset": end} if end < k1 - k0 else {"window": wi + 1, "offset": 0}
                yield _make_batch(parts, decoder.keys), next_pos
                parts, have = [], 0
        wi, offset = wi + 1, 0
    if parts and not plan.drop_last:
        yield _make_batch(parts, decoder.keys), {"window": len(windows), "offset": 0}


class _SlotDataset(IterableDataset):
    """IterableDataset over the slots of one rank; each DataLoader worker runs one slot."""

    def __init__(self, plan: _Plan, epoch: int, windows: list[list[Window]], positions: list[dict[str, int]],
                 num_workers: int, worker_rotation: int) -> None:
        self.plan = plan
        self.epoch = epoch
        self.windows = windows  # per local slot
        self.positions = positions
        self.num_workers = max(1, num_workers)
        self.worker_rotation = worker_rotation

    def __iter__(self) -> Iterator[tuple[Batch, int, dict[str, int]]]:
        info = get_worker_info()
        physical = 0 if info is None else info.id
        local = (physical + self.worker_rotation) % self.num_workers
        decoder = _Decoder(self.plan.schema, self.plan.manifest.optional_columns, self.plan.related)
        for batch, pos in _slot_stream(self.plan, self.epoch, self.windows[local], self.positions[local], decoder):
            yield batch, local, pos


def _passthrough(x: Any) -> Any:
    return x


@dataclass
class _RankLayout:
    """What is left of one rank's epoch: its slots' windows and positions, and the local slot that yields next."""

    windows: list[list[Window]]  # per local slot
    positions: list[dict[str, int]]  # per local slot
    rotation: int

    def slot_rows(self) -> list[int]:
        """Rows each local slot has still to yield."""
        return [sum(w[3] - w[2] for w in _remaining(ws, p)) for ws, p in zip(self.windows, self.positions)]


def _batch_lengths(slot_rows: list[int], rotation: int, batch_size: int, drop_last: bool) -> np.ndarray:
    """The length of each batch one rank will yield, in order, given the rows left in each of its slots.

    A slot yields full batches and then its short rest (unless ``drop_last``); the slots take turns from
    ``rotation`` on, one batch each, and an exhausted slot is skipped (what a DataLoader's in-order round robin
    over its workers does; with one slot, the slot's own order).

    Returns:
        (S,) int64: the rows of this rank's batch at each of its S remaining steps.
    """
    w = len(slot_rows)
    order = [(rotation + i) % w for i in range(w)]  # the turn of each slot within a round
    full = np.array([slot_rows[s] // batch_size for s in order], dtype=np.int64)  # (W,)
    rest = np.array([0 if drop_last else slot_rows[s] % batch_size for s in order], dtype=np.int64)  # (W,)
    count = full + (rest > 0)  # (W,) batches per slot
    rounds = int(count.max(initial=0))
    k = np.arange(rounds, dtype=np.int64)[:, None]  # (K, 1) round
    lengths = np.where(k < full[None, :], batch_size, rest[None, :])  # (K, W)
    return lengths[k < count[None, :]]  # round-major: (S,)


class ParquetReader:
    """Iterates one epoch of :class:`Batch` objects of a dataset split for one rank.

    Args:
        data_dir: dataset directory (with ``manifest.json``): a local path or a URI (``s3://bucket/ds``).
        split: ``train``, ``valid`` or ``test``. ``valid`` is the last ``data.validation_fraction`` of each
            entity's rows of the train files and ``train`` the rest (:mod:`mkt_torchrec.data.dataset`); ``valid``
            needs ``data.validation_fraction > 0``.
        schema: the feature schema (decides keys, table rows, max lengths).
        data: batch size, shuffling, workers, seed, validation fraction.
        rank / world_size: this process's share of the work.
        training: shuffle (if ``data.shuffle``); evaluation reads in file order.
        entity: ``source`` / ``target`` to read only the row groups of that entity (stage 2 reads ``target``);
            needs a format-2 dataset (entity-pure row groups), a format-1 one raises ``ValueError`` naming the
            way to rewrite it.
        drop_last: drop each slot's last partial batch.
        batch_size: rows per batch, instead of ``data.batch_size``.
        manifest: the dataset's manifest when the caller has opened it already (skips re-reading it).

    Iterating yields the rest of the current epoch and then moves the position to the next epoch.
    ``state_dict()`` / ``load_state_dict()`` save and restore the exact position (JSON-serialisable);
    ``load_state_dict`` also takes the states of every rank of a run saved at another world size (or worker
    count) and deals the epoch's remaining rows over this world (see the module docstring). ``step_rows()``
    tells, from the layout alone, how many rows all ranks yield at each remaining step of the epoch.

    Example:
        >>> readers = [ParquetReader("data/ds", "train", cfg.schema, cfg.data, rank=r, world_size=2,
        ...                          entity="target") for r in range(2)]          # doctest: +SKIP
        >>> readers[0].step_rows() == readers[1].step_rows()                      # doctest: +SKIP
        True
    """

    def __init__(self, data_dir: str, split: str, schema: SchemaConfig, data: DataConfig, rank: int = 0,
                 world_size: int = 1, training: bool = True, entity: Optional[str] = None,
                 drop_last: bool = False, batch_size: Optional[int] = None,
                 manifest: Optional[Manifest] = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if entity not in (None, "source", "target"):
            raise ValueError(f"entity must be 'source', 'target' or None, got {entity!r}")
        self.manifest = manifest if manifest is not None else open_dataset(data_dir, schema)
        cut = split in (TRAIN_SPLIT, VALID_SPLIT) and not self.manifest.has_valid_files  # else read as written
        fraction = data.validation_fraction if cut else 0.0
        check_split_readable(self.manifest, data_dir, split, fraction)
        if entity is not None:
            check_entity_readable(self.manifest, data_dir, entity)
        self.plan = _Plan(
            data_dir=data_dir, manifest=self.manifest, split=split, schema=schema,
            batch_size=batch_size or data.batch_size, shuffle=training and data.shuffle,
            window_rows=data.shuffle_window_rows, seed=data.seed, drop_last=drop_last,
            entity=None if entity is None else {"source": 0, "target": 1}[entity], validation_fraction=fraction,
            # every process computes the same table from the train split (no rank waits for another)
            related=related_items(data_dir, self.manifest, schema, data, log=rank == 0)
            if data.related_items.key else None,
        )
        self._num_rows = self.manifest.split_rows(split, self.plan.entity, fraction)
        self.rank, self.world_size = rank, world_size
        self.num_workers = data.num_workers
        self._slots = max(1, self.num_workers)
        self._warn_if_windows_are_small()
        # a hook each batch goes through on its way out (in this process): the cached stage 2's knowledge lookup
        # (mkt_torchrec.cache.knowledge); None: batches as read
        self.augment: Optional[Callable[[Batch], Batch]] = None
        self.set_epoch(0)

    @property
    def epoch(self) -> int:
        return self._epoch

    def _warn_if_windows_are_small(self) -> None:
        """Log once per dataset and window size if a shuffled window holds less than one row group."""
        largest = max((u.stop - u.start for u in _units(self.plan, 0)), default=0)
        key = (storage.absolute(self.plan.data_dir), self.plan.window_rows)
        if self.plan.shuffle and largest > self.plan.window_rows and key not in _warned_windows:
            _warned_windows.add(key)
            logger.warning("%s: row groups of up to %d rows are larger than data.shuffle_window_rows=%d, so "
                           "training shuffles rows within parts of one row group only; raise "
                           "data.shuffle_window_rows (memory: one decoded window per rank and worker)",
                           self.plan.data_dir, largest, self.plan.window_rows)

    def _fresh_positions(self) -> list[dict[str, int]]:
        return [{"window": 0, "offset": 0} for _ in range(self._slots)]

    def _fresh_rank(self, rank: int) -> _RankLayout:
        total, num_slots = self.num_rows(), self.world_size * self._slots
        return _RankLayout([_fresh_windows(total, num_slots, rank * self._slots + s, self.plan.window_rows)
                            for s in range(self._slots)], self._fresh_positions(), 0)

    def _layout(self) -> list[list[Window]]:
        if self._windows is not None:
            return self._windows
        return self._fresh_rank(self.rank).windows

    def _restart_pass(self, ranks: Optional[list[_RankLayout]], known: bool) -> None:
        """Every rank's layout from here (``None``: the epoch's fresh one; unknown if not ``known``)."""
        self._ranks = ranks
        self._ranks_known = known
        self._steps = 0  # batches this rank has yielded since
        self._schedule: Optional[np.ndarray] = None

    def num_rows(self) -> int:
        """Rows of the split this reader's epoch reads, all ranks together: the entity's rows when reading one
        entity, else every row (of ``train`` / ``valid``: after the validation cut)."""
        return self._num_rows

    def rows_left(self) -> int:
        """Rows this rank has still to yield in the current epoch (those :meth:`num_rows` counts)."""
        return sum(w[3] - w[2] for windows, pos in zip(self._layout(), self._positions)
                   for w in _remaining(windows, pos))

    def batches_left(self) -> int:
        """Batches this rank has still to yield in the current epoch."""
        mine = _RankLayout(self._layout(), self._positions, self._rotation)
        return len(_batch_lengths(mine.slot_rows(), self._rotation, self.plan.batch_size, self.plan.drop_last))

    def step_rows(self) -> list[int]:
        """Rows all ranks yield together at each remaining global step of the current epoch.

        Element ``t`` is the sum over ranks of the length of the batch each rank yields at the ``t``-th step from
        here (0 for a rank that has run out); ``len`` is the most batches any rank has left. It is computed from
        the layout alone (manifest, windows, every rank's positions and worker rotation), so every rank gets the
        same list without reading data or communicating. The ranks are taken to step together: every rank has
        yielded as many batches as this one since the epoch began or the state was loaded. Once this rank's
        iteration has ended, the reader is at the next epoch and this is that epoch's schedule.

        Raises:
            ValueError: :meth:`load_state_dict` was given only this rank's state (of a world of more than one),
                so the other ranks' positions in this epoch are unknown.
        """
        if not self._ranks_known:
            raise ValueError(f"ParquetReader.step_rows needs every rank's state: load_state_dict was given only "
                             f"rank {self.rank}'s of {self.world_size}; pass the states of all ranks (a list)")
        if self._schedule is None:
            ranks = self._ranks if self._ranks is not None else [self._fresh_rank(r) for r in range(self.world_size)]
            per_rank = [_batch_lengths(r.slot_rows(), r.rotation, self.plan.batch_size, self.plan.drop_last)
                        for r in ranks]
            total = np.zeros(max(len(p) for p in per_rank), dtype=np.int64)  # (steps,)
            for p in per_rank:
                total[:len(p)] += p
            self._schedule = total
        return self._schedule[self._steps:].tolist()

    def first_batch(self) -> Batch:
        """One row from the start of the split (of the reader's entity): filler for a rank with no rows left.

        Raises:
            ValueError: the split has no row (of the entity).
        """
        plan = replace(self.plan, batch_size=1, shuffle=False)
        decoder = _Decoder(plan.schema, plan.manifest.optional_columns, plan.related)
        windows = _fresh_windows(min(1, self.num_rows()), 1, 0, 1)  # the first row alone: decode only it
        for batch, _ in _slot_stream(plan, 0, windows, {"window": 0, "offset": 0}, decoder):
            return batch if self.augment is None else self.augment(batch)
        what = {None: "", 0: "source ", 1: "target "}[plan.entity]
        raise ValueError(f"{plan.data_dir}: split {plan.split!r} has no {what}rows")

    def __iter__(self) -> Iterator[Batch]:
        ds = _SlotDataset(self.plan, self._epoch, self._layout(), [dict(p) for p in self._positions],
                          self.num_workers, self._rotation)
        if self.num_workers == 0:
            source: Any = iter(ds)
        else:
            source = iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                     collate_fn=_passthrough, prefetch_factor=2))
        for batch, local, pos in source:
            self._positions[local] = pos
            self._rotation = (local + 1) % self._slots
            self._steps += 1
            yield batch if self.augment is None else self.augment(batch)
        self.set_epoch(self._epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning on the next iteration."""
        self._epoch = epoch
        self._windows: Optional[list[list[Window]]] = None  # per local slot; None: the epoch's fresh layout
        self._positions = self._fresh_positions()
        self._rotation = 0
        self._restart_pass(None, known=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "epoch": self._epoch, "rank": self.rank, "world_size": self.world_size,
            "num_workers": self.num_workers, "split": self.plan.split, "seed": self.plan.seed,
            "batch_size": self.plan.batch_size, "window_rows": self.plan.window_rows, "rows": self.num_rows(),
            "entity": ENTITY_NAMES[self.plan.entity], "shuffle": self.plan.shuffle,
            "validation_fraction": self.plan.validation_fraction, "windows": self._windows,
            "positions": [dict(p) for p in self._positions], "rotation": self._rotation,
        }

    def load_state_dict(self, state: Union[dict[str, Any], Sequence[dict[str, Any]]]) -> None:
        """Continue from a saved position: this rank's own state, or the states of every rank of the saved run.

        With every rank's state, a run saved at another world size or worker count continues too: the rows that
        no old slot had read yet are dealt to this world's slots in equal shares, so each row of the epoch is
        read exactly once across the restart. Every rank's state also lets :meth:`step_rows` tell the rest of
        the epoch's schedule; with only this rank's own state it raises until the next epoch.
        """
        states = [state] if isinstance(state, dict) else list(state)
        if not states:
            raise ValueError("reader state: empty")
        for st in states:
            self._check_state(st)
        epochs = {int(st["epoch"]) for st in states}
        if len(epochs) != 1:
            raise ValueError(f"reader state: the saved ranks are in different epochs {sorted(epochs)}")
        self._epoch = epochs.pop()
        ranks = sorted(int(st["rank"]) for st in states)
        saved_world = int(states[0]["world_size"])
        same_world = all(st["num_workers"] == self.num_workers and st["world_size"] == self.world_size
                         for st in states)
        if same_world and (len(states) == 1 or ranks == list(range(self.world_size))):
            by_rank = {int(st["rank"]): st for st in states}
            if self.rank not in by_rank:
                raise ValueError(f"reader state: saved by rank {ranks[0]}, loaded on rank {self.rank}")
            mine = by_rank[self.rank]
            self._windows = mine["windows"]
            self._positions = [dict(p) for p in mine["positions"]]
            self._rotation = int(mine["rotation"])
            if len(by_rank) < self.world_size:
                self._restart_pass(None, known=False)
            else:
                self._restart_pass([_RankLayout(_layout_of_state(by_rank[r], self.num_rows()),
                                                [dict(p) for p in by_rank[r]["positions"]], int(by_rank[r]["rotation"]))
                                    for r in range(self.world_size)], known=True)
            return
        if ranks != list(range(saved_world)):
            raise ValueError(f"reader state: a run saved at world size {saved_world} continues at "
                             f"world size {self.world_size} only from the states of all its ranks; got ranks {ranks}")
        remaining = []
        for st in sorted(states, key=lambda s: int(s["rank"])):
            old = _layout_of_state(st, self.num_rows())
            remaining += [_remaining(w, p) for w, p in zip(old, st["positions"])]
        layout = _resplit(remaining, self.world_size * self._slots)
        self._windows = layout[self.rank * self._slots:(self.rank + 1) * self._slots]
        self._positions = self._fresh_positions()
        self._rotation = 0
        self._restart_pass([_RankLayout(layout[r * self._slots:(r + 1) * self._slots], self._fresh_positions(), 0)
                            for r in range(self.world_size)], known=True)

    def _check_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"reader state: version {got!r} is not {STATE_VERSION} (saved by another release)")
        # a state of the release before validation splits read the train files whole: fraction 0
        fraction = state.get("validation_fraction", 0.0)
        if fraction != self.plan.validation_fraction:
            raise ValueError(f"reader state: saved with data.validation_fraction={fraction!r} but this run has "
                             f"{self.plan.validation_fraction!r}; the {self.plan.split!r} split it was reading had "
                             "other rows, so the position cannot resume (set data.validation_fraction back, or start "
                             "the run afresh)")
        for key, mine in (("split", self.plan.split), ("seed", self.plan.seed), ("batch_size", self.plan.batch_size),
                          ("window_rows", self.plan.window_rows), ("rows", self.num_rows()),
                          ("entity", ENTITY_NAMES[self.plan.entity]), ("shuffle", self.plan.shuffle)):
            if state.get(key) != mine:
                raise ValueError(f"reader state: saved with {key}={state.get(key)!r} but this run has {mine!r}; "
                                 "a reader position resumes only with the same data, split, entity, seed, batch "
                                 "size, shuffle window and validation fraction")


def _layout_of_state(state: dict[str, Any], total: int) -> list[list[Window]]:
    """The windows of every slot of a saved rank state."""
    if state["windows"] is not None:
        return [[list(w) for w in ws] for ws in state["windows"]]
    slots = max(1, int(state["num_workers"]))
    num_slots = int(state["world_size"]) * slots
    return [_fresh_windows(total, num_slots, int(state["rank"]) * slots + s, int(state["window_rows"]))
            for s in range(slots)]
