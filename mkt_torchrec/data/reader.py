"""Streaming Parquet -> :class:`Batch` reader with exact, resumable sharding.

Work is split by row group. For each epoch the split's row groups are listed (shuffled with
``seed + epoch`` when training) and dealt round-robin to ``world_size * num_workers`` slots, so across all
ranks and workers every row is read exactly once per epoch. A slot reads its row groups in windows of
up to ``shuffle_window_rows`` rows; each window is read (only the needed columns), its ids are mapped to table rows,
its sequences truncated to ``max_len``, and its rows permuted with a seed of (seed, epoch, slot, window).
Batches are cut from the stream of windows (a batch may span two windows).

A slot's position is ``(epoch, window, offset)``: the next unread row of the permuted window. The reader's
:meth:`ParquetReader.state_dict` holds every slot's position plus which worker yields next, so a resumed run
yields exactly the batches an uninterrupted one would have. Memory is bounded by one window per slot.

Example:
    >>> reader = ParquetReader("data/ds", "train", cfg.schema, cfg.data)   # doctest: +SKIP
    >>> for batch in reader: ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mkt_torchrec.config import DataConfig, SchemaConfig
from mkt_torchrec.data.batch import Batch
from mkt_torchrec.data.dataset import Manifest, open_dataset
from mkt_torchrec.data.jagged import gather_jagged, offsets_of
from mkt_torchrec.data.schema import map_ids

STATE_VERSION = 1


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
    """Turns an Arrow table of dataset rows into a permuted :class:`_Window`."""

    def __init__(self, schema: SchemaConfig, optional_columns: list[str]) -> None:
        self.schema = schema
        self.keys = schema.sparse_keys
        self.tables = [schema.table_of(k) for k in self.keys]
        self.max_len = [schema.sequences[k].max_len if k in schema.sequences else None for k in self.keys]
        self.optional = [c for c in ("true_prob", "activity") if c in optional_columns]
        self.columns = ["entity", "label"] + self.keys + list(schema.dense) + self.optional

    def decode(self, t: pa.Table, perm: Optional[np.ndarray], where: str) -> _Window:
        n = t.num_rows
        order = np.arange(n, dtype=np.int64) if perm is None else perm
        lengths, offsets, values = [], [], []
        for key, table_name, max_len in zip(self.keys, self.tables, self.max_len):
            col = t.column(key)
            arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
            if max_len is None:  # single-valued, nullable
                if arr.null_count:
                    valid = arr.is_valid().to_numpy(zero_copy_only=False)
                    raw = arr.fill_null(0).to_numpy()
                    lens = valid.astype(np.int64)[order]
                    vals = raw[order][valid[order]]
                else:
                    lens = np.ones(n, dtype=np.int64)
                    vals = arr.to_numpy()[order]
            else:  # list<int64>: keep the last max_len elements
                if arr.null_count:
                    bad = int(np.flatnonzero(~arr.is_valid().to_numpy(zero_copy_only=False))[0])
                    raise ValueError(f"{where}: column {key!r} row {bad}: null sequence (use an empty list)")
                off = arr.offsets.to_numpy()
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
        dense_cols = [t.column(c).combine_chunks().fill_null(0).to_numpy().astype(np.float32)
                      for c in self.schema.dense]
        dense = np.stack(dense_cols, axis=1)[order] if dense_cols else np.zeros((n, 0), np.float32)

        def col(name: str, dtype: Any) -> np.ndarray:
            a = t.column(name)
            if a.null_count:
                raise ValueError(f"{where}: column {name!r} has {a.null_count} null values")
            return a.to_numpy().astype(dtype)[order]

        user_col = self.schema.user_id_feature
        return _Window(
            n=n, lengths=lengths, offsets=offsets, values=values, dense=dense,
            labels=col("label", np.float32), entity=col("entity", np.int64), user_id=col(user_col, np.int64),
            true_prob=col("true_prob", np.float32) if "true_prob" in self.optional else None,
            activity=col("activity", np.int64) if "activity" in self.optional else None,
        )


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

    kjt = KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.concatenate(key_values)),
        lengths=torch.from_numpy(np.concatenate(key_lengths)),
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
    entity: Optional[int]  # keep only rows of this entity code (None: all)


def _units(plan: _Plan, epoch: int) -> list[tuple[int, int]]:
    """All (file, row group) units of the split, in this epoch's order."""
    units = [(fi, rg) for fi, f in enumerate(plan.manifest.splits.get(plan.split, []))
             for rg in range(len(f.row_groups))]
    if plan.shuffle:
        rng = np.random.default_rng([plan.seed, epoch, 0x5EED])
        units = [units[i] for i in rng.permutation(len(units))]
    return units


def _windows(plan: _Plan, units: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Group consecutive units into windows of at most ``window_rows`` rows (at least one unit each)."""
    files = plan.manifest.splits.get(plan.split, [])
    windows: list[list[tuple[int, int]]] = []
    rows = 0
    for unit in units:
        n = files[unit[0]].row_groups[unit[1]]
        if not windows or rows + n > plan.window_rows:
            windows.append([])
            rows = 0
        windows[-1].append(unit)
        rows += n
    return windows


def _slot_stream(plan: _Plan, slot: int, num_slots: int, pos: dict[str, int],
                 decoder: _Decoder) -> Iterator[tuple[Batch, dict[str, int]]]:
    """Yield (batch, position after it) for one slot from ``pos`` to the end of ``pos['epoch']``."""
    epoch = pos["epoch"]
    mine = _units(plan, epoch)[slot::num_slots]
    windows = _windows(plan, mine)
    files: dict[int, pq.ParquetFile] = {}
    parts: list[tuple[_Window, int, int]] = []
    have = 0
    wi, offset = pos["window"], pos["offset"]
    while wi < len(windows):
        tables = []
        for fi, rg in windows[wi]:
            path = os.path.join(plan.data_dir, plan.manifest.splits[plan.split][fi].path)
            try:
                if fi not in files:
                    files[fi] = pq.ParquetFile(path)
                tables.append(files[fi].read_row_group(rg, columns=decoder.columns))
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"{path}: row group {rg}: unreadable: {e}") from None
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        if plan.entity is not None:
            table = table.filter(pc.equal(table.column("entity"), plan.entity))
        perm = None
        if plan.shuffle:
            perm = np.random.default_rng([plan.seed, epoch, slot, wi]).permutation(table.num_rows)
        where = f"{plan.data_dir}: window {wi} of slot {slot} ({[plan.manifest.splits[plan.split][f].path for f, _ in windows[wi]]})"
        window = decoder.decode(table, perm, where)
        while offset < window.n:
            take = min(plan.batch_size - have, window.n - offset)
            parts.append((window, offset, offset + take))
            have += take
            offset += take
            if have == plan.batch_size:
                next_pos = {"epoch": epoch, "window": wi, "offset": offset}
                if offset == window.n:
                    next_pos = {"epoch": epoch, "window": wi + 1, "offset": 0}
                yield _make_batch(parts, decoder.keys), next_pos
                parts, have = [], 0
        wi, offset = wi + 1, 0
    if parts and not plan.drop_last:
        yield _make_batch(parts, decoder.keys), {"epoch": epoch, "window": len(windows), "offset": 0}


class _SlotDataset(IterableDataset):
    """IterableDataset over the slots of one rank; each DataLoader worker runs one slot."""

    def __init__(self, plan: _Plan, rank: int, world_size: int, num_workers: int,
                 positions: list[dict[str, int]], worker_rotation: int) -> None:
        self.plan = plan
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(1, num_workers)
        self.positions = positions
        self.worker_rotation = worker_rotation

    def __iter__(self) -> Iterator[tuple[Batch, int, dict[str, int]]]:
        info = get_worker_info()
        physical = 0 if info is None else info.id
        local = (physical + self.worker_rotation) % self.num_workers
        slot = self.rank * self.num_workers + local
        decoder = _Decoder(self.plan.schema, self.plan.manifest.optional_columns)
        for batch, pos in _slot_stream(self.plan, slot, self.world_size * self.num_workers,
                                       self.positions[local], decoder):
            yield batch, local, pos


def _passthrough(x: Any) -> Any:
    return x


class ParquetReader:
    """Iterates one epoch of :class:`Batch` objects of a dataset split for one rank.

    Args:
        data_dir: dataset directory (with ``manifest.json``).
        split: ``train`` or ``test``.
        schema: the feature schema (decides keys, table rows, max lengths).
        data: batch size, shuffling, workers, seed.
        rank / world_size: this process's share of the work.
        training: shuffle (if ``data.shuffle``); evaluation reads in file order.
        entity: ``source`` / ``target`` to keep only that entity's rows (stage 2 reads ``target``).
        drop_last: drop each slot's last partial batch.

    Iterating yields the rest of the current epoch and then moves the position to the next epoch.
    ``state_dict()`` / ``load_state_dict()`` save and restore the exact position (JSON-serialisable).
    """

    def __init__(self, data_dir: str, split: str, schema: SchemaConfig, data: DataConfig, rank: int = 0,
                 world_size: int = 1, training: bool = True, entity: Optional[str] = None,
                 drop_last: bool = False, batch_size: Optional[int] = None,
                 manifest: Optional[Manifest] = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.manifest = manifest if manifest is not None else open_dataset(data_dir, schema)
        if split not in self.manifest.splits:
            raise ValueError(f"{data_dir}: no split {split!r}; splits: {sorted(self.manifest.splits)}")
        if entity not in (None, "source", "target"):
            raise ValueError(f"entity must be 'source', 'target' or None, got {entity!r}")
        self.plan = _Plan(
            data_dir=data_dir, manifest=self.manifest, split=split, schema=schema,
            batch_size=batch_size or data.batch_size, shuffle=training and data.shuffle,
            window_rows=data.shuffle_window_rows if training and data.shuffle else 1,
            seed=data.seed, drop_last=drop_last,
            entity=None if entity is None else {"source": 0, "target": 1}[entity],
        )
        self.rank, self.world_size = rank, world_size
        self.num_workers = data.num_workers
        self._epoch = 0
        self._positions = self._fresh_positions(0)
        self._rotation = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    def _fresh_positions(self, epoch: int) -> list[dict[str, int]]:
        return [{"epoch": epoch, "window": 0, "offset": 0} for _ in range(max(1, self.num_workers))]

    def num_rows(self) -> int:
        """Rows of the split in the dataset (all ranks together; before any entity filter)."""
        return self.manifest.split_rows(self.plan.split)

    def __iter__(self) -> Iterator[Batch]:
        n = max(1, self.num_workers)
        ds = _SlotDataset(self.plan, self.rank, self.world_size, self.num_workers,
                          [dict(p) for p in self._positions], self._rotation)
        if self.num_workers == 0:
            source: Any = iter(ds)
        else:
            source = iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                     collate_fn=_passthrough, prefetch_factor=2))
        for batch, local, pos in source:
            self._positions[local] = pos
            self._rotation = (local + 1) % n
            yield batch
        self._epoch += 1
        self._positions = self._fresh_positions(self._epoch)
        self._rotation = 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning on the next iteration."""
        self._epoch = epoch
        self._positions = self._fresh_positions(epoch)
        self._rotation = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "epoch": self._epoch, "positions": [dict(p) for p in self._positions],
            "rotation": self._rotation, "rank": self.rank, "world_size": self.world_size,
            "num_workers": self.num_workers, "split": self.plan.split, "seed": self.plan.seed,
            "batch_size": self.plan.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (("world_size", self.world_size), ("num_workers", self.num_workers),
                          ("split", self.plan.split), ("seed", self.plan.seed),
                          ("batch_size", self.plan.batch_size)):
            if state.get(key) != mine:
                raise ValueError(f"reader state: saved with {key}={state.get(key)!r} but this run has {mine!r}; "
                                 "a reader position only resumes with the same world size, workers, seed and batch")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"reader state: version {state.get('version')!r} is not {STATE_VERSION}")
        self._epoch = int(state["epoch"])
        self._positions = [dict(p) for p in state["positions"]]
        self._rotation = int(state["rotation"])
