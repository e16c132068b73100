"""The synthetic dataset in Tenrec's CSV layout: ``QK-video.csv`` + ``QK-article.csv`` for ``mkt tenrec``.

It checks the Tenrec path (``mkt tenrec`` conversion, ``configs/tenrec.yaml`` training) on data whose
structure and best achievable GAUC are known. :func:`write_tenrec_csvs` runs the synthetic generator
(:func:`mkt_torchrec.data.synth.generate`, into a temporary directory beside ``out_dir``, removed afterwards),
reads its train and test rows back and writes them as Tenrec's two files: products (entity 0) as QK-video,
posts (entity 1) as QK-article. Both files carry exactly Tenrec's columns (``tenrec.VIDEO_COLUMNS`` /
``tenrec.ARTICLE_COLUMNS``, in that order) plus a trailing ``true_prob`` (the row's true like probability),
which ``mkt tenrec`` carries into the dataset, so ``mkt evaluate`` and the reports show the ceiling.

**Columns.** Both files: ``user_id``, ``gender``, ``age`` from the row; ``item_id`` the item's catalogue
index (synth's id without its ``TARGET_ID_OFFSET``: the converter namespaces ids itself); ``like`` = label.

* QK-video: ``video_category`` = category; ``click`` = 1 where liked, else a Bernoulli(``VIDEO_CLICK_RATE``)
  draw (never a feature); ``follow``, ``share``, ``watching_times`` = 0. The product's ``price_bucket``,
  ``condition`` and ``log_price`` have no Tenrec column and are dropped, so the price preference planted in
  the labels is not observable here (the source entity's ceiling stays ``true_prob``'s).
* QK-article (clicked rows only, ``click`` = 1): ``category_second`` = category, ``category_first`` =
  category // 8; ``item_score1`` = style (informative: users have a style preference), ``item_score2`` =
  post_length (noise), ``item_score3`` = ``clip(round(2 * bias + 4 + e), 0, 9)`` with ``bias`` the post's
  planted click bias and ``e ~ N(0, SCORE3_NOISE)`` drawn once per post (informative item quality);
  ``exposure_count`` = ``click_count`` = the post's impressions in the whole data; ``like_count`` = its likes
  in the whole data (a leak the converter excludes); ``comment_count``, ``read_percentage``, ``read``,
  ``read_time``, ``share``, ``follow``, ``favorite`` = 0 (all excluded as features).

**Time order.** Tenrec files carry no timestamp: rows are in time order, and ``mkt tenrec`` merges the two files
by relative position (video row ``i`` of ``N_video`` at ``i / N_video``, article row ``j`` at ``j / N_article``,
a video row first on ties). Each row gets a time: per user, sorted uniforms over the user's rows of both
entities, the synthetic train split's rows first (in their written order), then its test rows. Each file is
sorted by that time, and the files' rows are then moved, where needed, so that on the converter's merged
timeline every user's train rows come before all of its test rows *exactly*: a file position is a fixed
slot of that timeline, so a user's train rows must take slots before a boundary between its last train and
first test time and its test rows the slots after it; the few rows whose slot falls on the wrong side (the
empirical spread of a file's times around its slots, about ``sqrt(N)`` positions) swap with the nearest row
of another user that fits at both places. Users are interleaved over the whole period. With
``tenrec.split: per_user`` and ``tenrec.test_fraction`` = ``synth.test_fraction`` the converter's test rows then
hold every synthetic test row, plus the last train row of users whose row count times the fraction is not whole
(the generator rounds a user's train rows up, the converter its test rows).

**Memory.** The dataset is held in memory (a test-data tool): the rows' scalar columns, not the behaviour
sequences (the converter rebuilds those from the likes), processed as numpy arrays. The generator's own peak
dominates: ``mkt synth --layout tenrec`` peaked at 0.87 GB for the quickstart's 200k rows (as the Parquet
layout does) and 1.1 GB for 2M rows. Randomness (video clicks, ``item_score3``'s noise, the times) is seeded by
``synth.seed``, apart from the generator's own streams, so the files are the same for the same config.

**Atomic output.** Both files are written into a temporary directory beside ``out_dir``, which is renamed to
``out_dir`` once both are complete: an interrupted run leaves no half-written file under ``out_dir``.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mkt_torchrec.config import Config
from mkt_torchrec.data.dataset import Manifest
from mkt_torchrec.data.synth import TARGET_ID_OFFSET, _World, generate
from mkt_torchrec.data.tenrec import ARTICLE_COLUMNS, VIDEO_COLUMNS, _merge_positions
from mkt_torchrec.fsutil import claim_output, replace_dir

VIDEO_FILE, ARTICLE_FILE = "QK-video.csv", "QK-article.csv"
TRUE_PROB = "true_prob"
VIDEO_CLICK_RATE = 0.3  # P(click) of a video row that is not liked (a liked row is always clicked)
SCORE3_NOISE = 0.5  # standard deviation of the noise in item_score3 (2 x a bias of standard deviation 0.3)
_RNG_STREAM = 7  # default_rng([synth.seed, 7]): apart from the generator's [seed, 1] and [seed, 2, chunk]
# --set overrides that size configs/tenrec.yaml for the quickstart's synthetic data on a small CPU machine (its
# user_id / item_id tables have 8M rows, for Tenrec's millions of ids). The schema ones also go to `mkt tenrec`.
QUICKSTART_SCHEMA_SETTINGS = ("schema.tables.user_id.rows=40000", "schema.tables.item_id.rows=50000")
QUICKSTART_TRAIN_SETTINGS = ("data.batch_size=512", "data.num_workers=0", "data.shuffle_window_rows=131072",
                             "data.validation_fraction=0.2", "train.patience=1", "train.max_epochs=8",
                             "train.finetune_dense_lr=0.0003")
_COLUMNS = ("entity", "label", "user_id", "age", "gender", "item_id", "category", "style", "post_length",
            TRUE_PROB)


def write_tenrec_csvs(cfg: Config, out_dir: str, overwrite: bool = False,
                      progress: Optional[Callable[[int], None]] = None) -> dict:
    """Write the synthetic dataset of ``cfg`` (its ``synth`` section) as ``out_dir/QK-video.csv`` and
    ``out_dir/QK-article.csv`` (see the module docstring). Returns a summary: paths, row counts per file and
    per synthetic split, users.

    Args:
        cfg: the config; ``cfg.schema`` must be the synthetic generator's (``configs/quickstart.yaml``'s).
        out_dir: directory to create; ``overwrite`` replaces one this function wrote, once the new is complete.
        progress: called with the number of synthetic rows generated after each chunk.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false, or it holds other files.
        ValueError: a schema the generator cannot fill.
    """
    out_dir = claim_output(out_dir, overwrite, (VIDEO_FILE, ARTICLE_FILE), "a directory of Tenrec-layout CSVs")
    parent = os.path.dirname(out_dir)
    with tempfile.TemporaryDirectory(prefix=".synth-tenrec-", dir=parent) as tmp:
        manifest = generate(cfg, os.path.join(tmp, "synth"), progress=progress)
        rows = _read_rows(os.path.join(tmp, "synth"), manifest)
        rng = np.random.default_rng([cfg.synth.seed, _RNG_STREAM])
        order = _file_orders(rows, rng)
        staging = os.path.join(tmp, "out")
        os.makedirs(staging)
        _write_csv(os.path.join(staging, VIDEO_FILE), _video_table(rows, order[0], rng))
        _write_csv(os.path.join(staging, ARTICLE_FILE), _article_table(rows, order[1], cfg, rng))
        replace_dir(staging, out_dir)
    return {
        "out": out_dir,
        "video": os.path.join(out_dir, VIDEO_FILE), "article": os.path.join(out_dir, ARTICLE_FILE),
        "rows": {"video": int(order[0].size), "article": int(order[1].size)},
        "synth_rows": manifest.rows,
        "users": int(np.unique(rows["user_id"]).size),
    }


def _read_rows(data_dir: str, manifest: Manifest) -> dict[str, np.ndarray]:
    """The scalar columns of every row, train split then test split (each in manifest order), and ``test``."""
    tables, test = [], []
    for split in ("train", "test"):
        for fi in manifest.splits.get(split, []):
            t = pq.read_table(os.path.join(data_dir, fi.path), columns=list(_COLUMNS))
            tables.append(t)
            test.append(np.full(t.num_rows, split == "test"))
    table = pa.concat_tables(tables)
    rows = {c: table.column(c).to_numpy() for c in _COLUMNS if c not in ("style", "post_length")}
    for c in ("style", "post_length"):  # null on product rows
        rows[c] = table.column(c).fill_null(0).to_numpy()
    rows["test"] = np.concatenate(test)
    # the catalogue index: synth puts posts at TARGET_ID_OFFSET + index
    rows["item"] = rows["item_id"] - np.where(rows["entity"] == 1, TARGET_ID_OFFSET, 0)
    return rows


# --------------------------------------------------------------------------------------------------------
# Time order
# --------------------------------------------------------------------------------------------------------


def _file_orders(rows: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of QK-video and of QK-article in file order (see "Time order" in the module docstring)."""
    user, test, entity = rows["user_id"], rows["test"], rows["entity"]
    n = user.size
    # each user's rows in their order (train rows, then test rows; each in the order read) get sorted uniforms
    seq = np.lexsort((np.arange(n), test, user))
    draws = rng.uniform(size=n)
    t = np.empty(n)
    t[seq] = draws[np.lexsort((draws, user[seq]))]
    # per user: a boundary between the last train time and the first test time (2.0, after all: no test row)
    _, inv = np.unique(user, return_inverse=True)
    last_train = np.full(inv.max() + 1 if n else 0, -np.inf)
    first_test = np.full(last_train.size, np.inf)
    np.maximum.at(last_train, inv[~test], t[~test])
    np.minimum.at(first_test, inv[test], t[test])
    has_test = np.isfinite(first_test)
    bound = np.where(has_test, (np.maximum(last_train, 0.0) + first_test) / 2, 2.0)
    # the converter's merged timeline: merged position of each file position of both files
    counts = [int((entity == code).sum()) for code in (0, 1)]
    slots = _merge_positions(0, counts[0], 0, counts[1], counts[0], counts[1])
    total = counts[0] + counts[1]
    cut = np.minimum(np.ceil(bound * total), total + 1).astype(np.int64)[inv]  # a row's boundary, merged position
    orders = []
    for code in (0, 1):
        idx = np.flatnonzero(entity == code)
        file_order = idx[np.argsort(t[idx], kind="stable")]
        # file positions before the boundary (train rows) / from it on (test rows): slots[p] < cut
        before = np.searchsorted(slots[code], cut[file_order])
        is_test = test[file_order]
        lo = np.where(is_test, before, 0)
        hi = np.where(is_test, counts[code], before)
        orders.append(_fit_to_intervals(file_order, lo, hi))
    return orders[0], orders[1]


def _fit_to_intervals(items: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Reorder ``items`` (with allowed positions ``lo[p] <= p' < hi[p]`` for the item now at position p) so
    that every item sits in its interval, moving few: each misplaced item swaps with the nearest item inside
    its interval that may take its place. Both then fit, so each swap removes a misplacement."""
    items, lo, hi = items.copy(), lo.copy(), hi.copy()
    for p in np.flatnonzero((np.arange(items.size) < lo) | (np.arange(items.size) >= hi)):
        if lo[p] <= p < hi[p]:  # an earlier swap put a fitting item here
            continue
        radius = 64
        while True:
            a, b = max(lo[p], p - radius), min(hi[p], p + radius + 1)
            cand = a + np.flatnonzero((lo[a:b] <= p) & (p < hi[a:b]))
            if cand.size:
                q = int(cand[np.argmin(np.abs(cand - p))])
                break
            if a == lo[p] and b == hi[p]:
                raise RuntimeError(f"synth_tenrec: no place for item {int(items[p])} in [{lo[p]}, {hi[p]}); "
                                   "the data is too small to interleave, raise synth.users or synth.source_rows")
            radius *= 4
        for arr in (items, lo, hi):
            arr[p], arr[q] = arr[q], arr[p]
    return items


# --------------------------------------------------------------------------------------------------------
# The two files
# --------------------------------------------------------------------------------------------------------


def _video_table(rows: dict[str, np.ndarray], order: np.ndarray, rng: np.random.Generator) -> pa.Table:
    like = rows["label"][order].astype(np.int64)
    zero = np.zeros(order.size, np.int64)
    cols = {
        "user_id": rows["user_id"][order], "item_id": rows["item"][order],
        "click": np.where(like == 1, 1, (rng.uniform(size=order.size) < VIDEO_CLICK_RATE).astype(np.int64)),
        "follow": zero, "like": like, "share": zero, "video_category": rows["category"][order],
        "watching_times": zero, "gender": rows["gender"][order], "age": rows["age"][order],
    }
    return _table(cols, VIDEO_COLUMNS, rows[TRUE_PROB][order])


def _article_table(rows: dict[str, np.ndarray], order: np.ndarray, cfg: Config,
                   rng: np.random.Generator) -> pa.Table:
    n_items = cfg.synth.target_items
    bias = _World(cfg).items[1]["bias"]  # (I,) the planted click bias of each post, by catalogue index
    score3 = np.clip(np.round(2 * bias + 4 + SCORE3_NOISE * rng.normal(size=n_items)), 0, 9).astype(np.int64)
    item = rows["item"][order]
    like = rows["label"][order].astype(np.int64)
    exposures = np.bincount(item, minlength=n_items)  # QK-article rows are the post impressions
    likes = np.bincount(item, weights=like, minlength=n_items).astype(np.int64)
    category = rows["category"][order]
    zero = np.zeros(order.size, np.int64)
    cols = {
        "user_id": rows["user_id"][order], "item_id": item, "click": zero + 1,
        "gender": rows["gender"][order], "age": rows["age"][order],
        "exposure_count": exposures[item], "click_count": exposures[item], "like_count": likes[item],
        "comment_count": zero, "read_percentage": zero,
        "item_score1": rows["style"][order], "item_score2": rows["post_length"][order],
        "category_second": category, "category_first": category // 8, "item_score3": score3[item],
        "read": zero, "read_time": zero, "share": zero, "like": like, "follow": zero, "favorite": zero,
    }
    return _table(cols, ARTICLE_COLUMNS, rows[TRUE_PROB][order])


def _table(cols: dict[str, np.ndarray], names: tuple[str, ...], true_prob: np.ndarray) -> pa.Table:
    return pa.table({**{c: pa.array(cols[c].astype(np.int64)) for c in names},
                     TRUE_PROB: pa.array(true_prob.astype(np.float32))})  # float32 prints its shortest repr


def _write_csv(path: str, table: pa.Table) -> None:
    with open(path, "wb") as f:
        f.write((",".join(table.column_names) + "\n").encode())  # unquoted, as Tenrec's headers are
        pacsv.write_csv(table, f, pacsv.WriteOptions(include_header=False, quoting_style="none"))
