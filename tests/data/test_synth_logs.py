"""The synthetic data as Spark-style impression logs (day partitions, the logs' own columns) for `mkt build`."""

from __future__ import annotations

import collections
import itertools
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mkt_torchrec.data.synth import TARGET_ID_OFFSET, _World
from mkt_torchrec.data.synth_logs import (
    CONDITIONS,
    MARKER,
    PRICE_BOUNDARIES,
    write_logs,
)
from tests.conftest import small_config

DAYS, START, FILES_PER_DAY, ROW_GROUP_ROWS = 14, "2026-11-01", 3, 64
PART = re.compile(r"part-(\d{5})-([0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12})"
                  r"\.c000\.snappy\.parquet")
EXPECTED_SCHEMA = [
    ("uid", pa.string()), ("item", pa.string()), ("item_type", pa.string()), ("clicked", pa.int32()),
    ("event_time", pa.timestamp("us", tz="UTC")), ("age", pa.int32()), ("gender", pa.int32()),
    ("category", pa.string()), ("price", pa.float64()), ("condition", pa.string()), ("style", pa.int32()),
    ("post_length", pa.int32()), ("true_prob", pa.float32()),
]


def write(out: str, **kwargs) -> dict:
    return write_logs(small_config(), out, days=DAYS, start=START, files_per_day=FILES_PER_DAY,
                      row_group_rows=ROW_GROUP_ROWS, **kwargs)


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("synth_logs") / "logs")
    return out, write(out)


def part_files(out: str) -> list[str]:
    """Every part file, relative to ``out``, sorted."""
    return sorted(os.path.relpath(os.path.join(d, f), out) for d, _, files in os.walk(out) for f in files
                  if f.startswith("part-"))


def read_logs(out: str) -> pa.Table:
    """Every row, each file read on its own (no partition inference), plus its directory's day as ``dt``."""
    tables = []
    for rel in part_files(out):
        t = pq.read_table(os.path.join(out, rel))
        tables.append(t.append_column("dt", pa.array([rel.split("/")[0].removeprefix("dt=")] * t.num_rows)))
    return pa.concat_tables(tables)


def synth_keys(data_dir: str, split: str) -> dict[int, collections.Counter]:
    """Per user, the multiset of (entity, catalogue index, label, true_prob) of a synthetic split's rows."""
    with open(os.path.join(data_dir, "manifest.json")) as f:
        manifest = json.load(f)
    t = pa.concat_tables([pq.read_table(os.path.join(data_dir, f["path"]),
                                        columns=["entity", "user_id", "item_id", "label", "true_prob"])
                          for f in manifest["splits"][split]])
    out: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for e, u, i, y, p in zip(*(t.column(c).to_pylist() for c in t.column_names)):
        out[u][(e, i - (TARGET_ID_OFFSET if e == 1 else 0), y, p)] += 1
    return out


def test_layout_is_sparks(logs):
    out, summary = logs
    days = [str(np.datetime64(START) + d) for d in range(DAYS)]
    assert sorted(os.listdir(out)) == sorted(["_SUCCESS", MARKER, *(f"dt={d}" for d in days)])
    assert os.path.getsize(os.path.join(out, "_SUCCESS")) == 0
    jobs = set()
    for d in days:
        names = sorted(os.listdir(os.path.join(out, f"dt={d}")))
        matches = [PART.fullmatch(n) for n in names]
        assert all(matches), names
        assert [m.group(1) for m in matches] == [f"{i:05d}" for i in range(FILES_PER_DAY)]  # one per writing task
        jobs |= {m.group(2) for m in matches}
    assert len(jobs) == 1  # one job's uuid
    files = part_files(out)
    assert summary["days"] == DAYS and summary["files"] == len(files) == DAYS * FILES_PER_DAY
    for rel in files:
        meta = pq.ParquetFile(os.path.join(out, rel)).metadata
        assert meta.num_row_groups > 1
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            assert group.num_rows <= ROW_GROUP_ROWS
            assert {group.column(c).compression for c in range(group.num_columns)} == {"SNAPPY"}


def test_columns_and_types(logs):
    out, summary = logs
    for rel in part_files(out):
        schema = pq.read_schema(os.path.join(out, rel))
        assert [(f.name, f.type) for f in schema] == EXPECTED_SCHEMA  # no dt column, no sequence column
    t = read_logs(out)
    col = {c: t.column(c).to_pylist() for c in ("uid", "item", "item_type", "category", "condition", "clicked")}
    assert all(re.fullmatch(r"u\d{3}", u) for u in col["uid"])  # 400 users: u000 .. u399
    assert all(re.fullmatch({"product": r"p\d+", "post": r"c\d+"}[k], i) for i, k in zip(col["item"], col["item_type"]))
    assert all(re.fullmatch(r"cat\d+", c) for c in col["category"])
    assert set(col["condition"]) == {*CONDITIONS, None}
    assert set(col["clicked"]) == {0, 1}
    counts = collections.Counter(col["item_type"])
    clicks = collections.Counter(k for k, y in zip(col["item_type"], col["clicked"]) if y)
    assert summary["rows"] == {"product": counts["product"], "post": counts["post"]}
    assert summary["clicks"] == {"product": clicks["product"], "post": clicks["post"]}


def test_entities_mixed_in_every_row_group(logs):
    out, _ = logs
    groups = 0
    for rel in part_files(out):
        f = pq.ParquetFile(os.path.join(out, rel))
        for g in range(f.num_row_groups):
            assert set(f.read_row_group(g, columns=["item_type"]).column(0).to_pylist()) == {"product", "post"}, \
                (rel, g)
            groups += 1
    assert groups > DAYS * FILES_PER_DAY


def test_rows_are_shuffled_within_a_day(logs):
    out, _ = logs
    for rel in part_files(out):
        t = pq.read_table(os.path.join(out, rel), columns=["event_time", "uid"])
        micros = t.column("event_time").cast(pa.int64()).to_numpy()
        assert (np.diff(micros) < 0).any(), rel  # not in time order
        uids = t.column("uid").to_pylist()
        assert uids != sorted(uids), rel  # nor grouped by user


def test_dt_is_the_utc_day_of_event_time(logs):
    t = read_logs(logs[0])
    days = t.column("event_time").cast(pa.int64()).to_numpy() // 86_400_000_000
    assert [str(np.datetime64(int(d), "D")) for d in days] == t.column("dt").to_pylist()


def test_each_users_train_rows_come_before_its_test_rows(logs, small_dataset):
    t = read_logs(logs[0])
    train, test = synth_keys(small_dataset, "train"), synth_keys(small_dataset, "test")
    events = collections.defaultdict(list)
    for uid, item, kind, y, p, when in zip(*(t.column(c).to_pylist() for c in
                                             ("uid", "item", "item_type", "clicked", "true_prob", "event_time"))):
        events[int(uid[1:])].append((when, (int(kind == "post"), int(item[1:]), y, p)))
    assert set(events) == set(train) | set(test)
    n_test = 0
    for user, rows in events.items():
        rows.sort()
        times = [w for w, _ in rows]
        assert all(a < b for a, b in itertools.pairwise(times)), user  # a user's times are distinct
        keys = collections.Counter(k for _, k in rows)
        assert keys == train[user] + test[user], user  # exactly the user's synthetic rows
        k = sum(test[user].values())
        assert collections.Counter(key for _, key in rows[len(rows) - k:]) == test[user], user  # test rows last
        n_test += k
    assert n_test > 0.1 * t.num_rows
    first = np.datetime64(START).astype("datetime64[us]").astype(np.int64)
    micros = t.column("event_time").cast(pa.int64()).to_numpy() - first
    assert micros.min() >= 0 and micros.max() < DAYS * 86_400_000_000


def test_null_patterns(logs):
    t = read_logs(logs[0])
    post = np.array(t.column("item_type").to_pylist()) == "post"
    for column, null_on in (("price", post), ("condition", post), ("style", ~post), ("post_length", ~post)):
        assert (t.column(column).is_null().to_numpy(zero_copy_only=False) == null_on).all(), column
    for column in ("uid", "item", "item_type", "clicked", "event_time", "age", "gender", "category", "true_prob"):
        assert t.column(column).null_count == 0, column
    assert post.any() and (~post).any()


def test_price_inverts_the_synthetic_log_price(logs):
    t = read_logs(logs[0])
    t = t.filter(pc.equal(t.column("item_type"), "product"))
    catalogue = _World(small_config()).items[0]
    item = np.array([int(i[1:]) for i in t.column("item").to_pylist()])
    price = t.column("price").to_numpy()
    assert (price >= 0).all()
    np.testing.assert_allclose(np.log1p(price) - 2.0, catalogue["log_price"][item], rtol=0, atol=1e-12)
    # mkt build's transform: bucket (1 + how many boundaries are <= the price) recovers price_bucket
    assert (np.searchsorted(PRICE_BOUNDARIES, price, side="right") == catalogue["price_bucket"][item]).all()
    assert [CONDITIONS[c] for c in catalogue["condition"][item]] == t.column("condition").to_pylist()


def test_same_seed_writes_the_same_bytes(logs, tmp_path):
    out, summary = logs
    again = str(tmp_path / "again")
    assert write(again) == {**summary, "out_dir": again}
    assert sorted(os.listdir(again)) == sorted(os.listdir(out))
    for rel in [*part_files(out), "_SUCCESS", MARKER]:
        with open(os.path.join(out, rel), "rb") as a, open(os.path.join(again, rel), "rb") as b:
            assert a.read() == b.read(), rel


def test_refuses_an_existing_directory(tmp_path):
    other = tmp_path / "someone"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for overwrite in (False, True):  # --overwrite replaces only logs this function wrote
        with pytest.raises(FileExistsError, match="someone"):
            write(str(other), overwrite=overwrite)
    assert os.listdir(other) == ["notes.txt"]
    spark = tmp_path / "spark"  # a real Spark output has a _SUCCESS too: not ours to delete
    spark.mkdir()
    (spark / "_SUCCESS").write_text("")
    with pytest.raises(FileExistsError, match=MARKER):
        write(str(spark), overwrite=True)


def test_overwrite_replaces_its_own_logs(tmp_path):
    out = str(tmp_path / "logs")
    write_logs(small_config("synth.seed=1"), out, days=2, files_per_day=1)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_logs(small_config(), out, days=2)
    summary = write_logs(small_config(), out, overwrite=True, days=2, files_per_day=2)
    assert summary["files"] == len(part_files(out)) == 4
    with open(os.path.join(out, MARKER)) as f:
        assert json.load(f)["synth"]["seed"] == 0


@pytest.mark.parametrize("bad", [{"days": 0}, {"files_per_day": 0}, {"row_group_rows": -1}, {"start": "2026-13-01"},
                                 {"start": "1 Nov 2026"}, {"start": "2026-11-01T00:00"}])
def test_bad_arguments_name_themselves(bad, tmp_path):
    with pytest.raises(ValueError, match=next(iter(bad))):
        write_logs(small_config(), str(tmp_path / "logs"), **bad)
    assert not os.path.exists(tmp_path / "logs")
