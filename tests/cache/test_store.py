"""mkt_torchrec.cache's knowledge stores, the same tests for both: the SQLite file and a real ``redis-server``.

The Redis server is Debian's ``redis-server`` (the Makefile installs it where missing), started once per session on
a free localhost port with persistence off; where it is not installed the Redis cases skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mkt_torchrec.cache import (
    StoreUnreachable,
    VersionNotPublished,
    open_store,
    redis_store,
    sqlite_store,
)
from tests.conftest import REPO

STORES = ["sqlite", "redis"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """``redis://127.0.0.1:PORT/0`` of a redis-server running for the session (no persistence)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (make install adds Debian's redis-server package)")
    redis = pytest.importorskip("redis", reason="the redis client is not installed (make install adds it)")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path_factory.mktemp("redis"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server on port {port} did not answer (exit code {proc.poll()})")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    client.close()
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(params=STORES)
def uri(request, tmp_path) -> str:
    """An empty store of each kind."""
    if request.param == "sqlite":
        return str(tmp_path / "knowledge.db")
    url = request.getfixturevalue("redis_server")
    import redis

    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest.fixture
def store(uri):
    with open_store(uri) as s:
        yield s


def staged_tokens(store) -> set[str]:
    """Tokens of the writers whose data the backend holds (published or not): what a leak would leave."""
    if isinstance(store, sqlite_store.SQLiteStore):
        names = store.conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name LIKE ?",
                                   (sqlite_store._DATA_PREFIX + "%",)).fetchall()
        return {n[len(sqlite_store._DATA_PREFIX):].rsplit("_", 1)[0] for (n,) in names}
    return {k.decode().split(":")[3] for k in store.r.scan_iter(match=redis_store.PREFIX + "data:*")}


def unpublished_data(store) -> set[str]:
    return staged_tokens(store) - {v.token for v in store.versions()}


def vectors(rng, n: int, dim: int) -> np.ndarray:
    """Random float32 rows with the awkward values a cast or a text round trip would change."""
    out = rng.standard_normal((n, dim)).astype(np.float32)
    special = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, np.finfo(np.float32).max], np.float32)
    out.flat[:special.size] = special[:min(special.size, out.size)]
    out.view(np.uint32).flat[0] = 0x7FC00123  # a NaN with a payload
    return out


def load(store, version: str, data: dict, meta=None) -> bool:
    with store.begin(version, {k: v.shape[1] for k, (_, v) in data.items()}) as writer:
        for kind, (keys, vecs) in data.items():
            for i in range(0, len(keys), 40):  # in batches
                writer.put(kind, keys[i:i + 40], vecs[i:i + 40])
        return writer.publish(meta or {"mem_digest": version})


def test_round_trip_is_bit_exact_and_absent_keys_are_not_found(store, monkeypatch):
    monkeypatch.setattr(sqlite_store, "MAX_PARAMS", 7)  # several chunks per lookup: the chunked path too
    monkeypatch.setattr(redis_store, "CHUNK", 7)
    rng = np.random.default_rng(0)
    keys = {"user": rng.choice(np.arange(-500, 10**6), 150, replace=False).astype(np.int64),
            "item": np.array([0, 1, np.iinfo(np.int64).max, np.iinfo(np.int64).min, 77], np.int64)}
    data = {"user": (keys["user"], vectors(rng, 150, 16)), "item": (keys["item"], vectors(rng, 5, 3))}
    assert load(store, "mem-20261201-ab12cd34", data)
    for kind, (k, v) in data.items():
        absent = np.array([k.max() // 2 + 1, -123456789], np.int64)
        absent = absent[~np.isin(absent, k)]
        query = np.concatenate([k[::-1], absent, k[:3]])  # reversed, absent keys, duplicates
        got, found = store.lookup("mem-20261201-ab12cd34", kind, query)
        assert got.dtype == np.float32 and got.shape == (len(query), v.shape[1])
        expect_found = np.isin(query, k)
        assert found.tolist() == expect_found.tolist() and (~found).sum() == len(absent)
        index = {int(key): i for i, key in enumerate(k)}
        rows = np.array([index[int(q)] for q in query[found]])
        assert np.array_equal(got[found].view(np.uint32), v[rows].view(np.uint32))  # bit-exact, NaN payload too
        assert not got[~found].any()
    got, found = store.lookup("mem-20261201-ab12cd34", "user", np.zeros(0, np.int64))
    assert got.shape == (0, 16) and found.shape == (0,)
    (info,) = store.versions()
    assert info.rows == {"user": 150, "item": 5} and info.dims == {"user": 16, "item": 3}
    assert info.meta == {"mem_digest": "mem-20261201-ab12cd34"}


def test_an_unpublished_version_is_invisible_and_refused_in_one_line(store):
    rng = np.random.default_rng(1)
    assert load(store, "v-old", {"user": (np.arange(10), vectors(rng, 10, 4))})
    writer = store.begin("v-new", {"user": 4})
    writer.put("user", np.arange(10), vectors(rng, 10, 4))
    assert [v.version for v in store.versions()] == ["v-old"]
    for version in ("v-new", "never-loaded"):
        with pytest.raises(VersionNotPublished) as e:
            store.lookup(version, "user", [1, 2])
        message = str(e.value)
        assert "\n" not in message and repr(version) in message and store.display in message
        assert "it has: v-old" in message
    assert unpublished_data(store)  # the staged data is there, only invisible
    writer.abort()
    assert not unpublished_data(store)
    with pytest.raises(ValueError, match="has no kind 'item'"):
        store.lookup("v-old", "item", [1])
    # a writer left by an exception inside its block is aborted
    with pytest.raises(RuntimeError, match="interrupted"), store.begin("v-new", {"user": 4}) as w:
        w.put("user", np.arange(3), vectors(rng, 3, 4))
        raise RuntimeError("interrupted")
    assert not unpublished_data(store) and [v.version for v in store.versions()] == ["v-old"]


_KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from mkt_torchrec.cache import open_store
    store = open_store(sys.argv[1])
    writer = store.begin("v-killed", {"user": 8})
    for i in range(5):
        writer.put("user", np.arange(i * 100, (i + 1) * 100), np.ones((100, 8), np.float32))
    print("loading", flush=True)
    time.sleep(60)
    writer.publish({})
""")


def test_a_writer_killed_mid_load_leaves_no_version_and_its_leftovers_are_cleaned(uri):
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, uri], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": REPO})
    try:
        assert proc.stdout.readline().strip() == "loading"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    with open_store(uri) as store:
        assert store.versions() == []
        with pytest.raises(VersionNotPublished, match="'v-killed' is not published"):
            store.lookup("v-killed", "user", [1])
        killed = unpublished_data(store)
        assert len(killed) == 1  # its data is staged, invisible
        writer = store.begin("v-next", {"user": 8})  # begin cleans an abandoned writer's leftovers
        assert not killed & unpublished_data(store)
        writer.abort()
        assert not unpublished_data(store)


def test_a_second_load_of_a_published_version_is_a_no_op(store):
    rng = np.random.default_rng(2)
    first = vectors(rng, 20, 4)
    assert load(store, "v1", {"user": (np.arange(20), first)}, meta={"n": 1})
    assert not load(store, "v1", {"user": (np.arange(20), vectors(rng, 20, 4))}, meta={"n": 2})
    writer = store.begin("v1", {"user": 4})
    assert writer.already_published and not writer.publish({})
    # two loads of one version racing: the first publish wins, the second is a no-op and leaves nothing behind
    a, b = store.begin("v2", {"user": 4}), store.begin("v2", {"user": 4})
    a.put("user", np.arange(5), first[:5])
    b.put("user", np.arange(5), first[5:10])
    assert a.publish({"n": "a"}) and not b.publish({"n": "b"})
    assert [(v.version, v.meta) for v in store.versions()] == [("v1", {"n": 1}), ("v2", {"n": "a"})]
    assert np.array_equal(store.lookup("v1", "user", np.arange(20)).vectors.view(np.uint32), first.view(np.uint32))
    assert np.array_equal(store.lookup("v2", "user", np.arange(5)).vectors.view(np.uint32),
                          first[:5].view(np.uint32))
    assert not unpublished_data(store)


def test_prune_keeps_the_newest_versions_and_deletes_the_oldest(store):
    rng = np.random.default_rng(3)
    names = ["v-c", "v-a", "v-g", "v-b", "v-f", "v-e", "v-d"]  # publish order is not name order
    data = {name: vectors(rng, 6, 2) for name in names}
    for name in names:
        assert load(store, name, {"item": (np.arange(6), data[name])})
    assert [v.version for v in store.versions()] == names
    assert store.prune(keep=5) == ["v-c", "v-a"]
    assert [v.version for v in store.versions()] == names[2:]
    assert store.prune() == [] and store.prune(keep=3) == ["v-g", "v-b"]
    for gone in ("v-c", "v-a", "v-g", "v-b"):
        with pytest.raises(VersionNotPublished):
            store.lookup(gone, "item", [0])
    assert staged_tokens(store) == {v.token for v in store.versions()}  # the dropped versions' data is deleted
    for name in names[4:]:
        assert np.array_equal(store.lookup(name, "item", np.arange(6)).vectors.view(np.uint32),
                              data[name].view(np.uint32))
    with pytest.raises(ValueError, match="keep must be"):
        store.prune(keep=-1)


def test_a_version_dropped_and_loaded_again_is_read_afresh(uri):
    rng = np.random.default_rng(4)
    old, new = vectors(rng, 4, 2), vectors(rng, 4, 2)
    with open_store(uri) as reader, open_store(uri) as loader:
        assert load(loader, "v", {"user": (np.arange(4), old)})
        assert np.array_equal(reader.lookup("v", "user", np.arange(4)).vectors.view(np.uint32), old.view(np.uint32))
        assert loader.drop("v") and not loader.drop("v")
        with pytest.raises(VersionNotPublished):  # the reader had the version cached: still refused
            reader.lookup("v", "user", np.arange(4))
        assert load(loader, "v", {"user": (np.arange(4), new)})
        assert np.array_equal(reader.lookup("v", "user", np.arange(4)).vectors.view(np.uint32), new.view(np.uint32))
        # dropped and loaded again while the reader was not looking: its cached version is stale, still read afresh
        assert loader.drop("v") and load(loader, "v", {"user": (np.arange(4), old)})
        assert np.array_equal(reader.lookup("v", "user", np.arange(4)).vectors.view(np.uint32), old.view(np.uint32))


def test_widths_dtypes_and_names_are_checked_in_one_line(store):
    writer = store.begin("v", {"user": 16, "item": 8})
    for kind, vecs, pattern in [("user", np.zeros((3, 15), np.float32), r"kind 'user'.*its dim is 16"),
                                ("item", np.zeros((3, 16), np.float32), r"kind 'item'.*its dim is 8"),
                                ("user", np.zeros((3, 16), np.float64), r"kind 'user'.*float32"),
                                ("user", np.zeros((2, 16), np.float32), r"kind 'user': 3 keys but 2 vectors"),
                                ("category", np.zeros((3, 4), np.float32), r"kind 'category' is not among")]:
        with pytest.raises(ValueError, match=pattern) as e:
            writer.put(kind, np.arange(3), vecs)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="keys must be integers"):
        writer.put("user", np.arange(3.0), np.zeros((3, 16), np.float32))
    writer.abort()
    for bad in ({}, {"user": 0}, {"user": "16"}, {"us er": 4}):
        with pytest.raises(ValueError):
            store.begin("v", bad)
    with pytest.raises(ValueError, match="version 'a/b'"):
        store.begin("a/b", {"user": 4})


def test_an_unreachable_store_is_one_line_naming_the_uri_without_its_password(tmp_path):
    pytest.importorskip("redis", reason="the redis client is not installed (make install adds it)")
    port = _free_port()  # nothing listens there
    with pytest.raises(StoreUnreachable) as e:
        open_store(f"redis://:hunter2@127.0.0.1:{port}/0")
    message = str(e.value)
    assert f"redis://:***@127.0.0.1:{port}/0" in message and "hunter2" not in message and "\n" not in message
    missing_dir = tmp_path / "no-such-dir" / "k.db"
    for uri in (str(missing_dir), f"sqlite://{missing_dir}"):
        with pytest.raises(StoreUnreachable, match=f"{missing_dir}: cannot open") as e:
            open_store(uri)
        assert "\n" not in str(e.value)
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("not a database, " * 100)
    with pytest.raises(StoreUnreachable, match="notes.txt: cannot open"):
        open_store(str(not_a_db))
    with pytest.raises(ValueError, match="mongodb://u:\\*\\*\\*@h/db: unknown cache store scheme 'mongodb'"):
        open_store("mongodb://u:hunter2@h/db")


def test_sqlite_uri_and_path_name_the_same_file(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "k.db"
    with open_store(f"sqlite://{path}") as store:
        assert load(store, "v", {"user": (np.arange(3), vectors(rng, 3, 2))})
    with open_store(str(path)) as store:
        assert [v.version for v in store.versions()] == ["v"]


def test_redis_password_comes_from_the_uri_or_rediscli_auth_and_is_never_shown(redis_server, monkeypatch):
    import redis

    host_port_db = redis_server.split("://", 1)[1]
    admin = redis.Redis.from_url(redis_server)
    admin.config_set("requirepass", "s3cret-pw")
    try:
        monkeypatch.delenv(redis_store.PASSWORD_VARIABLE, raising=False)
        with pytest.raises(StoreUnreachable) as e:
            open_store(f"redis://:wrong-pw@{host_port_db}")
        assert "wrong-pw" not in str(e.value) and f"redis://:***@{host_port_db}" in str(e.value)
        with open_store(f"redis://:s3cret-pw@{host_port_db}") as store:
            assert store.versions() == []
        monkeypatch.setenv(redis_store.PASSWORD_VARIABLE, "s3cret-pw")
        with open_store(redis_server) as store:  # no password in the URI: taken from REDISCLI_AUTH
            store.versions()
    finally:
        with redis.Redis.from_url(redis_server, password="s3cret-pw") as authed:
            authed.config_set("requirepass", "")
        admin.close()


def test_a_writer_silent_past_stale_after_is_cleaned_up_and_told_so(uri):
    rng = np.random.default_rng(6)
    with open_store(uri) as loader, open_store(uri, stale_after_s=0.0) as impatient:
        writer = loader.begin("v-slow", {"user": 2})
        writer.put("user", np.arange(3), vectors(rng, 3, 2))
        time.sleep(0.01)
        impatient.begin("v-other", {"user": 2}).abort()  # sees the loader silent for longer than 0 s
        with pytest.raises(RuntimeError, match="'v-slow': this load was cleaned up as abandoned"):
            writer.put("user", np.arange(3, 6), vectors(rng, 3, 2))
        assert loader.versions() == [] and not unpublished_data(loader)


def test_redis_staged_data_expires_until_it_is_published(redis_server):
    with open_store(redis_server, stale_after_s=30.0) as store:
        store.r.flushdb()
        writer = store.begin("v", {"user": 2})
        writer.put("user", np.arange(3), np.zeros((3, 2), np.float32))
        key = redis_store._data_key(writer.record.token, "user")
        assert 0 < store.r.pttl(key) <= 30_000  # an abandoned load's data goes away by itself
        assert writer.publish({})
        assert store.r.pttl(key) == -1  # published: no expiry
