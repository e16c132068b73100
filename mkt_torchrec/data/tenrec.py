"""Convert Tenrec's ``QK-video.csv`` (source entity) and ``QK-article.csv`` (target entity) into a dataset.

The paper (section 4.1.1) uses QK-video as the source entity and QK-article as the target entity, with
``like`` as the label of both (QK-article holds clicked impressions only: its ``click`` is always 1).

**A preset of ``mkt build``.** :func:`convert` checks the two headers and the schema, writes Tenrec's layout as
a ``source:`` mapping (:func:`tenrec_source`: its columns, its timeline and its split, as below) and runs it
through :func:`mkt_torchrec.build.run.build_dataset` with DuckDB: the reading, the SQL and the writer are those
of any impression logs (:mod:`mkt_torchrec.build`), and this module holds nothing but the mapping and the checks
of what Tenrec's files and the schema must be. The build reads each file twice: a first pass over ``user_id``
(row counts, distinct users), then the mapped columns, ``tenrec.chunk_rows`` rows at a time, into an on-disk
DuckDB table that keeps at most 4 GB in memory (``source.memory_limit``'s default) and spills the rest to a
temporary directory. The dataset is published only once complete: any exception, including one from
``progress``, leaves no finished-looking output.

**One timeline.** Both files are in time order but carry no timestamp, and they cover the same period. Row
``i`` of the video file is placed at time ``i / N_video`` and row ``j`` of the article file at
``j / N_article``; the two are merged by that time, a video row first on ties, compared exactly as
``i * N_article`` vs ``j * N_video`` (``source.time.from_position``, the video input listed first;
:func:`_merge_positions` is the same order in numpy).

**Causal behaviour sequences.** For every sequence of the schema (``entity`` + ``shared_feature``), a row's
sequence is the shared-feature values of the user's liked rows of that entity strictly before the row on the
merged timeline (a liked row without a value of the shared feature is skipped), the most recent ``max_len``
kept, oldest first. ``activity`` is the user's number of earlier likes of both entities.

**Side features.** A sequence's ``side_features`` (``{category: hist_source_categories}``) name item attributes
the converter produces for that entity's rows (``_side_features_of``: ``category``, ``item_id`` beside a category
sequence, and the entity's specific features, e.g. ``item_score1`` for articles; anything else is a ValueError).
A step holds the liked row's own value of each, encoded exactly as the row's own feature (``category`` is the
namespaced ``2 * x + entity``), so a step and a candidate look up the same table row for the same value; each
side column has the sequence's offsets (one value per step, the same last ``max_len``, causal as the items are).
A side column holds no nulls (the reader refuses them, and a step needs a value): a liked row whose side feature
is missing gives ``MISSING_RAW`` (2**61 - 1, above every real id) through the feature's encoding
(``2 * MISSING_RAW + entity`` for ``category``), or log bucket 0 (``MISSING_BUCKET``; real buckets are 1..255).
The reader maps it to a table row like any id, so such a step adds one learned "missing" embedding, while a
candidate whose own value is missing adds nothing to the query (a null feature is a zero vector). A hashed table
keeps that row apart from the real values'; a modulo table of ``R`` rows, a power of two, puts it in row ``R - 2``
(videos) or ``R - 1`` (articles), shared with a real value only if ids reach there.

**Split.** ``tenrec.split=per_user``: each user's last ``test_fraction`` of rows in merged time order is
test (row rank ``>= floor((1 - f) * n_user)``, as the synthetic generator does; ``split.by: user_fraction``).
``global`` (the paper): the last ``test_fraction`` of each file (file row ``>= floor((1 - f) * N_file)``;
``split.by: fraction``, each entity being one file). Sequences run across the boundary either way: a test row's
history includes the user's earlier (train) likes.

**Ids.** Item ids and categories of the two entities share tables but never values: a raw value ``x`` becomes
``2 * x + entity`` (video even, article odd; ``by_entity``), so video item 5 and article item 5 are different ids.
Item scores and counts become signed log buckets (``transform: log_bucket``, 8 per octave for scores, 2 for
counts: ``sign(x) * floor(k * log2(1 + |x|)) + LOG_BUCKET_OFFSET``, clipped to [1, 255]). Missing values (``\\N``,
empty; ``NULL_VALUES``) are null (in a side column, which has no nulls, a reserved value: see "Side features").
``user_id``, ``item_id`` and ``like`` may not be missing.

Which columns are features, and which are excluded as labels or leaks, is listed in ``PRODUCED`` /
``EXCLUDED`` below and argued in ``configs/tenrec.yaml``.

**true_prob.** A file may add a ``true_prob`` column (``OPTIONAL_COLUMNS``: the row's true like probability,
which ``mkt synth --layout tenrec`` writes). When both files have it, it becomes the dataset's optional float32
``true_prob`` column (as synthetic datasets have it), so evaluation reports the best achievable AUC / GAUC; a
missing value or one outside [0, 1] is an error naming the file, column and row. When only one file has it, the
conversion fails before reading any row, naming both. Any other column outside Tenrec's layout is an error.

**Duplicates.** A line equal to the line right before it in its file, in every column the conversion reads (the
label and every mapped feature), is an exact duplicate impression (a line written twice): a copy of a liked row
would put its own item in its twin's behaviour sequence, the label leaking into a feature. ``source.duplicates:
drop`` (the default) leaves the copies out and prints how many; ``keep`` writes them. Equal lines apart from each
other are kept: without a time they may be a user seeing an item again (``mkt synth --layout tenrec`` writes
such repeats), and a file appended to itself is not detected. A file without a data row (a header only) is an
error naming it: its entity would have nothing to train or test on.

**Parsing.** Headers are checked here (missing, unexpected or duplicate columns, an empty file, a header that is
not UTF-8). Values are read as text and converted by the builder: integer columns must hold whole numbers
(QK-article writes integers as ``1.0``; ids are exact below 2**53), and an unparsable or missing value, or a
ragged row, raises ``ValueError`` naming the file, the column, the data row and the line.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Callable, Optional

import numpy as np

from mkt_torchrec.build.inputs import LOG_BUCKET_OFFSET, read_csv_header
from mkt_torchrec.build.plan import MISSING_BUCKET, MISSING_RAW
from mkt_torchrec.build.run import build_dataset
from mkt_torchrec.build.source import ColumnMap, InputConfig, LabelConfig, SourceConfig, SplitConfig, TimeConfig
from mkt_torchrec.config import Config
from mkt_torchrec.data.dataset import Manifest

__all__ = ["ARTICLE_COLUMNS", "ARTICLE_FEATURES", "EXCLUDED", "LOG_BUCKET_OFFSET", "MISSING_BUCKET", "MISSING_RAW",
           "PRODUCED", "VIDEO_COLUMNS", "VIDEO_FEATURES", "convert", "tenrec_source"]

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
_TRANSFORMS = {  # transform -> ColumnMap settings
    "int": {"transform": "int"},
    "ns": {"transform": "int", "by_entity": True},
    "score": {"transform": "log_bucket", "per_octave": 8},
    "count": {"transform": "log_bucket", "per_octave": 2},
}
_FILE_OF = {"source": "video", "target": "article"}  # schema entity -> Tenrec file
_SPEC = {"video": VIDEO_FEATURES, "article": ARTICLE_FEATURES}


# --------------------------------------------------------------------------------------------------------
# Input files
# --------------------------------------------------------------------------------------------------------


def _read_header(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    return read_csv_header(path)


def _check_header(path: str, kind: str, expected: tuple[str, ...]) -> list[str]:
    """The optional columns (``OPTIONAL_COLUMNS``) a Tenrec file has; a header that is not Tenrec's is an error."""
    names = _read_header(path)
    dup = sorted(c for c, n in collections.Counter(names).items() if n > 1)  # linear in the header
    missing = [c for c in expected if c not in names]
    unexpected = [c for c in names if c not in expected and c not in OPTIONAL_COLUMNS]
    if dup:
        raise ValueError(f"{path}: duplicate column(s) {dup} in the header")
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} in the header (is this {kind} file "
                         f"QK-{kind}.csv? expected columns: {list(expected)})")
    if unexpected:
        raise ValueError(f"{path}: unexpected column(s) {unexpected} in the header (expected the QK-{kind}.csv "
                         f"columns: {list(expected)}, and optionally {list(OPTIONAL_COLUMNS)})")
    return [c for c in OPTIONAL_COLUMNS if c in names]


# --------------------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------------------


def _side_features_of(entity: str, shared_feature: str) -> list[str]:
    """The side features a sequence of ``entity`` can carry: the item attributes the converter produces for that
    entity's rows (entity-shared and that entity's specific features), the sequence's shared feature left out."""
    return [f for f in _SPEC[_FILE_OF[entity]] if PRODUCED[f][0] != "user" and f != shared_feature]


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


# --------------------------------------------------------------------------------------------------------
# The mapping
# --------------------------------------------------------------------------------------------------------


def tenrec_source(cfg: Config, video_csv: str, article_csv: str, true_prob: bool) -> SourceConfig:
    """Tenrec's two files as a ``source:`` mapping of ``cfg.schema`` (checked by :func:`_check_schema`).

    A feature read from the same column in both files maps that column; ``category``, which each file keeps in
    a column of its own, maps the name ``category``, renamed per input (``inputs[].columns``); an entity's
    specific feature maps its one file's column (the other input does not read it).
    """
    features: dict[str, ColumnMap] = {}
    renames: dict[str, dict[str, str]] = {"video": {}, "article": {}}
    for name in cfg.schema.features:
        found = {kind: spec[name] for kind, spec in _SPEC.items() if name in spec}  # kind -> (column, transform)
        own = {column for column, _ in found.values()}
        if len(own) > 1:
            for kind, (column, _) in found.items():
                renames[kind][name] = column
        (transform,) = {t for _, t in found.values()}
        features[name] = ColumnMap(column=next(iter(own)) if len(own) == 1 else name,
                                   required=bool(own & set(REQUIRED)), **_TRANSFORMS[transform])
    tc = cfg.tenrec
    inputs = [InputConfig(path=path, format="csv", entity=entity, csv_null_values=list(NULL_VALUES),
                          columns=renames[kind])
              for path, entity, kind in ((video_csv, "source", "video"), (article_csv, "target", "article"))]
    return SourceConfig(
        inputs=inputs,  # the video input first: a video row first on ties
        time=TimeConfig(from_position=True),
        label=LabelConfig(column=LABEL, positive=[1], negative=[0]),
        features=features,
        split=SplitConfig(by="user_fraction" if tc.split == "per_user" else "fraction",
                          test_fraction=tc.test_fraction),
        true_prob=TRUE_PROB if true_prob else None,
        duplicates=cfg.source.duplicates,
        engine="duckdb",
        memory_limit=cfg.source.memory_limit,  # the engine's settings are the config's source: section's
        temp_dir=cfg.source.temp_dir,
        threads=cfg.source.threads,
        rows_per_file=tc.rows_per_file,
        row_group_rows=tc.row_group_rows,
        batch_rows=tc.chunk_rows,
    )


def _merge_positions(v_lo: int, nv: int, a_lo: int, na: int, n_video: int, n_article: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Positions on the merged timeline of video rows ``v_lo..v_lo+nv`` and article rows ``a_lo..a_lo+na``
    among themselves (video row i precedes article row j iff ``i * n_article <= j * n_video``)."""
    vk = (v_lo + np.arange(nv, dtype=np.int64)) * n_article
    ak = (a_lo + np.arange(na, dtype=np.int64)) * n_video
    pos_v = np.arange(nv, dtype=np.int64) + np.searchsorted(ak, vk, side="left")
    pos_a = np.arange(na, dtype=np.int64) + np.searchsorted(vk, ak, side="right")
    return pos_v, pos_a


# --------------------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------------------


def convert(video_csv: str, article_csv: str, cfg: Config, out_dir: str, overwrite: bool = False,
            progress: Optional[Callable[[int], None]] = None) -> Manifest:
    """Convert QK-video.csv (source) + QK-article.csv (target) into a dataset at ``out_dir`` (atomically).

    Args:
        video_csv / article_csv: the two Tenrec files (headers checked; columns may come in any order); both
            may add a ``true_prob`` column, which becomes the dataset's ``true_prob``.
        cfg: the config; ``cfg.schema`` must use only the features this converter produces (``PRODUCED``), and
            as a sequence's side features only attributes of its entity's items (``_side_features_of``);
            ``cfg.tenrec`` sets the split, the rows read at a time and the Parquet layout.
        out_dir: dataset directory to create; ``overwrite`` replaces an existing one once the new is complete.
        progress: called with the number of rows read, batch by batch, as the second pass loads them (the
            counting pass and the SQL that follows report nothing).

    Raises:
        ValueError: a missing file, a wrong header (or ``true_prob`` in one file only), an unparsable or
            missing value (naming the file, the column and the row), or a schema the converter cannot fill.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
    """
    _check_schema(cfg)
    video = _check_header(video_csv, "video", VIDEO_COLUMNS)
    article = _check_header(article_csv, "article", ARTICLE_COLUMNS)
    if bool(video) != bool(article):
        has, lacks = (video_csv, article_csv) if video else (article_csv, video_csv)
        raise ValueError(f"{has} has a {TRUE_PROB} column but {lacks} has not: both files need it, or neither")
    tc = cfg.tenrec

    def describe(build: dict[str, Any]) -> dict[str, Any]:
        for path, kind, n in zip((video_csv, article_csv), ("video", "article"), build["input_rows"], strict=True):
            if n == 0:  # each file is one entity: without rows, that entity's stage has nothing to train or test
                raise ValueError(f"{path}: no data rows (a header only): the QK-{kind} file gives the "
                                 f"{'source' if kind == 'video' else 'target'} entity's impressions")
        return {
            "kind": "tenrec",
            "video_csv": os.path.abspath(video_csv), "article_csv": os.path.abspath(article_csv),
            "video_bytes": os.path.getsize(video_csv), "article_bytes": os.path.getsize(article_csv),
            "rows": dict(zip(("video", "article"), build["input_rows"], strict=True)),
            "users": build["users"],
            "label": LABEL,
            "timeline": "merged by relative position: video row i at i/N_video, article row j at j/N_article",
            "tenrec": dataclasses.asdict(tc),
            "engine": build["engine"],
        }

    source = tenrec_source(cfg, video_csv, article_csv, true_prob=bool(video))
    manifest = build_dataset(dataclasses.replace(cfg, source=source), out_dir, engine="duckdb", overwrite=overwrite,
                             progress=progress, describe=describe, tool="mkt tenrec")
    return manifest
