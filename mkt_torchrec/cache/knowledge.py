"""Stage 2 with the MEM's knowledge read from a cache version (``model.tem.knowledge: cache``; KEEP 5.2-5.3).

In KEEP's deployment the downstream model never runs the pre-trained model: serving asks the General Knowledge
Center for the knowledge of (user u, item i, category c, version v) and plugs it in. Training must see the same
inputs, so the cached stage 2 reads the same cache version when it trains, validates, is evaluated and is served:

* :class:`CachedKnowledge` is the reader's ``augment`` hook (:class:`mkt_torchrec.data.reader.ParquetReader`):
  on the host, for each batch, it computes the keys (:mod:`mkt_torchrec.cache.keys`) from the batch's table rows,
  looks the three kinds up in the version (one query each) and appends the vectors to the batch's dense features,
  in the order of :class:`mkt_torchrec.models.mkt.Knowledge`: ``[dense || v_u || v_seq || v_shared || g_com^t]``.
  A key the version does not hold gives zeros (a user, item or pair the MEM never saw in the build data; the
  fraction found is logged per pass).
* :class:`mkt_torchrec.models.mkt.MKTTarget` built with ``cached`` dims splits them off again, so the stage
  holds no MEM (no MEM tables, no MEM forward), and its serving export takes the vectors as inputs.

Lookups run where the batch is made (the trainer's process, before the batch goes to the device), one round trip per
kind per batch; they add no collective and no device sync, and they read a published, immutable version, so the
same seed gives the same result.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Dict, Optional

import numpy as np
import torch

from mkt_torchrec.cache.keys import KINDS, key_spec, keys_of, single_rows
from mkt_torchrec.config import Config

log = logging.getLogger("mkt.cache")


def reads_cache(cfg: Config, stage: str) -> bool:
    """Whether ``stage`` of this config reads its knowledge from the cache (MKT's stage 2 with
    ``model.tem.knowledge: cache``)."""
    return (stage == "tem" and cfg.model.name == "mkt" and cfg.model.ablation not in ("no_mem_pretrain",
                                                                                      "no_tem_finetune")
            and cfg.model.tem.knowledge == "cache")


def knowledge_widths(cfg: Config) -> Any:
    """The widths of the MEM's (user, seq, shared, cross) knowledge vectors (a Knowledge of ints), from a MEM built
    on ``meta`` (nothing allocated)."""
    from mkt_torchrec.models.mkt import MEM, knowledge_dims

    return knowledge_dims(MEM(cfg.schema, cfg.model, device=torch.device("meta")))


def check_cache_settings(cfg: Config) -> None:
    """One-line errors for a cached stage 2 without a store or version, or with ``model.tem.mem_logit`` (the MEM's
    logit is not cached)."""
    if not cfg.cache.uri or not cfg.cache.version:
        raise ValueError("model.tem.knowledge=cache needs cache.uri (the store) and cache.version (the version "
                         "mkt cache build printed)")
    if cfg.model.tem.mem_logit:
        raise ValueError("model.tem.mem_logit needs the MEM's target logit, which the cache does not hold; use "
                         "model.tem.knowledge=mem")


class CachedKnowledge:
    """The reader hook: a batch -> the batch with its cached knowledge appended to ``dense_features``.

    Args:
        cfg: the run's config (``cache.uri``, ``cache.version``, ``cache.category_feature``, the schema).

    Raises:
        ValueError: the store does not hold the version (naming the versions it has), or the version's vectors have
            other widths than this model's.
    """

    def __init__(self, cfg: Config) -> None:
        from mkt_torchrec.cache.store import open_store

        check_cache_settings(cfg)
        self.uri, self.version = str(cfg.cache.uri), str(cfg.cache.version)
        self.spec = key_spec(cfg.schema, cfg.cache.category_feature)
        w = knowledge_widths(cfg)
        self.widths = (int(w.user), int(w.seq), int(w.shared), int(w.cross))
        self.store = open_store(self.uri)
        self.info = version_info(self.store, self.version)
        wanted = {"user": self.widths[0], "item": self.widths[2], "user_category": self.widths[1] + self.widths[3]}
        if {k: self.info.dims.get(k) for k in KINDS} != wanted:
            raise ValueError(f"{self.store.display}: version {self.version!r} holds vectors of widths "
                             f"{self.info.dims}; this model's knowledge needs {wanted}")
        self.rows = 0
        self.found = np.zeros(len(KINDS), dtype=np.int64)

    @property
    def width(self) -> int:
        return sum(self.widths)

    def vectors(self, kjt: Any) -> np.ndarray:
        """(B, width) float32 knowledge of a host KJT's rows, in Knowledge order."""
        keys = keys_of(single_rows(kjt, self.spec.features), self.spec)
        got = {kind: self.store.lookup(self.version, kind, keys[kind]) for kind in KINDS}
        for i, kind in enumerate(KINDS):
            self.found[i] += int(got[kind].found.sum())
        self.rows += int(keys["user"].shape[0])
        dseq = self.widths[1]
        pair = got["user_category"].vectors
        return np.concatenate([got["user"].vectors, pair[:, :dseq], got["item"].vectors, pair[:, dseq:]], axis=1)

    def __call__(self, batch: Any) -> Any:
        extra = torch.from_numpy(self.vectors(batch.sparse_features))
        return replace(batch, dense_features=torch.cat([batch.dense_features, extra], dim=1))

    def coverage(self) -> Dict[str, Optional[float]]:
        """The fraction of looked-up rows each kind found, since this object was made."""
        return {k: (float(self.found[i]) / self.rows if self.rows else None) for i, k in enumerate(KINDS)}


def version_info(store: Any, version: str) -> Any:
    """``store.info(version)``; a version the store does not hold is a ValueError (one line naming the versions it
    has), as every bad input of a command is."""
    from mkt_torchrec.cache.store import VersionNotPublished

    try:
        return store.info(version)
    except VersionNotPublished as e:
        raise ValueError(str(e)) from None


def attach(reader: Any, cfg: Config, stage: str) -> Any:
    """Give ``reader`` the cache hook when ``stage`` reads its knowledge from the cache; returns the reader."""
    if reads_cache(cfg, stage):
        reader.augment = CachedKnowledge(cfg)
    return reader


def check_cache_version(cfg: Config, mem_run: str) -> Dict[str, Any]:
    """The cached stage 2's version must hold the knowledge of ``mem_run``'s final MEM checkpoint (the same digest)
    for this schema (the same schema digest): a one-line error naming both digests otherwise. Returns what the run
    records of it: store (password masked), version, MEM checkpoint and digests."""
    from mkt_torchrec.cache.snapshot import check_matches
    from mkt_torchrec.cache.store import open_store
    from mkt_torchrec.training import checkpoint
    from mkt_torchrec.training.mem_transfer import mem_record

    check_cache_settings(cfg)
    store = open_store(str(cfg.cache.uri))
    info = version_info(store, str(cfg.cache.version))
    ckpt = checkpoint.final_checkpoint(mem_run)
    if ckpt is None:
        raise FileNotFoundError(f"{mem_run}: no complete checkpoint of the MEM")
    mem = mem_record(ckpt)
    check_matches(info.meta, mem["digest"], cfg.schema_digest(), f"{store.display} version {info.version!r}")
    return {"store": store.display, "version": info.version, "mem_checkpoint": mem["path"],
            "mem_digest": mem["digest"], "schema_digest": cfg.schema_digest()}
