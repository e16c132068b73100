"""Small Spark-style impression logs for the build tests, and a brute-force reference of what `mkt build` makes.

The logs: day partitions (``dt=...``), the logs' own column names, string ids, both entities mixed in every row
group, rows in no time order, ties in time, nulls in side features, no sequences. The reference recomputes every
output row in plain Python from the rows alone (no SQL, no windows): the tests hold the builder to it.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

SCHEMA = {
    "user_id_feature": "user_id",
    "tables": {
        "user_id": {"rows": 1000, "dim": 4},
        "item_id": {"rows": 1000, "dim": 4},
        "category": {"rows": 100, "dim": 4},
        "price_bucket": {"rows": 8, "dim": 4, "id_mapping": "modulo"},
        "style": {"rows": 8, "dim": 4, "id_mapping": "modulo"},
    },
    "features": {
        "user_id": {"group": "user"},
        "item_id": {"group": "shared"},
        "category": {"group": "shared"},
        "price_bucket": {"group": "specific", "entity": "source"},
        "style": {"group": "specific", "entity": "target"},
    },
    "sequences": {
        "hist_source_items": {"entity": "source", "shared_feature": "item_id", "max_len": 3,
                              "side_features": {"category": "hist_source_categories"}},
        "hist_target_items": {"entity": "target", "shared_feature": "item_id", "max_len": 2,
                              "side_features": {"category": "hist_target_categories"}},
    },
    "dense": {"log_price": {"group": "specific", "entity": "source"}},
}
SOURCE = {
    "time": {"column": "event_time"},
    "label": {"column": "clicked"},
    "entity": {"column": "item_type", "values": {"product": "source", "post": "target"}},
    "features": {
        "user_id": {"column": "uid"},
        "item_id": {"column": "item", "by_entity": True},
        "category": {"column": "category"},
        "price_bucket": {"column": "price", "transform": "bucket", "boundaries": [10, 50]},
        "style": {"column": "style"},
    },
    "dense": {"log_price": {"column": "price", "transform": "log1p"}},
    "split": {"by": "time", "valid_from": "2026-11-03", "test_from": "2026-11-04"},
}
DAYS = 4
MISSING_RAW = 2 ** 61 - 1


def write_logs(root: str, rows: int = 3000, seed: int = 0, users: int = 30, write=None) -> None:
    """Write the logs under ``root`` (a local directory, or through ``write(rel_path, table)``)."""
    rng = np.random.default_rng(seed)
    t0 = np.datetime64("2026-11-01T00:00:00", "us")
    t = t0 + rng.integers(0, DAYS * 86400, rows).astype("timedelta64[s]").astype("timedelta64[us]")
    t[1::7] = t[0::7][: len(t[1::7])]  # ties in time (of any users; some of the same user)
    ent = rng.choice(["product", "post"], rows, p=[0.6, 0.4])
    product = ent == "product"
    category = np.array([f"c{i}" for i in rng.integers(0, 6, rows)], dtype=object)
    category[rng.random(rows) < 0.05] = None  # nulls in a side feature
    table = pa.table({
        "uid": [f"u{i:03d}" for i in rng.integers(0, users, rows)],
        "item": [f"i{i}" for i in rng.integers(0, 40, rows)],
        "item_type": ent,
        "clicked": rng.integers(0, 2, rows).astype(np.int32),
        "event_time": pa.array(t, pa.timestamp("us", tz="UTC")),
        "category": pa.array(category, pa.string()),
        "price": pa.array(np.where(product, np.round(rng.uniform(1, 100, rows), 2), np.nan), from_pandas=True),
        "style": pa.array(np.where(product, 0, rng.integers(0, 5, rows)), mask=product).cast(pa.int32()),
        "spark_noise": rng.random(rows),  # a column nobody maps
    })
    days = np.array(t, dtype="datetime64[D]").astype(str)
    for day in sorted(set(days)):
        part = table.filter(pa.array(days == day)).drop(["event_time"]).append_column(
            "event_time", table.filter(pa.array(days == day))["event_time"])
        half = part.num_rows // 2
        for i, piece in enumerate((part.slice(0, half), part.slice(half))):
            rel = f"dt={day}/part-{i:05d}-5a1b.c000.snappy.parquet"
            if write is not None:
                write(rel, piece)
            else:
                os.makedirs(os.path.join(root, f"dt={day}"), exist_ok=True)
                pq.write_table(piece, os.path.join(root, rel), row_group_size=200)


def config_text(path: str, **source) -> str:
    return yaml.safe_dump({"schema": SCHEMA, "source": {**SOURCE, "inputs": [{"path": path}], **source}},
                          sort_keys=False)


def hash_id(s: str) -> int:
    return int(hashlib.md5(s.encode()).hexdigest()[:15], 16)


def reference(root: str, split_by: str = "time", test_fraction: float = 0.2) -> dict:
    """split -> entity -> list of row dicts, in time order, recomputed in plain Python from the logs."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".parquet"))
    rows = []
    for fi, path in enumerate(files):
        for ri, r in enumerate(pq.read_table(path).to_pylist()):
            rows.append({**r, "_key": (int(np.datetime64(r["event_time"].replace(tzinfo=None), "us")
                                           .astype(np.int64)), fi, ri)})
    rows.sort(key=lambda r: r["_key"])
    out = []
    for r in rows:
        e = 0 if r["item_type"] == "product" else 1
        price = r["price"]
        o = {
            "entity": e, "label": r["clicked"], "user_id": hash_id(r["uid"]),
            "item_id": hash_id(("source|" if e == 0 else "target|") + r["item"]),
            "category": None if r["category"] is None else hash_id(r["category"]),
            "price_bucket": None if e == 1 else 1 + sum(price >= b for b in (10, 50)),
            "style": None if e == 0 else r["style"],
            "log_price": None if e == 1 else float(np.float32(math.copysign(math.log1p(abs(price)), price))),
            "_t": r["_key"][0], "_key": r["_key"], "_u": r["uid"],
        }
        out.append(o)
    for o in out:
        earlier = [p for p in out if p["_u"] == o["_u"] and p["label"] == 1 and p["_t"] < o["_t"]]
        o["activity"] = len(earlier)
        for name, ent, max_len, side in (("hist_source_items", 0, 3, "hist_source_categories"),
                                         ("hist_target_items", 1, 2, "hist_target_categories")):
            steps = [p for p in earlier if p["entity"] == ent][-max_len:] if max_len else []
            o[name] = [p["item_id"] for p in steps]
            o[side] = [MISSING_RAW if p["category"] is None else p["category"] for p in steps]
    by_split: dict = {}
    for o in out:
        if split_by == "time":
            day = str(np.datetime64(o["_t"], "us").astype("datetime64[D]"))
            split = "test" if day >= "2026-11-04" else "valid" if day >= "2026-11-03" else "train"
        else:
            mine = [p for p in out if p["_u"] == o["_u"]]
            earlier = sum(p["_t"] < o["_t"] for p in mine)  # rows at one time share a split
            split = "test" if earlier >= math.floor((1 - test_fraction) * len(mine) + 1e-9) else "train"
        by_split.setdefault(split, {}).setdefault(o["entity"], []).append(o)
    return by_split
