"""open_dataset_shared with real processes (gloo, CPU): one footer read per file in total, errors on every rank."""

import json
import os
import shutil
import threading
import time

import pytest

from mkt_torchrec.data.dataset import MANIFEST, Manifest, open_dataset, open_dataset_shared
from mkt_torchrec.training.distributed import RankFailed, init_distributed, launch, shutdown

from tests.conftest import small_config

WATCHDOG_S = 60.0  # a worker still running after this long is stuck in a collective: it exits, failing the launch


def _open_worker(data_dir: str, schema, out_dir: str, reraise: bool) -> None:
    """Open the dataset on this rank; write ``out_dir/rank-R.json`` with the footers read and the outcome."""
    import pyarrow.parquet as pq

    reads: list[str] = []
    real = pq.read_metadata

    def counting(path, *args, **kwargs):
        reads.append(os.path.relpath(path, data_dir))
        return real(path, *args, **kwargs)

    pq.read_metadata = counting  # dataset.py calls pq.read_metadata (a footer) through the module
    watchdog = threading.Timer(WATCHDOG_S, os._exit, (3,))
    watchdog.daemon = True
    watchdog.start()
    info = init_distributed()
    record: dict = {"rank": info.rank, "world_size": info.world_size, "reads": reads}
    error = None
    try:
        record["manifest"] = open_dataset_shared(data_dir, schema).to_json()
    except Exception as e:  # noqa: BLE001 - recorded, then re-raised if asked
        record["error"] = [type(e).__name__, str(e)]
        error = e
    with open(os.path.join(out_dir, f"rank-{info.rank}.json"), "w", encoding="utf-8") as f:
        json.dump(record, f)
    shutdown()
    watchdog.cancel()
    if error is not None and reraise:
        raise error


def _paths(manifest: Manifest) -> list[str]:
    """Every file of every split, in manifest order."""
    return [fi.path for files in manifest.splits.values() for fi in files]


def _records(out_dir: str, nproc: int) -> list[dict]:
    names = sorted(os.listdir(out_dir))
    assert names == [f"rank-{r}.json" for r in range(nproc)], names  # every rank finished
    out = []
    for name in names:
        with open(os.path.join(out_dir, name), encoding="utf-8") as f:
            out.append(json.load(f))
    return out


def test_world_of_one_is_open_dataset(small_dataset):
    schema = small_config().schema
    assert open_dataset_shared(small_dataset, schema) == open_dataset(small_dataset, schema)


@pytest.mark.parametrize("nproc", [2, 3])
def test_every_footer_read_once_in_total_and_manifest_equal(small_dataset, tmp_path, nproc):
    schema = small_config().schema
    expected = open_dataset(small_dataset, schema)
    files = _paths(expected)
    assert len(files) > nproc  # every rank has work
    launch(nproc, _open_worker, small_dataset, schema, str(tmp_path), True)
    records = _records(str(tmp_path), nproc)
    assert sorted(p for r in records for p in r["reads"]) == sorted(files)
    for r in records:
        assert r["world_size"] == nproc
        rank = r["rank"]  # a contiguous share of the manifest's file order
        assert r["reads"] == files[len(files) * rank // nproc:len(files) * (rank + 1) // nproc]
        assert r["manifest"] == expected.to_json()


def test_corrupt_file_fails_every_rank_with_the_first_bad_file(small_dataset, tmp_path):
    schema = small_config().schema
    data = str(tmp_path / "data")
    shutil.copytree(small_dataset, data)
    files = _paths(open_dataset(data, schema))
    assert len(files) >= 4
    for bad in (files[1], files[-1]):  # two ranks fail; every rank reports the first bad file
        with open(os.path.join(data, bad), "wb") as f:
            f.write(b"not a parquet file" * 10)
    with pytest.raises(ValueError) as single:
        open_dataset(data, schema)
    out = tmp_path / "out"
    out.mkdir()
    start = time.monotonic()
    with pytest.raises(RankFailed):
        launch(3, _open_worker, data, schema, str(out), True)
    assert time.monotonic() - start < WATCHDOG_S
    records = _records(str(out), 3)
    for r in records:
        assert r["error"] == ["ValueError", str(single.value)]
    assert os.path.join(data, files[1]) in str(single.value) and "unreadable Parquet file" in str(single.value)


def test_missing_manifest_raises_on_every_rank(small_dataset, tmp_path):
    schema = small_config().schema
    data = str(tmp_path / "data")
    shutil.copytree(small_dataset, data)
    os.remove(os.path.join(data, MANIFEST))
    with pytest.raises(FileNotFoundError) as single:
        open_dataset(data, schema)
    out = tmp_path / "out"
    out.mkdir()
    start = time.monotonic()
    launch(2, _open_worker, data, schema, str(out), False)
    assert time.monotonic() - start < WATCHDOG_S
    for r in _records(str(out), 2):
        assert r["error"] == ["FileNotFoundError", str(single.value)]
        assert r["reads"] == []
