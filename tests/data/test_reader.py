import collections
import itertools
import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mkt_torchrec.data.reader import ParquetReader
from mkt_torchrec.data.schema import map_ids

from tests.conftest import small_config
from tests.data.conftest import record_row_group_reads


def _rows(batch) -> list[tuple]:
    """A hashable identity per row: (user_id, item row, label, entity, seq lengths...)."""
    jt = batch.sparse_features.to_dict()
    item = jt["item_id"].to_padded_dense(1)[:, 0]
    hs = jt["hist_source_items"].lengths()
    ht = jt["hist_target_items"].lengths()
    return list(zip(batch.user_id.tolist(), item.tolist(), batch.labels.tolist(), batch.entity.tolist(),
                    hs.tolist(), ht.tolist(), batch.true_prob.tolist()))


def _all_rows(reader) -> list[tuple]:
    return [r for b in reader for r in _rows(b)]


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 0), (3, 2)])
def test_every_row_read_exactly_once_across_ranks_and_workers(small_dataset, world_size, workers):
    cfg = small_config(f"data.num_workers={workers}", "data.validation_fraction=0")  # the train files whole
    reference = collections.Counter(_all_rows(ParquetReader(small_dataset, "train", cfg.schema,
                                                            small_config("data.validation_fraction=0").data,
                                                            training=False)))
    got = collections.Counter()
    for rank in range(world_size):
        got.update(_all_rows(ParquetReader(small_dataset, "train", cfg.schema, cfg.data, rank=rank,
                                           world_size=world_size)))
    assert got == reference
    assert sum(reference.values()) == pq.ParquetDataset(os.path.join(small_dataset, "train")).read().num_rows


def test_shuffle_is_seeded_and_changes_with_epoch(small_dataset):
    cfg = small_config()
    a = ParquetReader(small_dataset, "train", cfg.schema, cfg.data)
    b = ParquetReader(small_dataset, "train", cfg.schema, cfg.data)
    e0a, e0b = _all_rows(a), _all_rows(b)
    assert e0a == e0b
    e1 = _all_rows(a)
    assert e1 != e0a and sorted(e1) == sorted(e0a)
    plain = _all_rows(ParquetReader(small_dataset, "train", cfg.schema, cfg.data, training=False))
    assert plain != e0a and sorted(plain) == sorted(e0a)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_saved_state_yields_the_same_stream(small_dataset, workers):
    cfg = small_config(f"data.num_workers={workers}", "data.batch_size=100")
    full = ParquetReader(small_dataset, "train", cfg.schema, cfg.data)
    expected = [_rows(b) for b in full]
    expected_next_epoch = [_rows(b) for b in full]

    first = ParquetReader(small_dataset, "train", cfg.schema, cfg.data)
    it = iter(first)
    head = [_rows(next(it)) for _ in range(7)]
    state = first.state_dict()
    del it

    resumed = ParquetReader(small_dataset, "train", cfg.schema, cfg.data)
    resumed.load_state_dict(state)
    tail = [_rows(b) for b in resumed]
    assert head + tail == expected
    assert [_rows(b) for b in resumed] == expected_next_epoch


def _readers(ds, cfg, world, entity=None):
    return [ParquetReader(ds, "train", cfg.schema, cfg.data, rank=r, world_size=world, entity=entity)
            for r in range(world)]


def _take(readers, steps):
    """Read ``steps`` batches on every rank (fewer where a rank runs out); return the rows and the states."""
    rows, its = [], [iter(r) for r in readers]
    for _ in range(steps):
        for it in its:
            b = next(it, None)
            if b is not None:
                rows += _rows(b)
    return rows, [r.state_dict() for r in readers]


@pytest.mark.parametrize("entity, workers", [(None, 0), ("target", 0), (None, 2)])
def test_restart_at_another_world_size_reads_each_row_once(small_dataset, entity, workers):
    """2 ranks read part of an epoch, 1 rank continues, then 3 ranks (with other worker counts) finish it:
    every row of the epoch is read exactly once, and the next epoch starts afresh."""
    cfg = small_config("data.batch_size=64", "data.shuffle_window_rows=700")
    reference = collections.Counter(_all_rows(ParquetReader(small_dataset, "train", cfg.schema, cfg.data,
                                                            training=False, entity=entity)))
    first, states = _take(_readers(small_dataset, cfg, 2, entity), 5)
    cfg_w = small_config("data.batch_size=64", "data.shuffle_window_rows=700", f"data.num_workers={workers}")
    one = _readers(small_dataset, cfg_w, 1, entity)
    one[0].load_state_dict(states)
    second, states = _take(one, 7)
    three = _readers(small_dataset, cfg, 3, entity)
    for r in three:
        r.load_state_dict(states)
    assert sum(r.rows_left() for r in three) == one[0].rows_left()
    assert max(r.rows_left() for r in three) - min(r.rows_left() for r in three) <= 1  # balanced by rows
    rest = [row for r in three for row in _all_rows(r)]
    assert first and second and rest
    assert collections.Counter(first + second + rest) == reference
    assert all(r.epoch == 1 for r in three) and sum(r.rows_left() for r in three) == three[0].num_rows()


def test_resume_needs_every_rank_state_to_change_world_size(small_dataset):
    cfg = small_config()
    _, states = _take(_readers(small_dataset, cfg, 2), 1)
    one = ParquetReader(small_dataset, "train", cfg.schema, cfg.data)
    with pytest.raises(ValueError, match="all its ranks"):
        one.load_state_dict(states[1:])
    other = small_config("data.batch_size=7")
    with pytest.raises(ValueError, match="batch_size"):
        ParquetReader(small_dataset, "train", other.schema, other.data).load_state_dict(states)


def test_fewer_row_groups_than_ranks_still_feeds_every_rank(small_dataset):
    """Shares are cut by rows, not row groups: 3 ranks on a split of one row group each get a third."""
    cfg = small_config("data.batch_size=32")
    manifest = ParquetReader(small_dataset, "test", cfg.schema, cfg.data).manifest
    files = manifest.splits["test"]
    one_group = type(manifest)(**{**vars(manifest), "splits": {"test": [type(files[0])(
        path=files[0].path, rows=files[0].row_groups[0], row_groups=[files[0].row_groups[0]],
        row_group_entity=[files[0].row_group_entity[0]])]}})
    counts = [sum(len(b) for b in ParquetReader(small_dataset, "test", cfg.schema, cfg.data, rank=r, world_size=3,
                                                 training=False, manifest=one_group)) for r in range(3)]
    assert sum(counts) == files[0].row_groups[0] and max(counts) - min(counts) <= 1


def test_batch_contents_match_the_parquet_rows(small_dataset):
    """KJT values are the mapped ids, nulls are empty bags, sequences keep the last max_len elements."""
    cfg = small_config("schema.sequences.hist_source_items.max_len=5", "data.batch_size=4000")
    table = pq.ParquetFile(os.path.join(small_dataset, "train", "part-00000.parquet")).read_row_group(0)
    reader = ParquetReader(small_dataset, "train", cfg.schema, cfg.data, training=False,
                           batch_size=table.num_rows)
    batch = next(iter(reader))
    jt = batch.sparse_features.to_dict()
    rows = table.to_pylist()
    tables = cfg.schema.tables
    for key in ("item_id", "price_bucket", "style"):
        expect_vals, expect_lens = [], []
        for r in rows:
            if r[key] is None:
                expect_lens.append(0)
            else:
                expect_lens.append(1)
                expect_vals.append(r[key])
        mapped = map_ids(np.array(expect_vals, dtype=np.int64), cfg.schema.table_of(key), tables[cfg.schema.table_of(key)])
        assert jt[key].lengths().tolist() == expect_lens
        assert jt[key].values().tolist() == mapped.tolist()
    seq = jt["hist_source_items"]
    expect = [r["hist_source_items"][-5:] for r in rows]
    assert seq.lengths().tolist() == [len(s) for s in expect]
    flat = np.array([x for s in expect for x in s], dtype=np.int64)
    assert seq.values().tolist() == map_ids(flat, "item_id", tables["item_id"]).tolist()
    assert int(seq.lengths().max()) <= 5
    side = jt["hist_source_categories"]  # the side column: truncated like its sequence, the category's table
    expect = [r["hist_source_categories"][-5:] for r in rows]
    assert side.lengths().tolist() == seq.lengths().tolist()
    flat = np.array([x for s in expect for x in s], dtype=np.int64)
    assert side.values().tolist() == map_ids(flat, "category", tables["category"]).tolist()
    assert torch.equal(batch.labels, torch.tensor([float(r["label"]) for r in rows]))
    dense = [r["log_price"] if r["log_price"] is not None else 0.0 for r in rows]
    assert torch.allclose(batch.dense_features[:, 0], torch.tensor(dense))


def test_mapped_ids_are_in_range():
    cfg = small_config()
    ids = np.random.default_rng(0).integers(-2**62, 2**62, size=10000)
    rows = map_ids(ids, "item_id", cfg.schema.tables["item_id"])
    assert rows.min() >= 0 and rows.max() < cfg.schema.tables["item_id"].rows
    assert len(np.unique(rows)) > 0.8 * min(10000, cfg.schema.tables["item_id"].rows)
    with pytest.raises(ValueError, match="modulo"):
        map_ids(np.array([-1]), "age", cfg.schema.tables["age"])


def test_entity_filter_keeps_one_entity(small_dataset):
    cfg = small_config()
    reader = ParquetReader(small_dataset, "train", cfg.schema, cfg.data, entity="target")
    n = 0
    for b in reader:
        assert bool((b.entity == 1).all())
        n += len(b)
    manifest = reader.manifest
    valid = manifest.split_rows("valid", "target", validation_fraction=cfg.data.validation_fraction)
    assert n == reader.num_rows() == manifest.rows["train"]["target"] - valid and valid > 0


# ---------------------------------------------------------------------------------------------- bad input


def _copy_dataset(src: str, dst) -> str:
    import shutil

    out = str(dst / "copy")
    shutil.copytree(src, out)
    return out


def _rewrite(path: str, fn) -> None:
    t = pq.read_table(path)
    pq.write_table(fn(t), path, row_group_size=500)


def test_missing_column_names_file_and_column(small_dataset, tmp_path):
    ds = _copy_dataset(small_dataset, tmp_path)
    path = os.path.join(ds, "train", "part-00001.parquet")
    _rewrite(path, lambda t: t.drop_columns(["style"]))
    cfg = small_config()
    with pytest.raises(ValueError, match=r"part-00001\.parquet: missing column 'style'"):
        ParquetReader(ds, "train", cfg.schema, cfg.data)


def test_mistyped_column_names_file_and_column(small_dataset, tmp_path):
    ds = _copy_dataset(small_dataset, tmp_path)
    path = os.path.join(ds, "test", "part-00000.parquet")
    _rewrite(path, lambda t: t.set_column(t.schema.get_field_index("age"), "age", t.column("age").cast(pa.string())))
    cfg = small_config()
    with pytest.raises(ValueError, match=r"part-00000\.parquet: column 'age' has type string"):
        ParquetReader(ds, "test", cfg.schema, cfg.data)


def test_unreadable_file_and_missing_manifest(small_dataset, tmp_path):
    ds = _copy_dataset(small_dataset, tmp_path)
    with open(os.path.join(ds, "train", "part-00000.parquet"), "wb") as f:
        f.write(b"not parquet at all")
    cfg = small_config()
    with pytest.raises(ValueError, match=r"part-00000\.parquet: unreadable Parquet file"):
        ParquetReader(ds, "train", cfg.schema, cfg.data)
    os.remove(os.path.join(ds, "manifest.json"))
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        ParquetReader(ds, "train", cfg.schema, cfg.data)


def test_schema_mismatch_with_config_is_reported(small_dataset):
    cfg = small_config("schema.features.brand.group=shared", "schema.tables.brand.rows=10")
    with pytest.raises(ValueError, match="missing column 'brand'"):
        ParquetReader(small_dataset, "train", cfg.schema, cfg.data)


def test_null_sequence_is_an_error_naming_the_row(small_dataset, tmp_path):
    ds = _copy_dataset(small_dataset, tmp_path)
    path = os.path.join(ds, "train", "part-00000.parquet")
    t = pq.read_table(path)
    seq = t.column("hist_target_items").to_pylist()
    seq[3] = None
    field = pa.field("hist_target_items", pa.list_(pa.int64()), nullable=True)
    t = t.set_column(t.schema.get_field_index("hist_target_items"), field, pa.array(seq, pa.list_(pa.int64())))
    pq.write_table(t, path, row_group_size=500)
    cfg = small_config()
    with pytest.raises(ValueError, match=r"'hist_target_items' row 3: null sequence"):
        list(ParquetReader(ds, "train", cfg.schema, cfg.data, training=False))


@pytest.mark.parametrize("column, value, message", [
    ("label", 2, "2: a label must be 0 or 1"), ("label", -1, "-1: a label must be 0 or 1"),
    ("entity", 2, "2: entity must be 0 (source) or 1 (target)"),
    ("log_price", float("nan"), "nan is not a finite number"), ("log_price", float("inf"), "inf is not a finite"),
])
def test_bad_values_are_errors_naming_file_column_and_row(small_dataset, tmp_path, column, value, message):
    """Used to train silently (negative loss, NaN checkpoints) or fail later with KeyError: 2."""
    ds = _copy_dataset(small_dataset, tmp_path)
    path = os.path.join(ds, "train", "part-00001.parquet")
    t = pq.read_table(path)
    values = t.column(column).to_pylist()
    values[7] = value
    t = t.set_column(t.schema.get_field_index(column), t.schema.field(column), pa.array(values, t.schema.field(column).type))
    pq.write_table(t, path, row_group_size=500)
    cfg = small_config()
    with pytest.raises(ValueError) as e:
        list(ParquetReader(ds, "train", cfg.schema, cfg.data, training=False))
    assert f"part-00001.parquet: row group 0: column {column!r} row 7: {message}" in str(e.value)


def test_side_column_of_another_length_than_its_sequence_names_file_column_and_row(small_dataset, tmp_path):
    ds = _copy_dataset(small_dataset, tmp_path)
    path = os.path.join(ds, "train", "part-00001.parquet")
    t = pq.read_table(path)
    side = t.column("hist_target_categories").to_pylist()
    row = next(i for i, s in enumerate(side) if i >= 3 and len(s) >= 1)
    side[row] = side[row][1:]  # one category short
    index = t.schema.get_field_index("hist_target_categories")
    t = t.set_column(index, t.schema.field(index), pa.array(side, t.schema.field(index).type))
    pq.write_table(t, path, row_group_size=500)
    cfg = small_config()
    with pytest.raises(ValueError) as e:
        list(ParquetReader(ds, "train", cfg.schema, cfg.data, training=False))
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert (f"part-00001.parquet: row group {row // 500}: column 'hist_target_categories' row {row % 500}: "
            f"{len(side[row])} values but its sequence 'hist_target_items' has {len(side[row]) + 1} steps") in msg


def test_null_inside_a_sequence_names_file_column_and_row(small_dataset, tmp_path):
    """Used to fail with pyarrow's 'zero_copy_only was True' and no file, column or row."""
    ds = _copy_dataset(small_dataset, tmp_path)
    path = os.path.join(ds, "train", "part-00000.parquet")
    t = pq.read_table(path)
    seq = t.column("hist_source_items").to_pylist()
    row = next(i for i, s in enumerate(seq) if i >= 5 and len(s) >= 2)
    seq[row][1] = None
    field = pa.field("hist_source_items", pa.list_(pa.field("element", pa.int64(), nullable=True)), nullable=False)
    t = t.set_column(t.schema.get_field_index("hist_source_items"), field, pa.array(seq, field.type))
    pq.write_table(t, path, row_group_size=500)
    cfg = small_config()
    with pytest.raises(ValueError) as e:
        list(ParquetReader(ds, "train", cfg.schema, cfg.data, training=False))
    assert f"part-00000.parquet: row group {row // 500}: column 'hist_source_items' row {row % 500}: a null inside" \
        in str(e.value)


def test_files_that_differ_only_in_nullability_read_together(small_dataset, tmp_path):
    """A window spanning two files whose schemas differ only in nullability used to fail in concat_tables."""
    ds = _copy_dataset(small_dataset, tmp_path)
    path = os.path.join(ds, "train", "part-00000.parquet")
    t = pq.read_table(path)
    loose = pa.schema([f.with_nullable(True) for f in t.schema])
    pq.write_table(t.cast(loose), path, row_group_size=500)
    cfg = small_config("data.shuffle_window_rows=100000")  # one window across every file
    reference = collections.Counter(_all_rows(ParquetReader(small_dataset, "train", cfg.schema, cfg.data)))
    assert collections.Counter(_all_rows(ParquetReader(ds, "train", cfg.schema, cfg.data))) == reference


# ---------------------------------------------------------------------------------------------- step schedule


def _lockstep(readers) -> list[int]:
    """Iterate every rank's reader one batch per step until all are done: the rows of each step, all ranks."""
    its, steps = [iter(r) for r in readers], []
    while True:
        lengths = [len(b) for b in (next(it, None) for it in its) if b is not None]
        if not lengths:
            return steps
        steps.append(sum(lengths))


STEP_CFG = ("data.batch_size=64", "data.shuffle_window_rows=700")


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("entity", [None, "target"])
def test_step_rows_is_the_rows_every_rank_yields_at_each_step(small_dataset, world, workers, entity):
    cfg = small_config(*STEP_CFG, f"data.num_workers={workers}")
    readers = _readers(small_dataset, cfg, world, entity)
    schedule = readers[0].step_rows()
    assert all(r.step_rows() == schedule for r in readers[1:])
    assert len(schedule) == max(r.batches_left() for r in readers)
    assert sum(schedule) == readers[0].num_rows() == readers[0].manifest.split_rows(
        "train", entity, validation_fraction=cfg.data.validation_fraction) < readers[0].manifest.split_rows(
        "train", entity)  # the validation rows cut off
    assert _lockstep(readers) == schedule
    assert all(r.epoch == 1 and r.step_rows() == schedule for r in readers)  # a fresh epoch: the same shares
    eval_readers = [ParquetReader(small_dataset, "test", cfg.schema, cfg.data, rank=r, world_size=world,
                                  training=False, entity=entity, drop_last=True) for r in range(world)]
    schedule = eval_readers[0].step_rows()
    assert all(n % 64 == 0 for n in schedule) and _lockstep(eval_readers) == schedule


@pytest.mark.parametrize("entity, old_world, old_workers, new_world, new_workers, steps", [
    (None, 2, 2, 3, 0, 5),          # another world size: the rest is dealt afresh
    ("target", 3, 0, 2, 2, 4),
    ("target", 2, 2, 2, 2, 3),      # the same world: every rank's windows, positions and (odd) rotation
    (None, 1, 2, 1, 2, 7),
])
def test_step_rows_after_a_restart_mid_epoch(small_dataset, entity, old_world, old_workers, new_world,
                                             new_workers, steps):
    old_cfg = small_config(*STEP_CFG, f"data.num_workers={old_workers}")
    old = _readers(small_dataset, old_cfg, old_world, entity)
    full = old[0].step_rows()
    _, states = _take(old, steps)
    assert old[0].step_rows() == full[steps:]  # ranks in step: the schedule moves with them
    if old_workers == 2 and old_world == new_world:
        assert any(st["rotation"] == 1 for st in states)
    json_states = json.loads(json.dumps(states))  # as a checkpoint holds them
    cfg = small_config(*STEP_CFG, f"data.num_workers={new_workers}")
    new = _readers(small_dataset, cfg, new_world, entity)
    for r in new:
        r.load_state_dict(json_states)
    schedule = new[0].step_rows()
    assert all(r.step_rows() == schedule for r in new[1:])
    assert sum(schedule) == sum(r.rows_left() for r in new) == sum(full) - sum(full[:steps])
    if old_world == new_world and old_workers == new_workers:
        assert schedule == full[steps:]
    assert _lockstep(new) == schedule


def test_step_rows_follow_the_workers_turns_when_slots_run_out_unevenly(small_dataset):
    """3 workers per rank, the second slot with at most 70 rows left, starting at the third worker's turn: the
    DataLoader skips the exhausted worker and the schedule knows it."""
    cfg = small_config(*STEP_CFG, "data.num_workers=3")

    def loaded(states, rank):
        r = ParquetReader(small_dataset, "train", cfg.schema, cfg.data, rank=rank, world_size=2)
        r.load_state_dict(states)
        return r

    states = []
    for r in _readers(small_dataset, cfg, 2):
        st = r.state_dict()
        st["windows"] = windows = [[list(w) for w in ws] for ws in r._layout()]
        last = len(windows[1]) - 1
        st["positions"][1] = {"window": last, "offset": max(0, windows[1][last][3] - windows[1][last][2] - 70)}
        st["rotation"] = 2
        states.append(st)
    readers = [loaded(states, r) for r in range(2)]
    schedule = readers[0].step_rows()
    alone = [[len(b) for b in loaded(states, r)] for r in range(2)]  # each rank's batches, read on its own
    assert [r.batches_left() for r in readers] == [len(a) for a in alone]
    assert schedule == [sum(n) for n in itertools.zip_longest(*alone, fillvalue=0)]
    assert _lockstep(readers) == schedule


def test_step_rows_needs_every_rank_state(small_dataset):
    cfg = small_config(*STEP_CFG)
    _, states = _take(_readers(small_dataset, cfg, 2), 2)
    own = _readers(small_dataset, cfg, 2)[1]
    own.load_state_dict(states[1])
    assert own.batches_left() == len(_lockstep([own]))  # its own batches it knows
    own.load_state_dict(states[1])
    with pytest.raises(ValueError, match="needs every rank's state"):
        own.step_rows()
    list(own)
    assert own.epoch == 1 and len(own.step_rows()) > 0  # the next epoch's layout is known again


# ---------------------------------------------------------------------------------------------- one entity


def test_target_reader_never_reads_a_source_row_group(small_dataset, monkeypatch):
    cfg = small_config(*STEP_CFG, "data.validation_fraction=0")  # the train files whole
    manifest = ParquetReader(small_dataset, "train", cfg.schema, cfg.data).manifest
    entity_of = {(f.path, rg): code for f in manifest.splits["train"] for rg, code in enumerate(f.row_group_entity)}
    reads = record_row_group_reads(monkeypatch, small_dataset)
    readers = _readers(small_dataset, cfg, 2, "target")
    rows = sum(len(b) for r in readers for b in r)
    readers[0].first_batch()
    assert rows == manifest.rows["train"]["target"]
    assert reads and {entity_of[r] for r in reads} == {1}
    assert set(reads) == {k for k, code in entity_of.items() if code == 1}  # and every target one


def test_format_1_reads_whole_but_not_one_entity(format_1_dataset, small_dataset):
    cfg = small_config("data.validation_fraction=0")
    everything = collections.Counter(_all_rows(ParquetReader(format_1_dataset, "train", cfg.schema, cfg.data)))
    assert everything == collections.Counter(_all_rows(ParquetReader(small_dataset, "train", cfg.schema, cfg.data)))
    with pytest.raises(ValueError) as e:
        ParquetReader(format_1_dataset, "train", cfg.schema, cfg.data, entity="target")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{format_1_dataset}: format 1 dataset")
    assert f"mkt rewrite --config CONFIG --data {format_1_dataset} --out NEW" in message and "mkt synth" in message


def test_a_window_smaller_than_a_row_group_is_warned_about_once(small_dataset, caplog):
    cfg = small_config("data.shuffle_window_rows=333")
    with caplog.at_level(logging.WARNING, logger="mkt.data"):
        for _ in range(2):
            ParquetReader(small_dataset, "train", cfg.schema, cfg.data)
    warned = [r for r in caplog.records if "larger than data.shuffle_window_rows=333" in r.getMessage()]
    assert len(warned) == 1 and "500 rows" in warned[0].getMessage()


class _CountHostReads(torch.overrides.TorchFunctionMode):
    """Counts ``.tolist()`` / ``.item()`` calls: on a GPU each reads a device tensor back to the host (a sync)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.item):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_batches_carry_per_key_lengths_so_input_distribution_reads_nothing_back(small_dataset):
    """TorchRec's input distribution permutes and splits the KJT by key; without per-key lengths known on the host
    it computes them from the lengths tensor (``.tolist()``, a device-to-host sync per call on a GPU)."""
    cfg = small_config("data.batch_size=64")
    batch = next(iter(ParquetReader(small_dataset, "train", cfg.schema, cfg.data, rank=0, world_size=1)))
    kjt = batch.sparse_features
    lengths = kjt.lengths().view(len(kjt.keys()), -1)  # (keys, B)
    assert kjt._length_per_key == lengths.sum(1).tolist()
    assert kjt._offset_per_key == [0, *np.cumsum(lengths.sum(1).numpy()).tolist()]
    assert kjt.stride() == len(batch) == 64
    order = list(reversed(range(len(kjt.keys()))))
    with _CountHostReads() as mode:
        permuted = kjt.permute(order)
        parts = permuted.split([1] * len(order))
    assert mode.calls == 0
    for i, part in zip(order, parts):
        assert torch.equal(part.values(), kjt[kjt.keys()[i]].values())
