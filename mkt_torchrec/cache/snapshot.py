"""A knowledge-cache snapshot on storage, and loading it into a store (KEEP's versioned knowledge, sections 5.2-5.3).

KEEP (Zhang et al., CIKM 2022, arXiv 2208.10174) computes the pre-trained model's knowledge offline and serves it
from a key-value service that keeps several versions, so a downstream model reads exactly the version it was
trained with. ``mkt cache build`` (:mod:`mkt_torchrec.cache.build`) writes one such version as files, a
*snapshot*; ``mkt cache load`` (:func:`load_snapshot`) streams a snapshot into a store
(:func:`mkt_torchrec.cache.store.open_store`) and publishes it there atomically. The two steps are apart so a
snapshot is computed once (on the training cluster, next to the MEM checkpoint) and loaded into as many stores as
serve it (a local SQLite file for stage 2 and ``mkt score``, Redis for online serving).

Layout (a local directory or an object-store prefix, through :mod:`mkt_torchrec.storage`)::

    SNAPSHOT/manifest.json                 written last: a snapshot without it does not exist
    SNAPSHOT/<kind>/part-RRRRR.parquet     one file per building rank; columns ``key`` int64 and
                                           ``vector`` fixed_size_list<float32>[dims[kind]], rows sorted by key,
                                           each key in exactly one file (rank r holds the keys with key % N == r)

``manifest.json``::

    {"format": "mkt-knowledge-cache", "format_version": 1, "version": "mem-120-ab12cd34",
     "mem_run": ..., "mem_checkpoint": ..., "mem_step": 120, "mem_digest": "sha256:...",
     "schema_digest": "...", "dims": {kind: width}, "keys": {"user": [...], "item": [...], "category": ...},
     "splits": ["train"], "data": ..., "rows": {kind: entries}, "files": {kind: [relative paths]},
     "config": {"model": ..., "schema": ..., "cache": ...}, "ranks": N, "built_at": ...}

The kinds, their vectors and their keys are :mod:`mkt_torchrec.cache.keys`'s. A store's version carries the
manifest less ``files`` as its ``meta``, so a reader checks what it was built from with :func:`check_matches`.
Errors are one line naming the file and the key at fault. No torch here.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np

from mkt_torchrec import storage
from mkt_torchrec.cache.keys import KINDS
from mkt_torchrec.cache.store import DEFAULT_KEEP, check_dims, check_name, open_store
from mkt_torchrec.manifest_schema import validate

FORMAT = "mkt-knowledge-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
READ_BATCH_ROWS = 65536  # rows per put when loading: a few MB of vectors at the widths MKT uses

# The manifest's structure (mkt_torchrec.manifest_schema: one validator for the project's JSON manifests).
_STRING = {"type": "string"}
MANIFEST_SCHEMA: Dict[str, Any] = {
    "type": "object",
    "required": ["format", "format_version", "version", "mem_run", "mem_checkpoint", "mem_digest", "schema_digest",
                 "dims", "keys", "splits", "data", "rows", "files"],
    "properties": {
        "format": _STRING, "format_version": {"type": "integer"}, "version": _STRING, "mem_run": _STRING,
        "mem_checkpoint": _STRING, "mem_digest": _STRING, "schema_digest": _STRING, "dims": {"type": "object"},
        "keys": {"type": "object"}, "splits": {"type": "array"}, "data": _STRING,
        "rows": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
        "files": {"type": "object", "additionalProperties": {"type": "array"}},
    },
}


def _bad(path: str, key: str, what: str) -> ValueError:
    return ValueError(f"{storage.display(path)}: key {key!r}: {what}")


def _check_relative(path: str, kind: str, rel: Any) -> str:
    if (not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or storage.is_uri(rel)
            or any(part in ("", ".", "..") for part in rel.split("/"))):
        raise _bad(path, f"files.{kind}", f"{rel!r} is not a relative path inside the snapshot")
    return rel


def parse_manifest(data: bytes, path: str) -> Dict[str, Any]:
    """The validated manifest from the bytes of ``path`` (which errors name).

    Raises:
        ValueError: not JSON, not a knowledge-cache manifest, of a newer format, or a key missing or malformed
            (one line naming ``path`` and the key).
    """
    try:
        m = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{storage.display(path)}: not a JSON knowledge-cache manifest ({e})") from None
    if not isinstance(m, dict):
        raise ValueError(f"{storage.display(path)}: not a knowledge-cache manifest (a JSON object was expected)")
    if m.get("format") != FORMAT:
        raise _bad(path, "format", f"{m.get('format')!r}, expected {FORMAT!r}: not a knowledge-cache snapshot of "
                   "mkt cache build")
    validate(m, MANIFEST_SCHEMA, storage.display(path))
    if m["format_version"] != FORMAT_VERSION:
        newer = m["format_version"] > FORMAT_VERSION
        raise _bad(path, "format_version", f"{m['format_version']}; this code reads {FORMAT_VERSION}"
                   + (" (written by a newer release: upgrade to load it)" if newer else ""))
    try:
        check_name("version", m["version"])
    except ValueError as e:
        raise _bad(path, "version", str(e)) from None
    unknown = [k for k in m["dims"] if k not in KINDS]
    if unknown:
        raise _bad(path, "dims", f"unknown kind {unknown[0]!r} (the kinds are {', '.join(KINDS)})")
    try:
        m["dims"] = check_dims(m["dims"])
    except ValueError as e:
        raise _bad(path, "dims", str(e)) from None
    for key in ("rows", "files"):
        if set(m[key]) != set(m["dims"]):
            raise _bad(path, key, f"kinds {sorted(m[key])} differ from those of 'dims' {sorted(m['dims'])}")
    for kind, files in m["files"].items():
        for rel in files:
            _check_relative(path, kind, rel)
    for name in ("user", "item", "category"):
        if name not in m["keys"]:
            raise _bad(path, "keys", f"no {name!r} entry (the features each kind's key folds)")
    return m


def read_manifest(snapshot: str) -> Dict[str, Any]:
    """The validated ``manifest.json`` of the snapshot at ``snapshot`` (a directory or a URI).

    Raises:
        FileNotFoundError: no manifest there (a build that never finished leaves none).
        ValueError: the manifest is malformed (one line naming the file and the key).
    """
    path = storage.join(snapshot, MANIFEST)
    if not storage.is_file(path):
        raise FileNotFoundError(f"{storage.display(path)}: no knowledge-cache manifest (is "
                                f"{storage.display(snapshot)} a snapshot written by mkt cache build?)")
    return parse_manifest(storage.read_bytes(path), path)


def referenced_files(data: bytes) -> List[str]:
    """The relative paths a manifest's bytes reference (what a published snapshot consists of, manifest aside)."""
    try:
        files = json.loads(data).get("files", {})
        return [rel for kind_files in files.values() for rel in kind_files]
    except (ValueError, AttributeError, TypeError):
        return []


def store_meta(manifest: Mapping[str, Any]) -> Dict[str, Any]:
    """What a store keeps with the version: the manifest less its file list (files belong to the snapshot)."""
    return {k: v for k, v in manifest.items() if k != "files"}


def check_matches(meta: Mapping[str, Any], mem_digest: str, schema_digest: str, where: str) -> None:
    """Refuse a cache version that was not built from this MEM checkpoint and schema.

    Args:
        meta: the version's meta (``store.info(version).meta``) or a snapshot's manifest.
        mem_digest: this run's MEM checkpoint digest (:func:`mkt_torchrec.training.mem_transfer.mem_record`).
        schema_digest: this run's ``cfg.schema_digest()``.
        where: what holds the version, for the message (a store's URI, a snapshot's path).

    Raises:
        ValueError: one line naming the version and both digests that differ.
    """
    version = meta.get("version")
    built = meta.get("mem_digest")
    if built != mem_digest:
        raise ValueError(f"{where}: cache version {version!r} was built from MEM {built}; this run's MEM is "
                         f"{mem_digest} (build a cache from this MEM with mkt cache build --mem-run, or use the MEM "
                         "the cache was built from)")
    built_schema = meta.get("schema_digest")
    if built_schema != schema_digest:
        raise ValueError(f"{where}: cache version {version!r} was built with schema {built_schema}; this run's "
                         f"schema is {schema_digest}")


def read_part(snapshot: str, kind: str, rel: str, dim: int,
              batch_rows: int = READ_BATCH_ROWS) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """The (keys (N,) int64, vectors (N, dim) float32) of one part file, in batches of at most ``batch_rows``.

    Raises:
        ValueError: the file is not Parquet, or its columns are not ``key`` int64 and ``vector``
            fixed_size_list<float32>[dim] without nulls (naming the file, the kind and its width).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    location = storage.join(snapshot, rel)
    shown = storage.display(location)
    fs, path = storage.filesystem(location)
    expected = pa.list_(pa.float32(), dim)
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            if schema.get_field_index("key") < 0 or schema.get_field_index("vector") < 0:
                raise ValueError(f"{shown}: expected columns 'key' and 'vector', found {schema.names}")
            if schema.field("key").type != pa.int64():
                raise ValueError(f"{shown}: column 'key' is {schema.field('key').type}, expected int64")
            found = schema.field("vector").type
            if found != expected:
                raise ValueError(f"{shown}: column 'vector' is {found}, expected {expected} (kind {kind!r} has "
                                 f"dim {dim} in the manifest)")
            for rb in pf.iter_batches(batch_size=batch_rows, columns=["key", "vector"]):
                keys, vectors = rb.column(0), rb.column(1)
                if keys.null_count or vectors.null_count:
                    raise ValueError(f"{shown}: null keys or vectors (kind {kind!r})")
                values = vectors.flatten().to_numpy(zero_copy_only=False)  # (N * dim,) respects slicing
                yield (keys.to_numpy(zero_copy_only=False).astype(np.int64, copy=False),
                       values.astype(np.float32, copy=False).reshape(-1, dim))  # (N, dim)
    except FileNotFoundError:
        raise FileNotFoundError(f"{shown}: part file of kind {kind!r} is missing (the snapshot is incomplete)") \
            from None
    except pa.ArrowException as e:
        raise ValueError(f"{shown}: cannot read this part file of kind {kind!r} "
                         f"({' '.join(str(e).split())[:200]})") from None


class LoadResult(NamedTuple):
    """What :func:`load_snapshot` did."""

    version: str
    loaded: bool  # False: the store had this version published already (nothing written)
    rows: Dict[str, int]  # entries per kind
    dropped: List[str]  # versions pruned to keep ``keep`` (oldest first)
    store: str  # the store's URI, password masked


def load_snapshot(snapshot: str, uri: str, keep: int = DEFAULT_KEEP,
                  batch_rows: int = READ_BATCH_ROWS) -> LoadResult:
    """Stream the snapshot at ``snapshot`` into the store at ``uri``, publish it, keep the newest ``keep`` versions.

    Loading is KEEP's version switch: the store's writer stages every entry, then publishes the version in one
    step (a reader sees all of it or none), with the manifest less ``files`` as its meta. A version the store has
    published already is left as it is (a no-op, ``loaded`` False) if it came from the same MEM, schema and row
    counts; a different snapshot under the same version name is refused. Then the oldest published versions are
    dropped until ``keep`` remain (KEEP keeps 5), this one included.

    Raises:
        FileNotFoundError: no snapshot (manifest) at ``snapshot``, or a part file is missing.
        ValueError: a malformed manifest or part file (nothing is published then), or a clashing version.
        StoreUnreachable: the store cannot be opened or reached (one line naming ``uri``).
    """
    manifest = read_manifest(snapshot)
    version, dims = manifest["version"], manifest["dims"]
    where = storage.display(storage.join(snapshot, MANIFEST))
    with open_store(uri) as store:
        with store.begin(version, dims) as writer:
            if writer.already_published:
                _check_same(store.info(version).meta, manifest, store.display)
                published = False
            else:
                for kind, files in manifest["files"].items():
                    n = 0
                    for rel in files:
                        for keys, vectors in read_part(snapshot, kind, rel, dims[kind], batch_rows):
                            writer.put(kind, keys, vectors)
                            n += keys.shape[0]
                    if n != manifest["rows"][kind]:
                        raise ValueError(f"{where}: key 'rows.{kind}' says {manifest['rows'][kind]} entries, its "
                                         f"part files hold {n}")
                published = writer.publish(store_meta(manifest))
        dropped = store.prune(keep)
        return LoadResult(version, published, dict(manifest["rows"]), dropped, store.display)


def _check_same(meta: Mapping[str, Any], manifest: Mapping[str, Any], where: str) -> None:
    """A published version of the same name must be this snapshot's (same MEM, schema, kinds and rows)."""
    for key in ("mem_digest", "schema_digest", "dims", "rows", "keys"):
        if meta.get(key) != manifest.get(key):
            raise ValueError(f"{where}: version {manifest['version']!r} is already published from another snapshot "
                             f"({key} {meta.get(key)} there, {manifest.get(key)} in this one); give the build "
                             "another --version")


def describe_versions(uri: str) -> List[Dict[str, Any]]:
    """The store's published versions, oldest first: version, MEM digest and step, rows per kind, publish time."""
    import datetime

    with open_store(uri) as store:
        out = []
        for info in store.versions():
            out.append({"version": info.version, "mem_digest": info.meta.get("mem_digest"),
                        "mem_step": info.meta.get("mem_step"), "rows": info.rows,
                        "published_at": datetime.datetime.fromtimestamp(info.published_at, datetime.timezone.utc)
                        .strftime("%Y-%m-%dT%H:%M:%SZ")})
        return out


def version_summary(entries: List[Dict[str, Any]], uri: Optional[str] = None) -> str:
    """``describe_versions``' entries as text lines, newest last."""
    if not entries:
        return f"{uri or 'the store'}: no published version"
    lines = []
    for e in entries:
        rows = ", ".join(f"{k} {v}" for k, v in sorted(e["rows"].items()))
        lines.append(f"{e['version']}  MEM {e['mem_digest']} (step {e['mem_step']})  rows: {rows}  "
                     f"published {e['published_at']}")
    return "\n".join(lines)
