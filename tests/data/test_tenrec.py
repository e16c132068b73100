"""Tenrec conversion: tiny CSVs in the two QK layouts, checked against a brute-force reference."""

from __future__ import annotations

import collections
import json
import math
import os
import random
from fractions import Fraction

import numpy as np
import pyarrow.parquet as pq
import pytest

from mkt_torchrec.config import load_config
from mkt_torchrec.data.tenrec import ARTICLE_COLUMNS, VIDEO_COLUMNS, convert

from tests.conftest import REPO

TENREC = os.path.join(REPO, "configs", "tenrec.yaml")
LEAKS = {"click", "follow", "like", "share", "watching_times", "read_percentage", "read", "read_time", "favorite",
         "like_count", "comment_count"}


def tenrec_config(*overrides: str):
    return load_config(TENREC, ["data.batch_size=16", "data.num_workers=0", "tenrec.row_group_rows=8",
                                "tenrec.rows_per_file=32", *overrides])


# --------------------------------------------------------------------------------------------------------
# Writing CSVs
# --------------------------------------------------------------------------------------------------------


def _cell(v, rng: random.Random, as_float: bool = False) -> str:
    if v is None:
        return rng.choice(["\\N", ""])
    return f"{float(v)}" if as_float else str(v)


def write_video(path, rows: list[dict], seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.write(",".join(VIDEO_COLUMNS) + "\n")
        for r in rows:
            f.write(",".join(_cell(r[c], rng) for c in VIDEO_COLUMNS) + "\n")


def write_article(path, rows: list[dict], seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.write(",".join(ARTICLE_COLUMNS) + "\n")
        for r in rows:  # the real file writes some integer columns as floats ("1.0")
            f.write(",".join(_cell(r[c], rng, as_float=c in ("click", "gender", "like")) for c in ARTICLE_COLUMNS)
                    + "\n")


def video_row(user, item, like, category=0, gender=1, age=3, **leaks) -> dict:
    row = {"user_id": user, "item_id": item, "click": 1, "follow": 0, "like": like, "share": 0,
           "video_category": category, "watching_times": 1, "gender": gender, "age": age}
    row.update(leaks)
    return row


def article_row(user, item, like, category_second=1001, gender=1, age=3, **other) -> dict:
    row = {"user_id": user, "item_id": item, "click": 1, "gender": gender, "age": age, "exposure_count": 120,
           "click_count": 9, "like_count": 1, "comment_count": 0, "read_percentage": 0.5, "item_score1": 3,
           "item_score2": 2, "category_second": category_second, "category_first": 10, "item_score3": 2.25,
           "read": 1, "read_time": 33, "share": 0, "like": like, "follow": 0, "favorite": 0}
    row.update(other)
    return row


def random_rows(seed: int, n_video: int, n_article: int, users: int = 9):
    rng = random.Random(seed)
    video = [video_row(rng.randrange(users), rng.randrange(40), int(rng.random() < 0.45),
                       category=rng.choice([0, 1, None]), gender=rng.choice([0, 1, 2, None]),
                       age=rng.choice([0, 5, 7, None]), watching_times=rng.randrange(4), share=rng.randrange(2))
             for _ in range(n_video)]
    article = [article_row(rng.randrange(users), rng.randrange(40), int(rng.random() < 0.4),
                           category_second=rng.choice([1001, 1002, None]), item_score1=rng.choice([0, 4, None]),
                           category_first=rng.choice([10, 11, None]),
                           exposure_count=rng.choice([0, 7, 100000, None]), read_time=rng.randrange(100))
               for _ in range(n_article)]
    return video, article


def write_pair(tmp_path, video, article, name="in"):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    write_video(d / "QK-video.csv", video)
    write_article(d / "QK-article.csv", article)
    return str(d / "QK-video.csv"), str(d / "QK-article.csv")


# --------------------------------------------------------------------------------------------------------
# Brute-force reference and reading the output
# --------------------------------------------------------------------------------------------------------


def reference(video, article, max_src: int, max_tgt: int, split: str, test_fraction: float) -> list[dict]:
    """The expected rows in merged time order, by a plain loop over the timeline. A row's ``src_rows`` /
    ``tgt_rows`` are the indices (in this list) of the liked rows its sequences hold, ``hist_src`` / ``hist_tgt``
    their raw item ids."""
    nv, na = len(video), len(article)
    events = [(Fraction(i, nv), 0, video[i], i) for i in range(nv)]
    events += [(Fraction(j, na), 1, article[j], j) for j in range(na)]
    events.sort(key=lambda e: (e[0], e[1]))  # equal times: the video row first
    keep = 1 - Fraction(str(test_fraction))
    n_user: dict = {}
    for _, _, r, _ in events:
        n_user[r["user_id"]] = n_user.get(r["user_id"], 0) + 1
    liked = {0: {}, 1: {}}
    seen: dict = {}
    out = []
    for _, ent, r, idx in events:
        u = r["user_id"]
        src, tgt = liked[0].setdefault(u, []), liked[1].setdefault(u, [])
        if split == "per_user":
            is_test = seen.get(u, 0) >= math.floor(keep * n_user[u])
        else:
            is_test = idx >= math.floor(keep * (nv if ent == 0 else na))
        seen[u] = seen.get(u, 0) + 1
        src_rows, tgt_rows = src[len(src) - min(len(src), max_src):], tgt[len(tgt) - min(len(tgt), max_tgt):]
        out.append({"entity": ent, "user_id": u, "label": r["like"], "item": r["item_id"],
                    "category": r["video_category"] if ent == 0 else r["category_second"],
                    "gender": r["gender"], "age": r["age"], "src_rows": src_rows, "tgt_rows": tgt_rows,
                    "hist_src": [out[i]["item"] for i in src_rows], "hist_tgt": [out[i]["item"] for i in tgt_rows],
                    "activity": len(src) + len(tgt), "test": is_test})
        if r["like"]:
            liked[ent][u].append(len(out) - 1)
    return out


# A side column's value for a liked row whose feature is missing (the converter's documented encodings of
# MISSING_RAW = 2**61 - 1, and log bucket 0), by the entity of the liked row
MISSING = {"category": (2 ** 62 - 2, 2 ** 62 - 1), "item_id": (2 ** 62 - 2, 2 ** 62 - 1),
           "video_category_raw": (2 ** 61 - 1,) * 2, "category_first": (2 ** 61 - 1,) * 2,
           "item_score1": (0, 0), "item_score2": (0, 0), "item_score3": (0, 0), "exposure_count_bucket": (0, 0),
           "click_count_bucket": (0, 0)}


def read_split(out: str, split: str, entities: list[int] | None = None) -> list[dict]:
    """The rows of ``split`` in file order, or in time order given the entity of each row in time order.

    Row groups are entity-pure (checked here against the manifest): file order keeps each entity's rows in time
    order but not how the two entities interleave, which ``entities`` restores.
    """
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    rows = []
    for f in manifest["splits"].get(split, []):
        pf = pq.ParquetFile(os.path.join(out, f["path"]))
        for rg, code in enumerate(f["row_group_entity"]):
            assert set(pf.read_row_group(rg, columns=["entity"]).column(0).to_pylist()) == {code}
        rows += pf.read().to_pylist()
    if entities is None:
        return rows
    assert sorted(entities) == sorted(r["entity"] for r in rows)
    per_entity = {code: collections.deque(r for r in rows if r["entity"] == code) for code in (0, 1)}
    return [per_entity[code].popleft() for code in entities]


def check_against_reference(out: str, expected: list[dict], schema=None) -> dict[str, int]:
    """The dataset at ``out`` holds ``expected`` (from :func:`reference`); with ``schema``, each side column of its
    sequences holds, step by step, the liked row's own value of the side feature (or the missing value). Returns
    the number of values per side column that stand for a missing one."""
    item_ids: dict = {}  # (entity, raw item) -> dataset item_id
    for split in ("train", "test"):
        exp = [e for e in expected if e["test"] == (split == "test")]
        got = read_split(out, split, [e["entity"] for e in exp])
        assert len(got) == len(exp), split
        for g, e in zip(got, exp):
            assert (g["entity"], g["user_id"], g["label"]) == (e["entity"], e["user_id"], e["label"])
            assert (g["gender"], g["age"]) == (e["gender"], e["age"])
            assert g["category"] == (None if e["category"] is None else 2 * e["category"] + e["entity"])
            assert item_ids.setdefault((e["entity"], e["item"]), g["item_id"]) == g["item_id"]
            assert g["activity"] == e["activity"]
            e["got"] = g
    # ids are namespaced per entity: one raw id -> one dataset id per entity, never shared across entities
    assert len(set(item_ids.values())) == len(item_ids)
    for e in expected:
        g = e["got"]
        assert g["hist_source_items"] == [item_ids[(0, i)] for i in e["hist_src"]]
        assert g["hist_target_items"] == [item_ids[(1, i)] for i in e["hist_tgt"]]
    seqs = (("hist_source_items", "src_rows"), ("hist_target_items", "tgt_rows"))
    side = [(column, feature, key) for name, key in seqs
            for feature, column in (schema.sequences[name].side_features.items() if schema else ())]
    missing = {column: 0 for column, _, _ in side}
    for column, feature, key in side:
        for e in expected:
            liked = [expected[i]["got"] for i in e[key]]
            assert e["got"][column] == [MISSING[feature][x["entity"]] if x[feature] is None else x[feature]
                                        for x in liked], (column, e)
            missing[column] += sum(x[feature] is None for x in liked)
    return missing


# --------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------


def test_config_loads_and_has_no_leaks():
    cfg = load_config(TENREC)
    s = cfg.schema
    assert not LEAKS & set(s.features)
    assert {t.dim for t in s.tables.values()} == {8}
    assert s.features_of("specific", "source") and s.features_of("specific", "target")
    assert {q.entity for q in s.sequences.values()} == {"source", "target"}
    import yaml
    assert "synth" not in yaml.safe_load(open(TENREC))  # no synthetic-data section
    assert cfg.tenrec.split == "per_user"


def test_hand_built_timeline(tmp_path):
    # 4 video rows at times 0, 1/4, 2/4, 3/4; 2 article rows at 0, 1/2. Merged (video first on ties):
    # v0 a0 v1 v2 a1 v3
    video = [video_row(1, 5, 1), video_row(2, 6, 0, category=None), video_row(1, 7, 1), video_row(1, 8, 0)]
    article = [article_row(1, 5, 1, category_second=None, gender=None), article_row(2, 9, 0)]
    v, a = write_pair(tmp_path, video, article)
    cfg = tenrec_config("tenrec.chunk_rows=2", "tenrec.test_fraction=0.25")
    manifest = convert(v, a, cfg, str(tmp_path / "out"))
    train = read_split(str(tmp_path / "out"), "train", [0, 1, 0, 0])
    test = read_split(str(tmp_path / "out"), "test", [1, 0])
    # user 1 has 4 rows (v0 a0 v2 v3): the last one is test; user 2 has 2 rows (v1 a1): floor(0.75 * 2) = 1
    assert [(r["entity"], r["user_id"]) for r in train] == [(0, 1), (1, 1), (0, 2), (0, 1)]
    assert [(r["entity"], r["user_id"]) for r in test] == [(1, 2), (0, 1)]
    assert manifest.rows == {"train": {"source": 3, "target": 1}, "test": {"source": 1, "target": 1}}
    v0, a0, v1, v2 = train
    a1, v3 = test
    assert v0["item_id"] != a0["item_id"]  # video item 5 and article item 5 are different ids
    assert [r["label"] for r in (v0, a0, v1, v2, a1, v3)] == [1, 1, 0, 1, 0, 0]  # label = like
    assert v0["hist_source_items"] == [] and v0["hist_target_items"] == [] and v0["activity"] == 0
    assert a0["hist_source_items"] == [v0["item_id"]] and a0["hist_target_items"] == [] and a0["activity"] == 1
    assert v2["hist_source_items"] == [v0["item_id"]] and v2["hist_target_items"] == [a0["item_id"]]
    assert v3["hist_source_items"] == [v0["item_id"], v2["item_id"]] and v3["activity"] == 3
    # side columns: the liked rows' own category values, step by step; a liked row without one gives the missing
    # value (a0's category_second is null: 2 * (2**61 - 1) + 1, the article encoding of MISSING_RAW)
    assert v0["hist_source_categories"] == [] and a0["hist_source_categories"] == [v0["category"]] == [0]
    assert v2["hist_target_categories"] == [2 ** 62 - 1] and v2["hist_source_categories"] == [0]
    assert v3["hist_source_categories"] == [v0["category"], v2["category"]] == [0, 0]
    assert v3["hist_target_categories"] == [2 ** 62 - 1] and a1["hist_target_categories"] == []
    assert a1["hist_source_items"] == [] and a1["activity"] == 0  # user 2 liked nothing
    # missing values are null; entity-specific features are null on the other entity
    assert v1["category"] is None and a0["category"] is None and a0["gender"] is None
    assert v0["video_category_raw"] == 0 and v0["category_first"] is None and v0["item_score1"] is None
    assert a0["video_category_raw"] is None and a0["category_first"] == 10 and a0["item_score1"] is not None
    assert a0["exposure_count_bucket"] > a0["click_count_bucket"]  # 120 vs 9 impressions / clicks
    assert not LEAKS & set(v0)  # no label or leak column in the dataset
    src = manifest.source
    assert src["kind"] == "tenrec" and src["rows"] == {"video": 4, "article": 2} and src["users"] == 2


# side features of the two sequences: the config's (each step's category), none, or every kind of encoding
SIDE = {
    "config": (),
    "none": ("schema.sequences.hist_source_items.side_features={}",
             "schema.sequences.hist_target_items.side_features={}"),
    "more": ("schema.sequences.hist_source_items.side_features={category: hist_source_categories, "
             "video_category_raw: hist_source_raw_categories}",
             "schema.sequences.hist_target_items.side_features={category_first: hist_target_first, category: "
             "hist_target_categories, item_score1: hist_target_score1, exposure_count_bucket: hist_target_exposure}"),
}


@pytest.mark.parametrize("split, chunk, max_src, max_tgt, seed, n_video, n_article, side", [
    ("per_user", 7, 3, 2, 0, 157, 61, "more"),        # many windows, small max_len: sequences wrap around
    ("per_user", 10000, 3, 5, 1, 157, 61, "config"),  # one window: truncation inside the window
    ("global", 13, 5, 1, 2, 157, 61, "more"),
    ("per_user", 1, 50, 50, 3, 157, 61, "config"),    # one row per window, nothing truncated
    ("per_user", 9, 4, 3, 4, 23, 95, "more"),         # more articles than videos: windows step through the articles
    ("global", 5, 2, 2, 6, 40, 40, "none"),           # equal lengths: every video row ties with an article row
])
def test_sequences_match_brute_force(tmp_path, split, chunk, max_src, max_tgt, seed, n_video, n_article, side):
    video, article = random_rows(seed, n_video=n_video, n_article=n_article)
    v, a = write_pair(tmp_path, video, article)
    cfg = tenrec_config(f"schema.sequences.hist_source_items.max_len={max_src}",
                        f"schema.sequences.hist_target_items.max_len={max_tgt}",
                        f"tenrec.split={split}", f"tenrec.chunk_rows={chunk}", *SIDE[side])
    assert len(cfg.schema.side_keys) == {"config": 2, "none": 0, "more": 6}[side]
    seen = []
    manifest = convert(v, a, cfg, str(tmp_path / "out"), progress=seen.append)
    assert sum(seen) == n_video + n_article
    expected = reference(video, article, max_src, max_tgt, split, cfg.tenrec.test_fraction)
    missing = check_against_reference(str(tmp_path / "out"), expected, cfg.schema)
    assert len(missing) == len(cfg.schema.side_keys) and all(missing.values())  # steps of liked rows without one
    for s in ("train", "test"):
        for code, ent in ((0, "source"), (1, "target")):
            assert manifest.rows[s][ent] == sum(1 for e in expected if e["test"] == (s == "test")
                                                and e["entity"] == code)


def test_split_sizes(tmp_path):
    video, article = random_rows(5, n_video=100, n_article=40, users=5)
    v, a = write_pair(tmp_path, video, article)
    m = convert(v, a, tenrec_config("tenrec.split=global"), str(tmp_path / "g"))
    assert m.rows == {"train": {"source": 80, "target": 32}, "test": {"source": 20, "target": 8}}
    m = convert(v, a, tenrec_config("tenrec.split=per_user"), str(tmp_path / "u"))
    per_user = {}
    for r in video + article:
        per_user[r["user_id"]] = per_user.get(r["user_id"], 0) + 1
    assert m.split_rows("test") == sum(n - math.floor(Fraction(4, 5) * n) for n in per_user.values())
    # every user's test rows come after all of its train rows on the merged timeline
    ref = reference(video, article, 50, 50, "per_user", 0.2)
    for u in per_user:
        flags = [e["test"] for e in ref if e["user_id"] == u]
        assert flags == sorted(flags)


def test_leak_columns_do_not_matter(tmp_path):
    video, article = random_rows(7, n_video=60, n_article=30)
    v, a = write_pair(tmp_path, video, article, "one")
    rng = random.Random(1)
    for r in video:
        r.update(click=rng.randrange(2), follow=rng.randrange(2), share=rng.randrange(2),
                 watching_times=rng.randrange(9))
    for r in article:
        r.update(read_percentage=rng.random(), read=rng.randrange(2), read_time=rng.randrange(500),
                 share=rng.randrange(2), follow=rng.randrange(2), favorite=rng.randrange(2),
                 like_count=rng.randrange(50), comment_count=rng.randrange(50))
    v2, a2 = write_pair(tmp_path, video, article, "two")
    cfg = tenrec_config()
    convert(v, a, cfg, str(tmp_path / "o1"))
    convert(v2, a2, cfg, str(tmp_path / "o2"))
    for split in ("train", "test"):
        assert read_split(str(tmp_path / "o1"), split) == read_split(str(tmp_path / "o2"), split)


@pytest.mark.parametrize("id_mapping", ["hash", "modulo"])
def test_reader_reads_the_result(tmp_path, id_mapping):
    from mkt_torchrec.data.reader import ParquetReader
    from mkt_torchrec.data.schema import map_ids

    video, article = random_rows(11, n_video=120, n_article=50)
    v, a = write_pair(tmp_path, video, article)
    cfg = tenrec_config("schema.sequences.hist_source_items.max_len=3", "data.validation_fraction=0",  # files whole
                        f"schema.tables.category.id_mapping={id_mapping}")
    table = cfg.schema.tables["category"]
    out = str(tmp_path / "out")
    manifest = convert(v, a, cfg, out)
    reader = ParquetReader(out, "train", cfg.schema, cfg.data, training=False)
    n = 0
    got = collections.Counter()
    for batch in reader:
        n += len(batch)
        assert batch.sparse_features.keys() == cfg.schema.sparse_keys
        jt = batch.sparse_features.to_dict()
        assert int(jt["hist_source_items"].lengths().max()) <= 3
        for f in ("item_id", "user_id"):
            assert bool((jt[f].lengths() == 1).all())
        ent = batch.entity.numpy()
        assert (jt["video_category_raw"].lengths().numpy()[ent == 1] == 0).all()
        assert (jt["category_first"].lengths().numpy()[ent == 0] == 0).all()
        assert batch.activity is not None
        for seq, side in (("hist_source_items", "hist_source_categories"), ("hist_target_items",
                                                                             "hist_target_categories")):
            assert jt[side].lengths().tolist() == jt[seq].lengths().tolist()  # one category per step, truncated alike
        got.update(zip(batch.user_id.tolist(), ent.tolist(), batch.labels.tolist(), batch.activity.tolist(),
                       jt["hist_target_items"].lengths().tolist(),
                       map(tuple, jt["hist_source_categories"].to_padded_dense(3, -1).tolist()),
                       map(tuple, jt["hist_target_categories"].to_padded_dense(50, -1).tolist())))
    assert n == manifest.split_rows("train")
    rows = read_split(out, "train")

    def categories(values: list[int], max_len: int) -> tuple:  # raw side values -> table rows, as the reader maps
        mapped = map_ids(np.array(values[-max_len:], np.int64), "category", table).tolist()
        return tuple(mapped + [-1] * (max_len - len(mapped)))

    want = collections.Counter((r["user_id"], r["entity"], float(r["label"]), r["activity"],
                                len(r["hist_target_items"]), categories(r["hist_source_categories"], 3),
                                categories(r["hist_target_categories"], 50)) for r in rows)
    assert got == want
    # a liked row without a category gives a step its own table row, apart from every real category's
    real = {r["category"] for r in rows if r["category"] is not None}
    missing = {x for r in rows for x in r["hist_source_categories"] + r["hist_target_categories"]} - real
    assert missing == {2 ** 62 - 2, 2 ** 62 - 1}  # a video's and an article's
    real_rows = set(map_ids(np.array(sorted(real)), "category", table).tolist())
    missing_rows = set(map_ids(np.array(sorted(missing)), "category", table).tolist())
    assert len(missing_rows) == 2 and not missing_rows & real_rows
    if id_mapping == "modulo":  # a power-of-two table: its last two rows
        assert missing_rows == {table.rows - 2, table.rows - 1}


def test_missing_file_and_bad_headers(tmp_path):
    video, article = random_rows(0, 10, 5)
    v, a = write_pair(tmp_path, video, article)
    cfg = tenrec_config()
    with pytest.raises(ValueError, match="nope.csv.*not found"):
        convert(str(tmp_path / "nope.csv"), a, cfg, str(tmp_path / "out"))
    # a missing column
    text = open(a).read().replace("category_first,", "", 1)
    bad = tmp_path / "bad-article.csv"
    bad.write_text(text)
    with pytest.raises(ValueError, match=r"bad-article\.csv.*missing.*category_first"):
        convert(v, str(bad), cfg, str(tmp_path / "out"))
    # an unexpected column
    lines = open(v).read().splitlines()
    bad = tmp_path / "bad-video.csv"
    bad.write_text("\n".join([lines[0] + ",timestamp"] + [ln + ",0" for ln in lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"bad-video\.csv.*unexpected.*timestamp"):
        convert(str(bad), a, cfg, str(tmp_path / "out"))
    # the files swapped
    with pytest.raises(ValueError, match=r"QK-article\.csv.*missing"):
        convert(a, v, cfg, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("row, column, value, message", [
    (37, "item_id", "abc", r"column 'item_id', data row 38 \(line 39\): 'abc' is not a number"),
    (41, "item_id", "4.5", r"column 'item_id', data row 42 \(line 43\).*not an integer"),
    (45, "like", "2", r"column 'like', data row 46 \(line 47\): label '2' is neither positive \[1\] nor "
                      r"negative \[0\]"),
    (3, "user_id", "\\N", r"column 'user_id', data row 4 \(line 5\): null user id"),
    (44, "user_id", "x7", r"column 'user_id', data row 45 \(line 46\): 'x7' is not a number"),
    (12, "item_id", "18014398509481985", r"column 'item_id', data row 13 \(line 14\): id 18014398509481984 is "
                                         r"above 2\*\*53"),
])
def test_bad_values_name_file_column_row_and_leave_no_output(tmp_path, row, column, value, message):
    video, article = random_rows(3, 40, 50)
    v, a = write_pair(tmp_path, video, article)
    lines = open(a).read().splitlines()
    cells = lines[row + 1].split(",")
    cells[ARTICLE_COLUMNS.index(column)] = value
    lines[row + 1] = ",".join(cells)
    open(a, "w").write("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"QK-article\.csv: " + message):
        convert(v, a, tenrec_config("tenrec.chunk_rows=10"), str(out))  # fails after several windows
    assert sorted(os.listdir(tmp_path)) == ["in"]  # neither out nor a temporary directory


def test_ragged_row_names_the_line(tmp_path):
    video, article = random_rows(3, 30, 10)
    v, a = write_pair(tmp_path, video, article)
    lines = open(v).read().splitlines()
    lines[20] = "1,2,3"
    open(v, "w").write("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"QK-video\.csv: data row 20 \(line 21\): .*Expected 10 columns, got 3"):
        convert(v, a, tenrec_config(), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_interrupted_conversion_leaves_no_dataset(tmp_path):
    video, article = random_rows(4, 60, 20)
    v, a = write_pair(tmp_path, video, article)
    calls = []

    def progress(n):
        calls.append(n)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(v, a, tenrec_config("tenrec.chunk_rows=10"), str(tmp_path / "out"), progress=progress)
    assert sorted(os.listdir(tmp_path)) == ["in"]
    # an existing dataset survives a failed overwrite, and is only replaced by a complete one
    first = convert(v, a, tenrec_config(), str(tmp_path / "out"))
    with pytest.raises(FileExistsError):
        convert(v, a, tenrec_config(), str(tmp_path / "out"))
    with pytest.raises(KeyboardInterrupt):
        calls.clear()
        convert(v, a, tenrec_config("tenrec.chunk_rows=10"), str(tmp_path / "out"), overwrite=True,
                progress=progress)
    assert json.load(open(tmp_path / "out" / "manifest.json"))["rows"] == first.rows
    convert(v, a, tenrec_config("tenrec.split=global"), str(tmp_path / "out"), overwrite=True)
    assert json.load(open(tmp_path / "out" / "manifest.json"))["source"]["tenrec"]["split"] == "global"
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]


def test_schema_the_converter_cannot_fill(tmp_path):
    video, article = random_rows(0, 10, 5)
    v, a = write_pair(tmp_path, video, article)
    cfg = tenrec_config()
    cfg.schema.features["watching_times"] = cfg.schema.features["gender"]
    with pytest.raises(ValueError, match="'watching_times' is not produced"):
        convert(v, a, cfg, str(tmp_path / "out"))
    cfg = tenrec_config("schema.features.category_first.entity=source")
    with pytest.raises(ValueError, match="'category_first' must be declared"):
        convert(v, a, cfg, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("sequence, feature, allowed", [
    ("hist_source_items", "category_first", "source (video) rows; side features allowed here: ['category', "
                                            "'video_category_raw']"),  # an article attribute
    ("hist_target_items", "gender", "target (article) rows; side features allowed here: ['category', "
                                    "'category_first', 'item_score1', 'item_score2', 'item_score3', "
                                    "'exposure_count_bucket', 'click_count_bucket']"),  # the user's, not the item's
])
def test_a_side_feature_the_converter_cannot_fill(tmp_path, sequence, feature, allowed):
    video, article = random_rows(0, 10, 5)
    v, a = write_pair(tmp_path, video, article)
    cfg = tenrec_config(f"schema.sequences.{sequence}.side_features={{{feature}: hist_side}}")
    with pytest.raises(ValueError) as err:
        convert(v, a, cfg, str(tmp_path / "out"))
    assert str(err.value) == (f"mkt tenrec: schema.sequences.{sequence}.side_features.{feature}: not an attribute "
                              f"the Tenrec converter produces for the sequence's {allowed}")
    assert not os.path.exists(tmp_path / "out")


def test_one_empty_file(tmp_path):
    # a header-only article file gives the target entity nothing: refused, naming it (issue 27, case 7)
    video, article = random_rows(8, 30, 0)
    v, a = write_pair(tmp_path, video, article)
    cfg = tenrec_config("tenrec.chunk_rows=7")
    with pytest.raises(ValueError, match="no data rows"):
        convert(v, a, cfg, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_large_and_negative_user_ids(tmp_path):
    # ids far from 0..U-1 take the sorted-search path instead of the lookup table
    video, article = random_rows(9, n_video=80, n_article=30)
    remap = {u: (-1) ** u * (10 ** 15 + 7919 * u) for u in range(9)}
    for r in video + article:
        r["user_id"] = remap[r["user_id"]]
    v, a = write_pair(tmp_path, video, article)
    cfg = tenrec_config("tenrec.chunk_rows=9", "schema.sequences.hist_source_items.max_len=4")
    convert(v, a, cfg, str(tmp_path / "out"))
    check_against_reference(str(tmp_path / "out"), reference(video, article, 4, 50, "per_user", 0.2), cfg.schema)


def test_category_sequence(tmp_path):
    # a sequence may mirror the shared category instead of the item id; liked rows without a category are skipped,
    # in its side columns too (here: the item id beside each category)
    video, article = random_rows(12, n_video=90, n_article=60)
    v, a = write_pair(tmp_path, video, article)
    cfg = tenrec_config("schema.sequences.hist_target_items.shared_feature=category", "tenrec.test_fraction=0",
                        "tenrec.chunk_rows=11", "schema.sequences.hist_target_items.max_len=3",
                        "schema.sequences.hist_target_items.side_features={item_id: hist_target_item_ids}")
    convert(v, a, cfg, str(tmp_path / "out"))
    timeline = [e["entity"] for e in reference(video, article, 3, 3, "per_user", 0)]
    rows = read_split(str(tmp_path / "out"), "train", timeline)  # all rows, in merged time order
    assert len(rows) == 150
    liked: dict = {}
    for r in rows:
        hist = liked.setdefault(r["user_id"], [])
        assert r["hist_target_items"] == [c for c, _ in hist[-3:]]
        assert r["hist_target_item_ids"] == [i for _, i in hist[-3:]]
        if r["entity"] == 1 and r["label"] == 1 and r["category"] is not None:
            hist.append((r["category"], r["item_id"]))
    assert any(r["entity"] == 1 and r["label"] == 1 and r["category"] is None for r in rows)  # some were skipped


def test_a_huge_field_is_a_clear_error(tmp_path):
    """A 10 MB field used to surface pyarrow's 'straddling object' advice about a block size we do not expose."""
    video, article = random_rows(3, 30, 10)
    v, a = write_pair(tmp_path, video, article)
    lines = open(v).read().splitlines()
    cells = lines[10].split(",")
    cells[0] = "1" * (10 << 20)
    lines[10] = ",".join(cells)
    open(v, "w").write("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"QK-video\.csv: after data row \d+: a line longer than 4 MiB"):
        convert(v, a, tenrec_config(), str(tmp_path / "out"))


def test_a_very_long_header_names_its_duplicates(tmp_path):
    """The duplicate-column check was quadratic (minutes of CPU on a 100k-column header); now it counts once."""
    video, article = random_rows(3, 30, 10)
    v, a = write_pair(tmp_path, video, article)
    lines = open(v).read().splitlines()
    lines[0] = lines[0] + "," + ",".join(f"x{i}" for i in range(100_000)) + ",x7"
    open(v, "w").write("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"duplicate column\(s\) \['x7'\]"):
        convert(v, a, tenrec_config(), str(tmp_path / "out"))
