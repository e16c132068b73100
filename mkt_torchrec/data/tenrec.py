"""Convert Tenrec's ``QK-video.csv`` (source entity) and ``QK-article.csv`` (target entity) into a dataset.

The paper (section 4.1.1) uses QK-video as the source entity and QK-article as the target entity, with
``like`` as the label of both (QK-article holds clicked impressions only: its ``click`` is always 1).

**One timeline.** Both files are in time order but carry no timestamp, and they cover the same period. Row
``i`` of the video file is placed at time ``i / N_video`` and row ``j`` of the article file at
``j / N_article``; the two are merged by that time (a video row first on ties, compared exactly as
``i * N_article`` vs ``j * N_video``). The row counts come from a first, counting pass.

**Two passes, bounded memory.** Pass 1 streams only ``user_id`` of both files: row counts, the distinct
users (dense indices ``0..U-1``) and each user's number of rows. Pass 2 streams both files again in windows of
about ``tenrec.chunk_rows`` merged rows and writes them through a :class:`DatasetWriter` (atomically: any
exception, including one from ``progress``, leaves no finished-looking output). Memory is the window plus
per-user state: a few int arrays of U entries and each user's last ``max_len`` liked items, with their side
values (:class:`_SeqStore`: power-of-two capacity tiers, so memory follows the likes actually stored rather than
``U x max_len``; one int64 per stored like for the item, and one more per side feature).

**Causal behaviour sequences.** For every sequence of the schema (``entity`` + ``shared_feature``), a row's
sequence is the shared-feature values of the user's liked rows of that entity strictly before the row on the
merged timeline, the most recent ``max_len`` kept, oldest first. Within a window this is vectorised: rows are
grouped by user (stable sort), and each row takes ``last max_len of (stored likes of u) + (u's likes earlier
in this window)`` with numpy gathers. ``activity`` is the user's number of earlier likes of both entities.

**Side features.** A sequence's ``side_features`` (``{category: hist_source_categories}``) name item attributes
the converter produces for that entity's rows (``_side_features_of``: ``category``, ``item_id`` beside a category
sequence, and the entity's specific features, e.g. ``item_score1`` for articles; anything else is a ValueError).
Each like is stored with its row's values of them, encoded exactly as the row's own feature (``category`` is the
namespaced ``2 * x + entity``), so a step and a candidate look up the same table row for the same value. Each
side column is written with the sequence's offsets: one value per step, oldest first, the same last ``max_len``,
causal as the items are. A side column holds no nulls (the reader refuses them, and a step needs a value):
a liked row whose side feature is missing gives ``MISSING_RAW`` (2**61 - 1, above every real id) through the
feature's encoding (``2 * MISSING_RAW + entity`` for ``category``), or log bucket 0 (``MISSING_BUCKET``; real
buckets are 1..255). The reader maps it to a table row like any id, so such a step adds one learned "missing"
embedding, while a candidate whose own value is missing adds nothing to the query (a null feature is a zero
vector). A hashed table keeps that row apart from the real values'; a modulo table of ``R`` rows, a power of
two, puts it in row ``R - 2`` (videos) or ``R - 1`` (articles), shared with a real value only if ids reach there.

**Split.** ``tenrec.split=per_user``: each user's last ``test_fraction`` of rows in merged time order is
test (row rank ``>= floor((1 - f) * n_user)``, as the synthetic generator does). ``global`` (the paper): the
last ``test_fraction`` of each file (file row ``>= floor((1 - f) * N_file)``). Sequences run across the
boundary either way: a test row's history includes the user's earlier (train) likes.

**Ids.** Item ids and categories of the two entities share tables but never values: a raw value ``x`` becomes
``2 * x + entity`` (video even, article odd), so video item 5 and article item 5 are different ids. Item
scores and counts become signed log buckets (``_log_bucket``). Missing values (``\\N``, empty) are null (in a
side column, which has no nulls, a reserved value: see "Side features").

Which columns are features, and which are excluded as labels or leaks, is listed in ``PRODUCED`` /
``EXCLUDED`` below and argued in ``configs/tenrec.yaml``.

**true_prob.** A file may add a ``true_prob`` column (``OPTIONAL_COLUMNS``: the row's true like probability,
which ``mkt synth --layout tenrec`` writes). When both files have it, the second pass reads it like the other
columns and writes it as the dataset's optional float32 ``true_prob`` column (as synthetic datasets have it), so
evaluation reports the best achievable AUC / GAUC; a missing value or one outside [0, 1] is an error naming the
file, column and row. When only one file has it, the conversion fails before writing anything, naming both.
Any other column outside Tenrec's layout is an error.

**Parsing.** Columns are read with ``pyarrow.csv.open_csv`` as float64 (QK-article writes integers as ``1.0``;
ids below 2**53 are exact) and integer columns are checked to hold whole numbers; only the columns the schema
needs are converted. Header problems, unparsable or missing values and ragged rows raise ``ValueError`` naming
the file, the column and the row. CSV parsing and Parquet encoding each run in one background thread (both
release the GIL), overlapping the numpy work of the window in between.
"""

from __future__ import annotations

import collections
import os
import queue
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from mkt_torchrec.config import Config
from mkt_torchrec.data.dataset import DatasetWriter, Manifest
from mkt_torchrec.data.jagged import offsets_of

VIDEO_COLUMNS = ("user_id", "item_id", "click", "follow", "like", "share", "video_category", "watching_times",
                 "gender", "age")
ARTICLE_COLUMNS = ("user_id", "item_id", "click", "gender", "age", "exposure_count", "click_count", "like_count",
                   "comment_count", "read_percentage", "item_score1", "item_score2", "category_second",
                   "category_first", "item_score3", "read", "read_time", "share", "like", "follow", "favorite")
LABEL = "like"
TRUE_PROB = "true_prob"
OPTIONAL_COLUMNS = (TRUE_PROB,)  # columns a file may add after Tenrec's (see "true_prob" above)

# Columns never read as features. Post-impression behaviour is the label or leaks it; the item-level like /
# comment totals include the impression's own engagement (see configs/tenrec.yaml).
EXCLUDED = {
    "video": ("click", "follow", "like", "share", "watching_times"),
    "article": ("click", "read_percentage", "read", "read_time", "share", "like", "follow", "favorite",
                "like_count", "comment_count"),
}

# feature -> (csv column, transform) per file. Transforms: "int" (integer id as is), "ns" (integer id
# namespaced by entity: 2 * x + entity), "score" (log bucket, 8 per octave), "count" (log bucket, 2 per octave).
_USER_AND_ITEM = {  # the user profile and the item id: the same columns in both files
    "user_id": ("user_id", "int"),
    "gender": ("gender", "int"),
    "age": ("age", "int"),
    "item_id": ("item_id", "ns"),
}
VIDEO_FEATURES = {
    **_USER_AND_ITEM,
    "category": ("video_category", "ns"),
    "video_category_raw": ("video_category", "int"),
}
ARTICLE_FEATURES = {
    **_USER_AND_ITEM,
    "category": ("category_second", "ns"),
    "category_first": ("category_first", "int"),
    "item_score1": ("item_score1", "score"),
    "item_score2": ("item_score2", "score"),
    "item_score3": ("item_score3", "score"),
    "exposure_count_bucket": ("exposure_count", "count"),
    "click_count_bucket": ("click_count", "count"),
}
# feature -> (group, entity of a specific feature)
PRODUCED: dict[str, tuple[str, Optional[str]]] = {
    "user_id": ("user", None), "gender": ("user", None), "age": ("user", None),
    "item_id": ("shared", None), "category": ("shared", None),
    "video_category_raw": ("specific", "source"),
    **{f: ("specific", "target") for f in ARTICLE_FEATURES if f not in VIDEO_FEATURES},
}
REQUIRED = ("user_id", "item_id", LABEL)  # columns that may not be missing
NULL_VALUES = ["", "\\N", "NULL", "null", "NaN", "nan"]
LOG_BUCKET_OFFSET = 128  # log buckets lie in [1, 255]: tables of 256 rows with id_mapping modulo
# A side column's value for a liked row whose side feature is missing (see "Side features" above). MISSING_RAW
# stands in for the raw id and goes through the feature's encoding (2 * x + entity, or as is); no real id has
# it (ids are below 2**53); being 2**61 - 1, it lands in the last rows of a power-of-two table with id_mapping
# modulo (row R - 2 for a video category, R - 1 for an article's). A log bucket has a free value of its own: 0
# (real buckets lie in [1, 255]).
MISSING_RAW = 2 ** 61 - 1
MISSING_BUCKET = 0
_BLOCK = 1 << 22  # bytes pyarrow parses at a time; a line must fit in one
_MAX_EXACT = float(2 ** 53)  # ids are parsed as float64: integers up to 2**53 are exact
_ENTITY = {"video": 0, "article": 1}
_FILE_OF = {"source": "video", "target": "article"}  # schema entity -> Tenrec file


# --------------------------------------------------------------------------------------------------------
# Input files
# --------------------------------------------------------------------------------------------------------


def _read_header(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    with open(path, "rb") as f:
        line = f.readline(1 << 20)
    if not line.strip():
        raise ValueError(f"{path}: empty file (expected a CSV header line)")
    try:
        text = line.decode("utf-8").lstrip("\ufeff").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the header line is not UTF-8 text") from None
    return [c.strip().strip('"') for c in text.split(",")]


class _Csv:
    """One input CSV: header check and streaming of float64 columns with errors that name file, column, row."""

    def __init__(self, path: str, kind: str, expected: tuple[str, ...]) -> None:
        self.path = path
        self.kind = kind
        self.names = _read_header(path)
        self.optional = [c for c in OPTIONAL_COLUMNS if c in self.names]  # present optional columns
        dup = sorted(c for c, n in collections.Counter(self.names).items() if n > 1)  # linear in the header
        missing = [c for c in expected if c not in self.names]
        unexpected = [c for c in self.names if c not in expected and c not in OPTIONAL_COLUMNS]
        if dup:
            raise ValueError(f"{path}: duplicate column(s) {dup} in the header")
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} in the header (is this {kind} file "
                             f"QK-{kind}.csv? expected columns: {list(expected)})")
        if unexpected:
            raise ValueError(f"{path}: unexpected column(s) {unexpected} in the header (expected the QK-{kind}.csv "
                             f"columns: {list(expected)}, and optionally {list(OPTIONAL_COLUMNS)})")

    def _open(self, columns: list[str], types: Optional[dict] = None):
        # Single-threaded parsing: as fast here (the reader thread overlaps it with the numpy work), and only
        # then does pyarrow name the line of a parse error.
        return pacsv.open_csv(
            self.path,
            read_options=pacsv.ReadOptions(column_names=self.names, skip_rows=1, block_size=_BLOCK,
                                           use_threads=False),
            convert_options=pacsv.ConvertOptions(
                column_types=types or {c: pa.float64() for c in columns}, include_columns=columns,
                null_values=NULL_VALUES, strings_can_be_null=True, quoted_strings_can_be_null=True),
        )

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """Stream ``columns`` as float64 record batches. CSV errors become ValueErrors naming file/column/line."""
        done = 0
        try:
            for batch in self._open(columns):
                done += batch.num_rows
                yield batch
        except pa.ArrowInvalid as e:
            raise self._diagnose(e, columns, done) from None

    def _diagnose(self, err: Exception, columns: list[str], done: int) -> ValueError:
        """Name the file, column and line of a CSV error. pyarrow names the line when it parses single-threaded
        (older versions not for conversion errors: then the column is re-read to find the row)."""
        msg = str(err)
        if "straddl" in msg:  # pyarrow: a field longer than its block, "try to increase block size?"
            return ValueError(f"{self.path}: after data row {done}: a line longer than {_BLOCK >> 20} MiB; Tenrec "
                              "lines are a few dozen bytes, so the file is probably damaged (or not this CSV) there")
        col_m = re.search(r"In CSV column #(\d+): ", msg)
        col = self.names[int(col_m.group(1))] if col_m and int(col_m.group(1)) < len(self.names) else None
        row_m = re.search(r"Row #(\d+): ", msg)
        text = re.sub(r"(In CSV column #\d+: |Row #\d+: )", "", msg)
        conv = re.search(r"CSV conversion error to \w+: (invalid value .*)", text)
        if conv:
            text = f"{conv.group(1)} (expected a number; missing values are \\N or empty)"
        where = f"column {col!r}, " if col else ""
        if row_m:
            line = int(row_m.group(1))
            return ValueError(f"{self.path}: {where}data row {line - 1} (line {line}): {text}")
        bad = self._first_non_number(col) if col and conv else None
        if bad is not None:
            return ValueError(f"{self.path}: {where}data row {bad[0] + 1} (line {bad[0] + 2}): invalid value "
                              f"{bad[1]!r} (expected a number; missing values are \\N or empty)")
        return ValueError(f"{self.path}: {where}after data row {done}: {text}")

    def _first_non_number(self, col: str) -> Optional[tuple[int, str]]:
        number = r"^\s*[-+]?(\d+\.?\d*([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?|inf|infinity|nan)\s*$"
        row = 0
        try:
            for batch in self._open([col], types={col: pa.string()}):
                arr = batch.column(0)
                ok = pc.or_kleene(pc.is_null(arr), pc.match_substring_regex(arr, number, ignore_case=True))
                ok_np = ok.to_numpy(zero_copy_only=False)
                if not ok_np.all():
                    i = int(np.flatnonzero(~ok_np)[0])
                    return row + i, arr[i].as_py()
                row += batch.num_rows
        except pa.ArrowInvalid:
            return None
        return None


class _Rows:
    """Take exactly n rows at a time from a stream of record batches, as float64 numpy columns."""

    def __init__(self, csv: _Csv, columns: list[str], total: int) -> None:
        self.csv = csv
        self.columns = columns
        self.total = total
        self.pos = 0  # rows handed out so far
        self._it = _Prefetch(csv.batches(columns))
        self._buf: list[pa.RecordBatch] = []
        self._buf_rows = 0

    def take(self, n: int) -> dict[str, np.ndarray]:
        while self._buf_rows < n:
            batch = next(self._it, None)
            if batch is None:
                raise ValueError(f"{self.csv.path}: ended after {self.pos + self._buf_rows} data rows, but the "
                                 f"counting pass saw {self.total} (did the file change during the conversion?)")
            self._buf.append(batch)
            self._buf_rows += batch.num_rows
        table = pa.Table.from_batches(self._buf, schema=self._buf[0].schema) if self._buf else None
        if table is None:
            return {c: np.zeros(0) for c in self.columns}
        head, rest = table.slice(0, n), table.slice(n)
        self._buf = rest.to_batches()
        self._buf_rows = rest.num_rows
        self.pos += n
        return {c: head.column(c).to_numpy() for c in self.columns}

    def finish(self) -> None:
        extra = self._buf_rows + sum(b.num_rows for b in self._it)
        if extra:
            raise ValueError(f"{self.csv.path}: has {self.total + extra} data rows, but the counting pass saw "
                             f"{self.total} (did the file change during the conversion?)")

    def close(self) -> None:
        self._it.close()


class _Prefetch:
    """Runs an iterator in a background thread, up to ``depth`` items ahead (pyarrow parses CSV without the
    GIL, so parsing overlaps the numpy work). Its exceptions are re-raised by ``__next__``."""

    def __init__(self, it: Iterator, depth: int = 4) -> None:
        self._q: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(it,), daemon=True, name="tenrec-csv")
        self._thread.start()

    def _put(self, item: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it: Iterator) -> None:
        try:
            for x in it:
                if not self._put(("item", x)):
                    return
            self._put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(("error", e))

    def __iter__(self) -> "_Prefetch":
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        kind, x = self._q.get()
        if kind == "item":
            return x
        self._done = True
        if kind == "error":
            raise x
        raise StopIteration

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------------------
# Column conversion
# --------------------------------------------------------------------------------------------------------


def _log_bucket(x: np.ndarray, per_octave: int) -> np.ndarray:
    """Signed log bucket ``sign(x) * floor(per_octave * log2(1 + |x|)) + 128``, clipped to [0, 255].

    Order is kept; large values get ``2 ** (1 / per_octave)`` relative resolution. Integers 0..15 keep
    distinct buckets with 8 per octave (scores), 0..2 with 2 per octave (counts); 8 per octave saturates at
    |x| ~ 60000, 2 per octave never in practice.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        b = np.sign(x) * np.floor(per_octave * np.log2(1.0 + np.abs(x)))
    return np.clip(b, -LOG_BUCKET_OFFSET + 1, LOG_BUCKET_OFFSET - 1).astype(np.int64) + LOG_BUCKET_OFFSET


class _Fail:
    """Raises ValueErrors that name a file, a column and a row."""

    def __init__(self, path: str, base: int) -> None:
        self.path = path
        self.base = base  # data-row index of the first row of the window

    def __call__(self, col: str, idx: int, what: str) -> None:
        row = self.base + idx
        raise ValueError(f"{self.path}: column {col!r}, data row {row + 1} (line {row + 2}): {what}")


def _int_column(x: np.ndarray, col: str, fail: _Fail, required: bool) -> tuple[np.ndarray, np.ndarray]:
    """float64 column (NaN = missing) -> (int64 values, valid mask); non-integers are errors."""
    valid = ~np.isnan(x)
    if required and not valid.all():
        fail(col, int(np.flatnonzero(~valid)[0]), "missing value")
    xs = np.where(valid, x, 0.0)
    big = np.abs(xs) > _MAX_EXACT
    if big.any():
        i = int(np.flatnonzero(big)[0])
        fail(col, i, f"id {float(x[i]):.17g} is above 2**53: ids are read as float64 (the article file writes "
                     "1.0 for 1), where larger integers lose digits; renumber the ids below 2**53")
    ok = np.floor(xs) == xs
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        fail(col, i, f"value {float(x[i]):.17g} is not an integer id")
    return xs.astype(np.int64), valid


def _probability_column(x: np.ndarray, col: str, fail: _Fail) -> np.ndarray:
    """float64 column -> float32 probabilities; a missing value or one outside [0, 1] is an error."""
    ok = (x >= 0) & (x <= 1)  # False for NaN (missing)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        fail(col, i, "missing value" if np.isnan(x[i]) else f"value {float(x[i]):g} is not a probability in [0, 1]")
    return x.astype(np.float32)


def _entity_columns(raw: dict[str, np.ndarray], kind: str, features: list[str], fail: _Fail,
                    modulo: set[str]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """One file's window -> ({feature: (int64 values, valid)}, int8 labels)."""
    spec = VIDEO_FEATURES if kind == "video" else ARTICLE_FEATURES
    code = _ENTITY[kind]
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in features:
        if name not in spec:
            continue
        col, how = spec[name]
        x = raw[col]
        if how in ("int", "ns"):
            vals, valid = _int_column(x, col, fail, required=col in REQUIRED)
            if how == "ns":
                vals = vals * 2 + code
        else:
            valid = ~np.isnan(x)
            vals = _log_bucket(np.where(valid, x, 0.0), 8 if how == "score" else 2)
        if name in modulo and (vals[valid] < 0).any():
            i = int(np.flatnonzero(valid & (vals < 0))[0])
            fail(col, i, f"negative value {float(x[i]):g}, but feature {name!r} uses a table with id_mapping "
                 "'modulo' (ids must be >= 0)")
        out[name] = (vals, valid)
    label = raw[LABEL]
    ok = (label == 0) | (label == 1)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        fail(LABEL, i, "missing value" if np.isnan(label[i]) else f"value {float(label[i]):g} is not 0 or 1")
    return out, label.astype(np.int8)


# --------------------------------------------------------------------------------------------------------
# Per-user state
# --------------------------------------------------------------------------------------------------------


class _UserCounter:
    """Distinct int64 user ids and their row counts, from a stream of id arrays (sort-merge, bounded)."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_n = 0

    def add(self, ids: np.ndarray) -> None:
        if ids.size == 0:
            return
        k, c = np.unique(ids, return_counts=True)
        self._pending.append((k, c))
        self._pending_n += k.size
        if self._pending_n > max(self.keys.size, 1 << 22):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        keys = np.concatenate([self.keys] + [k for k, _ in self._pending])
        counts = np.concatenate([self.counts] + [c for _, c in self._pending])
        self._pending, self._pending_n = [], 0
        uk, inv = np.unique(keys, return_inverse=True)
        self.keys = uk
        self.counts = np.bincount(inv, weights=counts, minlength=uk.size).astype(np.int64)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        self._merge()
        return self.keys, self.counts


class _UserIndex:
    """Raw user id -> dense index in ``0..U-1`` (a lookup table when ids are small non-negative ints)."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys
        self.lut: Optional[np.ndarray] = None
        if keys.size and keys[0] >= 0 and keys[-1] < 4 * keys.size + (1 << 20):
            self.lut = np.full(int(keys[-1]) + 1, -1, np.int32 if keys.size < 2 ** 31 else np.int64)
            self.lut[keys] = np.arange(keys.size)

    def __call__(self, ids: np.ndarray, path: str) -> np.ndarray:
        if self.lut is not None:
            inside = (ids >= 0) & (ids < self.lut.size)
            idx = np.where(inside, self.lut[np.where(inside, ids, 0)], -1).astype(np.int64)
        else:
            pos = np.minimum(np.searchsorted(self.keys, ids), max(self.keys.size - 1, 0))
            idx = np.where(self.keys[pos] == ids, pos, -1) if self.keys.size else np.full(ids.size, -1)
        if (idx < 0).any():
            raise ValueError(f"{path}: user_id {int(ids[np.flatnonzero(idx < 0)[0]])} was not seen by the counting "
                             "pass (did the file change during the conversion?)")
        return idx


def _expand(lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For jagged lengths: (owner index of each element, position of the element within its owner)."""
    total = int(lens.sum())
    owner = np.repeat(np.arange(lens.size), lens)
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
    return owner, within


class _SeqStore:
    """Each user's last ``max_len`` values of one behaviour sequence, oldest first, ``width`` int64 per value.

    A value is a row of ``width`` int64: the liked item's shared feature, then its side features (``width`` =
    1 + the sequence's side features), so a side feature costs one int64 per stored like.
    Users live in capacity tiers of 1, 2, 4, ... and ``max_len`` slots; a user moves up a tier when its
    sequence outgrows its slot (freed slots are reused). Logical element ``j`` (the user's ``j``-th value
    ever) sits at position ``j % S`` of its slot of size ``S``: below the top tier a slot holds every value,
    the top tier is a ring. Memory follows the values stored (at most twice), not ``users x max_len``.
    """

    def __init__(self, n_users: int, max_len: int, width: int = 1) -> None:
        sizes, s = [], 1
        while s < max_len:
            sizes.append(s)
            s *= 2
        sizes.append(max_len)
        self.max_len = max_len
        self.width = width
        self.sizes = np.array(sizes, np.int64)
        self.count = np.zeros(n_users, np.int32)  # values ever appended (before truncation)
        self.tier = np.full(n_users, -1, np.int8)
        self.slot = np.zeros(n_users, np.int32)
        self.pools = [np.zeros((0, width), np.int64) for _ in sizes]  # (slots x size, width) per tier
        self.used = [0] * len(sizes)
        self.free = [np.zeros(0, np.int64) for _ in sizes]

    def read(self, users: np.ndarray, j: np.ndarray) -> np.ndarray:
        """(n, width): logical element ``j[k]`` of user ``users[k]`` (both per element; must be stored)."""
        out = np.empty((j.size, self.width), np.int64)
        tier = self.tier[users]
        for t, size in enumerate(self.sizes):
            sel = np.flatnonzero(tier == t)
            if sel.size:
                out[sel] = self.pools[t].take(self.slot[users[sel]] * size + j[sel] % size, axis=0)
        return out

    def _alloc(self, t: int, n: int) -> np.ndarray:
        reuse = min(n, self.free[t].size)
        slots = self.free[t][self.free[t].size - reuse:]
        self.free[t] = self.free[t][: self.free[t].size - reuse]
        fresh = np.arange(self.used[t], self.used[t] + n - reuse, dtype=np.int64)
        self.used[t] += n - reuse
        need = self.used[t] * int(self.sizes[t])
        have = self.pools[t].shape[0]
        if need > have:
            grown = np.zeros((max(need, int(have * 1.5), 1024 * int(self.sizes[t])), self.width), np.int64)
            grown[:have] = self.pools[t]
            self.pools[t] = grown
        return np.concatenate([slots, fresh])

    def _write(self, tiers: np.ndarray, slots: np.ndarray, j: np.ndarray, values: np.ndarray) -> None:
        for t, size in enumerate(self.sizes):
            sel = np.flatnonzero(tiers == t)
            if sel.size:
                self.pools[t][slots[sel] * size + j[sel] % size] = values[sel]

    def append(self, users: np.ndarray, k: np.ndarray, starts: np.ndarray, values: np.ndarray) -> None:
        """Append rows ``values[starts[i] : starts[i] + k[i]]`` of the (m, width) ``values`` (oldest first) to
        distinct users ``users[i]``."""
        if users.size == 0:
            return
        c = self.count[users]
        c2 = c + k
        new_t = np.searchsorted(self.sizes, np.minimum(c2, self.max_len))  # smallest tier that holds them
        old_t = self.tier[users].astype(np.int64)
        new_slot = self.slot[users].copy()
        moved = new_t != old_t
        for t in np.unique(new_t[moved]):
            sel = np.flatnonzero(moved & (new_t == t))
            new_slot[sel] = self._alloc(int(t), sel.size)
        carry = np.flatnonzero(moved & (c > 0))
        if carry.size:  # copy the still-needed old values into the new slot, then free the old slot
            lo = np.maximum(c2[carry] - self.sizes[new_t[carry]], 0)
            keep = np.maximum(c[carry] - lo, 0)
            owner, within = _expand(keep)
            j = lo[owner] + within
            vals = self.read(users[carry][owner], j)
            self._write(new_t[carry][owner], new_slot[carry][owner], j, vals)
            for t in np.unique(old_t[carry]):
                sel = carry[old_t[carry] == t]
                self.free[t] = np.concatenate([self.free[t], self.slot[users[sel]]])
        self.tier[users] = new_t
        self.slot[users] = new_slot
        lo = np.maximum(c, c2 - self.sizes[new_t])  # the new values that fit
        owner, within = _expand(c2 - lo)
        j = lo[owner] + within
        self._write(new_t[owner], new_slot[owner], j, values.take(starts[owner] + (j - c[owner]), axis=0))
        self.count[users] = c2


# --------------------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------------------


def _side_features_of(entity: str, shared_feature: str) -> list[str]:
    """The side features a sequence of ``entity`` can carry: the item attributes the converter produces for that
    entity's rows (entity-shared and that entity's specific features), the sequence's shared feature left out."""
    spec = VIDEO_FEATURES if entity == "source" else ARTICLE_FEATURES
    return [f for f in spec if PRODUCED[f][0] != "user" and f != shared_feature]


def _missing_side_value(entity: str, feature: str) -> int:
    """The value a side column holds for a liked ``entity`` row whose ``feature`` is missing (``MISSING_RAW``)."""
    kind = _FILE_OF[entity]
    how = (VIDEO_FEATURES if kind == "video" else ARTICLE_FEATURES)[feature][1]
    if how == "ns":
        return 2 * MISSING_RAW + _ENTITY[kind]
    return MISSING_RAW if how == "int" else MISSING_BUCKET


def _check_schema(cfg: Config) -> None:
    s = cfg.schema
    for name, f in s.features.items():
        if name not in PRODUCED:
            raise ValueError(f"mkt tenrec: schema feature {name!r} is not produced by the Tenrec converter; it "
                             f"produces {sorted(PRODUCED)} (see configs/tenrec.yaml)")
        group, entity = PRODUCED[name]
        if (f.group, f.entity) != (group, entity):
            want = f"group: {group}" + (f", entity: {entity}" if entity else "")
            raise ValueError(f"mkt tenrec: schema feature {name!r} must be declared {{{want}}} for Tenrec, "
                             f"got group {f.group!r}" + (f", entity {f.entity!r}" if f.entity else ""))
    for name, seq in s.sequences.items():
        if seq.shared_feature not in ("item_id", "category"):
            raise ValueError(f"mkt tenrec: sequence {name!r}: shared_feature must be item_id or category for "
                             f"Tenrec, got {seq.shared_feature!r}")
        allowed = _side_features_of(seq.entity, seq.shared_feature)
        for feature in seq.side_features:
            if feature not in allowed:
                raise ValueError(f"mkt tenrec: schema.sequences.{name}.side_features.{feature}: not an attribute "
                                 f"the Tenrec converter produces for the sequence's {seq.entity} "
                                 f"({_FILE_OF[seq.entity]}) rows; side features allowed here: {allowed}")
    if s.dense:
        raise ValueError(f"mkt tenrec: the Tenrec converter writes no dense features, but the schema has "
                         f"{sorted(s.dense)}")
    if s.user_id_feature != "user_id":
        raise ValueError("mkt tenrec: schema.user_id_feature must be user_id for Tenrec")


def _windows(n_video: int, n_article: int, chunk: int) -> Iterator[tuple[int, int, int, int]]:
    """(video lo, video hi, article lo, article hi) of consecutive windows of the merged timeline.

    Video row i precedes article row j iff ``i * n_article <= j * n_video``. Windows step through the larger
    file: the rows before video row ``v`` are the article rows ``j < ceil(v * n_article / n_video)``; the rows
    before article row ``a`` are the video rows ``i <= floor(a * n_video / n_article)``.
    """
    v_lo = a_lo = 0
    if n_video >= n_article:
        step = max(1, chunk * n_video // (n_video + n_article))
        while v_lo < n_video:
            v_hi = min(n_video, v_lo + step)
            a_hi = n_article if v_hi == n_video else min(n_article, -(-v_hi * n_article // n_video))
            yield v_lo, v_hi, a_lo, a_hi
            v_lo, a_lo = v_hi, a_hi
    else:
        step = max(1, chunk * n_article // (n_video + n_article))
        while a_lo < n_article:
            a_hi = min(n_article, a_lo + step)
            v_hi = n_video if a_hi == n_article else min(n_video, a_hi * n_video // n_article + 1)
            yield v_lo, v_hi, a_lo, a_hi
            v_lo, a_lo = v_hi, a_hi


def _merge_positions(v_lo: int, nv: int, a_lo: int, na: int, n_video: int, n_article: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Positions of a window's video rows and article rows in merged time order (video first on ties)."""
    vk = (v_lo + np.arange(nv, dtype=np.int64)) * n_article
    ak = (a_lo + np.arange(na, dtype=np.int64)) * n_video
    pos_v = np.arange(nv, dtype=np.int64) + np.searchsorted(ak, vk, side="left")
    pos_a = np.arange(na, dtype=np.int64) + np.searchsorted(vk, ak, side="right")
    return pos_v, pos_a


class _Converter:
    def __init__(self, cfg: Config, video: _Csv, article: _Csv, counts: dict[str, int],
                 user_keys: np.ndarray, user_rows: np.ndarray, true_prob: bool) -> None:
        self.cfg = cfg
        self.tc = cfg.tenrec
        self.video, self.article = video, article
        self.true_prob = true_prob  # both files have the column: carry it
        self.n = counts
        self.users = _UserIndex(user_keys)
        self.user_rows = user_rows.astype(np.int32)
        n_users = user_keys.size
        self.seen = np.zeros(n_users, np.int32)  # rows of each user so far (per_user split)
        self.likes = np.zeros(n_users, np.int32)  # likes of each user so far, both entities (activity)
        s = cfg.schema
        # per sequence: the item's shared feature and its side features, one int64 each per stored like
        self.seqs = {name: _SeqStore(n_users, q.max_len, 1 + len(q.side_features)) for name, q in s.sequences.items()}
        self.missing = {name: [_missing_side_value(q.entity, f) for f in q.side_features]
                        for name, q in s.sequences.items()}
        self.features = list(dict.fromkeys(list(s.features) + [q.shared_feature for q in s.sequences.values()]
                                           + ["user_id"]))
        self.modulo = {n for n, f in s.features.items() if s.tables[f.table].id_mapping == "modulo"}

    def columns(self, kind: str) -> list[str]:
        spec = VIDEO_FEATURES if kind == "video" else ARTICLE_FEATURES
        expected = VIDEO_COLUMNS if kind == "video" else ARTICLE_COLUMNS
        cols = {spec[f][0] for f in self.features if f in spec} | {"user_id", LABEL}
        if self.true_prob:
            cols.add(TRUE_PROB)
        return [c for c in expected + OPTIONAL_COLUMNS if c in cols]

    def window(self, parts: dict[str, tuple[dict[str, np.ndarray], int]], lo: dict[str, int]
               ) -> tuple[pa.Table, np.ndarray]:
        """Rows of one window (per file: raw columns, count) -> (table in merged order, is_test)."""
        nv, na = parts["video"][1], parts["article"][1]
        n = nv + na
        pos = dict(zip(("video", "article"),
                       _merge_positions(lo["video"], nv, lo["article"], na, self.n["video"], self.n["article"])))
        ent = np.empty(n, np.int8)
        label = np.empty(n, np.int8)
        feats: dict[str, tuple[np.ndarray, np.ndarray]] = {
            f: (np.zeros(n, np.int64), np.zeros(n, bool)) for f in self.features}
        file_row = np.empty(n, np.int64)
        true_prob = np.empty(n, np.float32) if self.true_prob else None
        for kind, csv in (("video", self.video), ("article", self.article)):
            raw, cnt = parts[kind]
            if cnt == 0:
                continue
            p = pos[kind]
            fail = _Fail(csv.path, lo[kind])
            cols, lab = _entity_columns(raw, kind, self.features, fail, self.modulo)
            if true_prob is not None:
                true_prob[p] = _probability_column(raw[TRUE_PROB], TRUE_PROB, fail)
            ent[p] = _ENTITY[kind]
            label[p] = lab
            file_row[p] = lo[kind] + np.arange(cnt)
            for f, (vals, valid) in cols.items():
                feats[f][0][p] = vals
                feats[f][1][p] = valid
        raw_user = feats["user_id"][0]
        u = np.empty(n, np.int64)
        for kind, csv in (("video", self.video), ("article", self.article)):
            if parts[kind][1]:
                u[pos[kind]] = self.users(raw_user[pos[kind]], csv.path)

        # group rows by user, time order kept within a user
        order = np.argsort(u, kind="stable")
        us = u[order]
        first = np.ones(n, bool)
        first[1:] = us[1:] != us[:-1]
        gstart = np.flatnonzero(first)
        gid = np.cumsum(first) - 1
        gsize = np.diff(np.append(gstart, n))
        uniq = us[gstart]

        def excl_count(mask_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            """(global exclusive cumsum, exclusive count within the user's group, per-group total)."""
            cs = np.cumsum(mask_sorted, dtype=np.int64)
            ex = cs - mask_sorted
            return ex, ex - ex[gstart][gid], cs[np.append(gstart[1:], n) - 1] - ex[gstart]

        def unsort(a: np.ndarray) -> np.ndarray:
            out = np.empty_like(a)
            out[order] = a
            return out

        # split
        if self.tc.split == "per_user":
            rank = self.seen[us] + (np.arange(n) - gstart[gid])
            is_test = unsort(rank >= np.floor((1.0 - self.tc.test_fraction) * self.user_rows[us] + 1e-9))
            self.seen[uniq] += gsize
        else:
            bound = {k: np.floor((1.0 - self.tc.test_fraction) * self.n[k] + 1e-9) for k in self.n}
            is_test = np.where(ent == 0, file_row >= bound["video"], file_row >= bound["article"])

        # activity: the user's earlier likes of both entities
        liked_s = label[order].astype(bool)
        _, k_any, tot_any = excl_count(liked_s)
        activity = unsort(self.likes[us] + k_any)
        self.likes[uniq] += tot_any

        columns: dict[str, pa.Array] = {
            "entity": pa.array(ent), "label": pa.array(label),
            "activity": pa.array(activity.astype(np.int32)),
        }
        if true_prob is not None:
            columns[TRUE_PROB] = pa.array(true_prob)
        for f in self.cfg.schema.features:
            vals, valid = feats[f]
            columns[f] = pa.array(vals, mask=~valid) if not valid.all() else pa.array(vals)

        # behaviour sequences: (shared feature, side features...) of each like, as rows of width 1 + side features
        ent_s = ent[order]
        for name, q in self.cfg.schema.sequences.items():
            store = self.seqs[name]
            vals, valid = feats[q.shared_feature]
            ms = liked_s & (ent_s == (0 if q.entity == "source" else 1)) & valid[order]
            rows = order[ms]  # this sequence's likes, grouped by user, time order within a user
            liked_vals = np.empty((rows.size, store.width), np.int64)  # (likes, 1 + side features)
            liked_vals[:, 0] = vals[rows]
            for c, (f, missing) in enumerate(zip(q.side_features, self.missing[name]), start=1):
                side, known = feats[f]
                liked_vals[:, c] = np.where(known[rows], side[rows], missing)
            ex, k, tot = excl_count(ms)
            c0 = store.count[us]
            m_c = np.minimum(k, q.max_len)
            m_b = np.minimum(c0, q.max_len - m_c)
            lens = unsort(m_b + m_c)
            off = offsets_of(lens)
            if off[-1] >= 2 ** 31:
                raise ValueError(f"tenrec: a window's {name} values exceed 2**31; lower tenrec.chunk_rows")
            start = off[:-1][order]
            out = np.empty((int(off[-1]), store.width), np.int64)  # (steps, 1 + side features)
            owner, within = _expand(m_b)  # the stored part
            if owner.size:
                out[start[owner] + within] = store.read(us[owner], (c0 - m_b)[owner] + within)
            owner, within = _expand(m_c)  # this window's earlier likes
            if owner.size:
                out[start[owner] + m_b[owner] + within] = liked_vals.take((ex - m_c)[owner] + within, axis=0)
            has = tot > 0
            store.append(uniq[has], tot[has], ex[gstart][has], liked_vals)
            offsets = pa.array(off.astype(np.int32))  # the sequence and its side columns: the same steps
            for c, column in enumerate([name, *q.side_features.values()]):
                columns[column] = pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(out[:, c])))
        return pa.table(columns), is_test


def _write_window(writer: DatasetWriter, table: pa.Table, is_test: np.ndarray) -> None:
    writer.write("train", table.filter(pa.array(~is_test)))
    writer.write("test", table.filter(pa.array(is_test)))


def _count_pass(csv: _Csv, counter: _UserCounter) -> int:
    rows = 0
    batches = _Prefetch(csv.batches(["user_id"]))
    try:
        for batch in batches:
            ids, _ = _int_column(batch.column(0).to_numpy(zero_copy_only=False), "user_id", _Fail(csv.path, rows),
                                 required=True)
            counter.add(ids)
            rows += batch.num_rows
    finally:
        batches.close()
    return rows


def convert(video_csv: str, article_csv: str, cfg: Config, out_dir: str, overwrite: bool = False,
            progress: Optional[Callable[[int], None]] = None) -> Manifest:
    """Convert QK-video.csv (source) + QK-article.csv (target) into a dataset at ``out_dir`` (atomically).

    Args:
        video_csv / article_csv: the two Tenrec files (headers checked; columns may come in any order); both
            may add a ``true_prob`` column, which becomes the dataset's ``true_prob``.
        cfg: the config; ``cfg.schema`` must use only the features this converter produces (``PRODUCED``), and
            as a sequence's side features only attributes of its entity's items (``_side_features_of``);
            ``cfg.tenrec`` sets the split, window size and Parquet layout.
        out_dir: dataset directory to create; ``overwrite`` replaces an existing one once the new is complete.
        progress: called with the number of rows converted after each window of the second pass (the
            counting pass reports nothing; the Parquet writes trail by at most two windows).

    Raises:
        ValueError: a missing file, a wrong header (or ``true_prob`` in one file only), an unparsable or
            missing value (naming the file, the column and the row), or a schema the converter cannot fill.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
    """
    _check_schema(cfg)
    video = _Csv(video_csv, "video", VIDEO_COLUMNS)
    article = _Csv(article_csv, "article", ARTICLE_COLUMNS)
    tc = cfg.tenrec
    if bool(video.optional) != bool(article.optional):
        has, lacks = (video, article) if video.optional else (article, video)
        raise ValueError(f"{has.path} has a {TRUE_PROB} column but {lacks.path} has not: both files need it, or "
                         "neither")
    true_prob = TRUE_PROB in video.optional
    optional = (TRUE_PROB, "activity") if true_prob else ("activity",)  # the synthetic datasets' order
    with DatasetWriter(out_dir, cfg.schema, optional=optional, rows_per_file=tc.rows_per_file,
                       row_group_rows=tc.row_group_rows, overwrite=overwrite,
                       schema_digest=cfg.schema_digest()) as writer:
        counter = _UserCounter()
        counts = {"video": _count_pass(video, counter), "article": _count_pass(article, counter)}
        if counts["video"] + counts["article"] == 0:
            raise ValueError(f"{video_csv}, {article_csv}: no data rows")
        if counts["video"] * counts["article"] >= 2 ** 62:
            raise ValueError("tenrec: too many rows to merge the timelines exactly")
        keys, user_rows = counter.finish()
        conv = _Converter(cfg, video, article, counts, keys, user_rows, true_prob)
        rows = {k: _Rows(csv, conv.columns(k), counts[k]) for k, csv in (("video", video), ("article", article))}
        try:
            # Parquet encoding runs in one background thread (pyarrow releases the GIL), one window behind.
            with ThreadPoolExecutor(1, thread_name_prefix="tenrec-write") as pool:
                pending: collections.deque = collections.deque()
                for v_lo, v_hi, a_lo, a_hi in _windows(counts["video"], counts["article"], tc.chunk_rows):
                    parts = {"video": (rows["video"].take(v_hi - v_lo), v_hi - v_lo),
                             "article": (rows["article"].take(a_hi - a_lo), a_hi - a_lo)}
                    table, is_test = conv.window(parts, {"video": v_lo, "article": a_lo})
                    while len(pending) >= 2:
                        pending.popleft().result()
                    pending.append(pool.submit(_write_window, writer, table, is_test))
                    if progress is not None:
                        progress(table.num_rows)
                for r in rows.values():
                    r.finish()
                while pending:
                    pending.popleft().result()
        finally:  # the pool has finished every write here: the writer may now be closed or aborted
            for r in rows.values():
                r.close()
        writer.set_source({
            "kind": "tenrec",
            "video_csv": os.path.abspath(video_csv), "article_csv": os.path.abspath(article_csv),
            "video_bytes": os.path.getsize(video_csv), "article_bytes": os.path.getsize(article_csv),
            "rows": {"video": counts["video"], "article": counts["article"]},
            "users": int(keys.size),
            "label": LABEL,
            "timeline": "merged by relative position: video row i at i/N_video, article row j at j/N_article",
            "tenrec": asdict(tc),
        })
        return writer.close()
