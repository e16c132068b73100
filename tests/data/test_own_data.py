"""README "Your own data": its writer snippet, run as written on Parquet logs, makes a dataset the reader reads."""

import os
import re
import shutil

import pyarrow.parquet as pq

from mkt_torchrec.config import load_config
from mkt_torchrec.data.dataset import open_dataset
from mkt_torchrec.data.reader import ParquetReader

from tests.conftest import QUICKSTART, REPO, SMALL


def _readme_snippet() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## Your own data"):text.index("## Training on a cluster")]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return "\n".join(line[3:] if line.startswith("   ") else line for line in block.splitlines())


def test_the_readme_writer_snippet_turns_parquet_logs_into_a_readable_dataset(small_dataset, tmp_path, monkeypatch):
    # "logs": Parquet files as a Spark job would leave them (one directory per split, any row order, extra columns)
    for split in ("train", "test"):
        os.makedirs(tmp_path / "logs" / split)
        for i, name in enumerate(sorted(os.listdir(os.path.join(small_dataset, split)))):
            table = pq.read_table(os.path.join(small_dataset, split, name))
            pq.write_table(table.append_column("spark_partition", [[i] * table.num_rows]),
                           tmp_path / "logs" / split / f"part-{i:05d}.parquet")
    shutil.copy(QUICKSTART, tmp_path / "yours.yaml")
    monkeypatch.chdir(tmp_path)
    snippet = _readme_snippet().replace('load_config("yours.yaml")', f'load_config("yours.yaml", {SMALL!r})')
    exec(compile(snippet, "README.md (Your own data)", "exec"), {})

    cfg = load_config(QUICKSTART, SMALL)
    manifest = open_dataset("data/mine", cfg.schema)
    source = open_dataset(small_dataset, cfg.schema)
    for split in ("train", "test"):
        assert manifest.rows[split] == source.rows[split]
    batch = next(iter(ParquetReader("data/mine", "train", cfg.schema, cfg.data, rank=0, world_size=1)))
    assert len(batch) > 0
