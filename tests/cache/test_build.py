"""``mkt cache build / load / versions`` (mkt_torchrec.cache.build, .snapshot, .cli): KEEP's knowledge cache of a
tiny MEM, checked against the MEM itself rebuilt whole (``load_unsharded``), at one rank and at two."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from mkt_torchrec.cache import build as cache_build
from mkt_torchrec.cache import open_store
from mkt_torchrec.cache.build import default_version, prepare
from mkt_torchrec.cache.keys import key_spec, keys_of, single_rows
from mkt_torchrec.cache.snapshot import check_matches, load_snapshot, read_manifest, read_part, store_meta
from mkt_torchrec.cli import main
from mkt_torchrec.config import load_config
from mkt_torchrec.data.reader import ParquetReader
from mkt_torchrec.rundir import RunDir
from mkt_torchrec.training import checkpoint
from mkt_torchrec.training.mem_transfer import load_unsharded
from tests.cache.test_store import _free_port, redis_server  # noqa: F401 - the session's redis-server fixture
from tests.conftest import QUICKSTART, SMALL

pytest_plugins = ["tests.s3"]

# Rows per lookup batch of the builds here. At two ranks the valid split's 149 target rows fall 74 / 75, so rank 1
# reads two batches and rank 0 steps once on a filler batch (test_two_ranks_build_the_same_snapshot checks it).
BATCH = 74
SPLITS = ["train", "valid"]
BUILD_SETS = ["--config", QUICKSTART, "--set", f"cache.batch_size={BATCH}", "--set", "data.num_workers=0",
              "--set", f"cache.splits=[{', '.join(SPLITS)}]"]


def _cache(*args: str) -> int:
    return main(["cache", *args])


@pytest.fixture(scope="module")
def mem_run(small_dataset, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("cache_mem") / "mem")
    args = ["train", "--config", QUICKSTART, "--stage", "mem", "--data", small_dataset, "--run-dir", run]
    for s in (*SMALL, "train.max_steps=3"):
        args += ["--set", s]
    assert main(args) == 0  # in this process, a world of one
    return run


@pytest.fixture(scope="module")
def snapshot(mem_run, small_dataset, tmp_path_factory):
    """A snapshot built by one rank, in this process, folding rows into per-key sums every 100 rows (the
    two-rank build folds them once: both paths are compared with each other)."""
    out = str(tmp_path_factory.mktemp("snap1") / "snapshot")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache_build, "COMPACT_ROWS", 100)
        assert _cache("build", "--mem-run", mem_run, "--data", small_dataset, "--out", out, *BUILD_SETS) == 0
    return out


@pytest.fixture(scope="module")
def snapshot_2ranks(mem_run, small_dataset, tmp_path_factory):
    """The same build by two real processes, under the accelerator emulation (no collective on a host tensor)."""
    out = str(tmp_path_factory.mktemp("snap2") / "snapshot")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MKT_EMULATE_ACCELERATOR", "1")
        mp.setenv("MKT_PROGRESS", "0")
        assert _cache("build", "--mem-run", mem_run, "--data", small_dataset, "--out", out, "--nproc", "2",
                      *BUILD_SETS) == 0
    return out


def _entries(path: str) -> dict:
    """kind -> (keys (K,), vectors (K, D)) of a snapshot, in file order, and the file each came from."""
    m = read_manifest(path)
    out = {}
    for kind, files in m["files"].items():
        parts = [(k, v, rel) for rel in files for k, v in read_part(path, kind, rel, m["dims"][kind])]
        out[kind] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return out


def _by_key(entries) -> dict:
    keys, vectors = entries
    return dict(zip(keys.tolist(), vectors, strict=True))


@pytest.fixture(scope="module")
def reference(mem_run, small_dataset):
    """kind -> (keys (N,), vectors (N, D)) of every target row of SPLITS: the MEM rebuilt whole
    (no sharding, no collectives) and the keys of mkt_torchrec.cache.keys."""
    cfg = RunDir(mem_run).config()
    model = load_unsharded(cfg, "mem", checkpoint.final_checkpoint(mem_run)).model.eval()
    spec = key_spec(cfg.schema, cfg.cache.category_feature)
    readers = [ParquetReader(small_dataset, split, cfg.schema, cfg.data, training=False, entity="target",
                             batch_size=BATCH) for split in SPLITS]
    rows: dict = {"user": ([], []), "item": ([], []), "user_category": ([], [])}
    for batch in (b for reader in readers for b in reader):
        with torch.no_grad():
            k = model.knowledge_from(model.sparse_arch(batch.sparse_features), batch.dense_features)
        keys = keys_of(single_rows(batch.sparse_features, spec.features), spec)
        for kind, vec in (("user", k.user), ("item", k.shared), ("user_category", torch.cat([k.seq, k.cross], -1))):
            rows[kind][0].append(keys[kind])
            rows[kind][1].append(vec.numpy())
    return {kind: (np.concatenate(ks), np.concatenate(vs)) for kind, (ks, vs) in rows.items()}


def test_user_and_item_vectors_are_the_mems_and_user_category_the_mean_of_its_rows(snapshot, reference):
    got = {kind: _by_key(e) for kind, e in _entries(snapshot).items()}
    for kind in ("user", "item"):  # each row's vector, exactly (the same table rows: the same lookup)
        keys, vectors = reference[kind]
        assert set(got[kind]) == set(keys.tolist())
        assert len(set(keys.tolist())) < len(keys)  # keys repeat over rows: the mean is exercised
        np.testing.assert_allclose(np.stack([got[kind][k] for k in keys.tolist()]), vectors, rtol=0, atol=1e-6)
    keys, vectors = reference["user_category"]  # the mean over the rows of each (user, category): a plain loop
    sums: dict = {}
    for key, vec in zip(keys.tolist(), vectors.astype(np.float64), strict=True):
        total, n = sums.get(key, (0.0, 0))
        sums[key] = (total + vec, n + 1)
    assert set(got["user_category"]) == set(sums)
    assert max(n for _, n in sums.values()) > 1
    for key, (total, n) in sums.items():
        np.testing.assert_allclose(got["user_category"][key], total / n, rtol=0, atol=1e-6)


def test_snapshot_layout_and_manifest(snapshot, mem_run, small_dataset, reference):
    m = read_manifest(snapshot)
    job = load_config(QUICKSTART, [f"cache.splits=[{', '.join(SPLITS)}]"])
    plan = prepare(mem_run, small_dataset, snapshot + "-other", job=job)
    assert m["version"] == plan.version == default_version(plan.mem, plan.cfg, small_dataset)
    assert prepare(mem_run, small_dataset, snapshot + "-other").version != plan.version  # other splits
    assert m["version"].startswith("mem-3-") and m["mem_digest"] == plan.mem["digest"]
    assert m["schema_digest"] == plan.cfg.schema_digest() and m["splits"] == SPLITS
    assert m["dims"] == {kind: vectors.shape[1] for kind, (_, vectors) in reference.items()}
    for kind, files in m["files"].items():
        assert files == [f"{kind}/part-00000.parquet"]
        keys, _ = _entries(snapshot)[kind]
        assert len(keys) == m["rows"][kind] and np.all(np.diff(keys) > 0)  # sorted, each key once
    assert sorted(os.listdir(snapshot)) == ["item", "manifest.json", "user", "user_category"]  # no partial files
    assert not [n for n in os.listdir(os.path.dirname(snapshot)) if ".tmp-" in n]


def test_two_ranks_build_the_same_snapshot(snapshot, snapshot_2ranks):
    """The same keys and entries. user and item vectors are table rows: bit-equal. user_category means may differ
    by float32 rounding: the MEM's dense layers computed each row in a batch of other rows (a float32 GEMM's result
    for a row may change with the batch by an ulp), and the float64 sums add rows in another order (far below
    float32's resolution). Measured: at most 3e-8 (an ulp of values near 0.3); the bound 1e-6 leaves room for other
    CPUs' GEMM kernels while a dropped or doubled row (a change of order 1e-2 in a mean) still fails."""
    cfg = RunDir(read_manifest(snapshot)["mem_run"]).config()
    batches = {split: [ParquetReader(read_manifest(snapshot)["data"], split, cfg.schema, cfg.data, rank=r,
                                     world_size=2, training=False, entity="target", batch_size=BATCH).batches_left()
                       for r in range(2)] for split in SPLITS}
    assert any(a != b for a, b in batches.values()), batches  # a rank stepped on a filler batch
    one, two = _entries(snapshot), _entries(snapshot_2ranks)
    m = read_manifest(snapshot_2ranks)
    assert m["ranks"] == 2 and m["rows"] == read_manifest(snapshot)["rows"]
    assert m["source_rows"] == read_manifest(snapshot)["source_rows"]  # the filler's rows were not counted
    for kind in one:
        assert m["files"][kind] == [f"{kind}/part-00000.parquet", f"{kind}/part-00001.parquet"]
        for r, rel in enumerate(m["files"][kind]):  # rank r holds the keys with key % 2 == r
            keys = np.concatenate([k for k, _ in read_part(snapshot_2ranks, kind, rel, m["dims"][kind])])
            assert keys.size and np.all(np.mod(keys, 2) == r) and np.all(np.diff(keys) > 0)
        a, b = _by_key(one[kind]), _by_key(two[kind])
        assert set(a) == set(b)
        keys = sorted(a)
        tol = {"rtol": 0, "atol": 0} if kind in ("user", "item") else {"rtol": 0, "atol": 1e-6}
        np.testing.assert_allclose(np.stack([b[k] for k in keys]), np.stack([a[k] for k in keys]), **tol)


def test_a_failed_build_leaves_no_snapshot_and_keeps_the_old_one(snapshot, mem_run, small_dataset, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.setenv("MKT_FAULT", "cache_build:0")  # after the partial files are written, before publishing
    fresh = str(tmp_path / "fresh")
    assert _cache("build", "--mem-run", mem_run, "--data", small_dataset, "--out", fresh, *BUILD_SETS) == 1
    assert "injected fault at cache_build" in capsys.readouterr().err
    assert not os.path.exists(fresh) and os.listdir(tmp_path) == []  # no snapshot, no staging directory
    old = str(tmp_path / "old")
    shutil.copytree(snapshot, old)
    before = open(os.path.join(old, "manifest.json")).read()
    assert _cache("build", "--mem-run", mem_run, "--data", small_dataset, "--out", old, "--overwrite",
                  "--version", "v2", *BUILD_SETS) == 1
    assert open(os.path.join(old, "manifest.json")).read() == before and sorted(os.listdir(tmp_path)) == ["old"]


def test_overwrite_replaces_only_a_snapshot(mem_run, small_dataset, tmp_path, capsys):
    dataset_like = tmp_path / "ds"
    dataset_like.mkdir()
    (dataset_like / "manifest.json").write_text(json.dumps({"format_version": 2, "splits": {}}))
    assert _cache("build", "--mem-run", mem_run, "--data", small_dataset, "--out", str(dataset_like), "--overwrite",
                  *BUILD_SETS) == 1
    err = capsys.readouterr().err
    assert "not a knowledge-cache snapshot's" in err and str(dataset_like) in err and err.count("\n") == 1
    assert (dataset_like / "manifest.json").exists()
    assert _cache("build", "--mem-run", mem_run, "--data", small_dataset, "--out", str(dataset_like),
                  *BUILD_SETS) == 1
    assert "--overwrite" in capsys.readouterr().err


@pytest.fixture(params=["sqlite", "redis"])
def store_uri(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'knowledge.db'}"
    url = request.getfixturevalue("redis_server")
    import redis

    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


def test_load_publishes_the_snapshot_and_a_second_load_is_a_no_op(snapshot, store_uri, capsys):
    assert _cache("load", "--from", snapshot, "--to", store_uri) == 0
    m = read_manifest(snapshot)
    assert f"published cache version {m['version']}" in capsys.readouterr().out
    with open_store(store_uri) as store:
        info = store.info(m["version"])
        assert info.meta == store_meta(m) and info.dims == m["dims"] and info.rows == m["rows"]
        for kind, (keys, vectors) in _entries(snapshot).items():
            found = store.lookup(m["version"], kind, keys)
            assert found.found.all()
            np.testing.assert_array_equal(found.vectors, vectors)  # bit-exact
        check_matches(info.meta, m["mem_digest"], m["schema_digest"], store.display)
    assert _cache("load", "--from", snapshot, "--to", store_uri) == 0
    assert "already published" in capsys.readouterr().out
    assert _cache("versions", "--store", store_uri) == 0
    out = capsys.readouterr().out
    assert m["version"] in out and m["mem_digest"] in out and f"user {m['rows']['user']}" in out


def _copy(snapshot: str, dest: str, **changes) -> str:
    shutil.copytree(snapshot, dest)
    path = os.path.join(dest, "manifest.json")
    m = json.load(open(path))
    m.update(changes)
    with open(path, "w") as f:
        json.dump(m, f)
    return dest


def test_a_store_keeps_the_newest_versions(snapshot, tmp_path, capsys):
    uri = str(tmp_path / "knowledge.db")
    names = [f"v{i}" for i in range(6)]
    for name in names[:5]:
        result = load_snapshot(_copy(snapshot, str(tmp_path / name), version=name), uri, keep=5)
        assert result.loaded and result.dropped == []
    last = _copy(snapshot, str(tmp_path / names[5]), version=names[5])  # cache.keep_versions of --config: 5
    assert _cache("load", "--from", last, "--to", uri, "--config", QUICKSTART, "--set", "cache.keep_versions=5") == 0
    assert "dropped the oldest versions beyond 5: v0" in capsys.readouterr().out
    with open_store(uri) as store:
        assert [v.version for v in store.versions()] == names[1:]
    other = _copy(snapshot, str(tmp_path / "other"), version="v5", mem_digest="sha256:" + "1" * 64)
    with pytest.raises(ValueError, match="'v5' is already published from another snapshot"):
        load_snapshot(other, uri)  # the same name from another MEM: refused, not a silent no-op


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_snapshots_and_stores_are_one_line_errors(snapshot, tmp_path, capsys):
    uri = str(tmp_path / "knowledge.db")
    corrupt = _copy(snapshot, str(tmp_path / "corrupt"))
    with open(os.path.join(corrupt, "manifest.json"), "w") as f:
        f.write('{"format": "mkt-knowledge-cache", ')
    assert _cache("load", "--from", corrupt, "--to", uri) == 1
    _one_line_error(capsys, os.path.join(corrupt, "manifest.json"), "not a JSON knowledge-cache manifest")

    dims = dict(read_manifest(snapshot)["dims"], bogus=4)
    assert _cache("load", "--from", _copy(snapshot, str(tmp_path / "unknown"), dims=dims), "--to", uri) == 1
    _one_line_error(capsys, "key 'dims'", "unknown kind 'bogus'")

    m = read_manifest(snapshot)
    wrong = _copy(snapshot, str(tmp_path / "wrong"), dims=dict(m["dims"], user=7))
    assert _cache("load", "--from", wrong, "--to", uri) == 1
    _one_line_error(capsys, os.path.join(wrong, "user", "part-00000.parquet"), "kind 'user' has dim 7")

    no_digest = _copy(snapshot, str(tmp_path / "nodigest"))
    m2 = json.load(open(os.path.join(no_digest, "manifest.json")))
    del m2["mem_digest"]
    json.dump(m2, open(os.path.join(no_digest, "manifest.json"), "w"))
    assert _cache("load", "--from", no_digest, "--to", uri) == 1
    _one_line_error(capsys, "key 'mem_digest'", "missing")

    assert _cache("load", "--from", str(tmp_path / "absent"), "--to", uri) == 1
    _one_line_error(capsys, "no knowledge-cache manifest")
    with open_store(uri) as store:  # none of these published anything
        assert store.versions() == []

    unreachable = f"redis://127.0.0.1:{_free_port()}/0"
    assert _cache("load", "--from", snapshot, "--to", unreachable) == 1
    _one_line_error(capsys, unreachable)


def test_check_matches_refuses_another_mem_naming_both_digests(snapshot):
    m = read_manifest(snapshot)
    check_matches(m, m["mem_digest"], m["schema_digest"], "here")
    other = "sha256:" + "0" * 64
    with pytest.raises(ValueError) as e:
        check_matches(m, other, m["schema_digest"], "here")
    message = str(e.value)
    assert f"cache version {m['version']!r} was built from MEM {m['mem_digest']}" in message
    assert f"this run's MEM is {other}" in message and "\n" not in message
    with pytest.raises(ValueError, match="schema"):
        check_matches(m, m["mem_digest"], "ffff", "here")


def test_a_snapshot_on_object_storage(snapshot, mem_run, small_dataset, s3_bucket, tmp_path):
    """Built into s3:// (a moto server speaking S3): files named by the attempt, the manifest last, no partial
    files left; a rebuild with --overwrite leaves only the new files; it loads as the local snapshot does."""
    from mkt_torchrec import storage

    out = f"{s3_bucket}/cache/snapshot"
    assert _cache("build", "--mem-run", mem_run, "--data", small_dataset, "--out", out, *BUILD_SETS) == 0
    first = read_manifest(out)
    assert first["version"] == read_manifest(snapshot)["version"]
    assert _cache("build", "--mem-run", mem_run, "--data", small_dataset, "--out", out, "--overwrite",
                  *BUILD_SETS) == 0
    m = read_manifest(out)
    assert m["files"] != first["files"] and all("-mkt" in rel for files in m["files"].values() for rel in files)
    assert storage.listdir(out, recursive=True) == sorted(["manifest.json", *(r for f in m["files"].values()
                                                                               for r in f)])
    local = _entries(snapshot)
    for kind, (keys, vectors) in _entries(out).items():
        np.testing.assert_array_equal(keys, local[kind][0])
        np.testing.assert_array_equal(vectors, local[kind][1])
    uri = str(tmp_path / "knowledge.db")
    assert load_snapshot(out, uri).loaded
