"""Settings of the knowledge cache (``cache``: ``mkt cache``, stage 2 with ``model.tem.knowledge: cache``, ``mkt
score``): part of the config (:mod:`mkt_torchrec.config`), kept apart so that module stays one job. No torch here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mkt_torchrec.typed import check


@dataclass
class CacheConfig:
    """The MEM's knowledge cached in a key-value store (KEEP's General Knowledge Center; ``mkt_torchrec.cache``).

    Args:
        uri: the store: a path or ``sqlite:///path`` (embedded SQLite, no server) or ``redis://host:port/db``.
            Stage 2 with ``model.tem.knowledge: cache`` reads its knowledge from it; ``mkt cache load --to`` and
            ``mkt score --cache`` name it on the command line instead. A password goes in ``$REDISCLI_AUTH``, never in
            the URI (the config is recorded in every run.json).
        version: the cache version stage 2 trains and is evaluated with (``mkt cache build`` prints it). A version
            the store does not hold is an error, never a fallback to another.
        keep_versions: versions a store keeps: loading one more drops the oldest published (KEEP keeps 5).
        category_feature: the entity-shared feature that stands in for the item in the degenerated
            (user, category) knowledge (KEEP 5.2.2).
        splits: the dataset splits ``mkt cache build`` computes the knowledge from (their rows' features only,
            never labels).
        batch_size: rows per lookup batch of ``mkt score`` and of the cache build.
    """

    uri: Optional[str] = None
    version: Optional[str] = None
    keep_versions: int = 5
    category_feature: str = "category"
    splits: list[str] = field(default_factory=lambda: ["train"])
    batch_size: int = 4096

    def _validate(self, key: str) -> None:
        from urllib.parse import urlsplit

        check(not (self.uri and "://" in self.uri and urlsplit(self.uri).password), f"{key}.uri",
              "holds a password, which every run record would keep: give it in $REDISCLI_AUTH instead")
        check(self.keep_versions >= 1, f"{key}.keep_versions", "expected at least 1")
        check(self.batch_size >= 1, f"{key}.batch_size", "expected a positive int")
        check(bool(self.splits) and all(s in ("train", "valid", "test") for s in self.splits), f"{key}.splits",
              "expected a non-empty list of train / valid / test")
