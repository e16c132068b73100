"""Fixtures of the data tests: a format-1 dataset (mixed-entity row groups, no per-row-group entity)."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest


def write_format_1(src: str, dst: str, row_group_rows: int = 500) -> str:
    """Copy the dataset ``src`` into ``dst`` as the previous release wrote it: each split's rows in one file of
    mixed-entity row groups, and a format-1 manifest (no ``row_group_entity``, no ``mean_lengths``)."""
    manifest = json.load(open(os.path.join(src, "manifest.json")))
    splits = {}
    for split, files in manifest["splits"].items():
        table = pq.ParquetDataset([os.path.join(src, f["path"]) for f in files]).read()
        table = table.sort_by("user_id")  # interleave the entities inside every row group
        rel = os.path.join(split, "part-00000.parquet")
        os.makedirs(os.path.join(dst, split))
        pq.write_table(table, os.path.join(dst, rel), row_group_size=row_group_rows)
        meta = pq.ParquetFile(os.path.join(dst, rel)).metadata
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        splits[split] = [{"path": rel, "rows": table.num_rows, "row_groups": groups}]
    old = {k: manifest[k] for k in ("schema_digest", "columns", "optional_columns", "rows", "source")}
    with open(os.path.join(dst, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump({"format_version": 1, **old, "splits": splits}, f)
    return dst


@pytest.fixture(scope="session")
def format_1_dataset(small_dataset, tmp_path_factory) -> str:
    return write_format_1(small_dataset, str(tmp_path_factory.mktemp("data") / "format1"))


def record_row_group_reads(monkeypatch, data_dir: str) -> list:
    """Record every (file relative to ``data_dir``, row group) the reader reads from now on (a list that fills)."""
    import os

    import pyarrow.parquet as pq

    reads: list = []

    class Recording(pq.ParquetFile):  # the reader opens files as pq.ParquetFile(path)
        def __init__(self, source, *args, **kwargs):
            super().__init__(source, *args, **kwargs)
            self.rel = os.path.relpath(source, data_dir)

        def read_row_group(self, i, *args, **kwargs):
            reads.append((self.rel, i))
            return super().read_row_group(i, *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", Recording)
    return reads
