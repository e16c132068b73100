"""The knowledge cache's size at a config's scale: entries x bytes per entry, for each kind (KEEP 5.2: N_u + N_i +
N_uc entries instead of N_u x N_i).

Widths come from the config's MEM (built on ``meta``: nothing allocated): ``user`` = v_u, ``item`` = v_shared,
``user_category`` = v_seq + g_com^t; an entry is an int64 key and float32 values. Entries: users = the user-id
table's rows (``--users`` to override), items = ``--items`` (the target entity's items: only they are served; the
plan does not know how many there are), pairs = users x ``--categories-per-user`` (each user's distinct categories
in the build window; a range is printed). The raw size is what the vectors and keys take; a store adds its own
overhead (``tools/bench_cache.py`` measured SQLite at 2.7x and Redis at 2.1x the raw vectors for 1M x 16).

Prints a markdown table, then one JSON object on its last line.

Example:
    python tools/cache_size.py --config configs/industrial.yaml --items 4000000 --categories-per-user 5 20 50
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mkt_torchrec.cache.keys import kind_dims  # noqa: E402
from mkt_torchrec.cache.knowledge import knowledge_widths  # noqa: E402
from mkt_torchrec.config import load_config  # noqa: E402

KEY_BYTES, VALUE_BYTES = 8, 4


def sizes(config: str, items: int, per_user: list, users: int = 0) -> dict:
    cfg = load_config(config)
    w = knowledge_widths(cfg)
    dims = kind_dims(w.user, w.seq, w.shared, w.cross)
    users = users or cfg.schema.tables[cfg.schema.table_of(cfg.schema.user_id_feature)].rows
    rows = []
    for c in per_user:
        entries = {"user": users, "item": items, "user_category": users * c}
        raw = {k: n * (KEY_BYTES + VALUE_BYTES * dims[k]) for k, n in entries.items()}
        rows.append({"categories_per_user": c, "entries": entries, "bytes": raw, "total_bytes": sum(raw.values()),
                     "total_gib": round(sum(raw.values()) / 2**30, 1)})
    return {"config": config, "dims": dims, "users": users, "items": items, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/industrial.yaml")
    p.add_argument("--items", type=int, default=4_000_000, help="target-entity items (paper Table 1: 4M posts)")
    p.add_argument("--users", type=int, default=0, help="users (default: the user-id table's rows)")
    p.add_argument("--categories-per-user", type=int, nargs="+", default=[5, 20, 50])
    args = p.parse_args()
    result = sizes(args.config, args.items, args.categories_per_user, args.users)
    d = result["dims"]
    print(f"widths (float32 values per entry): user {d['user']}, item {d['item']}, user_category {d['user_category']}")
    print("| categories per user | user entries | item entries | user-category entries | raw size |")
    print("|---|---|---|---|---|")
    for r in result["rows"]:
        e = r["entries"]
        print(f"| {r['categories_per_user']} | {e['user']:,} | {e['item']:,} | {e['user_category']:,} | "
              f"{r['total_gib']} GiB |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
