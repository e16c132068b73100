"""DatasetWriter's layout (entity-pure row groups, arrival order, mean lengths), format 1, rewrite_dataset."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mkt_torchrec.data.dataset import FORMAT_VERSION, DatasetWriter, open_dataset, rewrite_dataset

from tests.conftest import small_config


def _row_groups(data_dir: str, split: str):
    """(manifest entity code, table) of every row group of ``split``, in manifest order."""
    manifest = open_dataset(data_dir, small_config().schema)
    for f in manifest.splits[split]:
        pf = pq.ParquetFile(os.path.join(data_dir, f.path))
        assert pf.metadata.num_row_groups == len(f.row_groups) == len(f.row_group_entity)
        for rg, code in enumerate(f.row_group_entity):
            yield code, pf.read_row_group(rg)


def test_every_row_group_holds_the_one_entity_the_manifest_names(small_dataset):
    manifest = open_dataset(small_dataset, small_config().schema)
    assert manifest.format_version == FORMAT_VERSION == 2 and manifest.entity_pure
    for split in ("train", "test"):
        seen = collections.Counter()
        for code, table in _row_groups(small_dataset, split):
            assert set(table.column("entity").to_pylist()) == {code}
            seen[code] += table.num_rows
        assert seen == {0: manifest.rows[split]["source"], 1: manifest.rows[split]["target"]}
        assert manifest.split_rows(split, 1) == manifest.rows[split]["target"]


def test_row_groups_follow_arrival_and_each_entity_keeps_its_order(small_dataset, tmp_path):
    """Rows written one at a time: within an entity the order is kept exactly, and row groups (the last ones,
    flushed at close, too) are written in the order their last row arrived."""
    cfg = small_config()
    table = pq.read_table(os.path.join(small_dataset, "train"))
    rows = pa.concat_tables([table.filter(pc.equal(table.column("entity"), code)).slice(0, 30) for code in (0, 1)])
    rows = rows.take(pa.array(np.random.default_rng(0).permutation(rows.num_rows)))
    assert set(rows.column("entity").to_pylist()) == {0, 1}
    arrival = pa.array(np.arange(rows.num_rows, dtype=np.int32))
    rows = rows.set_column(rows.schema.get_field_index("activity"), "activity", arrival)  # the arrival number
    out = str(tmp_path / "ds")
    with DatasetWriter(out, cfg.schema, optional=("true_prob", "activity"), rows_per_file=16,
                       row_group_rows=4) as w:
        for i in range(rows.num_rows):
            w.write("train", rows.slice(i, 1))
    groups = list(_row_groups(out, "train"))
    last = [max(t.column("activity").to_pylist()) for _, t in groups]
    assert last == sorted(last)
    for code in (0, 1):
        written = [a for c, t in groups if c == code for a in t.column("activity").to_pylist()]
        arrived = [a for a, e in zip(arrival.to_pylist(), rows.column("entity").to_pylist()) if e == code]
        assert written == arrived
        assert all(t.num_rows == 4 for c, t in groups[:-2] if c == code)  # only the last of an entity is short


def test_mean_lengths_are_values_per_row_after_truncation(small_dataset):
    cfg = small_config()
    manifest = open_dataset(small_dataset, cfg.schema)
    for split in ("train", "test"):
        table = pq.ParquetDataset([os.path.join(small_dataset, f.path) for f in manifest.splits[split]]).read()
        expect = {}
        for key in cfg.schema.features:
            expect[key] = (table.num_rows - table.column(key).null_count) / table.num_rows
        for key in list(cfg.schema.sequences) + cfg.schema.side_keys:
            lengths = pc.list_value_length(table.column(key)).to_numpy()
            expect[key] = float(np.minimum(lengths, cfg.schema.max_len_of(key)).mean())
        assert set(manifest.mean_lengths[split]) == set(cfg.schema.sparse_keys)
        for key, mean in expect.items():
            assert manifest.mean_lengths[split][key] == pytest.approx(mean)
    assert 0 < manifest.mean_lengths["train"]["style"] < 1  # a target-only feature: null on source rows
    assert manifest.mean_lengths["train"]["hist_source_items"] > 1
    assert manifest.mean_lengths["train"]["hist_source_categories"] == manifest.mean_lengths["train"]["hist_source_items"]


def test_format_1_opens_and_rewrites_into_format_2(format_1_dataset, tmp_path):
    cfg = small_config()
    old = open_dataset(format_1_dataset, cfg.schema)
    assert old.format_version == 1 and not old.entity_pure and old.mean_lengths == {}
    mixed = [set(t.column("entity").to_pylist()) for t in
             (pq.ParquetFile(os.path.join(format_1_dataset, "train", "part-00000.parquet")).read_row_group(0),)]
    assert mixed == [{0, 1}]
    new = rewrite_dataset(format_1_dataset, str(tmp_path / "new"), cfg.schema)
    assert new.format_version == 2 and new.rows == old.rows and new.schema_digest == old.schema_digest
    assert new.source["rewritten_from"]["format_version"] == 1
    assert set(new.mean_lengths) == {"train", "test"}
    for split in ("train", "test"):
        before = pq.read_table(os.path.join(format_1_dataset, split)).to_pylist()
        after = [r for code, t in _row_groups(str(tmp_path / "new"), split) for r in t.to_pylist()]
        assert sorted(map(repr, before)) == sorted(map(repr, after))
        for code in (0, 1):  # each entity's rows keep their order
            assert [r for r in after if r["entity"] == code] == [r for r in before if r["entity"] == code]
    with pytest.raises(ValueError, match="new directory"):
        rewrite_dataset(format_1_dataset, format_1_dataset, cfg.schema)


def test_mkt_rewrite_makes_a_format_1_dataset_readable_by_entity(format_1_dataset, tmp_path, capsys):
    from mkt_torchrec.cli import main
    from mkt_torchrec.data.reader import ParquetReader

    from tests.conftest import QUICKSTART, SMALL, set_flags

    cfg = small_config("data.validation_fraction=0")  # the train files whole
    with pytest.raises(ValueError, match="mkt rewrite"):
        ParquetReader(format_1_dataset, "train", cfg.schema, cfg.data, entity="target")
    out = str(tmp_path / "new")
    assert main(["rewrite", "--config", QUICKSTART, *set_flags(*SMALL), "--data", format_1_dataset, "--out", out]) == 0
    assert json.loads(capsys.readouterr().out)["format_version"] == FORMAT_VERSION
    rows = sum(len(b) for b in ParquetReader(out, "train", cfg.schema, cfg.data, entity="target"))
    assert rows == open_dataset(format_1_dataset, cfg.schema).rows["train"]["target"]
    assert main(["rewrite", "--config", QUICKSTART, *set_flags(*SMALL), "--data", format_1_dataset, "--out", out]) == 1
    assert "already exists" in capsys.readouterr().err


def test_a_format_2_manifest_must_name_the_entity_of_every_row_group(small_dataset, tmp_path):
    import shutil

    data = str(tmp_path / "copy")
    shutil.copytree(small_dataset, data)
    path = os.path.join(data, "manifest.json")
    raw = json.load(open(path))
    raw["splits"]["train"][0]["row_group_entity"].pop()
    json.dump(raw, open(path, "w"))
    with pytest.raises(ValueError, match=r"manifest.json: not a valid manifest .*row_group_entity must give"):
        open_dataset(data, small_config().schema)


def test_a_side_column_of_another_length_than_its_sequence_is_refused(small_dataset, tmp_path):
    cfg = small_config()
    table = pq.read_table(os.path.join(small_dataset, "train")).slice(0, 10)
    side = table.column("hist_source_categories").to_pylist()
    side[4] = side[4] + [1]
    index = table.schema.get_field_index("hist_source_categories")
    table = table.set_column(index, table.schema.field(index), pa.array(side, table.schema.field(index).type))
    with pytest.raises(ValueError, match=r"split 'train': column 'hist_source_categories' row 4 of a write has "
                                         rf"{len(side[4])} values but its sequence 'hist_source_items' has"):
        with DatasetWriter(str(tmp_path / "ds"), cfg.schema, optional=("true_prob", "activity")) as w:
            w.write("train", table)
    assert not os.listdir(tmp_path)


def test_a_row_of_no_known_entity_is_refused_not_dropped(small_dataset, tmp_path):
    cfg = small_config()
    table = pq.read_table(os.path.join(small_dataset, "train")).slice(0, 10)
    entity = table.column("entity").to_pylist()
    entity[3] = 2
    table = table.set_column(0, table.schema.field(0), pa.array(entity, pa.int8()))
    with pytest.raises(ValueError, match=r"entity 2 in row 3"):
        with DatasetWriter(str(tmp_path / "ds"), cfg.schema, optional=("true_prob", "activity")) as w:
            w.write("train", table)
    assert not os.listdir(tmp_path)
