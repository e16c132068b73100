"""`mkt build` of one day's dataset (daily incremental training, `mkt daily`): with ``source.split.train_from`` =
day k, ``test_from`` = day k+1 and ``test_until`` = day k+2 the train split is exactly day k's impressions and the
test split day k+1's, while the days before k are still read as history: every written row, its behaviour
sequences and activity count included, equals the same row of a build without ``train_from`` / ``test_until``.
Bad orders of the cut-offs are one-line errors naming the keys.

Logs: ``mkt synth --layout logs`` (configs/logs.yaml, shrunk to ~2,700 rows over 14 days), built with DuckDB
only. Spark runs the same SQL text (the cut-offs are one CASE and one WHERE of it), but a Spark build here would
start tests/build's shared JVM (~30 s on two cores), and test_own_logs.py's Spark build on S3 needs the JVM
started after its fixture has set the store's variables (Spark's Python workers inherit the JVM's environment).
"""

from __future__ import annotations

import collections
import json
import os

import pyarrow.parquet as pq
import pytest

from mkt_torchrec.build.hashing import hash_id
from mkt_torchrec.build.run import build_dataset
from mkt_torchrec.cli import main
from mkt_torchrec.config import load_config
from mkt_torchrec.typed import ConfigError

from tests.conftest import REPO

LOGS = os.path.join(REPO, "configs", "logs.yaml")
TINY = ["synth.users=100", "synth.source_rows=1500", "synth.source_items=300", "synth.target_items=100",
        "source.row_group_rows=200"]
DAY, NEXT, AFTER = "2026-11-08", "2026-11-09", "2026-11-10"  # day k, k+1, k+2 of the logs' 14 days
ENTITY = {"product": 0, "post": 1}


def rows_of(out: str) -> dict:
    """split -> entity -> the dataset's rows (dicts of every column) in manifest order."""
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    got: dict = {}
    for split, files in manifest["splits"].items():
        for fi in files:
            for row in pq.read_table(os.path.join(out, fi["path"])).to_pylist():
                got.setdefault(split, {}).setdefault(row["entity"], []).append(row)
    return got


def day_logs(root: str, day: str) -> list[dict]:
    """The raw log rows of one day partition."""
    return pq.read_table(os.path.join(root, f"dt={day}")).to_pylist()


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("days")
    assert main(["synth", "--config", LOGS, *[w for s in TINY for w in ("--set", s)], "--layout", "logs",
                 "--out", str(root / "logs")]) == 0
    return root


def _sets(root, *extra: str) -> list[str]:
    return [*TINY, f"source.inputs=[{{path: {root / 'logs'}}}]", "source.split.by=time", *extra]


def test_a_day_dataset_trains_on_its_day_tests_on_the_next_and_keeps_the_history(logs, tmp_path, capsys):
    full = build_dataset(load_config(LOGS, _sets(logs, f"source.split.test_from={NEXT}")), str(tmp_path / "full"))
    # the README's command for day k
    day_sets = _sets(logs, f"source.split.train_from={DAY}", f"source.split.test_from={NEXT}",
                     f"source.split.test_until={AFTER}")
    assert main(["build", "--config", LOGS, *[w for s in day_sets for w in ("--set", s)],
                 "--out", str(tmp_path / "day")]) == 0
    capsys.readouterr()
    got, whole = rows_of(str(tmp_path / "day")), rows_of(str(tmp_path / "full"))
    assert sorted(got) == ["test", "train"]
    for split, day in (("train", DAY), ("test", NEXT)):
        raw = day_logs(str(logs / "logs"), day)
        for name, e in ENTITY.items():
            mine = [r for r in raw if r["item_type"] == name]
            assert len(got[split][e]) == len(mine) > 0, (split, name)
            # the same impressions: users and labels of that day's logs
            assert sorted(r["user_id"] for r in got[split][e]) == sorted(hash_id(r["uid"]) for r in mine)
            assert sum(r["label"] for r in got[split][e]) == sum(r["clicked"] for r in mine)
            # and each row as the full build writes it (in time order: day k ends the full train split, day k+1
            # begins its test split), sequences and activity included
            n = len(mine)
            same = whole[split][e][-n:] if split == "train" else whole[split][e][:n]
            assert got[split][e] == same, (split, name)
            assert len(whole[split][e]) > n  # the full build has other days there: the cut-offs cut something
    # the history before day k was read: some rows count more earlier clicks than their user made on day k
    clicks_on_day = collections.Counter(hash_id(r["uid"]) for r in day_logs(str(logs / "logs"), DAY) if r["clicked"])
    train = [r for e in got["train"].values() for r in e]
    assert sum(r["activity"] > clicks_on_day[r["user_id"]] for r in train) > len(train) // 2
    assert sum(len(r["hist_source_items"]) > 0 for r in train) > len(train) // 2
    manifest = json.loads((tmp_path / "day" / "manifest.json").read_text())
    assert manifest["rows"] == {s: {n: len(got[s][e]) for n, e in (("source", 0), ("target", 1))} for s in got}
    assert manifest["source"]["rows_read"] == full.source["rows_read"] == sum(sum(v.values()) for v in full.rows.values())
    assert manifest["source"]["split_cuts"] == {"train_from": DAY, "test_from": NEXT, "test_until": AFTER}


@pytest.mark.parametrize("cuts, match", [
    ({"train_from": NEXT, "test_from": DAY}, r"source.split.train_from: '2026-11-09' is after test_from '2026-11-08'"),
    ({"train_from": DAY, "valid_from": "2026-11-07", "test_from": NEXT},
     r"source.split.train_from: '2026-11-08' is after valid_from '2026-11-07'"),
    ({"valid_from": AFTER, "test_from": NEXT}, r"source.split.valid_from: '2026-11-10' is after test_from"),
    ({"test_from": NEXT, "test_until": NEXT}, r"source.split.test_until: '2026-11-09' is not after test_from "
                                              r"'2026-11-09' \(expected train_from <= valid_from <= test_from < "
                                              r"test_until\)"),
    ({"test_from": "3.5", "test_until": "2"}, r"source.split.test_until: '2' is not after test_from '3.5'"),
    ({"by": "user_fraction", "train_from": DAY}, r"source.split: train_from / valid_from / test_from / test_until "
                                                 r"are for by: time"),
    ({"by": "fraction", "test_until": DAY}, r"source.split: .* are for by: time \(by is 'fraction'\)"),
])
def test_cut_offs_out_of_order_are_one_line_errors_naming_the_keys(cuts, match):
    sets = ["source.split.by=time", *[f"source.split.{k}='{v}'" for k, v in cuts.items()]]
    with pytest.raises(ConfigError, match=match) as e:
        load_config(LOGS, sets)
    assert "\n" not in str(e.value)


def test_the_build_checks_the_order_again_as_the_time_column_reads_the_cut_offs(logs, tmp_path):
    """A config changed after it was read (as a preset or `mkt daily` may do) is checked by the build itself,
    before anything is written."""
    cfg = load_config(LOGS, _sets(logs, f"source.split.test_from={NEXT}"))
    cfg.source.split.train_from = AFTER
    with pytest.raises(ValueError, match=r"source.split.train_from: '2026-11-10' is after test_from '2026-11-09'"):
        build_dataset(cfg, str(tmp_path / "ds"))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("ds")]
