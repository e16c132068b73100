"""`mkt synth --layout tenrec`: the synthetic data as Tenrec's two CSVs, converted back by `mkt tenrec`."""

from __future__ import annotations

import collections
import json
import os
import shlex

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from mkt_torchrec.cli import main
from mkt_torchrec.config import load_config
from mkt_torchrec.data.synth import _World
from mkt_torchrec.data.synth_tenrec import (ARTICLE_FILE, QUICKSTART_SCHEMA_SETTINGS, VIDEO_FILE, _fit_to_intervals,
                                            write_tenrec_csvs)
from mkt_torchrec.data.tenrec import ARTICLE_COLUMNS, VIDEO_COLUMNS, convert

from tests.conftest import QUICKSTART, REPO, SMALL, set_flags, small_config

TENREC = os.path.join(REPO, "configs", "tenrec.yaml")


@pytest.fixture(scope="module")
def csvs(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("synth_tenrec") / "csv")
    write_tenrec_csvs(small_config(), out)
    return out


def read_csv(path: str) -> pa.Table:
    return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={"true_prob": pa.float32()}))


def dataset_rows(data_dir: str, split: str) -> pa.Table:
    manifest = json.load(open(os.path.join(data_dir, "manifest.json")))
    return pa.concat_tables([pq.read_table(os.path.join(data_dir, f["path"]),
                                           columns=["entity", "user_id", "label", "true_prob"])
                             for f in manifest["splits"][split]])


def keys(t: pa.Table) -> collections.Counter:
    """The multiset of (entity, user, label, true_prob): a row's identity, up to repeated impressions."""
    return collections.Counter(zip(*(t.column(c).to_pylist() for c in ("entity", "user_id", "label", "true_prob"))))


def merged_timeline(video: pa.Table, article: pa.Table) -> pa.Table:
    """Both files' rows in the converter's time order: video row i at i / N_video, article row j at
    j / N_article, a video row first on ties (compared exactly as integers)."""
    nv, na = video.num_rows, article.num_rows
    when = np.concatenate([np.arange(nv) * na, np.arange(na) * nv])
    entity = np.concatenate([np.zeros(nv, np.int8), np.ones(na, np.int8)])
    order = np.lexsort((entity, when))
    cols = {c: np.concatenate([video.column(c).to_numpy(), article.column(c).to_numpy()])[order]
            for c in ("user_id", "like", "true_prob")}
    return pa.table({"entity": entity[order], "user_id": cols["user_id"], "label": cols["like"],
                     "true_prob": cols["true_prob"]})


def test_headers_and_columns_are_tenrecs(csvs):
    for name, columns in ((VIDEO_FILE, VIDEO_COLUMNS), (ARTICLE_FILE, ARTICLE_COLUMNS)):
        with open(os.path.join(csvs, name)) as f:
            assert f.readline().rstrip("\n").split(",") == [*columns, "true_prob"]
    cfg = small_config()
    world = _World(cfg)
    video, article = read_csv(os.path.join(csvs, VIDEO_FILE)), read_csv(os.path.join(csvs, ARTICLE_FILE))
    v = {c: video.column(c).to_numpy() for c in video.column_names}
    a = {c: article.column(c).to_numpy() for c in article.column_names}
    # item ids are catalogue indices (no synth id offset): the catalogue's attributes match the rows'
    assert (v["video_category"] == world.items[0]["cat"][v["item_id"]]).all()
    assert (a["category_second"] == world.items[1]["cat"][a["item_id"]]).all()
    assert (a["item_score1"] == world.items[1]["style"][a["item_id"]]).all()
    assert (a["item_score2"] == world.items[1]["post_length"][a["item_id"]]).all()
    assert (a["category_first"] == a["category_second"] // 8).all()
    # clicks: every article row, every liked video and some others
    assert (a["click"] == 1).all() and (v["click"][v["like"] == 1] == 1).all()
    assert 0.1 < v["click"][v["like"] == 0].mean() < 0.5
    # item statistics over the whole data; item_score3 is one noisy reading of the post's planted bias
    n_items = cfg.synth.target_items
    assert (a["exposure_count"] == np.bincount(a["item_id"], minlength=n_items)[a["item_id"]]).all()
    assert (a["click_count"] == a["exposure_count"]).all()
    assert (a["like_count"] == np.bincount(a["item_id"], a["like"], minlength=n_items)[a["item_id"]]).all()
    score3 = np.full(n_items, -1)
    score3[a["item_id"]] = a["item_score3"]
    assert (score3[a["item_id"]] == a["item_score3"]).all() and a["item_score3"].min() >= 0
    assert a["item_score3"].max() <= 9
    shown = score3 >= 0
    assert np.corrcoef(score3[shown], world.items[1]["bias"][shown])[0, 1] > 0.5
    assert (v["follow"] == 0).all() and (a["comment_count"] == 0).all()


def test_each_users_synth_test_rows_come_last_on_the_merged_timeline(csvs, small_dataset):
    timeline = merged_timeline(read_csv(os.path.join(csvs, VIDEO_FILE)), read_csv(os.path.join(csvs, ARTICLE_FILE)))
    expected = collections.defaultdict(collections.Counter)  # user -> its synth test rows
    for (entity, user, label, p), n in keys(dataset_rows(small_dataset, "test")).items():
        expected[user][(entity, label, p)] += n
    rows_of = collections.defaultdict(list)  # user -> (time, row) in time order
    for i, (entity, user, label, p) in enumerate(zip(*(timeline.column(c).to_pylist()
                                                       for c in ("entity", "user_id", "label", "true_prob")))):
        rows_of[user].append((i / timeline.num_rows, (entity, label, p)))
    last = {u: rows_of[u][-sum(c.values()):] for u, c in expected.items()}
    assert expected and all(collections.Counter(row for _, row in last[u]) == c for u, c in expected.items())
    # each user has a time of its own: users' rows spread over the whole period, and a user's test rows may come
    # early (not all test rows at the end of the files, as a split by time over all users would have them)
    assert np.median([rows[-1][0] - rows[0][0] for rows in rows_of.values()]) > 0.5
    assert np.mean([t < 0.7 for u in expected for t, _ in last[u]]) > 0.01


def test_round_trip_through_the_converter(csvs, small_dataset, tmp_path):
    cfg = load_config(TENREC, [*QUICKSTART_SCHEMA_SETTINGS, "tenrec.row_group_rows=500", "tenrec.chunk_rows=1000",
                               "tenrec.split=per_user", f"tenrec.test_fraction={small_config().synth.test_fraction}"])
    manifest = convert(os.path.join(csvs, VIDEO_FILE), os.path.join(csvs, ARTICLE_FILE), cfg, str(tmp_path / "ds"))
    assert manifest.optional_columns == ["true_prob", "activity"]
    got = {s: dataset_rows(str(tmp_path / "ds"), s) for s in ("train", "test")}
    want = {s: dataset_rows(small_dataset, s) for s in ("train", "test")}
    assert keys(got["train"]) + keys(got["test"]) == keys(want["train"]) + keys(want["test"])
    # every synth test row is a converter test row; the converter rounds a user's test rows up (synth: down),
    # which adds at most one row per user
    assert not keys(want["test"]) - keys(got["test"])
    extra = collections.Counter(u for _, u, _, _ in (keys(got["test"]) - keys(want["test"])).elements())
    assert extra and max(extra.values()) == 1


def test_cli_writes_the_same_files_and_its_next_command_converts_them(csvs, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "csv")
    assert main(["synth", "--config", QUICKSTART, *set_flags(*SMALL), "--layout", "tenrec", "--out", out]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert json.loads(printed[0])["rows"] == {"video": read_csv(os.path.join(csvs, VIDEO_FILE)).num_rows,
                                              "article": read_csv(os.path.join(csvs, ARTICLE_FILE)).num_rows}
    for name in (VIDEO_FILE, ARTICLE_FILE):  # same config, same files
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(csvs, name), "rb").read()
    convert_line = next(line for line in printed if line.strip().startswith("mkt tenrec "))
    monkeypatch.chdir(REPO)  # the printed command names configs/tenrec.yaml
    assert main(shlex.split(convert_line)[1:]) == 0
    assert "true_prob" in json.load(open(out + "-dataset/manifest.json"))["optional_columns"]
    assert any(line.strip().startswith("mkt run --config configs/tenrec.yaml") for line in printed)


def test_an_existing_out_dir_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "csv"
    out.mkdir()
    args = ["synth", "--config", QUICKSTART, *set_flags(*SMALL, "synth.users=50", "synth.source_rows=500"),
            "--layout", "tenrec", "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "already exists" in err
    assert sorted(os.listdir(tmp_path)) == ["csv"] and not os.listdir(out)  # nothing written, no temporary left
    assert main([*args, "--overwrite"]) == 0  # an empty directory may be replaced
    assert sorted(os.listdir(out)) == [ARTICLE_FILE, VIDEO_FILE]
    (out / "notes.txt").write_text("mine")
    os.remove(out / VIDEO_FILE)
    os.remove(out / ARTICLE_FILE)
    capsys.readouterr()
    assert main([*args, "--overwrite"]) == 1  # a directory of other files never is
    assert os.listdir(out) == ["notes.txt"] and "refusing to replace" in capsys.readouterr().err


def test_fit_to_intervals():
    rng = np.random.default_rng(0)
    n = 300
    # a feasible instance: item i may sit before hi[i] ("train") or from lo[i] on ("test"), and its position in a
    # known arrangement satisfies that; then 40 positions are shuffled, misplacing some items
    place = rng.permutation(n)  # place[i]: item i's position in the known arrangement
    is_test = rng.uniform(size=n) < 0.3
    lo = np.where(is_test, rng.integers(0, place + 1), 0)
    hi = np.where(is_test, n, rng.integers(place + 1, n + 1))
    items = np.argsort(place)
    swap = rng.permutation(n)[:40]
    items[swap] = items[np.roll(swap, 1)]
    misplaced = (np.arange(n) < lo[items]) | (np.arange(n) >= hi[items])
    assert misplaced.sum() > 5
    fixed = _fit_to_intervals(items, lo[items], hi[items])
    assert sorted(fixed) == list(range(n))
    assert ((lo[fixed] <= np.arange(n)) & (np.arange(n) < hi[fixed])).all()
    assert (fixed != items).sum() <= 2 * misplaced.sum()  # only misplaced items and their partners move
    with pytest.raises(RuntimeError, match="no place for item"):
        _fit_to_intervals(np.array([0, 1]), np.array([0, 0]), np.array([1, 1]))


@pytest.mark.parametrize("video_value, article_value, message", [
    (None, "1.5", r"QK-article\.csv: column 'true_prob', data row 3 \(line 4\): value 1.5 is not a probability"),
    ("\\N", None, r"QK-video\.csv: column 'true_prob', data row 3 \(line 4\): missing value"),
    ("drop", None, r"QK-article\.csv has a true_prob column but .*QK-video\.csv has not"),
])
def test_converter_checks_true_prob(csvs, tmp_path, video_value, article_value, message):
    for name, value in ((VIDEO_FILE, video_value), (ARTICLE_FILE, article_value)):
        lines = open(os.path.join(csvs, name)).read().splitlines()[:40]
        if value == "drop":
            lines = [line.rsplit(",", 1)[0] for line in lines]
        elif value is not None:
            lines[3] = lines[3].rsplit(",", 1)[0] + "," + value
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    cfg = load_config(TENREC, list(QUICKSTART_SCHEMA_SETTINGS))
    with pytest.raises(ValueError, match=message):
        convert(str(tmp_path / VIDEO_FILE), str(tmp_path / ARTICLE_FILE), cfg, str(tmp_path / "ds"))
    assert not (tmp_path / "ds").exists()
