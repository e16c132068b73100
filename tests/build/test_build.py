"""`mkt build` with DuckDB on Spark-style logs: every row equals a plain-Python reference; bad input is a one-line
error naming what is wrong; nothing half-written."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mkt_torchrec.build.hashing import hash_id
from mkt_torchrec.build.inputs import hash_strings
from mkt_torchrec.build.run import build_dataset
from mkt_torchrec.cli import main
from mkt_torchrec.config import load_config

from tests.build.logs import config_text, reference, write_logs

COLUMNS = ["entity", "label", "user_id", "item_id", "category", "price_bucket", "style", "hist_source_items",
           "hist_target_items", "hist_source_categories", "hist_target_categories", "log_price", "activity"]


def dataset_rows(out: str) -> dict:
    """split -> entity -> rows (dicts of COLUMNS) in manifest order."""
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    got: dict = {}
    for split, files in manifest["splits"].items():
        for fi in files:
            pf = pq.ParquetFile(os.path.join(out, fi["path"]))
            for rg, ent in enumerate(fi["row_group_entity"]):
                rows = pf.read_row_group(rg).to_pylist()
                assert all(r["entity"] == ent for r in rows)  # entity-pure row groups
                got.setdefault(split, {}).setdefault(ent, []).extend({c: r[c] for c in COLUMNS} for r in rows)
    return got


def _config(tmp_path, **source):
    path = tmp_path / "build.yaml"
    path.write_text(config_text(str(tmp_path / "logs"), **source))
    return load_config(path)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    write_logs(str(root / "logs"), rows=2000)
    return root


def test_the_hash_is_the_documented_md5_prefix_and_the_vectorised_one_agrees():
    assert hash_id("abc") == 648541476951500027 == int("900150983cd24fb", 16)
    assert hash_id("source|abc") == 246645285092654989
    values = ["abc", "", "u001", "ünïcode", "x" * 300, "source|7", None, "abc"]
    cache: dict = {}
    for _ in range(2):  # the second time from the cache
        got = hash_strings(pa.array(values, pa.string()), cache).to_pylist()
        assert got == [None if v is None else hash_id(v) for v in values]
    assert len(cache) == 6


@pytest.mark.parametrize("split_by", ["time", "user_fraction"])
def test_every_row_equals_the_plain_python_reference(logs, tmp_path, split_by):
    extra = {} if split_by == "time" else {"split": {"by": "user_fraction", "test_fraction": 0.25}}
    (tmp_path / "logs").symlink_to(logs / "logs")
    cfg = _config(tmp_path, **extra)
    manifest = build_dataset(cfg, str(tmp_path / "ds"))
    want = reference(str(logs / "logs"), split_by, test_fraction=0.25)
    got = dataset_rows(str(tmp_path / "ds"))
    assert sorted(got) == sorted(want)
    for split in want:
        for ent in (0, 1):
            expected = [{c: o[c] for c in COLUMNS} for o in want[split][ent]]
            assert got[split][ent] == expected, (split, ent)
            assert manifest.rows[split]["source" if ent == 0 else "target"] == len(expected)
            assert manifest.clicks[split]["source" if ent == 0 else "target"] == sum(r["label"] for r in expected)
    # the reference has ties, nulls in side features and both entities' histories: the test is not vacuous
    rows = [r for s in want.values() for e in s.values() for r in e]
    assert any(2 ** 61 - 1 in r["hist_source_categories"] + r["hist_target_categories"] for r in rows)
    assert sum(len(r["hist_source_items"]) == 3 for r in rows) > 100
    assert sum(len(r["hist_target_items"]) == 2 for r in rows) > 100
    keys = [r["_t"] for r in rows]
    assert len(set(keys)) < len(keys)


def test_cli_build_then_inspect(logs, tmp_path, capsys):
    (tmp_path / "logs").symlink_to(logs / "logs")
    _config(tmp_path)
    cfg = str(tmp_path / "build.yaml")
    assert main(["build", "--config", cfg, "--out", str(tmp_path / "ds")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["rows"]["test"]["source"] > 0
    assert main(["inspect", "--config", cfg, "--data", str(tmp_path / "ds"), "--split", "test"]) == 0
    # a second build refuses to replace it without --overwrite; with it, replaces it
    capsys.readouterr()
    assert main(["build", "--config", cfg, "--out", str(tmp_path / "ds")]) != 0
    assert "already exists (pass --overwrite to replace it)" in capsys.readouterr().err
    assert main(["build", "--config", cfg, "--out", str(tmp_path / "ds"), "--overwrite"]) == 0


def test_an_output_that_is_not_a_dataset_is_never_replaced(logs, tmp_path):
    (tmp_path / "logs").symlink_to(logs / "logs")
    cfg = _config(tmp_path)
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "thesis.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="victim"):
        build_dataset(cfg, str(tmp_path / "victim"), overwrite=True)
    assert (tmp_path / "victim" / "thesis.txt").read_text() == "precious"


def _one_file_logs(tmp_path, **columns):
    """One Parquet file of 4 rows, with columns replaced by ``columns``."""
    base = {
        "uid": ["a", "a", "b", "b"], "item": ["x", "y", "x", "z"], "item_type": ["product", "post", "post", "product"],
        "clicked": pa.array([1, 0, 1, 0], pa.int32()),
        "event_time": pa.array(np.array(["2026-11-01T01", "2026-11-02T01", "2026-11-03T01", "2026-11-05T02"],
                                        dtype="datetime64[us]"), pa.timestamp("us")),
        "category": ["c1", "c2", "c1", None], "price": [1.0, None, None, 20.0], "style": pa.array([None, 1, 2, None], pa.int32()),
    }
    base.update(columns)
    os.makedirs(tmp_path / "logs", exist_ok=True)
    pq.write_table(pa.table(base), tmp_path / "logs" / "part-0.parquet")


@pytest.mark.parametrize("columns, source, match", [
    ({"clicked": pa.array([1, 0, 2, 0], pa.int32())}, {}, r"part-0.parquet: column 'clicked', row 3: label 2 is "
                                                          r"neither positive"),
    ({"clicked": pa.array([1, None, 0, 0], pa.int32())}, {}, r"part-0.parquet: column 'clicked', row 2: null label"),
    ({"event_time": ["2026-11-01", "yesterday", "2026-11-03", "2026-11-04"]}, {},
     r"part-0.parquet: column 'event_time', row 2: unparsable time 'yesterday'"),
    ({"uid": ["a", None, "b", "b"]}, {}, r"part-0.parquet: column 'uid', row 2: null user id"),
    ({"item_type": ["product", "video", "video", "post"]}, {},
     r"source.entity: 2 rows have a 'item_type' value outside source.entity.values .*'video' x2"),
    ({}, {"features": {"user_id": {"column": "user"}}}, r"column 'user' \(source.features.user_id\) is missing"),
    ({}, {"partitions": {"column": "dt", "first": "2027-01-01"}}, r"not under a dt=... directory"),
    ({}, {"split": {"by": "time", "test_from": "next week"}}, r"source.split.test_from: 'next week' is not an ISO"),
    ({"price": ["1", "cheap", None, "20"]}, {}, r"column 'price', row 2: 'cheap' is not a number"),
    ({}, {"features": {"price_bucket": {"column": "price", "transform": "hash"}}},
     r"source.features.price_bucket: cannot hash the float column 'price'"),
    ({"event_time": [1.5, 2.5, None, 4.0]}, {"split": {"by": "time", "test_from": "3.5"}},
     r"column 'event_time', row 3: null or unparsable time"),
])
def test_bad_logs_are_one_line_errors_and_write_nothing(tmp_path, columns, source, match):
    _one_file_logs(tmp_path, **columns)
    from tests.build.logs import SOURCE
    merged = {k: ({**SOURCE[k], **v} if isinstance(v, dict) and k in SOURCE and k != "split" else v)
              for k, v in source.items()}
    if "features" in source:
        merged["features"] = {**SOURCE["features"], **source["features"]}
    cfg = _config(tmp_path, **merged)
    with pytest.raises(ValueError, match=match) as e:
        build_dataset(cfg, str(tmp_path / "ds"))
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "ds")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("ds")]


def test_unknown_entities_can_be_dropped_and_are_counted(tmp_path, capsys):
    _one_file_logs(tmp_path, item_type=["product", "video", "post", "post"])
    cfg = _config(tmp_path, entity={"column": "item_type", "values": {"product": "source", "post": "target"},
                                    "unknown": "drop"})
    manifest = build_dataset(cfg, str(tmp_path / "ds"))
    assert "dropped 1 rows" in capsys.readouterr().out
    assert manifest.source["rows_dropped"] == 1 and manifest.source["rows_read"] == 4
    assert sum(sum(v.values()) for v in manifest.rows.values()) == 3


def test_an_empty_partition_range_is_an_error(logs, tmp_path):
    (tmp_path / "logs").symlink_to(logs / "logs")
    cfg = _config(tmp_path, partitions={"column": "dt", "first": "2027-01-01"})
    with pytest.raises(ValueError, match=r"no partition dt in \[2027-01-01, None\] \(of 8 files\)"):
        build_dataset(cfg, str(tmp_path / "ds"))
    cfg = _config(tmp_path, partitions={"column": "dt", "first": "2026-11-02", "last": "2026-11-03"})
    manifest = build_dataset(cfg, str(tmp_path / "ds"))
    assert manifest.source["files"] == 4


def _entity_csvs(tmp_path, source_rows: list[str], target_rows: list[str]) -> None:
    """One CSV per entity, each naming its category column its own way; only the source file has a price,
    only the target file a style."""
    (tmp_path / "products.csv").write_text("uid,item,clicked,cat_a,price\n" + "".join(r + "\n" for r in source_rows))
    (tmp_path / "posts.csv").write_text("uid,item,clicked,cat_b,style\n" + "".join(r + "\n" for r in target_rows))


def _entity_csv_config(tmp_path, features=(), **source):
    import yaml

    from tests.build.logs import SCHEMA, SOURCE
    mapping = {
        "inputs": [{"path": str(tmp_path / "products.csv"), "format": "csv", "entity": "source",
                    "columns": {"category": "cat_a"}},
                   {"path": str(tmp_path / "posts.csv"), "format": "csv", "entity": "target",
                    "columns": {"category": "cat_b"}}],
        "time": {"from_position": True},
        "label": {"column": "clicked"},
        "entity": {},
        "features": {**SOURCE["features"], "item_id": {"column": "item", "by_entity": True},
                     "category": {"column": "category", "transform": "int", "by_entity": True},
                     "style": {"column": "style", "transform": "int"}, **dict(features)},
        "dense": SOURCE["dense"],
        "split": {"by": "fraction", "test_fraction": 0.3},
        "batch_rows": 1,
        **source,
    }
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump({"schema": SCHEMA, "source": mapping}, sort_keys=False))
    return load_config(path)


def test_one_csv_per_entity_on_a_timeline_of_row_positions(tmp_path):
    # products at 0, 1/3, 2/3; posts at 0, 1/2. Timeline (the earlier input first on a tie): p0 q0 p1 q1 p2
    _entity_csvs(tmp_path, ["u1,a,1,,5.0", "u1,,1.0,4,60", "u1,c,1,4,"], ["u1,x,1,7,2", "u1,y,0.0,\\N,3"])
    seen = []
    manifest = build_dataset(_entity_csv_config(tmp_path), str(tmp_path / "ds"), progress=seen.append)
    assert seen == [1] * 5  # batch_rows: 1
    assert manifest.source["input_rows"] == [3, 2] and manifest.source["users"] == 1
    got = dataset_rows(str(tmp_path / "ds"))
    (p0, p1), (q0,) = got["train"][0], got["train"][1]
    (p2,), (q1,) = got["test"][0], got["test"][1]  # fraction: each entity's rows from floor(0.7 * n) on
    assert [r["label"] for r in (p0, q0, p1, q1, p2)] == [1, 1, 1, 0, 1]  # "1.0" and "0.0" read as numbers
    assert (p0["category"], p1["category"], q0["category"]) == (None, 2 * 4, 2 * 7 + 1)  # per-input columns
    assert (p0["price_bucket"], p1["price_bucket"], q0["price_bucket"]) == (1, 3, None)  # posts.csv has no price
    assert (q0["style"], q1["style"], p0["style"]) == (2, 3, None)  # products.csv has no style
    # q0 ties with p0 and comes after it; p1 (liked, no item) is no step, but counts as activity
    assert q0["hist_source_items"] == [p0["item_id"]] and q0["activity"] == 1
    assert q0["hist_source_categories"] == [2 * (2 ** 61 - 1)]  # p0's missing category: MISSING_RAW, encoded
    assert q1["hist_source_items"] == p2["hist_source_items"] == [p0["item_id"]]
    assert p2["hist_target_items"] == [q0["item_id"]] and p2["activity"] == 3
    assert p0["hist_source_items"] == [] and p0["activity"] == 0


@pytest.mark.parametrize("rows, features, match", [
    ((["u1,a,1,3,5", "u1,b"], ["u1,x,1,7,2"]), {}, r"products\.csv: data row 2 \(line 3\): Expected 5 columns"),
    ((["u1,a,1,3,5"], ["u1,x,1,7,2", "u1,y,1,7.5,2"]), {},
     r"posts\.csv: column 'cat_b', data row 2 \(line 3\): value 7.5 is not an integer id"),
    ((["u1,a,1,3,5"], ["u1,x,1,7,2", ",y,1,7,2"]), {}, r"posts\.csv: column 'uid', data row 2 \(line 3\): null user"),
    ((["u1,a,1,3,5", "u1,,1,3,5"], ["u1,x,1,7,2"]),
     {"item_id": {"column": "item", "by_entity": True, "required": True}},
     r"products\.csv: column 'item', data row 2 \(line 3\): missing value \(source\.features\.item_id\.required\)"),
    ((["u1,a,1,3,5"], ["u1,x,1,7,2", "u1,x,1,7,-2"]), {},
     r"posts\.csv: column 'style', data row 2 \(line 3\): negative value -2, but feature 'style' uses a table "
     r"with id_mapping 'modulo'"),
    ((["u1,a,1,3,5"], ["u1,x,yes,7,2"]), {}, r"posts\.csv: column 'clicked', data row 1 \(line 2\): label 'yes'"),
    (([], []), {}, r"products\.csv, .*posts\.csv: no data rows"),
])
def test_bad_csv_values_name_the_data_row_and_line(tmp_path, rows, features, match):
    _entity_csvs(tmp_path, *rows)
    cfg = _entity_csv_config(tmp_path, features=features, batch_rows=1000)
    with pytest.raises(ValueError, match=match) as e:
        build_dataset(cfg, str(tmp_path / "ds"))
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "ds")


def test_a_valid_split_by_time_is_read_as_written_and_validation_fraction_cuts_nothing(logs, tmp_path):
    from mkt_torchrec.data.reader import ParquetReader

    (tmp_path / "logs").symlink_to(logs / "logs")
    cfg = _config(tmp_path)
    manifest = build_dataset(cfg, str(tmp_path / "ds"))
    assert manifest.has_valid_files
    for fraction in (0.0, 0.3):
        cfg.data.validation_fraction = fraction
        for split in ("train", "valid", "test"):
            for entity in ("source", "target"):
                reader = ParquetReader(str(tmp_path / "ds"), split, cfg.schema, cfg.data, training=False,
                                       entity=entity)
                assert reader.num_rows() == manifest.rows[split][entity] > 0
                assert sum(b.labels.numel() for b in reader) == manifest.rows[split][entity]


def test_the_readme_shows_configs_logs_yaml_whole():
    from tests.conftest import REPO

    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Your own data"):readme.index("## Training on a cluster")]
    shown = section[section.index("```yaml\n") + 8:section.index("```", section.index("```yaml\n") + 8)]
    text = open(os.path.join(REPO, "configs", "logs.yaml"), encoding="utf-8").read()
    assert shown == text[text.index("schema:"):text.index("\ndata:")].rstrip() + "\n"


def test_sequences_from_list_and_delimited_columns_are_encoded_as_their_features(tmp_path):
    """A sequence the logs already carry: a list<string> column and a delimited string column, each step hashed
    as the feature it is a value of (by_entity with the sequence's entity); a null list is empty, a null step is
    MISSING_RAW."""
    from tests.build.logs import MISSING_RAW

    _one_file_logs(tmp_path, hist_posts=pa.array([["x", "y"], None, [], ["z", None]], pa.list_(pa.string())),
                   hist_post_cats=pa.array([["c1", "c2"], None, [], ["c3", "c4"]], pa.list_(pa.string())),
                   hist_products=["x|w", None, "w", ""], hist_product_cats=["c1|c2", None, "c9", ""])
    sequences = {"hist_target_items": {"column": "hist_posts",
                                       "side_columns": {"hist_target_categories": "hist_post_cats"}},
                 "hist_source_items": {"column": "hist_products", "delimiter": "|",
                                       "side_columns": {"hist_source_categories": "hist_product_cats"}}}
    cfg = _config(tmp_path, sequences=sequences, split={"by": "time", "test_from": "2026-12-01"})
    build_dataset(cfg, str(tmp_path / "ds"))
    built = {(r["user_id"], r["item_id"]): r for e in dataset_rows(str(tmp_path / "ds"))["train"].values() for r in e}
    posts = [[hash_id("target|x"), hash_id("target|y")], [], [], [hash_id("target|z"), MISSING_RAW]]
    products = [[hash_id("source|x"), hash_id("source|w")], [], [hash_id("source|w")], []]  # "": no step
    cats = [[hash_id("c1"), hash_id("c2")], [], [hash_id("c9")], []]
    logs = pq.read_table(tmp_path / "logs" / "part-0.parquet").to_pylist()
    assert len(built) == len(logs) == 4
    for i, r in enumerate(logs):
        prefix = "source|" if r["item_type"] == "product" else "target|"
        row = built[(hash_id(r["uid"]), hash_id(prefix + r["item"]))]
        assert row["hist_target_items"] == posts[i] and len(row["hist_target_categories"]) == len(posts[i])
        assert row["hist_source_items"] == products[i] and row["hist_source_categories"] == cats[i]


def test_a_bad_step_names_its_column_row_and_step(tmp_path):
    _one_file_logs(tmp_path, hist_posts=pa.array([["x"], ["y"], [], []], pa.list_(pa.string())),
                   hist_post_cats=pa.array([["c1"], ["c2", "c3"], [], []], pa.list_(pa.string())))
    cfg = _config(tmp_path, sequences={"hist_target_items": {
        "column": "hist_posts", "side_columns": {"hist_target_categories": "hist_post_cats"}}})
    with pytest.raises(ValueError, match=r"part-0.parquet: column 'hist_post_cats', row 2: 2 values for "
                                         r"'hist_target_categories' but 1 steps in its sequence"):
        build_dataset(cfg, str(tmp_path / "ds"))


def test_a_glob_input_reads_the_files_it_matches(logs, tmp_path):
    (tmp_path / "logs").symlink_to(logs / "logs")
    cfg = _config(tmp_path, inputs=[{"path": str(tmp_path / "logs" / "dt=2026-11-0[12]" / "part-00000-*.parquet")}])
    manifest = build_dataset(cfg, str(tmp_path / "ds"))
    assert manifest.source["files"] == 2


def test_float_times_order_and_split_as_numbers(tmp_path):
    """Negative, zero and fractional times: rows come out in numeric order, ties share no history, and the cut-off
    is read as a number."""
    _one_file_logs(tmp_path, event_time=[3.25, -2.5, 0.0, -1.0], uid=["a", "a", "a", "a"],
                   item_type=["product"] * 4, clicked=pa.array([1, 1, 1, 1], pa.int32()))
    cfg = _config(tmp_path, split={"by": "time", "test_from": "-0.5"})
    build_dataset(cfg, str(tmp_path / "ds"))
    got = dataset_rows(str(tmp_path / "ds"))
    assert [r["activity"] for r in got["train"][0]] == [0, 1] and [r["activity"] for r in got["test"][0]] == [2, 3]
    assert [r["item_id"] for r in got["train"][0]] == [hash_id("source|y"), hash_id("source|z")]
