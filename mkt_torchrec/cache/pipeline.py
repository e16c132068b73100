"""``mkt run --runs mkt_cached``: MKT whose stage 2 reads the MEM's knowledge from a cache version, built and loaded
between the stages, so the cached stage 2 and the full one (``mkt``) compare in one job, seed by seed.

For seed ``k`` the run's directories are ``OUT/runs/mkt_cached/seedK/{mem,tem}`` as for any run, plus
``knowledge/`` (the snapshot ``mkt cache build`` writes, from the MEM's final checkpoint and the dataset's
``cache.splits``) and ``knowledge.db`` (the SQLite store it is loaded into, as version ``mkt_cached-seedK``). The
stage-2 config names them (``cache.uri``, ``cache.version``), so ``mkt evaluate`` and ``mkt score`` find them. A
rerun reuses a finished snapshot and a published version (a second load is a no-op).
"""

from __future__ import annotations

import logging
import os

from mkt_torchrec import storage
from mkt_torchrec.cache.knowledge import reads_cache
from mkt_torchrec.config import Config

log = logging.getLogger("mkt.cache")

SNAPSHOT, STORE = "knowledge", "knowledge.db"


def run_config(cfg: Config, root: str, name: str, seed: int) -> Config:
    """A run's seeded config with, when its stage 2 reads the cache and the job names no store, the run's own
    store and version under ``root`` (``OUT/runs/NAME/seedK``)."""
    if not reads_cache(cfg, "tem") or cfg.cache.uri:
        return cfg
    if not storage.is_local(root):
        raise ValueError(f"--runs {name}: its knowledge store is a SQLite file beside the run; use a local --out, or "
                         "set cache.uri / cache.version to a store loaded with mkt cache load")
    return cfg.with_settings({"cache.uri": os.path.join(os.path.abspath(root), STORE),
                              "cache.version": f"{name}-seed{seed}"})


def ensure_cache(cfg: Config, root: str, mem_run: str, data: str) -> None:
    """Every rank: build the MEM's knowledge into ``root/knowledge`` (all ranks, unless a finished snapshot is there)
    and load it into ``cfg.cache.uri`` as ``cfg.cache.version`` (rank 0; a no-op when published already)."""
    import torch.distributed as dist

    from mkt_torchrec.cache.build import build_rank, prepare
    from mkt_torchrec.cache.snapshot import MANIFEST, load_snapshot
    from mkt_torchrec.collective import Collective
    from mkt_torchrec.training.distributed import init_distributed

    info = init_distributed()
    snapshot = os.path.join(root, SNAPSHOT)
    if not os.path.isfile(os.path.join(snapshot, MANIFEST)):
        plan = prepare(mem_run, data, snapshot, job=cfg, version=cfg.cache.version, overwrite=True)
        summary = build_rank(plan)
        if info.is_main:
            log.info("cache %s: built %s from %s (%s)", cfg.cache.version, summary["rows"], mem_run, snapshot)
    Collective(info.device).on_root(lambda: load_snapshot(snapshot, str(cfg.cache.uri), cfg.cache.keep_versions))
    dist.barrier()
