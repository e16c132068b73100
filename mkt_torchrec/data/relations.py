"""Related source items of each target item, from the train split: the prior of PGTL (Li et al., AAAI 2022).

PGTL's prior feature of a target item is the mean of the features of its *related* source items (its Eq. before
Eq. 4: ``x_i^p = 1/|R_i| sum_{k in R_i} x_k^s``). This module finds, for every target item of the train split, up
to ``K`` = ``data.related_items.max_related`` related source items, and the reader hands them to the model as
**one more KeyedJaggedTensor key** (``data.related_items.key``): on a target row, the table rows of its item's
related source items in the item feature's table (``data.related_items.item_feature``); on a source row, and on a
target row whose item has none, nothing (length 0). The model looks that key up in the shared item table, so
TorchRec's sharded collections and the train pipeline do the lookup like any other key.

Relations (``data.related_items.relations``, tried in order for each target item; the first that gives at least
one source item is the item's relation, as the paper takes "strong" relations before "weak" ones):

- the name of a single-valued schema feature ``F`` (``item_id``, ``category``, any configured column): the source
  items whose value of ``F`` equals the target item's. An item's value of ``F`` is its most frequent value over
  its train rows (ties: the smallest), so ``F`` = the item feature itself is "the same item id across entities"
  (the paper's strong relation) and ``category`` is "the same category" (its weak one). Entities without a shared
  id or category space (Tenrec namespaces both by entity) simply find nothing here.
- ``co_click``: co-engagement, for entities that share neither: the source items clicked (label 1) in the train
  split by the users who clicked the target item, ranked by the number of such users. Each user's clicked source
  items are capped at :data:`CO_CLICK_USER_CAP` (the most shown ones), which bounds the join.

Within a relation the candidates are ranked (count of co-clicking users for ``co_click``, then) by the source
item's train impressions, then by raw id, and the first ``K`` kept, so the table is a deterministic function of the
train split and the config.

**No leakage.** Only the rows of the ``train`` split are read, after the validation cut (``data.validation_fraction``)
exactly as the train reader cuts it: neither the validation rows early stopping scores nor the test rows inform any
relation. A target item seen only outside the train split has no related items (no prior).

**Where it is computed.** Every process that opens a reader computes the same table from the train split (a
deterministic function of the files and the config), once per process (cached by dataset, cut and config): no
rank waits while another builds it, nothing is written next to the dataset, no collective is needed, and a
DataLoader worker receives the arrays with its reader's plan. The cost is one pass over a few integer columns of the
train split per process (the item, the relation features, and for ``co_click`` the user and label), a row group at
a time, keeping only aggregates: the distinct (entity, item, feature values) rows with their counts, and the
distinct clicks (entity, user, item) when ``co_click`` is configured.

Example:
    >>> table = related_items("data/ds", manifest, cfg.schema, cfg.data)            # doctest: +SKIP
    >>> table.used                                       # target items per relation  # doctest: +SKIP
    {'item_id': 0, 'category': 2500, 'co_click': 0, 'none': 0}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mkt_torchrec import storage
from mkt_torchrec.config import DataConfig, SchemaConfig
from mkt_torchrec.data.dataset import TRAIN_SPLIT, Manifest, physical_split
from mkt_torchrec.data.jagged import gather_jagged, offsets_of
from mkt_torchrec.data.schema import map_ids

CO_CLICK = "co_click"
NULL = np.iinfo(np.int64).min  # a null value in the aggregates (int64 raw ids may be negative)
CO_CLICK_USER_CAP = 200  # clicked source items per user that enter the co-click join (the most shown ones)

logger = logging.getLogger("mkt.data")


@dataclass(frozen=True)
class RelationTable:
    """Target item (raw id) -> its related source items (table rows of the item feature's table).

    Attributes:
        key: the KJT key the reader adds.
        item_feature: the feature whose raw id on a target row selects the entry.
        target_ids: (N,) int64 sorted raw ids of the target items that have related items.
        offsets: (N+1,) int64 offsets into ``related``.
        related: table rows (in ``item_feature``'s table) of the related source items, each item's in rank order.
        used: relation name (or ``none``) -> how many target items of the train split took it.
    """

    key: str
    item_feature: str
    target_ids: np.ndarray
    offsets: np.ndarray
    related: np.ndarray
    used: Dict[str, int]

    def lookup(self, item: np.ndarray, is_target: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Rows' raw item ids (N,) and whether each is a target row with an item (N,) bool -> (lengths (N,),
        values) of the key: the related rows of each target row's item, nothing elsewhere."""
        pos = np.searchsorted(self.target_ids, item)
        pos = np.minimum(pos, max(len(self.target_ids) - 1, 0))
        found = is_target & (len(self.target_ids) > 0)
        if len(self.target_ids):
            found &= self.target_ids[pos] == item
        lens = np.where(found, self.offsets[pos + 1] - self.offsets[pos], 0).astype(np.int64) \
            if len(self.target_ids) else np.zeros(len(item), dtype=np.int64)
        starts = self.offsets[pos] if len(self.target_ids) else np.zeros(len(item), dtype=np.int64)
        return lens, gather_jagged(starts, lens, self.related)


def _reduce(rows: np.ndarray, weight: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The distinct rows of a 2-D int64 array (sorted) and each one's summed ``weight``."""
    if not len(rows):
        return rows, weight
    uniq, inverse = np.unique(rows, axis=0, return_inverse=True)
    return uniq, np.bincount(inverse.reshape(-1), weights=weight, minlength=len(uniq)).astype(np.int64)


def _mode_per_item(items: np.ndarray, values: np.ndarray, count: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(distinct items sorted, each one's most frequent value, ties to the smallest) of aligned (item, value,
    rows) arrays (null values already dropped)."""
    if not len(items):
        return items, values
    pairs, counts = _reduce(np.stack([items, values], axis=1), count)
    order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))  # by item, then count desc, then value asc
    pairs = pairs[order]
    first = np.ones(len(pairs), dtype=bool)
    first[1:] = pairs[1:, 0] != pairs[:-1, 0]
    return pairs[first, 0], pairs[first, 1]


def _top_k(groups: np.ndarray, candidates: np.ndarray, score: Sequence[np.ndarray], k: int) -> Tuple[np.ndarray,
                                                                                                        np.ndarray]:
    """Per group (any int64 key), its first ``k`` candidates ranked by ``score`` (each descending, in order of
    priority) then by candidate ascending -> (group of each kept pair, candidate), sorted by group then rank."""
    keys = [candidates] + [-s for s in reversed(score)] + [groups]
    order = np.lexsort(keys)
    g, c = groups[order], candidates[order]
    start = np.ones(len(g), dtype=bool)
    start[1:] = g[1:] != g[:-1]
    first_of = np.maximum.accumulate(np.where(start, np.arange(len(g)), 0))
    keep = np.arange(len(g)) - first_of < k
    return g[keep], c[keep]


def relate(items: np.ndarray, count: np.ndarray, clicks: np.ndarray, columns: Sequence[str],
           relations: Sequence[str], item_feature: str, k: int) -> Tuple[Dict[int, np.ndarray], Dict[str, int]]:
    """The relation of every target item, from the train split's aggregates (the pure core of
    :func:`related_items`).

    Args:
        items: (N, 2 + F) int64 distinct rows (entity 0 / 1, raw item id, the item's raw value of each relation
            feature in ``columns``, :data:`NULL` for null).
        count: (N,) train rows of each.
        clicks: (C, 3) int64 distinct (entity, raw user id, raw item id) of the rows with label 1.
        columns: the relation features of ``items``' columns 2.. (in order).
        relations: relation names in order (features of ``columns``, or ``co_click``).
        item_feature: the item feature (its relation is the identity: the same id).
        k: related items kept per target item.

    Returns:
        (target raw id -> its related source raw ids in rank order, relation or ``none`` -> target items that took
        it).
    """
    entity, item = items[:, 0], items[:, 1]
    src = entity == 0
    src_items, inverse = np.unique(item[src], return_inverse=True)  # the source catalogue ...
    src_shown = np.bincount(inverse.reshape(-1), weights=count[src], minlength=len(src_items)).astype(np.int64)
    targets = np.unique(item[entity == 1])  # ... and its impressions; the target items
    out: Dict[int, np.ndarray] = {}
    used = {r: 0 for r in relations}
    for rel in relations:
        todo = np.setdiff1d(targets, np.fromiter(out.keys(), dtype=np.int64, count=len(out)), assume_unique=True)
        if not len(todo) or not len(src_items):
            continue
        if rel == CO_CLICK:
            pairs = _co_click(clicks, todo, src_items, src_shown)
        elif rel == item_feature:  # the same raw id in both entities' rows
            same = todo[np.isin(todo, src_items, assume_unique=True)]
            pairs = same, same, [src_shown[np.searchsorted(src_items, same)]]
        else:
            pairs = _same_value(entity, item, items[:, 2 + list(columns).index(rel)], count, todo, src_items,
                                src_shown)
        if pairs is None:
            continue
        g, c = _top_k(*pairs[:2], pairs[2], k)
        if not len(g):
            continue
        bounds = np.flatnonzero(np.r_[True, g[1:] != g[:-1], True])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            out[int(g[a])] = c[a:b]
        used[rel] = len(bounds) - 1
    used["none"] = len(targets) - len(out)
    return out, used


def _same_value(entity: np.ndarray, item: np.ndarray, values: np.ndarray, count: np.ndarray, todo: np.ndarray,
                src_items: np.ndarray, src_shown: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray, list]]:
    """(target item, source item, [impressions]) pairs of ``todo`` targets and the source items whose value of
    the feature is the target item's."""
    ok = values != NULL
    s_items, s_vals = _mode_per_item(item[(entity == 0) & ok], values[(entity == 0) & ok], count[(entity == 0) & ok])
    t_items, t_vals = _mode_per_item(item[(entity == 1) & ok], values[(entity == 1) & ok], count[(entity == 1) & ok])
    mine = np.isin(t_items, todo, assume_unique=True)
    t_items, t_vals = t_items[mine], t_vals[mine]
    if not len(s_items) or not len(t_items):
        return None
    by_val = np.argsort(s_vals, kind="stable")  # source items grouped by value
    sv, si = s_vals[by_val], s_items[by_val]
    lo, hi = np.searchsorted(sv, t_vals, "left"), np.searchsorted(sv, t_vals, "right")
    lens = hi - lo
    if not lens.sum():
        return None
    cands = gather_jagged(lo, lens, si)
    groups = np.repeat(t_items, lens)
    return groups, cands, [src_shown[np.searchsorted(src_items, cands)]]


def _co_click(clicks: np.ndarray, todo: np.ndarray, src_items: np.ndarray,
              src_shown: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray, list]]:
    """(target item, source item, [co-clicking users, impressions]) pairs of ``todo`` targets."""
    s = clicks[clicks[:, 0] == 0][:, 1:]  # (user, item), distinct
    t = clicks[clicks[:, 0] == 1][:, 1:]
    t = t[np.isin(t[:, 1], todo)]
    if not len(s) or not len(t):
        return None
    shown = src_shown[np.searchsorted(src_items, s[:, 1])]
    s = s[np.lexsort((s[:, 1], -shown, s[:, 0]))]  # by user, then most shown first
    start = np.ones(len(s), dtype=bool)
    start[1:] = s[1:, 0] != s[:-1, 0]
    first_of = np.maximum.accumulate(np.where(start, np.arange(len(s)), 0))
    s = s[np.arange(len(s)) - first_of < CO_CLICK_USER_CAP]
    lo = np.searchsorted(s[:, 0], t[:, 0], "left")
    lens = np.searchsorted(s[:, 0], t[:, 0], "right") - lo
    if not lens.sum():
        return None
    cands = gather_jagged(lo, lens, s[:, 1])
    groups = np.repeat(t[:, 1], lens)
    pairs, users = _reduce(np.stack([groups, cands], axis=1), np.ones(len(groups), dtype=np.int64))
    return pairs[:, 0], pairs[:, 1], [users, src_shown[np.searchsorted(src_items, pairs[:, 1])]]


# --------------------------------------------------------------------------------------------------------
# From a dataset's train split
# --------------------------------------------------------------------------------------------------------

_CACHE: Dict[tuple, RelationTable] = {}


_MERGE_ROWS = 1 << 22  # aggregated rows buffered before they are merged again (bounds the memory)


class _Aggregate:
    """Distinct int64 rows and their summed weights, merged as row groups stream in."""

    def __init__(self, width: int) -> None:
        self.parts: List[Tuple[np.ndarray, np.ndarray]] = []
        self.pending, self.width = 0, width

    def add(self, rows: np.ndarray, weight: np.ndarray) -> None:
        self.parts.append(_reduce(rows, weight))
        self.pending += len(self.parts[-1][0])
        if self.pending > _MERGE_ROWS:
            self.parts = [self.result()]
            self.pending = len(self.parts[0][0])

    def result(self) -> Tuple[np.ndarray, np.ndarray]:
        if not self.parts:
            return np.zeros((0, self.width), dtype=np.int64), np.zeros(0, dtype=np.int64)
        return _reduce(np.concatenate([p[0] for p in self.parts]), np.concatenate([p[1] for p in self.parts]))


def _int_column(t: pa.Table, name: str) -> np.ndarray:
    """A column as int64, null as :data:`NULL`."""
    col = t.column(name).combine_chunks()
    return col.cast(pa.int64()).fill_null(NULL).to_numpy()


def _train_aggregates(data_dir: str, manifest: Manifest, schema: SchemaConfig, rc: Any, fraction: float
                      ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[str]]:
    """One pass over the train split (after the validation cut ``fraction``), a row group at a time: the distinct
    (entity, item, relation features...) rows with their row counts, and the distinct clicks (entity, user, item)
    when ``co_click`` is a relation."""
    feats = [r for r in rc.relations if r not in (CO_CLICK, rc.item_feature)]
    co_click = CO_CLICK in rc.relations
    columns = list(dict.fromkeys(["entity", "label", rc.item_feature, schema.user_id_feature] + feats))
    items, clicks = _Aggregate(2 + len(feats)), _Aggregate(3)
    files = manifest.splits.get(physical_split(TRAIN_SPLIT, manifest), [])
    opened: Dict[int, pq.ParquetFile] = {}
    for fi, rg, start, stop in manifest.split_units(TRAIN_SPLIT, None, fraction):
        if fi not in opened:
            fs, path = storage.filesystem(storage.join(data_dir, files[fi].path))
            opened[fi] = pq.ParquetFile(path, filesystem=fs)
        t = opened[fi].read_row_group(rg, columns=columns).slice(start, stop - start)
        t = t.filter(t.column(rc.item_feature).is_valid())  # a row without an item relates nothing
        entity, item = _int_column(t, "entity"), _int_column(t, rc.item_feature)
        rows = np.stack([entity, item] + [_int_column(t, f) for f in feats], axis=1)  # (R, 2 + F)
        items.add(rows, np.ones(len(rows), dtype=np.int64))
        if co_click:
            pos = _int_column(t, "label") > 0
            clicked = np.stack([entity[pos], _int_column(t, schema.user_id_feature)[pos], item[pos]], axis=1)
            clicks.add(clicked, np.ones(len(clicked), dtype=np.int64))
    (rows, count), (clicked, _) = items.result(), clicks.result()
    return rows, count, clicked, feats


def related_items(data_dir: str, manifest: Manifest, schema: SchemaConfig, data: DataConfig,
                  log: bool = True) -> RelationTable:
    """The relation table of ``data.related_items`` from the dataset's train split (see the module docstring);
    computed once per process and cached.

    Raises:
        ValueError: (one line) no target item of the train split has a related source item through any configured
            relation.
    """
    rc = data.related_items
    fraction = data.validation_fraction
    cache_key = (storage.absolute(data_dir), fraction, rc.key, rc.item_feature, tuple(rc.relations), rc.max_related,
                 tuple((f.path, tuple(f.row_groups)) for fs in manifest.splits.values() for f in fs))
    if cache_key in _CACHE:
        return _CACHE[cache_key]
    rows, count, clicks, feats = _train_aggregates(data_dir, manifest, schema, rc, fraction)
    out, used = relate(rows, count, clicks, feats, rc.relations, rc.item_feature, rc.max_related)
    if not out:
        raise ValueError(f"{data_dir}: data.related_items.relations {list(rc.relations)}: no target item of the train "
                         f"split has a related source item through any of them (no shared {rc.item_feature!r} ids, "
                         "no shared values of the named features, no users who clicked items of both entities); add "
                         "a relation the data has (e.g. co_click, or a feature both entities share)")
    target_ids = np.array(sorted(out), dtype=np.int64)
    lens = np.array([len(out[int(i)]) for i in target_ids], dtype=np.int64)
    raw = np.concatenate([out[int(i)] for i in target_ids]).astype(np.int64)
    table_name = schema.table_of(rc.item_feature)
    table = RelationTable(rc.key, rc.item_feature, target_ids, offsets_of(lens),
                          map_ids(raw, table_name, schema.tables[table_name]), used)
    if log:
        logger.info("%s: related source items of %d target items (train split; data.related_items.max_related=%d): "
                    "%s", data_dir, len(target_ids), rc.max_related,
                    ", ".join(f"{r} {n}" for r, n in used.items()))
    _CACHE[cache_key] = table
    return table


__all__ = ["CO_CLICK", "RelationTable", "relate", "related_items"]
