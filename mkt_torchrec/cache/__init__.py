"""The knowledge cache (KEEP's General Knowledge Center; issue 26): versioned key-value stores of knowledge vectors.

:func:`open_store` opens an embedded SQLite file (no server) or Redis behind one interface,
:class:`KnowledgeStore`; see :mod:`mkt_torchrec.cache.store`.
"""

from mkt_torchrec.cache.store import (
    DEFAULT_KEEP,
    KnowledgeStore,
    Lookup,
    StoreUnreachable,
    VersionInfo,
    VersionNotPublished,
    VersionWriter,
    open_store,
)

__all__ = ["DEFAULT_KEEP", "KnowledgeStore", "Lookup", "StoreUnreachable", "VersionInfo", "VersionNotPublished",
           "VersionWriter", "open_store"]
