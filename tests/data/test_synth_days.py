"""``mkt synth --days``: day datasets with drifting user tastes (mkt_torchrec.data.synth_days)."""

import hashlib
import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mkt_torchrec.cli import main
from mkt_torchrec.data.dataset import open_dataset
from mkt_torchrec.data.reader import ParquetReader
from mkt_torchrec.data.synth import _World, generate
from mkt_torchrec.data.synth_days import DAYS_FILE, write_days

from tests.conftest import QUICKSTART, set_flags, small_config

# 60 users, about 40 source rows each a day over 4 generated days: enough to recover each user's taste per day
DAYS_SETS = ("synth.users=60", "synth.source_rows=9600", "synth.row_group_rows=300", "synth.rows_per_file=1000")
DAYS, DRIFT = 3, 0.4
TINY_SETS = ("synth.users=50", "synth.source_rows=600", "synth.row_group_rows=100")


@pytest.fixture(scope="module")
def drifting(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("days") / "drift")
    write_days(small_config(*DAYS_SETS), out, DAYS, DRIFT, cumulative=True)
    return out


def _split(data_dir: str, split: str) -> pa.Table:
    """A split's files whole, in manifest order."""
    manifest = json.load(open(os.path.join(data_dir, "manifest.json")))
    return pa.concat_tables([pq.read_table(os.path.join(data_dir, f["path"])) for f in manifest["splits"][split]])


def _by_entity(table: pa.Table, code: int) -> pa.Table:
    return table.filter(pa.compute.equal(table.column("entity"), code))


def _digest(root: str) -> dict:
    out = {}
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in files:
            path = os.path.join(d, f)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_days_json_lists_the_days_and_sizes_add_up(drifting):
    doc = json.load(open(os.path.join(drifting, DAYS_FILE)))
    assert doc["days"] == ["day-001", "day-002", "day-003"] and doc["upto"] == ["upto-001", "upto-002", "upto-003"]
    assert doc["drift"] == DRIFT and doc["written_by"] == "mkt_torchrec.data.synth_days"
    assert sorted(os.listdir(drifting)) == sorted([DAYS_FILE, *doc["days"], *doc["upto"]])
    sc = small_config(*DAYS_SETS).synth
    assert doc["synth"]["source_rows"] == sc.source_rows
    per_day = sc.source_rows * (1 + sc.target_ratio) / (DAYS + 1)  # synth.source_rows is the total of all days
    assert len(doc["rows_per_day"]) == DAYS + 1
    assert all(0.8 * per_day < n < 1.2 * per_day for n in doc["rows_per_day"])
    for k, name in enumerate(doc["days"], start=1):
        rows = json.load(open(os.path.join(drifting, name, "manifest.json")))["rows"]
        assert sum(rows["train"].values()) == doc["rows_per_day"][k - 1]
        assert sum(rows["test"].values()) == doc["rows_per_day"][k]


def test_day_test_rows_are_the_next_days_train_rows(drifting):
    for k in range(1, DAYS):
        test = _split(os.path.join(drifting, f"day-{k:03d}"), "test")
        assert test.num_rows > 0 and not test.equals(_split(os.path.join(drifting, f"day-{k:03d}"), "train"))
        assert test.equals(_split(os.path.join(drifting, f"day-{k + 1:03d}"), "train"))
    for k in range(1, DAYS + 1):
        assert _split(os.path.join(drifting, f"upto-{k:03d}"), "test").equals(
            _split(os.path.join(drifting, f"day-{k:03d}"), "test"))


def test_upto_train_is_days_one_to_k_in_day_order(drifting):
    cfg = small_config(*DAYS_SETS)
    for k in range(1, DAYS + 1):
        upto = os.path.join(drifting, f"upto-{k:03d}")
        train = _split(upto, "train")
        days = [_split(os.path.join(drifting, f"day-{d:03d}"), "train") for d in range(1, k + 1)]
        for code in (0, 1):  # readers keep each entity's order: the validation split is each entity's last rows
            assert _by_entity(train, code).equals(pa.concat_tables([_by_entity(t, code) for t in days]))
        # so the validation split of upto-k is the newest day's (day k's) latest rows
        manifest = open_dataset(upto, cfg.schema)
        for entity in ("source", "target"):
            valid = manifest.split_rows("valid", entity, cfg.data.validation_fraction)
            assert 0 < valid < manifest.split_rows("train", entity) // k


def test_days_open_and_read_through_the_reader(drifting, capsys):
    cfg = small_config(*DAYS_SETS)
    day = os.path.join(drifting, "day-002")
    manifest = open_dataset(day, cfg.schema)
    assert manifest.source["train_days"] == [2] and manifest.source["test_day"] == 3
    for split in ("train", "valid", "test"):
        reader = ParquetReader(day, split, cfg.schema, cfg.data, training=False)
        rows = sum(int(b.labels.shape[0]) for b in reader)
        assert rows == manifest.split_rows(split, None, cfg.data.validation_fraction) > 0
    assert main(["inspect", "--config", QUICKSTART, *set_flags(*DAYS_SETS), "--data", day, "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == manifest.rows["test"]


def test_users_are_the_generators_people_on_every_day_and_true_prob_is_calibrated(drifting, tmp_path):
    cfg = small_config(*DAYS_SETS)
    generate(cfg, str(tmp_path / "one"))
    who = _split(str(tmp_path / "one"), "train").select(["user_id", "age", "gender"]).to_pandas().drop_duplicates()
    for k in range(1, DAYS + 1):
        t = _split(os.path.join(drifting, f"day-{k:03d}"), "train").to_pandas()
        day_who = t[["user_id", "age", "gender"]].drop_duplicates()
        assert day_who.user_id.is_unique and len(day_who) > 50
        both = day_who.merge(who, on="user_id", suffixes=("", "_one"))
        assert len(both) > 50 and (both.age == both.age_one).all() and (both.gender == both.gender_one).all()
        for code in (0, 1):
            g = t[t.entity == code]
            assert abs(g.label.mean() - g.true_prob.mean()) < 0.04


def test_same_config_same_bytes_other_seed_other_data(drifting, tmp_path):
    again = str(tmp_path / "again")
    write_days(small_config(*DAYS_SETS), again, DAYS, DRIFT, cumulative=True)
    assert _digest(again) == _digest(drifting)
    other = str(tmp_path / "other")
    write_days(small_config(*DAYS_SETS, "synth.seed=1"), other, 1, DRIFT)
    assert not _split(os.path.join(other, "day-001"), "train").equals(_split(os.path.join(drifting, "day-001"),
                                                                             "train"))


def _tastes(cfg, day_dir: str) -> dict:
    """Each user's taste on a day, recovered from ``true_prob``: least squares of the true logit of the user's
    product rows on the items' planted vectors (plus an intercept); the coefficients are 2 z_u(d) / sqrt(k) up to
    the price term, which acts as noise."""
    t = _split(day_dir, "train").to_pandas()
    t = t[t.entity == 0]
    w = _World(cfg).items[0]["w"]  # (I, k) planted product vectors; a product's id is its catalogue index
    out = {}
    for user, g in t.groupby("user_id"):
        if len(g) >= 20:
            p = g.true_prob.to_numpy().astype(np.float64)
            x = np.c_[w[g.item_id.to_numpy()], np.ones(len(g))]
            out[user] = np.linalg.lstsq(x, np.log(p / (1 - p)), rcond=None)[0][:-1]
    return out


def _mean_cosine(a: dict, b: dict) -> float:
    common = sorted(set(a) & set(b))
    assert len(common) > 30
    return float(np.mean([a[u] @ b[u] / np.linalg.norm(a[u]) / np.linalg.norm(b[u]) for u in common]))


def test_tastes_turn_by_drift_radians_a_day(drifting, tmp_path):
    cfg = small_config(*DAYS_SETS)
    still = str(tmp_path / "still")
    write_days(cfg, still, DAYS, 0.0)
    first, last = "day-001", f"day-{DAYS:03d}"
    same = _mean_cosine(_tastes(cfg, os.path.join(still, first)), _tastes(cfg, os.path.join(still, last)))
    moved = _mean_cosine(_tastes(cfg, os.path.join(drifting, first)), _tastes(cfg, os.path.join(drifting, last)))
    assert same > 0.9  # drift 0: every day the same tastes (up to the recovery's noise)...
    assert not _split(os.path.join(still, first), "train").equals(_split(os.path.join(still, last), "train"))
    # ... but days are different draws
    # drift: the tastes of day 1 and day N are (N - 1) * drift radians apart
    assert abs(moved - math.cos((DAYS - 1) * DRIFT) * same) < 0.08
    assert moved < same - 0.15


def test_interrupted_write_leaves_nothing_and_keeps_the_old_output(tmp_path, monkeypatch):
    import mkt_torchrec.data.synth_days as synth_days

    cfg = small_config(*TINY_SETS)
    out = tmp_path / "days"
    real = synth_days._write_dataset
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(synth_days, "_write_dataset", failing)
    with pytest.raises(KeyboardInterrupt):
        write_days(cfg, str(out), 2, 0.1)
    assert os.listdir(tmp_path) == []  # no out_dir, no staging directory
    monkeypatch.setattr(synth_days, "_write_dataset", real)
    write_days(cfg, str(out), 1, 0.1)
    before = _digest(str(out))
    calls["n"] = 0
    monkeypatch.setattr(synth_days, "_write_dataset", failing)
    with pytest.raises(KeyboardInterrupt):
        write_days(cfg, str(out), 2, 0.1, overwrite=True)
    assert _digest(str(out)) == before and os.listdir(tmp_path) == ["days"]


def test_overwrite_replaces_only_its_own_output(tmp_path):
    cfg = small_config(*TINY_SETS)
    out = tmp_path / "days"
    write_days(cfg, str(out), 1, 0.1)
    with pytest.raises(FileExistsError, match="already exists"):
        write_days(cfg, str(out), 2, 0.1)
    write_days(cfg, str(out), 2, 0.1, overwrite=True)
    assert json.load(open(out / DAYS_FILE))["days"] == ["day-001", "day-002"]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        write_days(cfg, str(theirs), 1, 0.1, overwrite=True)
    (theirs / DAYS_FILE).write_text(json.dumps({"days": []}))  # a days.json someone else wrote
    with pytest.raises(FileExistsError, match="not written by mkt synth --days"):
        write_days(cfg, str(theirs), 1, 0.1, overwrite=True)
    assert (theirs / "notes.txt").read_text() == "keep me"


def test_cli_writes_days_and_rejects_bad_flags(tmp_path, capsys):
    base = ["synth", "--config", QUICKSTART, *set_flags(*TINY_SETS)]
    out = str(tmp_path / "days")
    assert main([*base, "--out", out, "--days", "2", "--cumulative"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["days"] == ["day-001", "day-002"] and summary["upto"] == ["upto-001", "upto-002"]
    assert summary["drift"] == 0.05 == json.load(open(os.path.join(out, DAYS_FILE)))["drift"]
    for flags, words in ((["--days", "0"], "--days"), (["--drift", "0.1"], "--drift needs --days"),
                         (["--cumulative"], "--cumulative needs --days"),
                         (["--days", "2", "--layout", "tenrec"], "--layout tenrec"),
                         (["--days", "2", "--drift", "-1"], "drift"), (["--days", "2", "--drift", "nan"], "drift")):
        bad = str(tmp_path / "bad")
        assert main([*base, "--out", bad, *flags]) == 1, flags
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, (flags, err)
        assert not os.path.exists(bad)
