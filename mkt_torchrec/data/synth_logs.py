"""The synthetic dataset as raw impression logs, laid out as a marketplace's Spark job leaves them, for ``mkt build``.

It gives ``mkt build`` (its README example and its tests) logs whose structure and best achievable GAUC are
known. :func:`write_logs` runs the synthetic generator (:func:`mkt_torchrec.data.synth.generate`, into a
temporary directory beside ``out_dir``, removed afterwards), reads its train and test rows back
(:func:`mkt_torchrec.data.synth_tenrec._read_rows`) and writes them as one event per row, both entities
together, in the logs' own column names: what a ``df.repartition(files_per_day).write.partitionBy("dt")
.parquet(out_dir)`` leaves::

    out_dir/_SUCCESS                                              empty, written last (Spark's commit marker)
    out_dir/_mkt_synth_logs.json                                  how the logs were made (see Atomic output)
    out_dir/dt=2026-11-01/part-00000-<uuid>.c000.snappy.parquet   a day's rows, in files_per_day files
    out_dir/dt=2026-11-01/part-00001-<uuid>.c000.snappy.parquet
    ...
    out_dir/dt=2026-11-14/part-00002-<uuid>.c000.snappy.parquet

``part-NNNNN`` is the writing task's index, so each day directory holds ``part-00000`` ... (a day with fewer
rows than ``files_per_day`` holds fewer files; a day with no row has no directory); ``<uuid>`` is the job's, one
for every file (drawn from the seed, so it repeats with the config); ``c000`` the task's first file. Files are
snappy-compressed, in row groups of at most ``row_group_rows`` rows, of one size within a file (no small last
group). The partition column ``dt`` is in the directory names only, not in the files, as Spark writes it;
readers with hive partitioning (Spark, pyarrow, DuckDB, ``mkt build``) read it back as a column. Within a day the
rows are shuffled (no time order, no grouping by user or entity) and dealt to the day's files in equal runs:
every file and row group mixes both entities (a row group of n rows holds no post with probability about
0.76**n: nil at real sizes; the tests check their groups of 32 to 64 rows). Timestamps are Parquet
``TIMESTAMP(MICROS, UTC)``, what Spark writes with ``spark.sql.parquet.outputTimestampType=TIMESTAMP_MICROS``
(its default, INT96, is deprecated in Parquet); the files carry no ``ARROW:schema`` metadata, so every type is
read from the Parquet schema, as from Spark's files. Hadoop's local ``.crc`` checksum files are not written.

**Columns** (in this order; every one nullable, as Spark writes them):

===============  ===================  ==============================================================================
``uid``          string               ``"u"`` + the user index zero-padded to the width of ``synth.users - 1``
``item``         string               ``"p<index>"`` for products, ``"c<index>"`` for posts: the catalogue index,
                                    in two namespaces (``p7`` and ``c7`` are different items)
``item_type``    string               ``"product"`` (the source entity) / ``"post"`` (the target entity)
``clicked``      int32                the label, 0 / 1
``event_time``   timestamp[us, UTC]   when the impression happened (see Times)
``age``          int32                the user's age group, 0-6
``gender``       int32                0 / 1
``category``     string               ``"cat<k>"``, k the item's category (shared by both entities)
``price``        float64              products: ``expm1(log_price + PRICE_LOG_OFFSET)`` (see Price); posts: null
``condition``    string               products: one of :data:`CONDITIONS` (noise in the labels); posts: null
``style``        int32                posts: 0-7 (users have a style preference); products: null
``post_length``  int32                posts: 0-7 (noise); products: null
``true_prob``    float32              the row's true click probability (its AUC / GAUC is the ceiling)
===============  ===================  ==============================================================================

There are no behaviour sequence columns: ``mkt build`` makes the sequences from the events (a user's clicked
rows before each row), so they differ from the generator's, which hold behaviour before its logging window.

**Price.** The generator draws a product's ``price_bucket`` b in 0..15 and ``log_price = (b + u) / 4 - 2`` with
``u ~ U[0, 1)``, so ``log_price`` lies in [-2, 2). A price whose ``log1p`` *equals* ``log_price`` would be
negative for half the products (``expm1(-2) = -0.86``), so the price is ``expm1(log_price + 2)``: the
smallest shift that makes every price non-negative. It lies in [0, 53.6), ``log1p(price)`` is ``log_price + 2``
exactly (up to float64 rounding), an affine image of the generator's feature (the same feature to any model
with a bias), and ``floor(4 * log1p(price))`` is ``price_bucket``: ``mkt build``'s ``transform: bucket`` with
:data:`PRICE_BOUNDARIES` (``expm1(k / 4)``, k = 1..15) gives ``1 + price_bucket``. The catalogue's float64
``log_price`` is used (:class:`mkt_torchrec.data.synth._World`), not the dataset's float32 copy; prices are
not rounded to cents, which would move a few items across a bucket boundary.

**Times.** Each user's rows spread over the ``days`` days from ``start`` (00:00 UTC) in the generator's time
order: its train rows (in the order written, the generator's earlier ones first), then its test rows; as in
:mod:`~mkt_torchrec.data.synth_tenrec`, the user's rows take sorted uniform draws over the period, here whole
microseconds. Ties within a user are then broken by moving a time forward by 1 us (draws are made below
``period - rows of the largest user``, so a moved time never leaves the period): a user's times are strictly
increasing, so every synthetic train row is strictly before every test row of its user, and no two events of
one user share a timestamp. Different users' events may share a microsecond (rarely: about rows**2 /
(2 * period) pairs, 0.02 for the quickstart); nothing depends on their order. Users are active over the whole
period, so a time split (``split.by: time``) cuts every user, and ``split.by: user_fraction`` with
``test_fraction`` = ``synth.test_fraction`` reproduces the generator's test split up to the rounding of each
user's count: at most one row per user (the generator rounds a user's train rows up; ``mkt build`` on the
quickstart's logs puts 43,315 rows in test where the generator has 35,311, for 9,924 users). ``dt`` is the UTC day of ``event_time``.

**Memory.** The rows are held in memory as numpy arrays (a test-data tool), the behaviour sequences not read;
the generator's own peak dominates, as for ``mkt synth --layout tenrec``. Randomness (the times, the shuffles,
the job uuid) is seeded by ``synth.seed`` in a stream apart from the generator's, so the same config writes
the same bytes (a Parquet file records no time of writing).

**Atomic output.** Everything is written into a temporary directory beside ``out_dir``, renamed to ``out_dir``
once complete, with ``_SUCCESS`` written last. ``_mkt_synth_logs.json`` (the synth config, ``start``, ``days``,
``files_per_day`` and the price offset) is what ``overwrite`` looks for before replacing a directory: a real
Spark output also has a ``_SUCCESS``, and must not be deleted by mistake. Like ``_SUCCESS`` it begins with
``_``, which every Hadoop-style reader (Spark, pyarrow, ``mkt build``) skips.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mkt_torchrec.config import Config
from mkt_torchrec.data.synth import _World, generate
from mkt_torchrec.data.synth_tenrec import TRUE_PROB, _read_rows
from mkt_torchrec.fsutil import claim_output, replace_dir

SUCCESS, MARKER = "_SUCCESS", "_mkt_synth_logs.json"
ENTITY_NAMES = ("product", "post")  # item_type of entity code 0 (source) / 1 (target)
ITEM_PREFIXES = ("p", "c")
CONDITIONS = ("new", "like_new", "good", "fair")  # synth's condition code 0..3
PRICE_LOG_OFFSET = 2.0  # log1p(price) = synth's log_price + 2 (see "Price")
PRICE_BOUNDARIES = tuple(float(np.expm1(k / 4)) for k in range(1, 16))  # transform: bucket -> 1 + price_bucket
ROW_GROUP_ROWS = 5000
DAY_US = 86_400_000_000
_RNG_STREAM = 8  # default_rng([synth.seed, 8]): apart from the generator's [seed, 1], [seed, 2, chunk] and tenrec's 7
SCHEMA = pa.schema([
    ("uid", pa.string()), ("item", pa.string()), ("item_type", pa.string()), ("clicked", pa.int32()),
    ("event_time", pa.timestamp("us", tz="UTC")), ("age", pa.int32()), ("gender", pa.int32()),
    ("category", pa.string()), ("price", pa.float64()), ("condition", pa.string()), ("style", pa.int32()),
    ("post_length", pa.int32()), (TRUE_PROB, pa.float32()),
])


def write_logs(cfg: Config, out_dir: str, overwrite: bool = False,
               progress: Callable[[int], None] | None = None, days: int = 14, start: str = "2026-11-01",
               files_per_day: int = 3, row_group_rows: int = ROW_GROUP_ROWS) -> dict:
    """Write the synthetic dataset of ``cfg`` (its ``synth`` section, seeded by ``synth.seed``) as day-partitioned
    Parquet impression logs under ``out_dir`` (see the module docstring). Returns a summary: ``out_dir``, rows and
    clicks per entity (``product`` / ``post``), users, days (day directories) and files (part files).

    Args:
        cfg: the config; ``cfg.schema`` must be the synthetic generator's (``configs/quickstart.yaml``'s).
        out_dir: directory to create; ``overwrite`` replaces one this function wrote, once the new is complete.
        progress: called with the number of synthetic rows generated after each chunk.
        days: days the events spread over.
        start: the first day, ``YYYY-MM-DD`` (UTC).
        files_per_day: part files per day directory (the writing job's tasks).
        row_group_rows: rows per Parquet row group.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false, or it holds files this function did not write.
        ValueError: a bad ``days`` / ``start`` / ``files_per_day`` / ``row_group_rows``, or a schema the generator
            cannot fill.
    """
    first_day = _check_args(days, start, files_per_day, row_group_rows)
    out_dir = claim_output(out_dir, overwrite, (MARKER,), "a directory of synthetic logs")
    parent = os.path.dirname(out_dir)
    with tempfile.TemporaryDirectory(prefix=".synth-logs-", dir=parent) as tmp:
        manifest = generate(cfg, os.path.join(tmp, "synth"), progress=progress)
        rows = _read_rows(os.path.join(tmp, "synth"), manifest)
        rng = np.random.default_rng([cfg.synth.seed, _RNG_STREAM])
        times = _event_times(rows["user_id"], rows["test"], days * DAY_US, rng)
        table = _log_table(rows, times + first_day.astype("datetime64[us]").astype(np.int64), cfg)
        staging = os.path.join(tmp, "out")
        os.makedirs(staging)
        n_days, n_files = _write_days(staging, table, times // DAY_US, first_day, files_per_day, row_group_rows,
                                      rng)
        with open(os.path.join(staging, MARKER), "w", encoding="utf-8") as f:
            json.dump({"written_by": __name__, "start": str(first_day), "days": days, "files_per_day": files_per_day,
                       "row_group_rows": row_group_rows, "price_log_offset": PRICE_LOG_OFFSET,
                       "synth": asdict(cfg.synth)}, f, indent=1, sort_keys=True)
        open(os.path.join(staging, SUCCESS), "wb").close()
        replace_dir(staging, out_dir)
    entity, label = rows["entity"], rows["label"]
    return {
        "out_dir": out_dir,
        "rows": {name: int((entity == code).sum()) for code, name in enumerate(ENTITY_NAMES)},
        "clicks": {name: int(label[entity == code].sum()) for code, name in enumerate(ENTITY_NAMES)},
        "users": int(np.unique(rows["user_id"]).size),
        "days": n_days,
        "files": n_files,
    }


def _check_args(days: int, start: str, files_per_day: int, row_group_rows: int) -> np.datetime64:
    for name, value in (("days", days), ("files_per_day", files_per_day), ("row_group_rows", row_group_rows)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"synth logs: {name} = {value!r}; expected a positive integer")
    try:
        first_day = np.datetime64(start, "D")
    except (TypeError, ValueError):
        raise ValueError(f"synth logs: start = {start!r}; expected a day, YYYY-MM-DD") from None
    if str(first_day) != start:
        raise ValueError(f"synth logs: start = {start!r}; expected a day, YYYY-MM-DD")
    return first_day


def _event_times(user: np.ndarray, test: np.ndarray, period_us: int, rng: np.random.Generator) -> np.ndarray:
    """Each row's time in microseconds from the period's start (see "Times" in the module docstring)."""
    n = user.size
    seq = np.lexsort((np.arange(n), test, user))  # each user's rows in time order: train rows (as read), then test
    useq = user[seq]
    largest = int(np.bincount(np.unique(useq, return_inverse=True)[1]).max()) if n else 0
    if largest > period_us:
        raise ValueError(f"synth logs: a user has {largest} rows, more than the {period_us} microseconds of the "
                         "period; raise days")
    draws = rng.integers(0, period_us - largest + 1, size=n)  # room for the tie-breaking moves below
    t = draws[np.lexsort((draws, useq))]  # sorted within each user's run of seq
    same_user = useq[1:] == useq[:-1]
    while True:  # a tie within a user moves the later time 1 us on (each pass resolves one more of a run)
        tie = same_user & (t[1:] <= t[:-1])
        if not tie.any():
            break
        t[1:][tie] = t[:-1][tie] + 1
    out = np.empty(n, np.int64)
    out[seq] = t
    return out


def _log_table(rows: dict[str, np.ndarray], event_us: np.ndarray, cfg: Config) -> pa.Table:
    """Every row in the logs' columns (:data:`SCHEMA`), in the order read."""
    sc = cfg.synth
    entity, item = rows["entity"].astype(np.int64), rows["item"]
    product = entity == 0
    width = len(str(max(sc.users - 1, 0)))
    uids = pa.array([f"u{u:0{width}d}" for u in range(sc.users)])
    items = pa.array([f"{ITEM_PREFIXES[code]}{i}" for code, n in ((0, sc.source_items), (1, sc.target_items))
                      for i in range(n)])
    catalogue = _World(cfg).items[0]
    price = np.expm1(catalogue["log_price"][np.where(product, item, 0)] + PRICE_LOG_OFFSET)
    condition = catalogue["condition"][np.where(product, item, 0)]

    def int32(name: str) -> pa.Array:
        return pa.array(rows[name].astype(np.int32))

    def posts_only(name: str) -> pa.Array:  # _read_rows fills the null of product rows with 0
        return pa.array(rows[name].astype(np.int32), mask=product)

    columns = {
        "uid": uids.take(pa.array(rows["user_id"])),
        "item": items.take(pa.array(item + np.where(product, 0, sc.source_items))),
        "item_type": pa.array(ENTITY_NAMES).take(pa.array(entity)),
        "clicked": int32("label"),
        "event_time": pa.array(event_us, pa.timestamp("us", tz="UTC")),
        "age": int32("age"),
        "gender": int32("gender"),
        "category": pa.array([f"cat{k}" for k in range(sc.categories)]).take(pa.array(rows["category"])),
        "price": pa.array(price, mask=~product),
        "condition": pa.array(CONDITIONS).take(pa.array(condition, mask=~product)),
        "style": posts_only("style"),
        "post_length": posts_only("post_length"),
        TRUE_PROB: pa.array(rows[TRUE_PROB].astype(np.float32)),
    }
    return pa.table(columns, schema=SCHEMA)


def _write_days(out_dir: str, table: pa.Table, day: np.ndarray, first_day: np.datetime64, files_per_day: int,
                row_group_rows: int, rng: np.random.Generator) -> tuple[int, int]:
    """Write each day's rows, shuffled, into its ``dt=`` directory's part files. Returns (days, files) written."""
    job = uuid.UUID(bytes=rng.bytes(16), version=4)
    order = np.argsort(day, kind="stable")
    bounds = np.searchsorted(day[order], np.arange(int(day.max()) + 2 if day.size else 0))
    n_days = n_files = 0
    for d in range(bounds.size - 1):
        rows = order[bounds[d]:bounds[d + 1]]
        if rows.size == 0:
            continue
        day_dir = os.path.join(out_dir, f"dt={first_day + d}")
        os.makedirs(day_dir)
        rows = rng.permutation(rows)  # no time order within a day
        for task, part in enumerate(p for p in np.array_split(rows, files_per_day) if p.size):
            path = os.path.join(day_dir, f"part-{task:05d}-{job}.c000.snappy.parquet")
            group_rows = -(-part.size // -(-part.size // row_group_rows))  # even groups: no small last one
            # no ARROW:schema metadata: the types are read from the Parquet schema, as from Spark's files
            pq.write_table(table.take(pa.array(part)), path, row_group_size=group_rows, compression="snappy",
                           store_schema=False)
            n_files += 1
        n_days += 1
    return n_days, n_files
