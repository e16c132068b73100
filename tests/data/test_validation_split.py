"""The validation split: the last ``data.validation_fraction`` of each entity's train rows, cut at read time."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from mkt_torchrec.config import ConfigError, describe_keys
from mkt_torchrec.data.dataset import FileInfo, Manifest, RowRange, open_dataset, validation_rows
from mkt_torchrec.data.reader import ParquetReader

from tests.conftest import small_config
from tests.data.test_reader import _all_rows, _lockstep, _rows, _take
from tests.data.conftest import record_row_group_reads

WINDOWS = ("data.batch_size=64", "data.shuffle_window_rows=200")


def _manifest(groups: list[list[tuple[int, int]]]) -> Manifest:
    """A format-2 manifest of a train split: per file, (rows, entity code) of each row group."""
    files = [FileInfo(path=f"train/part-{i:05d}.parquet", rows=sum(n for n, _ in g), row_groups=[n for n, _ in g],
                      row_group_entity=[c for _, c in g]) for i, g in enumerate(groups)]
    rows = {"source": sum(n for g in groups for n, c in g if c == 0),
            "target": sum(n for g in groups for n, c in g if c == 1)}
    return Manifest(format_version=2, schema_digest="", columns=[], optional_columns=[], splits={"train": files},
                    rows={"train": rows})


def _rows_of(manifest: Manifest, units: list[RowRange]) -> list[tuple[int, int, int]]:
    """(file, row group, row) of every row of ``units``, in order."""
    return [(u.file, u.row_group, r) for u in units for r in range(u.start, u.stop)]


# ---------------------------------------------------------------------------------------------- the cut, no I/O


def test_validation_rows_rounds_to_the_nearest_row_keeping_a_row_on_each_side():
    assert [validation_rows(n, 0.1) for n in (0, 1, 2, 9, 10, 14, 15, 24, 25, 26)] == [0, 1, 1, 1, 1, 1, 2, 2, 3, 3]
    assert [validation_rows(n, 0.5) for n in (1, 2, 3, 4, 5)] == [1, 1, 2, 2, 3]  # halves up
    assert validation_rows(1000, 0.0) == 0 and validation_rows(0, 0.3) == 0
    for fraction in (0.01, 0.1, 0.25, 0.5):
        for n in range(2, 300):
            v = validation_rows(n, fraction)
            assert 1 <= v <= n - 1
            assert v == min(n - 1, max(1, int(np.floor(fraction * n + 0.5 + 1e-9))))  # halves up


def test_split_units_cut_each_entity_inside_its_row_groups():
    """13 source rows (0.25 -> 3 valid) and 5 target rows (0.25 -> 1 valid), each cut inside a row group."""
    m = _manifest([[(4, 0), (3, 1), (4, 0)], [(2, 1), (5, 0)]])
    assert m.split_units("train", validation_fraction=0.25) == [
        RowRange(0, 0, 0, 4), RowRange(0, 1, 0, 3), RowRange(0, 2, 0, 4), RowRange(1, 0, 0, 1), RowRange(1, 1, 0, 2)]
    assert m.split_units("valid", validation_fraction=0.25) == [RowRange(1, 0, 1, 2), RowRange(1, 1, 2, 5)]
    assert m.split_units("valid", "target", 0.25) == m.split_units("valid", 1, 0.25) == [RowRange(1, 0, 1, 2)]
    assert [m.split_rows(s, e, 0.25) for s in ("train", "valid") for e in ("source", "target")] == [10, 4, 3, 1]
    assert m.split_rows("train", None, 0.25) == 14 and m.split_rows("valid", None, 0.25) == 4
    # fraction 0: the train files whole, in whole row groups; valid is empty
    assert m.split_units("train") == [RowRange(f, rg, 0, n) for f, fi in enumerate(m.splits["train"])
                                      for rg, n in enumerate(fi.row_groups)]
    assert m.split_rows("train") == 18 and m.split_units("valid") == [] and m.split_rows("valid", "target") == 0


def test_split_units_match_a_row_by_row_reference():
    """Random layouts: train and valid partition the train rows, and valid is each entity's last rows."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        groups = [[(int(rng.integers(1, 6)), int(rng.integers(0, 2))) for _ in range(rng.integers(1, 5))]
                  for _ in range(rng.integers(1, 4))]
        m = _manifest(groups)
        fraction = float(rng.choice([0.05, 0.1, 0.3, 0.5]))
        order = [(c, (f, rg, r)) for f, g in enumerate(groups) for rg, (n, c) in enumerate(g) for r in range(n)]
        expect_valid = []
        for code in (0, 1):
            mine = [row for c, row in order if c == code]
            expect_valid += mine[len(mine) - validation_rows(len(mine), fraction):]
            if mine:  # every entity of the train rows is in valid
                assert m.split_rows("valid", code, fraction) >= 1
        valid = _rows_of(m, m.split_units("valid", None, fraction))
        train = _rows_of(m, m.split_units("train", None, fraction))
        assert sorted(valid) == sorted(expect_valid) and valid == sorted(valid)  # manifest order
        assert sorted(train + valid) == sorted(row for _, row in order) and not set(train) & set(valid)


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("value", ["-0.1", "0.51", "1", "nan"])
def test_bad_validation_fraction_is_a_config_error_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"quickstart\.yaml: data\.validation_fraction: expected a number in \[0, "):
        small_config(f"data.validation_fraction={value}")


def test_validation_fraction_is_documented_and_bounds_are_accepted():
    assert small_config("data.validation_fraction=0").data.validation_fraction == 0.0
    assert small_config("data.validation_fraction=0.5").data.validation_fraction == 0.5
    (key, value, text), = [row for row in describe_keys() if row[0] == "data.validation_fraction"]
    assert value == 0.1 and "valid" in text and "each entity" in text


# ---------------------------------------------------------------------------------------------- reading


@pytest.fixture(scope="module")
def in_file_order(small_dataset) -> list[tuple]:
    """Every row of the train files, in manifest order."""
    cfg = small_config("data.validation_fraction=0")
    return _all_rows(ParquetReader(small_dataset, "train", cfg.schema, cfg.data, training=False))


def test_the_small_dataset_is_cut_inside_row_groups(small_dataset):
    """The reading tests below cover a row group shared by train and valid, for both entities."""
    m = open_dataset(small_dataset, small_config().schema)
    shared = [u for u in m.split_units("valid", None, 0.1) if u.start > 0]
    assert {m.splits["train"][u.file].row_group_entity[u.row_group] for u in shared} == {0, 1}


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_train_and_valid_partition_the_train_files(small_dataset, in_file_order, world, workers):
    cfg = small_config(*WINDOWS, f"data.num_workers={workers}")
    got = {}
    for split in ("train", "valid"):
        readers = [ParquetReader(small_dataset, split, cfg.schema, cfg.data, rank=r, world_size=world)
                   for r in range(world)]
        got[split] = [row for r in readers for row in _all_rows(r)]
        assert len(got[split]) == readers[0].num_rows()
    assert collections.Counter(got["train"] + got["valid"]) == collections.Counter(in_file_order)
    assert len(got["valid"]) == 474 + 149  # round(0.1 * 4742), round(0.1 * 1485) with the half up


@pytest.mark.parametrize("entity", [None, "target"])
def test_valid_is_each_entitys_last_rows_in_manifest_order(small_dataset, in_file_order, entity):
    cfg = small_config(*WINDOWS)
    read = {s: _all_rows(ParquetReader(small_dataset, s, cfg.schema, cfg.data, training=False, entity=entity))
            for s in ("train", "valid")}
    codes = (0, 1) if entity is None else (1,)
    for code in codes:
        whole = [r for r in in_file_order if r[3] == code]
        n_valid = validation_rows(len(whole), 0.1)
        assert [r for r in read["valid"] if r[3] == code] == whole[len(whole) - n_valid:]
        assert [r for r in read["train"] if r[3] == code] == whole[:len(whole) - n_valid]
    assert {r[3] for r in read["valid"]} == set(codes)
    valid = ParquetReader(small_dataset, "valid", cfg.schema, cfg.data, entity=entity)
    assert _rows(valid.first_batch()) == read["valid"][:1]  # the valid split's first row, in manifest order
    shuffled = _all_rows(valid)
    assert shuffled != read["valid"] and sorted(shuffled) == sorted(read["valid"])


@pytest.mark.parametrize("split, world, workers, entity, training", [
    ("valid", 1, 0, None, False), ("valid", 2, 2, "target", True), ("valid", 3, 0, None, True),
    ("valid", 3, 2, None, False), ("train", 2, 2, "target", True), ("train", 3, 0, None, False),
])
def test_step_rows_match_reality_on_the_virtual_splits(small_dataset, split, world, workers, entity, training):
    cfg = small_config(*WINDOWS, f"data.num_workers={workers}")
    readers = [ParquetReader(small_dataset, split, cfg.schema, cfg.data, rank=r, world_size=world,
                             training=training, entity=entity) for r in range(world)]
    schedule = readers[0].step_rows()
    assert all(r.step_rows() == schedule for r in readers[1:])
    assert len(schedule) == max(r.batches_left() for r in readers)
    assert sum(schedule) == readers[0].num_rows() == readers[0].manifest.split_rows(split, entity, 0.1)
    assert _lockstep(readers) == schedule


@pytest.mark.parametrize("split, entity", [("train", None), ("valid", None), ("train", "target")])
def test_resume_at_another_world_size_on_a_virtual_split(small_dataset, split, entity):
    """2 ranks (2 workers each) read part of the epoch; 3 ranks finish it: every row of the split once."""
    old_cfg = small_config(*WINDOWS, "data.num_workers=2")
    old = [ParquetReader(small_dataset, split, old_cfg.schema, old_cfg.data, rank=r, world_size=2, entity=entity)
           for r in range(2)]
    reference = collections.Counter(_all_rows(ParquetReader(small_dataset, split, old_cfg.schema, old_cfg.data,
                                                            training=False, entity=entity)))
    full = old[0].step_rows()
    first, states = _take(old, 3)
    states = json.loads(json.dumps(states))  # as a checkpoint holds them
    assert all(st["validation_fraction"] == 0.1 for st in states)
    cfg = small_config(*WINDOWS)
    new = [ParquetReader(small_dataset, split, cfg.schema, cfg.data, rank=r, world_size=3, entity=entity)
           for r in range(3)]
    for r in new:
        r.load_state_dict(states)
    schedule = new[0].step_rows()
    assert sum(schedule) == sum(full[3:]) == sum(r.rows_left() for r in new)
    rest = [row for r in new for row in _all_rows(r)]
    assert first and rest and collections.Counter(first + rest) == reference
    assert sum(_lockstep(new)) == new[0].num_rows()  # the next epoch: the whole split again


def test_resume_with_another_validation_fraction_is_refused(small_dataset):
    cfg = small_config(*WINDOWS)
    _, states = _take([ParquetReader(small_dataset, "train", cfg.schema, cfg.data)], 2)
    other = small_config(*WINDOWS, "data.validation_fraction=0.2")
    with pytest.raises(ValueError, match=r"saved with data\.validation_fraction=0\.1 but this run has 0\.2"):
        ParquetReader(small_dataset, "train", other.schema, other.data).load_state_dict(states)
    # a state of the release before validation splits (no key) read the train files whole: fraction 0
    whole = small_config(*WINDOWS, "data.validation_fraction=0")
    _, old_states = _take([ParquetReader(small_dataset, "train", whole.schema, whole.data)], 2)
    del old_states[0]["validation_fraction"]
    ParquetReader(small_dataset, "train", whole.schema, whole.data).load_state_dict(old_states)
    with pytest.raises(ValueError, match=r"saved with data\.validation_fraction=0\.0 but this run has 0\.1"):
        ParquetReader(small_dataset, "train", cfg.schema, cfg.data).load_state_dict(old_states)


def test_fraction_0_reads_the_train_files_whole_and_has_no_valid_split(small_dataset):
    cfg = small_config(*WINDOWS, "data.validation_fraction=0")
    reader = ParquetReader(small_dataset, "train", cfg.schema, cfg.data)
    table = pq.read_table(os.path.join(small_dataset, "train"))
    assert reader.num_rows() == table.num_rows == sum(reader.step_rows())
    assert sorted(r[0] for r in _all_rows(reader)) == sorted(table.column("user_id").to_pylist())
    manifest = reader.manifest
    assert manifest.split_units("train") == [RowRange(f, rg, 0, n) for f, fi in enumerate(manifest.splits["train"])
                                             for rg, n in enumerate(fi.row_groups)]
    assert reader.state_dict()["validation_fraction"] == 0.0
    with pytest.raises(ValueError, match=r"split 'valid' is empty with data\.validation_fraction=0"):
        ParquetReader(small_dataset, "valid", cfg.schema, cfg.data)


def test_the_test_split_is_untouched(small_dataset):
    cfg = small_config(*WINDOWS, "data.validation_fraction=0.5")
    reader = ParquetReader(small_dataset, "test", cfg.schema, cfg.data, training=False)
    assert reader.num_rows() == pq.read_table(os.path.join(small_dataset, "test")).num_rows == len(_all_rows(reader))
    assert reader.state_dict()["validation_fraction"] == 0.0
    assert reader.manifest.split_rows("test", "target", 0.5) == reader.manifest.rows["test"]["target"]
    with pytest.raises(ValueError, match=r"no split 'dev'; splits: \['test', 'train', 'valid'\]"):
        ParquetReader(small_dataset, "dev", cfg.schema, cfg.data)


def test_target_valid_never_reads_a_source_row_group(small_dataset, monkeypatch):
    cfg = small_config(*WINDOWS)
    manifest = open_dataset(small_dataset, cfg.schema)
    files = manifest.splits["train"]
    reads = record_row_group_reads(monkeypatch, small_dataset)
    readers = [ParquetReader(small_dataset, "valid", cfg.schema, cfg.data, rank=r, world_size=2, training=False,
                             entity="target", manifest=manifest) for r in range(2)]
    rows = [row for r in readers for row in _all_rows(r)]
    readers[0].first_batch()
    assert len(rows) == manifest.split_rows("valid", "target", 0.1) == 149 and {r[3] for r in rows} == {1}
    entity_of = {(f.path, rg): code for f in files for rg, code in enumerate(f.row_group_entity)}
    assert reads and {entity_of[r] for r in reads} == {1}
    assert set(reads) == {(files[u.file].path, u.row_group) for u in manifest.split_units("valid", 1, 0.1)}


def test_a_format_1_dataset_reads_train_whole_only(format_1_dataset):
    cfg = small_config()
    for split in ("train", "valid"):
        with pytest.raises(ValueError) as e:
            ParquetReader(format_1_dataset, split, cfg.schema, cfg.data)
        message = str(e.value)
        assert message.startswith(f"{format_1_dataset}: format 1 dataset has row groups of mixed entities, so "
                                  "data.validation_fraction=0.1 cannot cut")
        assert "set data.validation_fraction=0" in message and "mkt rewrite" in message and "\n" not in message
    whole = small_config("data.validation_fraction=0")
    reader = ParquetReader(format_1_dataset, "train", whole.schema, whole.data)
    assert reader.num_rows() == sum(reader.manifest.rows["train"].values())
    assert reader.manifest.split_rows("train", "target") == reader.manifest.rows["train"]["target"]


def test_synthetic_validation_rows_are_the_latest_train_rows_of_users_training_has_seen(tmp_path):
    """``mkt synth`` ends its train split with every user's most recent train rows, so the validation split holds
    warm users' next rows, like the test split (written by user blocks, it held users no training row had)."""
    from mkt_torchrec.data.synth import generate

    cfg = small_config("synth.users=400", "synth.source_rows=8000", "synth.row_group_rows=200",
                       "synth.rows_per_file=2000", "data.validation_fraction=0.1")  # about 5 blocks of users
    data = str(tmp_path / "data")
    generate(cfg, data)

    def users(split: str) -> collections.Counter:
        return collections.Counter(int(u) for b in ParquetReader(data, split, cfg.schema, cfg.data, training=False)
                                   for u in b.user_id)

    train, valid = users("train"), users("valid")
    seen = sum(n for u, n in valid.items() if u in train)
    assert seen >= 0.9 * sum(valid.values()), (seen, sum(valid.values()))
    assert len(valid) >= 0.3 * len(train | valid)  # spread over users, not the last-written block of them
